"""Low-rank tensor decomposition that makes real layers cheaper: SVD, CP, Tucker-2, separable, asymmetric.

::

    from slimkit.decompose import decompose, DecomposeConfig
    r = decompose(model, torch.zeros(1, 3, 32, 32), DecomposeConfig(decompose="tucker", rank="vbmf"))
    r = decompose(model, x, DecomposeConfig(decompose="tucker", target_macs=0.5), loader=train_loader)
    r.model, r.layers        # the decomposed model; per layer: rank, MACs before/after, error estimate
    r.skipped                # layers left whole, with the reason

Methods are in :data:`DECOMPOSITIONS` (:mod:`slimkit.decompose.methods`), ranks in
:mod:`slimkit.decompose.ranks` (EVBMF, energy, ratio), the global allocation in
:mod:`slimkit.decompose.allocate`. The ``decompose`` recipe stage and ``slimkit decompose`` take
the same :class:`DecomposeConfig`; recover accuracy with the stage's ``finetune: {distill: kd}``.
See docs/decompose.md for the measurements: where decomposition pays on this CPU, and where not.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import SlimkitError
from ..pipeline import Context, register_stage
from .allocate import Candidate, LayerPlan, allocate
from .config import DecomposeConfig
from .methods import DECOMPOSITIONS, Decomposition, applies, check_rank
from .ranks import energy_rank, evbmf, parse_rank

__all__ = ["DECOMPOSITIONS", "DecomposeConfig", "DecomposeResult", "Decomposition", "applies", "decompose",
           "decompose_stage", "energy_rank", "evbmf", "parse_rank"]

ALL = ("all", "all eligible", "all_eligible")


@dataclass
class DecomposeResult:
    """A decomposed model and what was done."""

    model: nn.Module
    layers: list[dict] = field(default_factory=list)  # name, shape, rank, macs/params before and after, error
    skipped: dict[str, str] = field(default_factory=dict)
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0
    latency_ratio: float | None = None

    def summary(self) -> dict:
        return {"layers": self.layers, "skipped": self.skipped, "macs_before": self.macs_before,
                "macs_after": self.macs_after, "params_before": self.params_before, "params_after": self.params_after,
                "macs_ratio": self.macs_after / max(self.macs_before, 1),
                "params_ratio": self.params_after / max(self.params_before, 1), "latency_ratio": self.latency_ratio}


def _shapes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[tuple, tuple]]:
    """Input and output shape of every module on one forward pass."""
    seen: dict[str, tuple[tuple, tuple]] = {}
    handles = []
    for name, m in model.named_modules():
        if name:
            def hook(mod, args, out, n=name):
                if n not in seen and args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                    seen[n] = (tuple(args[0].shape), tuple(out.shape))
            handles.append(m.register_forward_hook(hook))
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return seen


def eligible(model: nn.Module, config: DecomposeConfig, shapes: dict) -> tuple[list[str], dict[str, str]]:
    """The layers ``config`` decomposes and the ones left whole, with the reason (called by the forward pass)."""
    method = DECOMPOSITIONS.get(config.method)
    modules = dict(model.named_modules())
    explicit = not (isinstance(config.layers, str) and config.layers in ALL)
    if explicit:
        names = [s.strip() for s in config.layers.split(",") if s.strip()] if isinstance(config.layers, str) \
            else list(config.layers)
        for n in names:
            if n not in modules or not n:
                raise SlimkitError(f"{config.method}: no layer {n!r} in {type(model).__name__}")
            reason = method.check(modules[n])
            if reason:
                raise SlimkitError(f"{config.method}: layer {n} is {reason}: {config.method} does not apply")
    else:
        names = [n for n, m in modules.items() if n and isinstance(m, (nn.Conv2d, nn.Linear))]
    ok, skipped = [], {}
    for n in names:
        if any(n == p or n.startswith(p + ".") for p in config.protected):
            skipped[n] = "protected"
        elif n not in shapes:
            skipped[n] = "not called in the forward pass"
        elif (reason := method.check(modules[n])) is not None:
            skipped[n] = reason
        else:
            ok.append(n)
    return ok, skipped


def _hw(shape: tuple) -> tuple[int, int]:
    return (shape[2], shape[3]) if len(shape) == 4 else (1, 1)


def _candidate_ranks(method: Decomposition, module: nn.Module, ceiling, round_to: int) -> list:
    """Ranks from the ceiling down: multiples of ``round_to`` (for Tucker, a common fraction of both modes)."""
    if isinstance(ceiling, tuple):
        top = max(ceiling)
        out = []
        for k in range(top, 0, -round_to):
            r = tuple(min(c, max(1, round(k * c / top))) for c in ceiling)
            if r not in out:
                out.append(r)
        return out
    return list(dict.fromkeys([ceiling] + list(range(ceiling - ceiling % round_to or ceiling - round_to, 0,
                                                         -round_to)) + [1]))


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in ``model`` where the module called ``name`` is (its parent's child of that name)."""
    parent, _, child = name.rpartition(".")
    model.get_submodule(parent)._modules[child] = new


def _refit_last(seq: nn.Sequential, x_current: torch.Tensor, target: torch.Tensor) -> None:
    """Least squares for the decomposition's last layer: its output on the decomposed model's inputs -> the original's.

    Zhang et al. 2016's asymmetric reconstruction: the inputs come from the already-decomposed
    layers before it, the targets from the original network, so errors do not compound.
    """
    from ..transform.fit import fit_conv

    last = list(seq.children())[-1]
    prefix = nn.Sequential(*list(seq.children())[:-1])
    bias = last.bias.detach() if last.bias is not None else None
    if isinstance(last, nn.Linear):
        with torch.no_grad():
            z = prefix(x_current).double()
            y = target.double() - (bias.double() if bias is not None else 0)
            w = torch.linalg.lstsq(z, y).solution.T
        with torch.no_grad():
            last.weight.copy_(w.to(last.weight.dtype))
        return
    pairs = list(zip(x_current, target))
    index = torch.arange(len(pairs))

    def features(ib: torch.Tensor) -> torch.Tensor:
        return prefix(torch.stack([pairs[int(i)][0] for i in ib]))

    def wanted(ib: torch.Tensor) -> torch.Tensor:
        y = torch.stack([pairs[int(i)][1] for i in ib])
        return y - bias[None, :, None, None] if bias is not None else y

    w = fit_conv(index, features, wanted, last.kernel_size, last.stride, last.padding, last.dilation)
    with torch.no_grad():
        last.weight.copy_(w.to(last.weight.dtype))


def decompose(model: nn.Module, example_input: torch.Tensor, config: DecomposeConfig | None = None, *,
              loader: Iterable | None = None, inplace: bool = False, seed: int = 0, **options) -> DecomposeResult:
    """Replace layers of ``model`` by low-rank factorisations (Denton et al. 2014; Lebedev et al. 2015; Kim et al. 2016;
    Jaderberg et al. 2014; Zhang et al. 2016).

    Args:
        model: the network (left untouched unless ``inplace``).
        example_input: one input batch (shapes only).
        config: a :class:`DecomposeConfig`, or keyword ``options`` building one.
        loader: training ``(input, label)`` batches: for ``asym``, the ``sequential`` re-fit and ranks by the
            energy of the responses.
        inplace: change ``model`` itself.
        seed: for CP's random starts.

    Returns:
        A :class:`DecomposeResult`; the MACs after are the profiler's and equal the plan's.

    Raises:
        SlimkitError: a rank the layer does not allow, a method that does not apply to a named layer, a budget no
            allocation reaches (with the smallest reachable), nothing decomposable, or data missing.

    Example:
        >>> import torch, slimkit
        >>> m = slimkit.create_model("resnet20")
        >>> r = decompose(m, torch.zeros(1, 3, 32, 32), DecomposeConfig(decompose="tucker", target_macs=0.6))
        >>> r.macs_after <= 0.6 * r.macs_before
        True
    """
    from ..profile import profile
    from ..transform.fit import batches_from, record_inputs
    from .methods import clear_cache

    config = config if config is not None else DecomposeConfig.from_options(options)
    method = DECOMPOSITIONS.get(config.method)
    clear_cache()
    work = model if inplace else copy.deepcopy(model)
    was = work.training
    work.eval()
    shapes = _shapes(work, example_input)
    names, skipped = eligible(work, config, shapes)
    if not names:
        why = "; ".join(f"{n}: {r}" for n, r in list(skipped.items())[:6]) or "no conv or linear layer"
        raise SlimkitError(f"decompose: nothing in {type(model).__name__} can take {config.method} ({why})")
    kind, value = parse_rank(config.rank_rule)
    needs_data = method.uses_data or config.procedure == "sequential" or (config.method == "asym" and kind == "energy")
    batches = batches_from(loader, None, config.batches) if loader is not None else []
    if needs_data and not batches:
        raise SlimkitError(f"decompose: {config.method} with procedure {config.procedure} needs data (loader=, --data)")
    original = copy.deepcopy(work).eval() if config.procedure == "sequential" else None
    inputs = record_inputs(work, names, batches, config.max_images) if needs_data else {}
    modules = dict(work.named_modules())
    with torch.no_grad():
        before = profile(work, example_input)
    plans = []
    for n in names:
        m = modules[n]
        ceiling = method.max_rank(m) if kind == "full" else method.rank_for(m, kind, value, inputs.get(n))
        ceiling = check_rank(config.method, m, ceiling, n) if kind == "fixed" else _clip(method, m, ceiling)
        in_hw, out_hw = _hw(shapes[n][0]), _hw(shapes[n][1])
        whole = _whole_cost(m, in_hw, out_hw)
        index = 1 if config.target and config.target[0] == "params" else 0
        limit = whole[index] * (1 - config.min_saving)
        ranks = _candidate_ranks(method, m, ceiling, config.round_to) if config.target else [ceiling]
        cands = [Candidate(r, method.cost(m, r, in_hw, out_hw)[index], method.error(m, r, inputs.get(n)))
                 for r in ranks]
        cands = [c for c in cands if c.cost < limit]
        if not cands:
            skipped[n] = (f"not cheaper decomposed (rank {ceiling}: {method.cost(m, ceiling, in_hw, out_hw)[index]:,} "
                          f"vs {whole[index]:,} {'params' if index else 'MACs'})")
            continue
        plans.append(LayerPlan(n, whole[index], cands))
    if config.target and config.target[0] in ("macs", "params"):
        what, fraction = config.target
        total = before.macs if what == "macs" else before.params
        allocate(plans, total - sum(p.whole for p in plans), fraction * total, what.replace("macs", "MACs"))
    elif config.target:
        from .latency import allocate_latency

        allocate_latency(work, example_input, plans, modules, shapes, method, config)
    else:
        for p in plans:
            p.choice = 0
    chosen = {p.name: p.candidates[p.choice].rank for p in plans if p.choice >= 0}
    skipped.update({p.name: "kept whole by the allocation" for p in plans if p.choice < 0})
    order = [n for n in shapes if n in chosen]  # forward order, for the sequential procedure
    records = []
    opts = {"iterations": config.iterations, "seed": seed}
    for n in order:
        m = modules[n]
        x = inputs.get(n)
        new = method.build(m, chosen[n], x, opts)
        if config.procedure == "sequential":
            current = record_inputs(work, [n], batches, config.max_images)[n]
            with torch.no_grad():
                target = dict(original.named_modules())[n](inputs[n])
            _refit_last(new, current, target)
        in_hw, out_hw = _hw(shapes[n][0]), _hw(shapes[n][1])
        macs0, params0 = _whole_cost(m, in_hw, out_hw)
        macs1, params1 = method.cost(m, chosen[n], in_hw, out_hw)
        records.append({"name": n, "from": type(m).__name__, "shape": list(m.weight.shape),
                        "rank": list(chosen[n]) if isinstance(chosen[n], tuple) else chosen[n],
                        "macs_before": macs0, "macs_after": macs1, "params_before": params0, "params_after": params1,
                        "error_estimate": method.error(m, chosen[n], x)})
        set_module(work, n, new)
    with torch.no_grad():
        after = profile(work, example_input)
    work.train(was)
    clear_cache()
    predicted = before.macs - sum(r["macs_before"] - r["macs_after"] for r in records)
    if after.macs != predicted:
        import warnings

        warnings.warn(f"slimkit.decompose: profiled MACs {after.macs:,} differ from the plan's {predicted:,}",
                      stacklevel=2)
    result = DecomposeResult(work, records, skipped, before.macs, after.macs, before.params, after.params)
    if config.target and config.target[0] == "latency":
        from .latency import measured_ratio

        result.latency_ratio = measured_ratio(model, work, example_input, config.latency_batches)
        if result.latency_ratio > config.target_latency:
            import warnings

            warnings.warn(f"slimkit.decompose: measured latency ratio {result.latency_ratio:.3f} is above the target "
                          f"{config.target_latency:.3g} (timing noise, or decomposition does not pay for these layers "
                          "on this machine)", stacklevel=2)
    return result


def _clip(method: Decomposition, m: nn.Module, rank):
    most = method.max_rank(m)
    if isinstance(rank, tuple):
        return tuple(max(1, min(r, t)) for r, t in zip(rank, most))
    return max(1, min(int(rank), most))


def _whole_cost(m: nn.Module, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> tuple[int, int]:
    """(MACs, params) of the layer as it is, by the profiler's rules."""
    params = sum(p.numel() for p in m.parameters(recurse=False))
    if isinstance(m, nn.Linear):
        return m.in_features * m.out_features, params
    o, c, kh, kw = m.weight.shape
    return o * c * kh * kw * out_hw[0] * out_hw[1], params


@register_stage("decompose", config=DecomposeConfig,
                paper="Denton et al. 2014; Lebedev et al. 2015; Kim et al. 2016; Jaderberg et al. 2014; "
                      "Zhang et al. 2016",
                example={"decompose": "tucker", "target_macs": 0.7})
def decompose_stage(model: nn.Module, ctx: Context, config: DecomposeConfig) -> nn.Module:
    """Low-rank decomposition of conv and linear layers: :func:`decompose` on the context's training batches.

    The per-layer ranks, MACs and error estimates and the layers left whole go into the stage's
    provenance; recover accuracy with ``finetune: {epochs: E, distill: kd}`` after it.
    """
    x = torch.zeros(1, *ctx.data.info.input_size, device=ctx.device)
    result = decompose(model, x, config, loader=ctx.data.loader("train", ctx.batch_size, seed=ctx.seed),
                       inplace=True, seed=ctx.seed)
    ctx.details.update(result.summary())
    return result.model
