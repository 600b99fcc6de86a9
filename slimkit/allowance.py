"""How much a file may make slimkit allocate while it is loaded: a few bytes of JSON must not build gigabytes.

Every module an artifact's header asks for (its base model, the modules rebuilt from their configs) is
first built on the meta device and its values counted against an allowance derived from the tensors
the file really holds. The base model and the rebuilt modules draw on separate allowances: a pruned
file is many times smaller than its base model, while its replacement modules are about its size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from .errors import SlimkitError

_ALLOWANCE: ContextVar[dict | None] = ContextVar("slimkit_load_allowance", default=None)


def _values(module: nn.Module) -> int:
    return sum(t.numel() for t in module.state_dict().values() if isinstance(t, torch.Tensor))


def file_values(path: str) -> int:
    """Tensor values a safetensors file holds, read from its header alone."""
    from safetensors import safe_open

    total = 0
    with safe_open(path, framework="pt") as f:
        for k in f.keys():
            n = 1
            for d in f.get_slice(k).get_shape():
                n *= d
            total += n
    return total


@contextmanager
def allowance_for(path: str, values: int | None = None) -> Iterator[None]:
    """While loading ``path`` (holding ``values`` tensor values; default: read from its safetensors header):
    rebuilt modules may declare twice its values and a little slack; the base model, which pruning
    shrinks many times over, 64 times its values and a few million."""
    values = file_values(path) if values is None else values
    modules, base = 2 * values + 1_000_000, 64 * values + 4_000_000
    token = _ALLOWANCE.set({"modules": [modules, modules], "base": [base, base]})
    try:
        yield
    finally:
        _ALLOWANCE.reset(token)


def declared_values(build: Callable[[], nn.Module]) -> int | None:
    """How many tensor values ``build()`` would allocate, counted on the meta device (None: it cannot run there)."""
    try:
        with torch.device("meta"):
            return _values(build())
    except Exception:  # noqa: BLE001 - a builder that needs real tensors is built for real, unchecked
        return None


def charge(what: str, build: Callable[[], nn.Module], *, base: bool = False) -> None:
    """While loading a file, refuse a build that would allocate more values than the file justifies."""
    allowance = _ALLOWANCE.get()
    if allowance is None:
        return
    n = declared_values(build)
    if n is None:
        return
    left = allowance["base" if base else "modules"]
    left[0] -= n
    if left[0] < 0:
        raise SlimkitError(f"{what} declares {n:,} values, more than the file's tensors justify ({left[1]:,})")


def refund(module: nn.Module) -> None:
    """Give back the allowance of a module that a charged build made and the header then replaced."""
    allowance = _ALLOWANCE.get()
    if allowance is not None:
        allowance["modules"][0] += _values(module)
