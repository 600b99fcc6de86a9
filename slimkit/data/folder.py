"""Image-folder reading (``ROOT/<class>/*.jpg``) with a decode cache.

Decoding tens of thousands of JPEGs takes a while, so the decoded uint8 arrays of each split
folder are cached as ``.npz`` files keyed by the folder's absolute path, file count, class
folder mtimes and newest file mtime. Checking the key costs one ``os.scandir`` pass (a stat per
file), so a cached CIFAR-10 loads in about a second and any change to the files invalidates it.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import SlimkitError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_IMAGE_SIZE = 224      # used when the images of a folder differ in size and no image_size is given
CACHE_VERSION = 1             # bump when the cached content changes meaning
POOL_MIN_FILES = 2000         # below this a process pool costs more than it saves
POOL_PROCESSES = 2


def default_cache_dir() -> str:
    """Where decoded image folders are cached: ``$SLIMKIT_CACHE/datasets`` or ``~/.cache/slimkit/datasets``."""
    root = os.environ.get("SLIMKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "slimkit")
    return os.path.join(root, "datasets")


@dataclass
class FolderScan:
    """The listing of one split folder: sorted class names, files, labels, and the cache signature."""

    root: str
    classes: list[str]
    files: list[str]
    labels: np.ndarray
    signature: dict


def scan_folder(root: str) -> FolderScan:
    """List ``root/<class>/<image>`` (sorted), raising :class:`SlimkitError` for empty folders."""
    root = os.path.abspath(root)
    try:
        class_dirs = sorted((e for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")),
                            key=lambda e: e.name)
    except OSError as e:
        raise SlimkitError(f"cannot read image folder {root}: {e.strerror or e}") from None
    if not class_dirs:
        raise SlimkitError(f"image folder {root} has no class folders (expected {root}/<class>/<images>)")
    files: list[str] = []
    labels: list[int] = []
    class_mtimes: list[int] = []
    newest = 0
    for label, entry in enumerate(class_dirs):
        class_mtimes.append(entry.stat().st_mtime_ns)
        names = []
        for f in os.scandir(entry.path):
            if f.name.lower().endswith(IMAGE_EXTENSIONS) and f.is_file():
                names.append(f.name)
                newest = max(newest, f.stat().st_mtime_ns)
        if not names:
            raise SlimkitError(f"class folder {entry.path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        names.sort()
        files.extend(os.path.join(entry.path, n) for n in names)
        labels.extend([label] * len(names))
    classes = [e.name for e in class_dirs]
    signature = {"root": root, "files": len(files), "classes": classes, "class_mtimes": class_mtimes,
                 "newest": newest}
    return FolderScan(root, classes, files, np.asarray(labels, dtype=np.int64), signature)


def _fit(img, size: int):
    """Resize a PIL image so its shorter side is ``size``, then center crop ``size`` x ``size``."""
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def _decode_one(task: tuple[str, int | None]) -> np.ndarray | str:
    """Decode one file to H x W x 3 uint8 (a worker function, so it returns errors as a string)."""
    from PIL import Image

    path, size = task
    try:
        with Image.open(path) as img:
            if size is not None:
                img.draft("RGB", (size, size))    # JPEG DCT scaling: big photos decode several times faster
            img = img.convert("RGB")
            if size is not None:
                img = _fit(img, size)
            return np.asarray(img, dtype=np.uint8)
    except Exception as e:  # noqa: BLE001 - any decoder failure is reported with the file's name
        return f"{type(e).__name__}: {e}"


def _decode_files(files: list[str], image_size: int | None, desc: str) -> np.ndarray:
    """Decode ``files`` to an N x 3 x H x W uint8 array, in a process pool with a progress bar when many.

    Without ``image_size`` the native size is kept if every image has it; otherwise the images
    are fitted to :data:`DEFAULT_IMAGE_SIZE`, since a batch needs one size.
    """
    tasks = [(f, image_size) for f in files]
    pool = None
    if len(files) >= POOL_MIN_FILES and (os.cpu_count() or 1) > 1:
        # fork: workers need only PIL and numpy, and forking skips re-importing torch in each.
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        pool = ctx.Pool(POOL_PROCESSES)
        results = pool.imap(_decode_one, tasks, chunksize=64)
    else:
        results = map(_decode_one, tasks)
    try:
        from tqdm import tqdm

        bar = tqdm(total=len(files), desc=desc, unit="img", disable=len(files) < POOL_MIN_FILES, leave=False)
    except ImportError:
        bar = None
    out: np.ndarray | None = None          # filled in place: a list of 50,000 arrays plus np.stack doubles the peak
    fitted = image_size is not None
    try:
        for i, (path, arr) in enumerate(zip(files, results)):
            if isinstance(arr, str):
                raise SlimkitError(f"cannot decode image {path}: {arr}")
            if not fitted and out is not None and arr.shape != out.shape[2:] + (3,):
                fitted = True
                done = [_refit(np.ascontiguousarray(a.transpose(1, 2, 0)), DEFAULT_IMAGE_SIZE) for a in out[:i]]
                out = None
                for j, a in enumerate(done):
                    out = _store(out, j, a, len(files))
            if fitted and image_size is None:
                arr = _refit(arr, DEFAULT_IMAGE_SIZE)
            out = _store(out, i, arr, len(files))
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.terminate()
    return out


def _store(out: np.ndarray | None, i: int, arr: np.ndarray, n: int) -> np.ndarray:
    if out is None:
        out = np.empty((n, 3) + arr.shape[:2], dtype=np.uint8)
    out[i] = arr.transpose(2, 0, 1)
    return out


def _refit(arr: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if arr.shape[:2] == (size, size):
        return arr
    return np.asarray(_fit(Image.fromarray(arr), size), dtype=np.uint8)


def _cache_file(cache_dir: str, scan: FolderScan, image_size: int | None) -> tuple[str, str]:
    key = json.dumps({"v": CACHE_VERSION, "image_size": image_size, **scan.signature}, sort_keys=True)
    root_id = hashlib.sha256(scan.root.encode()).hexdigest()[:12]
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in os.path.basename(scan.root))
    prefix = f"folder-{root_id}-"
    return os.path.join(cache_dir, f"{prefix}{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"), prefix


def _read_cache(path: str, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - a damaged cache is rebuilt, never fatal
        warnings.warn(f"ignoring unreadable dataset cache {path}: {e}", stacklevel=3)
        return None
    if len(images) != n or len(labels) != n or images.dtype != np.uint8 or images.ndim != 4:
        warnings.warn(f"ignoring inconsistent dataset cache {path}", stacklevel=3)
        return None
    return images, labels.astype(np.int64, copy=False)


def _write_cache(path: str, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    folder = os.path.dirname(path)
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        # Same folder + os.replace: a reader sees the old file or the whole new one, never a partial write.
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=images, labels=labels)
        os.chmod(tmp, 0o644)                # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, path)
        tmp = None
        for entry in os.scandir(folder):
            if entry.name.startswith(prefix) and entry.path != path:
                os.remove(entry.path)       # stale versions of this folder's cache
    except OSError as e:
        warnings.warn(f"could not write dataset cache {path}: {e}", stacklevel=3)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def read_folder(scan: FolderScan, *, image_size: int | None, cache_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Decoded ``(images N x 3 x H x W uint8, labels int64)`` of a scanned folder, via the cache.

    ``cache_dir=None`` disables the cache. Labels index ``scan.classes``.
    """
    path = prefix = None
    if cache_dir is not None:
        path, prefix = _cache_file(cache_dir, scan, image_size)
        hit = _read_cache(path, len(scan.files))
        if hit is not None:
            return hit
    images = _decode_files(scan.files, image_size, desc=f"decoding {scan.root}")
    if path is not None:
        _write_cache(path, prefix, images, scan.labels)
    return images, scan.labels
