"""How many parameters a module holds and how many bytes they take in storage.

Bytes are counted at each tensor's real storage: ``numel * element_size`` of its dtype (so
float32, float16 and int8 differ), stored values plus indices for torch sparse tensors, and
the int8 weight (plus float bias) unpacked from torch.ao quantized modules, whose packed
parameters are not tensors. A module type with its own packed layout (say 4-bit weights in a
uint8 buffer) registers a size function with :func:`register_weight_bytes`; the function then
replaces the default count for that module's own tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from ..registry import Registry


class WeightStat(NamedTuple):
    """Parameters (logical elements) and bytes of storage of one module's own weights."""

    params: int
    bytes: int


WeightBytesFn = Callable[[nn.Module], WeightStat]
WEIGHT_BYTES: Registry[WeightBytesFn] = Registry("weight-size function")


def type_key(cls: type) -> str:
    """The registry key of a module class: its qualified name (``pkg.module.Class``)."""
    return f"{cls.__module__}.{cls.__qualname__}"


def register_weight_bytes(cls: type[nn.Module]) -> Callable[[WeightBytesFn], WeightBytesFn]:
    """Decorator registering ``fn(module) -> WeightStat`` as the size function of ``cls`` and its subclasses.

    The function reports the module's *own* weights (not its children's): the logical
    parameter count and the bytes its packed storage really takes. It replaces the default
    count (parameters and persistent buffers at ``element_size``) for modules of that type,
    which is what a packed low-bit layout needs, since its bytes live in a buffer whose dtype
    says nothing about the bit width.
    """
    return WEIGHT_BYTES.register(type_key(cls))


def tensor_bytes(t: torch.Tensor | None) -> int:
    """Bytes a tensor takes in storage: ``numel * element_size``, or values + indices if sparse."""
    if t is None:
        return 0
    layout = t.layout
    if layout == torch.sparse_coo:
        return tensor_bytes(t._values()) + tensor_bytes(t._indices())
    if layout in (torch.sparse_csr, torch.sparse_bsr):
        return tensor_bytes(t.values()) + tensor_bytes(t.crow_indices()) + tensor_bytes(t.col_indices())
    if layout in (torch.sparse_csc, torch.sparse_bsc):
        return tensor_bytes(t.values()) + tensor_bytes(t.ccol_indices()) + tensor_bytes(t.row_indices())
    return t.numel() * t.element_size()


def _registered(module: nn.Module) -> WeightBytesFn | None:
    for cls in type(module).__mro__:
        key = type_key(cls)
        if key in WEIGHT_BYTES:
            return WEIGHT_BYTES.get(key)
    return None


def _packed_quantized(module: nn.Module) -> WeightStat | None:
    # torch.ao quantized Conv*/Linear keep weight and bias in a TorchScript object, exposed
    # only through the weight()/bias() methods; the plain tensor walk would see nothing.
    packed = getattr(module, "_packed_params", None)
    weight = getattr(module, "weight", None)
    if packed is None or not callable(weight) or isinstance(weight, (torch.Tensor, nn.Module)):
        return None
    w = weight()
    b = module.bias() if callable(getattr(module, "bias", None)) else None
    return WeightStat(w.numel() + (b.numel() if b is not None else 0), tensor_bytes(w) + tensor_bytes(b))


def module_weight_stat(module: nn.Module, seen: set[int]) -> WeightStat:
    """Parameters and bytes of ``module``'s own tensors, skipping tensors whose id is in ``seen``.

    Parameters count toward ``params``; parameters and persistent buffers (what a
    state_dict saves, e.g. batch-norm running statistics) toward ``bytes``. ``seen`` makes
    tied weights count once across the model and is updated in place.
    """
    fn = _registered(module)
    if fn is not None:
        return fn(module)
    packed = _packed_quantized(module)
    if packed is not None:
        return packed
    params = nbytes = 0
    for p in module.parameters(recurse=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        params += p.numel()
        nbytes += tensor_bytes(p)
    non_persistent = getattr(module, "_non_persistent_buffers_set", set())
    for name, b in module.named_buffers(recurse=False):
        if b is None or name in non_persistent or id(b) in seen:
            continue
        seen.add(id(b))
        nbytes += tensor_bytes(b)
    return WeightStat(params, nbytes)
