"""``slimkit pack``: any artifact as a packed file (:mod:`slimkit.sparse.pack`), its size broken down.

Wired into ``slimkit/cli.py`` through its ``PLUGIN_COMMANDS`` table.
"""

from __future__ import annotations

import argparse
import os

from ..cli import logger


def command_configs() -> dict[str, tuple[type, dict]]:
    """``slimkit pack`` has no method options."""
    return {}


def add_pack_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``slimkit pack ARTIFACT --out FILE.slimpack``."""
    parser.add_argument("model", help="a slimkit artifact (.safetensors, or a folder holding model.safetensors)")
    parser.add_argument("--out", required=True, help="the packed file to write (.slimpack)")
    return parser


def cli_pack(args: argparse.Namespace) -> dict:
    """Write an artifact as a packed file: sparse indices, codebooks and codes, entropy-coded (Han et al. 2016)."""
    from ..artifact import artifact_file, load
    from . import pack, sizes

    source = artifact_file(args.model)
    model = load(source, trust_code=getattr(args, "trust_code", None))
    path = pack(model, args.out)
    breakdown = sizes(path)
    before = os.path.getsize(source)
    logger(args)(f"{source}: {before:,} -> {breakdown['file']:,} bytes ({before / breakdown['file']:.1f}x); "
                 f"wrote {path}")
    return {"source": source, "source_bytes": before, "packed": path, **breakdown}
