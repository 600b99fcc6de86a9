"""Optimizers for fine-tuning compressed networks, and the registry the training engine uses.

Besides the stock SGD, Adam and AdamW this module implements two optimizers from the
literature, Yogi (Zaheer et al., NeurIPS 2018) and AcceleGrad (Levy et al., NeurIPS 2018).
Every optimizer keeps its whole state in ``state_dict()``, so a run resumes bit-identically.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Union

import torch

from slimkit.errors import SlimkitError
from slimkit.registry import Registry

Params = Union[Iterable[torch.Tensor], Iterable[dict[str, Any]]]
Closure = Callable[[], Any]

OPTIMIZERS: Registry = Registry("optimizer")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise SlimkitError(message)


def _number(name: str, value: object) -> float:
    # bool is an int subclass; accepting True as a learning rate would hide a caller's bug.
    _require(
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        f"{name} must be a finite number, got {value!r}",
    )
    return float(value)  # type: ignore[arg-type]


def _positive(name: str, value: object) -> float:
    v = _number(name, value)
    _require(v > 0, f"{name} must be > 0, got {value!r}")
    return v


def _non_negative(name: str, value: object) -> float:
    v = _number(name, value)
    _require(v >= 0, f"{name} must be >= 0, got {value!r}")
    return v


def _unit(name: str, value: object) -> float:
    v = _number(name, value)
    _require(0 <= v < 1, f"{name} must be in [0, 1), got {value!r}")
    return v


class Yogi(torch.optim.Optimizer):
    """Yogi: Adam with an additive, sign-controlled second-moment update.

    Zaheer, Reddi, Sachan, Kale, Kumar, "Adaptive Methods for Nonconvex Optimization",
    NeurIPS 2018, Algorithm 2: ``m_t = b1 m_{t-1} + (1-b1) g_t``,
    ``v_t = v_{t-1} - (1-b2) sign(v_{t-1} - g_t^2) g_t^2``,
    ``x_{t+1} = x_t - lr m_t / (sqrt(v_t) + eps)``. Algorithm 2 has no bias correction and
    neither has this class (the authors' TensorFlow code multiplies the step by
    ``sqrt(1-b2^t) / (1-b1^t)``; we follow the paper). ``m_0 = 0`` as in the paper; ``v_0`` is
    ``initial_accumulator`` as in the TensorFlow code, since the paper advises a non-zero start
    for ``v``. Defaults are the paper's (lr 1e-2, betas (0.9, 0.999), eps 1e-3);
    ``weight_decay`` is L2, added to the gradient.
    """

    def __init__(
        self,
        params: Params,
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-3,
        initial_accumulator: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        _require(len(betas) == 2, f"betas must be a pair, got {betas!r}")
        defaults = dict(
            lr=_positive("lr", lr),
            betas=(_unit("beta1", betas[0]), _unit("beta2", betas[1])),
            eps=_positive("eps", eps),
            initial_accumulator=_positive("initial_accumulator", initial_accumulator),
            weight_decay=_non_negative("weight_decay", weight_decay),
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Any:
        """Perform one Yogi update; ``closure`` re-evaluates the loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                _require(not p.grad.is_sparse, "Yogi does not support sparse gradients")
                grad = p.grad
                if group["weight_decay"] != 0:
                    grad = grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.full_like(
                        p, group["initial_accumulator"], memory_format=torch.preserve_format
                    )
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                grad_sq = grad * grad
                v.addcmul_(torch.sign(v - grad_sq), grad_sq, value=-(1 - beta2))
                p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-group["lr"])
        return loss


def _accelegrad_alpha(t: int) -> float:
    # Paper's importance weights, t counted from 0: 1 for t <= 2, then (t+1)/4.
    return 1.0 if t <= 2 else (t + 1) / 4.0


class AcceleGrad(torch.optim.Optimizer):
    """AcceleGrad: adaptive, universal accelerated gradient method.

    Levy, Yurtsever, Cevher, "Online Adaptive Methods, Universality and Acceleration",
    NeurIPS 2018, Algorithm 1, unconstrained (the projection is the identity). With weights
    ``alpha_t = 1`` (t <= 2), ``(t+1)/4`` (t >= 3) and ``tau_t = 1/alpha_t``: the gradient
    ``g_t`` is taken at ``x_{t+1} = tau_t z_t + (1-tau_t) y_t``,
    ``eta_t = 2D / sqrt(G^2 + sum_{s<=t} alpha_s^2 ||g_s||^2)``,
    ``z_{t+1} = z_t - alpha_t eta_t g_t`` and ``y_{t+1} = x_{t+1} - eta_t g_t``, with
    ``y_0 = z_0 = x_0``. The parameters always hold the next query point ``x``. ``||g||`` is
    the paper's global Euclidean norm, taken over all parameters of a param group (each
    group is one independent AcceleGrad run). ``lr`` plays the role of the diameter ``D``
    (default 1.0); ``G`` is the paper's bound on gradient norms, which in the step size only
    floors the denominator (default 1.0). ``weight_decay`` is L2, added to the gradient. The
    paper's guarantee is for the alpha-weighted average of the ``y`` iterates; it is not
    tracked, as that would cost a third copy of the model for little use in deep learning.
    """

    def __init__(
        self, params: Params, lr: float = 1.0, G: float = 1.0, weight_decay: float = 0.0
    ) -> None:
        defaults = dict(
            lr=_positive("lr (diameter D)", lr),
            G=_positive("G", G),
            weight_decay=_non_negative("weight_decay", weight_decay),
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Any:
        """Perform one AcceleGrad update; ``closure`` re-evaluates the loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                _require(not p.grad.is_sparse, "AcceleGrad does not support sparse gradients")
            wd = group["weight_decay"]
            grads = [p.grad if wd == 0 else p.grad.add(p, alpha=wd) for p in params]
            # The counters are per group, so they live in the group dict, which state_dict()
            # saves; Python floats keep the accumulator exact in float64 across save/load.
            t = group.setdefault("step", 0)
            acc = group.setdefault("weighted_grad_sq", 0.0)
            alpha = _accelegrad_alpha(t)
            device = params[0].device
            norms = torch.stack([torch.linalg.vector_norm(g).to(device) for g in grads])
            acc += alpha**2 * float(norms.double().square().sum())
            eta = 2.0 * group["lr"] / math.sqrt(group["G"] ** 2 + acc)
            tau_next = 1.0 / _accelegrad_alpha(t + 1)
            for p, g in zip(params, grads):
                state = self.state[p]
                if not state:
                    state["z"] = p.detach().clone(memory_format=torch.preserve_format)
                    state["y"] = p.detach().clone(memory_format=torch.preserve_format)
                z, y = state["z"], state["y"]
                y.copy_(p).add_(g, alpha=-eta)
                z.add_(g, alpha=-alpha * eta)
                p.copy_(z).mul_(tau_next).add_(y, alpha=1.0 - tau_next)
            group["step"] = t + 1
            group["weighted_grad_sq"] = acc
        return loss


@OPTIMIZERS.register("sgd")
def _sgd(params: Params, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=False
    )


@OPTIMIZERS.register("adam")
def _adam(params: Params, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


@OPTIMIZERS.register("adamw")
def _adamw(
    params: Params, lr: float, weight_decay: float, momentum: float
) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


@OPTIMIZERS.register("yogi")
def _yogi(params: Params, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    return Yogi(params, lr=lr, weight_decay=weight_decay)


@OPTIMIZERS.register("accelegrad")
def _accelegrad(
    params: Params, lr: float, weight_decay: float, momentum: float
) -> torch.optim.Optimizer:
    return AcceleGrad(params, lr=lr, weight_decay=weight_decay)


def build_optimizer(
    name: str, params: Params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name`` over ``params``, after validating arguments.

    Names: ``sgd`` (heavy-ball momentum, no Nesterov), ``adam``, ``adamw``, ``yogi``
    (Zaheer et al., NeurIPS 2018) and ``accelegrad`` (Levy et al., NeurIPS 2018, where ``lr``
    is the diameter ``D``). ``momentum`` is used by ``sgd`` only; ``weight_decay`` is L2 for
    all but ``adamw``, where it is decoupled. Bad input raises :class:`SlimkitError`.
    """
    factory = OPTIMIZERS.get(name)
    lr = _positive("lr", lr)
    weight_decay = _non_negative("weight_decay", weight_decay)
    momentum = _unit("momentum", momentum)
    params = list(params)
    _require(len(params) > 0, f"optimizer {name!r} got an empty parameter list")
    return factory(params, lr, weight_decay, momentum)
