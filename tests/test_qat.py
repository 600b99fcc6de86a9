"""Quantization-aware training: LSQ fake quantization (STE), BN freezing, int8 conversion, artifacts, wiring."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn
from torch import nn
from torch.ao.nn.intrinsic.qat import ConvBnReLU2d
from torch.ao.quantization.observer import MinMaxObserver

import slimkit
from slimkit.errors import SlimkitError
from slimkit.quant import (
    LSQFakeQuantize,
    QATSchedule,
    calibration_loader,
    convert_qat,
    is_quantized_module,
    prepare_qat,
    qat,
    quantize,
)
from slimkit.quant.core import quiet
from slimkit.quant.qat import lsq_quantizers
from slimkit.train import evaluate, fit

torch.set_num_threads(1)


def _batches(n, seed=0, bs=16):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 1, 8, 8, generator=g), torch.randint(0, 10, (bs,), generator=g)) for _ in range(n)]


def _tiny():
    torch.manual_seed(0)
    return randomize_bn(slimkit.create_model("digits_cnn"))


@pytest.fixture(scope="module")
def digits():
    """The digits data and a digits_cnn trained in float for a few epochs (about 4 s on one thread)."""
    from slimkit.data import load

    data = load("digits", seed=0)
    torch.manual_seed(0)
    model = slimkit.create_model("digits_cnn")
    fit(model, data.loader("train", 64), epochs=4, lr=0.05, progress=False)
    return data, model.eval(), calibration_loader(data, 256)


def _act_quantizer():
    return LSQFakeQuantize(observer=MinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8,
                           qscheme=torch.per_tensor_affine)


def test_ste_gradient_is_one_inside_the_range_and_zero_where_clipped():
    fq = _act_quantizer()
    fq.disable_fake_quant()
    fq(torch.linspace(-1.0, 1.0, 101))  # calibration: the observer sets the step from [-1, 1]
    fq.disable_observer()
    fq.enable_fake_quant()
    scale, zp = fq.calculate_qparams()
    assert float(scale) == pytest.approx(2.0 / 255, rel=1e-5)
    x = torch.linspace(-2.0, 2.0, 401, requires_grad=True)
    y = fq(x)
    # forward is torch's quantize-dequantize with the same parameters
    with quiet():
        ref = torch.quantize_per_tensor(x.detach(), float(scale), int(zp), torch.quint8).dequantize()
    assert torch.allclose(y, ref, atol=1e-6)
    y.sum().backward()
    inside = (x.detach() >= -1.0 + 1e-4) & (x.detach() <= 1.0 - 1e-4)
    outside = (x.detach() < -1.01) | (x.detach() > 1.01)
    assert torch.all(x.grad[inside] == 1) and torch.all(x.grad[outside] == 0)
    # LSQ: the step size gets a gradient, scaled by g = 1/sqrt(N * Qp) (one sample of N = 401 values)
    assert fq.scale.grad is not None and fq.scale.grad.abs().item() > 0
    assert fq.grad_factor(x.detach()) == pytest.approx(1 / math.sqrt(401 * 255))
    assert fq.grad_factor(torch.zeros(8, 3, 4, 4)) == pytest.approx(1 / math.sqrt(48 * 255))  # per sample


def test_gradients_reach_float_weights_and_step_sizes_which_learn():
    model = _tiny()
    prepared = prepare_qat(model, [x for x, _ in _batches(2)])
    quantizers = lsq_quantizers(prepared)
    assert len(quantizers) >= 8 and all(isinstance(q.scale, nn.Parameter) for q in quantizers)
    params = {id(p) for p in prepared.parameters()}
    assert all(id(q.scale) in params for q in quantizers)  # so fit()'s optimizer trains them
    weight_fq = prepared.get_submodule("features.0").weight_fake_quant
    assert weight_fq.scale.numel() == 32 and weight_fq.qscheme == torch.per_channel_symmetric
    assert weight_fq.grad_factor(prepared.get_submodule("features.0").weight) == pytest.approx(1 / math.sqrt(9 * 127))
    x, y = _batches(1, seed=3, bs=32)[0]
    F.cross_entropy(prepared(x), y).backward()
    for name in ("features.0", "features.3", "classifier"):
        w = prepared.get_submodule(name).weight
        assert w.grad is not None and w.grad.abs().sum() > 0  # STE: through the weight fake quantizer
    for q in quantizers:
        assert q.scale.grad is not None and torch.isfinite(q.scale.grad).all() and q.scale.grad.abs().sum() > 0
    before = [q.scale.detach().clone() for q in quantizers]
    torch.optim.SGD(prepared.parameters(), lr=0.01).step()
    assert all(not torch.equal(b, q.scale) for b, q in zip(before, quantizers, strict=True))


def test_bn_statistics_freeze_after_the_freeze_epoch():
    prepared = prepare_qat(_tiny(), [x for x, _ in _batches(2)])
    convbn = [m for m in prepared.modules() if isinstance(m, ConvBnReLU2d)]
    assert len(convbn) == 3  # every conv-BN-ReLU became a QAT ConvBn
    bn = convbn[0].bn
    step = prepared.get_submodule("features.0").weight_fake_quant.scale
    snaps = [(bn.running_mean.clone(), bn.running_var.clone(), step.detach().clone())]
    flags = []

    def record(epoch, rec):
        snaps.append((bn.running_mean.clone(), bn.running_var.clone(), step.detach().clone()))
        flags.append((rec["bn_frozen"], rec["step_sizes_frozen"], bn.training))

    schedule = QATSchedule(prepared, freeze_bn_epoch=1, freeze_observer_epoch=2, then=record)
    fit(prepared, _batches(3, seed=1), epochs=3, lr=0.01, progress=False, on_epoch_end=schedule)
    assert not torch.equal(snaps[1][0], snaps[0][0]) and not torch.equal(snaps[1][1], snaps[0][1])  # epoch 1 moves
    for later in snaps[2:]:
        assert torch.equal(later[0], snaps[1][0]) and torch.equal(later[1], snaps[1][1])  # frozen afterwards
    assert not torch.equal(snaps[2][2], snaps[1][2])  # step sizes still learn in epoch 2 ...
    assert torch.equal(snaps[3][2], snaps[2][2])  # ... and are frozen after it
    assert flags == [(True, False, False), (True, True, False), (True, True, False)]  # BN stays eval in train()


def test_zero_epochs_is_the_ptq_model():
    model = _tiny()
    calib = [x for x, _ in _batches(3)]
    q, p = qat(model, [], epochs=0, calib_loader=calib), quantize(model, calib)
    sq, sp = q.state_dict(), p.state_dict()
    assert sq.keys() == sp.keys()
    x = _batches(1, seed=5, bs=64)[0][0]
    with torch.no_grad():
        a, b = q(x), p(x)
    assert (a - b).abs().max() <= q.model.classifier.scale * 1.0001  # BN folding may differ in the last ulp
    assert q.recipe["method"] == "qat" and q.recipe["epochs"] == 0


def test_converted_model_is_int8_and_matches_the_fake_quant_model():
    batches = _batches(4, seed=2)
    prepared = prepare_qat(_tiny(), [x for x, _ in batches])
    fit(prepared, batches, epochs=1, lr=0.01, progress=False)
    q = convert_qat(prepared)
    layers = dict(q.model.named_modules())
    assert all(is_quantized_module(layers[n]) for n in ("features.0", "features.3", "features.7", "classifier"))
    assert isinstance(layers["features.0"], torch.ao.nn.intrinsic.quantized.ConvReLU2d)
    assert isinstance(layers["classifier"], torch.ao.nn.quantized.Linear)
    assert not any(type(m) in (nn.Conv2d, nn.Linear, nn.BatchNorm2d) for m in q.modules())
    # the int8 weights use the learned per-channel step sizes
    learned = prepared.get_submodule("features.0").weight_fake_quant.scale.detach().double()
    assert torch.allclose(layers["features.0"].weight().q_per_channel_scales(), learned)
    x = _batches(1, seed=6, bs=64)[0][0]
    prepared.eval()
    with torch.no_grad():
        a, b = q(x), prepared(x)
    step = layers["classifier"].scale
    within = ((a - b).abs() <= step * 1.0001).float().mean().item()
    assert within > 0.9, within


def test_qat_on_digits_keeps_float_accuracy(digits):
    data, model, calib = digits
    test = data.loader("test", 256)
    float_top1 = evaluate(model, test)["top1"]
    q = qat(model, data.loader("train", 64), epochs=2, calib_loader=calib, progress=False)
    top1 = evaluate(q, test)["top1"]
    assert float_top1 > 0.9 and top1 >= float_top1 - 0.03, (float_top1, top1)
    assert any(is_quantized_module(m) for m in q.modules())
    assert q.recipe["method"] == "qat" and q.recipe["epochs"] == 2 and q.recipe["lsq"] is True
    assert q.recipe["freeze_bn_epoch"] == 1 and len(q.qat_log) == 2 and q.qat_log[-1]["bn_frozen"]


def test_qat_artifact_round_trips(digits, tmp_path):
    data, model, calib = digits
    q = qat(model, data.loader("train", 64), epochs=1, calib_loader=calib, keep_float=["classifier"], progress=False)
    assert isinstance(dict(q.model.named_modules())["classifier"], nn.Linear) and q.keep_float == ["classifier"]
    back = slimkit.load(slimkit.save(q, tmp_path / "qat.safetensors"))
    x = next(iter(data.loader("test", 64)))[0]
    with torch.no_grad():
        assert torch.equal(q(x), back(x))
    assert is_quantized_module(dict(back.model.named_modules())["features.3"])
    assert back.recipe["method"] == "qat" and back.recipe["epochs"] == 1 and back.keep_float == ["classifier"]


def test_bad_input_raises_clear_errors():
    model = _tiny()
    calib = [x for x, _ in _batches(1)]
    with pytest.raises(SlimkitError, match="epochs must be an integer >= 0"):
        qat(model, _batches(1), epochs=-1, calib_loader=calib)
    with pytest.raises(SlimkitError, match=r"unknown option\(s\) \['bogus'\]"):
        qat(model, _batches(1), epochs=1, calib_loader=calib, bogus=3)
    with pytest.raises(SlimkitError, match="freeze_bn_epoch"):
        qat(model, _batches(1), epochs=1, calib_loader=calib, freeze_bn_epoch=-3)
    with pytest.raises(SlimkitError, match="no layer named"):
        qat(model, _batches(1), epochs=1, calib_loader=calib, keep_float=["features.99"])
    with pytest.raises(SlimkitError, match="calibration data is empty"):
        qat(model, _batches(1), epochs=1, calib_loader=[])


def test_recipe_stage_and_cli(tmp_path, capsys):
    from slimkit.cli import main
    from slimkit.pipeline import run_recipe

    report = run_recipe({"model": "digits_cnn", "data": "digits", "limit": 40, "progress": False,
                         "stages": [{"method": "quantize", "calib": 64, "qat_epochs": 1, "qat_lr": 0.002}]},
                        str(tmp_path / "recipe"), log=lambda m: None)
    back = slimkit.load(report["artifact"])
    assert back.recipe["method"] == "qat" and back.recipe["epochs"] == 1 and back.recipe["lr"] == 0.002
    assert any(is_quantized_module(m) for m in back.modules())
    capsys.readouterr()
    assert main(["quantize", "digits_cnn", "--data", "digits", "--limit", "40", "--calib", "64", "--qat-epochs", "1",
                 "--out", str(tmp_path / "cli"), "--no-bench", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "qat" and result["qat_epochs"] == 1
    assert slimkit.load(os.path.join(tmp_path, "cli", "model.safetensors")).recipe["method"] == "qat"
    assert main(["quantize", "digits_cnn", "--data", "digits", "--qat-epochs", "-1", "--out",
                 str(tmp_path / "bad"), "--no-bench"]) == 2
    assert "--qat-epochs must be >= 0" in capsys.readouterr().err


def test_resnet_residual_adds_and_shortcut_survive_qat(tmp_path):
    # CIFAR ResNet-20: residual add_relu in int8, option-A shortcut sharing its input's (learned) qparams
    torch.manual_seed(0)
    model = randomize_bn(slimkit.create_model("resnet20"))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    q = qat(model, batches, epochs=1, calib_loader=[x for x, _ in batches], progress=False)
    assert "torch.ops.quantized.add_relu" in q.model.code
    assert q.model.layer2_0_shortcut_scale_0 == q.model.layer1_2_relu2_scale_0
    back = slimkit.load(slimkit.save(q, tmp_path / "r20.safetensors"))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(q(x), back(x))
