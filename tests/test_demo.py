import json
import os

import slimkit
from slimkit.demo import run_demo


def test_demo_trains_compresses_and_reports(tmp_path):
    lines = []
    result = run_demo(str(tmp_path), epochs=8, log=lines.append, progress=False)
    before, after = result["before"], result["after"]
    assert before["test_top1"] > 0.9
    assert after["macs"] <= 0.5 * before["macs"] and after["params"] < before["params"]
    assert after["size_bytes"] * 4 < before["size_bytes"]  # half the weights, then int8
    assert after["test_top1"] > before["test_top1"] - 0.1
    assert after["speedup_bs1"] > 0 and after["latency_bs256_ms"] > 0
    assert json.load(open(tmp_path / "demo.json"))["artifact"] == result["artifact"]
    loaded = slimkit.load(result["artifact"])
    assert [s["stage"] for s in loaded.slimkit_history] == ["train", "prune", "quantize"]
    assert os.path.getsize(result["artifact"]) == after["size_bytes"]
    assert any("before" in line and "after" in line for line in lines)
