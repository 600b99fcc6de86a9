"""Progress of long work inside the library: int8 calibration, latency tables and export verification report
through the enclosing `reporting` block (lines off a terminal, at most one per `every` seconds)."""

from __future__ import annotations

import json
import time

import pytest
import torch

import slimkit
from slimkit.data import load
from slimkit.progress import Progress, reporting


@pytest.fixture(scope="module")
def digits():
    return load("digits", limit=300, seed=0)


def test_progress_takes_log_and_bar_from_the_reporting_block():
    lines: list[str] = []
    with reporting(lines.append, bar=False, every=0):
        p = Progress(2, "work")
        p.update()
        p.update()
        p.close()
    assert [line.split(",")[0] for line in lines] == ["work: 1/2", "work: 2/2"]
    outside = Progress(1, "quiet", bar=False)  # outside any block: no lines at all
    assert outside.log is None


def test_the_eta_of_work_with_a_deadline_is_never_past_it():
    # a time-budgeted search of 10,000 trials: the rate says hours, the budget says under a minute
    p = Progress(10_000, "trials", log=None, bar=False, deadline=time.time() + 60)
    p.t0 -= 10  # one trial took ten seconds
    p.update()
    assert 0 < p.eta() <= 60
    q = Progress(10_000, "trials", log=None, bar=False)
    q.t0 -= 10
    q.update()
    assert q.eta() > 3600 * 24


@pytest.mark.timing
def test_a_short_job_writes_no_line_and_a_long_one_ends_with_its_last_unit():
    lines: list[str] = []
    with reporting(lines.append, bar=False, every=5):
        p = Progress(3, "fast")
        for _ in range(3):
            p.update()
        assert lines == []  # done within the interval: nothing to say
        p = Progress(3, "slow", every=0.05)
        p.update()
        assert lines == []
        time.sleep(0.06)
        p.update()
        p.update()  # the last unit, reported because a line was already written
    assert [line.split(",")[0] for line in lines] == ["slow: 2/3", "slow: 3/3"]


def test_int8_calibration_reports_its_batches(digits):
    from slimkit.quant import calibration_loader, quantize

    lines: list[str] = []
    with reporting(lines.append, bar=False, every=0):
        quantize(slimkit.create_model("digits_cnn"), calibration_loader(digits, 96, 32, 0))
    calib = [line for line in lines if line.startswith("int8 calibration batches")]
    assert calib and calib[-1].startswith("int8 calibration batches: 3/3")


def test_runtime_latency_table_reports_the_layers_it_times():
    from slimkit.search.evaluate import RuntimeLatencyTable

    lines: list[str] = []
    model = slimkit.create_model("digits_cnn").eval()
    with reporting(lines.append, bar=False, every=0):
        table = RuntimeLatencyTable(model, torch.zeros(1, 1, 8, 8), "eager", (1, 4), threads=1, repeats=2)
    timed = [line for line in lines if line.startswith("latency table: layers of the original timed in eager")]
    n = len(table.reference_layers) * 2
    assert timed and timed[-1].split(",")[0].endswith(f"{n}/{n}")


def test_export_verification_reports_each_check(tmp_path, digits):
    pytest.importorskip("onnxruntime")
    from slimkit.export import export

    lines: list[str] = []
    with reporting(lines.append, bar=False, every=0):
        export(slimkit.create_model("digits_cnn"), str(tmp_path / "m.onnx"), format="onnx",
               input_size=(1, 8, 8), data=digits.loader("test", 16))
    checks = [line for line in lines if line.startswith("export verification of m.onnx")]
    assert checks[-1].split(",")[0].endswith("2/2") and "onnxruntime, data inputs" in checks[-1]


def test_json_command_keeps_stdout_one_object_while_library_work_reports(tmp_path, capsys):
    from slimkit.cli import main

    path = slimkit.save(slimkit.create_model("digits_cnn"), str(tmp_path / "m.safetensors"))
    assert main(["quantize", path, "--data", "digits", "--limit", "200", "--out", str(tmp_path / "q"),
                 "--json"]) == 0
    out = capsys.readouterr().out
    json.loads(out)  # exactly one JSON object on stdout
