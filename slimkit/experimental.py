"""The experimental marker: one decorator for APIs whose behaviour may still change (Optuna's ``@experimental_class``).

A marked function or class says so in its docstring and warns once per process, the first time
it is used, with :class:`ExperimentalWarning` (silence it with ``warnings.filterwarnings("ignore",
category=ExperimentalWarning)``).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
_WARNED: set[str] = set()


class ExperimentalWarning(UserWarning):
    """Raised once per process for each experimental API used."""


def _warn_once(name: str, version: str, note: str) -> None:
    if name in _WARNED:
        return
    _WARNED.add(name)
    warnings.warn(f"{name} is experimental (since slimkit {version}): its behaviour may change"
                  + (f"; {note}" if note else ""), ExperimentalWarning, stacklevel=3)


def experimental(version: str, note: str = "") -> Callable[[T], T]:
    """Mark a function or class as experimental since ``version``.

    Args:
        version: the release that introduced it.
        note: what may change.

    Example:
        >>> @experimental("0.2", "the table's format")
        ... def plan(): return 1
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as w:
        ...     warnings.simplefilter("always")
        ...     _ = plan(), plan()
        >>> len(w), issubclass(w[0].category, ExperimentalWarning)
        (1, True)
    """

    def deco(obj: T) -> T:
        name = f"{obj.__module__}.{obj.__qualname__}"
        text = f"\n\n    Experimental (since {version}): its behaviour may change{'; ' + note if note else ''}.\n"
        if isinstance(obj, type):
            init = obj.__init__

            @functools.wraps(init)
            def __init__(self, *args, **kwargs):
                _warn_once(name, version, note)
                init(self, *args, **kwargs)

            obj.__init__ = __init__
            obj.__doc__ = (obj.__doc__ or "").rstrip() + text
            return obj

        @functools.wraps(obj)
        def wrapper(*args, **kwargs):
            _warn_once(name, version, note)
            return obj(*args, **kwargs)

        wrapper.__doc__ = (obj.__doc__ or "").rstrip() + text
        wrapper.experimental = version
        return wrapper  # type: ignore[return-value]

    return deco
