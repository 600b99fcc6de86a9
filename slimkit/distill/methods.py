"""The registered distillation methods: each builds ``extra_losses`` terms for :func:`slimkit.train.fit`.

A method is a class registered in :data:`METHODS` with its option ``defaults``. It is built
from a :class:`~slimkit.distill.features.Teacher` (or ``None`` for methods without a pretrained
teacher), the student and an example input, and gives its loss terms (``term(batch) ->
scalar``) from :meth:`DistillMethod.terms`. Student-side trainable modules (FitNets' regressors,
FSP adapters, the FT translator) live in :attr:`DistillMethod.aux`; :func:`slimkit.distill.distill_terms`
attaches them to the student so that ``fit``'s optimizer, built from ``model.parameters()``,
trains them, and removes them afterwards.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SlimkitError
from ..registry import Registry
from ..train.engine import Batch, LossTerm
from . import losses
from .features import FeatureTap, Pair, Teacher, adapter, freeze, pair_features, stages

METHODS: Registry[type] = Registry("distillation method")


def _key(name: str) -> str:
    return name.replace(".", "_") or "root"  # ModuleDict keys may not contain dots


class DistillMethod(ABC):
    """Base class: options, the teacher, the student's feature taps and the trainable ``aux`` modules."""

    name = ""
    paper = ""
    defaults: dict = {}
    needs_teacher = True

    def __init__(self, teacher: Teacher | None, student: nn.Module, example_input: torch.Tensor, **opts) -> None:
        if self.needs_teacher and teacher is None:
            raise SlimkitError(f"distillation method {self.name!r} needs a teacher")
        self.teacher, self.student, self.opts = teacher, student, {**self.defaults, **opts}
        self.example_input = example_input
        self.aux = nn.ModuleDict()
        self.tap = FeatureTap(student)
        self.pairs: list[Pair] = []

    @abstractmethod
    def terms(self) -> dict[str, LossTerm]:
        """The method's loss terms, ``{name: term(batch) -> scalar}``."""

    def ce_weight(self) -> float:
        """The weight the paper puts on the hard-label cross-entropy (``fit`` always adds it with weight 1)."""
        return float(self.opts.get("ce_weight", 1.0))

    def close(self) -> None:
        """Remove the student's feature hooks."""
        self.tap.close()

    def _pair(self, same_size: bool = True) -> list[Pair]:
        self.pairs = pair_features(self.teacher.model, self.student, self.example_input, self.opts.get("pairs"),
                                   same_size=same_size)
        self.teacher.tap.add([p.teacher for p in self.pairs])
        self.tap.add([p.student for p in self.pairs])
        return self.pairs

    def _maps(self, batch: Batch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        t = self.teacher.features(batch.inputs)
        return [self.tap.out[p.student] for p in self.pairs], [t[p.teacher] for p in self.pairs]


def register_method(name: str):
    """Register a :class:`DistillMethod` subclass under ``name`` in :data:`METHODS`."""

    def deco(cls: type) -> type:
        cls.name = name
        return METHODS.register(name)(cls)

    return deco


def _check_range(name: str, value: float, low: float, high: float | None = None, open_low: bool = False) -> None:
    bad = value <= low if open_low else value < low
    if bad or (high is not None and value > high):
        rng = f"({low}, {high}]" if open_low else f"[{low}, {high if high is not None else 'inf'}]"
        raise SlimkitError(f"{name} must be in {rng}, got {value}")


@register_method("kd")
class KD(DistillMethod):
    """Hinton et al. 2015: ``(1 - alpha) * CE + alpha * T^2 * KL(softmax(t/T) || softmax(s/T))``.

    ``fit`` always adds the cross-entropy with weight 1, so the term ``kd`` is ``alpha * T^2 *
    KL`` and a second term ``ce_correction = -alpha * CE`` brings the total to exactly the
    paper's weighted average.
    """

    paper = "Hinton, Vinyals & Dean 2015, Distilling the Knowledge in a Neural Network"
    defaults = {"T": 4.0, "alpha": 0.9}

    def __init__(self, *args, **opts) -> None:
        super().__init__(*args, **opts)
        _check_range("T", float(self.opts["T"]), 0.0, open_low=True)
        _check_range("alpha", float(self.opts["alpha"]), 0.0, 1.0)

    def ce_weight(self) -> float:
        return 1.0 - float(self.opts["alpha"])

    def terms(self) -> dict[str, LossTerm]:
        alpha, T = float(self.opts["alpha"]), float(self.opts["T"])

        def kd(batch: Batch) -> torch.Tensor:
            return alpha * losses.kd_loss(batch.logits, self.teacher(batch.inputs), T)

        return {"kd": kd}


@register_method("logits")
class Logits(DistillMethod):
    """Ba & Caruana 2014: regress the teacher's logits with mean squared error (``weight`` times)."""

    paper = "Ba & Caruana 2014, Do Deep Nets Really Need to be Deep?"
    defaults = {"weight": 1.0, "ce_weight": 1.0}

    def terms(self) -> dict[str, LossTerm]:
        w = float(self.opts["weight"])
        return {"logits": lambda batch: w * losses.logit_mse(batch.logits, self.teacher(batch.inputs))}


@register_method("fitnet")
class FitNet(DistillMethod):
    """Romero et al. 2015 hints: a learned 1x1 regressor maps each student map to its teacher map; MSE between them.

    The regressors are trainable student-side modules (``aux``), one per pair, always present
    (the paper's regressor) even when channel counts agree.
    """

    paper = "Romero et al. 2015, FitNets: Hints for Thin Deep Nets"
    defaults = {"weight": 1.0, "pairs": None, "ce_weight": 1.0}

    def __init__(self, *args, **opts) -> None:
        super().__init__(*args, **opts)
        for p in self._pair():
            self.aux[_key(p.student)] = adapter(p.student_shape[1], p.teacher_shape[1])

    def terms(self) -> dict[str, LossTerm]:
        w = float(self.opts["weight"])

        def fitnet(batch: Batch) -> torch.Tensor:
            s, t = self._maps(batch)
            hint = [F.mse_loss(self.aux[_key(p.student)](a), b) for p, a, b in zip(self.pairs, s, t)]
            return w * torch.stack(hint).mean()

        return {"fitnet": fitnet}


@register_method("at")
class AT(DistillMethod):
    """Zagoruyko & Komodakis 2017 attention transfer: ``beta/2 * sum_j || Q_s/|Q_s| - Q_t/|Q_t| ||^2``, p = 2.

    Needs no adapters: the attention map sums over channels, so only spatial sizes must agree.
    """

    paper = "Zagoruyko & Komodakis 2017, Paying More Attention to Attention"
    defaults = {"beta": 1000.0, "p": 2.0, "pairs": None, "ce_weight": 1.0}

    def __init__(self, *args, **opts) -> None:
        super().__init__(*args, **opts)
        self._pair()

    def terms(self) -> dict[str, LossTerm]:
        beta, p = float(self.opts["beta"]), float(self.opts["p"])

        def at(batch: Batch) -> torch.Tensor:
            s, t = self._maps(batch)
            return beta / 2 * sum(losses.at_loss(a, b, p) for a, b in zip(s, t))

        return {self.name: at}


@register_method("fsp")
class FSP(DistillMethod):
    """Yim et al. 2017: match the FSP (flow) matrices between consecutive paired stages.

    With automatic pairing the stages are consecutive resolutions (the larger map is pooled to
    the smaller, see :func:`slimkit.distill.losses.fsp_matrix`); student maps pass through 1x1
    adapters where their channel count differs from the teacher's, since the matrices must
    have the same shape.
    """

    paper = "Yim et al. 2017, A Gift from Knowledge Distillation"
    defaults = {"weight": 1.0, "pairs": None, "ce_weight": 1.0}

    def __init__(self, *args, **opts) -> None:
        super().__init__(*args, **opts)
        pairs = self._pair(same_size=False)
        if len(pairs) < 2:
            raise SlimkitError(f"fsp needs at least two paired layers (found {len(pairs)}: "
                               f"{[(p.teacher, p.student) for p in pairs]})")
        for p in pairs:
            if p.student_shape[1] != p.teacher_shape[1]:
                self.aux[_key(p.student)] = adapter(p.student_shape[1], p.teacher_shape[1])

    def terms(self) -> dict[str, LossTerm]:
        w = float(self.opts["weight"])

        def fsp(batch: Batch) -> torch.Tensor:
            s, t = self._maps(batch)
            s = [self.aux[_key(p.student)](a) if _key(p.student) in self.aux else a for p, a in zip(self.pairs, s)]
            gs = [losses.fsp_matrix(s[i], s[i + 1]) for i in range(len(s) - 1)]
            gt = [losses.fsp_matrix(t[i], t[i + 1]) for i in range(len(t) - 1)]
            return w * losses.fsp_loss(gs, gt)

        return {"fsp": fsp}


def _conv_bn(cin: int, cout: int, transposed: bool = False) -> list[nn.Module]:
    conv = nn.ConvTranspose2d(cin, cout, 3, 1, 1) if transposed else nn.Conv2d(cin, cout, 3, 1, 1)
    return [conv, nn.BatchNorm2d(cout), nn.LeakyReLU(0.1)]


class Paraphraser(nn.Module):
    """Kim et al. 2018 paraphraser: a 3-conv encoder to ``factor`` channels and a 3-deconv decoder back."""

    def __init__(self, channels: int, factor: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(*_conv_bn(channels, channels), *_conv_bn(channels, factor),
                                     *_conv_bn(factor, factor))
        self.decoder = nn.Sequential(*_conv_bn(factor, factor, True), *_conv_bn(factor, channels, True),
                                     *_conv_bn(channels, channels, True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def translator(channels: int, factor: int) -> nn.Sequential:
    """Kim et al. 2018 translator: three conv-BN-LeakyReLU layers from student channels to the factor."""
    return nn.Sequential(*_conv_bn(channels, channels), *_conv_bn(channels, factor), *_conv_bn(factor, factor))


@register_method("ft")
class FT(DistillMethod):
    """Kim et al. 2018 factor transfer: paraphraser pre-trained on the teacher's last map, translator on the student's.

    Building the method first trains the paraphraser (an autoencoder on the teacher's last
    feature map, reconstruction L2 loss, no labels) for ``paraphraser_epochs`` over ``loader``
    (required), then freezes it; the student's translator is trainable (``aux``). The term is
    ``beta`` times the L1 distance of the normalised factors.
    """

    paper = "Kim, Park & Kwak 2018, Paraphrasing Complex Network: Network Compression via Factor Transfer"
    defaults = {"beta": 500.0, "rate": 0.5, "paraphraser_epochs": 1, "paraphraser_lr": 0.01, "loader": None,
                "pairs": None, "ce_weight": 1.0, "max_batches": None}

    def __init__(self, *args, **opts) -> None:
        super().__init__(*args, **opts)
        if self.opts["pairs"]:
            pairs = self._pair()
            if len(pairs) != 1:
                raise SlimkitError(f"ft transfers one factor: give exactly one teacher:student pair, got {len(pairs)}")
        else:
            ts, ss = stages(self.teacher.model, self.example_input), stages(self.student, self.example_input)
            if not ts or not ss:
                raise SlimkitError("ft needs a spatial feature map in both teacher and student")
            self.opts["pairs"] = [(ts[-1][0], ss[-1][0])]  # the last maps before pooling, as in the paper
            self._pair()
        p = self.pairs[0]
        c_t, c_s = p.teacher_shape[1], p.student_shape[1]
        factor = max(1, round(c_t * float(self.opts["rate"])))
        self.paraphraser = Paraphraser(c_t, factor).to(self.example_input.device)
        self.aux["translator"] = translator(c_s, factor)
        self.paraphraser_log = self._train_paraphraser()
        freeze(self.paraphraser)

    def _train_paraphraser(self) -> list[float]:
        loader: Iterable | None = self.opts["loader"]
        if loader is None:
            raise SlimkitError("ft needs training data to pre-train its paraphraser: pass loader=<train loader>")
        epochs, cap = int(self.opts["paraphraser_epochs"]), self.opts["max_batches"]
        opt = torch.optim.SGD(self.paraphraser.parameters(), lr=float(self.opts["paraphraser_lr"]), momentum=0.9)
        self.paraphraser.train()
        name, log = self.pairs[0].teacher, []
        for epoch in range(epochs):
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            total, n = 0.0, 0
            for b, (x, _) in enumerate(loader):
                if cap is not None and b >= int(cap):
                    break
                x = x.to(self.example_input.device)
                feat = self.teacher.features(x)[name]
                loss = F.mse_loss(self.paraphraser(feat), feat)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, n = total + loss.item() * len(x), n + len(x)
            log.append(total / max(n, 1))
        return log

    def terms(self) -> dict[str, LossTerm]:
        beta = float(self.opts["beta"])

        def ft(batch: Batch) -> torch.Tensor:
            s, t = self._maps(batch)
            with torch.no_grad():
                self.paraphraser.to(t[0].device)
                factor_t = self.paraphraser.encoder(t[0])
            return beta * losses.factor_loss(self.aux["translator"](s[0]), factor_t)

        return {"ft": ft}


@register_method("one")
class ONE(DistillMethod):
    """Lan et al. 2018 on-the-fly native ensemble: no pretrained teacher; the gated branch ensemble teaches each branch.

    The student must be a :class:`slimkit.distill.one.OneNetwork`, whose forward returns the
    ensemble logits (``fit`` adds their CE) and keeps the branch logits; the term adds each
    branch's CE and ``T^2 KL(p_ensemble || p_branch)``.
    """

    paper = "Lan, Zhu & Gong 2018, Knowledge Distillation by On-the-Fly Native Ensemble"
    defaults = {"T": 3.0}
    needs_teacher = False

    def __init__(self, *args, **opts) -> None:
        super().__init__(*args, **opts)
        from .one import OneNetwork

        if not isinstance(self.student, OneNetwork):
            raise SlimkitError(f"method 'one' trains a OneNetwork (slimkit.distill.OneNetwork), "
                               f"not a {type(self.student).__name__}")
        _check_range("T", float(self.opts["T"]), 0.0, open_low=True)

    def terms(self) -> dict[str, LossTerm]:
        T = float(self.opts["T"])

        def one(batch: Batch) -> torch.Tensor:
            net = self.student
            return losses.one_loss(net.last_branch_logits, batch.logits, batch.targets, T)

        return {"one": one}


@register_method("moonshine")
class Moonshine(AT):
    """Crowley et al. 2018 Moonshine: a cheap student derived from the teacher, trained with attention transfer.

    The loss is :class:`AT`'s; build the student with :func:`slimkit.distill.moonshine_student`
    (3x3 convs replaced by grouped + pointwise convs). Stage pairing is automatic because the
    student has the teacher's layout.
    """

    paper = "Crowley, Gray & Storkey 2018, Moonshine: Distilling with Cheap Convolutions"


@register_method("munge")
class Munge(KD):
    """Bucila et al. 2006 model compression: the student learns the teacher's outputs on MUNGE pseudo-data.

    The loss is KD with ``alpha = 1`` and ``T = 1`` by default (pure regression of the teacher's
    probabilities, which label the synthetic samples); the data come from
    :func:`slimkit.distill.munge.munge` / :func:`~slimkit.distill.munge.munge_loader`.
    """

    paper = "Bucila, Caruana & Niculescu-Mizil 2006, Model Compression"
    defaults = {"T": 1.0, "alpha": 1.0, "multiplier": 1, "p": 0.5, "s": 1.0, "pool": 4096}

    def terms(self) -> dict[str, LossTerm]:
        return {"munge": KD.terms(self)["kd"]}


def method_options(name: str) -> dict:
    """The options (with defaults) of method ``name``."""
    return dict(METHODS.get(name).defaults)


__all__ = ["METHODS", "DistillMethod", "register_method", "method_options", "Paraphraser", "translator"]
