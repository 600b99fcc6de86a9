"""Low-bit weights and activations (issue 19): the values each method may take, training, packing, CLI, stage."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import cli, one_line_error
from torch import nn

import slimkit
from slimkit import SlimkitError
from slimkit.lowbit import LowBitConfig, lowbit
from slimkit.lowbit.quantizers import ActQuant, TernaryWeight
from slimkit.sparse import pack, read_packed
from slimkit.sparse.masks import prunable_layers


@pytest.fixture(scope="module")
def digits():
    from slimkit.data import load
    from slimkit.train import fit

    torch.manual_seed(0)
    data = load("digits", limit=600)
    model = slimkit.create_model("digits_cnn")
    fit(model, data.loader("train", 64), epochs=5, lr=0.1, progress=False)
    return model.eval(), data


def _tuner(data):
    from slimkit.train import fit

    def run(model, epochs, tag):
        fit(model, data.loader("train", 64), epochs=epochs, lr=0.02, progress=False)
        return model

    return run


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach() for n, m in prunable_layers(model)}


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lsq_layers_hold_at_most_2_to_the_bits_values_and_edges_8_bits(digits, bits):
    model, data = digits
    r = lowbit(model, LowBitConfig(lowbit="lsq", weight_bits=bits), loader=data.loader("train", 64),
               finetune=_tuner(data), epochs=1)
    for row in r.layers:
        assert row["values"] <= 2 ** row["bits"], row
        assert row["bits"] == (8 if row["name"] in ("features.0", "classifier") else bits)
    assert {row["name"] for row in r.layers if row["edge"]} == {"features.0", "classifier"}


def test_ternary_layers_hold_zero_and_two_scales(digits):
    model, data = digits
    r = lowbit(model, LowBitConfig(lowbit="ttq"), loader=data.loader("train", 64), finetune=_tuner(data), epochs=1)
    for row, w in zip(r.layers, _weights(r.model).values()):
        if not row["edge"]:
            values = torch.unique(w)
            assert len(values) == 3 and values[1] == 0 and values[0] < 0 < values[2], values


def test_ttq_gradients_follow_the_paper():
    torch.manual_seed(0)
    w = torch.randn(6, 5, requires_grad=True)
    q = TernaryWeight(w.detach(), threshold=0.3)
    out = q(w)
    g = torch.randn_like(out)
    out.backward(g)
    delta = 0.3 * w.detach().abs().max()
    pos, neg = w.detach() > delta, w.detach() < -delta
    assert torch.allclose(q.wp.grad, g[pos].sum()) and torch.allclose(q.wn.grad, -g[neg].sum())
    expected = torch.where(pos, q.wp.detach() * g, torch.where(neg, q.wn.detach() * g, g))
    assert torch.allclose(w.grad, expected)


def test_binary_weights_are_plus_or_minus_one_scale_per_channel(digits):
    model, data = digits
    r = lowbit(model, LowBitConfig(lowbit="binary"), loader=data.loader("train", 64), finetune=_tuner(data), epochs=1)
    for row, w in zip(r.layers, _weights(r.model).values()):
        if row["edge"]:
            continue
        for channel in w.reshape(w.shape[0], -1):
            values = torch.unique(channel)
            assert len(values) <= 2 and torch.allclose(values.abs(), values.abs()[0].expand_as(values))


def test_activation_quantizers_are_placed_signed_where_inputs_go_negative(digits):
    model, data = digits
    r = lowbit(model, LowBitConfig(lowbit="lsq", weight_bits=4, act_bits=3), loader=data.loader("train", 64))
    quants = {n: m for n, m in r.model.named_modules() if isinstance(m, ActQuant)}
    assert set(quants) == {"features.0.0", "features.3.0", "features.7.0", "classifier.0"}
    assert quants["features.3.0"].bits == 3 and quants["features.0.0"].bits == 8  # the image input at 8 bits
    assert not quants["features.3.0"].signed  # after a ReLU
    seen = {}
    h = quants["features.3.0"].register_forward_hook(lambda m, a, o: seen.setdefault("out", o))
    r.model(next(iter(data.loader("test", 32)))[0])
    h.remove()
    assert len(torch.unique(seen["out"])) <= 2**3
    with pytest.raises(SlimkitError, match="act-bits"):
        lowbit(model, LowBitConfig(lowbit="lsq", act_bits=4))


def test_trained_4_bit_stays_close_to_float_and_packs_at_its_bit_width(digits, tmp_path):
    from slimkit.train import evaluate

    model, data = digits
    test = data.loader("test", 100)
    r = lowbit(model, LowBitConfig(lowbit="lsq", weight_bits=4, act_bits=4), loader=data.loader("train", 64),
               finetune=_tuner(data), epochs=3)
    assert evaluate(r.model, test)["top1"] > evaluate(model, test)["top1"] - 0.02
    p = pack(r.model, tmp_path / "m.slimpack")
    back = slimkit.load(p)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(back(x), r.model(x))
    header = __import__("slimkit.sparse.pack", fromlist=["read_header"]).read_header(str(p))[0]
    codes = header["tensors"]["features.3.1.weight"]["streams"]["codes"]
    assert codes["alphabet"] <= 16  # 4-bit codes
    dense = slimkit.save(r.model, tmp_path / "m.safetensors")
    assert os.path.getsize(p) * 6 < os.path.getsize(dense)
    assert all(torch.equal(t, r.model.state_dict()[k]) for k, t in read_packed(p)[1].items())


def test_binary_channels_pack_into_per_channel_codebooks(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 300, 3), nn.Flatten(), nn.LazyLinear(10))
    model(torch.zeros(1, 3, 8, 8))
    r = lowbit(model.eval(), LowBitConfig(lowbit="binary"))
    p = pack(r.model, tmp_path / "b.slimpack")
    rec = __import__("slimkit.sparse.pack", fromlist=["read_header"]).read_header(str(p))[0]["tensors"]["2.weight"]
    assert rec.get("row_codebook") == 2  # 600 distinct values in all, two per output channel
    assert torch.equal(read_packed(p)[1]["2.weight"], r.model[2].weight.detach())


@pytest.mark.parametrize("args, needle", [
    (["--method", "ttq", "--weight-bits", "3"], "fixed by method ttq"),
    (["--weight-bits", "1"], "--weight-bits"),
    (["--method", "ternary"], "ttq"),
    ([], "--data"),
])
def test_lowbit_bad_input_is_one_line_and_status_2(tmp_path, args, needle):
    code, _, err = cli("lowbit", "digits_cnn", *args, "--out", str(tmp_path / "o"))
    assert needle in one_line_error(code, err)


def test_lowbit_command_and_stage(tmp_path):
    code, stdout, err = cli("lowbit", "digits_cnn", "--data", "digits", "--limit", "120", "--method", "lsq",
                            "--weight-bits", "3", "--act-bits", "4", "--finetune-epochs", "1", "--json",
                            "--out", str(tmp_path / "o"))
    assert code == 0, err
    r = json.loads(stdout)
    assert r["packed_bytes"] == os.path.getsize(r["packed"]) and r["ratio"] > 5
    assert slimkit.load(r["packed"]).slimkit_history[-1]["stage"] == "lowbit"
    from slimkit.pipeline import run_recipe

    report = run_recipe({"model": "digits_cnn", "data": "digits", "limit": 120, "progress": False, "pack": True,
                         "stages": [{"method": "lowbit", "weight_bits": 2, "finetune": {"epochs": 1}}]},
                        str(tmp_path / "r"), log=lambda _: None)
    model = slimkit.load(report["packed"])
    assert all(len(torch.unique(m.weight)) <= 4 for n, m in prunable_layers(model) if n not in
               ("features.0", "classifier"))
