import json
import os

import pytest

import slimkit
from slimkit.demo import run_demo


@pytest.mark.timing
def test_demo_trains_compresses_and_names_the_report(tmp_path):
    lines = []
    report = run_demo(str(tmp_path), epochs=8, time_budget="20s", log=lines.append, progress=False)
    before, after = report["cards"]["before"], report["cards"]["after"]
    assert before["test_top1"] > 0.9
    assert after["macs"] < before["macs"] and after["bytes"] < before["bytes"]
    assert after["test_top1"] > before["test_top1"] - 0.05
    html = report["files"]["report_html"]
    assert lines[-1].strip() == f"report: {html}" and os.path.getsize(html) > 10_000
    assert json.load(open(tmp_path / "compressed" / "report.json"))["verdict"] == report["verdict"]
    loaded = slimkit.load(report["files"]["artifact"])
    assert [s["stage"] for s in loaded.slimkit_history][:2] == ["train", "search"]
