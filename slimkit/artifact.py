"""Artifacts: a compressed model in one file that loads without unpickling code.

Compression changes module shapes (a pruned conv has fewer filters, a factorised layer becomes
two), so a state_dict alone cannot rebuild the model. An artifact is a single safetensors file:

* the tensors are the model's state_dict, stored as safetensors (no pickle, so loading a file
  from someone else cannot run code);
* the safetensors header's metadata carries one JSON document with the *base* model spec (how
  to build the original network, e.g. ``resnet56``), the *module tree* (for every submodule its
  type and, for layers slimkit knows how to build, its constructor arguments) and the
  *provenance* (every transformation applied with its parameters and the metrics after it).

Loading builds the base model from its spec, then walks the saved tree: wherever a submodule's
saved type or constructor arguments differ from the base model's, it is rebuilt from the saved
record; finally the tensors are loaded strictly, so outputs are reproduced exactly. Types are
looked up only in ``torch.nn`` and in the :data:`MODULES` registry, never imported by name from
the file. A compression method that introduces its own module type registers it once with
:func:`register_module`.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import SlimkitError
from .registry import Registry

FORMAT = "slimkit.artifact"
VERSION = 1
_SKIP_ARGS = {"self", "device", "dtype", "args", "kwargs"}


@dataclass(frozen=True)
class ModuleSerializer:
    """How to describe a module type as JSON (``config``) and build it back (``build``)."""

    cls: type
    config: Callable[[nn.Module], dict]
    build: Callable[[dict], nn.Module]


MODULES: Registry[ModuleSerializer] = Registry("module type")


def _type_name(cls: type) -> str:
    if cls.__module__.startswith("torch.nn.modules") and getattr(nn, cls.__name__, None) is cls:
        return f"torch.nn.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return list(value)
    raise TypeError(type(value).__name__)


def _init_config(module: nn.Module) -> dict:
    """Constructor arguments read back from same-named attributes (works for torch.nn layers)."""
    config = {}
    for name, p in inspect.signature(type(module).__init__).parameters.items():
        if name in _SKIP_ARGS or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name == "bias" and p.default is True:  # conv/linear store the tensor, the argument is a flag
            config[name] = module.bias is not None
        elif hasattr(module, name):
            config[name] = _jsonable(getattr(module, name))
        elif p.default is inspect.Parameter.empty:
            raise TypeError(f"argument {name!r} is not an attribute")
    return config


def _init_build(cls: type) -> Callable[[dict], nn.Module]:
    def build(config: dict) -> nn.Module:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})

    return build


def register_module(cls: type | None = None, *, config: Callable[[nn.Module], dict] | None = None,
                    build: Callable[[dict], nn.Module] | None = None):
    """Register a module type so artifacts can rebuild it; usable as a plain class decorator.

    By default the constructor arguments are read back from same-named attributes, as torch's
    own layers store them; pass ``config``/``build`` for a type that stores them differently.
    """

    def deco(c: type) -> type:
        MODULES.register(_type_name(c))(ModuleSerializer(c, config or _init_config, build or _init_build(c)))
        return c

    return deco(cls) if cls is not None else deco


def _serializer(type_name: str) -> ModuleSerializer | None:
    if type_name not in MODULES and type_name.startswith("slimkit."):
        # the compression packages register their module types when imported (the pruned shortcut, int8
        # layers ...): import that fixed list, so an artifact loads without the caller importing them first
        from .pipeline import STAGE_MODULES

        for package in STAGE_MODULES:
            importlib.import_module(package)
    if type_name in MODULES:
        return MODULES.get(type_name)
    if type_name.startswith("torch.nn."):
        cls = getattr(nn, type_name[len("torch.nn."):], None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return ModuleSerializer(cls, _init_config, _init_build(cls))
    return None


def describe(module: nn.Module) -> dict:
    """The JSON tree of a module: type, constructor config (when buildable) and children."""
    node: dict[str, Any] = {"type": _type_name(type(module))}
    ser = _serializer(node["type"])
    if ser is not None:
        try:
            node["config"] = ser.config(module)
        except TypeError:
            pass  # a subclass with its own arguments: rebuilt only from the base model
    children = {name: describe(child) for name, child in module.named_children()}
    if children:
        node["children"] = children
    return node


def _rebuild(existing: nn.Module | None, node: dict, path: str) -> nn.Module:
    same_type = existing is not None and _type_name(type(existing)) == node["type"]
    if same_type and "config" in node:
        same_type = describe_config(existing) == node["config"]
    if same_type:
        module = existing
    else:
        ser = _serializer(node["type"])
        if ser is None or "config" not in node:
            where = path or "<root>"
            raise SlimkitError(f"cannot rebuild module '{where}' of type {node['type']}: it differs from the base "
                               f"model and is not registered with slimkit.artifact.register_module")
        try:
            module = ser.build(node["config"])
        except Exception as e:
            raise SlimkitError(f"cannot rebuild module '{path}' ({node['type']}) from {node['config']}: {e}") from e
    wanted = node.get("children", {})
    for name in [n for n in module._modules if n not in wanted]:
        del module._modules[name]
    for name, child_node in wanted.items():
        child = module._modules.get(name)
        new = _rebuild(child, child_node, f"{path}.{name}" if path else name)
        if new is not child:
            module._modules[name] = new
    return module


def describe_config(module: nn.Module) -> dict | None:
    ser = _serializer(_type_name(type(module)))
    try:
        return ser.config(module) if ser else None
    except TypeError:
        return None


def artifact_file(path: str | os.PathLike) -> str:
    """The file of an artifact given as the file itself or as an output folder holding ``model.safetensors``."""
    path = str(path)
    return os.path.join(path, "model.safetensors") if os.path.isdir(path) else path


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write a text file so a crash never leaves half of it behind."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def history(model: nn.Module) -> list[dict]:
    """The provenance list of a model: one record per transformation applied since its base."""
    if not hasattr(model, "slimkit_history"):
        model.slimkit_history = []
    return model.slimkit_history


def save(model: nn.Module, path: str | os.PathLike, meta: dict | None = None) -> str:
    """Write ``model`` as a slimkit artifact (see the module docstring) atomically to ``path``.

    ``meta`` is stored beside the provenance (e.g. dataset spec, input size, metrics). The base
    spec comes from ``model.slimkit_base``, set by :func:`slimkit.create_model`; a model without
    one can still be saved when every module in it is a registered or ``torch.nn`` type.
    """
    from safetensors.torch import save_file

    path = str(path)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "base": getattr(model, "slimkit_base", None),
        "modules": describe(model),
        "history": history(model),
        "meta": meta or {},
    }
    try:
        text = json.dumps(header)
    except TypeError as e:
        raise SlimkitError(f"artifact metadata for {path} is not JSON-serialisable: {e}") from e
    tensors, seen = {}, {}
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            raise SlimkitError(f"cannot save {path}: state entry {name!r} is a {type(t).__name__}, not a tensor")
        key = (t.data_ptr(), t.shape, t.dtype) if t.numel() else None
        # safetensors refuses tensors that share memory; tied weights are stored once per name
        tensors[name] = t.detach().clone().contiguous() if key in seen else t.detach().contiguous()
        seen[key] = name
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"slimkit": text}))
    return path


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of an artifact without reading its tensors."""
    from safetensors import safe_open

    path = artifact_file(path)
    if not os.path.isfile(path):
        raise SlimkitError(f"artifact not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            text = (f.metadata() or {}).get("slimkit")
    except Exception as e:
        raise SlimkitError(f"{path}: not a safetensors file ({e})") from e
    if not text:
        raise SlimkitError(f"{path}: a safetensors file without slimkit metadata (use it as --weights instead)")
    header = json.loads(text)
    if header.get("format") != FORMAT or header.get("version", 0) > VERSION:
        raise SlimkitError(f"{path}: unsupported artifact format {header.get('format')} v{header.get('version')}")
    return header


def load(path: str | os.PathLike) -> nn.Module:
    """Rebuild the model saved by :func:`save`; its outputs equal the saved model's exactly."""
    from safetensors.torch import load_file

    from .models import create_model

    path = artifact_file(path)
    header = read_header(path)
    base = header.get("base")
    model = None
    if base:
        model = create_model(base["spec"], num_classes=base.get("num_classes"), **base.get("kwargs", {}))
    model = _rebuild(model, header["modules"], "")
    state = load_file(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise SlimkitError(f"{path}: tensors do not fit the rebuilt model (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")
    wrong = [k for k in own if own[k].shape != state[k].shape]
    if wrong:
        raise SlimkitError(f"{path}: shape mismatch for {wrong[:5]}")
    model.load_state_dict(state)
    model.slimkit_base = copy.deepcopy(base)
    model.slimkit_history = header.get("history", [])
    model.slimkit_meta = header.get("meta", {})
    model.eval()
    return model
