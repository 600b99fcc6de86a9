"""The reconstruction criteria (thinet, lasso, dcp), SSL and least-squares weight reconstruction."""

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import slimkit
from slimkit.errors import SlimkitError
from slimkit.prune import (
    CRITERIA,
    build_graph,
    compute_importance,
    criteria_needing_data,
    prune,
    reconstruct_mode,
    reconstruct_weights,
    sparsity_term,
    ssl_penalty,
)

torch.set_num_threads(1)


class Toy(nn.Module):
    """conv1 -> relu -> conv2 -> relu -> pool -> fc: conv1's channels are judged by what conv2 makes of them."""

    def __init__(self, c_in: int = 3, mid: int = 4, out: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, mid, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid, out, 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(out, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.act2(self.conv2(self.act1(self.conv1(x))))), 1))


def _batches(n: int = 2, bs: int = 8, shape=(3, 8, 8), classes: int = 3, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, *shape, generator=g), torch.randint(0, classes, (bs,), generator=g)) for _ in range(n)]


def _toy_with_known_answer() -> Toy:
    """conv2 ignores conv1's channel 1 (its weights there are zero) and is dominated by channel 2.

    Channel 1 also gets the *largest* conv1 filter, so a filter-norm criterion would keep it:
    only a criterion that looks at the next layer ranks it last.
    """
    torch.manual_seed(0)
    m = Toy()
    with torch.no_grad():
        m.conv1.bias.fill_(0.5)  # every channel active after the ReLU
        m.conv1.weight[1] *= 5
        m.conv2.weight[:, 1] = 0
        m.conv2.weight[:, 2] *= 10
    return m.eval()


def _mid_scores(criterion: str, model: Toy, **kw) -> np.ndarray:
    graph = build_graph(model, torch.zeros(1, 3, 8, 8))
    return compute_importance(criterion, model, graph, **kw)[graph.layers["conv1"].out_cls]


def _quiet_prune(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prune(*args, **kwargs)


# -- registry --------------------------------------------------------------------------------------

def test_registered_and_marked_data_driven():
    for name in ("thinet", "lasso", "dcp", "ssl"):
        assert name in CRITERIA
    assert {"taylor", "thinet", "lasso", "dcp"} <= criteria_needing_data() and "ssl" not in criteria_needing_data()
    assert reconstruct_mode("thinet") == "scale" and reconstruct_mode("lasso") == "full"
    assert reconstruct_mode("dcp") is None and reconstruct_mode("l1", True) == "full"
    assert reconstruct_mode("thinet", "none") is None and reconstruct_mode("l1", "scale") == "scale"
    with pytest.raises(SlimkitError, match="reconstruct"):
        reconstruct_mode("l1", "bogus")


@pytest.mark.parametrize("name", ["thinet", "lasso", "dcp"])
def test_missing_loader_raises(name):
    model = _toy_with_known_answer()
    graph = build_graph(model, torch.zeros(1, 3, 8, 8))
    with pytest.raises(SlimkitError, match=f"the {name} criterion needs data"):
        compute_importance(name, model, graph)
    with pytest.raises(SlimkitError, match=f"the {name} criterion needs data"):
        prune(model, torch.zeros(1, 3, 8, 8), criterion=name, ratio=0.5, round_to=1)
    with pytest.raises(SlimkitError, match="got no batches"):
        compute_importance(name, model, graph, loader=[])


# -- thinet and lasso: the next layer's reconstruction ---------------------------------------------

@pytest.mark.parametrize("name", ["thinet", "lasso"])
def test_reconstruction_criteria_known_answer(name):
    s = _mid_scores(name, _toy_with_known_answer(), loader=_batches(), batches=2)
    assert np.all(np.isfinite(s))
    assert int(np.argmin(s)) == 1, s  # conv2 never reads it
    assert int(np.argmax(s)) == 2, s  # conv2 is dominated by it
    assert _mid_scores("l1", _toy_with_known_answer())[1] == _mid_scores("l1", _toy_with_known_answer()).max()


def test_thinet_greedy_matches_brute_force():
    from itertools import combinations

    from slimkit.prune.reconstruct import _greedy_removal

    rng = np.random.default_rng(0)
    z = rng.normal(size=(50, 5)) * np.array([0.1, 1.0, 3.0, 0.5, 2.0])
    gram = z.T @ z
    order, errs = _greedy_removal(gram)
    assert sorted(order.tolist()) == list(range(5))
    assert order[0] == 0 and order[-1] == 2
    # each step's error is that of the chosen set, and the first step is the exact best single removal
    for k in range(1, 6):
        t = order[:k]
        assert np.isclose(errs[k - 1], np.ones(k) @ gram[np.ix_(t, t)] @ np.ones(k))
    best = min(combinations(range(5), 1), key=lambda t: gram[t[0], t[0]])
    assert order[0] == best[0]


def test_lasso_path_order():
    from slimkit.prune.reconstruct import _lasso_path_scores

    rng = np.random.default_rng(1)
    z = rng.normal(size=(400, 4)) * np.array([1.0, 0.0, 4.0, 0.3])  # channel 1 contributes nothing
    s = _lasso_path_scores(z.T @ z, 32)
    assert np.argsort(s).tolist() == [1, 3, 0, 2]
    assert s[1] == 0


def test_multiple_consumers_sum_their_relative_errors():
    """A channel read by two layers counts what both lose; each layer's error is relative to its output."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 3, 1)
            self.a = nn.Conv2d(3, 2, 1)
            self.b = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            h = torch.relu(self.conv1(x))
            return torch.cat([self.a(h), self.b(h)], 1).mean((2, 3))

    torch.manual_seed(0)
    m = Two().eval()
    with torch.no_grad():
        m.conv1.bias.fill_(0.5)
        m.a.weight[:, 0] *= 20  # a depends on channel 0
        m.b.weight.mul_(1000)  # b's scale is huge, yet it must not outvote a
        m.b.weight[:, 0] = 0  # b ignores channel 0
        m.b.weight[:, 2] = 0
        m.a.weight[:, 2] = 0  # nobody reads channel 2
    graph = build_graph(m, torch.zeros(1, 3, 4, 4))
    for name in ("thinet", "lasso"):
        s = compute_importance(name, m, graph, loader=_batches(shape=(3, 4, 4)), batches=2)[
            graph.layers["conv1"].out_cls]
        assert int(np.argmin(s)) == 2, (name, s)
        assert s[0] > s[2] and s[1] > s[2]


# -- dcp -------------------------------------------------------------------------------------------

class Synthetic(nn.Module):
    """conv1 passes input channels 0 (label) and 1 (noise) on; a block's conv reads both with equal weights.

    Equal weights and equal statistics make the two channels equally useful for reconstructing the
    block conv's output, so only the discrimination term can tell them apart. A second path from
    an unrelated input channel keeps the stage output (where the auxiliary head sits) alive when
    the conv is zeroed, as a residual shortcut does in a ResNet.
    """

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1)
            self.act = nn.ReLU()
            self.other = nn.Conv2d(3, 3, 1, bias=False)

        def forward(self, h, x):
            return self.act(self.conv(h)) + self.other(x)

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 2, 1, bias=False)
        self.block = self.Block()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.conv1.weight.copy_(torch.eye(3)[:2, :, None, None])
            self.block.conv.weight[:, 1] = self.block.conv.weight[:, 0]
            self.block.conv.bias.fill_(0.1)
            self.block.other.weight[:, :2] = 0

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.block(self.conv1(x), x)), 1))


def _signal_and_noise(n: int, bs: int, seed: int) -> list:
    """Channel 0 is +-1 by the label, channel 1 is +-1 at random (same statistics), channel 2 pixel noise."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.randint(0, 2, (bs,), generator=g)
        s = torch.randint(0, 2, (bs,), generator=g) * 2 - 1
        x = torch.stack([(2 * y - 1).float(), s.float(), torch.zeros(bs)], 1)[:, :, None, None].expand(bs, 3, 8, 8)
        out.append((x + torch.randn(bs, 3, 8, 8, generator=g) * torch.tensor([0.1, 0.1, 1.0])[:, None, None], y))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dcp_ranks_label_channel_above_noise(seed):
    torch.manual_seed(seed)
    m = Synthetic().eval()
    graph = build_graph(m, torch.zeros(1, 3, 8, 8))
    s = compute_importance("dcp", m, graph, loader=_signal_and_noise(2, 32, seed), batches=2, seed=seed)
    mid = s[graph.layers["conv1"].out_cls]
    assert mid[0] > mid[1], mid


def test_dcp_leaves_model_state():
    m = _toy_with_known_answer().train()
    before = copy.deepcopy(m.state_dict())
    grads = [p.requires_grad for p in m.parameters()]
    _mid_scores("dcp", m, loader=_batches(), batches=1, aux_epochs=1)
    assert m.training and [p.requires_grad for p in m.parameters()] == grads
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


# -- ssl -------------------------------------------------------------------------------------------

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 1, bias=False)
        self.conv2 = nn.Conv2d(3, 2, 1, bias=False)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x))).mean((2, 3))


def test_ssl_penalty_equals_hand_computation_and_shrinks_groups():
    torch.manual_seed(0)
    m = Tiny()
    term = ssl_penalty(m, torch.zeros(1, 2, 4, 4), strength=0.5)
    w1, w2 = m.conv1.weight.detach(), m.conv2.weight.detach()
    # the 3 middle channels are the only prunable groups (the model output is never pruned);
    # each group is conv1's filter k and conv2's input column k
    norms = [float((w1[k].pow(2).sum() + w2[:, k].pow(2).sum()).sqrt()) for k in range(3)]
    value = term(None)
    assert value.item() == pytest.approx(0.5 * sum(norms), rel=1e-5)
    graph = build_graph(m, torch.zeros(1, 2, 4, 4))
    s = compute_importance("ssl", m, graph)[graph.layers["conv1"].out_cls]
    assert np.allclose(s, norms, rtol=1e-6)
    value.backward()
    with torch.no_grad():
        for p in m.parameters():
            p -= 0.1 * p.grad
    w1, w2 = m.conv1.weight.detach(), m.conv2.weight.detach()
    after = [float((w1[k].pow(2).sum() + w2[:, k].pow(2).sum()).sqrt()) for k in range(3)]
    assert all(a < b for a, b in zip(after, norms))
    # a group-lasso step shrinks every group by the same amount, 0.1 * 0.5
    assert np.allclose(np.subtract(norms, after), 0.05, atol=1e-5)


def test_ssl_penalty_counts_bn_and_consumers_and_skips_blocked():
    torch.manual_seed(0)
    m = _toy_with_known_answer()
    graph = build_graph(m, torch.zeros(1, 3, 8, 8))
    term = ssl_penalty(m, graph, strength=1.0)
    m = copy.deepcopy(m).requires_grad_(False)  # same weights, for the hand computation
    # prunable: conv1's 4 channels (conv1 rows + bias, conv2 columns) and conv2's 6 (rows + bias, fc columns)
    expect = sum(float((m.conv1.weight[k].pow(2).sum() + m.conv1.bias[k] ** 2 + m.conv2.weight[:, k].pow(2).sum())
                       .sqrt()) for k in range(4))
    expect += sum(float((m.conv2.weight[k].pow(2).sum() + m.conv2.bias[k] ** 2 + m.fc.weight[:, k].pow(2).sum())
                        .sqrt()) for k in range(6))
    assert term(None).item() == pytest.approx(expect, rel=1e-5)


def test_ssl_training_shrinks_penalised_groups():
    from slimkit.train import fit

    data = _batches(n=4, bs=16, seed=3)

    def norms_after(strength: float) -> np.ndarray:
        torch.manual_seed(0)
        m = Toy()
        graph = build_graph(m, torch.zeros(1, 3, 8, 8))
        extra = {"ssl": ssl_penalty(m, graph, strength)} if strength else None
        fit(m, data, epochs=3, lr=0.05, weight_decay=0.0, progress=False, extra_losses=extra, schedule="constant")
        return compute_importance("ssl", m, graph)[graph.prunable()]

    torch.manual_seed(0)
    m0 = Toy()
    g0 = build_graph(m0, torch.zeros(1, 3, 8, 8))
    start = compute_importance("ssl", m0, g0)[g0.prunable()]
    plain, ssl = norms_after(0.0), norms_after(0.05)
    assert ssl.sum() < start.sum() and ssl.sum() < plain.sum()
    assert np.all(ssl < plain)


def test_sparsity_term_follows_the_criterion():
    m = Tiny()
    name, term = sparsity_term("ssl", m, torch.zeros(1, 2, 4, 4), 1e-3)
    assert name == "ssl" and term(None).item() > 0
    name, _ = sparsity_term("slimming", m, torch.zeros(1, 2, 4, 4), 1e-3)
    assert name == "slimming"


# -- weight reconstruction -------------------------------------------------------------------------

def _layer_error(original: nn.Module, pruned: nn.Module, name: str, kept: dict, data: list) -> float:
    """Relative squared error of the pruned layer's output (kept channels) against the original, all positions."""
    from slimkit.prune.reconstruct import _run

    num = den = 0.0
    keep = kept[name]["out"]
    with torch.no_grad():
        for x, _ in data:
            ((_, y0),), _ = _run(original.eval(), x, [original.get_submodule(name)])
            ((_, y1),), _ = _run(pruned.eval(), x, [pruned.get_submodule(name)])
            y0 = y0[:, keep]
            num += float((y0 - y1).pow(2).sum())
            den += float(y0.pow(2).sum())
    return num / den


@pytest.mark.parametrize("mode", ["scale", "full"])
def test_reconstruction_lowers_the_pruned_layer_error(mode):
    model = _toy_with_known_answer()
    with torch.no_grad():
        model.conv2.weight[:, 1] = torch.randn_like(model.conv2.weight[:, 1])  # make every cut cost something
    data = _batches(n=2, bs=16, seed=5)
    r = _quiet_prune(model, torch.zeros(1, 3, 8, 8), criterion="thinet", ratio=0.5, round_to=1, loader=data,
                     batches=2, reconstruct=False)
    assert len(r.kept["conv2"]["in"]) == 2 and r.reconstruction is None
    before = _layer_error(model, r.model, "conv2", r.kept, data)
    plain = copy.deepcopy(r.model)
    report = reconstruct_weights(model, r.model, r.kept, data, mode=mode, batches=2, positions=None)
    after = _layer_error(model, r.model, "conv2", r.kept, data)
    # the report's errors come from the accumulated normal equations (float32 products): close, not exact
    assert report["conv2"]["before"] == pytest.approx(before, rel=2e-2)
    assert report["conv2"]["after"] == pytest.approx(after, rel=2e-2)
    assert after < before
    if mode == "scale":  # ThiNet rescales whole input channels: filters stay proportional
        ratio = r.model.conv2.weight / plain.conv2.weight
        assert torch.allclose(ratio, ratio[:1, :, :1, :1].expand_as(ratio), rtol=1e-4)
    assert torch.equal(r.model.conv1.weight, plain.conv1.weight)  # layers whose inputs are intact stay


def test_reconstruction_on_resnet20_sampled_positions():
    model = slimkit.create_model("resnet20").eval()
    data = _batches(n=2, bs=8, shape=(3, 32, 32), classes=10)
    r = _quiet_prune(model, torch.zeros(1, 3, 32, 32), criterion="lasso", ratio=0.3, round_to=1, loader=data,
                     batches=2)
    report = reconstruct_weights(model, r.model, r.kept, data, mode="full", batches=2)
    assert report and all(v["after"] <= v["before"] for v in report.values())
    assert any(v["after"] < 0.9 * v["before"] for v in report.values())
    assert r.model(data[0][0]).shape == (8, 10)
    with pytest.raises(SlimkitError, match="mode"):
        reconstruct_weights(model, r.model, r.kept, data, mode="nope")


# -- end to end ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["thinet", "lasso", "dcp", "ssl"])
def test_prune_resnet20_with_each_criterion(name):
    model = slimkit.create_model("resnet20").eval()
    data = _batches(n=2, bs=8, shape=(3, 32, 32), classes=10)
    kw = {"loader": data, "batches": 2} if name in criteria_needing_data() else {}
    r = _quiet_prune(model, torch.zeros(1, 3, 32, 32), criterion=name, target_macs=0.6, **kw)
    assert r.macs_after <= 0.6 * r.macs_before and r.kept
    with torch.no_grad():
        assert r.model.eval()(data[0][0]).shape == (8, 10)


def test_prune_stage_ssl_sparsity_and_lasso_reconstruction(tmp_path):
    import json

    from slimkit.pipeline import run_recipe

    stages = [{"method": "prune", "criterion": "ssl", "ratio": 0.25, "round_to": 4,
               "sparsity": {"epochs": 1, "lr": 0.01, "strength": 1e-3}},
              {"method": "prune", "criterion": "lasso", "ratio": 0.25, "round_to": 4, "batches": 2}]
    report = run_recipe({"model": "digits_cnn", "data": "digits", "progress": False, "limit": 100,
                         "batch_size": 32, "stages": stages}, str(tmp_path), log=lambda _: None)
    macs = [s["metrics"]["macs"] for s in report["steps"]]
    assert macs[2] < macs[1] < macs[0]
    assert (tmp_path / "stages" / "01-prune" / "sparsity").is_dir()
    info = json.loads((tmp_path / "stages" / "02-prune" / "kept_channels.json").read_text())
    assert info["reconstruction"]["mode"] == "full" and info["reconstruction"]["layers"]


def test_cli_thinet_and_data_check(tmp_path):
    from conftest import run_cli

    def cli(*argv):
        return run_cli("prune", *argv)

    out = cli("digits_cnn", "--data", "digits", "--limit", "100", "--criterion", "thinet", "--ratio", "0.25",
              "--round-to", "4", "--batches", "2", "--batch-size", "32", "--out", str(tmp_path), "--no-bench")
    assert out["params_after"] < out["params_before"] and out["reconstruction"]
    with pytest.raises(SlimkitError, match="--data is needed for --criterion dcp"):
        cli("digits_cnn", "--criterion", "dcp", "--ratio", "0.25", "--out", str(tmp_path), "--no-bench")


def test_prune_reconstructs_by_the_papers_default_and_on_request():
    model = _toy_with_known_answer()
    with torch.no_grad():
        model.conv2.weight[:, 1] = torch.randn_like(model.conv2.weight[:, 1])
    data = _batches(n=2, bs=16, seed=5)
    x = torch.zeros(1, 3, 8, 8)
    auto = _quiet_prune(model, x, criterion="thinet", ratio=0.5, round_to=1, loader=data, batches=2)
    assert auto.reconstruction["mode"] == "scale" and auto.summary()["reconstruction"] == auto.reconstruction
    plain = _quiet_prune(model, x, criterion="l1", ratio=0.5, round_to=1)
    assert plain.reconstruction is None
    full = _quiet_prune(model, x, criterion="l1", ratio=0.5, round_to=1, reconstruct="full", loader=data, batches=2)
    layer = full.reconstruction["layers"]["conv2"]
    assert full.reconstruction["mode"] == "full" and layer["after"] < layer["before"]
    assert _layer_error(model, full.model, "conv2", full.kept, data) < _layer_error(model, plain.model, "conv2",
                                                                                     plain.kept, data)
    with pytest.raises(SlimkitError, match="needs data"):
        prune(model, x, criterion="l1", ratio=0.5, reconstruct="full")

