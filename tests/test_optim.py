"""Tests for slimkit.train.optim: Yogi and AcceleGrad against hand computations of the papers'
formulas, convergence on a small least-squares problem, bit-identical resume from
state_dict(), and the optimizer registry / builder."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch

from slimkit.errors import SlimkitError
from slimkit.train.optim import OPTIMIZERS, AcceleGrad, Yogi, build_optimizer

torch.set_num_threads(1)

NAMES_TO_TYPES = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "yogi": Yogi,
    "accelegrad": AcceleGrad,
}


# ---------------------------------------------------------------- hand computations


def yogi_reference(x0, curv, steps, lr, b1, b2, eps, v0, wd):
    """Algorithm 2 of Zaheer et al. 2018 on f(x) = 0.5 * sum(curv * x^2), no bias correction."""
    x, m, v = x0.copy(), np.zeros_like(x0), np.full_like(x0, v0)
    trajectory, signs = [], set()
    for _ in range(steps):
        g = curv * x + wd * x
        s = np.sign(v - g * g)
        signs.update(s.tolist())
        m = b1 * m + (1 - b1) * g
        v = v - (1 - b2) * s * g * g
        x = x - lr * m / (np.sqrt(v) + eps)
        trajectory.append(x.copy())
    return trajectory, signs


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=0.1, betas=(0.9, 0.999), eps=1e-3, initial_accumulator=1e-6, weight_decay=0.0),
        # beta2 = 0.5 makes v overtake g^2, so both branches of sign(v - g^2) are exercised.
        dict(lr=0.05, betas=(0.8, 0.5), eps=1e-3, initial_accumulator=1e-6, weight_decay=0.1),
    ],
)
def test_yogi_matches_paper_algorithm(kwargs):
    x0 = np.array([1.0, -2.0, 0.5, 3.0])
    curv = np.array([1.0, 3.0, 0.5, 0.01])
    steps = 5
    b1, b2 = kwargs["betas"]
    expected, signs = yogi_reference(
        x0, curv, steps, kwargs["lr"], b1, b2, kwargs["eps"],
        kwargs["initial_accumulator"], kwargs["weight_decay"],
    )
    if b2 == 0.5:
        assert signs >= {-1.0, 1.0}, signs

    p = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    c = torch.tensor(curv, dtype=torch.float64)
    opt = Yogi([p], **kwargs)
    for t in range(steps):
        opt.zero_grad()
        (0.5 * (c * p * p).sum()).backward()
        opt.step()
        np.testing.assert_allclose(p.detach().numpy(), expected[t], rtol=1e-12, atol=1e-14)


def accelegrad_alpha(t):
    return 1.0 if t <= 2 else (t + 1) / 4.0


def accelegrad_reference(x0, grad_fn, steps, D, G, wd):
    """Algorithm 1 of Levy et al. 2018 (unconstrained); returns x_1 .. x_{steps+1}."""
    y, z, acc, xs = x0.copy(), x0.copy(), 0.0, []
    for t in range(steps + 1):
        a = accelegrad_alpha(t)
        tau = 1.0 / a
        x = tau * z + (1 - tau) * y
        xs.append(x.copy())
        if t == steps:
            break
        g = grad_fn(x) + wd * x
        acc += a * a * float(g @ g)
        eta = 2 * D / np.sqrt(G * G + acc)
        z = z - a * eta * g
        y = x - eta * g
    return xs


def test_accelegrad_alpha_schedule_is_the_papers():
    assert [accelegrad_alpha(t) for t in range(7)] == [1, 1, 1, 1, 1.25, 1.5, 1.75]


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_accelegrad_matches_paper_algorithm(wd):
    # Two tensors with very different gradient scales: only the global norm over the whole
    # param group reproduces the reference; 6 steps take alpha past t = 3.
    w0, b0 = np.array([1.0, -2.0, 0.5]), np.array([4.0, -3.0])
    curv = np.array([1.0, 3.0, 0.5, 10.0, 0.2])
    target = np.array([0.0, 0.0, 0.0, 1.0, 1.0])
    steps, D, G = 6, 0.5, 1.0
    expected = accelegrad_reference(
        np.concatenate([w0, b0]), lambda x: curv * (x - target), steps, D, G, wd
    )

    w = torch.tensor(w0, requires_grad=True)
    b = torch.tensor(b0, requires_grad=True)
    cw, cb = torch.tensor(curv[:3]), torch.tensor(curv[3:])
    opt = AcceleGrad([w, b], lr=D, G=G, weight_decay=wd)
    for t in range(steps):
        x = torch.cat([w, b]).detach().numpy()
        np.testing.assert_allclose(x, expected[t], rtol=1e-12, atol=1e-14)
        opt.zero_grad()
        (0.5 * (cw * w * w).sum() + 0.5 * (cb * (b - 1) ** 2).sum()).backward()
        opt.step()
    x = torch.cat([w, b]).detach().numpy()
    np.testing.assert_allclose(x, expected[steps], rtol=1e-12, atol=1e-14)
    assert not np.allclose(expected[steps], expected[0])


def test_accelegrad_leaves_params_without_grad_alone():
    used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.full((2,), 5.0))
    opt = AcceleGrad([used, unused], lr=1.0)
    for _ in range(4):
        opt.zero_grad()
        (used**2).sum().backward()
        opt.step()
    assert torch.equal(unused, torch.full((2,), 5.0))
    assert not torch.equal(used, torch.ones(3))


# ---------------------------------------------------------------- convergence


def least_squares_problem():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(200, 5, generator=gen)
    w_true = torch.randn(5, 1, generator=gen)
    y = X @ w_true + 0.01 * torch.randn(200, 1, generator=gen)
    return X, y


def train_least_squares(make_opt, steps):
    X, y = least_squares_problem()
    w = torch.zeros(5, 1, requires_grad=True)
    opt = make_opt([w])
    initial = float(((X @ w.detach() - y) ** 2).mean())
    for _ in range(steps):
        opt.zero_grad()
        loss = ((X @ w - y) ** 2).mean()
        loss.backward()
        opt.step()
    return initial, float(((X @ w.detach() - y) ** 2).mean())


@pytest.mark.parametrize(
    "make_opt, steps, threshold",
    [
        # The noise floor (least-squares optimum) is 8.4e-5; the start is 4.7.
        (lambda ps: Yogi(ps, lr=0.1), 100, 2e-4),
        # D = 5 over-estimates the distance to the optimum (about 2) on purpose.
        (lambda ps: AcceleGrad(ps, lr=5.0), 60, 2e-4),
    ],
    ids=["yogi", "accelegrad"],
)
def test_converges_on_least_squares(make_opt, steps, threshold):
    initial, final = train_least_squares(make_opt, steps)
    assert initial > 1.0
    assert final < threshold, f"loss {final:.3g} after {steps} steps, wanted < {threshold}"


# ---------------------------------------------------------------- state_dict round trip


def _run(model, opt, data, steps):
    X, y = data
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(X), y).backward()
        opt.step()


@pytest.mark.parametrize("name", sorted(NAMES_TO_TYPES))
def test_state_dict_round_trip_resumes_identically(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    data = (torch.randn(32, 4), torch.randn(32, 2))
    kwargs = dict(lr=0.05, weight_decay=1e-3, momentum=0.9)
    opt = build_optimizer(name, model.parameters(), **kwargs)
    _run(model, opt, data, 3)

    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    twin = copy.deepcopy(model)
    twin_opt = build_optimizer(name, twin.parameters(), **kwargs)
    buf.seek(0)
    twin_opt.load_state_dict(torch.load(buf))
    fresh = copy.deepcopy(model)
    fresh_opt = build_optimizer(name, fresh.parameters(), **kwargs)

    for m, o in ((model, opt), (twin, twin_opt), (fresh, fresh_opt)):
        _run(m, o, data, 4)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    # Without the saved state the run must differ, or this test could not fail.
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


# ---------------------------------------------------------------- registry and builder


@pytest.mark.parametrize("name, cls", sorted(NAMES_TO_TYPES.items()))
def test_build_optimizer_returns_the_right_type(name, cls):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer(name, [p], lr=0.01, weight_decay=0.0, momentum=0.5)
    assert type(opt) is cls
    assert opt.param_groups[0]["lr"] == 0.01
    if name == "sgd":
        assert opt.param_groups[0]["momentum"] == 0.5
        assert opt.param_groups[0]["nesterov"] is False


def test_registry_holds_exactly_the_documented_names():
    assert OPTIMIZERS.names() == sorted(NAMES_TO_TYPES)


def test_unknown_name_lists_known_names():
    with pytest.raises(SlimkitError) as info:
        build_optimizer("adamm", [torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    message = str(info.value)
    assert "adamm" in message
    for name in NAMES_TO_TYPES:
        assert name in message


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(lr=0.0), "lr"),
        (dict(lr=-1.0), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(lr=True), "lr"),
        (dict(lr=0.1, weight_decay=-1e-4), "weight_decay"),
        (dict(lr=0.1, momentum=1.0), "momentum"),
        (dict(lr=0.1, momentum=-0.1), "momentum"),
    ],
)
def test_build_optimizer_rejects_bad_arguments(kwargs, fragment):
    with pytest.raises(SlimkitError, match=fragment):
        build_optimizer("sgd", [torch.nn.Parameter(torch.zeros(1))], **kwargs)


def test_build_optimizer_rejects_empty_params():
    with pytest.raises(SlimkitError, match="empty"):
        build_optimizer("adam", [], lr=0.1)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: Yogi(ps, betas=(1.0, 0.999)),
        lambda ps: Yogi(ps, eps=0.0),
        lambda ps: Yogi(ps, initial_accumulator=-1.0),
        lambda ps: AcceleGrad(ps, G=0.0),
        lambda ps: AcceleGrad(ps, lr=-1.0),
    ],
)
def test_optimizers_reject_bad_hyperparameters(make):
    with pytest.raises(SlimkitError):
        make([torch.nn.Parameter(torch.zeros(1))])
