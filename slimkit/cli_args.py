"""The arguments every command shares: the model it loads and the data it runs on (one help text each)."""

from __future__ import annotations

import argparse

MODEL_HELP = "registered name, torchvision:NAME, file.py:fn or an artifact path"
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
