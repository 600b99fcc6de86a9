"""Latency-table pruning (slimkit.prune.latency): the table, the planner on a known case, the policy end to end."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import slimkit
from slimkit.errors import SlimkitError
from slimkit.profile import profile
from slimkit.prune import LatencyTable, build_graph, plan, prune
from slimkit.prune import latency as latency_mod
from slimkit.prune.pruner import estimate


class Chain(nn.Module):
    """a (3->16) -> b (16->16) -> c (16->8) -> head: prunable groups A = a's out, B = b's out, C = c's out."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bna = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.b, self.bnb = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = torch.relu(self.bna(self.a(x)))
        x = torch.relu(self.bnb(self.b(x)))
        return self.head(self.c(x).mean((2, 3)))


class FakeTable(LatencyTable):
    """Deterministic costs: only group A's width costs time (a's outputs, b's inputs); B's and C's are free."""

    def call_seconds(self, name, kin, kout, batch):
        return {"a": kout * 1e-3, "b": kin * 1e-3}.get(name, 0.0)


@pytest.fixture
def chain(monkeypatch):
    monkeypatch.setattr(latency_mod, "median_seconds", lambda fn, *a, **k: 0.1)  # the whole model: 100 ms
    model, x = Chain().eval(), torch.zeros(1, 3, 8, 8)
    g = build_graph(model, x)
    a_cls, b_cls, c_cls = (np.nonzero(g.class_group == g.class_group[g.layers[n].out_cls[0]])[0] for n in "abc")
    assert len(a_cls) == len(b_cls) == 16 and len(c_cls) == 8 and g.prunable()[np.r_[a_cls, b_cls, c_cls]].all()
    scores = np.ones(g.num_classes)
    scores[a_cls] = np.arange(1, 17)  # A's lowest-scored channels are its first ones
    scores[b_cls] = np.r_[np.full(8, 0.01), np.ones(8)]  # B has very unimportant channels, but they save no time
    return model, x, g, scores, a_cls, b_cls, c_cls


def test_plan_latency_cuts_where_time_is_saved_and_stops_at_the_target(chain):
    model, x, g, scores, a_cls, b_cls, c_cls = chain
    table = FakeTable(model, g, x, batch_sizes=(1,))
    assert table.predict({}, 1) == pytest.approx(0.1)
    prof = profile(model, x)
    removed = plan(g, scores, base_macs=prof.macs, base_params=prof.params, target_latency=0.8, latency_table=table,
                   round_to=4)
    # 0.1 s -> <= 0.08 s: each A channel costs 2 ms (a's output + b's input); 8 save 16 ms (not enough), 12 save 24
    assert not removed[b_cls].any() and not removed[c_cls].any()
    assert removed[a_cls].sum() == 12 and removed[a_cls[:12]].all()
    counts = {n: table.widths(n, ~removed) for n in ("a", "b")}
    assert table.predict(counts, 1) == pytest.approx(0.076)


def test_plan_latency_with_a_mac_budget_also_cuts_the_free_group(chain):
    model, x, g, scores, a_cls, b_cls, _ = chain
    table = FakeTable(model, g, x, batch_sizes=(1,))
    prof = profile(model, x)
    m0 = estimate(g, np.zeros(g.num_classes, dtype=bool))[0]
    offset = prof.macs - m0
    removed = plan(g, scores, base_macs=prof.macs, base_params=prof.params, target_latency=0.8, target_macs=0.3,
                   latency_table=table, round_to=4)
    # while both budgets are unmet, B's near-zero channels are the cheapest MACs to give up; A's still go for time
    assert removed[b_cls].sum() == 8 and removed[b_cls[:8]].all()
    assert removed[a_cls].sum() == 12 and offset + estimate(g, removed)[0] <= 0.3 * prof.macs


def test_latency_table_times_each_distinct_layer_once():
    model, x = slimkit.create_model("resnet20").eval(), torch.zeros(1, 3, 32, 32)
    g = build_graph(model, x)
    table = LatencyTable(model, g, x, batch_sizes=(1, 2), repeats=1)
    convs = [n for n, r in g.layers.items() if r.kind == "conv"]
    assert set(convs) <= set(table.full) and all(table.calls[n] == 1 for n in convs)
    assert table.shapes["layer2.0.conv1"] == (1, 16, 32, 32) and table.shapes["layer3.1.conv2"] == (1, 64, 8, 8)
    # 19 convs and 19 batch norms at two batch sizes, but repeated blocks share their timings
    assert len(table.cache) <= 2 * 10
    for b in (1, 2):
        assert table.predict({}, b) == pytest.approx(table.model_seconds[b])
        assert table.full_layers[b] > 0  # (not below model_seconds: layers timed alone can sum to more, noise)
    # a narrower layer is predicted from its own timing: the full-width entry is not reused
    narrow = table.predict({"layer3.1.conv2": (64, 32)}, 1)
    assert narrow == pytest.approx(table.model_seconds[1] - table.layer_seconds("layer3.1.conv2", 64, 64, 1)
                                   + table.layer_seconds("layer3.1.conv2", 64, 32, 1))


def test_prune_with_a_latency_table_meets_both_budgets():
    model, x = slimkit.create_model("resnet20").eval(), torch.zeros(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = prune(model, x, criterion="l1", target_macs=0.6, target_latency=0.9, latency_model="table",
                  latency_batch=(1, 8))
    assert r.macs_after <= 0.6 * r.macs_before
    assert isinstance(r.latency_ratio, float) and r.latency_ratio > 0  # measured at both, the worst kept
    with torch.no_grad():
        assert r.model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    for m in r.model.modules():  # every width stays a multiple of round_to
        if isinstance(m, nn.Conv2d) and m is not r.model.conv1:
            assert m.out_channels % 8 == 0


@pytest.mark.parametrize("bad,match", [
    ({"target_latency": 0.5, "latency_model": "roofline"}, "latency_model"),
    ({"target_latency": 0.5, "latency_batch": (1, 64)}, "latency_model='table'"),
    ({"target_latency": 0.5, "latency_batch": (1, 0), "latency_model": "table"}, "latency_batch"),
    ({"target_latency": 0.5, "target_macs": 0.5}, "latency_model='table'"),
    ({"target_latency": 0.5, "target_params": 0.5, "latency_model": "table"}, "only one policy"),
])
def test_latency_table_policy_errors(bad, match):
    model = slimkit.create_model("digits_cnn")
    with pytest.raises(SlimkitError, match=match):
        prune(model, torch.zeros(1, 1, 8, 8), **bad)


def test_latency_table_rejects_bad_batch_sizes():
    model, x = Chain().eval(), torch.zeros(1, 3, 8, 8)
    with pytest.raises(SlimkitError, match="batch sizes"):
        LatencyTable(model, build_graph(model, x), x, batch_sizes=(0,))


def test_cli_prune_blocks_then_latency_table(tmp_path):
    from conftest import CIFAR_JPEG, need, run_cli

    out = run_cli("prune", "resnet20", "--data", f"cifar10:{need(CIFAR_JPEG)}", "--limit", "100", "--blocks", "0.9",
                  "--target-macs", "0.6",
                  "--target-latency", "0.9", "--latency-model", "table", "--latency-batch", "1,4", "--out",
                  str(tmp_path), "--no-bench", "--threads", "1")
    params = slimkit.load(out["artifact"]).slimkit_meta["prune"]["params"]
    assert params["latency_model"] == "table" and params["latency_batch"] == [1, 4] and out["removed_blocks"]
    assert out["macs_after"] <= 0.6 * out["macs_before"] and out["latency_ratio"] > 0
    assert slimkit.load(out["artifact"])(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(SlimkitError, match="--latency-batch"):
        run_cli("prune", "resnet20", "--target-latency", "0.9", "--latency-batch", "1,x", "--out", str(tmp_path))



def test_prune_stage_with_a_latency_table(tmp_path):
    from slimkit.pipeline import run_recipe

    stage = {"method": "prune", "criterion": "l1", "target_macs": 0.6, "target_latency": 0.95,
             "latency_model": "table", "latency_batch": [1, 4], "round_to": 4, "steps": 2}
    report = run_recipe({"model": "digits_cnn", "data": "digits", "progress": False, "limit": 100, "stages": [stage]},
                        str(tmp_path), log=lambda _: None)
    before, after = report["steps"][0]["metrics"], report["steps"][1]["metrics"]
    assert after["macs"] <= 0.6 * before["macs"]
    assert slimkit.load(report["artifact"]).slimkit_meta is not None


def _plan_for_0_8(model, x, g, scores):
    """The table plan for target_latency=0.8 on the chain, with the keyword arguments that re-plan it."""
    prof = profile(model, x)
    kw = {"base_macs": prof.macs, "base_params": prof.params, "target_latency": 0.8, "round_to": 2,
          "latency_table": FakeTable(model, g, x, batch_sizes=(1,))}
    return kw, plan(g, scores, **kw)


def test_closed_loop_replans_with_a_tighter_target_until_the_measurement_meets_it(chain):
    from slimkit.prune.latency import TABLE_ROUNDS, closed_loop

    model, x, g, scores, a_cls, _, _ = chain
    kw, first = _plan_for_0_8(model, x, g, scores)  # 10 of A's channels (2 ms each) take the predicted 100 ms to 80
    seen = []

    def measure(removed):  # the real model runs slower than the table says: 0.9 -> tighter plan -> 0.78
        seen.append(int(removed[a_cls].sum()))
        return {10: 0.9}.get(seen[-1], 0.78)

    final = closed_loop(g, scores, first, kw, measure)
    assert seen[0] == 10 and len(seen) == 2 and seen[1] > 10  # re-planned once, with more of A removed
    assert final[a_cls].sum() == seen[1]  # 0.78 is within TABLE_TOLERANCE under 0.8: tight enough, kept
    seen.clear()
    never = closed_loop(g, scores, first, kw, lambda r: seen.append(1) or 0.95)  # never meets it: bounded rounds
    # bounded: at most TABLE_ROUNDS plans, and it stops early once the table repeats a plan it already measured
    assert 2 <= len(seen) <= TABLE_ROUNDS and (never == first).all()  # nothing measured better than the first plan


def test_closed_loop_loosens_an_overshooting_plan_and_keeps_the_one_with_most_macs_in_budget(chain):
    from slimkit.prune.latency import closed_loop

    model, x, g, scores, a_cls, _, _ = chain
    kw, first = _plan_for_0_8(model, x, g, scores)
    seen = []

    def measure(removed):  # faster than the table says: 10 of A cut -> 0.7, so a looser plan (fewer cut) is tried
        seen.append(int(removed[a_cls].sum()))
        return 0.7 if seen[-1] >= 10 else 0.79

    final = closed_loop(g, scores, first, kw, measure)
    assert seen[0] == 10 and seen[1] < 10 and len(seen) == 2  # 0.79 is within tolerance: stop
    assert final[a_cls].sum() == seen[1]  # both meet 0.8; the one that cut less (more MACs left) is kept


class Trunk(nn.Module):
    """s (3->8) -> residual block (p 8->8, q 8->8) -> h (8->4) -> head: the trunk (s, q out; p, h in) spans 4 convs."""

    def __init__(self) -> None:
        super().__init__()
        self.s, self.p, self.q = (nn.Conv2d(i, 8, 3, padding=1) for i in (3, 8, 8))
        self.h, self.head = nn.Conv2d(8, 4, 1), nn.Linear(4, 2)

    def forward(self, x):
        t = torch.relu(self.s(x))
        t = torch.relu(t + self.q(torch.relu(self.p(t))))
        return self.head(self.h(t).mean((2, 3)))


class BlockTable(LatencyTable):
    """Only the block's convs cost time, 1 ms per channel in or out: a trunk or an inner chunk saves the same."""

    def call_seconds(self, name, kin, kout, batch):
        return (kin + kout) * 1e-3 if name in ("p", "q") else 0.0


@pytest.mark.parametrize("trunk_low, trunk_goes", [(0.5, False), (0.3, True)])
def test_plan_latency_weighs_a_trunk_channel_by_the_layers_it_touches(monkeypatch, trunk_low, trunk_goes):
    monkeypatch.setattr(latency_mod, "median_seconds", lambda fn, *a, **k: 0.1)
    model, x = Trunk().eval(), torch.zeros(1, 3, 8, 8)
    g = build_graph(model, x)
    trunk, inner = (np.nonzero(g.class_group == g.class_group[g.layers[n].out_cls[0]])[0] for n in ("q", "p"))
    assert len(trunk) == len(inner) == 8 and g.class_group[g.layers["s"].out_cls[0]] == g.class_group[trunk[0]]
    scores = np.ones(g.num_classes)
    scores[trunk] = np.r_[np.full(4, trunk_low), np.full(4, 2 - trunk_low)]  # group means stay 1
    scores[inner] = np.r_[np.full(4, 0.8), np.full(4, 1.2)]
    prof = profile(model, x)
    removed = plan(g, scores, base_macs=prof.macs, base_params=prof.params, target_latency=0.96,
                   latency_table=BlockTable(model, g, x, batch_sizes=(1,)), round_to=4)
    # one chunk of 4 saves 8 of the 32 ms; the trunk's 4 x 0.5 counts twice (4 convs / 2) against the inner 4 x 0.8,
    # so the inner chunk goes; at 4 x 0.3 (x2 = 2.4 < 3.2) the trunk's chunk is the cheaper one
    assert removed.sum() == 4
    assert removed[trunk[:4]].all() == trunk_goes and removed[inner[:4]].all() != trunk_goes
