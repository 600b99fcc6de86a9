"""Where the bytes of a packed file go: per component (positions, codes, codebooks, values, raw) and per layer."""

from __future__ import annotations

import math
import os

from .pack import COMPONENTS, read_header

# A model chosen by its packed size before retraining must fit this fraction of the budget: retraining moves the
# weights and so the codes' Huffman statistics (resnet20, 85% sparse, 4 bits: 51,733 B planned, 54,835 B after)
SIZE_MARGIN = 0.95
# Of a Deep Compression retrain's epochs, the sparse phase (masks held); the centroid phase gets the rest
SPARSE_EPOCH_SHARE = 0.7


def sizes(path: str | os.PathLike) -> dict:
    """Bytes of a packed file per component (positions, codes, codebook, values, raw) and per layer.

    Returns:
        ``{"file": bytes on disk, "header": bytes, "components": {...}, "layers": {layer: {component: bytes,
        "layout": ...}}}``; a layer is a tensor name's module path (``layer1.0.conv1`` for
        ``layer1.0.conv1.weight``).
    """
    path = str(path)
    header, _, start, _ = read_header(path)
    components = dict.fromkeys(COMPONENTS, 0)
    layers: dict[str, dict] = {}
    for name, rec in header["tensors"].items():
        layer = name.rsplit(".", 1)[0] if "." in name else name
        row = layers.setdefault(layer, dict.fromkeys(COMPONENTS, 0))
        for sname, s in rec["streams"].items():
            comp = {"row_counts": "positions"}.get(sname, sname)
            row[comp] += s["length"]
            components[comp] += s["length"]
        if name.endswith("weight") and rec["layout"] != "raw":
            row["layout"] = rec["layout"]
            row["nnz"] = rec.get("nnz", math.prod(rec["shape"]))
            row["numel"] = math.prod(rec["shape"])
    return {"file": os.path.getsize(path), "header": start, "components": components, "layers": layers}


def size_table(breakdown: dict, top: int = 12) -> str:
    """A text table of :func:`sizes`: the components, then the largest layers with their layout and density."""
    comps = breakdown["components"]
    lines = [f"  header {breakdown['header']:,} B; " + ", ".join(f"{k} {v:,} B" for k, v in comps.items()),
             f"  {'layer':<32} {'layout':<9} {'density':>8} {'positions':>10} {'codes':>9} {'codebook':>9} "
             f"{'values':>9} {'raw':>9}"]
    rows = sorted(breakdown["layers"].items(), key=lambda kv: -sum(kv[1][c] for c in COMPONENTS))
    for name, row in rows[:top]:
        density = f"{row['nnz'] / max(row['numel'], 1):.3f}" if "numel" in row else "-"
        lines.append(f"  {name[:32]:<32} {row.get('layout', 'raw'):<9} {density:>8} "
                     + " ".join(f"{row[c]:>{10 if c == 'positions' else 9},}" for c in COMPONENTS))
    if len(rows) > top:
        lines.append(f"  ... {len(rows) - top} more layers")
    return "\n".join(lines)
