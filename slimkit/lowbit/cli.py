"""``slimkit lowbit``: low-bit weights and activations, trained, written as the artifact and the packed file.

    slimkit lowbit resnet20 --weights W --data D --method lsq --weight-bits 4 --act-bits 4 --finetune-epochs 2 --out o/

Wired into ``slimkit/cli.py`` through its ``PLUGIN_COMMANDS`` table.
"""

from __future__ import annotations

import argparse
import time

from ..sparse.cli import FINETUNE_RENAME, _add_common, _finish, _setup


def command_configs() -> dict[str, tuple[type, dict]]:
    """The configs ``slimkit lowbit`` turns into flags."""
    from ..pipeline import FinetuneConfig
    from . import LowBitConfig

    return {"lowbit": (LowBitConfig, {"title": "low-bit quantization"}),
            "finetune": (FinetuneConfig, {"title": "quantization-aware training", "prefix": "finetune_",
                                          "only": tuple(FINETUNE_RENAME), "rename": FINETUNE_RENAME,
                                          "defaults": {"epochs": 0}})}


def add_lowbit_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``slimkit lowbit MODEL --method M [--weight-bits B] [--act-bits B] --data D --out DIR``."""
    return _add_common(parser, command_configs())


def cli_lowbit(args: argparse.Namespace) -> dict:
    """Quantize weights (and activations) below 8 bits with training; report accuracy and bytes on disk."""
    from ..sparse import finetuner
    from . import LowBitConfig, lowbit

    config = LowBitConfig.from_args(args)
    tune, data, model, test, before, ctx = _setup(args, True, f"--method {config.method}")
    teacher = model if tune.distill and not tune.teacher else None
    t0 = time.perf_counter()
    result = lowbit(model, config, loader=data.loader("train", args.batch_size, seed=args.seed),
                    finetune=finetuner(ctx, tune, teacher), epochs=tune.epochs)
    acts = f", inputs at {config.act_bits} bits" if config.act_bits else ", activations float"
    return _finish(args, model, result.model, data, test, before,
                   {"stage": "lowbit", "params": config.to_dict(), "finetune": tune.to_dict(),
                    "details": result.summary()},
                   {"method": config.method, "seconds": time.perf_counter() - t0, "lowbit": result.summary()},
                   f"{config.method}: weights at {config.bits} bit(s){acts}; first conv and classifier at "
                   f"{config.edge_bits} bits")
