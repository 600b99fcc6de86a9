"""Energy per inference, estimated from the 45 nm energy table of Horowitz 2014.

The numbers are from M. Horowitz, "Computing's energy problem (and what we can do about it)",
ISSCC 2014, as used by Han et al. 2016 ("Deep Compression", ICLR; "EIE", ISCA) to argue that
memory access, not arithmetic, dominates inference energy. The model is deliberately simple:

    energy = sum over MAC ops of  MACs x (mult + add energy at the precision of the op's weights)
           + weight_bytes / 4   x 640 pJ   (every 32-bit weight word read once from DRAM)
           + activation_bytes / 4 x 2 x 5 pJ (every 32-bit activation word written once to and
                                              read once from an 8 KB SRAM)

Element ops (``other_ops``), caches, reuse and data movement inside the arithmetic units are
ignored, so the figure is an *estimate* for comparing models and compressions against each
other, not a prediction of a device's measured energy.
"""

from __future__ import annotations

import torch

# pJ per operation at 45 nm / 0.9 V (Horowitz 2014). Han et al. quote the fp32, int32 and
# int8 rows; the 16-bit float row is from the same Horowitz table.
MULT_PJ: dict[str, float] = {"fp32": 3.7, "fp16": 1.1, "int32": 3.1, "int8": 0.2}
ADD_PJ: dict[str, float] = {"fp32": 0.9, "fp16": 0.4, "int32": 0.1, "int8": 0.03}
SRAM_READ_32BIT_PJ = 5.0  # 8 KB SRAM
DRAM_READ_32BIT_PJ = 640.0

def precision_class(dtype: torch.dtype | None) -> str:
    """The Horowitz row for a weight dtype: ``fp32``, ``fp16``, ``int32`` or ``int8``.

    Integer and quantized dtypes of one byte (or packed narrower) use the int8 row, wider
    integers the int32 row; floats of two bytes or less (bfloat16 and float8 too) the fp16
    row, wider floats (float64 too: the table has nothing wider) the fp32 row.
    """
    if dtype is None:
        return "fp32"
    if dtype.is_floating_point or dtype.is_complex:
        return "fp16" if dtype.itemsize <= 2 else "fp32"
    return "int8" if dtype.itemsize <= 1 else "int32"


def mac_energy_pj(macs: int, dtype: torch.dtype | None) -> float:
    """Energy in pJ of ``macs`` multiply-accumulates at the precision of ``dtype``."""
    p = precision_class(dtype)
    return macs * (MULT_PJ[p] + ADD_PJ[p])


def memory_energy_pj(weight_bytes: int, activation_bytes: int) -> tuple[float, float]:
    """(DRAM weight reads, SRAM activation writes + reads) in pJ, per the module docstring."""
    return weight_bytes / 4 * DRAM_READ_32BIT_PJ, 2 * activation_bytes / 4 * SRAM_READ_32BIT_PJ
