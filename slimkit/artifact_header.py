"""The artifact header: its schema and the checks every field passes before slimkit uses it.

A header is the JSON document in an artifact's safetensors metadata (and in a packed file's
header): ``{format, version, base, modules, history, meta}``. Everything read from a file is
validated here first, bounded in size, with one-line errors naming the file and the field.
"""

from __future__ import annotations

from typing import Any

from .errors import SlimkitError

FORMAT = "slimkit.artifact"
VERSION = 1

HEADER_KEYS = {"format", "version", "base", "modules", "history", "meta"}
NODE_KEYS = {"type", "config", "children", "resized"}
MAX_MODULES = 100_000
MAX_INPUT_VALUES = 1 << 28  # C*H*W of a recorded input size: an example of it is allocated to profile and time


def check_tree(tree: Any, where: str, path: tuple = ("modules",)) -> dict:
    """Validate a module tree read from a file: nodes ``{type, config?, children?}``, bounded in count."""
    from .documents import expect, expect_keys, field_path

    stack, count = [(tree, path)], 0
    while stack:
        node, here = stack.pop()
        count += 1
        if count > MAX_MODULES:
            raise SlimkitError(f"{where}: field {field_path(path)}: more than {MAX_MODULES:,} modules")
        expect(node, dict, where, here)
        expect_keys(node, NODE_KEYS, where, here, required={"type"})
        type_name = expect(node["type"], str, where, here + ("type",))
        if not type_name or len(type_name) > 512:
            raise SlimkitError(f"{where}: field {field_path(here + ('type',))}: expected a type name")
        if "config" in node:
            expect(node["config"], dict, where, here + ("config",))
        if "resized" in node:
            expect(node["resized"], dict, where, here + ("resized",))
        children = expect(node.get("children", {}), dict, where, here + ("children",))
        for name, child in children.items():
            if not name or "." in name or len(name) > 256:
                raise SlimkitError(f"{where}: field {field_path(here + ('children',))}: {name[:80]!r} is not a "
                                   "module name")
            stack.append((child, here + ("children", name)))
    return tree


def check_meta(meta: Any, where: str, path: tuple = ("meta",)) -> dict:
    """Validate the fields of an artifact's ``meta`` that slimkit uses (input size, classes, dataset)."""
    from .documents import expect, field_path

    expect(meta, dict, where, path)
    size = meta.get("input_size")
    if size is not None:
        here = field_path(path + ("input_size",))
        if (not isinstance(size, list) or not 1 <= len(size) <= 4
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)):
            raise SlimkitError(f"{where}: field {here}: expected a list of 1-4 positive integers (C, H, W)")
        total = 1
        for v in size:
            total *= v
        if total > MAX_INPUT_VALUES:
            raise SlimkitError(f"{where}: field {here}: {size} is larger than any input slimkit allocates")
    if meta.get("classes") is not None:
        classes = expect(meta["classes"], list, where, path + ("classes",))
        for i, c in enumerate(classes):
            expect(c, str, where, path + ("classes", i))
    for key in ("dataset", "runtime"):
        if meta.get(key) is not None:
            expect(meta[key], str, where, path + (key,))
    return meta


def check_header(header: Any, where: str) -> dict:
    """Validate an artifact's metadata document (schema: module docstring) before any field is used.

    Args:
        header: the parsed JSON document.
        where: the file, named in every error.

    Returns:
        ``header`` itself.

    Raises:
        SlimkitError: one line naming the file and the first offending field.
    """
    from .documents import expect, expect_keys
    from .models.registry import check_base

    expect(header, dict, where, ())
    expect_keys(header, HEADER_KEYS, where, (), required={"format", "version", "modules"})
    version = header.get("version")
    if header.get("format") != FORMAT or not isinstance(version, int) or isinstance(version, bool):
        raise SlimkitError(f"{where}: unsupported artifact format {header.get('format')!r} v{version!r}")
    if not 1 <= version <= VERSION:
        raise SlimkitError(f"{where}: artifact format v{version} is newer than this slimkit reads (v{VERSION}); "
                           "upgrade slimkit")
    if header.get("base") is not None:
        check_base(header["base"], where)
    check_tree(header["modules"], where)
    for i, record in enumerate(expect(header.get("history", []), list, where, ("history",))):
        expect(record, dict, where, ("history", i))
    check_meta(header.get("meta", {}), where)
    return header
