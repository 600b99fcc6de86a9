"""Entropy coding of symbol streams: fixed-width bit packing, canonical Huffman, and lzma; the smallest wins.

Deep Compression (Han et al., ICLR 2016, section 4) Huffman-codes the weight codes and the sparse
index gaps: their distributions are far from uniform, so the variable-length code saves 20-30%
over fixed-width bits. The standard library has lzma (a general byte compressor) but no Huffman
coder, and the PyPI ones either pickle their code tables or are unmaintained, so canonical Huffman
is written here (about 80 lines): only the code length of each symbol is stored, and the code
itself follows from the lengths, which makes the table a few bytes and fully checkable on read.

Every stream is a 1-D array of non-negative integers below ``alphabet``; :func:`encode` tries the
coders and returns the smallest ``(coder, bytes)``; :func:`decode` reverses it and checks that
exactly ``count`` symbols come out, each below ``alphabet``.
"""

from __future__ import annotations

import heapq
import lzma

import numpy as np

from ..errors import SlimkitError

CODERS = ("bits", "huffman", "lzma")
MAX_CODE_LENGTH = 16  # the decoder's lookup table has 2**L entries; longer codes fall back to bits


def width(alphabet: int) -> int:
    """Bits per symbol of a fixed-width code for ``alphabet`` symbols (at least 1)."""
    return max(1, int(alphabet - 1).bit_length())


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """``values`` (non-negative, below ``2**bits``) as a big-endian bit string, ``bits`` per value."""
    v = np.asarray(values, dtype=np.uint64)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    return np.packbits(((v[:, None] >> shifts) & np.uint64(1)).astype(np.uint8).ravel()).tobytes()


def unpack_bits(data: bytes, bits: int, count: int, where: str) -> np.ndarray:
    """The ``count`` values of :func:`pack_bits` back; raises when ``data`` is too short."""
    need = (count * bits + 7) // 8
    if len(data) != need:
        raise SlimkitError(f"{where}: {len(data)} bytes where {count} values of {bits} bits need {need}")
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: count * bits].reshape(count, bits)
    out = np.zeros(count, dtype=np.int64)
    for k in range(bits):  # one column at a time: 8 + bits bytes per value, not a (count, bits) int64 product
        out = (out << 1) | flat[:, k]
    return out


# -- canonical Huffman ----------------------------------------------------------------------------

def code_lengths(counts: np.ndarray) -> np.ndarray:
    """Huffman code length per symbol (0 for an unused symbol; a lone used symbol gets length 1)."""
    used = [(int(c), i) for i, c in enumerate(counts) if c > 0]
    lengths = np.zeros(len(counts), dtype=np.int64)
    if len(used) == 1:
        lengths[used[0][1]] = 1
        return lengths
    # heap items: (weight, tie-breaker, symbols under this node)
    heap = [(c, i, [i]) for c, i in used]
    heapq.heapify(heap)
    tie = len(counts)
    while len(heap) > 1:
        a, _, sa = heapq.heappop(heap)
        b, _, sb = heapq.heappop(heap)
        for s in sa + sb:
            lengths[s] += 1
        heapq.heappush(heap, (a + b, tie, sa + sb))
        tie += 1
    return lengths


def canonical_codes(lengths: np.ndarray) -> dict[int, tuple[int, int]]:
    """``{symbol: (code, length)}``: codes assigned in order of (length, symbol), as in DEFLATE."""
    order = sorted((int(n), s) for s, n in enumerate(lengths) if n > 0)
    codes, code, prev = {}, 0, order[0][0] if order else 0
    for n, s in order:
        code <<= n - prev
        codes[s] = (code, n)
        code += 1
        prev = n
    return codes


def _huffman_encode(symbols: np.ndarray, alphabet: int) -> bytes | None:
    counts = np.bincount(symbols, minlength=alphabet)
    lengths = code_lengths(counts)
    if lengths.max(initial=0) > MAX_CODE_LENGTH:
        return None
    codes = canonical_codes(lengths)
    code_of = np.zeros(alphabet, dtype=np.uint64)
    len_of = np.zeros(alphabet, dtype=np.int64)
    for s, (c, n) in codes.items():
        code_of[s], len_of[s] = c, n
    n = len_of[symbols]
    total = int(n.sum())
    # each symbol's code, left-aligned in a MAX_CODE_LENGTH-bit field, then the fields' used bits kept
    field = (code_of[symbols] << (MAX_CODE_LENGTH - n).astype(np.uint64))
    shifts = np.arange(MAX_CODE_LENGTH - 1, -1, -1, dtype=np.uint64)
    bits = ((field[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    keep = np.arange(MAX_CODE_LENGTH)[None, :] < n[:, None]
    stream = np.packbits(bits[keep]).tobytes()
    header = bytes(int(v) for v in lengths)  # one byte per symbol: its code length
    return total.to_bytes(8, "little") + header + stream


def _huffman_decode(data: bytes, alphabet: int, count: int, where: str) -> np.ndarray:
    if len(data) < 8 + alphabet:
        raise SlimkitError(f"{where}: Huffman stream shorter than its table")
    total = int.from_bytes(data[:8], "little")
    lengths = np.frombuffer(data[8:8 + alphabet], dtype=np.uint8).astype(np.int64)
    stream = data[8 + alphabet:]
    longest = int(lengths.max(initial=0))
    if longest == 0 or longest > MAX_CODE_LENGTH or total > 8 * len(stream) or len(stream) != (total + 7) // 8:
        raise SlimkitError(f"{where}: malformed Huffman stream")
    kraft = sum(2.0 ** -int(n) for n in lengths if n)
    if kraft > 1.0 + 1e-12:
        raise SlimkitError(f"{where}: Huffman code lengths do not form a prefix code")
    # lookup table: every `longest`-bit window starting with a symbol's code maps to (symbol, length)
    table_sym = np.full(1 << longest, -1, dtype=np.int64)
    table_len = np.zeros(1 << longest, dtype=np.int64)
    for s, (c, n) in canonical_codes(lengths).items():
        lo = c << (longest - n)
        table_sym[lo:lo + (1 << (longest - n))] = s
        table_len[lo:lo + (1 << (longest - n))] = n
    bits = np.unpackbits(np.frombuffer(stream, dtype=np.uint8))[:total]
    padded = np.concatenate([bits, np.zeros(longest, dtype=np.uint8)]).astype(np.int64)
    out: list[int] = []
    pos, chunk = 0, 1 << 20  # windows are built a megabit at a time: memory stays bounded for any stream
    while len(out) < count:
        if pos >= total:
            raise SlimkitError(f"{where}: Huffman stream ends after {len(out)} of {count} symbols")
        start, stop = pos, min(total, pos + chunk)
        # the `longest`-bit window starting at every bit position of the chunk
        windows = np.zeros(stop - start, dtype=np.int64)
        for k in range(longest):
            windows = (windows << 1) | padded[start + k:stop + k]
        sym_at, len_at = table_sym[windows].tolist(), table_len[windows].tolist()
        while len(out) < count and pos < stop:
            if sym_at[pos - start] < 0:
                raise SlimkitError(f"{where}: Huffman stream breaks after {len(out)} of {count} symbols")
            out.append(sym_at[pos - start])
            pos += len_at[pos - start]
    if pos != total:
        raise SlimkitError(f"{where}: Huffman stream has {total - pos} bits left after {count} symbols")
    return np.asarray(out, dtype=np.int64)


# -- lzma ------------------------------------------------------------------------------------------

LZMA_DICT = 1 << 23  # the largest dictionary used: it bounds the decoder's memory whatever the file says


def _lzma_filters(size: int) -> list[dict]:
    # a dictionary no larger than the data: preset 9's default of 64 MiB costs ~30 ms per call for nothing
    return [{"id": lzma.FILTER_LZMA2, "preset": 9, "dict_size": min(LZMA_DICT, max(1 << 12, size))}]


def lzma_pack(data: bytes) -> bytes:
    """``data`` compressed by raw LZMA2 (no container: the file's header records the stream)."""
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=_lzma_filters(len(data)))


MAX_LZMA_RATIO = 4096  # zeros compress ~7000:1; the streams written here compress far less


def lzma_unpack(data: bytes, size: int, where: str) -> bytes:
    """The ``size`` bytes :func:`lzma_pack` compressed (it never expands past ``size`` + 1, so bombs stop early)."""
    if size > MAX_LZMA_RATIO * max(len(data), 1) + (1 << 16):
        raise SlimkitError(f"{where}: an lzma stream of {len(data):,} bytes cannot hold {size:,}")
    try:
        # the encoder's dictionary follows from the size, so the decoder's is the same, never larger
        d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_lzma_filters(size))
        return d.decompress(data, max_length=size + 1)
    except lzma.LZMAError as e:
        raise SlimkitError(f"{where}: corrupt lzma stream ({e})") from None


# -- choosing the coder ---------------------------------------------------------------------------

def encode(symbols: np.ndarray, alphabet: int, coders: tuple[str, ...] = CODERS) -> tuple[str, bytes]:
    """The smallest encoding of ``symbols`` (each in ``[0, alphabet)``) among ``coders``: ``(coder, data)``."""
    symbols = np.asarray(symbols, dtype=np.int64).ravel()
    if symbols.size and (symbols.min() < 0 or symbols.max() >= alphabet):
        raise ValueError("symbol outside the alphabet")
    packed = pack_bits(symbols, width(alphabet))
    options = {"bits": packed}
    if "huffman" in coders and symbols.size and alphabet <= 256:
        h = _huffman_encode(symbols, alphabet)
        if h is not None:
            options["huffman"] = h
    if "lzma" in coders:
        options["lzma"] = lzma_pack(packed)
    name = min((c for c in coders if c in options), key=lambda c: (len(options[c]), CODERS.index(c)))
    return name, options[name]


def decode(coder: str, data: bytes, alphabet: int, count: int, where: str) -> np.ndarray:
    """The ``count`` symbols of :func:`encode`'s output; one-line :class:`SlimkitError` for any corruption."""
    if coder == "huffman":
        if alphabet > 256:
            raise SlimkitError(f"{where}: Huffman stream over {alphabet} symbols")
        out = _huffman_decode(data, alphabet, count, where)
    elif coder == "lzma":
        raw = lzma_unpack(data, (count * width(alphabet) + 7) // 8, where)
        out = unpack_bits(raw, width(alphabet), count, where)
    elif coder == "bits":
        out = unpack_bits(data, width(alphabet), count, where)
    else:
        raise SlimkitError(f"{where}: unknown coder {coder!r} (known: {', '.join(CODERS)})")
    if out.size and out.max() >= alphabet:
        raise SlimkitError(f"{where}: symbol {int(out.max())} outside the alphabet of {alphabet}")
    return out
