#!/usr/bin/env python3
"""Set everything up, then run a job: `python3 bootstrap.py demo`, `python3 bootstrap.py test` or `... lint`.

Needs nothing but Python >= 3.11. Creates .venv beside this file, installs PyTorch and slimkit
into it (again only when pyproject.toml changed), then runs `slimkit ARGS...` or, for `test`,
the test suite (`pytest ARGS...`).
"""

import hashlib
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(ROOT, ".venv")
BIN = os.path.join(VENV, "Scripts" if os.name == "nt" else "bin")
PY = os.path.join(BIN, "python")
# The releases this project is tested with; pip finds them on the project's machines without downloading.
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def setup() -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"slimkit needs Python >= 3.11, this is {sys.version.split()[0]}")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        want = hashlib.sha256(f.read() + " ".join(TORCH).encode()).hexdigest()
    stamp = os.path.join(VENV, ".slimkit-setup")
    if os.path.exists(stamp) and open(stamp).read() == want:
        return
    if not os.path.exists(PY):
        run([sys.executable, "-m", "venv", VENV])
    pip = [PY, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    run(pip + TORCH)
    run(pip + ["-e", f"{ROOT}[test,export,search,timm]"])
    with open(stamp, "w") as f:
        f.write(want)


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    setup()
    job, rest = sys.argv[1], sys.argv[2:]
    env = dict(os.environ)
    if job == "test":
        cmd = [PY, "-m", "pytest", *rest]
    elif job == "lint":  # ruff, configured in pyproject.toml
        cmd = [PY, "-m", "ruff", "check", ROOT, *rest]
    elif job == "setup":
        return 0
    else:
        cmd = [os.path.join(BIN, "slimkit"), job, *rest]
    return subprocess.call(cmd, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
