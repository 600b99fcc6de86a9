"""The search under a size budget: per-layer weight densities and codebook bits (Deep Compression's stages,
searched), the packed file's bytes on disk as the budget, the final retrain holding masks and codebooks."""

import json
import os
import subprocess
import sys

import pytest
import torch

import slimkit
from slimkit.errors import SlimkitError
from slimkit.search import PruningSpace, SearchConfig, search
from slimkit.search.problems import PruningProblem
from slimkit.search.space import weight_stages
from slimkit.sparse.masks import prunable_layers


def quiet(_):
    pass


def _density(m) -> float:
    return float((m.weight != 0).float().mean())


def test_the_weight_spaces_give_each_layer_a_density_and_a_codebook_the_candidate_follows(digits_model):
    model, data = digits_model
    example = torch.zeros(1, 1, 8, 8)
    space = PruningSpace(model, example, blocks=True, channels=False, sparsity=True, share=True).build(
        data.loader("val", 64))
    layers = [n for n, _ in prunable_layers(model)]
    kinds = {d.name: d.kind for d in space.dimensions}
    assert [k for k in kinds if k.startswith("density:")] == [f"density:{n}" for n in layers]
    assert {kinds[f"codebook:{n}"] for n in layers} == {"bits"}
    # the smallest policy: every density and codebook at its floor (bits count down, not up like blocks)
    small = space.smallest()
    assert small["density:conv1"] == pytest.approx(0.05) and small["codebook:linear"] == 2

    policy = space.uniform(1.0, 0) | {"density:layer2.0.conv1": 0.3, "codebook:layer2.0.conv1": 3,
                                      "density:linear": 0.5, "codebook:linear": 8, "blocks:layer3": 1}
    cand = space.apply(policy)
    mods = dict(cand.named_modules())
    gone = space.block_order["layer3"][0].name
    assert f"{gone}.conv1" not in mods  # a removed block's layers are gone, and so are their dimensions' effect
    w = mods["layer2.0.conv1"].weight
    assert _density(mods["layer2.0.conv1"]) == pytest.approx(0.3, abs=1.0 / w.numel())
    assert len(w[w != 0].unique()) <= 2**3
    lw = mods["linear"].weight
    assert _density(mods["linear"]) == pytest.approx(0.5, abs=1.0 / lw.numel()) and len(lw[lw != 0].unique()) <= 256
    assert mods["conv1"].weight.unique().numel() <= 2**4 + 1  # uniform's codebooks: 4 bits and the zero
    assert space.model is model and _density(model.layer2[0].conv1) == 1.0  # a copy: the original keeps its weights

    # with hold, masks and codebooks stay attached: a training step moves the centroids, keeps zeros zero and
    # codes shared; baked afterwards, every layer is a plain trainable one again
    from slimkit.sparse import bake_shared

    held = space.apply(policy, hold=True)
    conv = dict(held.named_modules())["layer2.0.conv1"]
    before = conv.weight.detach().clone()
    zeros = before == 0
    opt = torch.optim.SGD([p for p in held.parameters() if p.requires_grad], lr=0.5)
    held.train()
    held(torch.randn(8, 1, 8, 8)).square().mean().backward()
    opt.step()
    after = conv.weight.detach()
    assert not torch.equal(after, before)
    assert torch.equal(after == 0, zeros) and len(after[~zeros].unique()) <= 2**3
    bake_shared(held)
    from torch.nn.utils import parametrize

    for name, m in prunable_layers(held):
        assert not parametrize.is_parametrized(m) and m.weight.requires_grad, name
    assert torch.equal(conv.weight.detach(), after)

    # a worker rebuilds the same space from its description
    again = PruningSpace.from_description(model, example, space.describe())
    assert [d.name for d in again.dimensions] == [d.name for d in space.dimensions]


def test_weight_stages_alone_prune_by_magnitude_per_layer():
    m = weight_stages(slimkit.create_model("digits_resnet").eval(), {"conv1": 0.25}, {})
    w = m.conv1.weight.detach()
    kept = w[w != 0].abs()
    assert _density(m.conv1) == pytest.approx(0.25, abs=1.0 / w.numel())
    assert float(kept.min()) >= float(w[w == 0].abs().max())  # the kept are the largest (the zeros were smaller)


def test_a_size_budget_search_meets_the_packed_bytes_and_the_retrain_keeps_the_policy(digits_model, tmp_path):
    from slimkit.search.evaluate import file_bytes

    model, data = digits_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = SearchConfig(target_size=0.06, space=("sparsity", "share"), trials=8, warm_start=("uniform", "sensitivity"),
                       calib_batches=1, val_batches=1, finetune_epochs=2, runtime="onnxruntime")
    lines = []
    r = search(model, "digits", cfg, str(tmp_path), limit=300, data=data, log=lines.append)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in model.parameters())  # the KD teacher froze a copy, not the caller's model
    assert r["cost_key"] == "size_ratio"
    assert any("--trial-steps 0" in ln for ln in lines)  # the untuned proxy is named as the weak point it is
    # Deep Compression's retrain: one epoch with the masks held, then one training only the centroids
    assert any("1 epochs with KD from the original, with its masks held" in ln for ln in lines)
    assert any("1 epochs with KD from the original, training the codebooks' centroids only" in ln for ln in lines)
    assert {w["warm_start"] for w in r["warm_starts"]} == {"uniform", "sensitivity"}
    assert r["chosen"]["size_ratio"] <= 0.06 and r["chosen"]["bytes"] > 0
    final = r["final"]
    # the budget holds on the file written, measured on disk against the original's artifact
    packed = tmp_path / "model.slimpack"
    assert final["bytes_packed"] == os.path.getsize(packed)
    assert final["size_ratio"] == pytest.approx(os.path.getsize(packed) / file_bytes(model))
    # trials fit 0.95 of the budget, the margin the retrain's new Huffman statistics take: the file meets it
    assert r["chosen"]["size_ratio"] <= 0.95 * 0.06
    assert final["meets_size_budget"] is True and final["size_ratio"] <= 0.06
    assert final["int8"]["used"] is False
    # the retrain held the policy: each layer as sparse as its density says, its non-zeros in 2**bits values
    policy = r["chosen"]["policy"]
    art = slimkit.load(r["artifact"]).eval()
    applied = PruningProblem(job_doc := json.load(open(tmp_path / "search.json")), model=model, data=data).space.apply(
        policy)
    untrained = dict(applied.named_modules())
    moved = 0
    for name, m in prunable_layers(art):
        w = m.weight.detach()
        assert _density(m) == pytest.approx(policy[f"density:{name}"], abs=1.0 / w.numel()), name
        assert len(w[w != 0].unique()) <= 2 ** policy[f"codebook:{name}"], name
        moved += not torch.equal(w, untrained[name].weight.detach())
    assert moved  # the retrain trained the shared values
    assert final["sparsity"] > 0.3
    # the packed file is the same model
    x = torch.randn(4, 1, 8, 8)
    assert torch.allclose(slimkit.load(str(packed)).eval()(x), art(x), atol=1e-5)
    assert "size_ratio" in open(tmp_path / "results.md").read()
    assert job_doc["fingerprint"]["budget"][-1] == 0.06 and "size0.06" in job_doc["study"]


def test_pruned_channels_with_codebooks_train_their_weights_before_the_codebooks(digits_model, tmp_path):
    model, data = digits_model
    cfg = SearchConfig(target_size=0.12, space=("prune", "share"), trials=4, warm_start=("uniform",),
                       calib_batches=1, val_batches=1, finetune_epochs=1)
    lines = []
    r = search(model, "digits", cfg, str(tmp_path), limit=300, data=data, log=lines.append)
    policy = r["chosen"]["policy"]
    # one epoch: all of it for the cut network's weights, the codebooks clustered after without a centroid epoch
    assert any("fine-tuning 1 epochs with KD from the original" in ln and "centroids" not in ln for ln in lines)
    assert any("without a centroid fine-tune" in ln for ln in lines)
    art = slimkit.load(r["artifact"]).eval()
    for name, m in prunable_layers(art):
        w = m.weight.detach()
        assert len(w[w != 0].unique()) <= 2 ** policy[f"codebook:{name}"], name
    assert r["final"]["size_ratio"] <= 0.12


def test_an_unreachable_size_budget_names_the_smallest_file_and_weight_spaces_need_a_size_budget(digits_model,
                                                                                                  tmp_path):
    model, data = digits_model
    cfg = SearchConfig(target_size=0.001, space=("sparsity",), trials=2, finetune_epochs=0)
    with pytest.raises(SlimkitError, match=r"size budget 0.001 is out of reach: the smallest policy of this space "
                                           r"packs into [\d,]+ bytes"):
        search(model, "digits", cfg, str(tmp_path), limit=300, data=data, log=quiet)
    with pytest.raises(SlimkitError, match="needs a size budget"):
        SearchConfig(target_macs=0.5, space=("prune", "sparsity"))
    with pytest.raises(SlimkitError, match="one or the other"):
        SearchConfig(target_latency=0.5, target_size=0.1, space=("bits", "share"))
    with pytest.raises(SlimkitError, match="not with sparsity or share"):
        SearchConfig(target_size=0.1, space=("sparsity",), quantize="always")
    with pytest.raises(SlimkitError, match="use one process"):
        SearchConfig(target_size=0.1, space=("share",), finetune_procs=2)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "slimkit.cli", "search", *args], capture_output=True, text=True,
                          timeout=600)


def test_the_cli_searches_a_size_budget_and_refuses_weights_without_one(tmp_path):
    out = tmp_path / "s"
    r = cli("digits_resnet", "--data", "digits", "--limit", "200", "--target-size", "0.2", "--space", "sparsity",
            "--trials", "4", "--trial-steps", "2", "--calib-batches", "1", "--val-batches", "1", "--out", str(out),
            "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["final"]["size_ratio"] <= 0.2 and (out / "model.slimpack").exists()
    r = cli("digits_resnet", "--data", "digits", "--limit", "60", "--target-macs", "0.5", "--space", "share",
            "--out", str(tmp_path / "t"))
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "Warning" not in ln]
    assert r.returncode == 2 and len(lines) == 1 and "needs a size budget (--target-size)" in lines[0], r.stderr
