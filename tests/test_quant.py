"""Post-training int8 quantization: observers, fusion, int8 kernels, artifacts, the accuracy guard."""

import os

import pytest
import torch
from conftest import randomize_bn
from torch import nn

import slimkit
from slimkit.profile import profile
from slimkit.quant import OBSERVERS, calibrate, convert, fake_quant, fuse, is_quantized_module, quantize, sensitivity
from slimkit.quant.core import make_qconfig, quiet

torch.set_num_threads(1)


def _obs(name, **kw):
    return OBSERVERS.get(name)(dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0, quant_max=255, **kw)


def _batches(n, shape, seed=0, bs=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bs, *shape, generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = randomize_bn(slimkit.create_model("resnet20"))
    prepared = calibrate(model, _batches(4, (3, 32, 32)), "minmax")
    return model, prepared, convert(prepared, (), model)


def test_observer_registry_names():
    assert set(OBSERVERS.names()) == {"minmax", "ema", "percentile", "entropy", "mse"}


def test_quantize_dequantize_error_bound():
    x = torch.linspace(-3.0, 5.0, 10001)
    obs = _obs("minmax")
    obs(x)
    scale, zp = obs.calculate_qparams()
    with quiet():
        dq = torch.quantize_per_tensor(x, float(scale), int(zp), torch.quint8).dequantize()
    assert (x - dq).abs().max() <= float(scale) / 2 + 1e-6
    # per-channel symmetric int8 weights (the qconfig's weight observer), each row within half its own step
    w = torch.randn(8, 27) * torch.logspace(-2, 1, 8)[:, None]
    wobs = make_qconfig().weight()
    wobs(w)
    scales, zps = wobs.calculate_qparams()
    assert torch.all(zps == 0)
    with quiet():
        dqw = torch.quantize_per_channel(w, scales, zps, 0, torch.qint8).dequantize()
    assert torch.all((w - dqw).abs() <= scales[:, None] / 2 + 1e-7)


def test_minmax_uniform_equals_bounds():
    x = torch.rand(100000) * 5 - 2
    x[0], x[1] = -2.0, 3.0
    obs = _obs("minmax")
    for chunk in x.chunk(7):
        obs(chunk)
    assert obs.clip_range() == (-2.0, 3.0)


def test_clipping_observers_ignore_outliers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1_000_000, generator=g)
    x[:2] = 1000.0
    ranges = {}
    for name in ("minmax", "percentile", "entropy", "mse"):
        obs = _obs(name)
        for chunk in x.chunk(4):
            obs(chunk)
        ranges[name] = obs.clip_range()
    assert ranges["minmax"][1] == 1000.0
    assert ranges["percentile"][1] < 10  # 99.99th percentile of |N(0,1)| is about 3.9
    assert ranges["entropy"][1] < 100
    # MSE-optimal: two outliers still pull the threshold up, but far from where minmax puts it
    assert ranges["mse"][1] < 500
    for name in ("percentile", "entropy", "mse"):
        assert ranges[name][0] < -3  # the Gaussian's own left tail is kept


def test_entropy_on_relu_output_is_not_dominated_by_zeros():
    # half the values of a ReLU output are exact zeros; KL must still keep most of the tail
    x = torch.relu(torch.randn(1_000_000, generator=torch.Generator().manual_seed(0)))
    obs = _obs("entropy")
    obs(x)
    lo, hi = obs.clip_range()
    assert lo == 0.0 and 2.5 < hi <= float(x.max())


def test_ema_follows_its_formula():
    c = 0.25
    obs = _obs("ema", averaging_constant=c)
    batches = [torch.randn(1000) * s + s for s in (1.0, 3.0, 0.5)]
    lo, hi = float(batches[0].min()), float(batches[0].max())
    for i, b in enumerate(batches):
        obs(b)
        if i:
            lo, hi = lo + c * (float(b.min()) - lo), hi + c * (float(b.max()) - hi)
    assert obs.clip_range() == pytest.approx((lo, hi), rel=1e-6)


def test_fused_conv_bn_equals_unfused():
    model = randomize_bn(slimkit.create_model("resnet20"))
    fused = fuse(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), fused(x)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * a.abs().max().item())


def test_int8_runs_quantized_kernels_with_int8_state(resnet):
    model, _, q = resnet
    layers = dict(q.model.named_modules())
    assert is_quantized_module(layers["conv1"]) and is_quantized_module(layers["linear"])
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in q.modules())  # no float conv/linear left
    assert "torch.ops.quantized.add_relu" in q.model.code  # residual adds requantize in int8
    assert "quantize_per_tensor" in q.model.code
    for name in ("conv1", "layer2.0.conv1", "layer3.2.conv2"):
        w = layers[name].weight()
        # torch stores per-channel symmetric as per-channel affine with all zero points 0
        assert w.dtype == torch.qint8 and w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
        assert torch.all(w.q_per_channel_zero_points() == 0) and w.q_per_channel_scales().numel() == w.shape[0]
    state = q.state_dict()
    assert state["model.layer1.0.conv1.weight"].dtype == torch.int8
    assert all(v.dtype != torch.float32 for k, v in state.items() if k.endswith(".weight"))
    x = torch.zeros(1, 3, 32, 32)
    pf, pq = profile(model, x), profile(q, x)
    assert pq.weight_bytes * 3.5 < pf.weight_bytes


def test_int8_matches_fake_quant_simulation(resnet):
    _, prepared, q = resnet
    ref = fake_quant(prepared)
    x = _batches(1, (3, 32, 32), seed=5, bs=32)[0]
    with torch.no_grad():
        a, b = q(x), ref(x)
    step = q.model.linear.scale
    within = ((a - b).abs() <= step * 1.0001).float().mean().item()
    assert within > 0.9, within


def test_option_a_shortcut_shares_input_qparams(resnet):
    # the padded shortcut is requantized with its input's own scale, so it adds no rounding;
    # percentile sees the padded zeros, so a separate shortcut observer would pick another scale
    model = resnet[0]
    q = quantize(model, _batches(2, (3, 32, 32)), "percentile")
    code = q.model.code
    assert "torch.nn.functional.pad" in code
    assert q.model.layer2_0_shortcut_scale_0 == q.model.layer1_2_relu2_scale_0


def test_save_load_round_trip_is_exact(resnet, tmp_path):
    _, _, q = resnet
    path = slimkit.save(q, tmp_path / "int8.safetensors")
    back = slimkit.load(path)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(q(x), back(x))
    assert is_quantized_module(dict(back.model.named_modules())["layer3.2.conv2"])
    float_path = slimkit.save(resnet[0], tmp_path / "float.safetensors")
    assert os.path.getsize(path) * 3 < os.path.getsize(float_path)


def test_keep_float_layer_stays_float_and_round_trips(tmp_path):
    model = randomize_bn(slimkit.create_model("resnet20"))
    q = quantize(model, _batches(2, (3, 32, 32)), "percentile", keep_float=["layer1.0.conv1", "linear"])
    layers = dict(q.model.named_modules())
    assert not is_quantized_module(layers["layer1.0.conv1"]) and isinstance(layers["linear"], nn.Linear)
    assert is_quantized_module(layers["layer1.0.conv2"])
    assert q.keep_float == ["layer1.0.conv1", "linear"]
    back = slimkit.load(slimkit.save(q, tmp_path / "q.safetensors"))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(q(x), back(x))
    assert back.keep_float == ["layer1.0.conv1", "linear"]
    with pytest.raises(slimkit.errors.SlimkitError, match="no layer named"):
        quantize(model, _batches(1, (3, 32, 32)), keep_float=["layer9.conv"])


def _sabotaged_digits():
    """digits_cnn whose second conv has one huge weight per filter on an always-zero input channel.

    The float function ignores those weights, but per-channel int8 scales get so coarse that
    every other weight of the layer rounds to zero: that layer must be the most sensitive.
    """
    torch.manual_seed(0)
    model = randomize_bn(slimkit.create_model("digits_cnn"))
    f = model.features
    with torch.no_grad():
        f[0].weight[0] = 0
        f[1].bias[0], f[1].running_mean[0] = -1.0, 0.0  # channel 0 of the first block is ReLU(-1) = 0
        f[3].weight[:, 0, 1, 1] = 1000.0
    x = torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    val = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]  # float top-1 is 1.0 by construction
    return model, val


def test_guard_keeps_the_sensitive_layer_in_float():
    model, val = _sabotaged_digits()
    calib = [x for x, _ in val]
    sens = sensitivity(model, calib, val)
    assert sens["float"] == 1.0 and sens["int8"] < 0.8
    assert max(sens["layers"], key=sens["layers"].get) == "features.3"
    q = quantize(model, calib, max_drop=0.1, val_loader=val)
    assert q.keep_float[0] == "features.3"
    assert q.guard["met"] and q.guard["final_top1"] >= 0.9
    assert not is_quantized_module(dict(q.model.named_modules())["features.3"])
    # a generous budget keeps everything in int8
    assert quantize(model, calib, max_drop=1.0, val_loader=val).keep_float == []


def test_recipe_stage_and_cli(tmp_path, capsys):
    import json

    from slimkit.cli import main
    from slimkit.pipeline import run_recipe

    report = run_recipe({"model": "digits_cnn", "data": "digits", "progress": False,
                         "stages": [{"method": "quantize", "calib": 64, "observer": "entropy"}]},
                        str(tmp_path / "recipe"), log=lambda m: None)
    assert report["steps"][-1]["stage"] == "quantize"
    back = slimkit.load(report["artifact"])
    assert any(is_quantized_module(m) for m in back.modules())
    capsys.readouterr()
    assert main(["quantize", "digits_cnn", "--data", "digits", "--calib", "64", "--observer", "mse", "--out",
                 str(tmp_path / "cli"), "--no-bench", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert os.path.isfile(os.path.join(tmp_path, "cli", "model.safetensors"))
    assert result["int8"]["file_bytes"] * 3 < result["float"]["file_bytes"]
    assert result["int8"]["weight_bytes"] * 3.5 < result["float"]["weight_bytes"]
    assert 0 <= result["int8"]["test_top1"] <= 1


def test_onnx_qdq_export(tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from slimkit.quant import export_onnx_qdq
    from slimkit.quant.onnx import OrtModule

    model = randomize_bn(slimkit.create_model("digits_cnn"))
    calib = _batches(2, (1, 8, 8))
    path = export_onnx_qdq(model, calib, str(tmp_path / "q.onnx"))
    graph = onnx.load(path).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    int8 = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert sum(int(torch.tensor(i.dims).prod()) for i in int8) > 0.9 * sum(
        p.numel() for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1)
    x = calib[0]
    with torch.no_grad():
        ref = model(x)
    out = OrtModule(path)(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_conversion_is_deterministic():
    model = randomize_bn(slimkit.create_model("digits_cnn"))
    calib = _batches(2, (1, 8, 8))
    a, b = quantize(model, calib, "entropy"), quantize(model, calib, "entropy")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_calibration_loader_is_class_balanced_train_without_augmentation():
    from slimkit.data import load
    from slimkit.quant import calibration_loader

    data = load("digits", seed=0)
    loader = calibration_loader(data, 100, batch_size=32)
    xs, ys = zip(*loader)
    assert torch.bincount(torch.cat(ys), minlength=10).tolist() == [10] * 10
    # exactly the stored train images, normalised, with no crop/flip applied
    assert torch.equal(torch.cat(xs), loader.normalize(loader.images.clone()))
    train = data.train.images.flatten(1)
    assert all(bool((train == img.flatten()).all(1).any()) for img in loader.images[:5])


def test_chunk_and_split_pieces_quantize_including_negative_indices():
    # FX prepare observes the tuple a chunk returns and fails; pieces become narrow() (ShuffleNet v2, Res2Net)
    from torch import nn

    from slimkit.quant import quantize

    class Pieces(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            p = self.a(x).chunk(2, dim=1)
            s = torch.split(p[-1], 2, dim=1)
            return torch.cat([p[0], self.b(torch.cat([s[-1], s[0]], 1))], 1).mean((2, 3))

    m = Pieces().eval()
    x = torch.randn(8, 3, 6, 6)
    q = quantize(m, [x], "minmax")
    assert ((q(x) - m(x)).norm() / m(x).norm()).item() < 0.05
