"""An int8 model's quantized state as plain tensors, so it is stored in safetensors and loaded bit for bit.

Quantized tensors, packed-parameter tuples and dtypes are not storable in safetensors: each is
written as its exact integer values plus float64 scales, int64 zero points and small marker
entries (``KEY.__q...``). Decoding reads a file, so every marker is range-checked and a crafted
entry (a huge tuple, a scale that is not a positive number, mismatched per-channel shapes) is one
:class:`~slimkit.errors.SlimkitError`. Used by :class:`slimkit.quant.core.QuantizedModel`'s state
hooks; nothing else needs it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import SlimkitError

_SEP = ".__q"  # suffix marker of the helper entries; a real parameter name never contains it
_DTYPES = [torch.qint8, torch.quint8, torch.qint32, torch.float32, torch.float16, torch.int8, torch.uint8]


def _encode(key: str, value: Any, out: dict[str, torch.Tensor]) -> None:
    # quantized tensors, packed-param tuples and dtypes are not safetensors-storable; store
    # the exact integer values and the float64 scales so decoding rebuilds them bit for bit.
    if isinstance(value, torch.Tensor) and value.is_quantized:
        out[key] = value.int_repr()
        out[key + _SEP + "dtype"] = torch.tensor(_DTYPES.index(value.dtype))
        if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            out[key + _SEP + "scales"] = value.q_per_channel_scales().double()
            out[key + _SEP + "zps"] = value.q_per_channel_zero_points().long()
            out[key + _SEP + "axis"] = torch.tensor(value.q_per_channel_axis())
        else:
            out[key + _SEP + "scale"] = torch.tensor(value.q_scale(), dtype=torch.float64)
            out[key + _SEP + "zp"] = torch.tensor(value.q_zero_point())
    elif isinstance(value, tuple):
        out[key + _SEP + "len"] = torch.tensor(len(value))
        for i, v in enumerate(value):
            if v is not None:
                _encode(f"{key}{_SEP}{i}", v, out)
    elif isinstance(value, torch.dtype):
        out[key + _SEP + "torchdtype"] = torch.tensor(_DTYPES.index(value))
    elif isinstance(value, torch.Tensor):
        out[key] = value
    elif value is None:  # a quantized conv without bias (no batch norm folded into it) stores None
        out[key + _SEP + "none"] = torch.tensor(0)
    else:
        raise SlimkitError(f"cannot store quantized state entry {key!r} of type {type(value).__name__}")


_MAX_TUPLE = 8  # packed parameters are (weight, bias) pairs: a longer "tuple" is a crafted file


def _scalar_int(state: dict, key: str, low: int, high: int) -> int:
    """An integer stored as a 0-d tensor, checked to lie in ``[low, high)`` (the values come from a file)."""
    t = state.pop(key)
    if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype.is_floating_point:
        raise SlimkitError(f"quantized state {key}: expected one integer")
    v = int(t)
    if not low <= v < high:
        raise SlimkitError(f"quantized state {key}: {v} is outside [{low}, {high})")
    return v


def _decode(key: str, state: dict) -> Any:
    if key + _SEP + "none" in state:
        state.pop(key + _SEP + "none")
        return None
    if key + _SEP + "torchdtype" in state:
        return _DTYPES[_scalar_int(state, key + _SEP + "torchdtype", 0, len(_DTYPES))]
    if key + _SEP + "len" in state:
        n = _scalar_int(state, key + _SEP + "len", 0, _MAX_TUPLE + 1)
        return tuple(_decode(f"{key}{_SEP}{i}", state) for i in range(n))
    if key + _SEP + "dtype" in state:
        _scalar_int(state, key + _SEP + "dtype", 0, len(_DTYPES))  # implied by the values' own dtype
        ints = state.pop(key, None)
        if not isinstance(ints, torch.Tensor) or ints.dtype not in (torch.int8, torch.uint8, torch.int32):
            raise SlimkitError(f"quantized state {key}: expected int8, uint8 or int32 values")
        if key + _SEP + "axis" in state:
            scales, zps = state.pop(key + _SEP + "scales"), state.pop(key + _SEP + "zps")
            axis = _scalar_int(state, key + _SEP + "axis", 0, max(ints.dim(), 1))
            if scales.shape != (ints.shape[axis],) or zps.shape != (ints.shape[axis],):
                raise SlimkitError(f"quantized state {key}: {ints.shape[axis]} channels, {tuple(scales.shape)} scales")
            return torch._make_per_channel_quantized_tensor(ints, scales, zps, axis)
        scale, zp = float(state.pop(key + _SEP + "scale")), int(state.pop(key + _SEP + "zp"))
        if not (scale > 0 and scale < float("inf")):
            raise SlimkitError(f"quantized state {key}: scale {scale} is not a positive number")
        return torch._make_per_tensor_quantized_tensor(ints, scale, zp)
    return state.pop(key, None)  # an encoded tuple element that was None


def state_hook(module: nn.Module, state: dict, prefix: str, local_metadata: Any) -> dict:
    keys = [k for k in state if k.startswith(prefix)]
    encoded: dict[str, torch.Tensor] = {}
    for k in keys:
        _encode(k, state.pop(k), encoded)
    state.update(encoded)
    return state


_PACKED = "._packed_params._packed_params"


def load_pre_hook(module: nn.Module, state: dict, prefix: str, *args: Any) -> None:
    from .core import quiet  # core imports this module at its top

    with quiet():
        decode_state(state, prefix)


def decode_state(state: dict, prefix: str) -> None:
    metadata = getattr(state, "_metadata", None) or {}
    roots = {k.split(_SEP)[0] for k in state if k.startswith(prefix) and _SEP in k}
    # dtype entries first, so a packed weight's dtype is in place when the weight is decoded
    for root in sorted(roots, key=lambda r: (r + _SEP + "torchdtype" not in state, r)):
        value = _decode(root, state)
        owner = root[: -len(_PACKED)] if root.endswith(_PACKED) else None
        if owner is not None and metadata.get(owner + "._packed_params", {}).get("version") is None:
            # Without state-dict version metadata (a safetensors file has none) torch's quantized
            # Linear reads its legacy layout: plain `weight`/`bias` keys, qint8 implied.
            state[owner + ".weight"], state[owner + ".bias"] = value
            dtype = state.pop(owner + "._packed_params.dtype", torch.qint8)
            if dtype != torch.qint8:
                raise SlimkitError(f"{owner}: only qint8 packed linear weights can be loaded, got {dtype}")
        else:
            state[root] = value
