"""``slimkit compress --target``: the one-command job, its resume, its one-line failures and its HTML report.

The report is opened in a real headless browser (Debian's chromium driven by Selenium through chromedriver):
every section present, no console errors, every image of non-zero size, a non-blank screenshot, and no
network resource referenced. CI installs the browser (.ci/run) and sets SLIMKIT_REQUIRE_BROWSER=1, so the
browser tests cannot skip there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import slimkit
from slimkit.compress import SECTIONS, CompressConfig, compress, parse_target, render
from slimkit.errors import SlimkitError
from slimkit.progress import Progress

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """digits_cnn trained for a few seconds, as an artifact file, with its data."""
    from slimkit.data import load
    from slimkit.train import fit, seed_everything

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # both cores for the training; the tests after it keep the suite's one thread
    data = load("digits", seed=0)
    seed_everything(0)
    model = slimkit.create_model("digits_cnn")
    try:
        fit(model, data.loader("train", 64, seed=0), epochs=15, lr=0.05, seed=0, progress=False)
    finally:
        torch.set_num_threads(threads)
    path = slimkit.save(model.eval(), str(tmp_path_factory.mktemp("model") / "digits.safetensors"),
                        meta={"dataset": "digits", "input_size": [1, 8, 8]})
    return model.eval(), data, path


@pytest.fixture(scope="module")
def latency_job(trained, tmp_path_factory):
    """One latency job on ONNX Runtime at batch 64: the report every report test reads."""
    pytest.importorskip("onnxruntime")
    model, data, _ = trained
    out = str(tmp_path_factory.mktemp("latency"))
    cfg = CompressConfig(target="latency=0.7", runtime="onnxruntime", batch_sizes=(64,), trials=6, finetune_epochs=3,
                         max_drop=2.0)
    lines: list[str] = []
    report = compress(model, "digits", cfg, out, data=data, log=lines.append, progress=False)
    return report, out, lines


def test_parse_target():
    assert parse_target("latency=0.5") == ("latency", 0.5)
    assert parse_target("size=0.05") == ("size", 0.05)
    for bad, message in (("speed=0.5", "latency=0.5, size=0.1 or macs=0.5"), ("macs=1.5", "between 0 and 1"),
                         ("size=abc", "not a number"), ("latency", "looks like")):
        with pytest.raises(ValueError, match=message):
            parse_target(bad)


def test_progress_writes_lines_with_an_eta_off_a_terminal():
    lines: list[str] = []
    p = Progress(4, "trials", log=lines.append, bar=False, every=0)
    p.update()
    time.sleep(0.01)
    p.update(note="best 0.9")
    p.close()
    assert lines[0].startswith("trials: 1/4") and "ETA" in lines[0]
    assert lines[1].startswith("trials: 2/4") and lines[1].endswith("(best 0.9)")


@pytest.mark.timing
def test_latency_target_is_met_and_all_four_outputs_are_written(latency_job, trained):
    report, out, lines = latency_job
    v = report["verdict"]
    assert v["met"] and v["kind"] == "latency" and v["reached"] <= 0.7
    # the measured ratio is the one the verdict cites, interleaved against the original in the target runtime
    cell = report["cards"]["after"]["latency"]["onnxruntime"]["64"]
    assert cell["ratio"] == pytest.approx(v["reached"]) and cell["final_ms"] < cell["original_ms"]
    for name in ("model.safetensors", "model.onnx", "report.json", "report.html"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert json.load(open(os.path.join(out, "report.json")))["verdict"] == v
    # the plan is printed before any work starts and recorded
    assert lines[0].startswith("plan for latency=0.7") and report["plan"]["steps"][0] == "search"
    # the artifact's accuracy is the card's, and its provenance holds the search policy and the fine-tune
    art = slimkit.load(os.path.join(out, "model.safetensors"))
    from slimkit.train import evaluate

    data = trained[1]
    assert evaluate(art, data.loader("test", 256))["top1"] == pytest.approx(report["cards"]["after"]["test_top1"])
    stages = [r["stage"] for r in art.slimkit_history]
    assert "search" in stages and "finetune" in stages
    exported = json.load(open(os.path.join(out, "model.onnx.json")))
    assert all(c["passed"] for c in exported["checks"])


@pytest.mark.timing
def test_rerun_of_a_finished_job_only_rewrites_the_report(latency_job, trained):
    model, data, _ = trained
    report, out, _ = latency_job
    state = json.load(open(os.path.join(out, "compress.json")))
    lines: list[str] = []
    again = compress(model, "digits", CompressConfig.from_dict(state["config"]), out, data=data, log=lines.append,
                     progress=False)
    assert again["cards"] == report["cards"]
    assert not any(line.startswith("compress: search") for line in lines)


@pytest.mark.timing
def test_a_job_of_another_model_in_the_same_folder_is_refused(latency_job):
    _, out, _ = latency_job
    from slimkit.data import load

    other = slimkit.create_model("digits_cnn").eval()
    cfg = CompressConfig.from_dict(json.load(open(os.path.join(out, "compress.json")))["config"])
    with pytest.raises(SlimkitError, match="holds a job of another model"):
        compress(other, "digits", cfg, out, data=load("digits", seed=0), log=quiet, progress=False)


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "slimkit.cli", "compress", *args], capture_output=True, text=True,
                          timeout=timeout)


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn" not in ln]


def test_an_impossible_target_is_one_line_and_still_leaves_the_best_model_and_the_report(trained, tmp_path):
    _, _, path = trained
    out = tmp_path / "out"
    r = _cli(path, "--data", "digits", "--target", "size=0.001", "--finetune-epochs", "2", "--out", str(out),
             "--json")
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("slimkit: error: compress: target size=0.001 not met") and "reached" in last
    assert "x the original's bytes on disk" in last and str(out / "model.safetensors") in last
    report = json.load(open(out / "report.json"))
    assert not report["verdict"]["met"] and report["verdict"]["reached"] > 0.001
    assert any("out of reach" in w for w in report["warnings"])
    assert os.path.getsize(out / "model.slimpack") < 0.1 * report["cards"]["before"]["bytes"]
    assert (out / "report.html").exists() and slimkit.load(str(out / "model.safetensors")) is not None
    # the packed file is the model, bit for bit
    a, b = slimkit.load(str(out / "model.slimpack")), slimkit.load(str(out / "model.safetensors"))
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(a(x), b(x))


def test_a_searched_model_that_misses_the_target_as_delivered_is_searched_again_tighter(trained, tmp_path,
                                                                                       monkeypatch):
    """The plan believes int8 gains 3.3x (it measures about 1.5x here): the first search aims too loosely, the
    searched model, timed as it would be delivered (int8), misses; the second search is tightened by the measured
    shortfall and warm-started from the first's front, and the round that delivers best goes on to the fine-tune."""
    pytest.importorskip("onnxruntime")
    import slimkit.compress.plan as plan

    monkeypatch.setattr(plan, "int8_ratios", lambda *a, **k: {64: 0.3})
    model, data, _ = trained
    cfg = CompressConfig(target="latency=0.42", runtime="onnxruntime", batch_sizes=(64,), trials=6,
                         finetune_epochs=1, max_drop=100)
    lines: list[str] = []
    report = compress(model, "digits", cfg, str(tmp_path), data=data, log=lines.append, progress=False, check=False)
    assert report["plan"]["search_fraction"] == pytest.approx(0.95)
    rounds = json.load(open(tmp_path / "compress.json"))["steps"]["search"]["rounds"]
    assert [r["folder"] for r in rounds] == ["search", "search-2"], "\n".join(lines[-30:])
    first, second = rounds
    assert first["delivered_as"] == "int8" and first["delivered"] == first["int8_ratio"] > 0.98 * 0.42
    assert second["fraction"] == pytest.approx(first["fraction"] * 0.95 * 0.42 / first["delivered"])
    assert first["trials"] == 6 and second["trials"] <= 2  # given trials, the second search gets 30% of them
    assert any(line.startswith("the searched model delivers") for line in lines)
    assert any(line.startswith("warm start results.json:") for line in lines)  # the first search's front
    assert "(from the study's table)" in "\n".join(lines)  # the latency table is not measured again
    # the model the fine-tune continued is the kept round's
    # the best proxy of those within 0.98 of the target, else of those within it, else the faster
    met = ([r for r in rounds if r["delivered"] <= 0.98 * 0.42] or [r for r in rounds if r["delivered"] <= 0.42])
    kept = max(met, key=lambda r: r["proxy"]) if met else min(rounds, key=lambda r: r["delivered"])
    a = slimkit.load(str(tmp_path / "steps" / "search.safetensors")).state_dict()
    b = slimkit.load(str(tmp_path / kept["folder"] / "model.safetensors")).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("args, message", [
    (["--target", "speed=0.5"], "--target a target looks like latency=0.5"),
    (["--target", "latency=2"], "between 0 and 1"),
    (["--target", "macs=0.5", "--time-budget", "2x"], "--time-budget"),
    (["--target", "macs=0.5", "--runtime", "tensorrt"], "--runtime must be one of"),
    (["--target", "macs=0.5", "--recipe", "r.yaml"], "not both"),
])
def test_cli_bad_input_is_one_line_and_status_2(trained, tmp_path, args, message):
    _, _, path = trained
    r = _cli(path, "--data", "digits", "--out", str(tmp_path / "o"), *args)
    assert r.returncode == 2, r.stderr
    lines = _error_lines(r.stderr)
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_a_macs_target_pilots_pruned_and_decomposed_and_continues_the_better_on_validation(trained, tmp_path):
    model, data, _ = trained
    out = str(tmp_path / "macs")
    cfg = CompressConfig(target="macs=0.5", runtime="eager", batch_sizes=(8,), trials=4, finetune_epochs=2,
                         max_drop=100)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = compress(model, "digits", cfg, out, data=data, log=quiet, progress=False)
    # the caller's model is left untouched: same weights, still trainable (the job's KD teacher is a copy)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    plan = report["plan"]
    assert plan["steps"][:4] == ["search", "decompose", "choose", "finetune"] and "decomposition" in plan["families"]
    state = json.load(open(os.path.join(out, "compress.json")))["steps"]
    rows = state["choose"]["candidates"]
    assert set(rows) == {"search", "decompose"} and all(r["pilot_epochs"] == 1 for r in rows.values())
    best = max(rows, key=lambda n: (rows[n]["val_top1"], -rows[n]["macs_ratio"]))
    assert state["choose"]["chosen"] == best
    # each candidate is timed in the job's runtime; the report warns when the kept one is the slower
    lat = {n: r["latency_ratio"] for n, r in rows.items()}
    assert all(v > 0 for v in lat.values())
    other = next(n for n in rows if n != best)
    assert any("a MACs target counts MACs" in w for w in report["warnings"]) == (lat[best] > 1.05 * lat[other])
    assert state["finetune"]["epochs"] == 1  # the pilot epoch counts towards the two planned
    assert report["cards"]["after"]["macs"] <= 0.5 * report["cards"]["before"]["macs"]
    final = slimkit.load(os.path.join(out, "model.safetensors"))
    decomposed = [r["name"] for r in report["layers"] if "rank" in r]
    sequences = [n for n, m in final.named_modules() if isinstance(m, torch.nn.Sequential)
                 and n in state["decompose"]["chosen"]["ranks"]]
    if best == "decompose":
        assert decomposed and sorted(decomposed) == sorted(sequences)
        row = next(r for r in report["layers"] if "rank" in r)
        assert row["channels_after"] == row["channels_before"] and 0 < row["macs_after"] < row["macs_before"]
    else:
        assert not decomposed and not sequences
    # a crafted state naming another candidate is ignored: the step only loads the two it knows
    path = os.path.join(out, "compress.json")
    raw = json.load(open(path))
    raw["steps"]["choose"] = {"candidates": {"../../elsewhere": {"val_top1": 2.0, "macs_ratio": 0.1}}}
    for name in ("finetune", "quantize", "export", "measure"):
        raw["steps"].pop(name)
    json.dump(raw, open(path, "w"))
    again = compress(model, "digits", cfg, out, data=data, log=quiet, progress=False)
    assert json.load(open(path))["steps"]["choose"]["chosen"] == best
    assert again["cards"]["after"]["macs"] == report["cards"]["after"]["macs"]


def _checkpoint_written(out: str) -> bool:
    folder = os.path.join(out, "steps", "finetune")
    return os.path.isdir(folder) and any(f.endswith(".pt") or "checkpoint" in f
                                         for _, _, files in os.walk(folder) for f in files)


def test_a_killed_job_resumes_and_finishes_with_the_same_result(trained, tmp_path):
    _, _, path = trained
    args = [path, "--data", "digits", "--target", "macs=0.6", "--runtime", "eager", "--batch-sizes", "8",
            "--trials", "5", "--finetune-epochs", "25", "--max-drop", "100", "--json"]
    whole = _cli(*args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-m", "slimkit.cli", "compress", *args, "--out", out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not _checkpoint_written(out):
        time.sleep(0.05)
    assert proc.poll() is None, "the job ended before its fine-tune could be killed"
    time.sleep(0.3)  # an epoch or so more
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.load(open(os.path.join(out, "compress.json")))
    assert state["steps"]["search"]["done"] and "finetune" not in state["steps"]
    again = _cli(*args, "--out", out)
    assert again.returncode == 0, again.stderr[-2000:]
    a = json.load(open(tmp_path / "whole" / "report.json"))
    b = json.load(open(os.path.join(out, "report.json")))
    for key in ("test_top1", "test_top5", "params", "macs", "bytes"):
        assert a["cards"]["after"][key] == b["cards"]["after"][key], key
    sa, sb = (json.load(open(os.path.join(d, "compress.json")))["steps"]["search"]["chosen"]["policy"]
              for d in (tmp_path / "whole", out))
    assert sa == sb


@pytest.mark.timing
def test_report_html_is_self_contained(latency_job):
    _, out, _ = latency_job
    text = open(os.path.join(out, "report.html")).read()
    assert not network_references(text)
    for section in SECTIONS:
        assert f"id='{section}'" in text
    assert text.count("data:image/png;base64,") >= 3


def network_references(text: str) -> list[str]:
    """Every attribute or CSS url() that would make the browser fetch something over a network."""
    refs = re.findall(r"""(?:src|href|action|poster|data)\s*=\s*["']?\s*((?:https?:)?//[^"' >]+)""", text, re.I)
    refs += re.findall(r"""url\(\s*["']?((?:https?:)?//[^)"']+)""", text, re.I)
    refs += re.findall(r"@import\s+[\"']?((?:https?:)?//[^\"';]+)", text, re.I)
    return refs


def test_the_network_check_catches_a_cdn_reference():
    page = render({"title": "t"}).replace("</head>", "<script src='https://cdn.example.com/x.js'></script></head>")
    assert network_references(page) == ["https://cdn.example.com/x.js"]


def _browser():
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("SLIMKIT_REQUIRE_BROWSER"):
            pytest.fail("SLIMKIT_REQUIRE_BROWSER is set but chromium/chromedriver are not installed")
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        if os.environ.get("SLIMKIT_REQUIRE_BROWSER"):
            raise
        pytest.skip("selenium is not installed (pip install 'slimkit[test]')")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1600"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def open_page(path: str) -> dict:
    """Open ``path`` in headless chromium: section ids, image sizes, console errors, a screenshot (PNG bytes)."""
    driver = _browser()
    try:
        driver.get("file://" + os.path.abspath(path))
        facts = {"sections": driver.execute_script("return Array.from(document.querySelectorAll('section'))"
                                                   ".map(s => [s.id, s.getBoundingClientRect().height])"),
                 "images": driver.execute_script("return Array.from(document.images).map(i => "
                                                 "[i.alt, i.naturalWidth, i.naturalHeight, i.getBoundingClientRect()"
                                                 ".width])"),
                 "errors": [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"],
                 "screenshot": driver.get_screenshot_as_png()}
    finally:
        driver.quit()
    return facts


def _non_blank(png: bytes) -> float:
    """The share of pixels that differ from the most common one (0 for a blank page)."""
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("L")
    hist = img.histogram()
    return 1 - max(hist) / sum(hist)


@pytest.mark.timing
def test_report_in_a_real_browser(latency_job, tmp_path):
    _, out, _ = latency_job
    facts = open_page(os.path.join(out, "report.html"))
    ids = [s[0] for s in facts["sections"]]
    assert all(s in ids for s in SECTIONS), ids
    assert all(h > 0 for _, h in facts["sections"])
    assert not facts["errors"], facts["errors"]
    assert len(facts["images"]) >= 3
    assert all(w > 0 and h > 0 and shown > 0 for _, w, h, shown in facts["images"]), facts["images"]
    (tmp_path / "shot.png").write_bytes(facts["screenshot"])
    assert _non_blank(facts["screenshot"]) > 0.02


def test_the_browser_check_sees_console_errors_and_broken_images(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text(render({"title": "t"}).replace(
        "</body>", "<img alt='broken' src='data:image/png;base64,AAAA'><script>console.error('boom')</script></body>"))
    facts = open_page(str(page))
    assert any("boom" in e["message"] for e in facts["errors"])
    assert any(alt == "broken" and w == 0 for alt, w, _, _ in facts["images"])


def test_report_html_for_any_artifact(trained, tmp_path):
    model, data, path = trained
    from slimkit.prune import prune

    pruned = prune(model, torch.zeros(1, 1, 8, 8), target_macs=0.5).model
    small = slimkit.save(pruned, str(tmp_path / "pruned.safetensors"), meta={"input_size": [1, 8, 8]})
    html = tmp_path / "r.html"
    r = subprocess.run([sys.executable, "-m", "slimkit.cli", "report", path, small, "--data", "digits", "--limit",
                        "100", "--html", str(html), "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["html"] == str(html)
    text = html.read_text()
    assert not network_references(text) and text.count("data:image/png;base64,") >= 3
    assert "pruned" in text and "<td>MACs</td>" in text
