"""Tests for slimkit.data: splits, limits, loaders, augmentation, image folders, CIFAR batches, cache."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from slimkit.data import (
    CIFAR10_CLASSES,
    DIGITS_MEAN,
    DIGITS_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Augment,
    augment_batch,
    balanced_subset,
    default_cache_dir,
    load,
    make_rng,
)
from slimkit.data import folder as folder_mod
from slimkit.errors import SlimkitError

torch.set_num_threads(1)

CIFAR_JPEG = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg"
REAL_CACHE = default_cache_dir()        # read before the fixture below points the default at tmp


@pytest.fixture(autouse=True)
def _private_default_cache(tmp_path, monkeypatch):
    # Tests that leave cache_dir at its default must not fill the user's cache with tmp folders.
    monkeypatch.setenv("SLIMKIT_CACHE", str(tmp_path / "default-cache"))


def _rows(images: torch.Tensor) -> list[bytes]:
    return sorted(bytes(x.numpy().tobytes()) for x in images)


def _png(path: Path, color, size=(6, 6), mode="RGB") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


# ---------------------------------------------------------------- digits, splits, limit

def test_digits_shapes_classes_and_partition():
    from sklearn.datasets import load_digits

    d = load("digits")
    assert d.info.name == "digits" and d.info.num_classes == 10 and d.info.input_size == (1, 8, 8)
    assert d.info.classes == tuple("0123456789")
    assert (len(d.train), len(d.val), len(d.test)) == (1294, 144, 359)
    for s in (d.train, d.val, d.test):
        assert s.images.dtype == torch.uint8 and s.labels.dtype == torch.int64
        assert s.images.shape[1:] == (1, 8, 8)
    assert int(d.train.images.max()) == 255
    # The three splits are a partition of the 1,797 digits: nothing lost, nothing shared.
    raw = np.round(load_digits().images * (255 / 16)).astype(np.uint8)[:, None]
    together = torch.cat([d.train.images, d.val.images, d.test.images])
    assert _rows(together) == _rows(torch.from_numpy(raw))
    # Stratified: every class is present in val and test in about its share.
    assert torch.bincount(d.val.labels, minlength=10).min() >= 13
    assert torch.bincount(d.test.labels, minlength=10).min() >= 35


def test_digits_stats_are_those_of_the_train_part():
    from slimkit.data.sources import digits

    x = digits("").train.images.float() / 255
    assert x.mean().item() == pytest.approx(DIGITS_MEAN[0], abs=1e-4)
    assert x.std().item() == pytest.approx(DIGITS_STD[0], abs=1e-4)


def test_val_follows_seed_but_test_does_not():
    a, b = load("digits", seed=0), load("digits", seed=1)
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.val.images, b.val.images)
    assert torch.equal(a.val.images, load("digits", seed=0).val.images)
    c = load("digits", val_size=100)
    assert len(c.val) == 100 and len(c.train) == 1438 - 100
    assert len(load("digits", val_size=0).val) == 0
    with pytest.raises(SlimkitError, match="val_size"):
        load("digits", val_size=1.5)


def test_limit_is_balanced_seeded_and_not_the_first_n():
    full = load("digits", seed=0)
    d = load("digits", limit=50, seed=0)
    for s in (d.train, d.val, d.test):
        assert len(s) == 50
        assert torch.bincount(s.labels, minlength=10).tolist() == [5] * 10
    odd = load("digits", limit=55, seed=0)
    counts = torch.bincount(odd.train.labels, minlength=10)
    assert len(odd.train) == 55 and counts.min() == 5 and counts.max() == 6
    same = load("digits", limit=50, seed=0)
    other = load("digits", limit=50, seed=1)
    assert torch.equal(d.train.images, same.train.images) and torch.equal(d.test.images, same.test.images)
    assert not torch.equal(d.train.images, other.train.images)
    assert not torch.equal(d.test.images, other.test.images)
    assert not torch.equal(d.train.images, full.train.images[:50])
    assert not torch.equal(d.test.images, full.test.images[:50])
    big = load("digits", limit=10**6)
    assert (len(big.train), len(big.val), len(big.test)) == (len(full.train), len(full.val), len(full.test))
    with pytest.raises(SlimkitError, match="limit"):
        load("digits", limit=0)


def test_balanced_subset_gives_a_short_class_s_share_to_the_others():
    labels = np.array([0] * 100 + [1] * 3 + [2] * 100)
    idx = balanced_subset(labels, 30, make_rng(0))
    assert len(idx) == 30 and len(set(idx.tolist())) == 30
    assert sorted(np.bincount(labels[idx]).tolist()) == [3, 13, 14]


# ---------------------------------------------------------------- loader and augmentation

def _batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_loader_is_a_pure_function_of_seed_and_epoch():
    d = load("digits")
    a, b = d.loader("train", 100, seed=3), d.loader("train", 100, seed=3)
    a.set_epoch(5)
    b.set_epoch(5)
    ba, bb = _batches(a), _batches(b)
    assert len(ba) == len(a) == 13 and a.dataset_size == 1294 and a.batch_size == 100
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(ba, bb))
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(ba, _batches(a)))   # re-iterating repeats
    b.set_epoch(6)
    assert not torch.equal(ba[0][1], _batches(b)[0][1])
    c = d.loader("train", 100, seed=4)
    c.set_epoch(5)
    assert not torch.equal(ba[0][1], _batches(c)[0][1])
    # Every sample appears once per epoch.
    assert torch.equal(torch.sort(torch.cat([y for _, y in ba])).values, torch.sort(d.train.labels).values)
    assert len(d.loader("train", 100, drop_last=True)) == 12
    assert sum(len(y) for _, y in d.loader("train", 100, drop_last=True)) == 1200
    with pytest.raises(SlimkitError, match="split 'dev'"):
        d.loader("dev")


def test_augmentation_changes_train_pixels_but_not_test():
    d = load("digits")
    plain = d.loader("train", 256, augment=False, seed=1)
    aug = d.loader("train", 256, seed=1)
    (xp, yp), (xa, ya) = next(iter(plain)), next(iter(aug))
    assert xa.shape == xp.shape == (256, 1, 8, 8) and torch.equal(ya, yp)
    assert not torch.equal(xa, xp)
    test = d.loader("test", 1000)
    x, y = next(iter(test))
    expected = (d.test.images[:1000].float() / 255 - DIGITS_MEAN[0]) / DIGITS_STD[0]
    assert torch.allclose(x, expected, atol=1e-5) and torch.equal(y, d.test.labels[:1000])


def test_augment_batch_is_a_padded_crop_or_its_mirror():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out = augment_batch(x, Augment(pad=2, flip=True), gen)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flipped = 0
    for i in range(64):
        crops = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        if any(torch.equal(out[i], c) for c in crops):
            continue
        assert any(torch.equal(out[i], c.flip(-1)) for c in crops), f"sample {i} is not a crop"
        flipped += 1
    assert 10 < flipped < 54
    assert not torch.equal(out, x)
    no_flip = augment_batch(x, Augment(pad=0, flip=False), torch.Generator().manual_seed(0))
    assert torch.equal(no_flip, x)


# ---------------------------------------------------------------- fake CIFAR python batches

def _write_batch(path: Path, data: np.ndarray, labels: list[int]) -> None:
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"x", b"labels": labels, b"data": data, b"filenames": [b"a"] * len(labels)}, f)


def _fake_cifar(root: Path, per_batch: int = 20) -> tuple[np.ndarray, list[int]]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    first = None
    for name in ("data_batch_1", "data_batch_2", "test_batch"):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [i % 10 for i in range(per_batch)]
        _write_batch(root / name, data, labels)
        first = first or (data, labels)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}, f)
    return first


@pytest.mark.parametrize("sub", ["", "cifar-10-batches-py"])
def test_cifar_python_batches(tmp_path, sub):
    data, labels = _fake_cifar(tmp_path / sub if sub else tmp_path)
    d = load(f"cifar10:{tmp_path}", val_size=0)
    assert d.info.classes == CIFAR10_CLASSES and d.info.input_size == (3, 32, 32)
    assert d.info.mean == IMAGENET_MEAN and d.info.std == IMAGENET_STD
    assert (len(d.train), len(d.val), len(d.test)) == (40, 0, 20)
    # A row is the R, G, B planes, each 32 x 32 row-major.
    assert torch.equal(d.train.images[0, 1, 2, 3], torch.tensor(data[0, 1024 + 2 * 32 + 3]))
    assert d.train.labels[:20].tolist() == labels
    x, _ = next(iter(d.loader("train", 40, shuffle=False, augment=False)))
    px = data[0, 0] / 255
    assert x[0, 0, 0, 0].item() == pytest.approx((px - 0.485) / 0.229, abs=1e-5)


def test_cifar_normalisation_of_a_known_pixel(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    data = np.zeros((10, 3072), dtype=np.uint8)
    data[:, :1024] = 255                       # red plane white, green and blue black
    for name in ("data_batch_1", "test_batch"):
        _write_batch(tmp_path / name, data, list(range(10)))
    d = load(f"cifar10:{tmp_path}", val_size=0)
    x, _ = next(iter(d.loader("test", 10)))
    assert x[0, :, 5, 5].tolist() == pytest.approx([(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225], abs=1e-5)
    assert d.augment == Augment(pad=4, flip=True)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_pickle_with_a_forbidden_global_is_refused(tmp_path):
    _fake_cifar(tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(marker), b"labels": [0]}, f)
    with pytest.raises(SlimkitError, match=r"test_batch.*refusing to unpickle global (posix|os|nt)\.system"):
        load(f"cifar10:{tmp_path}")
    assert not marker.exists()


def test_cifar_batch_with_wrong_content_names_the_file(tmp_path):
    _fake_cifar(tmp_path)
    _write_batch(tmp_path / "data_batch_2", np.zeros((4, 100), np.uint8), [0] * 4)
    with pytest.raises(SlimkitError, match="data_batch_2"):
        load(f"cifar10:{tmp_path}")


# ---------------------------------------------------------------- image folders and cache

COLORS = {"cat": (255, 0, 0), "dog": (0, 0, 255), "emu": (0, 255, 0)}


def _split_layout(root: Path, n_train: int = 4, n_test: int = 2) -> None:
    for cls, color in COLORS.items():
        for i in range(n_train):
            _png(root / "train" / cls / f"{i}.png", color)
        for i in range(n_test):
            _png(root / "test" / cls / f"{i}.jpg", color)
    _png(root / "train" / "cat" / "gray.png", 128, mode="L")     # converted to RGB
    (root / "train" / "cat" / "notes.txt").write_text("not an image")


def test_imagefolder_split_layout(tmp_path):
    _split_layout(tmp_path / "ds")
    d = load(f"imagefolder:{tmp_path / 'ds'}", val_size=0, cache_dir=str(tmp_path / "cache"))
    assert d.info.name == "imagefolder" and d.info.classes == ("cat", "dog", "emu")
    assert d.info.input_size == (3, 6, 6) and d.info.mean == IMAGENET_MEAN
    assert (len(d.train), len(d.test)) == (13, 6)
    for s in (d.train, d.test):
        for img, label in zip(s.images, s.labels):
            cls = d.info.classes[label]
            if tuple(img[:, 0, 0].tolist()) != (128, 128, 128):
                # JPEG is lossy, hence the tolerance.
                assert np.allclose(img[:, 3, 3].numpy(), COLORS[cls], atol=8), (cls, img[:, 3, 3])
    assert d.augment == Augment(pad=0, flip=True)        # 6 // 8 == 0
    small = load(f"imagefolder:{tmp_path / 'ds'}", image_size=4, cache_dir=str(tmp_path / "cache"))
    assert small.info.input_size == (3, 4, 4)


def test_imagefolder_flat_layout_carves_a_fixed_test_split(tmp_path):
    for cls, color in COLORS.items():
        for i in range(10):
            _png(tmp_path / "ds" / cls / f"{i}.png", tuple(min(255, c + i) for c in color))
    a = load(f"imagefolder:{tmp_path / 'ds'}", seed=0, val_size=3, cache_dir=str(tmp_path / "cache"))
    b = load(f"imagefolder:{tmp_path / 'ds'}", seed=1, val_size=3, cache_dir=str(tmp_path / "cache"))
    assert (len(a.train), len(a.val), len(a.test)) == (21, 3, 6)
    assert torch.bincount(a.test.labels).tolist() == [2, 2, 2]
    assert torch.equal(a.test.images, b.test.images)
    assert _rows(torch.cat([a.train.images, a.val.images, a.test.images])) == _rows(
        torch.cat([b.train.images, b.val.images, b.test.images]))


def test_imagefolder_mixed_sizes_are_fitted_to_224(tmp_path):
    _png(tmp_path / "ds" / "a" / "0.png", (10, 20, 30), size=(300, 250))
    _png(tmp_path / "ds" / "a" / "1.png", (10, 20, 30), size=(240, 260))
    for i in range(3):
        _png(tmp_path / "ds" / "b" / f"{i}.png", (200, 100, 0), size=(230, 230))
    d = load(f"imagefolder:{tmp_path / 'ds'}", val_size=0, cache_dir=str(tmp_path / 'cache'))
    assert d.info.input_size == (3, 224, 224) and len(d.train) + len(d.test) == 5
    assert d.test.images.shape[1:] == (3, 224, 224)
    # Solid images of any size stay solid when fitted.
    for img, label in zip(d.train.images, d.train.labels):
        assert img[:, 100, 100].tolist() == ([10, 20, 30] if label == 0 else [200, 100, 0])


def test_imagefolder_train_and_test_of_different_sizes_are_fitted_alike(tmp_path):
    for cls in ("a", "b"):
        _png(tmp_path / "ds" / "train" / cls / "0.png", (9, 9, 9), size=(6, 6))
        _png(tmp_path / "ds" / "test" / cls / "0.png", (9, 9, 9), size=(8, 8))
    d = load(f"imagefolder:{tmp_path / 'ds'}", val_size=0)
    assert d.train.images.shape[1:] == d.test.images.shape[1:] == (3, 224, 224)
    assert load(f"imagefolder:{tmp_path / 'ds'}", val_size=0, image_size=5).test.images.shape == (2, 3, 5, 5)


def test_process_pool_decoding_matches_in_process_decoding(tmp_path, monkeypatch):
    _split_layout(tmp_path / "ds")
    serial = load(f"imagefolder:{tmp_path / 'ds'}", val_size=0, cache_dir=str(tmp_path / "c1"))
    monkeypatch.setattr(folder_mod, "POOL_MIN_FILES", 1)
    pooled = load(f"imagefolder:{tmp_path / 'ds'}", val_size=0, cache_dir=str(tmp_path / "c2"))
    assert torch.equal(serial.train.images, pooled.train.images)
    assert torch.equal(serial.test.labels, pooled.test.labels)


def test_cache_is_hit_then_invalidated_by_a_changed_file(tmp_path, monkeypatch):
    root, cache = tmp_path / "ds", tmp_path / "cache"
    _split_layout(root)
    first = load(f"imagefolder:{root}", val_size=0, cache_dir=str(cache))
    assert len(list(cache.glob("*.npz"))) == 2                     # one per (path, split)
    assert not list(cache.glob(".tmp-*"))

    calls = []
    real = folder_mod._decode_files

    def counting(files, image_size, desc):
        calls.append(len(files))
        return real(files, image_size, desc)

    def failing(*args, **kwargs):
        raise AssertionError("decoder called although the cache should have been hit")

    monkeypatch.setattr(folder_mod, "_decode_files", failing)
    second = load(f"imagefolder:{root}", val_size=0, cache_dir=str(cache))
    assert torch.equal(first.train.images, second.train.images) and torch.equal(first.test.labels, second.test.labels)

    target = root / "train" / "dog" / "0.png"
    _png(target, (0, 255, 255))
    os.utime(target, ns=(target.stat().st_mtime_ns + 10**9,) * 2)  # mtime granularity must not hide the edit
    monkeypatch.setattr(folder_mod, "_decode_files", counting)
    third = load(f"imagefolder:{root}", val_size=0, cache_dir=str(cache))
    assert calls == [13]                                          # train re-decoded, test still cached
    changed = [i for i in range(len(third.train)) if not torch.equal(third.train.images[i], first.train.images[i])]
    assert len(changed) == 1 and third.train.images[changed[0], :, 0, 0].tolist() == [0, 255, 255]
    assert len(list(cache.glob("*.npz"))) == 2                     # the stale train entry was replaced

    (root / "test" / "emu" / "1.jpg").unlink()                     # a removed file changes the count
    fourth = load(f"imagefolder:{root}", val_size=0, cache_dir=str(cache))
    assert calls == [13, 5] and len(fourth.test) == 5


def test_damaged_cache_is_rebuilt(tmp_path):
    root, cache = tmp_path / "ds", tmp_path / "cache"
    _split_layout(root)
    first = load(f"imagefolder:{root}", val_size=0, cache_dir=str(cache))
    for f in cache.glob("*.npz"):
        f.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable dataset cache"):
        again = load(f"imagefolder:{root}", val_size=0, cache_dir=str(cache))
    assert torch.equal(first.train.images, again.train.images)


# ---------------------------------------------------------------- errors

def test_clear_errors(tmp_path):
    missing = tmp_path / "nope"
    for kind in ("cifar10", "imagefolder"):
        with pytest.raises(SlimkitError, match=f"{missing}.*does not exist"):
            load(f"{kind}:{missing}")
    with pytest.raises(SlimkitError, match=r"unknown dataset kind 'mnist'.*cifar10, digits, imagefolder.*mnist:/x"):
        load("mnist:/x")
    with pytest.raises(SlimkitError, match="needs a path"):
        load("cifar10")
    with pytest.raises(SlimkitError, match="takes no path"):
        load("digits:/x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlimkitError, match=f"{tmp_path / 'empty'} has no class folders"):
        load(f"imagefolder:{tmp_path / 'empty'}", cache_dir=str(tmp_path / 'cache'))
    (tmp_path / "hollow" / "cat").mkdir(parents=True)
    with pytest.raises(SlimkitError, match=f"{tmp_path / 'hollow' / 'cat'} holds no images"):
        load(f"imagefolder:{tmp_path / 'hollow'}", cache_dir=str(tmp_path / 'cache'))
    with pytest.raises(SlimkitError, match="neither the CIFAR-10 python batches"):
        load(f"cifar10:{tmp_path / 'empty'}")
    assert not (tmp_path / "default-cache").exists()


def test_cifar_folder_with_other_classes_is_refused(tmp_path):
    _split_layout(tmp_path / "ds")
    with pytest.raises(SlimkitError, match=r"not the CIFAR-10 classes.*missing: \['airplane'.*unexpected: \['emu'\]"):
        load(f"cifar10:{tmp_path / 'ds'}", cache_dir=str(tmp_path / "cache"))


def test_test_class_unknown_to_train_is_refused(tmp_path):
    _split_layout(tmp_path / "ds")
    _png(tmp_path / "ds" / "test" / "yak" / "0.png", (1, 2, 3))
    with pytest.raises(SlimkitError, match=r"\['yak'\].*test"):
        load(f"imagefolder:{tmp_path / 'ds'}", cache_dir=str(tmp_path / 'cache'))


def test_corrupt_image_names_the_file(tmp_path):
    _split_layout(tmp_path / "ds")
    bad = tmp_path / "ds" / "train" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(SlimkitError, match=f"cannot decode image {bad}"):
        load(f"imagefolder:{tmp_path / 'ds'}", cache_dir=str(tmp_path / 'cache'))


# ---------------------------------------------------------------- the real CIFAR-10 JPEG folder

@pytest.mark.skipif(not CIFAR_JPEG.is_dir(), reason=f"CIFAR-10 JPEG folder {CIFAR_JPEG} is not present")
def test_real_cifar10_jpeg_folder():
    # The default cache: decoding 60,000 JPEGs takes ~20 s once, after which a load takes about a second.
    from PIL import Image

    d = load(f"cifar10:{CIFAR_JPEG}", val_size=0, cache_dir=REAL_CACHE)
    assert (len(d.train), len(d.test)) == (50000, 10000) and d.info.input_size == (3, 32, 32)
    assert torch.bincount(d.train.labels).tolist() == [5000] * 10
    assert torch.bincount(d.test.labels).tolist() == [1000] * 10
    first = np.asarray(Image.open(CIFAR_JPEG / "train" / "airplane" / "0000.jpg").convert("RGB")).transpose(2, 0, 1)
    assert torch.equal(d.train.images[0], torch.from_numpy(np.ascontiguousarray(first))) and d.train.labels[0] == 0
    last = np.asarray(Image.open(sorted((CIFAR_JPEG / "test" / "truck").iterdir())[-1]).convert("RGB"))
    assert torch.equal(d.test.images[-1], torch.from_numpy(np.ascontiguousarray(last.transpose(2, 0, 1))))
    assert d.test.labels[-1] == 9
    x, y = next(iter(d.loader("train", 256, seed=0)))
    assert x.shape == (256, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
