"""Structured pruning: the channel graph, the criteria, the policies, artifacts, stage and CLI."""

import copy
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import run_cli
from torch import nn

import slimkit
from slimkit.errors import SlimkitError
from slimkit.models.cifar_resnet import PadShortcut
from slimkit.profile import profile
from slimkit.prune import CRITERIA, PrunedPadShortcut, build_graph, plan, prune, slimming_penalty
from slimkit.prune.pruner import _keep_count
from slimkit.testing import randomize_bn, zeroed_copy

torch.set_num_threads(1)


def _widths(model: nn.Module) -> dict:
    return {n: (m.in_channels, m.out_channels) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _quiet_prune(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prune(*args, **kwargs)


# -- every model: prunes, runs forward and backward, output shape unchanged ----------------------

FAST = [("resnet20", 32), ("resnet56", 32), ("resnet18", 64), ("mobilenet_v2", 64), ("shufflenet_v2_x1_0", 64),
        ("preact_resnet56", 32), ("mobilenet_v1_cifar", 32), ("googlenet", 64), ("densenet121", 64)]
SLOW = [("torchvision:efficientnet_b0", 64), ("vgg16", 64), ("densenet_bc100", 32), ("mobilenet_v3_small", 64),
        ("resnext29_8x64d", 32), ("xception_cifar", 32), ("wrn16_4", 32)]


@pytest.mark.parametrize("name,size", FAST + [pytest.param(*p, marks=pytest.mark.slow) for p in SLOW])
def test_prune_30_percent_forward_backward(name, size):
    model = slimkit.create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, size, size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = prune(model, x[:1], criterion="l1", target_macs=0.7)
    assert not [w for w in caught if "prediction" in str(w.message) or "cannot be reached" in str(w.message)]
    assert r.macs_after <= 0.7 * r.macs_before and r.params_after < r.params_before
    assert r.kept, "nothing was pruned"
    assert profile(r.model, x[:1]).macs == r.macs_after
    r.model.train()
    y = r.model(x)
    assert y.shape == (2, 10)
    y.square().mean().backward()
    assert all(p.grad is not None for p in r.model.parameters() if p.requires_grad)
    assert not any("mask" in n for n, _ in r.model.named_buffers())
    assert _widths(model) != _widths(r.model) and model(x).shape == (2, 10)  # original untouched, copy smaller


# -- equivalence: pruning == zeroing the removed channels -----------------------------------------

@pytest.mark.parametrize("name,size", [("resnet20", 32), ("resnet20:untied", 32), ("resnet18", 64),
                                       ("mobilenet_v2", 64),
                                       ("densenet121", 64),
                                       pytest.param("torchvision:efficientnet_b0", 64, marks=pytest.mark.slow),
                                       pytest.param("googlenet", 64, marks=pytest.mark.slow)])
def test_pruned_equals_zeroed_copy(name, size):
    untie = name.endswith(":untied")
    name = name.removesuffix(":untied")
    model = randomize_bn(slimkit.create_model(name, num_classes=10)).double()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    r = _quiet_prune(model, x[:1], criterion="random", ratio=0.3, round_to=1, untie_shortcuts=untie)
    zeroed = zeroed_copy(model, r.kept)
    with torch.no_grad():
        y_orig, y_zero, y_pruned = model(x), zeroed(x), r.model(x)
    assert not torch.allclose(y_orig, y_zero, atol=1e-3), "zeroing changed nothing: the test would prove nothing"
    scale = max(1.0, y_zero.abs().max().item())
    assert (y_pruned - y_zero).abs().max().item() <= 1e-5 * scale
    if name == "resnet20":  # option-A shortcuts were pruned too
        pads = [n for n in r.kept if n.endswith("shortcut")]
        assert pads and all(isinstance(r.model.get_submodule(n), (PadShortcut, PrunedPadShortcut)) for n in pads)


@pytest.mark.parametrize("untie", [False, True])
def test_iterative_pruning_through_pruned_shortcuts_equals_zeroed_copy(untie):
    # step 2 re-traces a model whose shortcuts are already PrunedPadShortcuts (before= or sources=)
    model = randomize_bn(slimkit.create_model("resnet20")).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    r = _quiet_prune(model, x[:1], criterion="random", ratio=0.4, round_to=1, steps=2, seed=1, untie_shortcuts=untie)
    assert any(isinstance(m, PrunedPadShortcut) for m in r.model.modules())
    with torch.no_grad():
        y_zero, y_pruned = zeroed_copy(model, r.kept)(x), r.model(x)
    assert (y_pruned - y_zero).abs().max().item() <= 1e-5 * max(1.0, y_zero.abs().max().item())


def test_resnet20_trunk_is_one_group_with_padshortcut():
    model = slimkit.create_model("resnet20")
    g = build_graph(model, torch.zeros(1, 3, 32, 32))
    L = g.layers
    # stem, every stage-1 block output and the middle 16 channels of stages 2 and 3 are the same channels
    assert (L["conv1"].out_cls == L["layer1.2.conv2"].out_cls).all()
    assert (L["layer2.0.conv2"].out_cls[8:24] == L["conv1"].out_cls).all()
    assert (L["layer3.0.conv2"].out_cls[16:48] == L["layer2.2.conv2"].out_cls).all()
    assert (L["layer2.0.shortcut"].out_cls[8:24] == L["layer2.0.shortcut"].in_cls).all()
    assert len(np.unique(L["layer3.2.conv2"].out_cls)) == 64
    assert g.class_group[L["conv1"].out_cls[0]] == g.class_group[L["layer3.2.conv2"].out_cls[0]]
    assert g.blocked[L["linear"].out_cls].all() and not g.blocked[L["linear"].in_cls].any()
    assert g.class_group[L["layer1.0.conv1"].out_cls[0]] != g.class_group[L["conv1"].out_cls[0]]


def test_resnet20_untied_stage_trunks_are_separate_groups():
    model = slimkit.create_model("resnet20")
    g = build_graph(model, torch.zeros(1, 3, 32, 32), untie_shortcuts=True)
    L = g.layers
    # the stem and every stage-1 block output are the same channels (residual adds)
    assert (L["conv1"].out_cls == L["layer1.2.conv2"].out_cls).all()
    # the option-A shortcut's output is the stage-2 trunk, not a copy of stage-1 channels
    assert (L["layer2.0.shortcut"].out_cls == L["layer2.0.conv2"].out_cls).all()
    assert (L["layer2.0.shortcut"].in_cls == L["layer1.2.conv2"].out_cls).all()
    assert not np.isin(L["layer2.0.conv2"].out_cls, L["conv1"].out_cls).any()
    assert len(np.unique(L["layer3.2.conv2"].out_cls)) == 64
    stage_groups = {g.class_group[L[n].out_cls[0]] for n in ("conv1", "layer2.0.conv2", "layer3.0.conv2")}
    assert len(stage_groups) == 3 and not g.blocked[L["layer2.0.shortcut"].out_cls].any()
    assert g.blocked[L["linear"].out_cls].all() and not g.blocked[L["linear"].in_cls].any()
    # a block's inner channels are a group of their own
    assert g.class_group[L["layer1.0.conv1"].out_cls[0]] != g.class_group[L["conv1"].out_cls[0]]


def test_pruned_shortcut_carries_zeros_where_its_source_was_removed(tmp_path):
    from slimkit.prune.pruner import apply_plan

    model = randomize_bn(slimkit.create_model("resnet20")).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    g = build_graph(model, x[:1], untie_shortcuts=True)
    L = g.layers
    removed = np.zeros(g.num_classes, dtype=bool)
    removed[L["conv1"].out_cls[[0, 5]]] = True          # stage-1 channels whose stage-2 positions (8, 13) stay
    removed[L["layer2.0.conv2"].out_cls[[0, 20]]] = True  # a zero-pad position and a copied one (source 12 stays)
    pruned = copy.deepcopy(model)
    apply_plan(pruned, g, removed)
    sc = pruned.layer2[0].shortcut
    assert isinstance(sc, PrunedPadShortcut) and (sc.in_channels, sc.out_channels) == (14, 30)
    src = sc.sources
    # old layout: 8 zeros, inputs 0..15, 8 zeros. Positions 8 and 13 lost their source (zeros now), position
    # 20 (source 12) is gone, the remaining inputs are renumbered 0..13 (old 12 -> 10 is no longer used)
    assert src == [-1] * 8 + [0, 1, 2, 3] + [-1] + [4, 5, 6, 7, 8, 9] + [11, 12, 13] + [-1] * 8
    zeroed = zeroed_copy(model, {"conv1": {"out": [i for i in range(16) if i not in (0, 5)]},
                             "bn1": {"out": [i for i in range(16) if i not in (0, 5)]}}
                     | {n: {"out": [i for i in range(16) if i not in (0, 5)]} for n in
                        [f"layer1.{b}.{k}" for b in range(3) for k in ("conv2", "bn2")]}
                     | {n: {"out": [i for i in range(32) if i not in (0, 20)]} for n in
                        [f"layer2.{b}.{k}" for b in range(3) for k in ("conv2", "bn2")]},
                     pads={"layer2.0.shortcut": [i for i in range(32) if i not in (0, 20)]})
    with torch.no_grad():
        assert torch.allclose(pruned.eval()(x), zeroed(x), atol=1e-9)
    sc_art = slimkit.load(slimkit.save(pruned.float(), tmp_path / "p.safetensors"))
    assert sc_art.layer2[0].shortcut.sources == src


def test_analytic_macs_resnet20():
    model = slimkit.create_model("resnet20")
    x = torch.zeros(1, 3, 32, 32)
    r = _quiet_prune(model, x, criterion="l2", target_macs=0.5, round_to=1)
    expected = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            n_in = len(r.kept[name]["in"]) if name in r.kept else m.in_channels
            n_out = len(r.kept[name]["out"]) if name in r.kept else m.out_channels
            side = 32 if name == "conv1" or name.startswith("layer1") else 16 if name.startswith("layer2") else 8
            expected += 9 * n_in * n_out * side * side
    n_feat = len(r.kept["linear"]["in"]) if "linear" in r.kept else 64
    expected += n_feat * 10
    assert profile(r.model, x).macs == expected == r.macs_after
    assert 0.45 * r.macs_before < r.macs_after <= 0.5 * r.macs_before


def test_concat_offsets_densenet_bc():
    model = slimkit.create_model("densenet_bc100")
    g = build_graph(model, torch.zeros(1, 3, 32, 32))
    L = g.layers
    names = [n for n in L if n.endswith("conv2")]
    first, second = names[0], names[1]
    nxt = next(n for n in L if n.endswith("conv1") and n > first and L[n].in_cls is not None
               and len(L[n].in_cls) > len(L[first].out_cls) * 2)
    # the consumer's input is [earlier features, ..., this layer's growth channels]
    assert set(L[first].out_cls) <= set(L[nxt].in_cls)
    assert g.class_group[L[first].out_cls[0]] != g.class_group[L[second].out_cls[0]]


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn(self.shared(x)))
        x = torch.relu(self.shared(x))  # the same weights again: its in and out channels are one set
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 4), 1))


def test_module_called_twice_and_flatten_linear():
    model = randomize_bn(_Twice()).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    g = build_graph(model, x[:1])
    L = g.layers
    assert (L["shared"].in_cls == L["shared"].out_cls).all() and (L["stem"].out_cls == L["shared"].in_cls).all()
    assert (L["head"].in_cls == np.repeat(L["shared"].out_cls, 16)).all()  # channel c -> features 16c..16c+15
    r = _quiet_prune(model, x[:1], criterion="random", ratio=0.5, round_to=1)
    assert r.model.shared.in_channels == r.model.shared.out_channels == 4 and r.model.head.in_features == 64
    with torch.no_grad():
        assert torch.allclose(r.model(x), zeroed_copy(model, r.kept)(x), atol=1e-10)


class _Gate(nn.Module):
    """Conv - BN - SE gate - conv: the gate's last conv is coupled to the gated channels."""

    def __init__(self):
        super().__init__()
        from slimkit.models.layers import SqueezeExcite

        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.se = SqueezeExcite(16, 4)
        self.out = nn.Conv2d(16, 6, 1)

    def forward(self, x):
        return self.out(self.se(torch.relu(self.bn(self.conv(x))))).mean((2, 3))


def test_se_gate_coupled_and_attributes_updated():
    model = randomize_bn(_Gate()).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    g = build_graph(model, x[:1])
    assert (g.layers["se.fc2"].out_cls == g.layers["conv"].out_cls).all()
    r = _quiet_prune(model, x[:1], criterion="l1", ratio=0.5, round_to=1)
    assert r.model.se.fc2.out_channels == r.model.conv.out_channels == 8 == r.model.se.channels
    with torch.no_grad():
        assert torch.allclose(r.model(x), zeroed_copy(model, r.kept)(x), atol=1e-10)


class _Dynamic(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x  # data-dependent control flow: fx cannot trace it


class _WithDynamic(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.odd = _Dynamic()
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.b(self.odd(self.a(x)))
        return self.fc(self.c(torch.relu(x)).mean((2, 3)))


def test_untraceable_module_is_left_alone_with_a_warning():
    model = _WithDynamic().eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.warns(UserWarning, match="odd"):
        r = prune(model, x, criterion="l1", ratio=0.5, round_to=1)
    assert r.model.a.out_channels == 8 and r.model.b.in_channels == 8  # around the opaque module: untouched
    assert r.model.b.out_channels == 4 and r.model.c.in_channels == 4  # elsewhere: pruned
    assert r.model(x).shape == (1, 3)


def test_protected_layers():
    model = slimkit.create_model("resnet20")
    r = _quiet_prune(model, torch.zeros(1, 3, 32, 32), ratio=0.5, round_to=1, protected=["layer1.0.conv1"])
    c = r.model.layer1[0].conv1
    assert (c.in_channels, c.out_channels) == (16, 16)
    assert r.model.layer1[1].conv1.out_channels == 8
    with pytest.raises(SlimkitError, match="not in the model"):
        prune(model, torch.zeros(1, 3, 32, 32), ratio=0.5, protected=["nope"])


# -- criteria with known answers -------------------------------------------------------------------

def _tiny(first_filters: torch.Tensor) -> nn.Module:
    m = nn.Sequential(nn.Conv2d(1, 4, 2, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        m[0].weight.copy_(first_filters.reshape(4, 1, 2, 2))
    return m.eval()


def test_l1_l2_remove_smallest_norm_filter():
    # filter 1 has the smallest L1 norm (3 vs 4), filter 0 the smallest L2 norm (2 vs 3)
    w = torch.tensor([[1.0, 1, 1, 1], [3, 0, 0, 0], [4, 4, 0, 0], [5, 5, 5, 0]])
    x = torch.zeros(1, 1, 4, 4)
    for criterion, gone in (("l1", 1), ("l2", 0)):
        r = prune(_tiny(w), x, criterion=criterion, ratio=0.25, round_to=1)
        assert r.kept["0"]["out"] == [i for i in range(4) if i != gone], criterion
        assert r.kept["5"]["in"] == r.kept["0"]["out"] and r.kept["1"]["out"] == r.kept["0"]["out"]


def test_group_l1_counts_consumers_and_batch_norm():
    # equal producer filters; channel 2's classifier column is zero and its BN scale tiny, channel 0's large
    m = _tiny(torch.ones(4, 4))
    with torch.no_grad():
        m[1].weight.copy_(torch.tensor([2.0, 1.0, 0.01, 1.0]))
        m[5].weight.copy_(torch.tensor([[3.0, 1, 0, 1], [3, 1, 0, 1], [3, 1, 0, 1]]))
    g = build_graph(m, torch.zeros(1, 1, 4, 4))
    cls = g.layers["0"].out_cls
    scores = CRITERIA.get("group_l1")(m, g)[cls]
    # mean over members (producer row 4, BN |gamma|, consumer column) by hand
    assert scores == pytest.approx([(4 + 2 + 9) / 3, (4 + 1 + 3) / 3, (4 + 0.01 + 0) / 3, (4 + 1 + 3) / 3])
    r = prune(m, torch.zeros(1, 1, 4, 4), criterion="group_l1", ratio=0.25, round_to=1)
    assert r.kept["0"]["out"] == [0, 1, 3]
    l1 = CRITERIA.get("l1")(m, g)[cls]
    assert np.allclose(l1, l1[0])  # the producer alone cannot tell them apart


def test_slimming_removes_smallest_abs_gamma_and_penalty():
    m = _tiny(torch.ones(4, 4))
    with torch.no_grad():
        m[1].weight.copy_(torch.tensor([0.5, -2.0, 0.1, -0.05]))
    r = prune(m, torch.zeros(1, 1, 4, 4), criterion="slimming", ratio=0.5, round_to=1)
    assert r.kept["1"]["out"] == [0, 1]  # |-0.05| and |0.1| go; -2.0 is large in magnitude
    batch = type("B", (), {"model": m, "logits": torch.zeros(1)})()
    assert slimming_penalty(0.5)(batch).item() == pytest.approx(0.5 * (0.5 + 2.0 + 0.1 + 0.05))


def test_taylor_matches_activation_times_gradient():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([1.0, 5.0, 0.2, 2.0]).reshape(4, 1, 1, 1))
        m[4].weight[:, 1] = 0  # the largest filter feeds nothing: taylor scores it 0, l1 would keep it
    batches = [(torch.rand(8, 1, 3, 3), torch.randint(0, 3, (8,))) for _ in range(3)]
    g = build_graph(m, batches[0][0][:1])
    scores = CRITERIA.get("taylor")(m, g, loader=batches, batches=3)
    # for a bias-free producer, sum_w g*w equals sum over positions of (dL/da) * a (Euler's theorem)
    expected = np.zeros(4)
    for x, y in batches:
        a = m[0](x)
        a.retain_grad()
        nn.functional.cross_entropy(m[1:](a), y).backward()
        expected += ((a.grad * a).sum((0, 2, 3)).detach().double().numpy()) ** 2
    m.zero_grad()
    order = g.layers["0"].out_cls
    np.testing.assert_allclose(scores[order], expected / 3, rtol=1e-6, atol=1e-12)
    r = prune(m, batches[0][0][:1], criterion="taylor", ratio=0.25, round_to=1, loader=batches, batches=3)
    assert 1 not in r.kept["0"]["out"]
    with pytest.raises(SlimkitError, match="needs data"):
        prune(m, batches[0][0][:1], criterion="taylor", ratio=0.25)


def test_random_criterion_is_seeded():
    model = slimkit.create_model("resnet20")
    x = torch.zeros(1, 3, 32, 32)
    a = _quiet_prune(model, x, criterion="random", ratio=0.3, seed=1).kept
    b = _quiet_prune(model, x, criterion="random", ratio=0.3, seed=1).kept
    c = _quiet_prune(model, x, criterion="random", ratio=0.3, seed=2).kept
    assert a == b and a != c


# -- policies ------------------------------------------------------------------------------------

def test_keep_count_rounding():
    assert _keep_count(64, 10, 8, "ceil") == 56
    assert _keep_count(64, 10, 8, "floor") == 48  # Torch-Pruning's rule: the kept width is rounded down
    assert _keep_count(64, 1, 8, "floor") == 56  # one channel below the threshold costs a whole chunk
    assert _keep_count(64, 1, 8, "ceil") == 64
    for rounding in ("floor", "ceil"):
        assert _keep_count(64, 0, 8, rounding) == 64
        assert _keep_count(16, 15, 8, rounding) == 8  # never below one multiple
        assert _keep_count(5, 4, 8, rounding) == 5  # nor below the original when that is smaller
        assert _keep_count(16, 15, 1, rounding) == 1


def test_rounding_spreads_or_concentrates_the_cut():
    """Same scores and MAC target: floor cuts a chunk from more groups than ceil, both meet the target."""
    model = slimkit.create_model("resnet20")
    x = torch.zeros(1, 3, 32, 32)
    cut = {}
    for rounding in ("floor", "ceil"):
        r = _quiet_prune(model, x, criterion="l1", target_macs=0.5, round_to=8, rounding=rounding)
        assert r.macs_after <= 0.5 * r.macs_before
        widths = _widths(r.model)
        cut[rounding] = sum(1 for n, (i, o) in _widths(model).items() if widths[n][1] < o)
    assert cut["floor"] > cut["ceil"]
    with pytest.raises(SlimkitError, match="rounding"):
        prune(model, x, target_macs=0.5, rounding="nearest")


def test_rounded_widths_are_multiples():
    model = slimkit.create_model("resnet18", num_classes=10)
    r = _quiet_prune(model, torch.zeros(1, 3, 64, 64), target_macs=0.5, round_to=8)
    widths = [w for n, (i, o) in _widths(r.model).items() for w in (i, o) if n != "conv1" or w != 3]
    assert all(w % 8 == 0 for w in widths)
    assert r.macs_after <= 0.5 * r.macs_before
    r = _quiet_prune(model, torch.zeros(1, 3, 64, 64), ratio=0.3, round_to=1)  # without rounding: odd widths
    assert any(w % 8 for n, (i, o) in _widths(r.model).items() for w in (i, o) if w != 3)


def test_target_params_and_explicit_ratios():
    model = slimkit.create_model("resnet20")
    x = torch.zeros(1, 3, 32, 32)
    r = _quiet_prune(model, x, target_params=0.6, round_to=1)
    assert r.params_after <= 0.6 * r.params_before < r.params_after + 2000
    r = _quiet_prune(model, x, ratios={"layer1.0.conv1": 0.5}, round_to=1)
    assert set(r.kept) == {"layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2"}
    assert r.model.layer1[0].conv1.out_channels == 8


def test_iterative_with_finetune_between_steps():
    model = slimkit.create_model("resnet20")
    x = torch.zeros(1, 3, 32, 32)
    calls = []
    r = _quiet_prune(model, x, target_macs=0.5, steps=3, round_to=1, finetune=lambda m, i: calls.append(i))
    assert calls == [1, 2]
    assert r.macs_after <= 0.5 * r.macs_before
    for name, entry in r.kept.items():  # kept indices refer to the original layers
        m = model.get_submodule(name)
        n_out = m.weight.shape[0] if hasattr(m, "weight") else m.out_channels
        assert len(set(entry["out"])) == len(entry["out"]) and max(entry["out"]) < n_out
    # composing the kept indices of all steps reproduces the pruned weights
    c = r.kept["layer2.1.conv1"]
    w = model.layer2[1].conv1.weight[c["out"]][:, c["in"]]
    assert torch.equal(w, r.model.layer2[1].conv1.weight)


def test_bad_arguments_raise():
    model = slimkit.create_model("resnet20")
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(SlimkitError, match="unknown pruning criterion"):
        prune(model, x, criterion="nope", target_macs=0.5)
    with pytest.raises(SlimkitError, match="target_macs"):
        prune(model, x, target_macs=1.5)
    with pytest.raises(SlimkitError, match="target_macs"):
        prune(model, x, target_macs=0)
    with pytest.raises(SlimkitError, match="ratio"):
        prune(model, x, ratio=1.0)
    with pytest.raises(SlimkitError, match="only one policy"):
        prune(model, x, target_macs=0.5, ratio=0.2)
    with pytest.raises(SlimkitError, match="one of"):
        prune(model, x)


# -- artifacts, stage, CLI -------------------------------------------------------------------------

def test_pruned_resnet20_roundtrips_through_artifact(tmp_path):
    model = randomize_bn(slimkit.create_model("resnet20"))
    x = torch.randn(2, 3, 32, 32)
    r = _quiet_prune(model, x[:1], criterion="random", ratio=0.4, round_to=1, seed=3)
    assert any(isinstance(m, (PadShortcut, PrunedPadShortcut)) for m in r.model.modules())
    path = slimkit.save(r.model, tmp_path / "p.safetensors")
    loaded = slimkit.load(path)
    assert _widths(loaded) == _widths(r.model)
    with torch.no_grad():
        assert torch.equal(loaded(x), r.model.eval()(x))
    # a user's fresh process that never imports slimkit.prune still loads it (the pruned shortcut registers
    # itself when its package is imported, which the loader now does for slimkit's own module types)
    torch.save(x, tmp_path / "x.pt")
    torch.save(r.model.eval()(x).detach(), tmp_path / "y.pt")
    code = ("import sys, torch, slimkit; m = slimkit.load(sys.argv[1]); x = torch.load(sys.argv[2]); "
            "assert torch.equal(m(x), torch.load(sys.argv[3])), 'outputs differ'")
    done = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_padshortcut_unbalanced_split():
    m = PrunedPadShortcut(2, 5, 1, before=3)
    y = m(torch.ones(1, 2, 2, 2))
    assert y[0, :3].abs().sum() == 0 and y[0, 3:5].eq(1).all()
    r = _quiet_prune(slimkit.create_model("resnet20"), torch.zeros(1, 3, 32, 32), ratio=0.3, round_to=1)
    for n in ("layer2.0.shortcut", "layer3.0.shortcut"):
        sc = r.model.get_submodule(n)
        assert sc.out_channels == r.model.get_submodule(n.replace("shortcut", "conv2")).out_channels


def test_prune_stage_in_recipe(tmp_path):
    from slimkit.pipeline import run_recipe

    report = run_recipe({"model": "digits_cnn", "data": "digits", "progress": False, "limit": 200,
                         "stages": [{"method": "prune", "criterion": "taylor", "target_macs": 0.6, "batches": 2,
                                     "round_to": 4}]}, str(tmp_path), log=lambda _: None)
    before, after = report["steps"][0]["metrics"], report["steps"][1]["metrics"]
    assert after["macs"] <= 0.6 * before["macs"]
    loaded = slimkit.load(report["artifact"])
    assert profile(loaded, torch.zeros(1, 1, 8, 8)).macs == after["macs"]
    assert (tmp_path / "stages" / "01-prune" / "kept_channels.json").exists()


def test_prune_stage_iterative_with_sparsity_and_finetune(tmp_path):
    from slimkit.pipeline import run_recipe

    stage = {"method": "prune", "criterion": "slimming", "target_macs": 0.5, "steps": 2, "round_to": 4,
             "step_finetune": {"epochs": 1, "lr": 0.01}, "sparsity": {"epochs": 1, "lr": 0.01, "strength": 1e-3},
             "finetune": {"epochs": 1, "lr": 0.01}}
    report = run_recipe({"model": "digits_cnn", "data": "digits", "progress": False, "limit": 100,
                         "batch_size": 64, "stages": [stage]}, str(tmp_path), log=lambda _: None)
    before, after = report["steps"][0]["metrics"], report["steps"][1]["metrics"]
    assert after["macs"] <= 0.5 * before["macs"]
    for run in ("sparsity", "step1"):
        assert (tmp_path / "stages" / "01-prune" / run).is_dir()


def test_cli_prune(tmp_path):
    out = run_cli("prune", "digits_cnn", "--data", "digits", "--limit", "200", "--criterion", "l2",
                  "--target-macs", "0.5", "--round-to", "4", "--out", str(tmp_path), "--no-bench")
    assert out["macs_after"] <= 0.5 * out["macs_before"] and out["params_after"] < out["params_before"]
    assert 0 <= out["test_top1_before"] <= 1 and 0 <= out["test_top1_after"] <= 1
    loaded = slimkit.load(out["artifact"])
    assert loaded.slimkit_meta["prune"]["kept"] == out["kept"]
    assert loaded.slimkit_history[-1]["stage"] == "prune"
    assert profile(loaded, torch.zeros(1, 1, 8, 8)).macs == out["macs_after"]
    with pytest.raises(SlimkitError, match="unknown pruning criterion 'bogus'|unknown .*'bogus'"):
        run_cli("prune", "digits_cnn", "--criterion", "bogus", "--target-macs", "0.5", "--out", str(tmp_path),
                "--no-bench")


def test_cli_prune_names_a_model_data_mismatch(tmp_path):
    # resnet20 takes 3x32x32; digits are 1x8x8: a one-line error naming the dataset, not a conv traceback
    with pytest.raises(SlimkitError, match="cannot take input of shape \\(1, 8, 8\\) from dataset digits"):
        run_cli("prune", "resnet20", "--data", "digits", "--limit", "50", "--target-macs", "0.5", "--out",
                str(tmp_path), "--no-bench")


def test_cli_prune_distills_from_another_teacher(tmp_path):
    # same seed, same cut, same budget: only the teacher differs, so the fine-tuned weights must differ,
    # and the teacher is recorded; a teacher for the wrong number of classes is named before any work
    weights, student = tmp_path / "teacher.pt", tmp_path / "student.pt"
    torch.manual_seed(7)
    torch.save(slimkit.create_model("digits_cnn", num_classes=10).state_dict(), weights)
    torch.save(slimkit.create_model("digits_cnn", num_classes=10).state_dict(), student)
    common = ["digits_cnn", "--weights", str(student), "--data", "digits", "--limit", "60", "--batch-size", "32",
              "--criterion", "l1",
              "--target-macs", "0.5", "--round-to", "4", "--finetune-epochs", "1", "--distill", "kd", "--no-bench"]
    own = run_cli("prune", *common, "--out", str(tmp_path / "own"))
    other = run_cli("prune", *common, "--teacher", "digits_cnn", "--teacher-weights", str(weights),
                    "--out", str(tmp_path / "other"))
    mine, theirs = slimkit.load(own["artifact"]), slimkit.load(other["artifact"])
    assert own["kept"] == other["kept"] and theirs.slimkit_meta["prune"]["params"]["teacher"] == "digits_cnn"
    a, b = mine.state_dict(), theirs.state_dict()
    assert any(not torch.allclose(a[k].float(), b[k].float()) for k in a)
    with pytest.raises(SlimkitError, match="teacher resnet20"):
        run_cli("prune", *common, "--teacher", "resnet20", "--out", str(tmp_path / "bad"))
    with pytest.raises(SlimkitError, match="--teacher goes with --distill"):
        run_cli("prune", "digits_cnn", "--data", "digits", "--target-macs", "0.5", "--teacher", "digits_cnn",
                "--out", str(tmp_path / "bad"), "--no-bench")


@pytest.mark.slow
def test_cli_prune_bench(tmp_path):
    out = run_cli("prune", "resnet20", "--target-macs", "0.5", "--out", str(tmp_path), "--threads", "1")
    assert out["latency"]["bs1"]["speedup"] > 0 and out["latency"]["bs64"]["speedup"] > 0


class _Scaled(nn.Module):
    """A per-channel constant (ConvNeXt's layer scale) must not be mistaken for a broadcast scalar."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(8, 1, 1))
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(self.scale * self.a(x)).mean((2, 3))


def test_per_channel_constant_blocks_its_channels():
    with pytest.warns(UserWarning, match="per-channel parameter used in code"):
        r = prune(_Scaled(), torch.zeros(1, 3, 8, 8), ratio=0.5, round_to=1)
    assert r.model.a.out_channels == 8 and r.model(torch.zeros(1, 3, 8, 8)).shape == (1, 4)


@pytest.mark.parametrize("name,size", [("mobilenet_v1_cifar", 32),
                                       pytest.param("torchvision:efficientnet_b0", 64, marks=pytest.mark.slow),
                                       pytest.param("densenet121", 64, marks=pytest.mark.slow)])
def test_pruned_zoo_models_roundtrip(tmp_path, name, size):
    from slimkit.models.layers import ConvBNAct

    model = randomize_bn(slimkit.create_model(name, num_classes=10))
    x = torch.randn(2, 3, size, size)
    r = _quiet_prune(model, x[:1], criterion="l1", target_macs=0.6)
    for m in r.model.modules():  # registered blocks describe their pruned children truthfully
        if isinstance(m, ConvBNAct):
            assert (m.in_channels, m.out_channels, m.groups) == (m[0].in_channels, m[0].out_channels, m[0].groups)
    loaded = slimkit.load(slimkit.save(r.model, tmp_path / "m.safetensors"))
    with torch.no_grad():
        assert torch.equal(loaded(x), r.model.eval()(x))


# -- measured-latency target ----------------------------------------------------------------------

def test_plan_latency_target_bisects_on_the_measured_cost():
    from slimkit.prune.pruner import estimate

    model = slimkit.create_model("resnet20")
    x = torch.zeros(1, 3, 32, 32)
    g = build_graph(model, x)
    scores = np.random.default_rng(0).random(g.num_classes)
    m0 = estimate(g, np.zeros(g.num_classes, dtype=bool))[0]
    calls = []

    def latency_of(removed):  # a stand-in timer: latency proportional to MACs
        calls.append(1)
        return estimate(g, removed)[0] / m0

    base = profile(model, x)
    kw = dict(base_macs=base.macs, base_params=base.params, round_to=8)
    by_latency = plan(g, scores, target_latency=0.6, latency_of=latency_of, **kw)
    assert calls and estimate(g, by_latency)[0] / m0 <= 0.6
    # the smallest removal meeting the goal: putting back the last rounding chunk of any group breaks it
    assert estimate(g, by_latency)[0] / m0 > 0.5
    with pytest.raises(SlimkitError, match="latency"):
        plan(g, scores, target_latency=0.6, **kw)


def test_prune_latency_target_measures_the_result():
    model = slimkit.create_model("digits_cnn").eval()
    r = _quiet_prune(model, torch.zeros(1, 1, 8, 8), criterion="l1", target_latency=0.95, latency_batch=4)
    # a measured ratio (its value is machine noise for a model this small, so only its presence is asserted)
    assert isinstance(r.latency_ratio, float) and np.isfinite(r.latency_ratio) and r.latency_ratio > 0
    assert r.summary()["latency_ratio"] == r.latency_ratio
    for bad in ({"target_latency": 1.5}, {"target_latency": 0.5, "target_macs": 0.5},
                {"target_latency": 0.5, "latency_batch": 0}):
        with pytest.raises(SlimkitError):
            prune(model, torch.zeros(1, 1, 8, 8), **bad)
