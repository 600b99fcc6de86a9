"""Exact pruning through grouped convs, channel shuffles, chunk/split and fixed channel slices (issue 22)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import slimkit
from slimkit.profile import profile
from slimkit.prune import build_graph, prune
from slimkit.testing import randomize_bn, zeroed_copy
from slimkit.testing.helpers import ShuffleGateNet


def _prune(model, x, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = prune(model, x, **kw)
    return r, [str(w.message) for w in caught]


def _assert_exact(model, r, x):
    zeroed = zeroed_copy(model, r.kept)
    with torch.no_grad():
        y_orig, y_zero, y_pruned = model(x), zeroed(x), r.model(x)
    assert not torch.allclose(y_orig, y_zero, atol=1e-4), "zeroing changed nothing: the test would prove nothing"
    assert (y_pruned - y_zero).abs().max().item() <= 1e-9 * max(1.0, y_zero.abs().max().item())
    assert profile(r.model, x[:1]).macs == r.macs_after  # the cost model predicts the pruned model exactly


@pytest.mark.parametrize("kw", [{"ratio": 0.3}, {"ratio": 0.5}, {"ratio": 0.7}, {"target_macs": 0.5}])
@pytest.mark.parametrize("criterion", ["l1", "random"])
def test_shuffle_gate_grouped_net_prunes_exactly(kw, criterion):
    # the goal network: concat -> shuffle -> SE gate -> grouped conv -> chunk -> depthwise x2;
    # with these constructs blocked it could not get below 0.86x of its MACs
    model = randomize_bn(ShuffleGateNet()).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    r, msgs = _prune(model, x[:1], criterion=criterion, round_to=1, **kw)
    assert not msgs, msgs
    _assert_exact(model, r, x)
    assert r.unprunable == ["head"]  # only the classifier's outputs stay
    g = r.model.grouped[0]
    assert g.groups == 4 and g.in_channels % 4 == 0 and g.out_channels % 4 == 0
    if "target_macs" in kw:
        assert r.macs_after <= 0.5 * r.macs_before
    else:
        assert r.macs_after < 0.86 * r.macs_before


@pytest.mark.parametrize("name,size", [("shufflenet_v2_x1_0", 64), ("shufflenet_v1", 64), ("resnext29_8x64d", 32),
                                       pytest.param("torchvision:regnet_x_400mf", 64, marks=pytest.mark.slow),
                                       pytest.param("torchvision:resnext50_32x4d", 64, marks=pytest.mark.slow)])
def test_grouped_and_shuffled_zoo_models_reach_half_the_macs_exactly(name, size):
    model = randomize_bn(slimkit.create_model(name, num_classes=10)).double()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    r, msgs = _prune(model, x[:1], criterion="random", target_macs=0.5, round_to=1)
    assert not msgs, msgs
    assert r.macs_after <= 0.5 * r.macs_before
    _assert_exact(model, r, x)
    for before, after in zip(model.modules(), r.model.modules()):  # groups survive, widths divide
        if isinstance(after, nn.Conv2d) and before.groups > 1:
            assert after.in_channels % after.groups == 0 and after.out_channels % after.groups == 0


def test_grouped_conv_keeps_the_same_positions_in_every_group():
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 16, 3, groups=4), nn.Flatten(), nn.LazyLinear(2)).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    m(x)
    r, _ = _prune(m, x[:1], criterion="random", ratio=0.5, round_to=1, seed=3)
    c = r.model[1]
    assert c.groups == 4 and (c.in_channels, c.out_channels) == (4, 8)
    kin, kout = r.kept["1"]["in"], r.kept["1"]["out"]
    assert len({i % 2 for i in kin}) == 1 and len(kin) == 4  # one of the 2 positions of each input group
    assert len({o % 4 for o in kout}) == 2 and len(kout) == 8  # the same 2 of 4 positions in every group
    _assert_exact(m, r, x)


def test_rounding_counts_channels_not_tied_classes():
    # a class tied across 4 groups is 4 channels: round_to=8 removes 2 such classes, not 8
    m = nn.Sequential(nn.Conv2d(3, 64, 1), nn.Conv2d(64, 64, 3, groups=4), nn.Flatten(), nn.LazyLinear(2))
    m(torch.zeros(1, 3, 4, 4))
    g = build_graph(m, torch.zeros(1, 3, 4, 4))
    tied = [grp for grp in g.groups if "1" in grp.producers][0]
    assert tied.widths == [4] and tied.step(0, 8) == 2
    r, _ = _prune(m, torch.zeros(1, 3, 4, 4), ratio=0.25, round_to=8)
    assert r.model[1].out_channels == 48


class _Split(nn.Module):
    def __init__(self, sizes_in_code: bool) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 16, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(16, 4, 1)
        self.fixed = sizes_in_code

    def forward(self, x):
        x = self.a(x)
        p, q = x.split(8, dim=1) if self.fixed else x.split(x.shape[1] // 2, dim=1)
        return self.c(torch.cat([p, self.b(q)], 1)).mean((2, 3))


def test_split_with_computed_size_is_pruned_and_fixed_size_is_named():
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    model = _Split(False).double()
    r, msgs = _prune(model, x[:1], criterion="random", ratio=0.5, round_to=1)
    assert not msgs and r.model.a.out_channels == 8 and r.model.b.in_channels == 4
    _assert_exact(model, r, x)
    r, msgs = _prune(_Split(True).double(), x[:1], criterion="random", ratio=0.5, round_to=1)
    assert any("split into channel sizes fixed in code (8, 8)" in m for m in msgs), msgs
    assert r.model.a.out_channels == 16  # blocked, still correct
    assert r.model(x).shape == (2, 4)


class _Slice(nn.Module):
    """GhostNet's ``cat([x1, cheap(x1)])[:, :oup]`` with oup fixed in code."""

    def __init__(self) -> None:
        super().__init__()
        self.primary = nn.Conv2d(3, 6, 1)
        self.cheap = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.out = nn.Conv2d(10, 4, 1)

    def forward(self, x):
        x1 = self.primary(x)
        return self.out(torch.cat([x1, self.cheap(x1)], 1)[:, :10]).mean((2, 3))


def test_fixed_channel_slice_blocks_what_it_keeps():
    model = _Slice().double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    g = build_graph(model, x[:1])
    assert g.blocked[g.layers["primary"].out_cls].all()  # its channels sit before the cut at 10
    r, msgs = _prune(model, x[:1], criterion="random", ratio=0.5, round_to=1)
    assert r.model(x).shape == (2, 4)


def test_view_with_every_size_fixed_in_code_blocks_and_names_it():
    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            n, _, h, w = x.shape
            y = self.a(x).view(n, 2, 4, h, w).transpose(1, 2).reshape(n, -1, h, w)
            return self.b(y).mean((2, 3))

    x = torch.randn(1, 3, 4, 4)
    with pytest.warns(UserWarning, match=r"view splits the channels into sizes fixed in code \(2, 4\)"):
        g = build_graph(Fixed(), x)
    assert g.blocked[g.layers["a"].out_cls].all()


def test_depthwise_multiplier_removes_whole_groups():
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 24, 3, padding=1, groups=8), nn.Conv2d(24, 4, 1)).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    r, _ = _prune(m, x[:1], criterion="random", ratio=0.5, round_to=1)
    c = r.model[1]
    assert (c.in_channels, c.out_channels, c.groups) == (4, 12, 4)
    kept_groups = {o // 3 for o in r.kept["1"]["out"]}
    assert kept_groups == set(r.kept["0"]["out"]) and len(r.kept["1"]["out"]) == 12
    zeroed = zeroed_copy(m, r.kept)
    assert torch.allclose(r.model(x), zeroed(x), atol=1e-12)


class _ConvNeXtBlock(nn.Module):
    """ConvNeXt's block (Liu et al. 2022): dw 7x7 -> permute -> LayerNorm -> Linear 4x -> GELU -> Linear -> permute."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm, self.fc1, self.act, self.fc2 = nn.LayerNorm(c), nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(self.act(self.fc1(self.norm(y)))).permute(0, 3, 1, 2)
        return self.head((x + y).mean((2, 3)))


def test_channels_last_mlp_is_pruned_and_layer_norm_channels_stay():
    model = _ConvNeXtBlock().double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    r, msgs = _prune(model, x[:1], criterion="random", ratio=0.5, round_to=1)
    assert not msgs, msgs
    assert r.model.fc1.out_features == 16 and r.model.fc2.in_features == 16  # the hidden width: pruned
    assert r.model.dw.out_channels == 8 and r.model.norm.normalized_shape == (8,)  # normalised channels: kept
    _assert_exact(model, r, x)
