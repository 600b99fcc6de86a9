"""A :class:`~slimkit.config.MethodConfig` on the command line: one flag per field, and back.

The flag's name, type, metavar and help come from the field's annotation and :func:`~slimkit.config.option`
metadata, so a command never declares a method's options a second time; a value the config refuses is
reported by the flag the user typed. Split from :mod:`slimkit.config` (what a config is and how it
validates) because this is only how argparse sees it.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .config import _MISSING, ConfigError, MethodConfig, _jsonable, _names, _strip_optional
from .errors import SlimkitError


def add_arguments(cls: type[MethodConfig], parser: argparse.ArgumentParser, *, title: str | None = None,
                  prefix: str = "", only: Iterable[str] | None = None, skip: Iterable[str] = (),
                  rename: Mapping[str, str] | None = None, defaults: Mapping[str, Any] | None = None,
                  required: Iterable[str] = ()) -> argparse.ArgumentParser:
    """Add one flag per field of ``cls`` (in an argument group ``title``); their dests are ``prefix + name``.

    Args:
        parser: the subcommand's parser.
        title: heading of the group in ``--help`` (default the family).
        prefix: prepended to flag names and dests (``block_`` for depth pruning inside ``prune``).
        only, skip: which fields get a flag.
        rename: field -> flag for flags kept from earlier releases.
        defaults: field -> default for this command (``--epochs`` of ``train`` vs ``prune``).
        required: fields the command cannot do without.

    Example:
        >>> from slimkit.prune.config import DepthConfig
        >>> parser = add_arguments(DepthConfig, argparse.ArgumentParser(prog="toy"))
        >>> from_args(DepthConfig, parser.parse_args(["--target-macs", "0.5"])).target_macs
        0.5
        >>> from_args(DepthConfig, parser.parse_args(["--target-macs", "2"]))
        Traceback (most recent call last):
        ...
        slimkit.errors.SlimkitError: prune_blocks: --target-macs must be in (0, 1], got 2.0
    """
    group = parser.add_argument_group(title or cls.family)
    hints = typing.get_type_hints(cls)
    defaults = dict(defaults or {})
    required = set(required)
    for f in cls.cli_fields(only, skip):
        hint, meta = hints[f.name], f.metadata
        default = defaults.get(f.name, f.default if f.default is not _MISSING else f.default_factory())
        dest = prefix + f.name
        if any(a.dest == dest for a in parser._actions):  # the command has a flag of that name (--batch-size)
            parser.set_defaults(**{f"_dest_{dest}": f"{cls.family}__{dest}"})
            dest = f"{cls.family}__{dest}"
        flag = cls.flag(f.name, rename, prefix)
        parser.set_defaults(**{f"_flag_{prefix}{f.name}": flag})  # from_args names a refused value by its flag
        text = meta.get("help", "")
        names = _names(meta.get("choices")) or _names(meta.get("listing"))
        base = _strip_optional(hint)
        if base is bool:
            if default:
                group.add_argument(meta.get("invert_flag") or "--no-" + flag[2:], dest=dest,
                                   action="store_false", default=True, help=text + " (on; this flag turns it off)")
            else:
                group.add_argument(flag, dest=dest, action="store_true", default=False, help=text)
            continue
        if isinstance(base, type) and issubclass(base, MethodConfig):
            group.add_argument(flag, dest=dest, action="store_true", default=default is not None,
                               help=text + " (options: " + ", ".join(base.flag(n, prefix=f"{f.name}_")
                                                                     for n in base.field_names()) + ")")
            base.add_arguments(parser, title=f"{cls.family} {f.name}", prefix=f"{prefix}{f.name}_",
                               defaults=None)
            continue
        parse = _parser_for(base)
        shown = _jsonable(default)
        quiet = default is None or default == () or default == {} or f.name in required
        suffix = "" if quiet else f" (default: {_cli_text(shown)})"
        kwargs: dict[str, Any] = {"dest": dest, "type": parse, "default": default, "help": text + suffix,
                                  "required": f.name in required}
        if names:  # listed in the help; the config itself refuses others, with a did-you-mean
            kwargs["help"] = text + f" (one of: {', '.join(names)})" + suffix
        kwargs["metavar"] = meta.get("metavar") or _metavar(base)
        if meta.get("repeat"):
            kwargs.update(action="append", default=None, type=_parse_pair)
        group.add_argument(flag, **kwargs)
    return parser


def from_args(cls: type[MethodConfig], args: argparse.Namespace, *, prefix: str = "", only: Iterable[str] | None = None,
              skip: Iterable[str] = (), **fixed: Any):
    """Build ``cls`` from parsed flags (those :func:`add_arguments` added), plus ``fixed`` values.

    Raises:
        SlimkitError: a value its field refuses, named by its flag.
    """
    values = dict(fixed)
    hints = typing.get_type_hints(cls)
    for f in cls.cli_fields(only, skip):
        dest = getattr(args, f"_dest_{prefix}{f.name}", prefix + f.name)
        if not hasattr(args, dest) or f.name in fixed:
            continue
        value = getattr(args, dest)
        base = _strip_optional(hints[f.name])
        if f.metadata.get("repeat") and isinstance(value, list):  # --opt a=1 --opt b=2
            value = {k: v for part in value for k, v in part.items()}
        elif f.metadata.get("repeat") and value is None:
            continue
        if isinstance(base, type) and issubclass(base, MethodConfig):
            nested_defaults = {g.name: g.default if g.default is not _MISSING else g.default_factory()
                               for g in dataclasses.fields(base)}
            given = [base.flag(n, prefix=f"{f.name}_") for n in base.field_names()
                     if getattr(args, f"{dest}_{n}", nested_defaults[n]) != nested_defaults[n]]
            if not value and given:
                raise SlimkitError(f"{cls.family}: {', '.join(given)} goes with {cls.flag(f.name, prefix=prefix)}")
            value = base.from_args(args, prefix=f"{dest}_") if value else None
        values[f.name] = value
    try:
        return cls(**values)
    except ConfigError as e:
        flags = {n: getattr(args, f"_flag_{prefix}{n}", None) or cls.flag(n, prefix=prefix) for n in e.names}
        raise SlimkitError(e.render(lambda n: flags.get(n, n))) from None


def _parse_list(item: Callable[[str], Any]) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            return tuple(item(v.strip()) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
    return parse


def _parse_pair(text: str) -> dict:
    """One ``KEY=VALUE`` (``--opt pairs=a:b,c:d``): split at the first ``=``, the value JSON when it is JSON."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return {key.strip().replace("-", "_"): parsed}


def _parse_mapping(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if isinstance(value, dict):
        return value
    out = {}
    for pair in (p for p in text.split(",") if p.strip()):
        key, sep, v = pair.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE,... or a JSON object, got {text!r}")
        try:
            out[key.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[key.strip()] = v
    return out


def _parse_int_or_list(text: str) -> int | tuple:
    values = _parse_list(int)(text)
    return values[0] if len(values) == 1 else values


def _parser_for(hint: Any) -> Callable[[str], Any]:
    origin = typing.get_origin(hint)
    if origin is tuple:
        return _parse_list(typing.get_args(hint)[0])
    if origin is dict:
        return _parse_mapping
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        if int in members and any(typing.get_origin(a) is tuple for a in members):
            return _parse_int_or_list
        if float in members:
            return float
        return str
    return hint if hint in (int, float, str) else str


def _metavar(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is tuple:
        return "A,B"
    if origin is dict:
        return "K=V,..."
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        return "N[,N]" if int in members and any(typing.get_origin(a) is tuple for a in members) else "VALUE"
    return {int: "N", float: "F", str: "NAME"}.get(hint, "VALUE")


def _cli_text(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)
