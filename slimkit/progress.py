"""Progress of long work: a bar with an ETA on a terminal, plain log lines otherwise.

A job that can take more than a few seconds (a compress step, a search trial, an epoch) reports
through :class:`Progress`. On a terminal (stderr is a TTY and the caller did not ask for ``--json``)
it draws a tqdm bar; in a log file or a pipe it writes one line per update through ``log``, with
the elapsed time and the ETA, because a bar redrawn with carriage returns is noise in a log.
tqdm is used rather than a home-made bar: it already handles terminal widths and rate smoothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


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
        bar: draw a bar when stderr is a terminal (False for ``--json`` runs).
        done: units already finished (a resumed job).

    Example:
        >>> lines = []
        >>> p = Progress(2, "epochs", log=lines.append, bar=False)
        >>> p.update(note="loss 0.1"); p.update(); p.close()
        >>> lines[0].startswith("epochs: 1/2")
        True
    """

    def __init__(self, total: int, desc: str, log: Callable[[str], None] | None = print, *, bar: bool = True,
                 done: int = 0) -> None:
        self.total, self.desc, self.log, self.n, self.start_n = max(int(total), 1), desc, log, done, done
        self.t0 = time.time()
        self._bar = None
        if bar and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=done, desc=desc, dynamic_ncols=True, leave=False)

    def eta(self) -> float | None:
        """Seconds left at the rate of the units done in this process (None before the first)."""
        ran = self.n - self.start_n
        if ran <= 0:
            return None
        return (time.time() - self.t0) / ran * max(self.total - self.n, 0)

    def update(self, n: int = 1, note: str = "") -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            return
        if self.log is not None:
            eta = self.eta()
            self.log(f"{self.desc}: {min(self.n, self.total)}/{self.total}, {duration(time.time() - self.t0)} elapsed"
                     + (f", ETA {duration(eta)}" if eta is not None and self.n < self.total else "")
                     + (f" ({note})" if note else ""))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
