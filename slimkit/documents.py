"""Bounded parsing and typed checks for the JSON and YAML documents slimkit reads from files.

An artifact header and a recipe come from files anyone may hand over, so before any field is
used the whole document is walked once (iteratively: a deeply nested file must not exhaust the
interpreter's stack) against size limits, then each field is checked for its type. Any
violation is one :class:`SlimkitError` naming the file and the field path, such as
``m.safetensors: header field modules.children.fc.config: expected a mapping, got a list``.

The limits are far above what slimkit writes (a resnet110 artifact's module tree is 6 levels
deep and holds ~600 modules) and far below what would hurt the machine.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import SlimkitError


@dataclass(frozen=True)
class Limits:
    """Size limits of one document."""

    depth: int = 64  # containers inside containers
    nodes: int = 2_000_000  # values in all (shared YAML aliases count each time they are reached)
    string: int = 1_000_000  # characters in one string
    items: int = 1_000_000  # entries in one list or mapping


DEFAULT = Limits()
SCALARS = (bool, int, float, str, type(None))


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(type(value),
                                                                                       type(value).__name__)


def field_path(parts: tuple) -> str:
    """``("modules", "children", "fc")`` -> ``modules.children.fc``; list positions as ``[i]``."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<document>"


def check_bounds(doc: Any, where: str, limits: Limits = DEFAULT) -> None:
    """Walk ``doc`` once and raise if it breaks ``limits`` or holds anything but JSON-like data.

    Args:
        doc: the parsed document (dicts, lists, strings, numbers, booleans, null).
        where: what to call the document in the error (usually the file and which part).
        limits: the bounds to enforce.

    Raises:
        SlimkitError: naming the first offending field.

    Example:
        >>> check_bounds({"a": [1, 2, {"b": "c"}]}, "example")
        >>> check_bounds([[[[1]]]], "example", Limits(depth=2))
        Traceback (most recent call last):
        ...
        slimkit.errors.SlimkitError: example: field [0][0]: nested deeper than 2 levels
    """
    stack: list[tuple[Any, tuple, int]] = [(doc, (), 0)]
    nodes = 0
    while stack:
        value, path, depth = stack.pop()
        nodes += 1
        if nodes > limits.nodes:
            raise SlimkitError(f"{where}: more than {limits.nodes:,} values in the document")
        if isinstance(value, str):
            if len(value) > limits.string:
                raise SlimkitError(f"{where}: field {field_path(path)}: a string of {len(value):,} characters "
                                   f"(at most {limits.string:,})")
            continue
        if isinstance(value, SCALARS):
            if isinstance(value, float) and value != value:  # NaN is no value a setting can take
                raise SlimkitError(f"{where}: field {field_path(path)}: NaN is not allowed")
            continue
        if isinstance(value, (Mapping, list, tuple)):
            if depth >= limits.depth:
                raise SlimkitError(f"{where}: field {field_path(path)}: nested deeper than {limits.depth} levels")
            if len(value) > limits.items:
                raise SlimkitError(f"{where}: field {field_path(path)}: {len(value):,} entries "
                                   f"(at most {limits.items:,})")
            if isinstance(value, Mapping):
                for k, v in value.items():
                    if not isinstance(k, str):
                        raise SlimkitError(f"{where}: field {field_path(path)}: key {k!r} is not a string")
                    stack.append((v, path + (k,), depth + 1))
            else:
                stack.extend((v, path + (i,), depth + 1) for i, v in enumerate(value))
            continue
        raise SlimkitError(f"{where}: field {field_path(path)}: {type(value).__name__} is not plain data")


def parse_json(text: str, where: str, limits: Limits = DEFAULT) -> Any:
    """``json.loads`` that ends in one :class:`SlimkitError` for text that is not JSON or is out of bounds."""
    try:
        doc = json.loads(text)
    except RecursionError:
        raise SlimkitError(f"{where}: JSON nested too deeply") from None
    except (ValueError, TypeError) as e:
        raise SlimkitError(f"{where}: not valid JSON ({e})") from None
    check_bounds(doc, where, limits)
    return doc


def read_json_file(path: str, what: str, max_bytes: int = 64 << 20, limits: Limits = DEFAULT) -> Any:
    """The JSON document in ``path`` (a ``what``), size-checked before it is read; any problem is one line."""
    import os

    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            raise SlimkitError(f"{path}: a {what} of {size:,} bytes (at most {max_bytes:,})")
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise SlimkitError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise SlimkitError(f"{path}: the {what} is not UTF-8 text") from None
    return parse_json(text, path, limits)


def expect(value: Any, types: type | tuple[type, ...], where: str, path: tuple, what: str | None = None) -> Any:
    """``value`` if it has one of ``types`` (a ``bool`` is no ``int``), else a SlimkitError naming the field."""
    types = types if isinstance(types, tuple) else (types,)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        wanted = what or " or ".join(_kind(t()) if t is not type(None) else "null" for t in types)
        raise SlimkitError(f"{where}: field {field_path(path)}: expected {wanted}, got {_kind(value)}")
    return value


def expect_keys(doc: Mapping, allowed: set[str], where: str, path: tuple, required: set[str] = frozenset()) -> None:
    """Refuse unknown and missing keys of a mapping by name."""
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise SlimkitError(f"{where}: field {field_path(path) if path else '<document>'}: unknown key(s) "
                           f"{', '.join(unknown)} (known: {', '.join(sorted(allowed))})")
    missing = sorted(required - set(doc))
    if missing:
        raise SlimkitError(f"{where}: field {field_path(path) if path else '<document>'}: missing key(s) "
                           f"{', '.join(missing)}")


def expect_flat(value: Any, where: str, path: tuple) -> Any:
    """A JSON scalar or a list of scalars (what a keyword argument read from a file may be)."""
    if isinstance(value, SCALARS):
        return value
    if isinstance(value, list) and all(isinstance(v, SCALARS) for v in value):
        return value
    raise SlimkitError(f"{where}: field {field_path(path)}: expected a number, string, boolean, null or a list of "
                       f"them, got {_kind(value) if not isinstance(value, list) else 'a nested list'}")
