"""Sensitivity scan (Li et al. 2017): per-group probes, ratios from a drop threshold or a MAC budget."""

import pytest
import torch
from conftest import run_cli
from torch import nn

import slimkit
from slimkit.errors import SlimkitError
from slimkit.profile import profile
from slimkit.prune import prune, sensitivity_ratios, sensitivity_scan


class _TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 1)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def _known_case():
    torch.manual_seed(0)
    m = _TwoLayer().eval()
    with torch.no_grad():
        m.conv1.weight.zero_()  # two dead channels (removing them changes nothing), two that carry one input each
        m.conv1.weight[0, 0], m.conv1.weight[1, 1] = 1.5, -1.5
        m.conv1.bias.copy_(torch.tensor([0.5, 0.5, 0.0, 0.0]))
        w = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [1, -1, 0, 0]])
        m.conv2.weight.copy_(w[:, :, None, None])
        m.conv2.bias.zero_()  # every output channel is live and read by the classifier
    x = torch.randn(256, 2, 4, 4)
    with torch.no_grad():
        y = m(x).argmax(1)  # labels the unpruned model gets all right
    return m, [(x[:128], y[:128]), (x[128:], y[128:])]


def test_scan_finds_the_free_group_and_the_sensitive_one():
    m, data = _known_case()
    scan = sensitivity_scan(m, torch.zeros(1, 2, 4, 4), data, criterion="l1", steps=(0.25, 0.5, 0.75), batches=2)
    assert scan.base_top1 == 1.0
    assert set(scan.top1) == {"conv1", "conv2"}
    assert scan.top1["conv1"][0.25] == scan.top1["conv1"][0.5] == 1.0  # only dead channels go
    assert scan.top1["conv1"][0.75] < 1.0  # then a live one
    assert scan.top1["conv2"][0.25] < 1.0
    assert scan.ratios(0.0) == {"conv1": 0.5, "conv2": 0.0}
    assert scan.ratios(1.0) == {"conv1": 0.75, "conv2": 0.75}
    r = prune(m, torch.zeros(1, 2, 4, 4), criterion="l1", ratios=scan.ratios(0.0), round_to=1)
    assert r.model.conv1.out_channels == 2 and r.model.conv2.out_channels == 4
    with torch.no_grad():  # the scan's promise holds on the built model: no change at all
        assert torch.allclose(r.model(data[0][0]), m(data[0][0]), atol=1e-6)
    assert "conv1" in scan.table() and scan.to_dict()["top1"]["conv1"]["0.5"] == 1.0


def test_ratios_for_a_mac_budget_meet_it():
    torch.manual_seed(0)
    model = slimkit.create_model("resnet20").eval()
    x = torch.zeros(1, 3, 32, 32)
    data = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))]
    ratios, scan = sensitivity_ratios(model, x, data, criterion="l1", target_macs=0.7, batches=1, round_to=8)
    r = prune(model, x, criterion="l1", ratios=ratios, round_to=8)
    assert profile(r.model, x).macs <= 0.7 * profile(model, x).macs
    assert set(ratios) == set(scan.top1)
    with pytest.raises(SlimkitError, match="largest scanned ratios"):
        scan.ratios_for_macs(model, x, 0.01)
    with pytest.raises(SlimkitError, match="exactly one"):
        sensitivity_ratios(model, x, data, target_macs=0.5, max_drop=0.1)
    with pytest.raises(SlimkitError, match="steps"):
        sensitivity_scan(model, x, data, steps=(0.5, 1.0))
    with pytest.raises(SlimkitError, match="no batches"):
        sensitivity_scan(model, x, [])
    with pytest.raises(SlimkitError, match="max_drop"):
        scan.ratios(-0.1)


def test_cli_and_stage_prune_from_a_sensitivity_scan(tmp_path):
    out = run_cli("prune", "digits_cnn", "--data", "digits", "--limit", "200", "--criterion", "l1", "--sensitivity",
                  "--target-macs", "0.6", "--round-to", "4", "--batches", "2", "--out", str(tmp_path / "cli"),
                  "--no-bench")
    assert out["macs_after"] <= 0.6 * out["macs_before"]
    assert out["sensitivity"]["criterion"] == "l1" and out["sensitivity"]["top1"]
    with pytest.raises(SlimkitError, match="--data is needed for --sensitivity"):
        run_cli("prune", "digits_cnn", "--sensitivity", "--max-drop", "0.1", "--out", str(tmp_path / "x"),
                "--no-bench")
    with pytest.raises(SlimkitError, match="--max-drop goes with --sensitivity"):
        run_cli("prune", "digits_cnn", "--target-macs", "0.5", "--max-drop", "0.1", "--out", str(tmp_path / "x"),
                "--no-bench")

    from slimkit.pipeline import run_recipe

    stage = {"method": "prune", "criterion": "l1", "round_to": 4, "sensitivity": {"max_drop": 0.05, "batches": 2}}
    report = run_recipe({"model": "digits_cnn", "data": "digits", "progress": False, "limit": 200,
                         "stages": [stage]}, str(tmp_path / "stage"), log=lambda _: None)
    assert report["steps"][1]["metrics"]["macs"] <= report["steps"][0]["metrics"]["macs"]
    stage["sensitivity"] = {"max_dorp": 0.05}
    with pytest.raises(SlimkitError, match="max_dorp"):
        run_recipe({"model": "digits_cnn", "data": "digits", "progress": False, "limit": 200, "stages": [stage]},
                   str(tmp_path / "bad"), log=lambda _: None)
