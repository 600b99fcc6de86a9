#!/usr/bin/env python3
"""Set everything up, then run a job: `python3 bootstrap.py demo`, `python3 bootstrap.py test` or `... lint`.

Needs nothing but Python >= 3.11. Creates .venv beside this file, installs PyTorch and slimkit
into it (again only when pyproject.toml changed), then runs `slimkit ARGS...` or, for `test`,
the test suite (`pytest ARGS...`): the tests that assert on measured time (marked `timing`) alone,
after the rest on every core (pytest-xdist, one file per worker); `-n N` or `-p no:xdist` in ARGS
runs one plain pytest instead.
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


def _marker(rest: list[str]) -> tuple[str, list[str]]:
    """The ``-m`` expression of ``rest`` (pyproject's default when none) and ``rest`` without it."""
    expr, out, i = "not slow", [], 0
    while i < len(rest):
        if rest[i] == "-m" and i + 1 < len(rest):
            expr, i = rest[i + 1], i + 2
            continue
        if rest[i].startswith("-m") and rest[i] != "-m":
            expr = rest[i][2:]
        else:
            out.append(rest[i])
        i += 1
    return expr, out


def run_tests(rest: list[str], env: dict) -> int:
    """pytest: the untimed tests on every core, then the ``timing`` ones alone (their measurements must not share
    the CPU with another test); one plain run when ``rest`` chooses the workers itself or there is one core."""
    cores = os.cpu_count() or 1
    if cores < 2 or any(a == "-n" or a.startswith("-n") or a == "no:xdist" for a in rest):
        return subprocess.call([PY, "-m", "pytest", *rest], cwd=ROOT, env=env)
    expr, rest = _marker(rest)
    phases = [(f"({expr}) and not timing", ["-n", str(cores), "--dist", "loadfile"]),
              (f"({expr}) and timing", ["-p", "no:xdist"])]
    codes = []
    for mark, extra in phases:
        print(f"+ pytest -m {mark!r} {' '.join(extra)}", flush=True)
        codes.append(subprocess.call([PY, "-m", "pytest", *rest, "-m", mark, *extra], cwd=ROOT, env=env))
    # 5 = no test selected in that phase (e.g. -k picked only timed tests): not a failure while the other ran
    failed = [c for c in codes if c not in (0, 5)]
    return failed[0] if failed else (5 if all(c == 5 for c in codes) else 0)


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    setup()
    job, rest = sys.argv[1], sys.argv[2:]
    env = dict(os.environ)
    if job == "test":
        return run_tests(rest, env)
    elif job == "lint":  # ruff, configured in pyproject.toml
        cmd = [PY, "-m", "ruff", "check", ROOT, *rest]
    elif job == "setup":
        return 0
    else:
        cmd = [os.path.join(BIN, "slimkit"), job, *rest]
    return subprocess.call(cmd, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
