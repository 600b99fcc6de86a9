"""The training engine every method reuses: :func:`fit` and :func:`evaluate`.

``fit`` minimises cross-entropy plus any number of extra loss terms (distillation and sparsity
regularisers plug in here as :class:`LossTerm` callables), with a per-step learning-rate
schedule, seeded determinism and an atomic checkpoint after every epoch. Data order and
augmentation are a pure function of (seed, epoch) (see :mod:`slimkit.data`), so a run killed
after epoch k and resumed from its checkpoint continues bit for bit as if never stopped.
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..artifact import atomic_write
from ..errors import SlimkitError, first_line
from .optim import build_optimizer
from .schedules import build_schedule

CHECKPOINT = "last.pt"


@dataclass
class Batch:
    """What a loss term sees at one training step."""

    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    logits: torch.Tensor
    epoch: int
    step: int


LossTerm = Callable[[Batch], torch.Tensor]


@dataclass
class FitResult:
    """Per-epoch log of a run (loss, accuracy, lr, seconds, images/s; val metrics when given)."""

    epochs: list[dict] = field(default_factory=list)

    @property
    def last(self) -> dict:
        return self.epochs[-1] if self.epochs else {}


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so initialisation and dropout are repeatable."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool):
    if not enabled or not sys.stderr.isatty():  # bars in a log file are noise
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def _distributed() -> tuple[int, int]:
    """(rank, world size) of a running ``torch.distributed`` job, (0, 1) otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_input(model: nn.Module, x: torch.Tensor, num_classes: int | None = None, what: str = "data") -> None:
    """Run one forward pass and turn a shape error into a one-line :class:`SlimkitError`."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:2])
    except SlimkitError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the forward is this input not fitting this model
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SlimkitError(f"the model cannot take input of shape {tuple(x.shape[1:])} from {what}: "
                           f"{type(e).__name__}: {first}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise SlimkitError(f"the model returned {type(out).__name__} of shape {getattr(out, 'shape', '?')}, "
                           "expected class logits of shape (batch, classes)")
    if num_classes is not None and out.shape[1] != num_classes:
        raise SlimkitError(f"the model predicts {out.shape[1]} classes but {what} has {num_classes}: "
                           "build it with num_classes to match")


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, device: str | torch.device = "cpu",
             progress: bool = False) -> dict:
    """Top-1 and top-5 accuracy (fractions), mean cross-entropy and sample count over ``loader``."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = 0
    loss_sum, n = 0.0, 0
    try:
        total = len(loader) if hasattr(loader, "__len__") else None
        for x, y in _progress(loader, total, "eval", progress):
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top.eq(y[:, None])
            correct1 += hit[:, 0].sum().item()
            correct5 += hit.any(dim=1).sum().item()
            n += y.numel()
    finally:
        model.train(was_training)
    if n == 0:
        raise SlimkitError("evaluation data is empty")
    return {"top1": correct1 / n, "top5": correct5 / n, "loss": loss_sum / n, "n": n}


def first_nonfinite(model: nn.Module, x: torch.Tensor) -> str:
    """Where NaN/Inf first appears in ``model`` on input ``x``: a parameter, the input, or a layer's output.

    Re-runs the forward with hooks (no grad, the model's mode kept) and names the first module,
    in execution order, whose output holds a non-finite value; used to turn "loss is nan" into a
    message a user can act on.
    """
    bad_params = [n for n, p in model.named_parameters() if not torch.isfinite(p.detach()).all()]
    if bad_params:
        return f"parameter {bad_params[0]} is already NaN/Inf"
    if not torch.isfinite(x).all():
        return "the input batch holds NaN/Inf"
    found: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(m, args, out):
        if not found and isinstance(out, torch.Tensor) and out.is_floating_point() and not torch.isfinite(out).all():
            found.append(f"layer {names.get(m) or '(model)'} ({type(m).__name__})")

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return f"first NaN/Inf in the output of {found[0]}" if found else "the outputs are finite; the loss overflowed"


def load_checkpoint(path: str) -> dict:
    """Read a training checkpoint safely (``weights_only``: tensors and plain containers only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SlimkitError(f"{path}: not a readable slimkit checkpoint ({first_line(e)})") from e


def fit(model: nn.Module, train: Iterable, *, epochs: int, val: Iterable | None = None,
        optimizer: str = "sgd", lr: float = 0.1, weight_decay: float = 5e-4, momentum: float = 0.9,
        schedule: str = "cosine", warmup_epochs: float = 0.0, label_smoothing: float = 0.0,
        extra_losses: Mapping[str, LossTerm] | None = None, checkpoint_dir: str | None = None,
        resume: bool = True, seed: int = 0, device: str | torch.device = "cpu", progress: bool = True,
        grad_clip: float | None = None, on_epoch_end: Callable[[int, dict], None] | None = None) -> FitResult:
    """Train ``model`` in place for ``epochs`` epochs and return the per-epoch log.

    The loss is cross-entropy (with optional label smoothing) plus the sum of ``extra_losses``
    (each ``term(batch) -> scalar``, logged under its name). Optimizers: ``sgd``, ``adam``,
    ``adamw``, ``yogi`` (Zaheer et al., NeurIPS 2018) and ``accelegrad`` (Levy et al., NeurIPS
    2018); schedules: ``cosine``, ``onecycle`` (Smith & Topin 2017) and ``constant``, stepped
    per batch. With ``checkpoint_dir`` a checkpoint is written atomically after every epoch and,
    when ``resume`` is set, a run finds it and continues at the next epoch with identical model,
    optimizer, schedule and RNG state. ``train`` is a :class:`slimkit.data.Loader` (anything with
    ``set_epoch`` is reseeded per epoch) or any iterable of ``(inputs, targets)``.

    Data-parallel: started by ``torchrun`` (``torch.distributed`` initialised, gloo on CPU), every
    process reads the same batches (a seeded loader gives each the same order) and trains on its
    share ``x[rank::world]`` with gradients averaged by ``DistributedDataParallel``, so each step
    follows the same global batch as one process would (exactly, for a model without batch norm:
    its statistics are per process); only rank 0 prints and writes checkpoints.
    """
    if epochs < 0:
        raise SlimkitError(f"epochs must be >= 0, got {epochs}")
    extra_losses = dict(extra_losses or {})
    steps_per_epoch = len(train)
    if steps_per_epoch == 0:
        raise SlimkitError("training data is empty")
    seed_everything(seed)
    model.to(device)
    rank, world = _distributed()
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model)
        progress = progress and rank == 0
    opt = build_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad], lr=lr,
                          weight_decay=weight_decay, momentum=momentum)
    sched = build_schedule(schedule, opt, max(1, epochs * steps_per_epoch), int(warmup_epochs * steps_per_epoch))
    result, start = FitResult(), 0
    ckpt_path = os.path.join(checkpoint_dir, CHECKPOINT) if checkpoint_dir else None
    if ckpt_path and resume and os.path.exists(ckpt_path):
        state = load_checkpoint(ckpt_path)
        try:
            if not isinstance(state, dict) or not isinstance(state.get("epoch"), int) or not isinstance(
                    state.get("log"), list) or state["epoch"] < 0:
                raise ValueError("not a slimkit training checkpoint (epoch, log)")
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["schedule"])
            torch.set_rng_state(state["torch_rng"])
        except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as e:
            raise SlimkitError(f"{ckpt_path} does not match this model/optimizer: {str(e).splitlines()[0]}") from None
        start, result.epochs = state["epoch"], list(state["log"])
    elif ckpt_path:
        os.makedirs(checkpoint_dir, exist_ok=True)

    for epoch in range(start, epochs):
        if hasattr(train, "set_epoch"):
            train.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        sums = {"loss": torch.zeros(()), "correct": torch.zeros(()), **{k: torch.zeros(()) for k in extra_losses}}
        n = 0
        bar = _progress(train, steps_per_epoch, f"epoch {epoch + 1}/{epochs}", progress)
        for step, (x, y) in enumerate(bar):
            if world > 1:
                x, y = x[rank::world], y[rank::world]
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = net(x)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
            total = loss
            if extra_losses:
                batch = Batch(model, x, y, logits, epoch, epoch * steps_per_epoch + step)
                for name, term in extra_losses.items():
                    value = term(batch)
                    sums[name] += value.detach().cpu() * y.numel()
                    total = total + value
            if not torch.isfinite(total.detach()).all():
                where = first_nonfinite(model, x)
                raise SlimkitError(f"training: the loss became NaN/Inf at epoch {epoch + 1}, step {step + 1}: "
                                   f"{where} (try a lower --lr or --grad-clip)")
            opt.zero_grad(set_to_none=True)
            total.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            sched.step()
            sums["loss"] += loss.detach().cpu() * y.numel()
            sums["correct"] += (logits.detach().argmax(1) == y).sum().cpu()
            n += y.numel()
            if progress and step % 10 == 0 and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{sums['loss'].item() / n:.3f}", acc=f"{sums['correct'].item() / n:.3f}")
        seconds = time.perf_counter() - t0
        if world > 1:  # the epoch's log covers every process's share
            import torch.distributed as dist

            totals = torch.stack([*sums.values(), torch.tensor(float(n))])
            dist.all_reduce(totals)
            sums = dict(zip(sums, totals[:-1]))
            n = int(totals[-1].item())
        record = {"epoch": epoch + 1, "loss": sums["loss"].item() / n, "top1": sums["correct"].item() / n,
                  "lr": opt.param_groups[0]["lr"], "seconds": seconds, "images_per_s": n / seconds}
        record.update({k: sums[k].item() / n for k in extra_losses})
        if val is not None:
            record.update({f"val_{k}": v for k, v in evaluate(model, val, device=device).items() if k != "n"})
        result.epochs.append(record)
        if progress:
            from ..progress import duration

            shown = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch")
            spent = sum(r["seconds"] for r in result.epochs[-(epoch + 1 - start):])
            eta = spent / (epoch + 1 - start) * (epochs - epoch - 1)
            print(f"epoch {epoch + 1}/{epochs}: {shown}" + (f", ETA {duration(eta)}" if epoch + 1 < epochs else ""),
                  flush=True)
        if ckpt_path and rank == 0:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "schedule": sched.state_dict(),
                     "epoch": epoch + 1, "log": result.epochs, "torch_rng": torch.get_rng_state()}
            atomic_write(ckpt_path, lambda tmp: torch.save(state, tmp))
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
    model.eval()
    return result
