"""Efficient-module transforms: replace layers of a trained model by cheaper structures, initialised to match.

::

    from slimkit.transform import apply_transform, TRANSFORMS
    apply_transform(model, "depthwise_separable", layers="all eligible", calib_loader=loader)
    apply_transform(model, "grouped_shuffle", layers=["layer2.0.conv1"], groups=4, calib_loader=loader)
    model.slimkit_last_transform      # {"transform", "params", "replaced": [...], "skipped": {name: reason}}

Each transform initialises the replacement to approximate the original layer: in closed form on
the weights where one exists (SVD), else by least squares on the layer's inputs recorded with
a forward hook on a few batches. The result is meant as the start of fine-tuning or
distillation. See docs/transform.md for the transforms, their papers and MAC factors.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..artifact import history
from ..errors import SlimkitError
from ..pipeline import Context, register_stage
from .config import TransformConfig
from .fit import batches_from, record_inputs, run_with_hooks
from .methods import TRANSFORMS, LayerInfo, Transform, channelwise_geometry

__all__ = ["TransformConfig", "TRANSFORMS", "LayerInfo", "Transform", "apply_transform", "channelwise_geometry",
           "eligible_layers",
           "transform_stage"]

ALL = ("all", "all eligible", "all_eligible")


def _probe(model: nn.Module, batches: list) -> dict[str, LayerInfo]:
    """One image through the model: each module's input shape, and for a Linear the 4-D map flattened into it."""
    if not batches:
        return {}
    x = batches[0][:1]
    order: list[tuple[str, tuple]] = [("", tuple(x.shape))]  # (module, output shape) in completion order
    seen: dict[str, LayerInfo] = {}
    modules = dict(model.named_modules())

    def pre(name: str):
        def fn(module, args):
            if name in seen or not args or not isinstance(args[0], torch.Tensor):
                return
            shape, flat = tuple(args[0].shape), None
            if isinstance(module, nn.Linear) and len(shape) == 2:
                # the latest 4-D output (of any module) that holds exactly these numbers per sample
                for _, out in reversed(order):
                    if len(out) == 4 and out[1] * out[2] * out[3] == shape[1]:
                        flat = out[1:]
                        break
            seen[name] = LayerInfo(shape, flat)
        return fn

    handles = [m.register_forward_hook(
        lambda mod, a, out, n=n: order.append((n, tuple(out.shape))) if isinstance(out, torch.Tensor) else None)
        for n, m in modules.items() if n]
    try:
        run_with_hooks(model, [x], {n: pre(n) for n in modules if n})
    finally:
        for h in handles:
            h.remove()
    return seen


def eligible_layers(model: nn.Module, name: str, layers=None, info: dict[str, LayerInfo] | None = None,
                    **kwargs) -> tuple[list[str], dict[str, str]]:
    """The layers ``name`` would replace and the skipped ones with their reasons (see :func:`apply_transform`)."""
    t = TRANSFORMS.get(name)
    opts = _options(t, kwargs)
    modules = dict(model.named_modules())
    if layers is None or (isinstance(layers, str) and layers in ALL):
        candidates = [n for n, m in modules.items() if n and isinstance(m, t.types)]
    else:
        candidates = [s.strip() for s in layers.split(",") if s.strip()] if isinstance(layers, str) else list(layers)
        wanted = "/".join(c.__name__ for c in t.types)
        for n in candidates:
            if n not in modules or not n:
                examples = [k for k, m in modules.items() if k and isinstance(m, t.types)][:6]
                raise SlimkitError(f"{name}: no layer {n!r} in {type(model).__name__} "
                                   f"({wanted} layers include: {', '.join(examples) or 'none'})")
            if not isinstance(modules[n], t.types):
                raise SlimkitError(f"{name}: layer {n!r} is a {type(modules[n]).__name__}, but {name} replaces "
                                   f"{wanted} layers")
    ok, skipped = [], {}
    for n in candidates:
        reason = t.check(modules[n], (info or {}).get(n, LayerInfo()), opts)
        if reason:
            skipped[n] = reason
        else:
            ok.append(n)
    return ok, skipped


def _options(t: Transform, kwargs: dict) -> dict:
    unknown = set(kwargs) - set(t.defaults)
    if unknown:
        raise SlimkitError(f"{t.name}: unknown option(s) {sorted(unknown)} (known: {sorted(t.defaults) or 'none'})")
    return {**t.defaults, **kwargs}


def apply_transform(model: nn.Module, name: str, layers: str | list[str] | None = None,
                    example_input: torch.Tensor | None = None, calib_loader: Iterable | None = None,
                    num_batches: int = 4, *, max_images: int = 64, record: bool = True, **kwargs) -> nn.Module:
    """Replace layers of ``model`` in place by the efficient structure ``name`` and return the model.

    ``name`` is one of :data:`TRANSFORMS`: ``depthwise_separable`` (Howard et al. 2017),
    ``factorize_kxk`` and ``factorize_5x5`` (Szegedy et al. 2016; Jaderberg et al. 2014),
    ``grouped_shuffle`` (Zhang et al. 2018), ``bottleneck`` (He et al. 2016), ``gap_head`` (Lin
    et al. 2014) and ``channelwise`` (Gao et al. 2018); ``kwargs`` are the transform's options.
    ``layers`` is ``None``/``"all eligible"`` (every layer of the right type that passes the
    transform's checks) or module names (a list or ``"a,b"``); an unknown name or a layer of
    the wrong type raises :class:`SlimkitError`, an ineligible one is skipped with its reason.
    Replacements are initialised by closed-form least squares on the weights, then, where the
    transform fits on data, on the inputs each layer receives on ``num_batches`` batches of
    ``calib_loader`` (at most ``max_images`` images per layer, all recorded on the original
    model); ``example_input`` only tells shapes (needed by ``gap_head`` when there is no
    loader). The record of the call (replaced layers with their
    parameter counts, skipped layers with reasons) is ``model.slimkit_last_transform`` and, with
    ``record``, also appended to the model's provenance (``slimkit_history``).

    Args:
        model: the model, changed in place.
        name: the transform (:data:`TRANSFORMS`).
        layers: which layers (see above).
        example_input: one input, for shapes when there is no loader.
        calib_loader: training batches whose activations initialise the replacements.
        num_batches, max_images: how much of ``calib_loader`` the fits see.
        record: append the record to the model's provenance.
        **kwargs: the transform's options (``groups``, ``ratio``, ...).

    Returns:
        ``model``.

    Raises:
        SlimkitError: unknown transform, option or layer, or no layer to replace.

    Example:
        >>> import torch, slimkit
        >>> m = apply_transform(slimkit.create_model("resnet20"), "depthwise_separable", layers=["layer1.0.conv1"],
        ...                     example_input=torch.zeros(1, 3, 32, 32))   # Howard et al. 2017
        >>> type(m.layer1[0].conv1).__name__
        'SeparableConv'
    """
    t = TRANSFORMS.get(name)
    opts = _options(t, kwargs)
    batches = batches_from(calib_loader, None, num_batches)
    info = _probe(model, batches or batches_from(None, example_input, 1))
    targets, skipped = eligible_layers(model, name, layers, info, **kwargs)
    if not targets:
        why = "; ".join(f"{n}: {r}" for n, r in list(skipped.items())[:6]) or "no layer of the right type"
        raise SlimkitError(f"{name}: no layer to replace in {type(model).__name__} ({why})")
    inputs = record_inputs(model, targets, batches, max_images) if t.uses_data else {}
    modules = dict(model.named_modules())
    replaced = []
    for n in targets:
        old = modules[n]
        new = t.build(old, inputs.get(n), info.get(n, LayerInfo()), opts)
        new.train(old.training)
        parent, _, child = n.rpartition(".")
        model.get_submodule(parent)._modules[child] = new
        replaced.append({"name": n, "from": type(old).__name__, "to": type(new).__name__,
                         "params_before": sum(p.numel() for p in old.parameters()),
                         "params_after": sum(p.numel() for p in new.parameters())})
    shown = layers if layers is None or isinstance(layers, str) else list(layers)
    rec = {"stage": "transform", "params": {"method": name, "layers": shown, **_jsonable(opts)},
           "replaced": replaced, "skipped": skipped,
           "calibration_images": len(next(iter(inputs.values()))) if inputs else 0}
    model.slimkit_last_transform = rec
    if record:
        history(model).append(rec)
    return model


def _jsonable(opts: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()}


@register_stage("transform", config=TransformConfig,
                paper="Howard et al. 2017; Szegedy et al. 2016; Zhang et al. 2018; He et al. 2016; Gao et al. 2018",
                example={"transform": "depthwise_separable", "num_batches": 1})
def transform_stage(model: nn.Module, ctx: Context, config: TransformConfig) -> nn.Module:
    """Replace layers by efficient modules: :func:`apply_transform` with calibration batches from the train split.

    ``transform`` names the transform (Howard et al. 2017, Szegedy et al. 2016, Zhang et al.
    2018, He et al. 2016, Lin et al. 2014, Gao et al. 2018: see docs/transform.md), the other
    keys are its options; the key is not ``method`` because the recipe's ``method`` names the
    stage itself. The replaced and skipped layers go into the stage's provenance record
    (``ctx.details``) and ``model.slimkit_last_transform``.
    """
    loader = ctx.data.loader("train", config.batch_size or ctx.batch_size, seed=ctx.seed)
    layers = list(config.layers) if isinstance(config.layers, tuple) else config.layers
    apply_transform(model, config.transform, layers, calib_loader=loader, num_batches=config.num_batches,
                    max_images=config.max_images, record=False, **config.options)
    ctx.details.update(model.slimkit_last_transform)
    return model
