"""Which code files slimkit may run: only the ones the user names.

slimkit reads many files (artifacts, recipes, checkpoints, datasets) and treats all of them as
data. One kind of model spec is code: ``PATH.py:fn`` builds a model by importing ``PATH.py`` and
calling ``fn``. Typed by the user (on the command line, or to :func:`slimkit.create_model`), that
is the user asking for exactly that file, and it runs. Found *inside* a file (an artifact's base
model, a recipe's ``model`` or teacher), it would let whoever wrote the file choose the code, so
it runs only when the caller trusts that file explicitly, in the spirit of the
``trust_remote_code`` convention::

    slimkit.load("pruned.safetensors", trust_code="nets.py")
    slimkit eval pruned.safetensors --data digits --trust-code nets.py

A trusted path matches the file a document names when both are the same file, or when they have
the same file name (an artifact made on another machine records that machine's path). The file
that runs is always the one the user named, never the path written in the document.

The trusted set is a context variable, so one ``with trust_code(...)`` around a job reaches
every model build inside it (students, teachers, quantized models' float structure) without
each API threading a parameter through.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from contextvars import ContextVar

from .errors import SlimkitError

_TRUSTED: ContextVar[tuple[str, ...]] = ContextVar("slimkit_trusted_code", default=())


def _paths(paths: str | os.PathLike | Iterable[str | os.PathLike] | None) -> tuple[str, ...]:
    if paths is None:
        return ()
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = []
    for p in paths:
        p = os.fspath(p)
        if not p.endswith(".py"):
            raise SlimkitError(f"--trust-code takes a Python file (PATH.py), got {p!r}")
        if not os.path.isfile(p):
            raise SlimkitError(f"--trust-code: file not found: {p}")
        out.append(os.path.realpath(p))
    return tuple(out)


@contextlib.contextmanager
def trust_code(paths: str | os.PathLike | Iterable[str | os.PathLike] | None) -> Iterator[tuple[str, ...]]:
    """Within the block, model specs read from files may run the code files in ``paths``.

    Args:
        paths: one ``.py`` file, several, or ``None`` (nothing more is trusted). Each must exist.

    Yields:
        The trusted files now in force (real paths), the outer block's included.

    Raises:
        SlimkitError: a path is not an existing ``.py`` file.

    Example:
        >>> with trust_code(None) as trusted:
        ...     trusted
        ()
    """
    token = _TRUSTED.set(_TRUSTED.get() + _paths(paths))
    try:
        yield _TRUSTED.get()
    finally:
        _TRUSTED.reset(token)


def trusted_file(recorded: str) -> str | None:
    """The trusted file standing for ``recorded`` (a path read from a document), or ``None``.

    Same file first; else a trusted file with the same file name (see the module docstring).
    """
    trusted = _TRUSTED.get()
    real = os.path.realpath(recorded)
    if real in trusted:
        return real
    same_name = [t for t in trusted if os.path.basename(t) == os.path.basename(recorded)]
    return same_name[0] if same_name else None


def refuse(recorded: str, fn: str, where: str) -> SlimkitError:
    """The one-line error for a document that names code nobody trusted."""
    return SlimkitError(f"{where} names code to run: its model is built by {fn}() in {recorded}, and slimkit never "
                        f"runs code a file names; if you trust that file, pass --trust-code "
                        f"{os.path.basename(recorded)} (Python: trust_code=PATH)")
