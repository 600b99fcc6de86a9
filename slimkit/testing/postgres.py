"""A throwaway PostgreSQL server on the loopback interface, for tests of studies shared by many workers.

:func:`throwaway_postgres` finds the server binaries (``initdb``, ``pg_ctl``; Debian's
``/usr/lib/postgresql/<version>/bin`` or ``$PATH``), creates a cluster in a temporary folder with
trust authentication for local connections only, starts it on a free port of ``127.0.0.1`` and
yields its SQLAlchemy URL; the server is stopped and the folder removed on exit. PostgreSQL refuses
to run as root, so under root the cluster belongs to the ``postgres`` account and the binaries run
as that user (``runuser``).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator


def find_binaries() -> str | None:
    """The folder holding ``initdb`` and ``pg_ctl``, newest version first, or None."""
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(folder, "initdb")) and os.path.exists(os.path.join(folder, "pg_ctl")):
            return folder
    found = shutil.which("initdb")
    return os.path.dirname(found) if found and shutil.which("pg_ctl") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def throwaway_postgres(timeout_s: float = 60) -> Iterator[str]:
    """Start a temporary PostgreSQL server and yield ``postgresql://postgres@127.0.0.1:PORT/postgres``."""
    bindir = find_binaries()
    if bindir is None:
        raise RuntimeError("no PostgreSQL server binaries (initdb, pg_ctl) found; install postgresql")
    root = tempfile.mkdtemp(prefix="slimkit-pg-")
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    data, port = os.path.join(root, "data"), _free_port()
    if as_root:
        shutil.chown(root, "postgres")
        os.chmod(root, 0o700)

    def run(*cmd: str) -> None:
        r = subprocess.run(prefix + list(cmd), capture_output=True, text=True, timeout=timeout_s)
        if r.returncode != 0:
            raise RuntimeError(f"{os.path.basename(cmd[0])} failed: {(r.stderr or r.stdout).strip()[-500:]}")

    started = False
    try:
        run(os.path.join(bindir, "initdb"), "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8")
        opts = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} -c fsync=off"
        run(os.path.join(bindir, "pg_ctl"), "-D", data, "-o", opts, "-l", os.path.join(root, "log"), "-w",
            "-t", str(int(timeout_s)), "start")
        started = True
        deadline = time.time() + timeout_s
        while True:  # pg_ctl -w waited for the server; the TCP port follows at once, but check
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"PostgreSQL did not listen on 127.0.0.1:{port}") from None
                time.sleep(0.2)
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if started:
            subprocess.run(prefix + [os.path.join(bindir, "pg_ctl"), "-D", data, "-m", "immediate", "stop"],
                           capture_output=True, timeout=timeout_s)
        shutil.rmtree(root, ignore_errors=True)
