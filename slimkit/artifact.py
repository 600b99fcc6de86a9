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

import collections
import copy
import errno
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

from .allowance import allowance_for, charge, refund
from .artifact_header import FORMAT, VERSION, check_header, check_meta, check_tree  # noqa: F401  (public here too)
from .errors import SlimkitError
from .registry import Registry

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
        if isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__ in TORCH_NN_FAMILIES:
            return ModuleSerializer(cls, _init_config, _init_build(cls))
    return None


# torch.nn layers an artifact may build from JSON: CNN building blocks whose constructor cost is their
# size. Not transformers or RNNs (a num_layers from a file would build that many layers) nor embeddings.
TORCH_NN_FAMILIES = frozenset(f"torch.nn.modules.{m}" for m in (
    "module", "container", "conv", "linear", "batchnorm", "normalization", "instancenorm", "activation", "pooling",
    "dropout", "flatten", "padding", "pixelshuffle", "upsampling", "channelshuffle", "distance"))


def describe(module: nn.Module) -> dict:
    """The JSON tree of a module: type, constructor config (when buildable) and children."""
    node: dict[str, Any] = {"type": _type_name(type(module))}
    ser = _serializer(node["type"])
    if ser is not None:
        try:
            node["config"] = ser.config(module)
        except TypeError:
            pass  # a subclass with its own arguments: rebuilt only from the base model
    from .prune.trace import same_as_base

    if same_as_base(module):  # timm's BatchNormAct2d & co: rebuilt from the base model, then resized
        node["resized"] = {k: int(getattr(module, k)) for k in _SIZE_ATTRS if hasattr(module, k)}
    children = {name: describe(child) for name, child in module.named_children()}
    if children:
        node["children"] = children
    return node


# the width attributes of the layers pruning resizes, and the tensors that follow them
_SIZE_ATTRS = ("num_features", "in_features", "out_features", "in_channels", "out_channels", "groups")


def _resize(module: nn.Module, resized: Any, path: str) -> None:
    """Give a base-model layer the (pruned) widths ``resized``; the file's tensors then fill it.

    Only shrinking is accepted (pruning never widens a layer), so a file cannot make the loader
    allocate more than the base model already holds.
    """
    where = path or "<root>"
    if not isinstance(resized, dict) or any(k not in _SIZE_ATTRS or not hasattr(module, k) for k in resized):
        raise SlimkitError(f"module '{where}': field resized: expected widths among {list(_SIZE_ATTRS)}")
    for k, v in resized.items():
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= getattr(module, k):
            raise SlimkitError(f"module '{where}': field resized.{k}: {v!r} is not a width in "
                               f"1..{getattr(module, k)}")
    new = {k: resized.get(k, getattr(module, k)) for k in _SIZE_ATTRS if hasattr(module, k)}
    if new.get("groups", 1) < 1 or any(new[k] % new.get("groups", 1) for k in ("in_channels", "out_channels")
                                        if k in new):
        raise SlimkitError(f"module '{where}': field resized: widths {new} are not divisible by groups")
    if "num_features" in new:
        shapes = {t: (new["num_features"],) for t in ("weight", "bias", "running_mean", "running_var")}
    elif "in_features" in new:
        shapes = {"weight": (new["out_features"], new["in_features"]), "bias": (new["out_features"],)}
    else:
        k = tuple(module.weight.shape[2:])
        shapes = {"weight": (new["out_channels"], new["in_channels"] // new["groups"], *k),
                  "bias": (new["out_channels"],)}
    for name, shape in shapes.items():
        for store in (module._parameters, module._buffers):
            t = store.get(name)
            if t is not None and tuple(t.shape) != shape:
                fresh = torch.empty(shape, dtype=t.dtype)
                store[name] = nn.Parameter(fresh, requires_grad=t.requires_grad) if isinstance(
                    t, nn.Parameter) else fresh
    for k, v in new.items():
        setattr(module, k, v)


def _same_type_name(a: str, b: str) -> bool:
    """Type names are equal; a user file's module may carry a process-local suffix (slimkit_user_nets_2)."""
    import re

    def canonical(name: str) -> str:
        return re.sub(r"^(slimkit_user_\w+?)_\d+\.", r"\1.", name)

    return a == b or canonical(a) == canonical(b)


def _rebuild(existing: nn.Module | None, node: dict, path: str, charged: bool = False) -> nn.Module:
    """The module ``node`` describes, reusing ``existing`` where it already is that module.

    ``charged``: ``existing`` was made by a build charged to the allowance (a rebuilt parent,
    :mod:`slimkit.allowance`), so
    replacing it gives its values back instead of counting them twice.
    """
    same_type = existing is not None and _same_type_name(_type_name(type(existing)), node["type"])
    if same_type and "config" in node:
        same_type = describe_config(existing) == node["config"]
    built = False
    if same_type:
        module = existing
    else:
        built = True
        ser = _serializer(node["type"])
        if ser is None or "config" not in node:
            where = path or "<root>"
            raise SlimkitError(f"cannot rebuild module '{where}' of type {node['type']}: it differs from the base "
                               f"model and is not registered with slimkit.artifact.register_module")
        charge(f"module '{path or '<root>'}' ({node['type']})", lambda: ser.build(node["config"]))
        try:
            module = ser.build(node["config"])
        except Exception as e:  # noqa: BLE001 - a config the type refuses is the file's fault
            config = json.dumps(node["config"])
            config = config if len(config) <= 200 else config[:200] + "..."
            raise SlimkitError(f"cannot rebuild module '{path or '<root>'}' ({node['type']}) from {config}: "
                               f"{_first_line(e)}") from None
        if not isinstance(module, nn.Module):
            raise SlimkitError(f"cannot rebuild module '{path or '<root>'}': {node['type']} built a "
                               f"{type(module).__name__}")
    if same_type and "resized" in node:
        _resize(module, node["resized"], path)
    wanted = node.get("children", {})
    for name in [n for n in module._modules if n not in wanted]:
        del module._modules[name]
    for name, child_node in wanted.items():
        child = module._modules.get(name)
        new = _rebuild(child, child_node, f"{path}.{name}" if path else name, charged or built)
        if new is not child:
            if child is not None and (charged or built):
                refund(child)
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
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    A full disk, a read-only or unwritable folder becomes one :class:`SlimkitError` naming the
    path and the reason; the temporary file is removed, so nothing partial is left either way.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
        os.close(fd)
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None:
            raise SlimkitError(f"{path}: cannot write ({os.strerror(e.errno)}); nothing was written") from None
        # writers in C++/Rust (torch.save, safetensors) report the OS error only in their message
        known = [os.strerror(n) for n in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EFBIG)]
        reason = next((k for k in known if k in str(e)), None)
        if reason and isinstance(e, Exception):
            raise SlimkitError(f"{path}: cannot write ({reason}); nothing was written") from None
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

    Args:
        model: the model (any state: pruned, quantized, transformed).
        path: the file to write (a temporary file beside it is renamed into place).
        meta: JSON data to keep with it.

    Returns:
        ``path`` as a string.

    Raises:
        SlimkitError: ``meta`` is not JSON, or a state entry is not a tensor.

    Example:
        >>> import os, tempfile, slimkit
        >>> p = save(slimkit.create_model("digits_cnn"), os.path.join(tempfile.mkdtemp(), "m.safetensors"),
        ...          meta={"note": "untrained"})
        >>> read_header(p)["meta"]
        {'note': 'untrained'}
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def read_header(path: str | os.PathLike) -> dict:
    """The validated JSON header of an artifact, without reading its tensors.

    Raises:
        SlimkitError: the file is absent, not safetensors, has no slimkit metadata, or its
            metadata breaks the schema or the size limits (:mod:`slimkit.documents`).
    """
    from safetensors import safe_open

    from .documents import parse_json

    path = artifact_file(path)
    if not os.path.isfile(path):
        raise SlimkitError(f"artifact not found: {path}")
    from .sparse.pack import is_packed

    if is_packed(path):
        from .sparse.pack import read_header as read_packed_header

        return read_packed_header(path)[1]
    try:
        with safe_open(path, framework="pt") as f:
            text = (f.metadata() or {}).get("slimkit")
    except Exception as e:  # noqa: BLE001 - whatever safetensors says, the file is not one
        raise SlimkitError(f"{path}: not a safetensors file ({_first_line(e)})") from None
    if not text:
        raise SlimkitError(f"{path}: a safetensors file without slimkit metadata (use it as --weights instead)")
    return check_header(parse_json(text, f"{path}: header"), path)


def load(path: str | os.PathLike, *, trust_code: str | os.PathLike | list[str] | None = None) -> nn.Module:
    """Rebuild the model saved by :func:`save`; its outputs equal the saved model's exactly.

    Nothing in the file is executed: the header is validated first, module types come only
    from ``torch.nn`` and the :data:`MODULES` registry, and a base model built by a Python
    file runs only if that file is trusted (:mod:`slimkit.trust`).

    Args:
        path: the artifact, or a folder holding ``model.safetensors``.
        trust_code: the ``.py`` file(s) that may build the base model (``--trust-code``).

    Returns:
        The model in eval mode, with ``slimkit_base``, ``slimkit_history`` and ``slimkit_meta``.

    Raises:
        SlimkitError: one line naming the file (and the field or module) for any problem.

    Example:
        >>> import os, tempfile, torch, slimkit
        >>> m = slimkit.create_model("digits_cnn").eval()
        >>> p = slimkit.save(m, os.path.join(tempfile.mkdtemp(), "m.safetensors"))
        >>> x = torch.randn(2, 1, 8, 8)
        >>> torch.equal(slimkit.load(p)(x), m(x))
        True
    """
    from .trust import trust_code as trusting

    path = artifact_file(path)
    with trusting(trust_code):
        try:
            return _load(path)
        except SlimkitError as e:
            raise (e if str(e).startswith(path) or path in str(e) else SlimkitError(f"{path}: {e}")) from None
        except Exception as e:  # noqa: BLE001 - a file that cannot be loaded is bad input, said in one line
            raise SlimkitError(f"{path}: cannot load this artifact ({_first_line(e)})") from None


def _load(path: str) -> nn.Module:
    from safetensors.torch import load_file

    from .sparse.pack import is_packed, read_packed

    if is_packed(path):  # a packed file (slimkit.sparse.pack) holds the same document, its tensors encoded
        header, state = read_packed(path)
        return assemble(header, state, path, sum(t.numel() for t in state.values()))
    return assemble(read_header(path), load_file(path), path)


def assemble(header: dict, state: dict[str, torch.Tensor], path: str, values: int | None = None) -> nn.Module:
    """The model a validated header describes, with ``state`` loaded strictly (``values``: the file's tensor values)."""
    from .models.registry import build_base

    with allowance_for(path, values):  # every module the header asks for is counted before it is built
        base = header.get("base")
        built = build_base(base, path) if base else None
        model = _rebuild(built, header["modules"], "")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise SlimkitError(f"{path}: tensors do not fit the rebuilt model (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")
    wrong = [k for k in own if own[k].shape != state[k].shape]
    if wrong:
        raise SlimkitError(f"{path}: shape mismatch for {wrong[:5]}")
    # the modules' own state versions (torchvision's MNASNet refuses a state without them): the
    # file holds tensors only, and the rebuilt model is the version that wrote them
    state = collections.OrderedDict(state)
    state._metadata = getattr(own, "_metadata", None)
    model.load_state_dict(state)
    # the spec as built: a trusted file stands at its real path, not the one the header recorded
    model.slimkit_base = copy.deepcopy(built.slimkit_base if built is not None else base)
    model.slimkit_history = header.get("history", [])
    model.slimkit_meta = header.get("meta", {})
    model.eval()
    return model
