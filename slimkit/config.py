"""One declaration per method: self-validating config objects serving the API, recipes, the CLI and provenance.

A method's options are declared once, as fields of a frozen dataclass deriving from
:class:`MethodConfig` (the idea of torchao's ``AOBaseConfig``)::

    @dataclass(frozen=True)
    class DepthConfig(MethodConfig):
        family = "prune_blocks"
        target_macs: float | None = option(None, "remove blocks until MACs are at most this fraction", low=0, high=1,
                                           low_inclusive=False)
        scoring: str = option("greedy", "re-score after each removal, ...", choices=("greedy", "lazy", "once"))

and that one declaration is

* what the Python API takes (``prune_blocks(model, x, loader, DepthConfig(target_macs=0.5))``),
  checked on construction: types from the annotations, ranges and choices from :func:`option`,
  cross-field rules in :meth:`MethodConfig.validate`; every error is a :class:`SlimkitError`
  naming the field;
* a recipe stage's options (:meth:`MethodConfig.from_options`: unknown keys are refused with a
  did-you-mean, before any data is read);
* the command line (:meth:`MethodConfig.add_arguments` / :meth:`MethodConfig.from_args`: one
  flag per field, the field's help as the flag's help);
* the provenance record in an artifact (:meth:`MethodConfig.to_dict` /
  :meth:`MethodConfig.from_dict`, with a version so a record written today still loads when a
  field is added later: missing fields take their defaults, :meth:`MethodConfig.migrate`
  renames old ones).

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class ToyConfig(MethodConfig):
    ...     family = "toy"
    ...     ratio: float = option(0.5, "fraction to remove", low=0, high=1, high_inclusive=False)
    >>> ToyConfig.from_options({"ratio": 0.25}).to_dict()
    {'version': 1, 'ratio': 0.25}
    >>> ToyConfig.from_options({"ratoi": 0.25}, where="stage 1 (toy)")
    Traceback (most recent call last):
    ...
    slimkit.errors.SlimkitError: stage 1 (toy): unknown option 'ratoi' (did you mean 'ratio'?)
    >>> ToyConfig(ratio=1.0)
    Traceback (most recent call last):
    ...
    slimkit.config.ConfigError: toy: ratio: must be in [0, 1), got 1.0
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

from .errors import SlimkitError

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, help: str = "", *, choices: Iterable[str] | Callable[[],
                                                                                         Iterable[str]] | None = None,
           low: float | None = None, high: float | None = None, low_inclusive: bool = True,
           high_inclusive: bool = True, flag: str | None = None, invert_flag: str | None = None, cli: bool = True,
           metavar: str | None = None, repeat: bool = False,
           listing: Iterable[str] | Callable[[], Iterable[str]] | None = None) -> Any:
    """A config field: its default, one line of help, and the checks every value must pass.

    Args:
        default: the default value (a list or dict default is copied per instance).
        help: one line, used as the flag's help and in generated docs.
        choices: allowed names, or a function returning them (e.g. a registry's ``names``),
            looked up when checked, so methods registered later count.
        low, high: numeric bounds (inclusive unless ``low_inclusive``/``high_inclusive`` is False);
            for a tuple, each element.
        flag: the command-line flag, default ``--field-name``.
        invert_flag: for a boolean defaulting to True, a flag that sets it False
            (``--tie-shortcuts`` for ``untie_shortcuts``); default ``--no-field-name``.
        cli: False keeps the field off the command line (mappings that a recipe sets).
        metavar: the flag's value placeholder.
        repeat: for a mapping, the flag is given once per ``KEY=VALUE`` (``--opt T=4 --opt alpha=0.9``).
        listing: names shown in the help and docs without restricting the value (``at+kd`` combines two).
    """
    meta = {"help": help, "choices": choices, "low": low, "high": high, "low_inclusive": low_inclusive,
            "high_inclusive": high_inclusive, "flag": flag, "invert_flag": invert_flag, "cli": cli, "metavar": metavar,
            "repeat": repeat, "listing": listing}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _names(choices) -> list[str]:
    from .registry import Registry

    if choices is None:
        return []
    if isinstance(choices, Registry):
        return choices.names()
    return list(choices() if callable(choices) else choices)


def _kind(value: Any) -> str:
    from .documents import _kind as kind

    return kind(value)


def _hint_text(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_hint_text(a) for a in typing.get_args(hint))
    if origin is tuple:
        return f"a list of {_hint_text(typing.get_args(hint)[0])}s"
    if origin is dict:
        return "a mapping"
    if isinstance(hint, type) and issubclass(hint, MethodConfig):
        return f"a mapping of {hint.family} options"
    return {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null"}.get(hint, str(hint))


class ConfigError(SlimkitError):
    """A config refused a value: says which field, in the API's words or (:meth:`render`) with the command's flags."""

    def __init__(self, family: str, field: str | None, message: str, names: Iterable[str] = ()) -> None:
        self.family, self.field, self.message, self.names = family, field, message, list(names)
        super().__init__(self.render())

    def render(self, flag: Callable[[str], str] | None = None) -> str:
        """The message with field names, or with ``flag(name)`` for each field it names (``--teacher``)."""
        name = (lambda n: n) if flag is None else flag
        refs = {n: name(n) for n in self.names}
        try:
            text = self.message.format(**refs) if refs else self.message
        except (KeyError, IndexError, ValueError):  # braces that are no field reference: shown as they are
            text = self.message
        if self.field is None:
            return f"{self.family}: {text}"
        head = name(self.field) if self.field in refs or flag is None else self.field
        return f"{self.family}: {head} {text}" if flag is not None else f"{self.family}: {head}: {text}"


class MethodConfig:
    """Base of every method's config (subclasses are frozen dataclasses; see the module docstring).

    Class attributes: ``family`` (the method's name in messages: ``prune``, ``quantize``),
    ``VERSION`` (bumped when a field is renamed or removed; :meth:`migrate` maps old records).
    """

    family: ClassVar[str] = "method"
    VERSION: ClassVar[int] = 1
    flat: ClassVar[tuple[str, ...]] = ()  # nested-config fields whose keys a recipe writes beside the config's own
    extras: ClassVar[str | None] = None  # the mapping field holding the method's own options (see extra_names)

    # -- construction and checks ---------------------------------------------------------------

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = self._coerce(f, hints[f.name], getattr(self, f.name))
            object.__setattr__(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Cross-field rules of the method (mutually exclusive options ...); raise :meth:`error`."""

    def error(self, field: str | None, message: str) -> "ConfigError":
        """The error naming this config's family and ``field``; ``{name}`` in ``message`` names another field."""
        return ConfigError(self.family, field, message, type(self).field_names())

    def _coerce(self, f: dataclasses.Field, hint: Any, value: Any) -> Any:
        value = self._conform(f.name, hint, value)
        meta = f.metadata
        items = value if isinstance(value, tuple) else (value,)
        names = _names(meta.get("choices"))
        for v in items:
            if names and isinstance(v, str) and v not in names:
                from .registry import Registry

                if isinstance(meta.get("choices"), Registry):  # the registry's own words: "unknown pruning criterion"
                    raise self.error(f.name, meta["choices"].unknown(v))
                close = difflib.get_close_matches(v, names, 1)
                hint_ = f" (did you mean {close[0]!r}?)" if close else ""
                raise self.error(f.name, f"must be one of {', '.join(names)}, got {v!r}{hint_}")
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                low, high = meta.get("low"), meta.get("high")
                bad_low = low is not None and (v < low or (v == low and not meta.get("low_inclusive", True)))
                bad_high = high is not None and (v > high or (v == high and not meta.get("high_inclusive", True)))
                if bad_low or bad_high:
                    low_inc, high_inc = meta.get("low_inclusive", True), meta.get("high_inclusive", True)
                    if low is not None and high is not None:
                        span = f"in {'[' if low_inc else '('}{low:g}, {high:g}{']' if high_inc else ')'}"
                    elif low is not None:
                        span = f"{'>=' if low_inc else '>'} {low:g}"
                    else:
                        span = f"{'<=' if high_inc else '<'} {high:g}"
                    raise self.error(f.name, f"must be {span}, got {v!r}")
        return value

    def _conform(self, name: str, hint: Any, value: Any) -> Any:
        """``value`` in the field's type (lists become tuples, ints floats, mappings nested configs), or raise."""
        ok, out = _conform(hint, value)
        if not ok:
            raise self.error(name, f"expected {_hint_text(hint)}, got {_kind(value)}"
                                   + (f" ({out})" if isinstance(out, str) and out else ""))
        return out

    # -- recipes and provenance ------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None, where: str | None = None, *, path: str = ""):
        """Build from a mapping (a recipe stage's keys): unknown keys are refused with a did-you-mean.

        Keys of a nested config named in ``flat`` may stand beside the config's own (``epochs``
        of the ``fit`` field), and the method's own options (:meth:`extra_names`) go into the
        ``extras`` mapping field, as a recipe writes them.

        Args:
            options: field values by name; missing fields take their defaults.
            where: prefix of every error (``stage 2 (prune)``); default the config's family.
            path: how the document reaches these keys (``finetune.``), prefixed to the field names in errors.

        Raises:
            SlimkitError: an unknown key, or a value its field refuses.
        """
        options = dict(options or {})
        prefix = f"{where}: " if where else f"{cls.family}: "
        known = cls.field_names()
        own = {k: options.pop(k) for k in list(options) if k in known}
        hints = typing.get_type_hints(cls)
        accepted = [k for k in known if k not in cls.flat and k != cls.extras]
        for name in cls.flat:
            nested = _strip_optional(hints[name])
            base = own.get(name)
            base = base.to_dict() if isinstance(base, MethodConfig) else dict(base or {})
            base.pop("version", None)
            base.update({k: options.pop(k) for k in list(options) if k in nested.field_names()})
            own[name] = base
            accepted += nested.field_names()
        if cls.extras:
            try:
                names = cls.extra_names(own)
            except SlimkitError as e:
                raise SlimkitError(prefix + str(e)) from None
            except Exception:  # noqa: BLE001 - a value of the wrong type: the field's own check names it below
                names = set()
            extras = dict(own.get(cls.extras) or {})
            extras.update({k: options.pop(k) for k in list(options) if k in names})
            own[cls.extras] = extras
            accepted += sorted(names)
        for key in options:
            close = difflib.get_close_matches(str(key), accepted, 1)
            raise SlimkitError(f"{prefix}unknown option {path + str(key)!r}"
                               + (f" (did you mean {path + close[0]!r}?)" if close
                                  else f" (known: {', '.join(accepted)})"))
        try:
            return cls(**own)
        except ConfigError as e:
            text = e.render(lambda n: path + n) if path else str(e)
            text = text[len(e.family) + 2:] if text.startswith(e.family + ": ") else text
            raise SlimkitError(prefix + text) from None
        except SlimkitError as e:
            text = str(e)
            text = text[len(cls.family) + 2:] if text.startswith(cls.family + ": ") else text
            raise SlimkitError(prefix + text) from None

    @classmethod
    def extra_names(cls, own: Mapping[str, Any]) -> set[str]:
        """The method's own option names given the config's own values (``T`` and ``alpha`` for ``distill: kd``)."""
        return set()

    def to_dict(self) -> dict:
        """The JSON record of this config (for provenance): its version and every field, flat as a recipe writes it."""
        record = {"version": self.VERSION}
        for f in dataclasses.fields(self):
            value = _jsonable(getattr(self, f.name))
            if f.name in self.flat and isinstance(value, dict):
                record.update({k: v for k, v in value.items() if k != "version"})
            elif f.name == self.extras:
                record.update(value)
            else:
                record[f.name] = value
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any], where: str | None = None):
        """Rebuild a config from :meth:`to_dict`'s record, migrating older versions."""
        record = dict(record)
        version = record.pop("version", 1)
        if not isinstance(version, int) or version > cls.VERSION:
            raise SlimkitError(f"{where or cls.family}: config version {version!r} is newer than this slimkit "
                               f"reads (v{cls.VERSION})")
        return cls.from_options(cls.migrate(record, version), where)

    @classmethod
    def migrate(cls, record: dict, version: int) -> dict:
        """Map a record of an older ``version`` onto today's fields (default: unchanged)."""
        return record

    def replace(self, **changes):
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    # -- command line ---------------------------------------------------------------------------

    @classmethod
    def cli_fields(cls, only: Iterable[str] | None = None, skip: Iterable[str] = ()) -> list[dataclasses.Field]:
        fields = [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True) and f.name not in set(skip)]
        if only is not None:
            wanted = list(only)
            fields = sorted((f for f in fields if f.name in wanted), key=lambda f: wanted.index(f.name))
        return fields

    @classmethod
    def flag(cls, name: str, rename: Mapping[str, str] | None = None, prefix: str = "") -> str:
        """The command-line flag of field ``name``."""
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        return (rename or {}).get(name) or f.metadata.get("flag") or "--" + (prefix + name).replace("_", "-")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, **options: Any) -> argparse.ArgumentParser:
        """One flag per field: see :func:`slimkit.config_flags.add_arguments` for the options."""
        from .config_flags import add_arguments

        return add_arguments(cls, parser, **options)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **options: Any):
        """Build from parsed flags: see :func:`slimkit.config_flags.from_args`."""
        from .config_flags import from_args

        return from_args(cls, args, **options)


def _strip_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _conform(hint: Any, value: Any) -> tuple[bool, Any]:
    """(fits, value converted to the field's type) for a value against a type annotation."""
    if hint is Any:
        return True, value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(hint)
        # exact matches first, so 1 stays an int in `int | tuple[int, ...]` and True a bool in `bool | str`
        for m in sorted(members, key=lambda m: 0 if isinstance(m, type) and type(value) is m else 1):
            ok, out = _conform(m, value)
            if ok:
                return True, out
        return False, None
    if hint is type(None):
        return value is None, None
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return ok, float(value) if ok else None
    if hint is str:
        return isinstance(value, str), value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, None
        item = typing.get_args(hint)[0]
        out = []
        for v in value:
            ok, c = _conform(item, v)
            if not ok:
                return False, None
            out.append(c)
        return True, tuple(out)
    if origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            return False, None
        key_hint, value_hint = typing.get_args(hint)
        out = {}
        for k, v in value.items():
            ok, c = _conform(value_hint, v)
            if not ok:
                return False, None
            out[k] = c
        return True, out
    if isinstance(hint, type) and issubclass(hint, MethodConfig):
        if isinstance(value, hint):
            return True, value
        if isinstance(value, Mapping):  # a recipe's mapping, or a record written by to_dict (with its version)
            return True, hint.from_dict(value) if "version" in value else hint.from_options(value)
        return False, None
    return isinstance(value, hint), value


def _jsonable(value: Any) -> Any:
    if isinstance(value, MethodConfig):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def describe_fields(cls: type[MethodConfig]) -> list[tuple[str, str, str, str]]:
    """(name, type, default, help) of every option as a recipe writes it: the rows of a generated docs table.

    A nested config written flat (``cls.flat``) contributes its own fields' rows.
    """
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.name in cls.flat:
            rows += describe_fields(_strip_optional(hints[f.name]))
            continue
        default = f.default if f.default is not _MISSING else f.default_factory()
        text = f.metadata.get("help", "")
        names = _names(f.metadata.get("choices")) or _names(f.metadata.get("listing"))
        if names:
            text += f" ({', '.join(names)})"
        if f.name == cls.extras:
            text += "; written as keys beside these"
        shown = "-" if isinstance(default, MethodConfig) else repr(_jsonable(default))
        rows.append((f.name, _hint_text(hints[f.name]), shown, text))
    return rows
