import json
import time

import pytest
import torch
from torch import nn

from slimkit.cli import main
from slimkit.report import layer_latency, plot_layers, plot_tradeoff, write_report

PNG = b"\x89PNG\r\n\x1a\n"


class Slow(nn.Module):
    def forward(self, x):
        time.sleep(0.004)
        return x


@pytest.mark.timing
def test_layer_latency_finds_the_slow_layer_and_sums_repeated_calls():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), Slow(), nn.ReLU())
    times = layer_latency(model, torch.randn(1, 3, 16, 16), repeats=3, warmup=1)
    assert set(times) == {"0", "1", "2"}
    assert times["1"] >= 4.0 and times["1"] > 3 * max(times["0"], times["2"])
    assert not model[1]._forward_hooks and not model[1]._forward_pre_hooks

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.slow = Slow()

        def forward(self, x):
            return self.slow(self.slow(x))

    assert layer_latency(Twice(), torch.randn(1), repeats=2, warmup=0)["slow"] >= 8.0


def test_plots_are_png_files(tmp_path):
    entries = [{"name": "a", "top1": 0.9, "params": 1000, "macs": 5e6, "latency_ms": 1.0},
               {"name": "b", "top1": 0.8, "params": 100, "macs": 1e6, "latency_ms": 0.4}]
    for path in (plot_tradeoff(entries, str(tmp_path / "m.png")),
                 plot_tradeoff(entries, str(tmp_path / "l.png"), x="latency_ms"),
                 plot_layers([{"name": "conv", "macs": 10}, {"name": "fc", "macs": 3}], str(tmp_path / "b.png"),
                             {"conv": 1.0, "fc": 0.2})):
        assert open(path, "rb").read(8) == PNG
    report = write_report(entries, str(tmp_path / "r"))
    assert set(report["files"]) == {"accuracy_vs_macs", "accuracy_vs_latency"}
    assert json.load(open(tmp_path / "r" / "report.json"))["models"][1]["name"] == "b"


def test_report_and_profile_commands(tmp_path, capsys):
    code = main(["report", "digits_cnn", "--data", "digits", "--limit", "100", "--out", str(tmp_path), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["models"][0]["macs"] > 0 and out["models"][0]["latency_ms"] > 0
    assert (tmp_path / "accuracy_vs_latency.png").read_bytes()[:8] == PNG
    assert (tmp_path / "layers-digits_cnn.png").read_bytes()[:8] == PNG

    code = main(["profile", "resnet20", "--json", "--plot", str(tmp_path / "p.png")])
    prof = json.loads(capsys.readouterr().out)
    assert code == 0 and prof["params"] == 269_722 and prof["macs"] == 40_551_040
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG
    assert main(["profile", "resnet20", "--input-size", "3,8"]) == 2
    assert "three positive numbers" in capsys.readouterr().err


def test_bench_command_json(capsys):
    code = main(["bench", "digits_cnn", "--vs", "digits_cnn", "--batch-sizes", "1", "--threads", "1",
                 "--modes", "eager", "--repeats", "5", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["threads"] == 1
    assert 0.5 < result["results"]["eager"]["1"]["ratio"]["median"] < 2.0
