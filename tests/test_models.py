import textwrap

import pytest
import torch
from conftest import RESNET20, RESNET56, need
from torch import nn

import slimkit
from slimkit import SlimkitError, create_model
from slimkit.models import MODELS, default_input_size, load_weights, register_model


@pytest.mark.parametrize("depth,params", [(20, 269_722), (32, 464_154), (44, 658_586), (56, 853_018),
                                          (110, 1_727_962)])
def test_cifar_resnets_build_with_paper_sizes(depth, params):
    model = create_model(f"resnet{depth}")
    assert sum(p.numel() for p in model.parameters()) == params
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert default_input_size(f"resnet{depth}") == (3, 32, 32)


def test_option_a_shortcut_pads_channels_and_subsamples():
    block = create_model("resnet20").layer2[0]
    x = torch.randn(1, 16, 32, 32)
    sc = block.shortcut(x)
    assert sc.shape == (1, 32, 16, 16)
    assert torch.equal(sc[:, 8:24], x[:, :, ::2, ::2])
    assert sc[:, :8].abs().sum() == 0 and sc[:, 24:].abs().sum() == 0


def test_registering_a_model_is_one_decorator():
    @register_model("tiny_test_net", input_size=(1, 4, 4), num_classes=3)
    def tiny_test_net(num_classes=3):
        return nn.Sequential(nn.Flatten(), nn.Linear(16, num_classes))

    assert "tiny_test_net" in slimkit.list_models()
    assert create_model("tiny_test_net", num_classes=5)(torch.randn(2, 1, 4, 4)).shape == (2, 5)
    with pytest.raises(SlimkitError, match="registered twice"):
        register_model("tiny_test_net")(lambda num_classes=3: None)
    del MODELS._items["tiny_test_net"]


def test_torchvision_spec_and_errors():
    model = create_model("torchvision:resnet18", num_classes=7)
    assert model.fc.out_features == 7
    with pytest.raises(SlimkitError, match="unknown torchvision model 'resnet19'"):
        create_model("torchvision:resnet19")
    with pytest.raises(SlimkitError, match="unknown model 'resnet21'.*resnet20"):
        create_model("resnet21")


def test_user_file_spec(tmp_path):
    f = tmp_path / "mynet.py"
    f.write_text(textwrap.dedent("""
        from torch import nn
        def build(num_classes=10):
            return nn.Sequential(nn.Flatten(), nn.Linear(12, num_classes))
        def no_classes():
            return nn.Linear(3, 2)
        def not_a_model():
            return 42
    """))
    model = create_model(f"{f}:build", num_classes=4)
    assert model(torch.randn(2, 3, 2, 2)).shape == (2, 4)
    assert model.slimkit_base["spec"] == f"{f}:build"
    assert isinstance(create_model(f"{f}:no_classes"), nn.Linear)
    with pytest.raises(SlimkitError, match="does not accept num_classes"):
        create_model(f"{f}:no_classes", num_classes=3)
    with pytest.raises(SlimkitError, match="not a torch.nn.Module"):
        create_model(f"{f}:not_a_model")
    with pytest.raises(SlimkitError, match="defines no public builder function 'missing'"):
        create_model(f"{f}:missing")
    with pytest.raises(SlimkitError, match="model file not found"):
        create_model(f"{tmp_path}/nope.py:build")


def test_weights_report_mismatches_by_name(tmp_path):
    model = create_model("resnet20")
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "best_prec1": 1.0}, tmp_path / "ok.th")
    other = create_model("resnet20", weights=str(tmp_path / "ok.th"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))

    with pytest.raises(SlimkitError, match=r"missing keys: layer1\.3\.conv1\.weight, .* and 54 more"):
        load_weights(create_model("resnet32"), tmp_path / "ok.th")
    with pytest.raises(SlimkitError, match=r"shape mismatch: linear\.weight \(10, 64\) vs model \(5, 64\)"):
        create_model("resnet20", num_classes=5, weights=str(tmp_path / "ok.th"))
    (tmp_path / "junk.th").write_bytes(b"not a checkpoint")
    with pytest.raises(SlimkitError, match="junk.th: not a loadable weights file"):
        create_model("resnet20", weights=str(tmp_path / "junk.th"))
    with pytest.raises(SlimkitError, match="weights file not found"):
        create_model("resnet20", weights=str(tmp_path / "absent.th"))


def test_weights_loading_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": {"x": Evil()}}, tmp_path / "evil.th")
    with pytest.raises(SlimkitError, match="safe loading refused"):
        create_model("resnet20", weights=str(tmp_path / "evil.th"))


@pytest.mark.parametrize("name,path", [("resnet20", RESNET20), ("resnet56", RESNET56)])
def test_reference_checkpoints_load(name, path):
    model = create_model(name, weights=need(path))
    raw = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(model.linear.weight, raw["module.linear.weight"])
