"""The model registry and ``create_model(spec)``, in the manner of timm's ``create_model``.

A model spec is one of:

* a registered name (``resnet20``, ``digits_cnn``, ...), registered with :func:`register_model`;
* ``torchvision:NAME``: any torchvision classification model, built without downloading weights;
* ``path/to/file.py:fn``: a user's own builder function (called with ``num_classes`` when it
  accepts it);
* the path of a slimkit artifact (see :mod:`slimkit.artifact`), loaded as saved.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SlimkitError
from ..registry import Registry


@dataclass(frozen=True)
class ModelEntry:
    """A registered builder with the input size and class count its paper defines."""

    build: Callable[..., nn.Module]
    input_size: tuple[int, int, int]
    num_classes: int


MODELS: Registry[ModelEntry] = Registry("model")


def register_model(name: str | None = None, *, input_size: tuple[int, int, int] = (3, 224, 224),
                   num_classes: int = 1000) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a builder ``fn(num_classes=..., **kwargs) -> nn.Module`` under ``name``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS.register(name or fn.__name__)(ModelEntry(fn, tuple(input_size), num_classes))
        return fn

    return deco


def list_models() -> list[str]:
    """Names of all registered models (torchvision models are reached as ``torchvision:NAME``)."""
    return MODELS.names()


def is_artifact_path(spec: str) -> bool:
    """Whether a model spec names a slimkit artifact (a ``.safetensors`` file or a folder holding one)."""
    if spec.endswith((".safetensors", ".slim")):
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


def _from_file(spec: str, num_classes: int | None, **kwargs) -> nn.Module:
    path, _, fn_name = spec.rpartition(":")
    if not os.path.isfile(path):
        raise SlimkitError(f"model file not found: {path}")
    mod_name = f"slimkit_user_{abs(hash(os.path.abspath(path)))}"
    mod_spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[mod_name] = module  # dataclasses and pickling look modules up by name
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:
        raise SlimkitError(f"{path}: importing the model file failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise SlimkitError(f"{path} has no function {fn_name!r}")
    params = inspect.signature(fn).parameters
    if num_classes is not None:
        if "num_classes" not in params:
            raise SlimkitError(f"{spec} does not accept num_classes")
        kwargs["num_classes"] = num_classes
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise SlimkitError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _normalise_spec(spec: str) -> str:
    """File specs are stored with an absolute path so artifacts load from any directory."""
    if not spec.startswith("torchvision:") and ":" in spec and spec.rpartition(":")[0].endswith(".py"):
        path, _, fn = spec.rpartition(":")
        return f"{os.path.abspath(path)}:{fn}"
    return spec


def create_model(spec: str, num_classes: int | None = None, weights: str | None = None, **kwargs) -> nn.Module:
    """Build a model from a spec string and optionally load weights (see module docstring).

    The built model remembers its spec (``model.slimkit_base``) so :func:`slimkit.save` can
    write an artifact that rebuilds it, and ``weights`` accepts anything :func:`load_weights`
    does.
    """
    if not isinstance(spec, str) or not spec:
        raise SlimkitError(f"model spec must be a non-empty string, got {spec!r}")
    if is_artifact_path(spec):
        from ..artifact import load

        model = load(spec)
    else:
        spec = _normalise_spec(spec)
        if spec.startswith("torchvision:"):
            model = _torchvision(spec.split(":", 1)[1], num_classes, **kwargs)
        elif ":" in spec and spec.rpartition(":")[0].endswith(".py"):
            model = _from_file(spec, num_classes, **kwargs)
        else:
            entry = MODELS.get(spec)
            model = entry.build(num_classes=num_classes or entry.num_classes, **kwargs)
        model.slimkit_base = {"spec": spec, "num_classes": num_classes, "kwargs": kwargs}
    if weights:
        load_weights(model, weights)
    return model


def default_input_size(spec: str) -> tuple[int, int, int]:
    """The (C, H, W) input a model spec expects: its registered size, else ImageNet's 224x224."""
    if spec in MODELS:
        return MODELS.get(spec).input_size
    if spec == "torchvision:inception_v3":
        return (3, 299, 299)
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
            raise SlimkitError(f"{path}: not a readable safetensors file ({e})") from e
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
    wrong = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if wrong:
        raise SlimkitError(f"{path}: shape mismatch: {_names(wrong, 3)}")
    model.load_state_dict(sd, strict=False)
    return model
