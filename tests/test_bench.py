import json
import math
import random
import sys
import time
import types

import pytest
import torch
from torch import nn

from slimkit import SlimkitError
from slimkit.bench import (
    BenchResult,
    CompareResult,
    bench,
    build_runner,
    compare,
    count_macs,
    machine_peak,
    onnxruntime_available,
    run_bench_cli,
    stats,
)

SIZE = (3, 16, 16)
FAST = dict(warmup=2, repeats=5, min_time_s=0.0)  # few samples: these tests check the harness, not the machine


class Tiny(nn.Module):
    """A few small convs; ``blocks`` repeats the middle conv so the work scales linearly."""

    def __init__(self, blocks: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Sequential(*[nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
                                    for _ in range(blocks)])
        self.head = nn.Linear(16, 10)
        self.threads_seen: list[int] = []

    def forward(self, x):
        self.threads_seen.append(torch.get_num_threads())
        return self.head(self.body(self.stem(x)).mean((2, 3)))


# MACs of Tiny(1) on 3x16x16: stem conv, one body conv, head.
TINY_MACS = 16 * 16 * 16 * 3 * 9 + 16 * 16 * 16 * 16 * 9 + 10 * 16


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return Tiny()


def test_stats_on_a_known_list():
    s = stats([float(v) for v in range(10, 0, -1)])  # 1..10, unsorted on purpose
    assert s["median"] == pytest.approx(5.5)
    assert s["p10"] == pytest.approx(1.9)  # numpy's linear method: 1 + 0.9 * (2 - 1)
    assert s["p90"] == pytest.approx(9.1)
    assert s["mean"] == pytest.approx(5.5)
    assert s["cv"] == pytest.approx(math.sqrt(55 / 6) / 5.5)  # sample std of 1..10 is sqrt(82.5 / 9)
    assert s["n"] == 10 and s["min"] == 1 and s["max"] == 10
    assert stats([2.0])["cv"] == 0 and stats([2.0])["p90"] == 2.0
    with pytest.raises(ValueError):
        stats([])


@pytest.mark.timing
def test_bench_numbers_are_sane_and_threads_fixed_then_restored(tiny):
    tiny.train()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        r = bench(tiny, SIZE, batch_sizes=(1, 4), threads=1, modes=("eager",), **FAST)
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(before)
    assert isinstance(r, BenchResult) and r.threads == 1 and r.to_dict()["threads"] == 1
    assert tiny.threads_seen and set(tiny.threads_seen) == {1}  # every forward ran at the fixed count
    assert tiny.training  # the caller's mode is given back
    assert r.errors == {} and set(r.results["eager"]) == {1, 4}
    assert r.macs == TINY_MACS and r.macs_source in ("slimkit.profile", "conv/linear hooks")
    for bs, m in r.results["eager"].items():
        assert 0 < m["p10_ms"] <= m["median_ms"] <= m["p90_ms"]
        assert m["samples"] >= 5 and m["iters_per_sample"] >= 1
        assert m["throughput_ips"] == pytest.approx(bs / (m["median_ms"] / 1e3))
        assert m["gflops"] == pytest.approx(2 * TINY_MACS * bs / (m["median_ms"] / 1e3) / 1e9)
        assert m["peak_fraction"] == pytest.approx(m["gflops"] / r.peak.fp32_best_gflops)
        # Tiny forwards are batched into samples of ~1 ms so the clock's resolution does not matter.
        assert m["iters_per_sample"] * m["median_ms"] >= 0.3
        assert m["max_abs_diff"] == 0.0


def test_torchscript_runner_matches_eager_and_bench_checks_the_timed_module(tiny):
    tiny.eval()
    x = torch.randn(2, *SIZE)
    runner = build_runner(tiny, "torchscript", x, threads=1)
    assert isinstance(runner.timed, torch.jit.ScriptModule)
    with torch.inference_mode():
        for _ in range(3):  # the profiling executor settles on its optimised graph after a few runs
            out = runner.call()
        ref = tiny(x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)
    r = bench(tiny, SIZE, batch_sizes=(2,), threads=1, modes=("eager", "torchscript"), **FAST)
    assert r.errors == {}
    assert r.results["torchscript"][2]["max_abs_diff"] <= 1e-5
    assert not [w for w in r.warnings if "differs from eager" in w]


class Untraceable(Tiny):
    def forward(self, x):
        if torch.jit.is_tracing():
            raise RuntimeError("no tracing here")
        return super().forward(x)


def test_failing_mode_is_reported_not_raised(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed, whatever this box has
    r = bench(Untraceable(), SIZE, batch_sizes=(1, 2), threads=1, modes=("eager", "torchscript", "onnxruntime"),
              **FAST)
    assert set(r.results) == {"eager"} and set(r.results["eager"]) == {1, 2}
    assert "no tracing here" in r.errors["torchscript"]
    assert "onnxruntime is not installed" in r.errors["onnxruntime"]
    assert "failed torchscript" in r.table() and "no tracing here" in r.to_dict()["errors"]["torchscript"]


def test_bad_arguments_are_user_errors(tiny):
    for kwargs in (dict(modes=("eager", "warp")), dict(batch_sizes=(0,)), dict(threads=0)):
        with pytest.raises(SlimkitError):
            bench(tiny, SIZE, **kwargs)
    with pytest.raises(SlimkitError, match="input size"):
        bench(tiny, (3, -1, 16))


@pytest.mark.timing
def test_compare_model_against_itself_gives_ratio_near_one(tiny):
    # 31 pairs of 2 ms: enough that a neighbour preempting a few samples cannot move the median ratio.
    c = compare(tiny, tiny, SIZE, batch_sizes=(1,), threads=1, modes=("eager",), warmup=2, repeats=31,
                min_time_s=0.0, min_sample_s=2e-3)
    assert isinstance(c, CompareResult) and c.errors == {}
    entry = c.results["eager"][1]
    assert len(entry["ratio"]["samples"]) == entry["a"]["samples"] == entry["b"]["samples"] >= 31
    assert entry["a"]["iters_per_sample"] == entry["b"]["iters_per_sample"]
    assert abs(c.ratio("eager", 1) - 1) < 0.10


@pytest.mark.timing
def test_compare_detects_four_times_the_work():
    torch.manual_seed(0)
    a, b = Tiny(blocks=1), Tiny(blocks=4)
    kw = dict(batch_sizes=(1,), threads=1, modes=("eager",), warmup=2, repeats=15, min_time_s=0.0)
    c = compare(a, b, SIZE, **kw)
    assert c.macs_b > 3 * c.macs_a
    assert c.ratio("eager", 1) > 1.5
    assert c.results["eager"][1]["b"]["median_ms"] > c.results["eager"][1]["a"]["median_ms"]
    # And the other way round, so the ratio is really B/A and not a constant.
    assert compare(b, a, SIZE, **kw).ratio("eager", 1) < 0.67


def test_machine_peak_is_positive_and_cached():
    p = machine_peak(1)
    assert p.fp32_gflops > 0 and p.fp32_best_gflops >= p.fp32_gflops and p.threads == 1
    assert machine_peak(1) is p
    assert (p.int8_gops is None) == ("unavailable" in p.int8_note)
    assert p.int8_gops is None or p.int8_gops > 0


class Jittery(Tiny):
    def __init__(self):
        super().__init__()
        self.rng = random.Random(0)

    def forward(self, x):
        time.sleep(self.rng.choice([0.0005, 0.004]))
        return super().forward(x)


@pytest.mark.timing
def test_noisy_timings_are_warned_about():
    r = bench(Jittery(), SIZE, batch_sizes=(1,), threads=1, modes=("eager",), warmup=1, repeats=10, min_time_s=0.0,
              roofline=False)
    assert r.results["eager"][1]["cv"] > 0.10
    assert any("CV" in w and "eager batch 1" in w for w in r.warnings)
    assert "WARNING" in r.table() and "!" in r.table()
    assert r.peak is None and r.results["eager"][1]["peak_fraction"] is None


def test_result_dicts_are_json_ready_and_tables_aligned(tiny):
    r = bench(tiny, SIZE, batch_sizes=(1, 2), threads=1, modes=("eager",), name="tiny", **FAST)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["model"] == "tiny" and d["input_size"] == list(SIZE) and d["torch_version"] == torch.__version__
    assert d["machine"]["cpu_count"] >= 1 and "processor" in d["machine"]
    m = d["results"]["eager"]["2"]
    for key in ("median_ms", "p10_ms", "p90_ms", "cv", "throughput_ips", "gflops", "peak_fraction"):
        assert isinstance(m[key], float)
    assert "samples_ms" not in m and len(r.to_dict(include_samples=True)["results"]["eager"]["2"]["samples_ms"]) >= 5
    rows = r.table().splitlines()[1:4]
    assert rows[0].split()[:3] == ["mode", "batch", "median"] and rows[2].split()[:2] == ["eager", "2"]
    end = rows[0].index("median ms") + len("median ms")
    assert all(row[:end].endswith(row.split()[2]) and row[end] == " " for row in rows[1:])  # right-aligned column

    c = compare(tiny, tiny, SIZE, batch_sizes=(1,), threads=1, modes=("eager",), names=("x", "y"), **FAST)
    cd = json.loads(json.dumps(c.to_dict()))
    assert cd["model_a"] == "x" and set(cd["results"]["eager"]["1"]) == {"a", "b", "ratio"}
    assert cd["results"]["eager"]["1"]["ratio"]["median"] == pytest.approx(c.ratio("eager", 1))
    assert "B/A" in c.table()


def test_macs_fall_back_to_hooks_without_the_profiler(tiny, monkeypatch):
    x = torch.randn(1, *SIZE)
    monkeypatch.setitem(sys.modules, "slimkit.profile", None)
    assert count_macs(tiny, x) == (TINY_MACS, "conv/linear hooks", None)
    fake = types.ModuleType("slimkit.profile")
    fake.profile = lambda model, example: types.SimpleNamespace(macs=123)
    monkeypatch.setitem(sys.modules, "slimkit.profile", fake)
    assert count_macs(tiny, x) == (123, "slimkit.profile", None)
    fake.profile = lambda model, example: 1 / 0
    macs, source, warning = count_macs(tiny, x)
    assert (macs, source) == (TINY_MACS, "conv/linear hooks") and "ZeroDivisionError" in warning


def test_run_bench_cli_builds_models_from_specs():
    kw = dict(batch_sizes="1", modes="eager", threads=1, **FAST)
    r = run_bench_cli("digits_cnn", **kw)
    assert isinstance(r, BenchResult) and r.model == "digits_cnn" and r.input_size == (1, 8, 8)
    c = run_bench_cli("digits_cnn", vs_spec="digits_cnn", **kw)
    assert isinstance(c, CompareResult) and (c.model_a, c.model_b) == ("digits_cnn", "digits_cnn")
    with pytest.raises(SlimkitError, match="pass an input size"):
        run_bench_cli("digits_cnn", vs_spec="resnet20", **kw)
    with pytest.raises(SlimkitError, match="no mode could be measured"):
        run_bench_cli("digits_cnn", input_size="3x32x32", **kw)  # wrong channel count: eager itself fails


@pytest.mark.skipif(not onnxruntime_available(), reason="onnxruntime is optional and not installed")
def test_onnxruntime_mode_matches_eager(tiny):
    r = bench(tiny, SIZE, batch_sizes=(2,), threads=1, modes=("onnxruntime",), roofline=False, **FAST)
    assert r.errors == {} and r.results["onnxruntime"][2]["max_abs_diff"] < 1e-4
