"""Tests for slimkit.profile: exact counts against hand-derived references (CIFAR ResNets,
torchvision ResNet-18 and MobileNetV2, small hand-built graphs), per-call counting,
functional ops, tensor-liveness peak memory, weight bytes per storage dtype, uncounted ops,
energy, and that profiling leaves the model exactly as it was."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimkit
from slimkit.errors import SlimkitError
from slimkit.profile import (
    LAYER_KEYS,
    WeightStat,
    profile,
    profile_spec,
    register_weight_bytes,
    size_on_disk,
    tensor_bytes,
)
from slimkit.profile.energy import ADD_PJ, DRAM_READ_32BIT_PJ, MULT_PJ, SRAM_READ_32BIT_PJ

torch.set_num_threads(1)


# ---------------------------------------------------------------- hand-derived references


def cifar_resnet_macs(n: int, num_classes: int = 10) -> int:
    """MACs of ResNet-(6n+2) at 32x32, conv by conv: Cout * Hout * Wout * Cin * 3 * 3."""
    macs = 16 * 32 * 32 * 3 * 9  # stem
    macs += 2 * n * 16 * 32 * 32 * 16 * 9  # stage 1: 2n convs 16->16 at 32x32
    for c, hw in ((32, 16), (64, 8)):  # first conv of stages 2 and 3 halves the size, doubles channels
        macs += c * hw * hw * (c // 2) * 9 + (2 * n - 1) * c * hw * hw * c * 9
    return macs + 64 * num_classes  # linear head; option-A shortcuts and BN cost no MACs


def cifar_resnet_params(n: int, num_classes: int = 10) -> int:
    convs = 3 * 16 * 9 + 2 * n * 16 * 16 * 9 + sum(c // 2 * c * 9 + (2 * n - 1) * c * c * 9 for c in (32, 64))
    bns = 2 * (16 + 2 * n * (16 + 32 + 64))  # weight and bias per channel
    return convs + bns + 64 * num_classes + num_classes


def conv_linear_macs_by_shapes(model: nn.Module, x: torch.Tensor) -> int:
    """Independent MAC count: forward hooks read each Conv2d/Linear's shapes, formula per layer."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            total += out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return total


def test_reference_formulas_match_published_counts():
    # the formulas above reproduce the sizes of He et al. 2016, table 6 (0.27M and 0.85M params)
    assert cifar_resnet_macs(3) == 40_551_040
    assert cifar_resnet_params(3) == 269_722
    assert cifar_resnet_params(9) == 853_018  # ResNet-56: 0.85M


# ---------------------------------------------------------------- exact counts on real models


@pytest.mark.parametrize("depth", [20, 56])
def test_cifar_resnet_exact(depth):
    n = (depth - 2) // 6
    p = profile_spec(f"resnet{depth}")
    assert p.params == cifar_resnet_params(n)
    assert p.macs == cifar_resnet_macs(n)
    assert p.uncounted == {}
    assert p.input_shape == [1, 3, 32, 32]
    assert p.layer("conv1").macs == 16 * 32 * 32 * 3 * 9
    assert p.layer("layer2.0.conv1").macs == 32 * 16 * 16 * 16 * 9
    assert p.layer("linear").macs == 640
    assert p.layer("linear").other_ops == 10  # bias additions are element ops, not MACs
    # BN at inference: scale and shift per element
    assert p.layer("bn1").other_ops == 2 * 16 * 32 * 32
    # the residual add is not inside any leaf module: it belongs to its block
    block = p.layer("layer1.0")
    assert block.type == "BasicBlock" and block.macs == 0 and block.other_ops == 16 * 32 * 32
    assert sum(r.macs for r in p.layers) == p.macs
    assert sum(r.params for r in p.layers) == p.params


def test_resnet20_total_counts_exact():
    p = profile_spec("resnet20")
    assert (p.params, p.macs) == (269_722, 40_551_040)


def test_torchvision_resnet18_exact():
    model = slimkit.create_model("torchvision:resnet18")
    x = torch.randn(1, 3, 224, 224)
    p = profile(model, x)
    assert p.params == 11_689_512
    assert p.macs == 1_814_073_344
    assert p.macs == conv_linear_macs_by_shapes(model, x)
    assert p.uncounted == {}
    assert p.layer("conv1").macs == 64 * 112 * 112 * 3 * 49
    assert p.layer("maxpool").other_ops == 64 * 56 * 56 * 9
    assert p.layer("avgpool").other_ops == 512 * 7 * 7


def test_torchvision_mobilenet_v2_exact():
    model = slimkit.create_model("torchvision:mobilenet_v2")
    x = torch.randn(1, 3, 224, 224)
    p = profile(model, x)
    assert p.params == 3_504_872
    assert p.macs == 300_774_272
    assert p.macs == conv_linear_macs_by_shapes(model, x)  # depthwise convs: groups == channels
    assert p.uncounted == {}


@pytest.mark.parametrize("name", ["squeezenet1_1", "shufflenet_v2_x0_5", "efficientnet_b0", "mobilenet_v3_small",
                                  "googlenet", "regnet_y_400mf", "vit_b_32", "swin_t"])
def test_torchvision_models_fully_counted(name):
    model = slimkit.create_model(f"torchvision:{name}")
    p = profile_spec(f"torchvision:{name}")
    assert p.uncounted == {}
    assert p.params == sum(t.numel() for t in model.parameters())
    assert p.macs > 0 and p.other_ops > 0
    assert sum(r.macs for r in p.layers) == p.macs
    assert p.activation_peak_bytes < p.activation_bytes


def test_attention_paths_agree_with_hand_count():
    # nn.MultiheadAttention takes torch's fused fast path under no_grad; a hand-written
    # functional attention must count the same: 4 projections L*E*E plus 2 * L*L*E
    L, E, H = 5, 8, 2
    mha = nn.MultiheadAttention(E, H, batch_first=True)

    class Manual(nn.Module):
        def forward(self, x):
            q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
            q, k, v = (t.reshape(1, L, H, E // H).transpose(1, 2).reshape(H, L, E // H) for t in (q, k, v))
            a = torch.softmax(torch.bmm(q, k.transpose(1, 2)) / math.sqrt(E // H), dim=-1)
            o = torch.bmm(a, v).reshape(1, H, L, E // H).transpose(1, 2).reshape(1, L, E)
            return F.linear(o, mha.out_proj.weight, mha.out_proj.bias)

    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    class Sdpa(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    x = torch.randn(1, L, E)
    expected = 4 * L * E * E + 2 * L * L * E
    assert profile(Fused(), x).macs == expected
    assert profile(Manual(), x).macs == expected
    qkv = [torch.randn(1, H, L, E // H) for _ in range(3)]
    assert profile(Sdpa(), tuple(qkv)).macs == 2 * H * L * L * (E // H)


def test_conv_variants_hand_counts():
    # grouped + strided + dilated: out 1x8x5x5, each output sums Cin/groups * 3 * 3 = 9 products
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, groups=4, bias=False)
    assert profile(conv, torch.randn(1, 4, 9, 9)).macs == 8 * 5 * 5 * 1 * 9
    # transposed, grouped: every input element meets Cout/groups * 3 * 3 weights
    deconv = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
    p = profile(deconv, torch.randn(1, 4, 5, 5))
    assert p.macs == 4 * 5 * 5 * 3 * 9
    assert p.other_ops == 6 * 11 * 11  # bias
    # einsum decomposes to a batched product: 2 * 3 * 4 * 5
    einsum = type("Einsum", (nn.Module,), {"forward": lambda self, a, b: torch.einsum("bij,bjk->bik", a, b)})()
    assert profile(einsum, (torch.randn(2, 3, 4), torch.randn(2, 4, 5))).macs == 2 * 3 * 4 * 5


# ---------------------------------------------------------------- per-call and functional counting


class TwiceLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


def test_module_called_twice_counts_twice():
    p = profile(TwiceLinear(), torch.randn(1, 4))
    row = p.layer("fc")
    assert row.calls == 2
    assert row.macs == 2 * 4 * 4
    assert row.other_ops == 2 * 4  # two bias additions
    assert row.params == 20 and p.params == 20  # weights are counted once
    assert p.macs == 32
    assert p.layer("").other_ops == 4  # the functional relu runs in the model's own forward


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.b = nn.Parameter(torch.randn(4))
        self.fc_w = nn.Parameter(torch.randn(5, 7 * 8 * 8))

    def forward(self, x):  # x: 1x3x8x8
        y = F.conv2d(x, self.w, self.b, padding=1)  # 1x4x8x8
        z = F.relu(y)
        s = y + z
        c = torch.cat([s, x], dim=1)  # 1x7x8x8
        return F.linear(torch.flatten(c, 1), self.fc_w)


def test_functional_ops_counted():
    p = profile(Functional(), torch.randn(1, 3, 8, 8))
    assert p.macs == 4 * 8 * 8 * 3 * 9 + 5 * 7 * 8 * 8
    # conv bias 256, relu 256, add 256, cat 448 (one per element written); flatten is a view
    assert p.other_ops == 256 + 256 + 256 + 448
    assert p.uncounted == {}
    assert [r.name for r in p.layers] == [""]
    assert p.params == 4 * 27 + 4 + 5 * 448


# ---------------------------------------------------------------- memory


def test_peak_memory_follows_tensor_liveness():
    # a chain: each ReLU output is alive together with its input, then the input dies
    x = torch.randn(1, 1000)
    chain = nn.Sequential(nn.ReLU(), nn.ReLU(), nn.ReLU())
    p = profile(chain, x)
    assert p.activation_bytes == 3 * 4000  # everything written
    assert p.activation_peak_bytes == 2 * 4000  # never more than two alive
    # in place on the input: nothing new is allocated, the input itself does not count
    assert profile(nn.ReLU(inplace=True), x).activation_peak_bytes == 0

    class KeepsAlive(nn.Module):
        def forward(self, x):
            a = torch.relu(x)
            b = a * 2
            return b + a  # a, b and the result are alive at once

    assert profile(KeepsAlive(), x).activation_peak_bytes == 3 * 4000


def test_views_write_nothing_copies_write_bytes():
    class Views(nn.Module):
        def forward(self, x):
            return x.view(10, 100).t()[::2].unsqueeze(0)

    class Copy(nn.Module):
        def forward(self, x):
            return x.view(10, 100).t().reshape(-1)  # not viewable: reshape copies

    p = profile(Views(), torch.randn(1, 1000))
    assert (p.activation_bytes, p.activation_peak_bytes, p.other_ops, p.uncounted) == (0, 0, 0, {})
    p = profile(Copy(), torch.randn(1, 1000))
    assert (p.activation_bytes, p.activation_peak_bytes, p.other_ops, p.uncounted) == (4000, 4000, 0, {})


# ---------------------------------------------------------------- weight bytes


class QuantLinear(nn.Module):
    """A quantized Linear between quantize / dequantize, so it runs on float input."""

    def __init__(self):
        super().__init__()
        self.fc = torch.ao.nn.quantized.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.quantize_per_tensor(x, 0.1, 128, torch.quint8)).dequantize()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_weight_bytes_follow_storage_dtype():
    x = torch.randn(2, 8)
    fp32 = profile(nn.Linear(8, 4), x)
    fp16 = profile(nn.Linear(8, 4).half(), x.half())
    int8 = profile(QuantLinear(), x)
    assert fp32.params == fp16.params == int8.params == 36
    assert fp32.weight_bytes == 36 * 4
    assert fp16.weight_bytes == 36 * 2
    assert int8.weight_bytes == 32 * 1 + 4 * 4  # int8 weight, float32 bias
    assert int8.macs == fp32.macs == 2 * 4 * 8
    assert int8.uncounted == {}


def test_sparse_weight_counts_values_and_indices():
    dense = torch.zeros(4, 6)
    dense[0, 1], dense[2, 3], dense[3, 5] = 1.0, 2.0, 3.0
    sparse = dense.to_sparse()
    assert tensor_bytes(sparse) == 3 * 4 + 2 * 3 * 8  # float32 values, int64 (row, col) indices

    class SparseLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", sparse)

        def forward(self, x):
            return torch.sparse.mm(self.w, x)

    p = profile(SparseLayer(), torch.randn(6, 3))
    assert p.weight_bytes == 3 * 4 + 2 * 3 * 8
    assert p.macs == 3 * 3  # one product per stored value and output column


class Packed4bit(nn.Module):
    """Stand-in for a packed low-bit layer: two 4-bit weights per byte plus one fp32 scale."""

    def __init__(self, out_f: int = 4, in_f: int = 8):
        super().__init__()
        self.out_f, self.in_f = out_f, in_f
        self.register_buffer("packed", torch.zeros(out_f * in_f // 2, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x):
        return F.linear(x, torch.zeros(self.out_f, self.in_f) * self.scale)


@register_weight_bytes(Packed4bit)
def _packed4bit_size(m: Packed4bit) -> WeightStat:
    return WeightStat(m.out_f * m.in_f, m.out_f * m.in_f // 2 + 4)


def test_weight_bytes_registry_hook():
    p = profile(Packed4bit(), torch.randn(1, 8))
    assert p.params == 32  # default counting would see no parameters at all
    assert p.weight_bytes == 16 + 4


# ---------------------------------------------------------------- uncounted ops


@torch.library.custom_op("slimkit_test::mystery", mutates_args=())
def _mystery(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


def test_uncountable_op_is_listed():
    class Mystery(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(_mystery(_mystery(x)))

    p = profile(Mystery(), torch.randn(1, 3))
    assert p.uncounted == {"slimkit_test.mystery": 2}
    assert p.macs == 9
    assert p.layer("").uncounted == {"slimkit_test.mystery": 2}
    assert "slimkit_test.mystery x2" in p.table()


# ---------------------------------------------------------------- the model is left as it was


def _hook_state(model: nn.Module) -> list:
    return [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._forward_hooks_always_called),
             len(m._forward_pre_hooks_with_kwargs)) for m in model.modules()]


def test_profile_leaves_model_unchanged():
    torch.manual_seed(0)
    model = slimkit.create_model("resnet20")
    model.train()
    model.layer2.eval()  # mixed flags must come back module by module
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = _hook_state(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model.eval()(x)
    for m, f in zip(model.modules(), flags):
        m.training = f
    profile(model, x)
    assert [m.training for m in model.modules()] == flags
    assert _hook_state(model) == hooks
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(model.eval()(x), before)


def test_bad_input_names_failing_layer_and_leaves_model_unchanged():
    model = slimkit.create_model("resnet20").train()
    hooks = _hook_state(model)
    with pytest.raises(SlimkitError) as info:
        profile(model, torch.randn(1, 1, 32, 32))
    msg = str(info.value)
    assert "'conv1' (Conv2d)" in msg and "1x1x32x32" in msg
    assert model.training and _hook_state(model) == hooks

    head = nn.Sequential(nn.Flatten(), nn.Linear(10, 2))
    with pytest.raises(SlimkitError, match=r"layer '1' \(Linear\).*"):
        profile(head, torch.randn(1, 12))
    with pytest.raises(SlimkitError, match="tensor"):
        profile(head, [1, 2, 3])


# ---------------------------------------------------------------- report, energy, helpers


def test_to_dict_keys_and_json():
    d = profile_spec("digits_cnn").to_dict()
    assert set(d) == {"params", "macs", "other_ops", "activation_peak_bytes", "weight_bytes", "energy_mj_estimate",
                      "layers", "uncounted", "input_shape"}
    assert d["input_shape"] == [1, 1, 8, 8]
    assert all(tuple(row) == LAYER_KEYS for row in d["layers"])
    assert d["layers"][0]["name"] == "features.0" and d["layers"][0]["input_shape"] == [1, 1, 8, 8]
    assert json.loads(json.dumps(d)) == d


def test_table_shows_layers_totals_and_bottleneck():
    p = profile_spec("resnet20")
    text = p.table()
    lines = text.splitlines()
    assert len(lines) == 3 + len(p.layers) + 2 + 5
    assert "layer2.0.shortcut" in text and "PadShortcut" in text and "total" in text
    top = max(p.layers, key=lambda r: r.macs)
    top_line = next(line for line in lines if f" {top.name} " in line)
    assert "#" * 12 in top_line and f"{100 * top.macs / p.macs:5.1f}%" in top_line
    short = p.table(top=3)
    assert len(short.splitlines()) == 3 + 3 + 1 + 2 + 5
    assert f"({len(p.layers) - 3} other layers)" in short


def test_energy_model_hand_computed():
    p = profile(nn.Linear(8, 4, bias=False), torch.randn(1, 8))
    # 32 fp32 MACs; 128 weight bytes from DRAM; 16 output bytes written and read in SRAM
    expected_pj = (32 * (MULT_PJ["fp32"] + ADD_PJ["fp32"]) + 128 / 4 * DRAM_READ_32BIT_PJ
                   + 2 * 16 / 4 * SRAM_READ_32BIT_PJ)
    assert p.energy_mj_estimate == pytest.approx(expected_pj * 1e-9)
    assert expected_pj == pytest.approx(32 * 4.6 + 32 * 640 + 8 * 5)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_int8_macs_cost_less_energy():
    x = torch.randn(2, 8)
    fp32, int8 = profile(nn.Linear(8, 4), x), profile(QuantLinear(), x)
    assert fp32.energy_breakdown_mj["macs"] == pytest.approx(64 * 4.6e-9)
    assert int8.energy_breakdown_mj["macs"] == pytest.approx(64 * 0.23e-9)


def test_profile_spec_input_size():
    p = profile_spec("resnet20", input_size=(3, 64, 64))
    assert p.input_shape == [1, 3, 64, 64] and p.macs == 4 * (cifar_resnet_macs(3) - 640) + 640
    with pytest.raises(SlimkitError, match="input_size"):
        profile_spec("resnet20", input_size=(3, 32))


def test_size_on_disk(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"x" * 1234)
    assert size_on_disk(f) == 1234
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "extra").write_bytes(b"y" * 66)
    assert size_on_disk(tmp_path) == 1300
    with pytest.raises(SlimkitError, match="no such file"):
        size_on_disk(tmp_path / "missing.safetensors")
