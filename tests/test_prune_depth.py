"""Depth pruning: removable residual blocks are found, removing one is exact when its branch is zero, the least
useful blocks go first, the MAC target is met, and the stage/CLI/artifact paths work."""

import textwrap

import pytest
import torch
import torchvision
from conftest import run_cli
from torch import nn

import slimkit
from slimkit.errors import SlimkitError
from slimkit.models import create_model
from slimkit.profile import profile
from slimkit.prune import find_blocks, prune_blocks, remove_blocks
from slimkit.testing import randomize_bn

X32 = torch.zeros(1, 3, 32, 32)


def _zero_branch(block: nn.Module) -> None:
    """Make a block's residual branch output exactly zero: zero its last batch norm."""
    last = [m for m in block.modules() if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm))][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()


def test_find_blocks_resnet20_and_torchvision():
    blocks = find_blocks(create_model("resnet20"), X32)
    # 9 blocks; the first of stages 2 and 3 changes shape (option-A shortcut) and cannot go
    assert [b.name for b in blocks] == ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1",
                                        "layer3.2"]
    assert {b.replacement for b in blocks} == {"relu"}
    assert all(b.macs == 2 * 16 * 16 * 9 * 32 * 32 for b in blocks)  # two 3x3 convs, same MACs in every stage
    x = torch.zeros(1, 3, 64, 64)
    r18 = find_blocks(torchvision.models.resnet18(), x)
    assert [b.name for b in r18] == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    mv2 = find_blocks(torchvision.models.mobilenet_v2(), x)
    assert len(mv2) == 10 and {b.replacement for b in mv2} == {"identity"}
    assert find_blocks(torchvision.models.vgg11(), x) == []


@pytest.mark.parametrize("name", ["resnet20", "preact_resnet56", "wrn16_4", "shufflenet_v1_cifar", "xception_cifar",
                                  "channelnet_v1_cifar", "torchvision:resnet18", "torchvision:mobilenet_v2"])
def test_removing_a_zeroed_block_is_exact(name):
    model = randomize_bn(create_model(name, num_classes=10))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    blocks = find_blocks(model, x[:1])
    chosen = blocks[::2]
    assert chosen and len(blocks) > 1
    for b in chosen:
        _zero_branch(model.get_submodule(b.name))
    pruned = remove_blocks(model, chosen)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=1e-5)
        y = model(x)
        if (y[0] - y[1]).abs().max() > 1e-3 * y.abs().max():  # (some random-init nets barely see their input)
            assert (remove_blocks(model, blocks[1:2])(x) - y).abs().max() > 1e-4 * y.abs().max()  # a live one matters
    assert profile(pruned, x[:1]).macs == profile(model, x[:1]).macs - sum(b.macs for b in chosen)
    assert len(find_blocks(pruned, x[:1])) == len(blocks) - len(chosen)


class _Step(nn.Module):
    """``relu(x + conv(x))`` on 2 channels; a live step adds channel 0 to channel 1, a dead one adds nothing."""

    def __init__(self, live: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[1, 0] = float(live)

    def forward(self, x):
        return torch.relu(x + self.conv(x))


class _Counter(nn.Module):
    """Class 1 iff channel 1 reaches (live - 0.5) x channel 0: every live step is needed, a dead one never."""

    def __init__(self, pattern: list[bool]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[_Step(p) for p in pattern])
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[0.0, 0.0], [-4.0 * (sum(pattern) - 0.5), 4.0]]))

    def forward(self, x):
        return self.fc(self.blocks(x).flatten(1))


X1 = torch.zeros(1, 2, 1, 1)


def _known_case():
    model = _Counter([True, False, True, False, False, True]).eval()
    dead = ["blocks.1", "blocks.3", "blocks.4"]
    x = torch.zeros(64, 2, 1, 1)
    x[:, 0] = torch.rand(64, 1, 1, generator=torch.Generator().manual_seed(2)) + 1
    y = torch.ones(64, dtype=torch.long)
    with torch.no_grad():
        assert (model(x).argmax(1) == y).all()
    return model, dead, [(x[:32], y[:32]), (x[32:], y[32:])]


@pytest.mark.parametrize("scoring,probes", [("greedy", 6 + 5 + 4), ("lazy", 6 + 1 + 1), ("once", 6)])
def test_dead_blocks_go_first(scoring, probes):
    model, dead, data = _known_case()
    r = prune_blocks(model, X1, data, count=3, batches=2, scoring=scoring)
    assert sorted(r.removed) == dead
    # lazy: after the full first round only the front is re-probed, and a dead block stays at the front
    assert r.probes == r.summary()["probes"] == probes
    assert all(r.scores[b] == 0.0 for b in dead)  # bit-identical outputs: the loss does not move
    with torch.no_grad():
        torch.testing.assert_close(r.model(data[0][0]), model(data[0][0]))
    assert (r.macs_before, r.macs_after) == (6 * 4 + 4, 3 * 4 + 4)
    assert profile(model, X1).macs == r.macs_before  # the input model is left as it was
    live = prune_blocks(model, X1, data, count=6, batches=2, scoring="once").scores
    assert min(v for k, v in live.items() if k not in dead) > 1.0


def test_mac_target_is_met_and_artifact_round_trips(tmp_path):
    model = randomize_bn(create_model("resnet20"))
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    data = [(x, torch.arange(8))]
    r = prune_blocks(model, X32, data, target_macs=0.7, batches=1)
    prof = profile(r.model, X32)
    assert prof.macs == r.macs_after <= 0.7 * r.macs_before
    assert prof.macs + 2 * 16 * 16 * 9 * 32 * 32 > 0.7 * r.macs_before  # stopped as soon as the target was met
    path = slimkit.save(r.model, tmp_path / "m.safetensors")
    back = slimkit.load(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), r.model(x))
    model, dead, data = _known_case()
    assert sorted(prune_blocks(model, X1, data, target_macs=0.6).removed) == dead  # 16 of 28 MACs left


def test_errors_name_the_problem():
    model, _, data = _known_case()
    with pytest.raises(SlimkitError, match="exactly one of target_macs"):
        prune_blocks(model, X1, data)
    with pytest.raises(SlimkitError, match="leaves 0.143"):
        prune_blocks(model, X1, data, target_macs=0.1)
    with pytest.raises(SlimkitError, match="no removable residual block"):
        prune_blocks(create_model("digits_cnn"), torch.zeros(1, 1, 8, 8), data, count=1)
    with pytest.raises(SlimkitError, match="no batches"):
        prune_blocks(model, X1, [], count=1)
    with pytest.raises(SlimkitError, match="scoring: must be one of greedy, lazy, once, got 'fast'"):
        prune_blocks(model, X1, data, count=1, scoring="fast")
    r = prune_blocks(model, X1, data, count=2, protected=["blocks.1", "blocks.3"])
    assert r.removed == ["blocks.4", r.removed[1]] and r.removed[1] not in ("blocks.1", "blocks.3")


_RES_DIGITS = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv(x)))


def build(num_classes=10):
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), Block(16), Block(16), Block(16), Block(16),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
'''


def test_cli_blocks_then_channels_and_stage(tmp_path):
    src = tmp_path / "resdigits.py"
    src.write_text(textwrap.dedent(_RES_DIGITS))
    spec = f"{src}:build"
    out = run_cli("prune", spec, "--data", "digits", "--limit", "200", "--blocks", "0.8", "--out",
                  str(tmp_path / "depth"), "--no-bench", "--block-scoring", "lazy")
    assert len(out["removed_blocks"]) == 1 and out["kept"] == {}
    assert out["macs_after"] <= 0.8 * out["macs_before"]
    both = run_cli("prune", spec, "--data", "digits", "--limit", "200", "--blocks", "0.8", "--target-macs", "0.5",
                   "--criterion", "l1", "--round-to", "4", "--out", str(tmp_path / "both"), "--no-bench")
    assert len(both["removed_blocks"]) == 1 and both["kept"]
    assert both["macs_after"] <= 0.5 * both["macs_before"]  # the channel target is w.r.t. the original model
    header = slimkit.artifact.read_header(both["artifact"])
    assert header["meta"]["prune"]["removed_blocks"] == both["removed_blocks"]
    with pytest.raises(SlimkitError, match="--data is needed for --blocks"):
        run_cli("prune", spec, "--blocks", "0.8", "--out", str(tmp_path / "x"), "--no-bench")
    with pytest.raises(SlimkitError, match="not below --blocks"):
        run_cli("prune", spec, "--data", "digits", "--blocks", "0.5", "--target-macs", "0.6", "--out",
                str(tmp_path / "x"), "--no-bench")

    from slimkit.pipeline import run_recipe

    report = run_recipe({"model": spec, "data": "digits", "progress": False, "limit": 200,
                         "stages": [{"method": "prune_blocks", "count": 2, "batches": 1, "scoring": "once"}]},
                        str(tmp_path / "stage"), log=lambda _: None)
    before, after = report["steps"][0]["metrics"]["macs"], report["steps"][1]["metrics"]["macs"]
    assert after == before - 2 * 16 * 16 * 9 * 64
