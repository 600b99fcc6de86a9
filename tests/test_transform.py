import copy
import json
import os

import pytest
import torch
from torch import nn

import slimkit
from slimkit import SlimkitError, create_model
from slimkit.profile import profile
from slimkit.transform import TRANSFORMS, apply_transform, eligible_layers

H = W = 8
C, COUT = 16, 24


def _macs(model: nn.Module, x: torch.Tensor, name: str) -> int:
    """MACs the profiler attributes to module ``name`` and everything under it."""
    return sum(r.macs for r in profile(model, x).layers if r.name == name or r.name.startswith(name + "."))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _randomised(module: nn.Module) -> nn.Module:
    fresh = copy.deepcopy(module)
    for m in fresh.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return fresh


# (transform, original layer, options, MACs of the replacement at H x W, stride 1, "same" padding)
CASES = {
    "depthwise_separable": (lambda: nn.Conv2d(C, COUT, 3, padding=1, bias=False), {}, H * W * (9 * C + C * COUT)),
    "factorize_kxk": (lambda: nn.Conv2d(C, COUT, 3, padding=1), {}, H * W * (COUT * C * 3 + COUT * COUT * 3)),
    "factorize_5x5": (lambda: nn.Conv2d(C, COUT, 5, padding=2), {}, H * W * (9 * C * COUT + 9 * COUT * COUT)),
    "grouped_shuffle": (lambda: nn.Conv2d(C, COUT, 3, padding=1), {"groups": 4}, H * W * 9 * C * COUT // 4),
    "bottleneck": (lambda: nn.Conv2d(C, COUT, 3, padding=1), {"ratio": 4}, H * W * (C * 6 + 6 * 6 * 9 + 6 * COUT)),
    "channelwise": (lambda: nn.Conv2d(C, C, 1, bias=False), {"dc": 7}, H * W * C * 7),
}


def _calib(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, C, H, W, generator=g) for _ in range(2)]


def test_registry_has_the_issue_transforms():
    assert TRANSFORMS.names() == sorted(["depthwise_separable", "factorize_kxk", "factorize_5x5", "grouped_shuffle",
                                         "bottleneck", "gap_head", "channelwise"])


@pytest.mark.parametrize("name", sorted(CASES))
def test_conv_transform_shapes_macs_and_init(name):
    make, opts, formula = CASES[name]
    torch.manual_seed(0)
    model = nn.Sequential(make()).eval()
    x = torch.randn(4, C, H, W)
    with torch.no_grad():
        ref = model(x)
    original_macs = _macs(model, x[:1], "0")
    apply_transform(model, name, ["0"], calib_loader=_calib(), **opts)
    assert not isinstance(model[0], nn.Conv2d) or model[0].groups > 1
    assert [r["name"] for r in model.slimkit_last_transform["replaced"]] == ["0"]
    with torch.no_grad():
        out, rand = model(x), _randomised(model)(x)
    assert out.shape == ref.shape
    assert _macs(model, x[:1], "0") == formula < original_macs
    # x is fresh data, not the calibration batches: the fit generalises, a random init does not
    assert _rel(out, ref) < min(1.0, _rel(rand, ref))


def test_mac_factor_of_depthwise_separable_is_the_papers():
    model = nn.Sequential(nn.Conv2d(C, COUT, 3, padding=1, bias=False))
    x = torch.randn(1, C, H, W)
    before = _macs(model, x, "0")
    apply_transform(model, "depthwise_separable")
    assert _macs(model, x, "0") / before == pytest.approx((9 * C + C * COUT) / (9 * C * COUT), abs=0)


def test_depthwise_separable_exact_for_rank_one_channel_kernels():
    torch.manual_seed(1)
    conv = nn.Conv2d(C, COUT, 3, padding=1)
    pw, dw = torch.randn(COUT, C), torch.randn(C, 3, 3)
    with torch.no_grad():
        conv.weight.copy_(pw[:, :, None, None] * dw[None])
    model = nn.Sequential(conv)
    x = torch.randn(2, C, H, W)
    with torch.no_grad():
        ref = conv(x)
    apply_transform(model, "depthwise_separable", refine=False)
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-5, rtol=1e-5)


def test_factorize_kxk_exact_for_separable_kernels_and_strides():
    torch.manual_seed(2)
    conv = nn.Conv2d(C, COUT, 3, stride=2, padding=1, bias=False)
    vert, horiz = torch.randn(COUT, 2, 3), torch.randn(2, C, 3)  # rank 2 < out channels
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("ori,rcj->ocij", vert, horiz))
    model = nn.Sequential(conv)
    x = torch.randn(2, C, 9, 9)
    with torch.no_grad():
        ref = conv(x)
    apply_transform(model, "factorize_kxk")
    assert model[0].horizontal.kernel_size == (1, 3) and model[0].vertical.kernel_size == (3, 1)
    with torch.no_grad():
        out = model(x)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_factorize_kxk_rank_sets_the_width():
    model = nn.Sequential(nn.Conv2d(C, COUT, 3, padding=1))
    apply_transform(model, "factorize_kxk", rank=5)
    assert model[0].horizontal.out_channels == 5
    x = torch.randn(1, C, H, W)
    assert _macs(model, x, "0") == H * W * (5 * C * 3 + COUT * 5 * 3)


def _flat_head(cin: int = 4, classes: int = 5) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, cin, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(cin * H * W, classes))


def test_gap_head_exact_for_spatially_constant_weights_and_macs():
    torch.manual_seed(3)
    model = _flat_head().eval()
    with torch.no_grad():
        model[3].weight.copy_(torch.randn(5, 4, 1, 1).expand(5, 4, H, W).reshape(5, -1))
    x = torch.randn(3, 3, H, W)
    with torch.no_grad():
        ref = model(x)
    assert _macs(model, x[:1], "3") == 5 * 4 * H * W
    apply_transform(model, "gap_head", example_input=x[:1])
    assert _macs(model, x[:1], "3") == 5 * 4  # a factor of 1 / (H * W)
    with torch.no_grad():
        out = model(x)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_gap_head_beats_random_init_on_a_general_head():
    torch.manual_seed(4)
    model = _flat_head().eval()
    x = torch.randn(16, 3, H, W)
    with torch.no_grad():
        model[3].weight.add_(0.5 * model[3].weight.abs().mean())  # a head with a spatially shared part
        ref = model(x)
    apply_transform(model, "gap_head", example_input=x[:1])
    with torch.no_grad():
        assert _rel(model(x), ref) < min(1.0, _rel(_randomised(model)(x), ref))


def test_gap_head_needs_the_map_shape():
    model = _flat_head()
    with pytest.raises(SlimkitError, match="example input"):
        apply_transform(model, "gap_head")
    apply_transform(model, "gap_head", shape=(4, H, W))  # or is told it
    assert model(torch.randn(1, 3, H, W)).shape == (1, 5)


@pytest.mark.parametrize("spec,steps", [
    ("resnet20", [("depthwise_separable", ["layer1.0.conv1"], {}), ("factorize_kxk", ["layer1.0.conv2"], {}),
                  ("grouped_shuffle", ["layer2.0.conv1"], {"groups": 4}), ("bottleneck", ["layer3.1.conv2"], {}),
                  ("depthwise_separable", ["layer3.2.conv1"], {"refine": False})]),
    ("lenet5", [("gap_head", None, {}), ("factorize_5x5", ["features.3"], {"rank": 8})]),
])
def test_transformed_model_round_trips_through_artifacts(tmp_path, spec, steps):
    torch.manual_seed(5)
    model = create_model(spec).eval()
    x = torch.randn(4, 3, 32, 32)
    for name, layers, opts in steps:
        apply_transform(model, name, layers, example_input=x[:1], calib_loader=[x], **opts)
    assert [h["params"]["method"] for h in model.slimkit_history] == [s[0] for s in steps]
    loaded = slimkit.load(slimkit.save(model, tmp_path / "m.safetensors"))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert [type(m).__name__ for m in loaded.modules()] == [type(m).__name__ for m in model.modules()]
    assert loaded.slimkit_history == json.loads(json.dumps(model.slimkit_history))


def test_all_eligible_skips_and_names_what_it_cannot_handle():
    model = create_model("resnet20")
    ok, skipped = eligible_layers(model, "grouped_shuffle", groups=4)
    assert skipped == {"conv1": "channels 3->16 not divisible by groups=4"}
    assert len(ok) == 18
    apply_transform(model, "depthwise_separable", "layer1.0.conv1")
    ok, skipped = eligible_layers(model, "depthwise_separable", "all eligible")
    assert "layer1.0.conv1.0" in skipped and "grouped" in skipped["layer1.0.conv1.0"]
    assert "layer1.0.conv1.1" in skipped and "1x1" in skipped["layer1.0.conv1.1"]
    # an ineligible layer named explicitly is skipped and reported, the others are replaced
    apply_transform(model, "channelwise", ["layer1.0.conv1.1", "layer1.0.conv2"], record=False)
    rec = model.slimkit_last_transform
    assert [r["name"] for r in rec["replaced"]] == ["layer1.0.conv1.1"]
    assert rec["skipped"] == {"layer1.0.conv2": "kernel 3x3 is not 1x1"}


def test_errors_name_the_layer_and_its_type():
    model = create_model("resnet20")
    with pytest.raises(SlimkitError, match=r"no layer 'layer9\.conv1'"):
        apply_transform(model, "depthwise_separable", ["layer9.conv1"])
    with pytest.raises(SlimkitError, match=r"'layer1\.0\.bn1' is a BatchNorm2d"):
        apply_transform(model, "depthwise_separable", "layer1.0.bn1")
    with pytest.raises(SlimkitError, match=r"'linear' is a Linear"):
        apply_transform(model, "bottleneck", ["linear"])
    with pytest.raises(SlimkitError, match="unknown transform 'svd'"):
        apply_transform(model, "svd")
    with pytest.raises(SlimkitError, match=r"unknown option\(s\) \['group'\]"):
        apply_transform(model, "grouped_shuffle", group=4)
    with pytest.raises(SlimkitError, match="no layer to replace.*not 5x5"):
        apply_transform(model, "factorize_5x5")
    assert isinstance(model.layer1[0].conv1, nn.Conv2d)  # nothing changed by the failed calls


def test_recipe_stage_fits_on_train_batches():
    from slimkit.pipeline import get_stage

    class Data:
        def loader(self, split, batch_size, seed=0):
            assert split == "train"
            g = torch.Generator().manual_seed(seed)
            return [(torch.randn(batch_size, 3, 32, 32, generator=g), None) for _ in range(3)]

    class Ctx:
        data, batch_size, seed, details = Data(), 4, 0, {}

    model = create_model("resnet20").eval()
    out = get_stage("transform")(model, Ctx(), transform="bottleneck", layers=["layer2.1.conv1"], ratio=2,
                                 num_batches=2)
    assert out is model and out.layer2[1].conv1.conv.out_channels == 16
    assert Ctx.details["calibration_images"] == 8
    assert not getattr(model, "slimkit_history", [])  # the pipeline records the stage itself


def test_cli_transform_writes_artifact_and_reports_macs(tmp_path, capsys):
    from slimkit.cli import main

    assert main(["transform", "resnet20", "--method", "grouped_shuffle", "--opt", "groups=2", "--layers",
                 "layer1.0.conv1,layer1.0.conv2", "--out", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in result["replaced"]] == ["layer1.0.conv1", "layer1.0.conv2"]
    assert result["before"]["macs"] - result["after"]["macs"] == 2 * (32 * 32 * 9 * 16 * 16) // 2
    loaded = slimkit.load(os.path.join(tmp_path, "model.safetensors"))
    assert loaded.slimkit_history[-1]["params"]["groups"] == 2
    assert json.load(open(tmp_path / "report.json"))["macs_ratio"] == result["macs_ratio"]
