"""The profiler: run one forward pass under a dispatch mode and attribute every aten op to a layer."""

from __future__ import annotations

import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..errors import SlimkitError
from .energy import mac_energy_pj, memory_energy_pj
from .ops import counter_for, is_zero_cost, op_name
from .weights import module_weight_stat, tensor_bytes

LAYER_KEYS = ("name", "type", "input_shape", "output_shape", "params", "macs", "other_ops", "activation_bytes",
              "weight_bytes", "calls")


@dataclass
class LayerStats:
    """One row of a profile: a leaf module, or a parent module for the ops it runs itself.

    ``name`` is the module's path in the model (``""`` for the model itself, as in
    ``named_modules``); the shapes are those of its first call (first tensor argument, first
    tensor of the output); counts are summed over all calls; ``params`` and ``weight_bytes``
    cover the module's own tensors only (its children have rows of their own).
    """

    name: str
    type: str
    input_shape: list[int] | None = None
    output_shape: list[int] | None = None
    params: int = 0
    macs: int = 0
    other_ops: int = 0
    activation_bytes: int = 0
    weight_bytes: int = 0
    calls: int = 0
    uncounted: Counter = field(default_factory=Counter)
    mac_energy_pj: float = 0.0
    order: float = math.inf
    leaf: bool = True

    def to_dict(self) -> dict[str, Any]:
        """The row as a JSON-ready dict with the keys of :data:`LAYER_KEYS`."""
        return {k: getattr(self, k) for k in LAYER_KEYS}

    @property
    def has_content(self) -> bool:
        return bool(self.params or self.weight_bytes or self.macs or self.other_ops or self.activation_bytes
                    or self.uncounted)


@dataclass
class Profile:
    """Counts of one forward pass at batch size of the example input; see :func:`profile`.

    ``activation_bytes`` (the bytes all ops wrote) and ``energy_breakdown_mj`` are kept for
    inspection but are not part of :meth:`to_dict`.
    """

    params: int
    macs: int
    other_ops: int
    activation_peak_bytes: int
    weight_bytes: int
    energy_mj_estimate: float
    layers: list[LayerStats]
    uncounted: dict[str, int]
    input_shape: list[int] | list[list[int]]
    activation_bytes: int = 0
    energy_breakdown_mj: dict[str, float] = field(default_factory=dict)
    model_type: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: totals, ``layers`` (list of row dicts), ``uncounted`` and ``input_shape``."""
        return {
            "params": self.params,
            "macs": self.macs,
            "other_ops": self.other_ops,
            "activation_peak_bytes": self.activation_peak_bytes,
            "weight_bytes": self.weight_bytes,
            "energy_mj_estimate": self.energy_mj_estimate,
            "layers": [row.to_dict() for row in self.layers],
            "uncounted": dict(self.uncounted),
            "input_shape": self.input_shape,
        }

    def layer(self, name: str) -> LayerStats:
        """The row of the module at path ``name`` (``""`` for the model itself)."""
        for row in self.layers:
            if row.name == name:
                return row
        names = [r.name or "<model>" for r in self.layers]
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        raise SlimkitError(f"no layer {name!r} in the profile (layers: {shown})")

    def table(self, top: int | None = None) -> str:
        """A text table of the layers in execution order, their share of MACs, and the totals.

        Each row shows the layer's shapes, parameters, MACs with its percentage of the
        model's MACs and a bar scaled to the largest layer (so the bottlenecks stand out),
        element ops, bytes written and weight bytes. ``top=N`` keeps the N layers with the
        most MACs (still in execution order) and sums the rest into one line.
        """
        from .table import format_table

        return format_table(self, top)

    def __str__(self) -> str:
        return self.table()


# ---------------------------------------------------------------- tensor liveness


def _storage_key(t: torch.Tensor) -> tuple[int, torch.UntypedStorage | None]:
    try:
        s = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse and some tensor subclasses have no storage
        return 0, None
    return s._cdata, s


class _Liveness:
    """Bytes of live storages allocated by ops; the peak is sampled right after each op.

    A storage counts from the op that first returns it (when it is none of that op's input
    storages) until its last reference dies, detected before the next op runs. Storages that
    only ever come in as inputs (the example input, parameters, buffers) are never counted.
    """

    def __init__(self) -> None:
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def sweep(self) -> None:
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.current -= self.live.pop(k)[1]

    def produced(self, input_keys: set[int], outputs: list[torch.Tensor]) -> None:
        for t in outputs:
            key, storage = _storage_key(t)
            if storage is None or key in input_keys or key in self.live:
                continue
            nbytes = storage.nbytes()
            if nbytes:
                self.live[key] = (StorageWeakRef(storage), nbytes)
                self.current += nbytes
        self.peak = max(self.peak, self.current)


# ---------------------------------------------------------------- attribution


def _shape(x: Any) -> list[int] | None:
    for t in tree_leaves(x):
        if isinstance(t, torch.Tensor):
            return list(t.shape)
    return None


class _Recorder(TorchDispatchMode):
    """Counts every op into the row of the innermost module currently running."""

    def __init__(self, rows: dict[str, LayerStats], root: LayerStats) -> None:
        super().__init__()
        self.rows = rows
        self.stack: list[LayerStats] = [root]
        self.clock = 0
        self.liveness = _Liveness()
        self.failed_at: LayerStats | None = None

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.liveness.sweep()
        out = func(*args, **kwargs)
        row = self.stack[-1]
        row.order = min(row.order, self.tick())
        name = op_name(func)
        in_tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        in_keys = {_storage_key(t)[0] for t in in_tensors}
        self._count(row, func, name, args, kwargs, out)
        zero = is_zero_cost(name)
        for t in outs:
            # a zero-cost op returning one of its inputs' storages is a view: nothing written
            if not (zero and _storage_key(t)[0] in in_keys):
                row.activation_bytes += tensor_bytes(t)
        self.liveness.produced(in_keys, outs)
        return out

    def _count(self, row: LayerStats, func, name: str, args, kwargs, out) -> None:
        fn = counter_for(name)
        cost = None
        if fn is not None:
            try:
                cost = fn(args, kwargs, out)
            except Exception:  # an unexpected signature must show up as uncounted, not crash the run
                cost = None
        if cost is None:
            row.uncounted[name] += 1
            return
        row.macs += int(cost.macs)
        row.other_ops += int(cost.other_ops)
        if cost.macs:
            row.mac_energy_pj += mac_energy_pj(int(cost.macs), cost.mac_dtype)


def _install_hooks(model: nn.Module, rec: _Recorder, rows: dict[str, LayerStats]) -> list:
    handles = []
    for name, module in model.named_modules():
        row = rows[name]

        def pre(mod, args, kwargs, row=row):
            row.calls += 1
            if row.input_shape is None:
                row.input_shape = _shape((args, kwargs))
            if row.leaf:
                row.order = min(row.order, rec.tick())
            rec.stack.append(row)

        def post(mod, args, output, row=row):
            if output is None and sys.exc_info()[1] is not None and rec.failed_at is None:
                rec.failed_at = row  # the innermost module unwinds first
            if row.output_shape is None and output is not None:
                row.output_shape = _shape(output)
            while len(rec.stack) > 1:
                if rec.stack.pop() is row:
                    break

        # prepend: ops run by the module's own pre-hooks (weight norm, say) belong to the module
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
        handles.append(module.register_forward_hook(post, always_call=True))
    return handles


# ---------------------------------------------------------------- public entry points


def _as_args(example_input: Any) -> tuple:
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)) and example_input and all(
            isinstance(t, torch.Tensor) for t in example_input):
        return tuple(example_input)
    raise SlimkitError(f"example_input must be a tensor or a tuple of tensors, got {type(example_input).__name__}")


def _fmt_shape(shape: Any) -> str:
    if shape and isinstance(shape[0], list):
        return ", ".join(_fmt_shape(s) for s in shape)
    return "x".join(str(d) for d in shape) if shape else "scalar"


def profile(model: nn.Module, example_input: torch.Tensor | tuple[torch.Tensor, ...]) -> Profile:
    """Count parameters, MACs, element ops, memory and energy of one forward pass of ``model``.

    The model runs once in eval mode under ``torch.no_grad()`` on ``example_input`` (a tensor,
    or a tuple of tensors passed as positional arguments) while a ``TorchDispatchMode`` sees
    every aten op and forward pre/post hooks attribute each op to the innermost module
    running (an op outside every leaf module, like a residual ``x + y``, goes to the module
    whose own forward runs it), so functional code is counted and a module called twice counts
    twice. Counting rules are in :mod:`slimkit.profile.ops`; ops without a rule are listed in
    ``Profile.uncounted``. ``activation_peak_bytes`` is the maximum, over all ops, of the
    total bytes of live storages that ops created, taken right after each op returns: a
    storage is created by the op that first returns it when it is none of that op's input
    storages, and dies when its last reference does (a Python local keeps a tensor alive);
    the input, parameters and buffers never count, nor do scratch buffers inside one op.
    ``energy_mj_estimate`` follows :mod:`slimkit.profile.energy` (Horowitz 2014 via Han et
    al. 2016). The model is left as it was (every module's training flag restored, hooks
    removed), also when the forward raises; that error becomes a :class:`SlimkitError`
    naming the innermost failing layer and the input shape.

    Args:
        model: any ``nn.Module``.
        example_input: one input (batch size 1 gives per-image counts), or a tuple of inputs.

    Returns:
        A :class:`Profile`: totals (``params``, ``macs``, ``other_ops``, ``activation_peak_bytes``,
        ``weight_bytes``, ``energy_mj_estimate``) and ``layers``; ``table()`` prints them.

    Raises:
        SlimkitError: not a module, or the forward fails (the layer is named).

    Example:
        >>> import torch, slimkit
        >>> p = profile(slimkit.create_model("resnet20"), torch.zeros(1, 3, 32, 32))   # He et al. 2016
        >>> p.params, p.macs
        (269722, 40551040)
    """
    if not isinstance(model, nn.Module):
        raise SlimkitError(f"profile() needs a torch.nn.Module, got {type(model).__name__}")
    args = _as_args(example_input)
    input_shape: Any = list(args[0].shape) if len(args) == 1 else [list(a.shape) for a in args]

    rows: dict[str, LayerStats] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        stat = module_weight_stat(module, seen)
        rows[name] = LayerStats(name, type(module).__name__, params=stat.params, weight_bytes=stat.bytes,
                                leaf=not any(True for _ in module.children()))
    rec = _Recorder(rows, rows[""])
    flags = {m: m.training for m in model.modules()}
    handles: list = []
    try:
        model.eval()
        handles = _install_hooks(model, rec, rows)
        try:
            with torch.no_grad(), rec:
                model(*args)
        except SlimkitError:
            raise
        except Exception as e:
            where = rec.failed_at or rec.stack[-1]
            layer = f"layer {where.name!r} ({where.type})" if where.name else f"the model's own forward ({where.type})"
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SlimkitError(f"{type(model).__name__} rejected an input of shape {_fmt_shape(input_shape)}: "
                               f"{layer} failed with {type(e).__name__}: {first}") from e
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag

    layers = [r for r in rows.values() if (r.leaf and (r.calls or r.has_content)) or (not r.leaf and r.has_content)]
    layers.sort(key=lambda r: (r.calls == 0, r.order))
    uncounted: Counter = Counter()
    for r in rows.values():
        uncounted.update(r.uncounted)
    weight_bytes = sum(r.weight_bytes for r in rows.values())
    activation_bytes = sum(r.activation_bytes for r in rows.values())
    mac_pj = sum(r.mac_energy_pj for r in rows.values())
    dram_pj, sram_pj = memory_energy_pj(weight_bytes, activation_bytes)
    breakdown = {"macs": mac_pj * 1e-9, "weights_dram": dram_pj * 1e-9, "activations_sram": sram_pj * 1e-9}
    return Profile(
        params=sum(r.params for r in rows.values()),
        macs=sum(r.macs for r in rows.values()),
        other_ops=sum(r.other_ops for r in rows.values()),
        activation_peak_bytes=rec.liveness.peak,
        weight_bytes=weight_bytes,
        energy_mj_estimate=sum(breakdown.values()),
        layers=layers,
        uncounted=dict(sorted(uncounted.items())),
        input_shape=input_shape,
        activation_bytes=activation_bytes,
        energy_breakdown_mj=breakdown,
        model_type=type(model).__name__,
    )


def profile_spec(spec: str, weights: str | None = None, input_size: tuple[int, int, int] | None = None) -> Profile:
    """Build the model of a spec (see :func:`slimkit.create_model`) and profile it at batch size 1.

    The input is a fixed-seed standard-normal tensor of ``(1, *input_size)``, by default the
    spec's :func:`slimkit.models.default_input_size`; counts do not depend on its values.
    """
    from ..models import create_model, default_input_size

    size = tuple(input_size) if input_size is not None else default_input_size(spec)
    if len(size) != 3 or not all(isinstance(d, int) and d > 0 for d in size):
        raise SlimkitError(f"input_size must be three positive integers (C, H, W), got {input_size!r}")
    model = create_model(spec, weights=weights)
    x = torch.randn((1, *size), generator=torch.Generator().manual_seed(0))
    return profile(model, x)


def size_on_disk(path: str | os.PathLike) -> int:
    """Bytes a saved model takes on disk: the file's size, or the sum over a directory's files."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return os.path.getsize(path)
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    raise SlimkitError(f"no such file: {path}")
