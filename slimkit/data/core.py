"""In-memory datasets and the batch loader.

A dataset lives in memory as uint8 tensors (CIFAR-10 is 184 MB), so batching is plain tensor
indexing: no worker processes, no per-sample Python, no PIL in the training loop. Augmentation
runs on whole batches with tensor ops and is a pure function of ``(seed, epoch, batch index)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import SlimkitError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a report need to know about a dataset: shapes, classes, normalisation."""

    name: str
    num_classes: int
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]


@dataclass
class Split:
    """One split held in memory: ``images`` uint8 N x C x H x W and ``labels`` int64 N."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"Split images must be uint8 N x C x H x W, got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (len(self.images),):
            raise ValueError(f"Split labels must be int64 of length {len(self.images)}, got {self.labels.dtype} "
                             f"{tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray | torch.Tensor) -> "Split":
        """A new split holding the samples at ``index`` (copied, so the parent can be freed)."""
        index = torch.as_tensor(np.asarray(index), dtype=torch.int64)
        return Split(self.images[index], self.labels[index])

    def __repr__(self) -> str:
        return f"Split(images={tuple(self.images.shape)}, labels={len(self)})"


@dataclass(frozen=True)
class Augment:
    """Training augmentation policy: random crop after zero padding by ``pad`` pixels, optional h-flip."""

    pad: int = 0
    flip: bool = False

    @property
    def active(self) -> bool:
        return self.pad > 0 or self.flip


def augment_batch(x: torch.Tensor, policy: Augment, gen: torch.Generator) -> torch.Tensor:
    """Apply ``policy`` to a uint8 batch with per-sample offsets and flips drawn from ``gen``.

    Crop and flip are one pair of gathers (rows, then columns with the flip folded into the
    column index), so a batch costs two memory passes whatever the padding.
    """
    n, c, h, w = x.shape
    p = policy.pad
    dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    if not policy.flip:
        flip.zero_()
    if p:
        x = F.pad(x, (p, p, p, p))
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, x.shape[3])
    cols = torch.where(flip[:, None], torch.arange(w - 1, -1, -1), torch.arange(w)) + dx[:, None]
    x = x.gather(2, rows)
    return x.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def resize_images(images: torch.Tensor, size: int, chunk: int = 512) -> torch.Tensor:
    """Resize uint8 N x C x H x W images: shorter side to ``size`` (antialiased bilinear), then center crop."""
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (nh - size) // 2, (nw - size) // 2
    out = torch.empty((n, c, size, size), dtype=torch.uint8)
    for i in range(0, n, chunk):
        x = F.interpolate(images[i:i + chunk].float(), size=(nh, nw), mode="bilinear", antialias=True,
                          align_corners=False)
        out[i:i + chunk] = x[:, :, top:top + size, left:left + size].round_().clamp_(0, 255).to(torch.uint8)
    return out


def _seed_of(*key: int) -> int:
    # SeedSequence mixes the key well, so (seed, epoch) and (seed, epoch + 1) give unrelated streams.
    state = np.random.SeedSequence([int(k) % 2**63 for k in key]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class Loader:
    """An iterable of ``(x, y)`` batches: x float32 normalised N x C x H x W, y int64 N.

    Shuffling and augmentation are a pure function of ``(seed, epoch)``; call :meth:`set_epoch`
    before each epoch (like ``DistributedSampler``). Iterating twice without it repeats the same
    batches, which is what makes a resumed run see exactly the data it would have seen.
    """

    def __init__(self, split: Split, batch_size: int, *, mean: tuple[float, ...], std: tuple[float, ...],
                 shuffle: bool, augment: Augment | None, seed: int = 0, drop_last: bool = False) -> None:
        if int(batch_size) < 1:
            raise SlimkitError(f"batch_size must be at least 1, got {batch_size}")
        self.images, self.labels = split.images, split.labels
        self.dataset_size = len(split)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.augment = augment if augment is not None and augment.active else None
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        # (u8 - 255 * mean) / (255 * std) == (u8 / 255 - mean) / std, in one sub and one mul.
        self._shift = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self._scale = 1 / (torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255)

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffling order and augmentation draws of epoch ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.dataset_size // self.batch_size
        return math.ceil(self.dataset_size / self.batch_size)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Turn a uint8 batch into the float32 normalised input the model expects."""
        return x.float().sub_(self._shift).mul_(self._scale)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, bs = self.dataset_size, self.batch_size
        order = None
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(_seed_of(self.seed, self.epoch)))
        for b in range(len(self)):
            index = order[b * bs:(b + 1) * bs] if order is not None else slice(b * bs, min((b + 1) * bs, n))
            x, y = self.images[index], self.labels[index]
            if self.augment is not None:
                # One generator per batch: batch b's draws do not depend on how earlier batches were consumed.
                gen = torch.Generator().manual_seed(_seed_of(self.seed, self.epoch, b + 1))
                x = augment_batch(x, self.augment, gen)
            yield self.normalize(x), y.clone() if order is None else y

    def __repr__(self) -> str:
        return (f"Loader(size={self.dataset_size}, batch_size={self.batch_size}, batches={len(self)}, "
                f"shuffle={self.shuffle}, augment={self.augment}, seed={self.seed}, epoch={self.epoch})")


class Dataset:
    """A loaded dataset: ``info``, the ``spec`` it came from, and ``train``/``val``/``test`` splits."""

    def __init__(self, info: DatasetInfo, spec: str, train: Split, val: Split, test: Split,
                 augment: Augment = Augment()) -> None:
        self.info, self.spec = info, spec
        self.train, self.val, self.test = train, val, test
        self.augment = augment

    def split(self, name: str) -> Split:
        """The split called ``name`` (``train``, ``val`` or ``test``)."""
        if name not in SPLITS:
            raise SlimkitError(f"unknown split {name!r} of dataset {self.spec!r} (known: {', '.join(SPLITS)})")
        return getattr(self, name)

    def loader(self, split: str = "train", batch_size: int = 128, *, shuffle: bool | None = None,
               augment: bool | None = None, seed: int = 0, drop_last: bool = False) -> Loader:
        """A :class:`Loader` over ``split``; shuffling and augmentation default to on for train only.

        Augmentation uses this dataset's policy (random crop with zero padding plus flip for
        photos, a 1-pixel shift for digits); ``seed`` together with the loader's epoch fixes
        every random choice.
        """
        data = self.split(split)
        is_train = split == "train"
        use_aug = is_train if augment is None else augment
        return Loader(data, batch_size, mean=self.info.mean, std=self.info.std,
                      shuffle=is_train if shuffle is None else shuffle,
                      augment=self.augment if use_aug else None, seed=seed, drop_last=drop_last)

    def __repr__(self) -> str:
        return (f"Dataset({self.spec!r}, classes={self.info.num_classes}, input={self.info.input_size}, "
                f"train={len(self.train)}, val={len(self.val)}, test={len(self.test)})")
