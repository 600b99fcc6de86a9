"""Progress of long work: a bar with an ETA on a terminal, plain log lines otherwise.

A job that can take more than a few seconds (a compress step, a search trial, an epoch) reports
through :class:`Progress`. On a terminal (stderr is a TTY and the caller did not ask for ``--json``)
it draws a tqdm bar; in a log file or a pipe it writes one line per update through ``log``, with
the elapsed time and the ETA, because a bar redrawn with carriage returns is noise in a log.
tqdm is used rather than a home-made bar: it already handles terminal widths and rate smoothing.

Work deep inside the library (int8 calibration, a latency table's timings, export verification)
does not take a ``log`` argument through every caller: a command or job states once where its
lines go with :func:`reporting`, and a :class:`Progress` created without ``log`` uses that (outside
any :func:`reporting` block: a bar on a terminal, no lines).
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from collections.abc import Callable, Iterator

_UNSET = object()
EVERY = 5.0  # seconds between plain lines by default: a job that ends within a few seconds writes none
# (log, bar, every) of the innermost `reporting` block
_REPORTING: contextvars.ContextVar[tuple[Callable[[str], None] | None, bool, float]] = contextvars.ContextVar(
    "slimkit_reporting", default=(None, True, EVERY))


@contextlib.contextmanager
def reporting(log: Callable[[str], None] | None, bar: bool = True, every: float = EVERY) -> Iterator[None]:
    """Within the block, a :class:`Progress` made without ``log``/``bar``/``every`` writes its lines to ``log``
    (at most one per ``every`` seconds) and draws a bar only if ``bar`` (False for ``--json`` runs).

    Example:
        >>> lines = []
        >>> with reporting(lines.append, bar=False, every=0):
        ...     p = Progress(1, "int8 calibration batches"); p.update(); p.close()
        >>> lines
        ['int8 calibration batches: 1/1, 0s elapsed']
    """
    token = _REPORTING.set((log, bar, every))
    try:
        yield
    finally:
        _REPORTING.reset(token)


def duration(seconds: float) -> str:
    """``75`` -> ``"1m15s"``; ``3700`` -> ``"1h01m"``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


class Progress:
    """``total`` units of work named ``desc``; call :meth:`update` after each, :meth:`close` at the end.

    Args:
        total: units of work expected.
        desc: what is being done (``"search trials"``).
        log: where plain lines go when no bar is drawn (None: nowhere).
            Default: the enclosing :func:`reporting` block's.
        bar: draw a bar when stderr is a terminal (False for ``--json`` runs). Default: :func:`reporting`'s.
        done: units already finished (a resumed job).
        every: at least this many seconds between plain lines (the last unit is reported once a line was), so
            a job that ends within a few seconds writes none. Default: :func:`reporting`'s (5 s); 0: every unit.
        deadline: a time (``time.time()`` scale) the work stops at whatever is left (a search's time budget):
            the ETA is never past it.

    Example:
        >>> lines = []
        >>> p = Progress(2, "epochs", log=lines.append, bar=False, every=0)
        >>> p.update(note="loss 0.1"); p.update(); p.close()
        >>> lines[0].startswith("epochs: 1/2")
        True
    """

    def __init__(self, total: int, desc: str, log: Callable[[str], None] | None = _UNSET, *, bar: bool | None = None,
                 done: int = 0, every: float | None = None, deadline: float | None = None) -> None:
        context_log, context_bar, context_every = _REPORTING.get()
        log = context_log if log is _UNSET else log
        bar = context_bar if bar is None else bar
        every = context_every if every is None else every
        self.total, self.desc, self.log, self.n, self.start_n = max(int(total), 1), desc, log, done, done
        self.t0 = self._last = time.time()
        self.every, self._lines, self.deadline = every, 0, deadline
        self._bar = None
        if bar and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=done, desc=desc, dynamic_ncols=True, leave=False)

    def eta(self) -> float | None:
        """Seconds left at the rate of the units done in this process (None before the first), at most until the
        deadline."""
        ran = self.n - self.start_n
        if ran <= 0:
            return None
        left = (time.time() - self.t0) / ran * max(self.total - self.n, 0)
        return left if self.deadline is None else min(left, max(self.deadline - time.time(), 0.0))

    def update(self, n: int = 1, note: str = "") -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            return
        now = time.time()
        if self.log is not None and (now - self._last >= self.every or (self.n >= self.total and self._lines)):
            self._last, self._lines = now, self._lines + 1
            eta = self.eta()
            self.log(f"{self.desc}: {min(self.n, self.total)}/{self.total}, {duration(time.time() - self.t0)} elapsed"
                     + (f", ETA {duration(eta)}" if eta is not None and self.n < self.total else "")
                     + (f" ({note})" if note else ""))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
