"""Knowledge transfer: distillation losses that plug into the training engine as ``extra_losses``.

::

    from slimkit.distill import distill_terms
    terms = distill_terms("kd", teacher, student, example_input, T=4, alpha=0.9)
    with terms:                       # removes hooks and auxiliary modules afterwards
        fit(student, loader, epochs=30, extra_losses=terms)

Methods (:data:`METHODS`): ``kd`` (Hinton et al. 2015), ``logits`` (Ba & Caruana 2014),
``fitnet`` (Romero et al. 2015), ``at`` (Zagoruyko & Komodakis 2017), ``fsp`` (Yim et al.
2017), ``ft`` (Kim et al. 2018), ``one`` (Lan et al. 2018, :class:`OneNetwork`), ``moonshine``
(Crowley et al. 2018, :func:`moonshine_student`) and ``munge`` (Bucila et al. 2006,
:func:`munge`). Methods combine with ``+`` (``"at+kd"``) and then share one teacher pass. See
docs/distill.md.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SlimkitError
from ..pipeline import Context, register_stage
from ..train.config import FitConfig
from ..train.engine import Batch, LossTerm
from .config import DistillConfig
from .features import FeatureTap, Pair, Teacher, freeze, pair_features, stages
from .losses import at_loss, attention_map, factor_loss, fsp_loss, fsp_matrix, kd_loss, logit_mse, one_loss
from .methods import METHODS, DistillMethod, register_method
from .moonshine import moonshine_student
from .munge import TensorLoader, munge, munge_loader
from .one import OneNetwork

__all__ = ["DistillConfig", "METHODS", "AUX", "best_branch", "load_teacher", "training_loader", "DistillMethod",
           "DistillTerms", "FeatureTap", "OneNetwork", "Pair", "Teacher",
           "TensorLoader", "at_loss", "attention_map", "distill_stage", "distill_terms", "factor_loss",
           "finetune_with_distillation", "freeze", "fsp_loss", "fsp_matrix", "kd_loss", "logit_mse",
           "moonshine_student",
           "munge", "munge_loader", "one_loss", "pair_features", "register_method", "stages"]

AUX = "distill_aux"  # the student's submodule holding trainable distillation modules while training


class DistillTerms(dict):
    """The ``{name: term}`` of :func:`distill_terms`, plus what must be undone after training.

    ``methods`` are the built method objects, ``teacher`` the shared :class:`Teacher`.
    :meth:`close` (or leaving a ``with`` block) removes the feature hooks from teacher and
    student and detaches the auxiliary modules from the student, so the trained student is
    exactly its own architecture again (and saves as such).
    """

    def __init__(self, terms: dict[str, LossTerm], methods: list[DistillMethod], teacher: Teacher | None,
                 student: nn.Module) -> None:
        super().__init__(terms)
        self.methods, self.teacher, self.student = methods, teacher, student

    @property
    def aux(self) -> nn.ModuleDict:
        """The trainable modules (adapters, translators) of all methods, keyed by method name."""
        return nn.ModuleDict({m.name: m.aux for m in self.methods if len(m.aux)})

    def close(self) -> None:
        for m in self.methods:
            m.close()
        if self.teacher is not None:
            self.teacher.close()
        holder = self.student._modules.get(AUX)
        if holder is not None:
            for m in self.methods:
                holder._modules.pop(m.name, None)
            if not len(holder):
                del self.student._modules[AUX]

    def __enter__(self) -> "DistillTerms":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _shares_parameters(a: nn.Module, b: nn.Module) -> bool:
    ids = {id(p) for p in a.parameters()}
    return any(id(p) in ids for p in b.parameters())


def _split_opts(names: list[str], opts: dict) -> list[dict]:
    known = set().union(*(METHODS.get(n).defaults for n in names), {"ce_weight"})
    unknown = set(opts) - known
    if unknown:
        raise SlimkitError(f"distillation {'+'.join(names)}: unknown option(s) {sorted(unknown)} "
                           f"(known: {sorted(known)})")
    return [{k: v for k, v in opts.items() if k in METHODS.get(n).defaults or k == "ce_weight"} for n in names]


def distill_terms(method: str | list[str], teacher: nn.Module | None, student: nn.Module,
                  example_input: torch.Tensor, **opts) -> DistillTerms:
    """Loss terms distilling ``teacher`` into ``student`` with ``method``, ready for ``fit(extra_losses=...)``.

    ``method`` is a name in :data:`METHODS` (Hinton et al. 2015 ``kd``; Ba & Caruana 2014
    ``logits``; Romero et al. 2015 ``fitnet``; Zagoruyko & Komodakis 2017 ``at``; Yim et al.
    2017 ``fsp``; Kim et al. 2018 ``ft``; Lan et al. 2018 ``one``; Crowley et al. 2018
    ``moonshine``; Bucila et al. 2006 ``munge``), or several joined by ``+`` sharing one teacher
    pass per step; ``opts`` are the methods' options (each method takes the ones it knows).
    The teacher is frozen (eval mode, ``requires_grad`` off, run under ``no_grad``) and must not
    share parameters with the student: pass ``copy.deepcopy(model)`` taken before compressing.
    Trainable modules of the methods are attached to the student as its submodule
    ``distill_aux`` so the optimizer ``fit`` builds from ``model.parameters()`` trains them;
    ``ce_weight`` (the paper's weight of the hard-label cross-entropy, which ``fit`` always adds
    with weight 1) becomes a ``ce_correction`` term. Close the result (or use it as a context
    manager) after training to remove hooks and auxiliary modules.

    Args:
        method: the method name(s), ``"kd"`` or ``"at+kd"`` or a list.
        teacher: the trained teacher (``None`` for ``one``).
        student: the model to train.
        example_input: one input batch, to pair the two networks' features.
        **opts: the methods' options (``T``, ``alpha``, ``beta``, ``pairs``, ...).

    Returns:
        :class:`DistillTerms`, ``{name: term}`` for ``fit(extra_losses=...)``.

    Raises:
        SlimkitError: unknown method or option, a missing teacher, shared parameters.

    Example:
        >>> import copy, torch, slimkit
        >>> from slimkit.train import fit
        >>> teacher = slimkit.create_model("digits_cnn").eval()
        >>> student = copy.deepcopy(teacher)
        >>> batches = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))]
        >>> with distill_terms("kd", teacher, student, batches[0][0], T=4, alpha=0.9) as terms:  # Hinton et al.
        ...     run = fit(student, batches, epochs=1, lr=0.01, extra_losses=terms, progress=False)
        >>> sorted(terms)
        ['ce_correction', 'kd']
    """
    names = [n.strip() for n in method.split("+")] if isinstance(method, str) else list(method)
    for n in names:
        METHODS.get(n)
    if len(set(names)) != len(names):
        raise SlimkitError(f"distillation method listed twice in {method!r}")
    runner = None
    if any(METHODS.get(n).needs_teacher for n in names):
        if teacher is None:
            raise SlimkitError(f"distillation {'+'.join(names)} needs a teacher model")
        if teacher is student or _shares_parameters(teacher, student):
            raise SlimkitError("the teacher shares parameters with the student; pass a copy "
                               "(copy.deepcopy(model)) taken before the model was changed")
        runner = Teacher(teacher)
    built: list[DistillMethod] = []
    try:
        for n, o in zip(names, _split_opts(names, opts)):
            built.append(METHODS.get(n)(runner, student, example_input, **o))
    except BaseException:
        for m in built:
            m.close()
        if runner is not None:
            runner.close()
        raise
    terms: dict[str, LossTerm] = {}
    for m in built:
        terms.update(m.terms())
    # the paper's CE weight w: fit's CE (weight 1) plus (w - 1) * CE; methods combined multiply
    # their CE shares, so kd(alpha) + at keeps kd's (1 - alpha)
    ce = 1.0
    for m in built:
        ce *= m.ce_weight()
    if ce != 1.0:
        def ce_correction(batch: Batch, w: float = ce - 1.0) -> torch.Tensor:
            return w * F.cross_entropy(batch.logits, batch.targets)

        terms["ce_correction"] = ce_correction
    result = DistillTerms(terms, built, runner, student)
    aux = result.aux
    if len(aux):
        holder = student._modules.get(AUX)
        if holder is None:
            holder = nn.ModuleDict()
            student.add_module(AUX, holder)
        dev = next(iter(student.parameters())).device
        for k, v in aux.items():
            holder[k] = v.to(dev)
    return result


def finetune_with_distillation(model: nn.Module, ctx: Context, method: str, teacher: nn.Module | None, *,
                               batch_size: int | None = None, fit_options: dict | None = None,
                               **opts) -> nn.Module:
    """Fine-tune ``model`` on the context's train split, distilling ``method`` from ``teacher``: the recovery hook.

    Any compression stage can call it with ``copy.deepcopy`` of the model taken before it
    compressed as the teacher (e.g. behind a ``distill: kd`` option). ``fit_options`` are
    :func:`slimkit.train.fit`'s (epochs, lr, ...); ``opts`` the method's (see
    :func:`distill_terms`). ``ft`` pre-trains its paraphraser on the same loader, ``munge``
    trains on the MUNGE-augmented, teacher-labelled train split. ``one`` and ``moonshine`` change
    the architecture and are handled by the ``distill`` stage (:func:`distill_stage`).
    """
    from ..train import fit

    fit_options = FitConfig.from_options(fit_options, where="distill").fit_kwargs()
    example = next(iter(ctx.data.loader("train", 2, shuffle=False, augment=False)))[0].to(ctx.device)
    loader = training_loader(method, teacher, ctx.data, batch_size or ctx.batch_size, ctx.seed, opts)
    with distill_terms(method, teacher, model, example, **opts) as terms:
        fit(model, loader, seed=ctx.seed, device=ctx.device, progress=ctx.progress, extra_losses=terms,
            checkpoint_dir=ctx.stage_dir("distill"), **fit_options)
    return model


def training_loader(method: str, teacher: nn.Module | None, data, batch_size: int, seed: int, opts: dict):
    """The train-split loader ``method`` trains on; sets ``opts["loader"]`` for ``ft``'s paraphraser.

    ``munge`` (Bucila et al. 2006) trains on the train split plus MUNGE samples labelled by the
    teacher, built with the method's ``multiplier``/``p``/``s``/``pool`` options; every other
    method on the (augmented) train split.
    """
    names = method.split("+")
    loader = data.loader("train", batch_size, seed=seed)
    if "ft" in names:
        opts.setdefault("loader", loader)
    if "munge" in names:
        mopts = {k: opts.get(k, METHODS.get("munge").defaults[k]) for k in ("multiplier", "p", "s", "pool")}
        loader = munge_loader(teacher, data.loader("train", 512, shuffle=False, augment=False), batch_size=batch_size,
                              seed=seed, **mopts)
    return loader


def best_branch(net: OneNetwork, data, batch_size: int, device: str | torch.device = "cpu") -> tuple[int, list[float]]:
    """Index and top-1 of ONE's best branch (Lan et al. 2018) on the validation split (train when there is none)."""
    from ..train import evaluate

    split = "val" if len(data.val) else "train"
    loader = data.loader(split, batch_size, shuffle=False, augment=False)
    scores = [evaluate(net.extract(i), loader, device=device)["top1"] for i in range(len(net.branches))]
    return max(range(len(scores)), key=scores.__getitem__), scores


def load_teacher(spec: str, weights: str | None, num_classes: int, *, sample: torch.Tensor | None = None,
                 what: str = "the data", device: str | torch.device = "cpu") -> nn.Module:
    """The teacher ``spec`` (registered name or artifact path, ``weights`` optional) in eval mode on ``device``.

    A registered name is built for ``num_classes``; with ``sample`` the teacher must take it and
    predict ``num_classes`` classes, or a one-line error names ``what`` and the teacher
    (Hinton et al. 2015's teacher, or any deeper network trained on the same data).
    """
    from ..models import create_model
    from ..models.registry import is_artifact_path
    from ..train import check_input

    model = create_model(spec, num_classes=None if is_artifact_path(spec) else num_classes, weights=weights)
    model = model.to(device).eval()
    if sample is not None:
        check_input(model, sample.to(device), num_classes, f"{what} (teacher {spec})")
    return model


@register_stage("distill", config=DistillConfig,
                paper="Hinton et al. 2015; Romero et al. 2015; Zagoruyko & Komodakis 2017; Lan et al. 2018; ...",
                example={"distill": "kd", "teacher": "digits_cnn", "epochs": 1, "lr": 0.01})
def distill_stage(model: nn.Module, ctx: Context, config: DistillConfig) -> nn.Module:
    """Fine-tune the current model with the distillation method ``distill`` (see :func:`distill_terms`).

    The key is ``distill``, not ``method``, because the recipe's ``method`` names the stage
    itself (as ``transform:`` does for the transform stage): ``{method: distill, distill: kd,
    teacher: resnet56}``. ``teacher`` is a model spec or artifact path (``teacher_weights`` optional) and is required,
    except for ``moonshine`` (Crowley et al. 2018: the current model is the teacher and the
    student is derived from it with ``groups``-grouped + pointwise convs, ``init`` "teacher" or
    "scratch") and ``one`` (Lan et al. 2018: the current CIFAR ResNet becomes a ``branches``-
    branch :class:`OneNetwork`, is trained, and its best branch on the validation split is
    kept). Other keys are fit options (epochs, lr, ...) or the method's options (T, alpha,
    beta, pairs, ...).
    """
    method, names, params = config.distill, config.names, dict(config.options)
    fit_options = config.fit.fit_kwargs()
    if "one" in names:
        net = OneNetwork.from_model(model, config.branches)
        finetune_with_distillation(net, ctx, "one", None, batch_size=config.batch_size, fit_options=fit_options,
                                   **params)
        best, scores = best_branch(net, ctx.data, ctx.batch_size, ctx.device)
        ctx.details.update({"branches": config.branches, "branch_top1": scores, "kept_branch": best})
        out = net.extract(best)
        out.slimkit_history = list(getattr(model, "slimkit_history", []))
        return out
    if config.teacher is not None:
        teacher_model = load_teacher(config.teacher, config.teacher_weights, ctx.data.info.num_classes,
                                     device=ctx.device)
    elif "moonshine" in names:
        teacher_model = copy.deepcopy(model)
    else:
        raise SlimkitError(f"distill stage with method {method!r} needs 'teacher' (a model spec or artifact path)")
    if "moonshine" in names:
        model = moonshine_student(teacher_model if config.teacher is not None else model, config.groups, config.init)
        ctx.details["moonshine"] = model.slimkit_last_moonshine
    return finetune_with_distillation(model, ctx, method, teacher_model, batch_size=config.batch_size,
                                      fit_options=fit_options, **params)
