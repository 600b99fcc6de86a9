"""One way to register a method.

Every pluggable thing in slimkit (models, optimizers, pipeline stages, and later pruning
criteria, quantizers, decompositions and distillation losses) lives in a :class:`Registry`.
Registering is one decorator; looking up an unknown name raises a :class:`SlimkitError` that
lists the known names, so a typo never ends in a ``KeyError`` traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import SlimkitError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of callables, filled by the :meth:`register` decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator: ``@REG.register("name")`` (or the object's ``__name__`` when omitted)."""

        def deco(obj: T) -> T:
            key = name or getattr(obj, "__name__")
            if key in self._items and self._items[key] is not obj:
                raise SlimkitError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise SlimkitError(self.unknown(name)) from None

    def unknown(self, name: object) -> str:
        """The message for a name that is not registered: the close match, if any, and every known name."""
        import difflib

        known = ", ".join(sorted(self._items)) or "none"
        close = difflib.get_close_matches(str(name), list(self._items), 1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r} (known: {known}){hint}"

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)
