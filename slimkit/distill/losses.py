"""The distillation losses as plain functions of tensors, so each can be checked by hand.

The method classes in :mod:`slimkit.distill.methods` only decide *which* tensors meet here
(logits, paired feature maps, factors); the arithmetic of each paper lives in this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    """Hinton et al. 2015 ("Distilling the Knowledge in a Neural Network"): ``T^2 * KL(p_t || p_s)``.

    ``p = softmax(logits / T)``; the KL divergence is summed over classes and averaged over the
    batch (``batchmean``), and multiplied by ``T^2`` because the gradients of the softened
    targets scale as ``1/T^2`` (sec. 2 of the paper), which keeps the term's weight comparable
    across temperatures.
    """
    log_ps = F.log_softmax(student_logits / T, dim=1)
    pt = F.softmax(teacher_logits.detach() / T, dim=1)
    return F.kl_div(log_ps, pt, reduction="batchmean") * (T * T)


def logit_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Ba & Caruana 2014 ("Do Deep Nets Really Need to be Deep?"): regression of the teacher's logits.

    Mean squared error between student and teacher logits (mean over batch and classes); the
    paper's ``1/2T * sum ||g - z||^2`` differs only by a constant factor folded into the weight.
    """
    return F.mse_loss(student_logits, teacher_logits.detach())


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Zagoruyko & Komodakis 2017 activation-based attention: ``F(A) = sum_c |A_c|^p``, flattened and L2-normalised.

    The channel mean is used instead of the sum (as in the authors' code); after normalisation
    the two are identical, and the mean avoids overflow on wide layers.
    """
    am = features.abs().pow(p).mean(1) if p != 2 else features.pow(2).mean(1)
    return F.normalize(am.flatten(1), dim=1)


def at_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017) for one layer pair: mean squared difference of normalised maps.

    Averaged over batch and positions, as in the authors' reference implementation, which is
    what the paper's ``beta = 1000`` (applied as ``beta/2`` per pair) is calibrated for.
    """
    return (attention_map(student_features, p) - attention_map(teacher_features.detach(), p)).pow(2).mean()


def fsp_matrix(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Yim et al. 2017 ("A Gift from Knowledge Distillation") flow matrix ``G_ij = sum_{s,t} F1_i F2_j / (h*w)``.

    ``first`` is (N, m, h, w) and ``second`` (N, n, h', w'); when ``first`` has the larger
    spatial size it is average-pooled to ``second``'s, so consecutive stages of different
    resolution can be paired (the paper pairs the first and last map of a section). Returns (N, m, n).
    """
    if first.shape[2:] != second.shape[2:]:
        first = F.adaptive_avg_pool2d(first, second.shape[2:])
    h, w = second.shape[2:]
    return torch.bmm(first.flatten(2), second.flatten(2).transpose(1, 2)) / (h * w)


def fsp_loss(student_matrices: list[torch.Tensor], teacher_matrices: list[torch.Tensor]) -> torch.Tensor:
    """Yim et al. 2017 FSP loss: squared distance of student and teacher FSP matrices, averaged over pairs.

    Each pair contributes the mean over batch and matrix entries of the squared difference,
    i.e. the paper's ``||G_T - G_S||_2^2`` with equal ``lambda_i`` divided by the matrix size.
    """
    losses = [(s - t.detach()).pow(2).mean() for s, t in zip(student_matrices, teacher_matrices)]
    return torch.stack(losses).mean()


def factor_loss(student_factor: torch.Tensor, teacher_factor: torch.Tensor) -> torch.Tensor:
    """Kim et al. 2018 factor transfer: L1 distance between L2-normalised factors (``p = 1``).

    Each factor is flattened per sample and divided by its L2 norm; the loss is the mean
    absolute difference (the paper's per-sample L1 norm divided by the factor size, as the
    reference implementations do, which is the scale ``beta`` is set for).
    """
    s = F.normalize(student_factor.flatten(1), dim=1)
    t = F.normalize(teacher_factor.detach().flatten(1), dim=1)
    return (s - t).abs().mean()


def one_loss(branch_logits: torch.Tensor, ensemble_logits: torch.Tensor, targets: torch.Tensor,
             T: float = 3.0) -> torch.Tensor:
    """Lan et al. 2018 (ONE) terms besides the ensemble's own CE: each branch's CE plus ``T^2 KL(p_e || p_i)``.

    ``branch_logits`` is (N, m, K); the ensemble (gated) teacher is detached in the KD part so
    the branches learn from it rather than drag it towards themselves.
    """
    m = branch_logits.shape[1]
    ce = sum(F.cross_entropy(branch_logits[:, i], targets) for i in range(m))
    kd = sum(kd_loss(branch_logits[:, i], ensemble_logits.detach(), T) for i in range(m))
    return ce + kd
