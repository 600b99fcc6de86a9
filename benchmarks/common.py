"""Shared plumbing for benchmark scripts: tables, machine description, docs/benchmarks.md sections.

Each benchmark owns one section of docs/benchmarks.md between ``<!-- begin NAME -->`` and
``<!-- end NAME -->`` markers and rewrites only that section, with the exact command, the
machine and the date, so results from different scripts live side by side.
"""

from __future__ import annotations

import copy
import datetime
import os
import platform
import re
import shlex
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
CIFAR = os.path.join(SHARED, "data", "cifar10-jpeg")
DOC = os.path.join(ROOT, "docs", "benchmarks.md")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    load = ", load average {:.1f}/{:.1f}/{:.1f} when recorded (other jobs share this machine)".format(*os.getloadavg())
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}{load}"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(path: str, name: str, section_body: str, header: str) -> None:
    """Replace the ``<!-- begin NAME -->`` ... ``<!-- end NAME -->`` section of ``path`` (or append it), atomically."""
    section = f"<!-- begin {name} -->\n{section_body.strip()}\n<!-- end {name} -->"
    text = open(path).read() if os.path.exists(path) else header
    pattern = re.compile(rf"<!-- begin {re.escape(name)} -->.*?<!-- end {re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def record(name: str, title: str, body: str) -> None:
    """Print ``body`` and write it as section ``name`` of docs/benchmarks.md with provenance."""
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(body)
    write_section(DOC, name,
                  f"## {title}\n\nCommand: `{command}`  \nMachine: {machine()}  \nDate: {stamp}\n\n{body.strip()}",
                  "# Benchmarks\n\nEvery table below was written by the script named in its command line.\n")


_SUBSET_STREAM = {"train": 8, "test": 9, "val": 10}  # fixed seed streams: the same subset in every script


def with_subset(data, split: str, n: int | None, seed: int = 0):
    """A shallow copy of the dataset ``data`` whose ``split`` is a seeded class-balanced subset of ``n`` images.

    ``n=None`` returns ``data`` itself. The same ``(split, n, seed)`` gives the same images in
    every benchmark, so budgets stated as "N train images" compare across scripts.
    """
    from slimkit.data.splits import balanced_subset, make_rng

    if n is None:
        return data
    out = copy.copy(data)
    part = data.split(split)
    setattr(out, split, part.subset(balanced_subset(part.labels.numpy(), n, make_rng(seed, _SUBSET_STREAM[split]))))
    return out

