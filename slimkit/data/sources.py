"""The dataset kinds (``digits``, ``cifar10:PATH``, ``imagefolder:PATH``) and :func:`load`.

A kind is a function registered in :data:`DATASETS` that returns a :class:`Source` (info, train
and test splits, augmentation policy); :func:`load` then carves ``val`` from train and applies
``limit`` the same way for every kind, so a new kind is one decorated function.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import SlimkitError
from ..registry import Registry
from .core import Augment, Dataset, DatasetInfo, Split, resize_images
from .folder import DEFAULT_IMAGE_SIZE, default_cache_dir, read_folder, scan_folder
from .splits import balanced_subset, make_rng, stratified_split

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-pixel mean/std of the digits train part (the 1,438 images outside the fixed test split), scaled to 0..1.
DIGITS_MEAN = (0.3060,)
DIGITS_STD = (0.3763,)
FIXED_TEST_SIZE = 0.2
FIXED_TEST_SEED = 20240101    # a constant, so the test split never moves with the user's seed


@dataclass
class Source:
    """What a dataset kind returns: its info, train and test splits, and the augmentation policy."""

    info: DatasetInfo
    train: Split
    test: Split
    augment: Augment = Augment()


SourceFn = Callable[..., Source]
DATASETS: Registry[SourceFn] = Registry("dataset kind")


def _split(images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> Split:
    return Split(torch.as_tensor(images, dtype=torch.uint8), torch.as_tensor(labels, dtype=torch.int64))


def _fixed_test_split(images: np.ndarray, labels: np.ndarray) -> tuple[Split, Split]:
    train_idx, test_idx = stratified_split(labels, FIXED_TEST_SIZE, make_rng(FIXED_TEST_SEED))
    return _split(images[train_idx], labels[train_idx]), _split(images[test_idx], labels[test_idx])


def _existing_dir(arg: str, kind: str) -> str:
    if not arg:
        raise SlimkitError(f"dataset spec {kind!r} needs a path: {kind}:PATH")
    path = os.path.abspath(os.path.expanduser(arg))
    if not os.path.isdir(path):
        raise SlimkitError(f"dataset folder {path} does not exist (from spec {kind}:{arg})")
    return path


@DATASETS.register("digits")
def digits(arg: str = "", *, image_size: int | None = None, cache_dir: str | None = None) -> Source:
    """scikit-learn's bundled 8x8 digits (1,797 images), with a fixed stratified 20% test split.

    Pixel values 0..16 are scaled to 0..255. Augmentation is a random 1-pixel shift (no flip:
    a mirrored digit is another glyph).
    """
    if arg:
        raise SlimkitError(f"dataset 'digits' is built in and takes no path (got 'digits:{arg}')")
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = np.round(raw.images * (255 / 16)).astype(np.uint8)[:, None]
    train, test = _fixed_test_split(images, raw.target.astype(np.int64))
    if image_size is not None:
        train, test = (Split(resize_images(s.images, image_size), s.labels) for s in (train, test))
    info = DatasetInfo("digits", 10, tuple(train.images.shape[1:]), DIGITS_MEAN, DIGITS_STD,
                       tuple(str(d) for d in range(10)))
    return Source(info, train, test, Augment(pad=1, flip=False))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR python batches, refusing every global except numpy's array rebuilders.

    A pickle can call any importable function while loading; only the globals a pickled numpy
    array needs are let through, so a tampered file raises instead of running code.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "numpy.core.multiarray"),
        ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "numpy.core.multiarray"),
        ("numpy.core.numeric", "_frombuffer"): ("numpy._core.numeric", "numpy.core.numeric"),
        ("numpy._core.numeric", "_frombuffer"): ("numpy._core.numeric", "numpy.core.numeric"),
        ("numpy", "ndarray"): ("numpy",),
        ("numpy", "dtype"): ("numpy",),
    }

    def __init__(self, file, path: str) -> None:
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        homes = self.ALLOWED.get((module, name))
        if homes is None:
            raise SlimkitError(f"{self.path}: refusing to unpickle global {module}.{name}; a CIFAR-10 batch "
                               "holds only numpy arrays, so this file is not one or has been tampered with")
        for home in homes:
            try:
                found = getattr(importlib.import_module(home), name)
            except (ImportError, AttributeError):
                continue
            return self._empty_only(found) if name == "_reconstruct" else found
        raise SlimkitError(f"{self.path}: this numpy cannot rebuild {module}.{name}")

    def _empty_only(self, reconstruct):
        """numpy pickles an array as ``_reconstruct(ndarray, (0,), ...)`` filled by its state (bytes from the
        file); any other shape would allocate memory the file does not hold."""
        path = self.path

        def guarded(cls, shape, dtype):
            if tuple(shape) != (0,):
                raise SlimkitError(f"{path}: a pickled array asks for shape {tuple(shape)} before any data: refused")
            return reconstruct(cls, shape, dtype)

        return guarded


MAX_BATCH_BYTES = 256 << 20  # a CIFAR-10 batch is 31 MB; the meta file a few hundred bytes


def _unpickle(path: str) -> dict:
    if os.path.getsize(path) > MAX_BATCH_BYTES:
        raise SlimkitError(f"{path}: {os.path.getsize(path):,} bytes is more than a CIFAR-10 batch holds")
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, path).load()
    except SlimkitError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure means the file is not a usable batch
        raise SlimkitError(f"cannot read CIFAR-10 batch {path}: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise SlimkitError(f"{path} is not a CIFAR-10 batch (holds a {type(obj).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    data, labels = d.get("data"), d.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise SlimkitError(f"{path}: 'data' must be a uint8 array of N x 3072 pixels")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise SlimkitError(f"{path}: 'labels' must be a list of integers") from None
    if labels.shape != (len(data),) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise SlimkitError(f"{path}: 'labels' must hold {len(data)} integers in 0..9")
    return data.reshape(-1, 3, 32, 32), labels     # rows are the R, G, B planes in turn, i.e. already CHW


def _cifar_batches(root: str) -> tuple[Split, Split]:
    folder = root if os.path.isfile(os.path.join(root, "test_batch")) else os.path.join(root, "cifar-10-batches-py")
    numbered = sorted((int(m.group(1)), m.group(0)) for m in map(re.compile(r"data_batch_(\d+)").fullmatch,
                                                                   os.listdir(folder)) if m)
    if not numbered or not os.path.isfile(os.path.join(folder, "test_batch")):
        raise SlimkitError(f"{folder} lacks the CIFAR-10 batches data_batch_1..5 and test_batch")
    meta = os.path.join(folder, "batches.meta")
    if os.path.isfile(meta):
        names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in _unpickle(meta).get("label_names", ()))
        if names != CIFAR10_CLASSES:
            raise SlimkitError(f"{meta}: label_names {list(names)} are not the CIFAR-10 classes")
    parts = [_read_batch(os.path.join(folder, name)) for _, name in numbered]
    train = _split(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return train, _split(*_read_batch(os.path.join(folder, "test_batch")))


def _folder_splits(root: str, image_size: int | None, cache_dir: str | None) -> tuple[tuple[str, ...], Split, Split]:
    """Read ``root/{train,test}/<class>`` (``val/`` stands in for a missing ``test/``) or ``root/<class>``.

    Without a test folder a fixed stratified 20% test split is carved. Test classes must be
    train classes; labels follow the sorted train class names.
    """
    train_dir = os.path.join(root, "train")
    test_dir = next((d for d in (os.path.join(root, "test"), os.path.join(root, "val")) if os.path.isdir(d)), None)
    if not os.path.isdir(train_dir):
        train_dir, test_dir = root, None
    scan = scan_folder(train_dir)
    images, labels = read_folder(scan, image_size=image_size, cache_dir=cache_dir)
    if test_dir is None:
        train, test = _fixed_test_split(images, labels)
    else:
        test_scan = scan_folder(test_dir)
        unknown = sorted(set(test_scan.classes) - set(scan.classes))
        if unknown:
            raise SlimkitError(f"class folders {unknown} in {test_dir} are not in {train_dir}")
        test_images, test_labels = read_folder(test_scan, image_size=image_size, cache_dir=cache_dir)
        remap = np.asarray([scan.classes.index(c) for c in test_scan.classes], dtype=np.int64)
        train, test = _split(images, labels), _split(test_images, remap[test_labels])
        if train.images.shape[1:] != test.images.shape[1:]:
            # Differing sizes get the same treatment as within one folder: fit both to the default size.
            size = image_size or DEFAULT_IMAGE_SIZE
            train, test = (Split(resize_images(s.images, size), s.labels) for s in (train, test))
    return tuple(scan.classes), train, test


@DATASETS.register("cifar10")
def cifar10(arg: str, *, image_size: int | None = None, cache_dir: str | None = None) -> Source:
    """CIFAR-10 from the official python batches or from ``PATH/{train,test}/<class>/`` images.

    Labels follow the canonical class order (airplane..truck); image folders must be exactly
    the ten CIFAR-10 classes. Augmentation: random 32 crop with 4-pixel zero padding plus flip.
    """
    root = _existing_dir(arg, "cifar10")
    if any(os.path.isfile(os.path.join(d, "test_batch")) or os.path.isfile(os.path.join(d, "data_batch_1"))
           for d in (root, os.path.join(root, "cifar-10-batches-py"))):
        train, test = _cifar_batches(root)
    elif os.path.isdir(os.path.join(root, "train")):
        classes, train, test = _folder_splits(root, None, cache_dir)
        if set(classes) != set(CIFAR10_CLASSES):
            missing, extra = sorted(set(CIFAR10_CLASSES) - set(classes)), sorted(set(classes) - set(CIFAR10_CLASSES))
            raise SlimkitError(f"class folders in {os.path.join(root, 'train')} are not the CIFAR-10 classes "
                               f"(missing: {missing or 'none'}; unexpected: {extra or 'none'})")
        remap = torch.as_tensor([CIFAR10_CLASSES.index(c) for c in classes])
        train, test = Split(train.images, remap[train.labels]), Split(test.images, remap[test.labels])
    else:
        raise SlimkitError(f"{root} holds neither the CIFAR-10 python batches (data_batch_1..5, test_batch, "
                           "possibly in cifar-10-batches-py/) nor train/ and test/ class folders")
    if image_size is not None:
        train, test = (Split(resize_images(s.images, image_size), s.labels) for s in (train, test))
    info = DatasetInfo("cifar10", 10, tuple(train.images.shape[1:]), IMAGENET_MEAN, IMAGENET_STD, CIFAR10_CLASSES)
    return Source(info, train, test, Augment(pad=4, flip=True))


@DATASETS.register("imagefolder")
def imagefolder(arg: str, *, image_size: int | None = None, cache_dir: str | None = None) -> Source:
    """Any ``PATH/{train,test}/<class>/`` or ``PATH/<class>/`` folder of images, converted to RGB.

    With ``image_size``, or when image sizes differ (then 224), images are resized (shorter
    side) and center cropped; otherwise the native size is kept. ImageNet mean/std.
    Augmentation: random crop with H//8 zero padding plus flip.
    """
    root = _existing_dir(arg, "imagefolder")
    classes, train, test = _folder_splits(root, image_size, cache_dir)
    info = DatasetInfo("imagefolder", len(classes), tuple(train.images.shape[1:]), IMAGENET_MEAN, IMAGENET_STD,
                       classes)
    return Source(info, train, test, Augment(pad=train.images.shape[2] // 8, flip=True))


def _check_val_size(val_size: float | int, n: int, spec: str) -> float | int:
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise SlimkitError(f"val_size must be a fraction or a count, got {val_size!r} (dataset {spec!r})")
    if isinstance(val_size, float) and not 0.0 <= val_size < 1.0:
        raise SlimkitError(f"val_size fraction must be in [0, 1), got {val_size} (dataset {spec!r})")
    if isinstance(val_size, int) and not 0 <= val_size < n:
        raise SlimkitError(f"val_size count must be in [0, {n}) for the {n} train samples of {spec!r}, got {val_size}")
    return val_size


def load(spec: str, *, limit: int | None = None, seed: int = 0, val_size: float | int = 0.1,
         image_size: int | None = None, cache_dir: str | None = None) -> Dataset:
    """Load the dataset named by ``spec`` (``digits``, ``cifar10:PATH``, ``imagefolder:PATH``) into memory.

    ``val`` is a stratified split of train (``val_size`` a fraction or a count, seeded by
    ``seed``), so tuning never sees test. ``limit`` caps each split at a seeded, class-balanced
    random subset. Decoded image folders are cached in ``cache_dir`` (default
    ``$SLIMKIT_CACHE/datasets`` or ``~/.cache/slimkit/datasets``).
    """
    kind, _, arg = str(spec).partition(":")
    try:
        source_fn = DATASETS.get(kind)
    except SlimkitError as e:
        raise SlimkitError(f"{e} in dataset spec {spec!r}") from None
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise SlimkitError(f"limit must be a positive integer, got {limit!r} (dataset {spec!r})")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise SlimkitError(f"image_size must be a positive integer, got {image_size!r} (dataset {spec!r})")
    src = source_fn(arg, image_size=image_size, cache_dir=cache_dir or default_cache_dir())
    val_size = _check_val_size(val_size, len(src.train), spec)
    train_idx, val_idx = stratified_split(src.train.labels.numpy(), val_size, make_rng(seed, 1))
    splits = {"train": src.train.subset(train_idx), "val": src.train.subset(val_idx), "test": src.test}
    if limit is not None:
        for stream, name in enumerate(("train", "val", "test"), start=2):
            keep = balanced_subset(splits[name].labels.numpy(), limit, make_rng(seed, stream))
            if len(keep) < len(splits[name]):
                splits[name] = splits[name].subset(keep)
    return Dataset(src.info, spec, splits["train"], splits["val"], splits["test"], src.augment)
