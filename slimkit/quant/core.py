"""Post-training static int8 quantization with torch.ao FX graph mode on the x86 backend.

Flow (Jacob et al. 2018, integer-only inference; recipe of Krishnamoorthi 2018): trace the
float model, fold batch norm into the preceding convolution and fuse conv-BN-ReLU, insert
observers, run calibration batches, then convert to the ``torch.ao.nn.quantized`` modules and
``quantized::`` ops that run fbgemm/oneDNN int8 kernels. Weights are per-output-channel
symmetric int8 (restricted range [-127, 127]), activations per-tensor affine uint8. Residual
additions become ``quantized::add_relu``, which requantizes both inputs to the output scale; the
option-A shortcut (stride slice + zero channel padding) shares its input's quantization
parameters, so the padded zeros are exactly the zero point and the shortcut path is lossless.

The converted model is wrapped in :class:`QuantizedModel`, which stores its quantized state as
plain tensors (int8 values plus scales and zero points) so it is a normal slimkit artifact.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import operator
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.ao.quantization import QConfig, QConfigMapping, get_default_qconfig_mapping
from torch.ao.quantization.backend_config import BackendConfig, BackendPatternConfig, ObservationType
from torch.ao.quantization.backend_config.x86 import get_x86_backend_config, x86_default_op_quint8_dtype_config
from torch.ao.quantization.observer import PerChannelMinMaxObserver
from torch.ao.quantization.quantize_fx import convert_fx, convert_to_reference_fx, fuse_fx, prepare_fx

from ..artifact import _rebuild, describe, register_module
from ..errors import SlimkitError, first_line
from .config import QuantConfig
from .observers import OBSERVERS, check_observer_kwargs
from .state import load_pre_hook, state_hook

_QUIET = (r".*torch\.ao\.quantization is deprecated.*", r".*quantized tensor creation functions.*",
          r".*reduce_range will be deprecated.*", r".*must run observer before calling calculate_qparams.*")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence torch.ao's deprecation notices within the block.

    They point to torchao, which is not a dependency; the FX flow is what runs real int8
    kernels in this torch (see docs/quant.md).
    """
    with warnings.catch_warnings():
        for pattern in _QUIET:
            warnings.filterwarnings("ignore", message=pattern)
        yield


ENGINE = "x86"
QUANTIZED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _has_vnni() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags


def default_reduce_range() -> bool:
    """7-bit activations where u8*s8 products could saturate int16 (AVX2 without VNNI), else 8-bit."""
    return not _has_vnni()


def backend_config() -> BackendConfig:
    """torch's x86 backend config plus the option-A shortcut ops as qparam-sharing ops.

    Slicing and zero padding do not change the values they keep, so their output shares the
    input's observer; the zeros they add are then exactly the zero point (no extra rounding).
    """
    bc = get_x86_backend_config()
    for op in (torch.nn.functional.pad, operator.getitem):
        bc.set_backend_pattern_config(BackendPatternConfig(op)
                                      .set_observation_type(ObservationType.OUTPUT_SHARE_OBSERVER_WITH_INPUT)
                                      .set_dtype_configs([x86_default_op_quint8_dtype_config]))
    return bc


def make_qconfig(observer: str = "minmax", reduce_range: bool | None = None,
                 observer_kwargs: dict | None = None) -> QConfig:
    """The QConfig: ``observer`` (a name in OBSERVERS) on activations, per-channel min/max on weights."""
    cls = OBSERVERS.get(observer)
    if reduce_range is None:
        reduce_range = default_reduce_range()
    act = cls.with_args(dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0,
                        quant_max=127 if reduce_range else 255, **(observer_kwargs or {}))
    weight = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                                quant_min=-127, quant_max=127)
    return QConfig(activation=act, weight=weight)


def make_qconfig_mapping(qconfig: QConfig | None, keep_float: Iterable[str] = ()) -> QConfigMapping:
    """torch's x86 default mapping with ``qconfig`` as global and ``keep_float`` modules set to None."""
    mapping = get_default_qconfig_mapping(ENGINE)
    default = mapping.global_qconfig
    mapping.set_global(qconfig)
    for key, value in list(mapping.object_type_qconfigs.items()):
        if value is default:
            mapping.set_object_type(key, qconfig)
    for name in keep_float:
        mapping.set_module_name(name, None)
    return mapping


def fuse(model: nn.Module) -> nn.Module:
    """Fold BN into conv and fuse conv-BN-ReLU (eval mode), as FX prepare does (Jacob et al. 2018)."""
    model = copy.deepcopy(model).eval()
    with quiet():
        return fuse_fx(model, backend_config=backend_config())


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the conv/linear layers that get int8 weights, in module order (the guard's unit)."""
    return [n for n, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)]


def _batches(loader: Iterable, num_batches: int | None) -> Iterable[torch.Tensor]:
    for i, batch in enumerate(loader):
        if num_batches is not None and i >= num_batches:
            break
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def _untraceable(model: nn.Module) -> list[str]:
    """The deepest modules ``torch.fx`` cannot trace (data-dependent control flow), by name."""
    import torch.fx as fx

    failing = []
    for name, sub in model.named_modules():
        if not name or type(sub).__module__.startswith("torch.nn"):
            continue
        try:
            fx.symbolic_trace(sub)
        except Exception:  # noqa: BLE001 - fx raises many types on dynamic code
            failing.append(name)
    return [n for n in failing if not any(o.startswith(n + ".") for o in failing)]


def _pieces_as_narrow(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """``chunk``/``split`` along channels rewritten as one ``narrow`` per piece (ShuffleNet v2, CSP blocks).

    torch's FX prepare puts an observer on the tuple a ``chunk`` returns (the ``getitem`` after it
    shares its input's observer) and calibration then fails with "'tuple' object has no attribute
    'numel'". Each piece as ``x.narrow(dim, start, length)`` is the same computation on tensors
    FX observes normally. Models without such a split are returned unchanged (so artifacts of
    them rebuild as before); a model plain ``torch.fx`` cannot trace is returned unchanged too.
    """
    import operator

    import torch.fx as fx
    from torch.fx.passes.shape_prop import ShapeProp

    names = {"chunk", "split", "tensor_split"}
    try:
        gm = fx.symbolic_trace(model)
    except Exception:
        return model
    nodes = [n for n in gm.graph.nodes if (n.op == "call_method" and n.target in names)
             or (n.op == "call_function" and getattr(n.target, "__name__", "") in names)]
    nodes = [n for n in nodes if n.users and all(u.op == "call_function" and u.target is operator.getitem
                                                 and isinstance(u.args[1], int) for u in n.users)]
    if not nodes:
        return model
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    for n in nodes:
        dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
        metas = n.meta.get("tensor_meta")
        if not isinstance(dim, int) or not isinstance(metas, (tuple, list)):
            continue
        d = dim % len(metas[0].shape)
        starts = [0]
        for m in metas:
            starts.append(starts[-1] + int(m.shape[d]))
        for u in list(n.users):
            i = u.args[1] % len(metas)  # spx[-1] is the last piece
            with gm.graph.inserting_after(u):
                new = gm.graph.call_method("narrow", (n.args[0], d, starts[i], int(metas[i].shape[d])))
            u.replace_all_uses_with(new)
            gm.graph.erase_node(u)
        gm.graph.erase_node(n)
    gm.graph.lint()
    gm.recompile()
    return gm


def calibrate(model: nn.Module, calib_loader: Iterable, observer: str = "minmax", num_batches: int | None = None,
              reduce_range: bool | None = None, observer_kwargs: dict | None = None) -> nn.Module:
    """Trace, fuse and observe ``model`` on calibration batches; returns the prepared GraphModule.

    Post-training static calibration as in Krishnamoorthi 2018: activation ranges come
    from ``observer`` run over ``num_batches`` batches of ``calib_loader`` (all when None), weight
    ranges from the weights themselves. The input model is not modified.
    """
    torch.backends.quantized.engine = ENGINE
    qconfig = make_qconfig(observer, reduce_range, observer_kwargs)
    float_model = copy.deepcopy(model).cpu().eval()
    batches = iter(_batches(calib_loader, num_batches))
    first = next(batches, None)
    if first is None:
        raise SlimkitError("calibration data is empty")
    first = first.cpu()
    example = first[:1]
    float_model = _pieces_as_narrow(float_model, example)
    untraceable: list[str] = []
    try:
        with quiet():
            prepared = prepare_fx(float_model, make_qconfig_mapping(qconfig), (example,),
                                  backend_config=backend_config())
    except Exception as e:  # noqa: BLE001 - fx raises many types on dynamic code
        # data-dependent control flow in a few modules ("same" padding, an attention block): those run
        # float inside the int8 model, named in a warning and in the recipe
        untraceable = _untraceable(float_model)
        if not untraceable:
            raise SlimkitError(f"quantize: torch.fx cannot trace {type(float_model).__name__} "
                               f"({first_line(e)}); FX int8 needs a traceable forward") from None
        from torch.ao.quantization.fx.custom_config import PrepareCustomConfig

        custom = PrepareCustomConfig().set_non_traceable_module_names(untraceable)
        try:
            with quiet():
                prepared = prepare_fx(float_model, make_qconfig_mapping(qconfig), (example,),
                                      prepare_custom_config=custom, backend_config=backend_config())
        except Exception as e2:  # noqa: BLE001
            raise SlimkitError(f"quantize: torch.fx cannot trace {type(float_model).__name__} even with "
                               f"{', '.join(untraceable[:3])} left float ({first_line(e2)})") from None
        warnings.warn(f"slimkit.quantize: {', '.join(untraceable[:6])}"
                      f"{f' and {len(untraceable) - 6} more' if len(untraceable) > 6 else ''}: cannot be traced "
                      f"by torch.fx (data-dependent control flow) and stay float", stacklevel=2)
    from ..progress import Progress

    try:
        total = min(len(calib_loader), num_batches or len(calib_loader))
    except TypeError:  # a generator: its length is not known
        total = num_batches or 1
    bar = Progress(total, "int8 calibration batches")
    with torch.inference_mode():
        for i, x in enumerate(itertools.chain([first], batches)):
            if not torch.isfinite(x).all():
                raise SlimkitError(f"calibration: batch {i + 1} holds NaN/Inf; the activation ranges would be "
                                   f"meaningless")
            y = prepared(x.cpu())
            if isinstance(y, torch.Tensor) and not torch.isfinite(y).all():
                from ..train.engine import first_nonfinite

                raise SlimkitError(f"calibration: NaN/Inf on batch {i + 1}: "
                                   f"{first_nonfinite(float_model, x.cpu())}")
            bar.update()
    bar.close()
    prepared.slimkit_untraceable = untraceable
    prepared.slimkit_recipe = {"observer": observer, "observer_kwargs": dict(observer_kwargs or {}),
                               "reduce_range": default_reduce_range() if reduce_range is None else bool(reduce_range),
                               "input_shape": list(example.shape[1:])}
    return prepared


def convert(prepared: nn.Module, keep_float: Iterable[str] = (),
            float_model: nn.Module | None = None) -> "QuantizedModel":
    """Convert a calibrated model to int8 kernels, leaving the layers in ``keep_float`` in float.

    The conversion (Jacob et al. 2018) is deterministic: the same calibrated observers always
    give the same int8 weights and requantization parameters. ``prepared`` is not modified.
    ``float_model`` (the model given to :func:`calibrate`) is recorded so an artifact can
    rebuild the structure.
    """
    torch.backends.quantized.engine = ENGINE
    keep_float = list(keep_float)
    recipe = dict(prepared.slimkit_recipe, keep_float=keep_float)
    mapping = make_qconfig_mapping(make_qconfig(recipe["observer"], recipe["reduce_range"],
                                                recipe["observer_kwargs"]), keep_float)
    with quiet():
        converted = convert_fx(copy.deepcopy(prepared), qconfig_mapping=mapping, backend_config=backend_config())
    return QuantizedModel(converted, recipe, float_model)


def fake_quant(prepared: nn.Module, keep_float: Iterable[str] = ()) -> nn.Module:
    """The float simulation of :func:`convert`: every int8 tensor as quantize-dequantize in float.

    This is torch's reference representation (simulated quantization, Krishnamoorthi 2018): the
    same scales and zero points, but float kernels, so it separates kernel effects from
    quantization error.
    """
    recipe = prepared.slimkit_recipe
    mapping = make_qconfig_mapping(make_qconfig(recipe["observer"], recipe["reduce_range"],
                                                recipe["observer_kwargs"]), keep_float)
    with quiet():
        return convert_to_reference_fx(copy.deepcopy(prepared), qconfig_mapping=mapping,
                                       backend_config=backend_config())


def quantize(model: nn.Module, calib_loader: Iterable, config: QuantConfig | str | None = None,
             num_batches: int | None = None, keep_float: Iterable[str] = (), *, max_drop: float | None = None,
             val_loader: Iterable | None = None, reduce_range: bool | None = None, observer_kwargs: dict | None = None,
             log: Callable[[str], None] | None = None) -> "QuantizedModel":
    """Post-training static int8 quantization of ``model`` (Jacob et al. 2018; Krishnamoorthi 2018).

    Calibrates activation ranges with ``config.observer`` (see :data:`OBSERVERS`) on ``num_batches``
    batches of ``calib_loader``, keeps the layers named in ``config.keep_float`` in float, and
    converts the rest to int8 kernels. With ``config.max_drop`` and ``val_loader``, the accuracy
    guard (:func:`slimkit.quant.guard.guard`, partial quantization of Wu et al. 2020) additionally
    keeps the most sensitive layers in float until the validation top-1 drop is at most
    ``max_drop``; the layers kept in float are in ``result.keep_float``, the search in
    ``result.guard``.

    Args:
        model: the float model (not modified).
        calib_loader: batches (or ``(input, label)`` pairs) of unaugmented training images.
        config: a :class:`~slimkit.quant.config.QuantConfig`, or an observer name; the keyword
            arguments ``keep_float``, ``max_drop``, ``reduce_range``, ``observer_kwargs`` build one
            instead (the older form, still supported).
        num_batches: how many calibration batches (default all).
        val_loader: validation batches for the guard.
        log: where the guard reports its search.

    Returns:
        A :class:`QuantizedModel` running int8 kernels, savable as an artifact.

    Raises:
        SlimkitError: an invalid option, an unknown layer in keep_float, max_drop without val_loader.

    Example:
        >>> import torch, slimkit
        >>> m = slimkit.create_model("digits_cnn").eval()
        >>> q = quantize(m, [torch.randn(16, 1, 8, 8)], QuantConfig(observer="minmax"))
        >>> q(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    legacy = {"keep_float": tuple(keep_float), "max_drop": max_drop, "reduce_range": reduce_range,
              "observer_kwargs": dict(observer_kwargs or {})}
    if isinstance(config, QuantConfig):
        if any(v not in (None, (), {}) for v in legacy.values()):
            raise SlimkitError("quantize: give a QuantConfig or keyword options, not both")
    else:
        config = QuantConfig(observer=config or "minmax", **legacy)
    observer, keep_float, max_drop = config.observer, list(config.keep_float), config.max_drop
    reduce_range, observer_kwargs = config.reduce_range, config.observer_kwargs or None
    unknown = [n for n in keep_float if n not in dict(model.named_modules())]
    if unknown:
        raise SlimkitError(f"keep_float: no layer named {unknown} (quantizable layers: {quantizable_layers(model)})")
    prepared = calibrate(model, calib_loader, observer, num_batches, reduce_range, observer_kwargs)
    if max_drop is not None:
        if val_loader is None:
            raise SlimkitError("quantize: max_drop needs a val_loader")
        from .guard import guard

        return guard(model, prepared, val_loader, max_drop, keep_float=keep_float, log=log)
    return convert(prepared, keep_float, model)


def _config(module: "QuantizedModel") -> dict:
    return module.config


MAX_CALIBRATION_INPUT = 1 << 22  # C*H*W of the example that rebuilds an int8 model (3x1024x1024 fits)
def _check_recipe(recipe: Any, where: str) -> dict:
    from ..documents import expect, expect_keys

    expect(recipe, dict, where, ("recipe",))
    expect_keys(recipe, set(recipe), where, ("recipe",), required={"input_shape", "observer", "reduce_range",
                                                                     "observer_kwargs", "keep_float"})
    shape = recipe["input_shape"]
    if (not isinstance(shape, list) or not 1 <= len(shape) <= 4 or not all(isinstance(v, int) and v >= 1 for v in shape)
            or int(torch.tensor(shape, dtype=torch.float64).prod()) > MAX_CALIBRATION_INPUT):
        raise SlimkitError(f"{where}: field recipe.input_shape: expected a list of 1-4 positive integers of at most "
                           f"{MAX_CALIBRATION_INPUT:,} values (one input is run through the model to rebuild it)")
    observer = OBSERVERS.get(expect(recipe["observer"], str, where, ("recipe", "observer")))
    expect(recipe["reduce_range"], bool, where, ("recipe", "reduce_range"))
    check_observer_kwargs(observer, expect(recipe["observer_kwargs"], dict, where, ("recipe", "observer_kwargs")),
                          f"{where}: field recipe.observer_kwargs")
    for i, name in enumerate(expect(recipe["keep_float"], list, where, ("recipe", "keep_float"))):
        expect(name, str, where, ("recipe", "keep_float", i))
    return recipe


def _build(config: dict) -> "QuantizedModel":
    from ..artifact import check_tree
    from ..documents import expect_keys
    from ..models.registry import build_base

    where = "quantized model record"
    expect_keys(config, {"base", "float_tree", "recipe"}, where, (), required={"float_tree", "recipe"})
    base = config.get("base")
    float_model = build_base(base, where) if base else None
    if config["float_tree"] is None:
        raise SlimkitError(f"{where}: field float_tree: missing")
    float_model = _rebuild(float_model, check_tree(config["float_tree"], where, ("float_tree",)), "")
    recipe = _check_recipe(config["recipe"], where)
    # Any calibration gives the same module structure; the real int8 weights, scales and zero
    # points come from the artifact's tensors, loaded right after this build.
    example = torch.zeros(1, *recipe["input_shape"])
    prepared = calibrate(float_model, [example], recipe["observer"], reduce_range=recipe["reduce_range"],
                         observer_kwargs=recipe["observer_kwargs"])
    qmodel = convert(prepared, recipe["keep_float"], float_model)
    qmodel.recipe.update(recipe)  # keep provenance beyond the structure keys (e.g. QAT's method, epochs)
    return qmodel


class QuantizedModel(nn.Module):
    """An int8 model converted by :func:`convert`: float in, float out, int8 kernels inside.

    ``model`` is the converted GraphModule; ``recipe`` the observer, activation range and the
    layers kept in float; ``config`` also records how to build the float structure, so
    :func:`slimkit.load` rebuilds the same graph and then loads the int8 state exactly.
    """

    def __init__(self, model: nn.Module, recipe: dict, float_model: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.recipe = recipe
        base = getattr(float_model, "slimkit_base", None) if float_model is not None else None
        self.config = {"base": copy.deepcopy(base),
                       "float_tree": describe(float_model) if float_model is not None else None,
                       "recipe": recipe}
        if float_model is not None:
            self.slimkit_base = copy.deepcopy(base)
            self.slimkit_history = list(copy.deepcopy(getattr(float_model, "slimkit_history", [])))
        self._register_state_dict_hook(state_hook)
        self._register_load_state_dict_pre_hook(load_pre_hook, with_module=True)
        self.eval()

    @property
    def keep_float(self) -> list[str]:
        return list(self.recipe.get("keep_float", []))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


register_module(QuantizedModel, config=_config, build=_build)


def is_quantized_module(module: nn.Module) -> bool:
    """True for the torch.ao quantized (int8 kernel) module types."""
    return type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized"))
