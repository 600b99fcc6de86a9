"""Recipes: one pipeline that runs registered stages in order and measures after each.

A recipe (YAML or a dict) names the model, the data and an ordered list of stages::

    model: resnet20
    weights: ../shared/models/resnet20-12fca82f.th
    data: cifar10:../shared/data/cifar10-jpeg
    stages:
      - method: finetune
        epochs: 2
        lr: 0.01

Every stage is a function registered with :func:`register_stage` taking ``(model, ctx, **params)``
and returning the (possibly new) model; pruning, quantization, distillation and decomposition
register theirs the same way. Any stage may carry ``finetune: {epochs: ..., lr: ...}`` to recover
accuracy right after it, and ``finetune: {distill: kd, ...}`` makes that recovery a distillation
with the model as it was before the stage as the teacher. After each stage the pipeline evaluates on the validation split (used
for decisions) and the test split (reported only), counts parameters and MACs, records it all in
the model's provenance, and finally writes the artifact and a JSON report.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from torch import nn

from .artifact import atomic_write_text, history, save
from .data import Dataset, load as load_data
from .errors import SlimkitError
from .models import create_model
from .registry import Registry
from .train import check_input, evaluate, fit

Stage = Callable[..., nn.Module]
STAGES: Registry[Stage] = Registry("stage")
RECIPE_KEYS = {"model", "weights", "num_classes", "data", "limit", "seed", "batch_size", "device", "stages",
               "val_size", "progress"}


# Modules that register stages when imported; loaded on first lookup so `import slimkit` stays light.
STAGE_MODULES = ("slimkit.quant", "slimkit.transform", "slimkit.prune", "slimkit.distill")


def get_stage(name: str) -> Stage:
    """The registered stage ``name``, importing the optional stage modules on first use."""
    if name not in STAGES:
        import importlib

        for module in STAGE_MODULES:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as e:
                if e.name != module:
                    raise
    return STAGES.get(name)


def register_stage(name: str) -> Callable[[Stage], Stage]:
    """Register ``fn(model, ctx, **params) -> nn.Module`` as the recipe stage ``name``."""
    return STAGES.register(name)


@dataclass
class Context:
    """What a stage may use besides the model: the data, where to write, and run settings."""

    data: Dataset
    out_dir: str
    seed: int = 0
    batch_size: int = 128
    device: str = "cpu"
    progress: bool = True
    stage_index: int = 0
    # what the running stage wants kept in its provenance record (e.g. which layers it replaced)
    details: dict[str, Any] = field(default_factory=dict)

    def stage_dir(self, name: str) -> str:
        path = os.path.join(self.out_dir, "stages", f"{self.stage_index:02d}-{name}")
        os.makedirs(path, exist_ok=True)
        return path


FIT_ARGS = {"epochs", "optimizer", "lr", "weight_decay", "momentum", "schedule", "warmup_epochs",
            "label_smoothing", "grad_clip"}


def run_finetune(model: nn.Module, ctx: Context, *, batch_size: int | None = None, extra_losses=None,
                 **params) -> nn.Module:
    """Fine-tune with the engine on the context's train split (checkpointed, resumable)."""
    unknown = set(params) - FIT_ARGS
    if unknown:
        raise SlimkitError(f"finetune: unknown option(s) {sorted(unknown)} (known: {sorted(FIT_ARGS)})")
    params.setdefault("epochs", 1)
    params.setdefault("lr", 0.01)
    loader = ctx.data.loader("train", batch_size or ctx.batch_size, seed=ctx.seed)
    fit(model, loader, seed=ctx.seed, device=ctx.device, progress=ctx.progress, extra_losses=extra_losses,
        checkpoint_dir=ctx.stage_dir("finetune"), **params)
    return model


@register_stage("finetune")
def finetune_stage(model: nn.Module, ctx: Context, **params) -> nn.Module:
    """Recipe stage: fine-tune the model (options as :func:`slimkit.train.fit`)."""
    return run_finetune(model, ctx, **params)


def measure(model: nn.Module, ctx: Context) -> dict:
    """Validation and test accuracy, parameters and MACs of ``model`` on the context's data."""
    from .profile import profile

    bs = ctx.batch_size
    val = evaluate(model, ctx.data.loader("val", bs), device=ctx.device) if len(ctx.data.val) else None
    test = evaluate(model, ctx.data.loader("test", bs), device=ctx.device)
    example = torch.zeros(1, *ctx.data.info.input_size, device=ctx.device)
    prof = profile(model, example)
    return {"val_top1": val["top1"] if val else None, "test_top1": test["top1"], "test_top5": test["top5"],
            "test_n": test["n"], "params": prof.params, "macs": prof.macs}


def load_recipe(path: str) -> dict:
    """Read and validate a YAML recipe file (``yaml.safe_load``: data only, never objects)."""
    if not os.path.isfile(path):
        raise SlimkitError(f"recipe not found: {path}")
    try:
        with open(path) as f:
            recipe = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise SlimkitError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    return validate_recipe(recipe, path)


def validate_recipe(recipe: Any, where: str = "recipe") -> dict:
    """Check a recipe's keys and stage names up front, so a typo fails before any training."""
    if not isinstance(recipe, dict):
        raise SlimkitError(f"{where}: a recipe is a mapping with keys model, data, stages")
    unknown = set(recipe) - RECIPE_KEYS
    if unknown:
        raise SlimkitError(f"{where}: unknown key(s) {sorted(unknown)} (known: {sorted(RECIPE_KEYS)})")
    for key in ("model", "data"):
        if not isinstance(recipe.get(key), str):
            raise SlimkitError(f"{where}: '{key}' must be given as a string")
    stages = recipe.get("stages") or []
    if not isinstance(stages, list):
        raise SlimkitError(f"{where}: 'stages' must be a list")
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict) or "method" not in stage:
            raise SlimkitError(f"{where}: stage {i + 1} must be a mapping with a 'method'")
        get_stage(stage["method"])
        if "finetune" in stage and not isinstance(stage["finetune"], dict):
            raise SlimkitError(f"{where}: stage {i + 1} 'finetune' must be a mapping of fit options")
    return recipe


def run_recipe(recipe: dict, out_dir: str, *, progress: bool | None = None,
               log: Callable[[str], None] = print) -> dict:
    """Run a recipe end to end; write ``model.safetensors`` and ``report.json`` to ``out_dir``.

    Returns the report: the metrics before any stage and after each stage, the artifact path
    and its size on disk.
    """
    recipe = validate_recipe(copy.deepcopy(recipe))
    seed = int(recipe.get("seed", 0))
    data = load_data(recipe["data"], limit=recipe.get("limit"), seed=seed, val_size=recipe.get("val_size", 0.1))
    model = create_model(recipe["model"], num_classes=recipe.get("num_classes"), weights=recipe.get("weights"))
    model.to(recipe.get("device", "cpu"))
    ctx = Context(data=data, out_dir=out_dir, seed=seed, batch_size=int(recipe.get("batch_size", 128)),
                  device=recipe.get("device", "cpu"),
                  progress=recipe.get("progress", True) if progress is None else progress)
    x, _ = next(iter(data.loader("val" if len(data.val) else "test", 2)))
    check_input(model, x.to(ctx.device), data.info.num_classes, f"dataset {recipe['data']}")
    os.makedirs(out_dir, exist_ok=True)

    steps = [{"stage": "input", "params": {}, "seconds": 0.0, "metrics": measure(model, ctx)}]
    log(f"input: {_fmt(steps[0]['metrics'])}")
    for i, stage in enumerate(recipe.get("stages") or [], start=1):
        params = {k: v for k, v in stage.items() if k not in ("method", "finetune")}
        ctx.stage_index, ctx.details = i, {}
        t0 = time.perf_counter()
        recovery = dict(stage.get("finetune") or {})
        distill = recovery.pop("distill", None)
        spec, spec_weights = recovery.pop("teacher", None), recovery.pop("teacher_weights", None)
        if (spec or spec_weights) and not distill:
            raise SlimkitError(f"stage {i} ({stage['method']}): finetune.teacher goes with finetune.distill")
        if spec:  # another teacher, e.g. a deeper network trained on the same data
            from .distill import load_teacher

            teacher = load_teacher(spec, spec_weights, data.info.num_classes, sample=x,
                                   what=f"dataset {recipe['data']}", device=ctx.device)
        else:  # the model as it was before this stage teaches the compressed one (`finetune: {distill: kd}`)
            teacher = copy.deepcopy(model) if distill else None
        model = get_stage(stage["method"])(model, ctx, **params)
        if distill:
            from .distill import finetune_with_distillation

            opts = recovery.pop("distill_options", {})
            model = finetune_with_distillation(model, ctx, distill, teacher, fit_options=recovery, **opts)
        elif recovery:
            model = run_finetune(model, ctx, **recovery)
        metrics = measure(model, ctx)
        record = {"stage": stage["method"], "params": params, "finetune": stage.get("finetune"),
                  "seconds": time.perf_counter() - t0, "metrics": metrics}
        if ctx.details:
            record["details"] = ctx.details
        history(model).append(record)
        steps.append(record)
        log(f"{i}. {stage['method']}: {_fmt(metrics)}")

    artifact = os.path.join(out_dir, "model.safetensors")
    save(model, artifact, meta={"dataset": recipe["data"], "input_size": list(data.info.input_size),
                                "classes": list(data.info.classes), "recipe": recipe})
    report = {"recipe": recipe, "steps": steps, "artifact": artifact, "artifact_bytes": os.path.getsize(artifact)}
    atomic_write_text(os.path.join(out_dir, "report.json"), json.dumps(report, indent=2))
    return report


def _fmt(m: dict) -> str:
    val = f"{m['val_top1']:.4f}" if m["val_top1"] is not None else "-"
    return f"val top1 {val}, test top1 {m['test_top1']:.4f}, params {m['params']:,}, MACs {m['macs']:,}"
