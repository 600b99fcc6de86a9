"""The fast subset of the architecture sweep (issue 22): real torchvision and timm CNNs through all four steps.

The whole sweep is ``benchmarks/sweep.py`` (docs/benchmarks.md); these are the families whose
constructs the channel graph had to learn: shuffles and chunks, grouped convs, ghost modules'
channel slices and timm's fused batch-norm + activation layers.
"""

import pytest

from slimkit.testing.sweep import STEPS, sweep_model

pytest.importorskip("timm")
pytest.importorskip("fvcore")


@pytest.mark.parametrize("spec", ["torchvision:shufflenet_v2_x0_5", "timm:ghostnet_050", "timm:regnetx_002",
                                  pytest.param("timm:mobilenetv3_small_050", marks=pytest.mark.slow),
                                  pytest.param("torchvision:regnet_y_400mf", marks=pytest.mark.slow),
                                  pytest.param("timm:rexnet_100", marks=pytest.mark.slow)])
def test_sweep_subset_passes_every_step(spec):
    row = sweep_model(spec, size=64)
    assert row.steps == {s: "ok" for s in STEPS}, row.steps
    assert row.facts["macs"] == row.facts["fvcore_macs"]
    assert row.facts["macs_ratio"] <= 0.5 and row.facts["prune_diff"] <= 1e-6


def test_sweep_names_what_fails():
    # cspnet splits its channels with sizes written in code: pruning still reaches the target elsewhere,
    # and the fixed split is named
    row = sweep_model("timm:cspresnet50", size=64, steps=("prune",))
    assert row.steps["prune"] == "ok"
    assert any("split into channel sizes fixed in code" in n for n in row.facts["prune_notes"])
    row = sweep_model("timm:not_a_model", steps=("profile",))
    assert "unknown timm model" in row.steps["build"]


def test_pruned_timm_layers_round_trip_and_cannot_grow(tmp_path):
    import json
    import warnings

    import torch
    from safetensors.torch import load_file, save_file

    import slimkit
    from slimkit import SlimkitError
    from slimkit.artifact import read_header
    from slimkit.prune import prune

    model = slimkit.create_model("timm:ghostnet_050", num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = prune(model, x, target_macs=0.5)
    path = slimkit.save(r.model, tmp_path / "g.safetensors")
    back = slimkit.load(path).eval()
    assert torch.equal(back(x), r.model.eval()(x))  # BatchNormAct2d / timm Linear resized, not rebuilt as torch.nn
    header = read_header(path)
    node = header["modules"]
    while "resized" not in node:
        node = next(c for c in node["children"].values() if "resized" in json.dumps(c))
    node["resized"] = {k: v * 1000 for k, v in node["resized"].items()}
    save_file(load_file(path), str(tmp_path / "big.safetensors"), metadata={"slimkit": json.dumps(header)})
    with pytest.raises(SlimkitError, match=r"field resized\.\w+: \d+ is not a width in 1\.\.\d+"):
        slimkit.load(str(tmp_path / "big.safetensors"))
