"""Learning-rate schedules, stepped once per optimizer step.

Both are ``torch.optim.lr_scheduler`` objects, so their state round-trips through a checkpoint
and a resumed run continues on exactly the same curve.
"""

from __future__ import annotations

import math

import torch

from ..errors import SlimkitError
from ..registry import Registry

SCHEDULES: Registry = Registry("schedule")


@SCHEDULES.register("constant")
def constant(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0):
    """Constant learning rate after an optional linear warm-up."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0,
                                                                      (s + 1) / warmup_steps) if warmup_steps else 1.0)


@SCHEDULES.register("cosine")
def cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0):
    """Linear warm-up, then cosine decay to zero (Loshchilov & Hutter, "SGDR", ICLR 2017, without restarts)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@SCHEDULES.register("onecycle")
def onecycle(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0):
    """One-cycle policy (Smith & Topin, "Super-Convergence", 2017): rise to the peak lr, anneal far below.

    The peak is the optimizer's lr; the rise takes ``warmup_steps`` (default 30% of the run).
    Momentum (or Adam's beta1) cycles inversely where the optimizer has one.
    """
    defaults = optimizer.defaults
    cycle_momentum = bool(defaults.get("momentum")) or "betas" in defaults
    pct = warmup_steps / total_steps if warmup_steps else 0.3
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=max(total_steps, 2),
        pct_start=min(max(pct, 0.01), 0.99), cycle_momentum=cycle_momentum)


def build_schedule(name: str, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0):
    """The named schedule over ``total_steps`` optimizer steps."""
    if total_steps <= 0:
        raise SlimkitError(f"schedule {name!r} needs a positive number of steps, got {total_steps}")
    return SCHEDULES.get(name)(optimizer, total_steps, warmup_steps)
