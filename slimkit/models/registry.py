"""The model registry and ``create_model(spec)``, in the manner of timm's ``create_model``.

A model spec is one of:

* a registered name (``resnet20``, ``digits_cnn``, ...), registered with :func:`register_model`;
* ``torchvision:NAME``: any torchvision classification model, built without downloading weights;
* ``path/to/file.py:fn``: a user's own builder function (called with ``num_classes`` when it
  accepts it). Typed by the user it runs; read from a file (an artifact's base, a recipe) it
  runs only when that file is trusted (:mod:`slimkit.trust`);
* the path of a slimkit artifact (see :mod:`slimkit.artifact`), loaded as saved.

Families reached by a prefix (``torchvision:``) are registered in :data:`PREFIXES`.
"""

from __future__ import annotations

import collections
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..errors import SlimkitError, first_line
from ..registry import Registry


@dataclass(frozen=True)
class ModelEntry:
    """A registered builder with its facts: the input size and class count its paper defines, and the paper."""

    build: Callable[..., nn.Module]
    input_size: tuple[int, int, int]
    num_classes: int
    paper: str = ""


MODELS: Registry[ModelEntry] = Registry("model")


def register_model(name: str | None = None, *, input_size: tuple[int, int, int] = (3, 224, 224),
                   num_classes: int = 1000,
                   paper: str | None = None) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a builder ``fn(num_classes=..., **kwargs) -> nn.Module`` under ``name``.

    Args:
        name: the model spec (default the function's name).
        input_size: the (C, H, W) its paper uses.
        num_classes: the paper's classifier width, the default.
        paper: the citation (default the first line of the builder's docstring).
    """

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        cite = paper if paper is not None else (fn.__doc__ or "").strip().split("\n")[0]
        MODELS.register(name or fn.__name__)(ModelEntry(fn, tuple(input_size), num_classes, cite))
        return fn

    return deco


def list_models() -> list[str]:
    """Names of all registered models (torchvision models are reached as ``torchvision:NAME``)."""
    return MODELS.names()


def is_artifact_path(spec: str) -> bool:
    """Whether a model spec names a slimkit artifact (a ``.safetensors`` or packed ``.slimpack`` file, or a folder
    holding ``model.safetensors``)."""
    if spec.endswith((".safetensors", ".slim", ".slimpack")):
        return True
    return os.path.isdir(spec) and os.path.exists(os.path.join(spec, "model.safetensors"))


def _torchvision(name: str, num_classes: int | None, **kwargs) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise SlimkitError(f"unknown torchvision model {name!r} (classification models: {', '.join(sorted(known))})")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if name in ("googlenet", "inception_v3"):
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", True)
    return torchvision.models.get_model(name, weights=None, **kwargs)


def _torchvision_signature(name: str) -> Callable[..., nn.Module]:
    import torchvision

    try:
        return torchvision.models.get_model_builder(name)
    except ValueError:
        return _torchvision


@dataclass(frozen=True)
class PrefixEntry:
    """A family of models reached as ``PREFIX:NAME`` (``torchvision:resnet18``): how to build one, and its signature."""

    build: Callable[..., nn.Module]  # (name, num_classes, **kwargs) -> model
    signature: Callable[[str], Callable[..., nn.Module]]  # name -> the function whose parameters the kwargs must fit


def _timm(name: str, num_classes: int | None, **kwargs) -> nn.Module:
    """A timm model's structure (``pretrained=False``: timm never downloads anything then)."""
    try:
        import timm
    except ImportError:
        raise SlimkitError("timm:NAME models need timm: pip install 'slimkit[timm]'") from None
    if not timm.is_model(name):
        close = timm.list_models(f"*{name[:6]}*")[:12]
        raise SlimkitError(f"unknown timm model {name!r}" + (f" (similar: {', '.join(close)})" if close else ""))
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return timm.create_model(name, pretrained=False, **kwargs)


def _timm_signature(name: str) -> Callable[..., nn.Module]:
    import timm

    return timm.models.model_entrypoint(name) if timm.is_model(name) else _timm


PREFIXES: Registry[PrefixEntry] = Registry("model family prefix")
PREFIXES.register("torchvision")(PrefixEntry(_torchvision, _torchvision_signature))
PREFIXES.register("timm")(PrefixEntry(_timm, _timm_signature))


def _user_module_name(path: str) -> str:
    """A module name for a user's model file that is the same in every process.

    The classes defined in the file are recorded in artifacts by ``module.qualname``, so the
    name must not depend on anything per-process (it once held Python's salted ``hash()``, and
    an artifact of a pruned user model never loaded again). It is the file's name, made an
    identifier; a different file of the same name in the same process gets a numbered suffix.
    """
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0]) or "model"
    base, n = f"slimkit_user_{stem}", 1
    name = base
    while name in sys.modules and os.path.realpath(getattr(sys.modules[name], "__file__", "") or "") != path:
        n += 1
        name = f"{base}_{n}"
    return name


def _import_file(path: str) -> ModuleType:
    path = os.path.realpath(path)
    name = _user_module_name(path)
    if name in sys.modules:  # the same file again in this process: same classes, code not run twice
        return sys.modules[name]
    mod_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise SlimkitError(f"{path}: importing the model file failed: {type(e).__name__}: {e}") from e
    return module


def _from_file(spec: str, num_classes: int | None, **kwargs) -> nn.Module:
    path, _, fn_name = spec.rpartition(":")
    if not os.path.isfile(path):
        raise SlimkitError(f"model file not found: {path}")
    module = _import_file(path)
    fn = getattr(module, fn_name, None)
    # a builder is a function or class defined in that file: not one it imported (os.makedirs), not a private one
    own = (inspect.isfunction(fn) or inspect.isclass(fn)) and getattr(fn, "__module__", None) == module.__name__
    if fn is None or not own or fn_name.startswith("_"):
        raise SlimkitError(f"{path} defines no public builder function {fn_name!r}"
                           + (" (it is imported there from elsewhere)" if fn is not None and not own else ""))
    params = inspect.signature(fn).parameters
    if num_classes is not None:
        if "num_classes" not in params:
            raise SlimkitError(f"{spec} does not accept num_classes")
        kwargs["num_classes"] = num_classes
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise SlimkitError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def is_file_spec(spec: str) -> bool:
    """Whether a model spec names a builder function in a Python file (``PATH.py:fn``), i.e. code."""
    return ":" in spec and spec.rpartition(":")[0].endswith(".py") and spec.split(":", 1)[0] not in PREFIXES


def _normalise_spec(spec: str) -> str:
    """File specs are stored with an absolute path so artifacts load from any directory."""
    if is_file_spec(spec):
        path, _, fn = spec.rpartition(":")
        return f"{os.path.abspath(path)}:{fn}"
    return spec


def _builder(spec: str) -> tuple[Callable[..., nn.Module], Callable[..., nn.Module]]:
    """(function to call with ``num_classes`` and kwargs, function whose signature the kwargs must fit)."""
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in PREFIXES:
        entry = PREFIXES.get(prefix)
        return (lambda num_classes=None, **kw: entry.build(rest, num_classes, **kw)), entry.signature(rest)
    entry = MODELS.get(spec)
    return (lambda num_classes=None, **kw: entry.build(num_classes=num_classes or entry.num_classes, **kw)), entry.build


def create_model(spec: str, num_classes: int | None = None, weights: str | None = None, *,
                 trust_code: str | os.PathLike | list[str] | None = None, **kwargs) -> nn.Module:
    """Build a model from a spec string and optionally load weights (timm's ``create_model`` verb).

    The built model remembers its spec (``model.slimkit_base``) so :func:`slimkit.save` can write
    an artifact that rebuilds it.

    Args:
        spec: a registered name (``resnet20``), ``torchvision:NAME``, ``PATH.py:fn`` (your own
            builder; you name the file, so it runs) or an artifact path (loaded as saved).
        num_classes: classifier width; default the registered model's own. Ignored for artifacts.
        weights: a state_dict, checkpoint or safetensors file (see :func:`load_weights`).
        trust_code: for an artifact whose base model is built by a Python file, that file (see
            :mod:`slimkit.trust`); nothing a file names runs without it.
        **kwargs: the builder's own arguments.

    Returns:
        The model (training mode as built; an artifact in eval mode).

    Raises:
        SlimkitError: unknown name, missing file, weights that do not fit, untrusted code.

    Example:
        >>> import slimkit
        >>> m = slimkit.create_model("resnet20", num_classes=10)   # He et al., CVPR 2016
        >>> m.slimkit_base["spec"], sum(p.numel() for p in m.parameters())
        ('resnet20', 269722)
    """
    from ..trust import trust_code as trusting

    if not isinstance(spec, str) or not spec:
        raise SlimkitError(f"model spec must be a non-empty string, got {spec!r}")
    with trusting(trust_code):
        if is_artifact_path(spec):
            from ..artifact import load

            model = load(spec)
        else:
            spec = _normalise_spec(spec)
            if is_file_spec(spec):
                model = _from_file(spec, num_classes, **kwargs)
            else:
                build, _ = _builder(spec)
                model = build(num_classes=num_classes, **kwargs)
            model.slimkit_base = {"spec": spec, "num_classes": num_classes, "kwargs": kwargs}
        if weights:
            load_weights(model, weights)
    return model


def document_spec(spec: str, where: str) -> str:
    """A model spec read from a file (a recipe's ``model`` or teacher): a ``PATH.py:fn`` spec only if trusted.

    Returns the spec to build: unchanged, or with the trusted file's path (:mod:`slimkit.trust`).
    """
    from ..trust import refuse, trusted_file

    if not is_file_spec(spec):
        return spec
    recorded, _, fn = spec.rpartition(":")
    trusted = trusted_file(recorded)
    if trusted is None:
        raise refuse(recorded, fn, where)
    return f"{trusted}:{fn}"


BASE_KEYS = {"spec", "num_classes", "kwargs"}
# builder arguments a file may not set: weights would download or read another file (timm's
# checkpoint_path, pretrained_cfg*), num_classes has its own field
_RESERVED_KWARGS = {"weights", "pretrained", "progress", "num_classes", "pretrained_cfg", "checkpoint_path",
                    "pretrained_cfg_overlay", "cache_dir", "pretrained_strict"}


def check_base(base: Any, where: str, path: tuple = ("base",)) -> dict:
    """Validate a base-model record read from a file: ``{spec, num_classes, kwargs}`` with JSON-flat kwargs."""
    from ..documents import expect, expect_flat, expect_keys, field_path

    expect(base, dict, where, path)
    expect_keys(base, BASE_KEYS, where, path, required={"spec"})
    spec = expect(base["spec"], str, where, path + ("spec",))
    if not spec or len(spec) > 4096:
        raise SlimkitError(f"{where}: field {field_path(path + ('spec',))}: expected a model spec of 1-4096 characters")
    nc = expect(base.get("num_classes"), (int, type(None)), where, path + ("num_classes",))
    if nc is not None and not 1 <= nc <= 1_000_000:
        raise SlimkitError(f"{where}: field {field_path(path + ('num_classes',))}: {nc} is not a class count")
    kwargs = expect(base.get("kwargs") or {}, dict, where, path + ("kwargs",))
    for k, v in kwargs.items():
        if k in _RESERVED_KWARGS or not k.isidentifier():
            raise SlimkitError(f"{where}: field {field_path(path + ('kwargs', k))}: a file may not set {k!r}")
        expect_flat(v, where, path + ("kwargs", k))
    return base


def build_base(base: Any, where: str, path: tuple = ("base",)) -> nn.Module:
    """Build the base model recorded in a file (an artifact header, a quantized model's record).

    Unlike :func:`create_model`, the spec came from a file, not from the user: it must be a
    registered name or a registered family (``torchvision:NAME``); a ``PATH.py:fn`` spec runs
    only if that file is trusted (:mod:`slimkit.trust`), and then the trusted file runs. The
    keyword arguments must fit the builder's signature. Every failure is one SlimkitError
    naming ``where`` and the field.
    """
    from ..documents import field_path
    from ..trust import refuse, trusted_file

    base = check_base(base, where, path)
    spec, num_classes, kwargs = base["spec"], base.get("num_classes"), dict(base.get("kwargs") or {})
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    here = field_path(path + ("spec",))
    if is_artifact_path(spec):
        raise SlimkitError(f"{where}: field {here}: names another artifact ({spec}); a base model is a registered "
                           "name, a torchvision:NAME or a trusted PATH.py:fn")
    if is_file_spec(spec):
        recorded, _, fn = spec.rpartition(":")
        if not fn.isidentifier():
            raise SlimkitError(f"{where}: field {here}: {fn!r} is not a function name")
        trusted = trusted_file(recorded)
        if trusted is None:
            raise refuse(recorded, fn, where)
        spec, call = f"{trusted}:{fn}", None
    else:
        try:
            call, signature_of = _builder(spec)
        except SlimkitError as e:
            raise SlimkitError(f"{where}: field {here}: {e}") from None
        params = inspect.signature(signature_of).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            unknown = sorted(set(kwargs) - set(params))
            if unknown:
                raise SlimkitError(f"{where}: field {field_path(path + ('kwargs',))}: {spec} takes no argument "
                                   f"{', '.join(map(repr, unknown))} (it takes: "
                                   f"{', '.join(n for n in params if n != 'num_classes') or 'none'})")
    from ..allowance import charge

    def make() -> nn.Module:
        return _from_file(spec, num_classes, **kwargs) if call is None else call(num_classes=num_classes, **kwargs)

    try:
        charge(f"field {field_path(path)} ({spec})", make, base=True)
        model = make()
    except SlimkitError:
        raise
    except Exception as e:  # the builder refused these arguments: the file's fault, said in one line
        raise SlimkitError(f"{where}: field {field_path(path)}: building {spec} failed: {type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    if not isinstance(model, nn.Module):
        raise SlimkitError(f"{where}: field {here}: {spec} built a {type(model).__name__}, not a torch.nn.Module")
    model.slimkit_base = {"spec": spec, "num_classes": num_classes, "kwargs": dict(base.get("kwargs") or {})}
    return model


def default_input_size(spec: str) -> tuple[int, int, int]:
    """The (C, H, W) input a model spec expects: its registered size, else ImageNet's 224x224."""
    if spec in MODELS:
        return MODELS.get(spec).input_size
    if spec == "torchvision:inception_v3":
        return (3, 299, 299)
    if spec.startswith("timm:"):  # the size timm's own config records for the model
        try:
            import timm

            size = timm.models.get_pretrained_cfg(spec[5:]).input_size
            if len(size) == 3 and all(isinstance(d, int) and d > 0 for d in size):
                return tuple(size)
        except Exception:  # noqa: BLE001 - no timm, no config: the ImageNet default below
            pass
    return (3, 224, 224)


def model_input_size(model: nn.Module, spec: str | None = None) -> tuple[int, int, int]:
    """The (C, H, W) input of a built model: what its artifact recorded, else its base spec's default."""
    meta = getattr(model, "slimkit_meta", None) or {}
    if meta.get("input_size"):
        return tuple(meta["input_size"])
    base = getattr(model, "slimkit_base", None) or {}
    return default_input_size(base.get("spec") or spec or "")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read tensors from a safetensors file or a torch checkpoint, never unpickling code.

    Checkpoint dicts that wrap the weights (``state_dict``, ``model``, ``model_state_dict``)
    are unwrapped and a ``module.`` prefix left by DataParallel is stripped.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise SlimkitError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            sd = load_file(path)
        except Exception as e:
            raise SlimkitError(f"{path}: not a readable safetensors file ({first_line(e)})") from e
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SlimkitError(f"{path}: not a loadable weights file (safe loading refused or failed: {first})") from e
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SlimkitError(f"{path}: does not hold a state_dict (a dict of tensors)")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _names(keys: list[str], most: int = 6) -> str:
    shown = ", ".join(keys[:most])
    return shown + (f" and {len(keys) - most} more" if len(keys) > most else "")


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a state_dict or checkpoint into ``model``; mismatches are reported by name and shape."""
    sd = read_state_dict(path)
    own = model.state_dict()
    # Checkpoints from before PyTorch 0.4.1 have no BN step counters; torch fills them in.
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_names(unexpected)}")
        raise SlimkitError(f"{path} does not fit the model ({'; '.join(parts)})")
    wrong = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in own
             if k in sd and sd[k].shape != own[k].shape]
    if wrong:
        raise SlimkitError(f"{path}: shape mismatch: {_names(wrong, 3)}")
    if getattr(sd, "_metadata", None) is None:  # a safetensors file or a plain dict: the model's own versions
        sd = collections.OrderedDict(sd)
        sd._metadata = getattr(own, "_metadata", None)
    model.load_state_dict(sd, strict=False)
    return model
