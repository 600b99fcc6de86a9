"""The packed file: a model stored at the size its sparsity and weight sharing really allow (Han et al., ICLR 2016).

An artifact (:mod:`slimkit.artifact`) stores every weight as a dense float tensor, so a 90%
sparse model with 32 shared values per layer is as large on disk as the dense one. The packed
file stores each tensor in the smallest of these layouts, chosen per tensor by the bytes written:

* ``raw``: the tensor's bytes (BN statistics, biases and other small or dense leftovers);
* ``dense``: every value, as a code into the tensor's codebook when it has at most 256 distinct
  values (shared weights, low-bit weights), or into its output channel's codebook when each
  channel has at most 16 (binary weights with a per-channel scale), else as float bytes;
* ``bitmap``: one bit per element says which are non-zero, then the non-zero values;
* ``relative``: Deep Compression's relative indices: the gap to the previous non-zero in
  ``b`` bits, with a filler zero inserted where a gap does not fit (b chosen per tensor);
* ``csr``: per output channel the count of non-zeros, then their column indices (CSR).

Each stream of symbols (gaps, codes, counts, columns) is then written with the smallest of
fixed-width bits, canonical Huffman and lzma (:mod:`slimkit.sparse.coding`); codebooks and float
values are float bytes (lzma where it is smaller). Decoding gives back the same float values bit
for bit, so the loaded model is the saved one.

File layout: ``b"SLIMPACK"``; a 4-byte version, a 4-byte header coder, the header's stored and
decoded lengths (8 bytes each); the JSON header (lzma-compressed when that is smaller); the payload.
The header holds the artifact's own document (base spec, module tree, provenance, meta: the model
is rebuilt exactly as :func:`slimkit.load` rebuilds an artifact) and, per tensor, its
dtype, shape, layout and streams (offset, length, coder, alphabet, count). Nothing is unpickled;
every offset, length and count is checked against the payload and the shape before a byte is
decoded, and the values a file may declare are bounded by its size.

Example:
    >>> import os, tempfile, torch, slimkit
    >>> from slimkit.sparse import sparsify, SparsifyConfig, pack, read_packed
    >>> m = slimkit.create_model("digits_cnn").eval()
    >>> m = sparsify(m, SparsifyConfig(sparsity=0.9)).model
    >>> p = pack(m, os.path.join(tempfile.mkdtemp(), "m.slimpack"))
    >>> x = torch.randn(2, 1, 8, 8)
    >>> torch.equal(slimkit.load(p)(x), m(x))
    True
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from ..errors import SlimkitError
from .coding import CODERS, decode, encode, lzma_pack, lzma_unpack

MAGIC = b"SLIMPACK"
VERSION = 1
PREFIX = "<IIQQ"  # after the magic: version, header coder (0 JSON as is, 1 lzma), stored length, JSON length
FORMAT = "slimkit.packed"
MAX_CODEBOOK = 256
MIN_PACKED = 64  # tensors with fewer values are stored raw: a stream's table would cost more than it saves
MAX_HEADER = 64 << 20
VALUES_PER_BYTE = 256  # a file may declare at most this many tensor values per payload byte (+ the slack):
VALUES_SLACK = 1 << 22  # Deep Compression's densest streams need ~15 values per byte, all-zero tensors more
STREAMS = ("raw", "positions", "row_counts", "codes", "codebook", "values")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
          "int64": torch.int64, "int32": torch.int32, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}
LAYOUTS = ("raw", "dense", "bitmap", "relative", "csr")
COMPONENTS = ("positions", "codes", "codebook", "values", "raw")


def is_packed(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a packed file (by its first bytes, whatever its name)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


# -- writing --------------------------------------------------------------------------------------

class _Payload:
    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes, **record) -> dict:
        self.parts.append(data)
        out = {"offset": self.size, "length": len(data), **record}
        self.size += len(data)
        return out


def _float_bytes(values: np.ndarray, coders: tuple[str, ...]) -> tuple[str, bytes]:
    raw = values.astype("<f4").tobytes()
    if "lzma" not in coders:
        return "raw", raw
    packed = lzma_pack(raw)
    return ("lzma", packed) if len(packed) < len(raw) else ("raw", raw)


def _values_streams(values: np.ndarray, fillers: np.ndarray | None, coders: tuple[str, ...]
                    ) -> dict[str, tuple[dict, bytes]]:
    """The value streams of ``values`` (with ``fillers`` marking inserted zeros): codebook + codes, or floats."""
    if not len(values):
        return {"values": ({"coder": "raw", "count": 0}, b"")}
    book = np.unique(values[~fillers] if fillers is not None else values)
    if len(book) <= MAX_CODEBOOK:
        codes = np.searchsorted(book, values)
        alphabet = len(book)
        if fillers is not None and fillers.any():
            codes[fillers] = alphabet  # one extra symbol: the filler zero
            alphabet += 1
        coder, data = encode(codes, max(alphabet, 1), coders)
        bcoder, bdata = _float_bytes(book, coders)
        return {"codes": ({"coder": coder, "alphabet": max(alphabet, 1), "count": len(values)}, data),
                "codebook": ({"coder": bcoder, "count": len(book)}, bdata)}
    coder, data = _float_bytes(values, coders)
    return {"values": ({"coder": coder, "count": len(values)}, data)}


def _symbols(symbols: np.ndarray, alphabet: int, coders: tuple[str, ...]) -> tuple[dict, bytes]:
    coder, data = encode(symbols, alphabet, coders)
    return {"coder": coder, "alphabet": alphabet, "count": len(symbols)}, data


MAX_ROW_CODEBOOK = 16


def _row_codebooks(t: np.ndarray, coders: tuple[str, ...]) -> tuple[dict, dict] | None:
    """Every value as a code into its output channel's own codebook: binary and per-channel low-bit weights
    (``{-alpha_c, +alpha_c}``) have two values per row but ``2 C`` per tensor (1-bit codes instead of
    ``log2(2 C)``-bit ones; the caller keeps whichever layout is smaller)."""
    if t.ndim < 2 or t.shape[0] == 0:
        return None
    rows = t.reshape(t.shape[0], -1)
    books = [np.unique(r) for r in rows]
    k = max(len(b) for b in books)
    if k > MAX_ROW_CODEBOOK or k >= len(np.unique(rows)):  # no fewer symbols than one tensor-wide codebook
        return None
    book = np.stack([np.pad(b, (0, k - len(b)), mode="edge") for b in books])
    codes = np.concatenate([np.searchsorted(b, r) for b, r in zip(books, rows)])
    coder, data = encode(codes, k, coders)
    bcoder, bdata = _float_bytes(book.ravel(), coders)
    return ({"layout": "dense", "row_codebook": k},
            {"codes": ({"coder": coder, "alphabet": k, "count": len(codes)}, data),
             "codebook": ({"coder": bcoder, "count": book.size}, bdata)})


def _layouts(t: np.ndarray, coders: tuple[str, ...]) -> Iterable[tuple[dict, dict[str, tuple[dict, bytes]]]]:
    """Every layout of float tensor ``t`` (as float32): ``(record, streams)``."""
    flat = t.ravel()
    nz = np.flatnonzero(flat)
    yield {"layout": "dense"}, _values_streams(flat, None, coders)
    per_row = _row_codebooks(t, coders)
    if per_row is not None:
        yield per_row
    if len(nz) == len(flat):
        return
    mask = np.zeros(len(flat), dtype=np.int64)
    mask[nz] = 1
    nonzero = _values_streams(flat[nz], None, coders)  # the same stream for bitmap and CSR
    yield {"layout": "bitmap", "nnz": len(nz)}, {"positions": _symbols(mask, 2, coders), **nonzero}
    gaps = np.diff(np.concatenate([[-1], nz])) - 1
    for b in range(2, 9):
        top = (1 << b) - 1
        # a gap of g needs g // (top + 1) fillers; the filler sits top + 1 places after the previous entry
        n_fill = gaps // (top + 1)
        entries = len(nz) + int(n_fill.sum())
        if entries > len(flat):
            continue
        # entry k sits after its own fillers and all earlier ones; a filler is a full jump of `top` to a zero
        at = np.arange(len(nz)) + np.cumsum(n_fill)
        sym = np.full(entries, top, dtype=np.int64)
        sym[at] = gaps - n_fill * (top + 1)
        fill = np.ones(entries, dtype=bool)
        fill[at] = False
        values = np.zeros(entries, dtype=np.float32)
        values[at] = flat[nz]
        yield ({"layout": "relative", "nnz": len(nz), "gap_bits": b, "entries": entries},
               {"positions": _symbols(sym, top + 1, coders), **_values_streams(values, fill, coders)})
    if t.ndim >= 2:
        rows = t.reshape(t.shape[0], -1)
        cols = rows.shape[1]
        counts = (rows != 0).sum(axis=1)
        columns = np.flatnonzero(rows.ravel()) % cols
        yield ({"layout": "csr", "nnz": len(nz)},
               {"row_counts": _symbols(counts, cols + 1, coders), "positions": _symbols(columns, cols, coders),
                **nonzero})


def _encode_tensor(name: str, t: torch.Tensor, payload: _Payload, coders: tuple[str, ...]) -> dict:
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise SlimkitError(f"cannot pack tensor {name!r}: dtype {dtype} (packable: {', '.join(DTYPES)})")
    record = {"dtype": dtype, "shape": list(t.shape)}
    arr = t.detach().cpu().contiguous()
    exact = t.dtype == torch.float32 or (t.is_floating_point() and torch.equal(arr.float().to(t.dtype), arr))
    if t.is_floating_point() and t.numel() >= MIN_PACKED and exact:
        size, rec, streams = min(((sum(len(d) for _, d in st.values()), rec, st)
                                  for rec, st in _layouts(arr.float().numpy(), coders)), key=lambda b: b[0])
        if size < arr.numel() * arr.element_size():
            return {**record, **rec, "streams": {k: payload.add(d, **meta) for k, (meta, d) in streams.items()}}
    # small, integer, not float32-exact, or no smaller when encoded: the tensor's bytes as they are
    raw = (arr.view(torch.uint8) if t.dtype == torch.bfloat16 else arr).numpy().tobytes()
    return {**record, "layout": "raw", "streams": {"raw": payload.add(raw, coder="raw", count=len(raw))}}


def pack(model: nn.Module, path: str | os.PathLike, meta: dict | None = None, *,
         coders: tuple[str, ...] = CODERS) -> str:
    """Write ``model`` as a packed file (module docstring) atomically to ``path``; it loads with :func:`slimkit.load`.

    Args:
        model: any model an artifact can hold; sparse and shared-weight ones (:func:`sparsify`,
            :func:`share`) shrink, the rest is stored raw.
        path: the file (by convention ``.slimpack``).
        meta: JSON data kept with it (as :func:`slimkit.save`'s); default: the model's ``slimkit_meta``.
        coders: the entropy coders each symbol stream may use (``bits`` always; drop ``huffman`` or ``lzma``
            to measure what each one gains).

    Returns:
        ``path`` as a string.

    Example:
        >>> import os, tempfile, slimkit
        >>> p = pack(slimkit.create_model("digits_cnn"), os.path.join(tempfile.mkdtemp(), "m.slimpack"))
        >>> read_packed(p)[0]["format"]
        'slimkit.artifact'
    """
    from ..artifact import atomic_write, describe, history
    from ..artifact_header import FORMAT as ARTIFACT_FORMAT
    from ..artifact_header import VERSION as ARTIFACT_VERSION

    path = str(path)
    document = {"format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, "base": getattr(model, "slimkit_base", None),
                "modules": describe(model), "history": history(model),
                "meta": meta if meta is not None else getattr(model, "slimkit_meta", {})}
    payload = _Payload()
    tensors = {}
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            raise SlimkitError(f"cannot pack {path}: state entry {name!r} is a {type(t).__name__}, not a tensor")
        tensors[name] = _encode_tensor(name, t, payload, coders)
    try:
        text = json.dumps({"format": FORMAT, "version": VERSION, "artifact": document, "tensors": tensors,
                           "payload": payload.size}, separators=(",", ":")).encode()
    except TypeError as e:
        raise SlimkitError(f"packed metadata for {path} is not JSON-serialisable: {e}") from None

    # the JSON header is lzma-compressed when that is smaller: for a small model its module tree and
    # tensor records are a good part of the file, and every byte on disk counts
    stored = lzma_pack(text)
    coder = 1 if len(stored) < len(text) else 0
    stored = stored if coder else text

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack(PREFIX, VERSION, coder, len(stored), len(text)) + stored)
            for part in payload.parts:
                f.write(part)

    atomic_write(path, write)
    return path


# -- reading --------------------------------------------------------------------------------------

def _stream_ok(s: dict, payload: int, where: str) -> None:
    from ..documents import expect, expect_keys

    expect(s, dict, where, ())
    expect_keys(s, {"offset", "length", "coder", "alphabet", "count"}, where, (), {"offset", "length", "coder",
                                                                                    "count"})
    for k in ("offset", "length", "count", "alphabet"):
        if k in s and (not isinstance(s[k], int) or isinstance(s[k], bool) or s[k] < (1 if k == "alphabet" else 0)):
            raise SlimkitError(f"{where}: field {k}: expected a non-negative integer")
    if s["offset"] + s["length"] > payload:
        raise SlimkitError(f"{where}: stream [{s['offset']}, {s['offset'] + s['length']}) runs past the payload "
                           f"({payload} bytes)")


def read_header(path: str) -> tuple[dict, dict, int, int]:
    """``(packed header, artifact document, payload start, payload length)`` of a packed file, validated."""
    from ..artifact_header import check_header
    from ..documents import expect, expect_keys, parse_json

    prefix = len(MAGIC) + struct.calcsize(PREFIX)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(prefix)
            if len(head) < prefix or head[:len(MAGIC)] != MAGIC:
                raise SlimkitError(f"{path}: not a packed slimkit file")
            version, coder, n, text_length = struct.unpack(PREFIX, head[len(MAGIC):])
            if version != VERSION:
                raise SlimkitError(f"{path}: packed format v{version} (this slimkit reads v{VERSION})")
            if n > MAX_HEADER or text_length > MAX_HEADER or prefix + n > size or coder not in (0, 1):
                raise SlimkitError(f"{path}: header length {n} does not fit the file ({size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise SlimkitError(f"{path}: cannot read ({e.strerror or e})") from None
    if coder:
        raw = lzma_unpack(raw, text_length, f"{path}: header")
    if len(raw) != text_length:
        raise SlimkitError(f"{path}: header is {len(raw)} bytes, {text_length} expected")
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise SlimkitError(f"{path}: header is not UTF-8 text") from None
    header = parse_json(text, f"{path}: header")
    expect(header, dict, path, ())
    expect_keys(header, {"format", "version", "artifact", "tensors", "payload"}, path, (),
                {"format", "version", "artifact", "tensors", "payload"})
    if header["format"] != FORMAT or header["version"] != VERSION:
        raise SlimkitError(f"{path}: unsupported packed format {header['format']!r} v{header['version']!r}")
    start = prefix + n
    payload = size - start
    if header["payload"] != payload:
        raise SlimkitError(f"{path}: payload is {payload} bytes, the header says {header['payload']} (truncated?)")
    document = check_header(header["artifact"], path)
    tensors = expect(header["tensors"], dict, path, ("tensors",))
    declared, limit = 0, VALUES_PER_BYTE * payload + VALUES_SLACK
    for name, rec in tensors.items():
        where = f"{path}: tensor {name!r}"
        expect(rec, dict, where, ())
        expect_keys(rec, {"dtype", "shape", "layout", "streams", "nnz", "gap_bits", "entries", "row_codebook"}, where,
                    (), {"dtype", "shape", "layout", "streams"})
        if not isinstance(rec["dtype"], str) or rec["dtype"] not in DTYPES:
            raise SlimkitError(f"{where}: dtype {rec['dtype']!r} (known: {', '.join(DTYPES)})")
        if not isinstance(rec["layout"], str) or rec["layout"] not in LAYOUTS:
            raise SlimkitError(f"{where}: layout {rec['layout']!r} (known: {', '.join(LAYOUTS)})")
        shape = expect(rec["shape"], list, where, ("shape",))
        if len(shape) > 8 or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise SlimkitError(f"{where}: field shape: expected up to 8 non-negative integers")
        # exact integers; an empty dimension must not hide huge ones (numpy would still overflow on them)
        if math.prod(max(d, 1) for d in shape) > limit:
            raise SlimkitError(f"{where}: shape {shape[:8]} is larger than a {size:,}-byte file can hold")
        declared += math.prod(shape)
        for key in ("nnz", "gap_bits", "entries"):
            if key in rec and (not isinstance(rec[key], int) or isinstance(rec[key], bool) or rec[key] < 0):
                raise SlimkitError(f"{where}: field {key}: expected a non-negative integer")
        for sname, s in expect(rec["streams"], dict, where, ("streams",)).items():
            if sname not in STREAMS:
                raise SlimkitError(f"{where}: unknown stream {str(sname)[:40]!r} (known: {', '.join(STREAMS)})")
            _stream_ok(s, payload, f"{where}: stream {sname}")
    if declared > limit:
        raise SlimkitError(f"{path}: declares {declared:,} tensor values, more than a {size:,}-byte file can hold")
    return header, document, start, payload


def _floats(s: dict, blob: bytes, where: str, *, exactly: int | None = None, at_most: int | None = None
            ) -> np.ndarray:
    """A float32 stream, its declared count checked against what the layout needs before anything is expanded."""
    if (exactly is not None and s["count"] != exactly) or (at_most is not None and s["count"] > at_most):
        wanted = exactly if exactly is not None else f"at most {at_most}"
        raise SlimkitError(f"{where}: {s['count']} float values where the layout needs {wanted}")
    need = 4 * s["count"]
    if s["coder"] == "lzma":
        blob = lzma_unpack(blob, need, where)
    elif s["coder"] != "raw":
        raise SlimkitError(f"{where}: float stream coder {s['coder']!r} (known: raw, lzma)")
    if len(blob) != need:
        raise SlimkitError(f"{where}: {len(blob)} bytes where {s['count']} float32 values need {need}")
    return np.frombuffer(blob, dtype="<f4")


def _decode_tensor(name: str, rec: dict, read, where: str) -> torch.Tensor:
    dtype, shape, layout = DTYPES[rec["dtype"]], tuple(rec["shape"]), rec["layout"]
    numel = math.prod(shape)
    streams = rec["streams"]

    def need(*names: str) -> None:
        missing = [n for n in names if n not in streams]
        if missing:
            raise SlimkitError(f"{where}: layout {layout} without stream {missing[0]!r}")

    def symbols(sname: str, alphabet: int, count: int) -> np.ndarray:
        s = streams[sname]
        if s.get("alphabet") != alphabet or s["count"] != count:
            raise SlimkitError(f"{where}: stream {sname} holds {s['count']} symbols of {s.get('alphabet')}, "
                               f"expected {count} of {alphabet}")
        return decode(s["coder"], read(s), alphabet, count, f"{where}: stream {sname}")

    def values(count: int, fillers: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        if "codebook" in streams:
            need("codes")
            book = _floats(streams["codebook"], read(streams["codebook"]), f"{where}: stream codebook",
                           at_most=MAX_CODEBOOK)
            alphabet = streams["codes"].get("alphabet", 0)
            if alphabet not in (len(book), len(book) + 1) or (alphabet > len(book) and not fillers):
                raise SlimkitError(f"{where}: codes over {alphabet} symbols for a codebook of {len(book)}")
            codes = symbols("codes", alphabet, count)
            filler = codes == len(book)
            return np.concatenate([book, np.zeros(1, "<f4")])[codes], filler
        need("values")
        return _floats(streams["values"], read(streams["values"]), f"{where}: stream values", exactly=count), None

    if layout == "raw":
        need("raw")
        blob = read(streams["raw"])
        item = torch.empty((), dtype=dtype).element_size()
        if len(blob) != numel * item:
            raise SlimkitError(f"{where}: {len(blob)} bytes for {numel} values of {rec['dtype']}")
        if not blob:
            return torch.empty(shape, dtype=dtype)
        if dtype == torch.bfloat16:
            return torch.frombuffer(bytearray(blob), dtype=torch.uint8).view(torch.bfloat16).reshape(shape).clone()
        return torch.from_numpy(np.frombuffer(blob, dtype=torch.empty((), dtype=dtype).numpy().dtype).reshape(
            shape).copy())
    if not dtype.is_floating_point:
        raise SlimkitError(f"{where}: layout {layout} for a {rec['dtype']} tensor")
    flat = np.zeros(numel, dtype="<f4")
    if layout == "dense" and "row_codebook" in rec:
        k = rec["row_codebook"]
        need("codes", "codebook")
        if not isinstance(k, int) or not 1 <= k <= MAX_ROW_CODEBOOK or len(shape) < 2 or shape[0] == 0:
            raise SlimkitError(f"{where}: field row_codebook: expected 1-{MAX_ROW_CODEBOOK} values per row")
        book = _floats(streams["codebook"], read(streams["codebook"]), f"{where}: stream codebook",
                       exactly=shape[0] * k)
        codes = symbols("codes", k, numel)
        rows = np.repeat(np.arange(shape[0]), numel // shape[0])
        flat[:] = book.reshape(shape[0], k)[rows, codes]
    elif layout == "dense":
        flat[:] = values(numel)[0]
    else:
        nnz = rec.get("nnz")
        if not isinstance(nnz, int) or nnz > numel:
            raise SlimkitError(f"{where}: field nnz: expected at most {numel} non-zeros")
        if layout == "bitmap":
            need("positions")
            idx = np.flatnonzero(symbols("positions", 2, numel))
            if len(idx) != nnz:
                raise SlimkitError(f"{where}: bitmap marks {len(idx)} non-zeros, the header says {nnz}")
            flat[idx] = values(nnz)[0]
        elif layout == "relative":
            need("positions")
            b, entries = rec.get("gap_bits"), rec.get("entries")
            if (not isinstance(b, int) or not 1 <= b <= 16 or not isinstance(entries, int)
                    or not nnz <= entries <= numel):
                raise SlimkitError(f"{where}: fields gap_bits/entries are not a valid relative index")
            gaps = symbols("positions", 1 << b, entries)
            idx = np.cumsum(gaps + 1) - 1
            if entries and idx[-1] >= numel:
                raise SlimkitError(f"{where}: relative indices run past the tensor's {numel} values")
            v, filler = values(entries, fillers=True)
            real = int((~filler).sum()) if filler is not None else int(np.count_nonzero(v))
            if real != nnz:  # fillers are zeros, the real entries are not
                raise SlimkitError(f"{where}: {real} entries where the header says {nnz}")
            flat[idx] = v
        elif layout == "csr":
            need("row_counts", "positions")
            if len(shape) < 2 or shape[0] == 0:
                raise SlimkitError(f"{where}: a CSR layout needs at least 2 dimensions")
            cols = numel // shape[0]
            counts = symbols("row_counts", cols + 1, shape[0])
            if int(counts.sum()) != nnz:
                raise SlimkitError(f"{where}: row counts sum to {int(counts.sum())}, the header says {nnz}")
            columns = symbols("positions", cols, nnz)
            rows = np.repeat(np.arange(shape[0]), counts)
            flat[rows * cols + columns] = values(nnz)[0]
    return torch.from_numpy(flat.reshape(shape)).to(dtype)


def read_packed(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(artifact document, state dict)`` of a packed file: every tensor decoded and checked.

    Raises:
        SlimkitError: one line naming the file, the tensor and the stream for anything malformed.
    """
    path = str(path)
    header, document, start, length = read_header(path)
    try:
        with open(path, "rb") as f:
            f.seek(start)
            blob = f.read(length)
    except OSError as e:
        raise SlimkitError(f"{path}: cannot read ({e.strerror or e})") from None

    def read(s: dict) -> bytes:
        return blob[s["offset"]:s["offset"] + s["length"]]

    state = {name: _decode_tensor(name, rec, read, f"{path}: tensor {name!r}")
             for name, rec in header["tensors"].items()}
    return document, state
