"""Recipes: one pipeline that runs registered stages in order and measures after each.

A recipe (YAML or a dict) names the model, the data and an ordered list of stages::

    model: resnet20
    weights: ../shared/models/resnet20-12fca82f.th
    data: cifar10:../shared/data/cifar10-jpeg
    runtime: onnxruntime                  # optional: the runtime the model is tuned for (kept in its meta)
    bench: {runtimes: [eager, onnxruntime], batch_sizes: [1, 64]}   # optional: latency after each stage
    stages:
      - method: finetune
        epochs: 2
        lr: 0.01

Every stage is a function ``(model, ctx, config) -> model`` registered with :func:`register_stage`
together with its config class (:mod:`slimkit.config`), so a stage's options are validated when the
recipe is loaded, before any data is read, and recorded as the config's ``to_dict()``. Any stage may
carry ``finetune: {epochs: ..., lr: ...}`` (a :class:`FinetuneConfig`) to recover accuracy right after
it, and ``finetune: {distill: kd, ...}`` makes that recovery a distillation with the model as it was
before the stage as the teacher. After each stage the pipeline evaluates on the validation split
(used for decisions) and the test split (reported only), counts parameters and MACs, records it all
in the model's provenance, and finally writes the artifact and a JSON report.
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
from .config import option
from .data import Dataset
from .data import load as load_data
from .errors import SlimkitError
from .models import create_model
from .registry import Registry
from .train import check_input, evaluate, fit
from .train.config import FitConfig

StageFn = Callable[..., nn.Module]


@dataclass(frozen=True)
class StageEntry:
    """A registered recipe stage and its facts.

    ``run(model, ctx, config) -> model`` does the work; ``config`` is the :class:`~slimkit.config.MethodConfig`
    class of its options (a recipe stage's keys, validated when the recipe is loaded); ``paper``
    cites the method; ``example`` holds options that run in seconds on the digits CNN, used by the
    contract tests (:mod:`slimkit.testing`) and the generated docs.
    """

    name: str
    run: StageFn
    config: type
    paper: str = ""
    example: dict = field(default_factory=dict)
    # the stage runs its recipe's ``finetune:`` itself, while what it holds during training (sparsity
    # masks, shared codebooks) is attached: it is called as ``run(model, ctx, config, recovery=...)``
    trains: bool = False

    @property
    def summary(self) -> str:
        doc = (self.run.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def __call__(self, model: nn.Module, ctx: "Context", config=None, **options) -> nn.Module:
        """Run the stage with ``config`` or with options that build one (``entry(model, ctx, epochs=2)``)."""
        if config is None:
            config = self.config.from_options(options, where=f"{self.name} stage")
        elif options:
            raise SlimkitError(f"{self.name} stage: give a config or options, not both")
        return self.run(model, ctx, config)


STAGES: Registry[StageEntry] = Registry("stage")


# Modules that register stages when imported; loaded on first lookup so `import slimkit` stays light.
STAGE_MODULES = ("slimkit.quant", "slimkit.transform", "slimkit.prune", "slimkit.distill", "slimkit.decompose",
                 "slimkit.sparse", "slimkit.lowbit")


def load_stage_modules() -> None:
    """Import the packages that register stages (a fixed list: nothing is imported by a name read from a file)."""
    import importlib

    for module in STAGE_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


def get_stage(name: str) -> StageEntry:
    """The registered stage ``name``, importing the optional stage modules on first use."""
    if name not in STAGES:
        load_stage_modules()
    return STAGES.get(name)


def register_stage(name: str, *, config: type, paper: str = "", example: dict | None = None,
                   trains: bool = False) -> Callable[[StageFn], StageFn]:
    """Register ``fn(model, ctx, config) -> nn.Module`` as the recipe stage ``name`` with its config class.

    Args:
        name: the recipe's ``method``.
        config: the :class:`~slimkit.config.MethodConfig` subclass of the stage's options.
        paper: the method's citation.
        example: options that run in seconds on the digits CNN (contract tests, docs).
        trains: the stage runs the recipe's ``finetune:`` itself (``fn(..., recovery=FinetuneConfig | None)``).
    """

    def deco(fn: StageFn) -> StageFn:
        STAGES.register(name)(StageEntry(name, fn, config, paper, dict(example or {}), trains))
        return fn

    return deco


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
    bench: Any = None  # a BenchConfig: time the model per runtime after every stage

    def stage_dir(self, name: str) -> str:
        path = os.path.join(self.out_dir, "stages", f"{self.stage_index:02d}-{name}")
        os.makedirs(path, exist_ok=True)
        return path


FIT_ARGS = set(FitConfig.field_names())


def _distill_methods() -> list[str]:
    from .distill import METHODS

    return METHODS.names()


@dataclass(frozen=True)
class FinetuneConfig(FitConfig):
    """Fine-tuning after (or as) a stage: :class:`~slimkit.train.config.FitConfig`, optionally as distillation.

    ``distill`` names the distillation method(s) (``kd``, ``at+kd``; :mod:`slimkit.distill`); the
    teacher is the model as it was before the stage, or ``teacher`` (a model spec or artifact, e.g. a
    deeper network trained on the same data) with ``teacher_weights``; ``distill_options`` are the
    method's (``T``, ``alpha``, ...).

    Example:
        >>> FinetuneConfig(epochs=2, distill="kd").to_dict()["distill"]
        'kd'
    """

    family = "finetune"

    distill: str | None = option(None, "fine-tune by distillation from the model before the stage (methods joined by "
                                       "'+')", listing=_distill_methods)
    teacher: str | None = option(None, "teacher for --distill instead of the model before the stage: a registered "
                                       "name or artifact path")
    teacher_weights: str | None = option(None, "weights file for --teacher")
    distill_options: dict[str, Any] = option({}, "the distillation method's options (T, alpha, ...)", cli=False)

    def validate(self) -> None:
        if (self.teacher or self.teacher_weights) and not self.distill:
            raise self.error("teacher", "goes with {distill}")
        if self.teacher_weights and not self.teacher:
            raise self.error("teacher_weights", "needs {teacher}")
        if self.distill:
            from .distill import METHODS
            from .distill.config import check_method_options

            for name in self.distill.split("+"):
                if name.strip() not in METHODS:
                    raise self.error("distill",
                                     f"unknown method {name.strip()!r} (known: {', '.join(METHODS.names())})")
            problem = check_method_options(self.distill, self.distill_options)
            if problem:
                raise self.error("distill_options", problem)
        elif self.distill_options:
            raise self.error("distill_options", "go with {distill}")

    @property
    def fit(self) -> FitConfig:
        """The training part alone."""
        return FitConfig(**{k: getattr(self, k) for k in FitConfig.field_names()})


def run_finetune(model: nn.Module, ctx: Context, config: FitConfig | None = None, *, batch_size: int | None = None,
                 extra_losses=None, folder: str = "finetune", **options) -> nn.Module:
    """Fine-tune with the engine on the context's train split (checkpointed in the stage's ``folder``, resumable).

    ``config`` (or ``options`` building a :class:`FitConfig`) says how; a :class:`FinetuneConfig`
    with ``distill`` is run as distillation from its ``teacher`` (see :func:`recover`).
    """
    config = config if config is not None else FitConfig.from_options(options, where="finetune")
    loader = ctx.data.loader("train", batch_size or ctx.batch_size, seed=ctx.seed)
    fit(model, loader, seed=ctx.seed, device=ctx.device, progress=ctx.progress, extra_losses=extra_losses,
        checkpoint_dir=ctx.stage_dir(folder), **config.fit_kwargs())
    return model


def recover(model: nn.Module, ctx: Context, config: FinetuneConfig, before: nn.Module | None) -> nn.Module:
    """Fine-tune ``model`` after a stage as ``config`` says: plainly, or distilled from ``before`` or a teacher."""
    if not config.distill:
        return run_finetune(model, ctx, config.fit)
    from .distill import finetune_with_distillation, load_teacher

    if config.teacher:  # another teacher, e.g. a deeper network trained on the same data
        sample = next(iter(ctx.data.loader("train", 2, shuffle=False, augment=False)))[0]
        teacher = load_teacher(config.teacher, config.teacher_weights, ctx.data.info.num_classes, sample=sample,
                               what=f"dataset {ctx.data.spec}", device=ctx.device)
    else:  # the model as it was before this stage teaches the compressed one (`finetune: {distill: kd}`)
        teacher = before
    return finetune_with_distillation(model, ctx, config.distill, teacher, fit_options=config.fit.fit_kwargs(),
                                      **config.distill_options)


@register_stage("finetune", config=FinetuneConfig, paper="", example={"epochs": 1, "lr": 0.01})
def finetune_stage(model: nn.Module, ctx: Context, config: FinetuneConfig) -> nn.Module:
    """Fine-tune the model (options as :func:`slimkit.train.fit`; with ``distill`` and ``teacher``, by distillation)."""
    return recover(model, ctx, config, copy.deepcopy(model).eval() if config.distill and not config.teacher else None)


def measure(model: nn.Module, ctx: Context) -> dict:
    """Validation and test accuracy, parameters and MACs of ``model``; latency per runtime with ``ctx.bench``."""
    from .profile import profile

    bs = ctx.batch_size
    val = evaluate(model, ctx.data.loader("val", bs), device=ctx.device) if len(ctx.data.val) else None
    test = evaluate(model, ctx.data.loader("test", bs), device=ctx.device)
    example = torch.zeros(1, *ctx.data.info.input_size, device=ctx.device)
    prof = profile(model, example)
    out = {"val_top1": val["top1"] if val else None, "test_top1": test["top1"], "test_top5": test["top5"],
           "test_n": test["n"], "params": prof.params, "macs": prof.macs}
    if ctx.bench is not None:
        from .bench import bench

        b = ctx.bench
        timed = bench(model.cpu(), ctx.data.info.input_size, batch_sizes=b.batch_sizes, threads=b.threads,
                      modes=b.runtimes, repeats=b.repeats, min_time_s=0.1, roofline=False)
        out["latency_ms"] = {mode: {str(n): r["median_ms"] for n, r in by_batch.items()}
                             for mode, by_batch in timed.results.items()}
        if timed.errors:
            out["latency_errors"] = timed.errors
        model.to(ctx.device)
    return out


MAX_RECIPE_BYTES = 1 << 20
# top-level recipe keys and the types their values must have
RECIPE_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,), "weights": (str, type(None)), "num_classes": (int, type(None)), "data": (str,),
    "limit": (int, type(None)), "seed": (int,), "batch_size": (int,), "device": (str,), "stages": (list, type(None)),
    "val_size": (int, float), "progress": (bool,), "bench": (dict,), "runtime": (str,), "pack": (bool,)}
RECIPE_KEYS = set(RECIPE_TYPES)


def load_recipe(path: str) -> dict:
    """Read and validate a YAML recipe file.

    ``yaml.safe_load`` builds plain data only (never objects); the file is at most 1 MiB and the
    document is walked against :mod:`slimkit.documents`' limits, so an alias bomb or a deeply
    nested file fails in one line instead of exhausting memory.

    Raises:
        SlimkitError: missing file, not YAML, out of bounds, or a field of the wrong type.
    """
    from .documents import Limits, check_bounds

    if not os.path.isfile(path):
        raise SlimkitError(f"recipe not found: {path}")
    if os.path.getsize(path) > MAX_RECIPE_BYTES:
        raise SlimkitError(f"{path}: a recipe of {os.path.getsize(path):,} bytes (at most {MAX_RECIPE_BYTES:,})")
    try:
        with open(path, encoding="utf-8") as f:
            recipe = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise SlimkitError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise SlimkitError(f"{path}: not a readable YAML recipe ({type(e).__name__})") from None
    check_bounds(recipe, path, Limits(depth=32, nodes=100_000, string=65_536, items=10_000))
    return validate_recipe(recipe, path, from_file=True)


def validate_recipe(recipe: Any, where: str = "recipe", *, from_file: bool = False) -> dict:
    """Check a recipe's keys, their types and the stage names up front, so a typo fails before any training.

    With ``from_file`` (a recipe read by :func:`load_recipe`), a ``PATH.py:fn`` model or teacher
    is code the file names: it is refused unless that file is trusted (:mod:`slimkit.trust`). A
    recipe built in Python by the caller names its code itself.
    """
    from .documents import expect, field_path
    from .models.registry import document_spec

    if not isinstance(recipe, dict):
        raise SlimkitError(f"{where}: a recipe is a mapping with keys model, data, stages")
    unknown = set(recipe) - RECIPE_KEYS
    if unknown:
        raise SlimkitError(f"{where}: unknown key(s) {sorted(unknown)} (known: {sorted(RECIPE_KEYS)})")
    for key in ("model", "data"):
        if not isinstance(recipe.get(key), str):
            raise SlimkitError(f"{where}: '{key}' must be given as a string")
    for key, types in RECIPE_TYPES.items():
        if key in recipe:
            expect(recipe[key], types, where, (key,))
    if recipe.get("num_classes") is not None and recipe["num_classes"] < 1:
        raise SlimkitError(f"{where}: field num_classes: {recipe['num_classes']} is not a class count")
    if "device" in recipe:
        try:
            torch.device(recipe["device"])
        except (RuntimeError, ValueError):
            raise SlimkitError(f"{where}: field device: {recipe['device']!r} is not a torch device (cpu, cuda, "
                               "cuda:1, ...)") from None
    if "bench" in recipe:  # checked now, before any data is read
        from .bench.config import BenchConfig

        BenchConfig.from_options(recipe["bench"], where=f"{where}: bench")
    if "runtime" in recipe:
        from .bench.runners import MODES

        if recipe["runtime"] not in MODES:
            raise SlimkitError(f"{where}: field runtime: {recipe['runtime']!r} is not one of {', '.join(MODES)}")
    if from_file:
        recipe["model"] = document_spec(recipe["model"], f"{where}: field model")
    for i, stage in enumerate(recipe.get("stages") or []):
        if not isinstance(stage, dict) or "method" not in stage:
            raise SlimkitError(f"{where}: stage {i + 1} must be a mapping with a 'method'")
        expect(stage["method"], str, where, ("stages", i, "method"))
        for holder, path in ((stage, ("stages", i)), (stage.get("finetune") or {}, ("stages", i, "finetune"))):
            if from_file and isinstance(holder, dict) and isinstance(holder.get("teacher"), str):
                # a model spec inside the file: code only if trusted
                holder["teacher"] = document_spec(holder["teacher"],
                                                  f"{where}: field {field_path(path + ('teacher',))}")
        stage_configs(stage, i + 1, where)
    return recipe


def stage_configs(stage: dict, index: int, where: str = "recipe") -> tuple[StageEntry, Any, FinetuneConfig | None]:
    """The stage entry, its validated config and its recovery config (``finetune:``) for one recipe stage.

    Raises:
        SlimkitError: ``stage 2 (prune): unknown option 'target_mac' (did you mean 'target_macs'?)``.
    """
    entry = get_stage(stage["method"])
    label = f"stage {index} ({stage['method']})"
    prefix = "" if where == "recipe" else f"{where}: "
    options = {k: v for k, v in stage.items() if k not in ("method", "finetune")}
    config = entry.config.from_options(options, where=prefix + label)
    recovery = stage.get("finetune")
    if recovery is not None and not isinstance(recovery, dict):
        raise SlimkitError(f"{prefix}{label}: 'finetune' must be a mapping of fit options")
    recovery = FinetuneConfig.from_options(recovery, where=prefix + label, path="finetune.") if recovery else None
    return entry, config, recovery


def run_recipe(recipe: dict, out_dir: str, *, progress: bool | None = None,
               log: Callable[[str], None] = print, trust_code: str | list[str] | None = None) -> dict:
    """Run a recipe end to end; write ``model.safetensors`` and ``report.json`` to ``out_dir``.

    Every stage's options are validated (its config class) before any data is read; after each
    stage the model is measured and the stage's config, recovery and metrics go into the
    artifact's provenance.

    Args:
        recipe: the recipe mapping (module docstring), e.g. from :func:`load_recipe`.
        out_dir: where the artifact, the report and the stages' checkpoints go.
        progress: show progress bars (default: the recipe's ``progress``, else yes).
        log: where the one-line summaries go.
        trust_code: the ``.py`` files a model spec of the recipe may run (:mod:`slimkit.trust`).

    Returns:
        The report: the metrics before any stage and after each stage, the artifact path and its
        size on disk.

    Raises:
        SlimkitError: an invalid recipe (named by stage and option) or a failing stage.

    Example:
        >>> import tempfile
        >>> report = run_recipe({"model": "digits_cnn", "data": "digits", "limit": 60, "progress": False,
        ...                      "stages": [{"method": "prune", "target_macs": 0.6, "round_to": 4}]},
        ...                     tempfile.mkdtemp(), log=lambda line: None)
        >>> report["steps"][1]["metrics"]["macs"] <= 0.6 * report["steps"][0]["metrics"]["macs"]
        True
    """
    from .trust import trust_code as trusting

    with trusting(trust_code):
        return _run_recipe(recipe, out_dir, progress, log)


def _run_recipe(recipe: dict, out_dir: str, progress: bool | None, log: Callable[[str], None]) -> dict:
    recipe = validate_recipe(copy.deepcopy(recipe))
    seed = int(recipe.get("seed", 0))
    data = load_data(recipe["data"], limit=recipe.get("limit"), seed=seed, val_size=recipe.get("val_size", 0.1))
    model = create_model(recipe["model"], num_classes=recipe.get("num_classes"), weights=recipe.get("weights"))
    model.to(recipe.get("device", "cpu"))
    ctx = Context(data=data, out_dir=out_dir, seed=seed, batch_size=int(recipe.get("batch_size", 128)),
                  device=recipe.get("device", "cpu"),
                  progress=recipe.get("progress", True) if progress is None else progress)
    if "bench" in recipe:
        from .bench.config import BenchConfig

        ctx.bench = BenchConfig.from_options(recipe["bench"], where="bench")
    x, _ = next(iter(data.loader("val" if len(data.val) else "test", 2)))
    check_input(model, x.to(ctx.device), data.info.num_classes, f"dataset {recipe['data']}")
    os.makedirs(out_dir, exist_ok=True)

    steps = [{"stage": "input", "params": {}, "seconds": 0.0, "metrics": measure(model, ctx)}]
    log(f"input: {_fmt(steps[0]['metrics'])}")
    for i, stage in enumerate(recipe.get("stages") or [], start=1):
        entry, config, recovery = stage_configs(stage, i)
        ctx.stage_index, ctx.details = i, {}
        t0 = time.perf_counter()
        before = (copy.deepcopy(model) if not entry.trains and recovery is not None and recovery.distill
                  and not recovery.teacher else None)
        if entry.trains:
            model = entry.run(model, ctx, config, recovery=recovery)
        else:
            model = entry.run(model, ctx, config)
            if recovery is not None:
                model = recover(model, ctx, recovery, before)
        metrics = measure(model, ctx)
        record = {"stage": entry.name, "params": config.to_dict(),
                  "finetune": recovery.to_dict() if recovery is not None else None,
                  "seconds": time.perf_counter() - t0, "metrics": metrics}
        if ctx.details:
            record["details"] = ctx.details
        history(model).append(record)
        steps.append(record)
        log(f"{i}. {entry.name}: {_fmt(metrics)}")

    artifact = os.path.join(out_dir, "model.safetensors")
    meta = {"dataset": recipe["data"], "input_size": list(data.info.input_size), "classes": list(data.info.classes),
            "recipe": recipe}
    if recipe.get("runtime"):  # the runtime the model was tuned for, so a later export or bench knows
        meta["runtime"] = recipe["runtime"]
    save(model, artifact, meta=meta)
    report = {"recipe": recipe, "steps": steps, "artifact": artifact, "artifact_bytes": os.path.getsize(artifact)}
    if recipe.get("pack"):  # also the packed file: sparse and shared weights at the size they allow on disk
        from .sparse import pack

        report["packed"] = pack(model, os.path.join(out_dir, "model.slimpack"), meta=meta)
        report["packed_bytes"] = os.path.getsize(report["packed"])
        log(f"packed: {report['artifact_bytes']:,} -> {report['packed_bytes']:,} bytes ({report['packed']})")
    atomic_write_text(os.path.join(out_dir, "report.json"), json.dumps(report, indent=2))
    return report


def _fmt(m: dict) -> str:
    val = f"{m['val_top1']:.4f}" if m["val_top1"] is not None else "-"
    text = f"val top1 {val}, test top1 {m['test_top1']:.4f}, params {m['params']:,}, MACs {m['macs']:,}"
    for mode, by_batch in (m.get("latency_ms") or {}).items():
        text += f"; {mode} " + ", ".join(f"bs{b} {ms:.2f} ms" for b, ms in by_batch.items())
    return text
