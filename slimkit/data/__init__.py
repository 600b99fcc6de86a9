"""Datasets for training and evaluating compressed models.

``load(spec)`` returns a :class:`Dataset` held in memory as uint8 tensors with ``train``,
``val`` (carved from train, seeded) and ``test`` splits; ``dataset.loader(split)`` yields
normalised float batches. Specs: ``digits`` (built in), ``cifar10:PATH``, ``imagefolder:PATH``;
a new kind registers with ``@DATASETS.register("name")``.
"""

from .core import SPLITS, Augment, Dataset, DatasetInfo, Loader, Split, augment_batch, resize_images
from .folder import default_cache_dir
from .sources import CIFAR10_CLASSES, DATASETS, DIGITS_MEAN, DIGITS_STD, IMAGENET_MEAN, IMAGENET_STD, Source, load
from .splits import balanced_subset, make_rng, stratified_split

__all__ = ["SPLITS", "Augment", "Dataset", "DatasetInfo", "Loader", "Split", "augment_batch", "resize_images",
           "default_cache_dir", "CIFAR10_CLASSES", "DATASETS", "DIGITS_MEAN", "DIGITS_STD", "IMAGENET_MEAN",
           "IMAGENET_STD", "Source", "load", "balanced_subset", "make_rng", "stratified_split"]
