"""The arguments every command shares: the model it loads and the data it runs on (one help text each)."""

from __future__ import annotations

import argparse

MODEL_HELP = "registered name, torchvision:NAME, timm:NAME, file.py:fn or an artifact path"
DATA_HELP = "digits, cifar10:PATH or imagefolder:PATH"


def add_model_arguments(parser: argparse.ArgumentParser, help: str = MODEL_HELP, **positional) -> None:
    """``MODEL``, ``--weights`` and ``--num-classes`` (``positional``: e.g. ``nargs="?"``)."""
    parser.add_argument("model", help=help, **positional)
    parser.add_argument("--weights", help="state_dict / checkpoint / safetensors file to load")
    parser.add_argument("--num-classes", type=int)


def add_data_arguments(parser: argparse.ArgumentParser, help: str = DATA_HELP, *, required: bool = False,
                       seed: bool = True, batch_size: int | None = 128) -> None:
    """``--data``, ``--limit`` and (unless turned off) ``--seed`` and ``--batch-size``."""
    parser.add_argument("--data", required=required, help=help)
    parser.add_argument("--limit", type=int, help="class-balanced subset of N per split")
    if seed:
        parser.add_argument("--seed", type=int, default=0)
    if batch_size is not None:
        parser.add_argument("--batch-size", type=int, default=batch_size)


# options that change how a run is shown or timed, not what it computes
_NOT_RESULT = {"json", "threads", "quiet", "progress", "no_resume", "command", "func"}


def run_fingerprint(args: argparse.Namespace) -> str:
    """A short hash of every option that changes a run's result.

    It names a run's checkpoints, so only the same command resumes them.
    """
    import hashlib
    import json

    items = {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_RESULT and not callable(v)}
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:12]


class OutputLock:
    """Exclusive use of an output folder by one process: a second slimkit writing there is refused.

    An advisory ``flock`` on the ``--out`` folder itself, held for the command's lifetime and
    released by the kernel when the process ends (even by SIGKILL), so a killed run never leaves
    a stale lock and no lock file is ever written. Two commands writing one folder would otherwise
    interleave files of different runs. A folder this lock created and the command left empty
    (it failed on bad input) is removed again. An output that is a file (``m.onnx``) needs no
    lock: it is renamed into place whole.
    """

    FILE_SUFFIXES = (".onnx", ".xml", ".pt", ".safetensors", ".slimpack", ".json", ".png", ".html", ".md", ".txt",
                     ".csv")

    def __init__(self, out: str) -> None:
        self.out = out
        self.fd: int | None = None
        self.created = False

    def __enter__(self) -> "OutputLock":
        import fcntl
        import os

        from .errors import SlimkitError

        if self.out.endswith(self.FILE_SUFFIXES) or os.path.isfile(self.out):
            return self
        try:
            self.created = not os.path.exists(self.out)
            os.makedirs(self.out, exist_ok=True)
            self.fd = os.open(self.out, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise SlimkitError(f"{self.out}: cannot write ({os.strerror(e.errno)})") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            self.created = False
            raise SlimkitError(f"{self.out} is being written by another slimkit process; wait for it to finish "
                               f"or choose another --out") from None
        return self

    def __exit__(self, *exc) -> None:
        import os

        if self.fd is not None:
            if self.created:
                try:
                    os.rmdir(self.out)  # only if still empty: the command failed before writing
                except OSError:
                    pass
            os.close(self.fd)
            self.fd = None
