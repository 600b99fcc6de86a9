"""Export: every kind of artifact to every installed runtime, verified; int8 stays integer; bad input is one line."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, run_cli
from torch import nn

import slimkit
from slimkit import SlimkitError
from slimkit.artifact import register_module
from slimkit.export import ExportConfig, export, open_exported, verify
from slimkit.testing import randomize_bn

HAVE_ORT = importlib.util.find_spec("onnxruntime") is not None
HAVE_OV = importlib.util.find_spec("openvino") is not None
pytestmark = pytest.mark.skipif(not HAVE_ORT, reason="the onnx extra (onnx, onnxruntime) is not installed")

# (format, file suffix, runtimes that verify it)
TARGETS = [("onnx", ".onnx", ("onnxruntime",) + (("openvino",) if HAVE_OV else ())),
           ("torchscript", ".pt", ("torchscript",))] + ([("openvino", ".xml", ("openvino",))] if HAVE_OV else [])


@register_module  # so its artifact rebuilds it (a user's own module type registers the same way)
class Mixed(nn.Module):
    """Concat, a depthwise conv, an SE gate and flatten -> linear: the constructs exporters trip on."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(1, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 4, 1), nn.ReLU(), nn.Conv2d(4, 16, 1),
                                nn.Sigmoid())
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        h = self.dw(torch.cat([self.a(x), self.b(x)], 1))
        h = self.pool(h * self.se(h))
        return self.fc(torch.flatten(h, 1))


def _digits_batches(n=2, bs=16):
    from slimkit.data import load

    data = load("digits", limit=80, seed=0)
    return data, [b for _, b in zip(range(n), data.loader("test", bs))]


def _kinds():
    """(label, model) for every kind of artifact the project makes, on the digits data's 1x8x8 input."""
    from slimkit.prune import prune, prune_blocks
    from slimkit.quant import QuantConfig, quantize
    from slimkit.transform import apply_transform

    torch.manual_seed(0)
    data, batches = _digits_batches()
    kinds = [("digits_cnn", randomize_bn(slimkit.create_model("digits_cnn")))]
    kinds.append(("mixed concat/depthwise/SE/flatten", randomize_bn(Mixed())))
    res = randomize_bn(slimkit.create_model("digits_resnet"))
    kinds.append(("channel-pruned, gather shortcuts", prune(res, torch.zeros(1, 1, 8, 8), ratio=0.4, round_to=4).model))
    kinds.append(("depth-pruned", prune_blocks(res, torch.zeros(1, 1, 8, 8), batches, count=2, batches=1).model))
    t = randomize_bn(slimkit.create_model("digits_resnet"))
    kinds.append(("transformed", apply_transform(t, "depthwise_separable", example_input=torch.zeros(1, 1, 8, 8))))
    calib = [b[0] for b in batches]
    kinds.append(("int8", quantize(res, calib, QuantConfig(observer="minmax"))))
    return kinds


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Each kind saved and loaded back, so what is exported is what a user's file holds."""
    folder = tmp_path_factory.mktemp("kinds")
    out = []
    for i, (label, model) in enumerate(_kinds()):
        path = slimkit.save(model.eval(), folder / f"{i}.safetensors", meta={"input_size": [1, 8, 8]})
        out.append((label, slimkit.load(path)))
    return out


@pytest.mark.parametrize("fmt,suffix,runtimes", TARGETS, ids=[t[0] for t in TARGETS])
def test_every_artifact_kind_exports_and_verifies(artifacts, tmp_path, fmt, suffix, runtimes):
    data, batches = _digits_batches(4, 32)
    for i, (label, model) in enumerate(artifacts):
        path = str(tmp_path / f"m{i}{suffix}")
        r = export(model, path, ExportConfig(format=fmt, runtimes=runtimes), data=batches)
        assert r.passed, f"{label}: {[c.to_dict() for c in r.checks]}"
        assert {c.runtime for c in r.checks} == set(runtimes) and {c.inputs for c in r.checks} == {"random", "data"}
        assert r.int8 == (label == "int8")
        record = json.load(open(path + ".json"))
        assert record["versions"]["torch"] == torch.__version__ and all(rt in record["versions"] for rt in runtimes)
        assert record["format"] == fmt and (fmt == "torchscript" or record["opset"] == 17)
        for c in r.checks:
            limit = 1e-3 * max(1.0, c.output_scale)
            assert c.max_abs_diff <= limit or (r.int8 and c.rel_l2 <= 0.05), f"{label} {c.runtime}"
        if r.int8:
            assert all(not nodes for nodes in r.float_nodes.values()), f"{label}: {r.float_nodes}"


def test_dynamic_batch_axis(artifacts, tmp_path):
    model = artifacts[2][1]  # pruned, gather shortcuts
    path = str(tmp_path / "m.onnx")
    export(model, path)
    session = open_exported(path)
    for bs in (1, 7, 64):
        x = torch.randn(bs, 1, 8, 8)
        with torch.no_grad():
            assert np.allclose(session.run(x.numpy()), model(x).numpy(), atol=1e-4)


def _int8_graph_ops(path: str) -> dict:
    import onnx
    import onnxruntime as ort

    from slimkit.export.runtime import ort_options

    out = path + ".opt.onnx"
    ort.InferenceSession(path, ort_options(1, out), providers=["CPUExecutionProvider"])
    ops: dict = {}
    for n in onnx.load(out).graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops


def test_int8_runs_integer_kernels_and_float_layers_are_reported(tmp_path):
    from slimkit.quant import QuantConfig, quantize

    data, batches = _digits_batches()
    model = randomize_bn(slimkit.create_model("digits_cnn"))
    calib = [b[0] for b in batches]
    q = quantize(model, calib, QuantConfig())
    path = str(tmp_path / "q.onnx")
    r = export(q, path, runtimes=("onnxruntime",) + (("openvino",) if HAVE_OV else ()))
    ops = _int8_graph_ops(path)
    assert ops.get("QLinearConv") == 3 and ops.get("QGemm", 0) + ops.get("QLinearMatMul", 0) == 1, ops
    assert not ops.get("Conv") and r.float_nodes["onnxruntime"] == []
    if HAVE_OV:
        assert r.float_nodes["openvino"] == []
    # a layer kept in float (the accuracy guard's way out) is listed by every runtime
    partial = quantize(model, calib, QuantConfig(keep_float=("classifier",)))
    r = export(partial, str(tmp_path / "partial.onnx"), runtimes=("onnxruntime",) + (("openvino",) if HAVE_OV else ()))
    assert len(r.float_nodes["onnxruntime"]) == 1 and _int8_graph_ops(str(tmp_path / "partial.onnx"))["Gemm"] == 1
    if HAVE_OV:
        assert len(r.float_nodes["openvino"]) == 1
    # signed activations (ORT's S8S8 QDQ) compute the same values
    s8 = export(q, str(tmp_path / "s8.onnx"), activations="s8")
    u8 = open_exported(path).run(batches[0][0].numpy())
    assert s8.facts["zero_points_rewritten"] > 0
    np.testing.assert_allclose(open_exported(str(tmp_path / "s8.onnx")).run(batches[0][0].numpy()), u8, atol=1e-5)


def test_a_broken_export_is_caught_and_the_layer_named(tmp_path, monkeypatch):
    import onnx
    from onnx import numpy_helper

    from slimkit.export import formats

    model = randomize_bn(slimkit.create_model("digits_resnet"))
    real = formats._torch_onnx_export

    def broken(module, example, path, opset, dynamic_batch):  # an exporter bug: one conv's weights flipped
        real(module, example, path, opset, dynamic_batch)
        g = onnx.load(path)
        conv = [n for n in g.graph.node if n.op_type == "Conv"][5]
        w = next(t for t in g.graph.initializer if t.name == conv.input[1])
        w.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(w), w.name))
        onnx.save(g, path)

    monkeypatch.setattr(formats, "_torch_onnx_export", broken)
    path = tmp_path / "bad.onnx"
    with pytest.raises(SlimkitError, match=r"first diverging layer: layer2\.0\.conv1 \(Conv2d"):
        export(model, str(path))
    assert not path.exists() and not (tmp_path / "bad.onnx.json").exists()
    assert os.listdir(tmp_path) == []


class KthPool(nn.Module):
    def forward(self, x):
        return torch.kthvalue(x, 2, dim=1)[0]


class NoExport(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.odd = KthPool()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.odd(self.conv(x)), 1))


def test_bad_input_is_one_line(tmp_path, monkeypatch):
    model = slimkit.create_model("digits_cnn")
    with pytest.raises(SlimkitError, match=r"no export for aten::kthvalue \(layer odd\)"):
        export(NoExport(), str(tmp_path / "k.onnx"), input_size=(1, 8, 8))
    with pytest.raises(SlimkitError, match="unknown export format 'tflite'"):
        export(model, str(tmp_path / "m.tflite"), format="tflite")
    with pytest.raises(SlimkitError, match=r"a onnx file ends in \.onnx"):
        export(model, str(tmp_path / "m.xml"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SlimkitError, match="cannot write"):
        export(model, str(blocker / "m.onnx"))
    real_find = importlib.util.find_spec

    def without_openvino(name, *a):
        return None if name == "openvino" else real_find(name, *a)

    monkeypatch.setattr(importlib.util, "find_spec", without_openvino)
    with pytest.raises(SlimkitError, match=r"openvino is not installed: pip install 'slimkit\[openvino\]'"):
        export(model, str(tmp_path / "m.xml"), format="openvino")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_cli_export_and_its_errors(tmp_path):
    art = slimkit.save(slimkit.create_model("digits_cnn").eval(), tmp_path / "a.safetensors",
                       meta={"input_size": [1, 8, 8]})
    out = run_cli("export", str(art), "--format", "onnx", "--out", str(tmp_path / "a.onnx"), "--data", "digits",
                  "--limit", "40")
    assert out["passed"] and [c["inputs"] for c in out["checks"]] == ["random", "data"]
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(SlimkitError, match="junk.safetensors: not a safetensors file"):
        run_cli("export", str(tmp_path / "junk.safetensors"), "--format", "onnx", "--out", str(tmp_path / "j.onnx"))
    with pytest.raises(SlimkitError, match="unknown export format 'onx'"):
        run_cli("export", str(art), "--format", "onx", "--out", str(tmp_path / "a.onnx"))


def test_bench_runs_every_installed_runtime():
    from slimkit.bench import bench

    model = slimkit.create_model("digits_cnn")
    runtimes = ("eager", "torchscript", "onnxruntime") + (("openvino",) if HAVE_OV else ())
    r = bench(model, (1, 8, 8), batch_sizes=(1,), threads=1, modes=runtimes, repeats=3, min_time_s=0.05,
              roofline=False)
    assert r.errors == {} and set(r.results) == set(runtimes)
    assert all(r.results[m][1]["max_abs_diff"] < 1e-3 for m in runtimes)


def test_runtimes_are_imported_only_when_used(tmp_path):
    art = slimkit.save(slimkit.create_model("digits_cnn"), tmp_path / "a.safetensors")
    code = ("import sys, slimkit; slimkit.load(sys.argv[1]); import slimkit.export, slimkit.cli; "
            "slimkit.cli.build_parser(); print(sorted(m for m in ('onnx', 'onnxruntime', 'openvino', 'torchao') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, str(art)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr + r.stdout


def test_verify_names_divergence_on_a_corrupted_file(tmp_path):
    import onnx
    from onnx import numpy_helper

    model = randomize_bn(slimkit.create_model("digits_cnn"))
    path = str(tmp_path / "m.onnx")
    export(model, path)
    g = onnx.load(path)
    last = [n for n in g.graph.node if n.op_type == "Gemm"][0]
    b = next(t for t in g.graph.initializer if t.name == last.input[2])
    b.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(b) + 5.0, b.name))
    onnx.save(g, path)
    x = [torch.randn(4, 1, 8, 8).numpy()]
    check = verify(model, open_exported(path), x, int8=False, onnx_path=path)
    assert not check.passed and check.first_divergence.startswith("classifier (Linear")


def test_recipe_times_each_stage_per_runtime_and_records_the_target(tmp_path):
    from slimkit.pipeline import run_recipe

    recipe = {"model": "digits_cnn", "data": "digits", "limit": 40, "progress": False, "runtime": "onnxruntime",
              "bench": {"runtimes": ["eager", "onnxruntime"], "batch_sizes": [1, 8], "repeats": 3},
              "stages": [{"method": "prune", "target_macs": 0.6, "round_to": 4}]}
    report = run_recipe(recipe, str(tmp_path), log=lambda _: None)
    for step in report["steps"]:
        assert set(step["metrics"]["latency_ms"]) == {"eager", "onnxruntime"}
        assert all(set(v) == {"1", "8"} and min(v.values()) > 0 for v in step["metrics"]["latency_ms"].values())
    assert slimkit.load(report["artifact"]).slimkit_meta["runtime"] == "onnxruntime"
    with pytest.raises(SlimkitError, match="bench: runtimes: must be one of"):
        run_recipe({**recipe, "bench": {"runtimes": ["tensorrt"]}}, str(tmp_path / "x"), log=lambda _: None)
    with pytest.raises(SlimkitError, match="field runtime"):
        run_recipe({**recipe, "runtime": "tensorrt"}, str(tmp_path / "y"), log=lambda _: None)
