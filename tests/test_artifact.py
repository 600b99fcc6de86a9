import json
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import slimkit
from slimkit import SlimkitError, create_model
from slimkit.artifact import history, read_header, register_module


def _same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    a.eval(), b.eval()
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_round_trip_identical_outputs_and_provenance(tmp_path):
    model = create_model("resnet20").eval()
    history(model).append({"stage": "finetune", "params": {"epochs": 1}, "metrics": {"test_top1": 0.5}})
    path = slimkit.save(model, tmp_path / "m.safetensors", meta={"dataset": "digits"})
    loaded = slimkit.load(path)
    assert _same_outputs(model, loaded, torch.randn(4, 3, 32, 32))
    assert loaded.slimkit_history == [{"stage": "finetune", "params": {"epochs": 1}, "metrics": {"test_top1": 0.5}}]
    assert loaded.slimkit_meta == {"dataset": "digits"}
    assert read_header(path)["base"]["spec"] == "resnet20"
    # every command that takes MODEL accepts an artifact
    assert _same_outputs(model, create_model(str(path)), torch.randn(2, 3, 32, 32))


def test_round_trip_after_layers_change_shape(tmp_path):
    model = create_model("resnet20")
    block = model.layer1[0]
    block.conv1 = nn.Conv2d(16, 8, 3, padding=1, bias=False)  # a "pruned" conv
    block.bn1 = nn.BatchNorm2d(8)
    block.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    model.layer2[0].conv1 = nn.Sequential(  # a conv replaced by a depthwise-separable pair
        nn.Conv2d(16, 16, 3, 2, 1, groups=16, bias=False), nn.Conv2d(16, 32, 1, bias=False))
    del model.layer3[2]  # a block removed
    model.eval()
    loaded = slimkit.load(slimkit.save(model, tmp_path / "m.safetensors"))
    assert isinstance(loaded.layer2[0].conv1, nn.Sequential)
    assert loaded.layer1[0].conv1.out_channels == 8 and len(loaded.layer3) == 2
    assert _same_outputs(model, loaded, torch.randn(3, 3, 32, 32))


def test_torchvision_and_baseless_models(tmp_path):
    tv = create_model("torchvision:mobilenet_v2", num_classes=10).eval()
    tv.classifier[1] = nn.Linear(1280, 10, bias=False)
    assert _same_outputs(tv, slimkit.load(slimkit.save(tv, tmp_path / "tv.safetensors")), torch.randn(1, 3, 64, 64))

    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    loaded = slimkit.load(slimkit.save(plain, tmp_path / "plain.safetensors"))
    assert _same_outputs(plain, loaded, torch.randn(2, 1, 8, 8))


def test_unregistered_replacement_is_named(tmp_path):
    class Mystery(nn.Module):
        def forward(self, x):
            return x

    model = create_model("resnet20")
    model.layer1[1].conv2 = Mystery()
    path = slimkit.save(model, tmp_path / "m.safetensors")
    with pytest.raises(SlimkitError, match=r"cannot rebuild module 'layer1\.1\.conv2' of type .*Mystery"):
        slimkit.load(path)


def test_registered_custom_module_rebuilds(tmp_path):
    @register_module
    class Scale(nn.Module):
        def __init__(self, channels: int, init: float = 1.0):
            super().__init__()
            self.channels, self.init = channels, init
            self.weight = nn.Parameter(torch.full((channels,), init))

        def forward(self, x):
            return x * self.weight[:, None, None]

    model = create_model("resnet20").eval()
    model.layer1[0].bn2 = nn.Sequential(model.layer1[0].bn2, Scale(16, 0.5))
    loaded = slimkit.load(slimkit.save(model, tmp_path / "m.safetensors"))
    assert isinstance(loaded.layer1[0].bn2[1], Scale)
    assert _same_outputs(model, loaded, torch.randn(2, 3, 32, 32))


def test_save_is_atomic_and_validates(tmp_path):
    path = tmp_path / "m.safetensors"
    model = create_model("digits_cnn")
    slimkit.save(model, path)
    before = path.read_bytes()
    with pytest.raises(SlimkitError, match="not JSON-serialisable"):
        slimkit.save(model, path, meta={"bad": object()})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(SlimkitError, match="artifact not found"):
        slimkit.load(tmp_path / "absent.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(SlimkitError, match="without slimkit metadata"):
        slimkit.load(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(SlimkitError, match="junk.safetensors: not a safetensors file"):
        slimkit.load(tmp_path / "junk.safetensors")


def test_header_never_names_importable_code(tmp_path):
    """A forged header naming an arbitrary class must not import or call it."""
    from safetensors.torch import load_file

    path = slimkit.save(create_model("digits_cnn"), tmp_path / "m.safetensors")
    header = read_header(path)
    header["modules"]["children"]["classifier"] = {"type": "os.system", "config": {"command": "echo pwned"}}
    save_file(load_file(path), str(tmp_path / "forged.safetensors"), metadata={"slimkit": json.dumps(header)})
    with pytest.raises(SlimkitError, match="cannot rebuild module 'classifier' of type os.system"):
        slimkit.load(tmp_path / "forged.safetensors")
    assert os.path.getsize(path) > 0


def test_module_state_versions_survive_the_round_trip(tmp_path):
    # torchvision's MNASNet refuses a state_dict without its version metadata (found by the sweep, issue 22)
    m = slimkit.create_model("torchvision:mnasnet0_5", num_classes=10).eval()
    back = slimkit.load(slimkit.save(m, tmp_path / "m.safetensors")).eval()
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(back(x), m(x))
    save_file(m.state_dict(), str(tmp_path / "w.safetensors"))
    again = slimkit.create_model("torchvision:mnasnet0_5", num_classes=10, weights=str(tmp_path / "w.safetensors"))
    assert torch.equal(again.eval()(x), m(x))
