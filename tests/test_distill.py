import argparse
import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimkit
from slimkit.distill import (
    METHODS,
    OneNetwork,
    at_loss,
    attention_map,
    distill_terms,
    factor_loss,
    fsp_matrix,
    kd_loss,
    logit_mse,
    moonshine_student,
    munge,
    munge_loader,
    one_loss,
    pair_features,
)
from slimkit.errors import SlimkitError
from slimkit.models.small import DigitsCNN
from slimkit.train import fit
from slimkit.train.engine import Batch

torch.set_num_threads(1)


def _softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def test_registry_names():
    assert METHODS.names() == sorted(["kd", "logits", "fitnet", "at", "fsp", "ft", "one", "moonshine", "munge"])


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.5]])
    T = 2.0
    total = 0.0
    for i in range(2):
        ps = _softmax([v / T for v in s[i].tolist()])
        pt = _softmax([v / T for v in t[i].tolist()])
        total += sum(pt[j] * (math.log(pt[j]) - math.log(ps[j])) for j in range(3))
    expected = T * T * total / 2  # batchmean
    assert kd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-6)


def test_kd_terms_give_hintons_weighted_average():
    torch.manual_seed(0)
    teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    terms = distill_terms("kd", teacher, student, x, T=3.0, alpha=0.7)
    logits = student(x)
    batch = Batch(student, x, y, logits, 0, 0)
    total = F.cross_entropy(logits, y) + sum(term(batch) for term in terms.values())
    with torch.no_grad():
        t = teacher(x)
    expected = 0.3 * F.cross_entropy(logits, y) + 0.7 * kd_loss(logits, t, 3.0)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    terms.close()


def test_logit_mse_by_hand():
    s = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    t = torch.tensor([[0.0, 2.5], [1.0, 1.0]])
    expected = ((1 - 0) ** 2 + (2 - 2.5) ** 2 + (3 - 1) ** 2 + (-1 - 1) ** 2) / 4
    assert logit_mse(s, t).item() == pytest.approx(expected)


def test_attention_map_and_at_loss_by_hand():
    # one sample, two channels, 2x2 map
    a = torch.tensor([[[[1.0, 0.0], [2.0, 1.0]], [[1.0, 3.0], [0.0, -1.0]]]])
    q = [(1 + 1) / 2, (0 + 9) / 2, (4 + 0) / 2, (1 + 1) / 2]  # mean over channels of squares
    norm = math.sqrt(sum(v * v for v in q))
    assert attention_map(a).flatten().tolist() == pytest.approx([v / norm for v in q])
    b = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])  # one channel
    qb = [0.0, 1.0, 1.0, 1.0]
    nb = math.sqrt(3)
    expected = sum((q[i] / norm - qb[i] / nb) ** 2 for i in range(4)) / 4
    assert at_loss(a, b).item() == pytest.approx(expected, rel=1e-6)


def test_fsp_matrix_by_hand():
    torch.manual_seed(0)
    f1, f2 = torch.randn(2, 2, 3, 3), torch.randn(2, 4, 3, 3)
    g = fsp_matrix(f1, f2)
    assert g.shape == (2, 2, 4)
    for n in range(2):
        for i in range(2):
            for j in range(4):
                v = sum(f1[n, i, s, t].item() * f2[n, j, s, t].item() for s in range(3) for t in range(3)) / 9
                assert g[n, i, j].item() == pytest.approx(v, abs=1e-5)
    # a larger first map is average-pooled to the second's size
    big = torch.randn(1, 2, 6, 6)
    assert torch.allclose(fsp_matrix(big, f2[:1]), fsp_matrix(F.avg_pool2d(big, 2), f2[:1]), atol=1e-6)


def test_factor_loss_by_hand():
    s, t = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]])
    assert factor_loss(s, t).item() == pytest.approx((abs(0.6 - 1) + abs(0.8 - 0)) / 2)


def _digits_pair():
    torch.manual_seed(0)
    return DigitsCNN(width=32), DigitsCNN(width=16)


@pytest.mark.parametrize("method", ["kd", "logits", "fitnet", "at", "fsp", "ft", "at+kd"])
def test_teacher_untouched_by_training(method):
    teacher, student = _digits_pair()
    teacher.train()  # distill_terms must switch it to eval (else BN statistics would move)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    before = copy.deepcopy(teacher.state_dict())
    s_before = copy.deepcopy(student.state_dict())
    opts = {"loader": [(x, y)], "max_batches": 1} if method == "ft" else {}
    with distill_terms(method, teacher, student, x, **opts) as terms:
        fit(student, [(x, y)], epochs=1, lr=0.05, extra_losses=terms, progress=False)
    assert not teacher.training
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p in teacher.parameters():
        assert p.grad is None and not p.requires_grad
    assert any(not torch.equal(v, s_before[k]) for k, v in student.state_dict().items() if v.is_floating_point())
    assert set(student.state_dict()) == set(s_before)  # the auxiliary modules are gone again


def test_teacher_sharing_parameters_is_refused():
    model = DigitsCNN()
    with pytest.raises(SlimkitError, match="shares parameters"):
        distill_terms("kd", model, model, torch.randn(2, 1, 8, 8))


def test_unknown_option_is_refused():
    with pytest.raises(SlimkitError, match="unknown option"):
        distill_terms("kd", DigitsCNN(), DigitsCNN(), torch.randn(2, 1, 8, 8), temperature=3)


def test_automatic_pairing_resnet56_to_resnet20():
    teacher, student = slimkit.create_model("resnet56"), slimkit.create_model("resnet20")
    pairs = pair_features(teacher, student, torch.randn(1, 3, 32, 32))
    assert [(p.teacher, p.student) for p in pairs] == [("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3")]
    assert [p.teacher_shape[1:] for p in pairs] == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
    named = pair_features(teacher, student, torch.randn(1, 3, 32, 32), "layer2.8:layer2.2")
    assert [(p.teacher, p.student) for p in named] == [("layer2.8", "layer2.2")]
    with pytest.raises(SlimkitError, match="same size"):
        pair_features(teacher, student, torch.randn(1, 3, 32, 32), {"layer1": "layer3"})


def test_automatic_pairing_errors_when_no_stage_matches():
    teacher = slimkit.create_model("resnet20")
    student = nn.Sequential(nn.Conv2d(3, 8, 3, stride=3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(8, 10))
    with pytest.raises(SlimkitError) as err:
        distill_terms("at", teacher, student, torch.randn(2, 3, 32, 32))
    msg = str(err.value)
    assert "no stages of equal spatial size" in msg and "32x32 (layer1)" in msg and "8x8 (layer3)" in msg
    assert "10x10 (1)" in msg


def test_fitnet_adapters_are_optimised():
    teacher, student = _digits_pair()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    terms = distill_terms("fitnet", teacher, student, x)
    adapters = terms.methods[0].aux
    assert len(adapters) == 2 and [a.weight.shape[:2] for a in adapters.values()] == [(64, 32), (128, 64)]
    assert all(any(p is q for q in student.parameters()) for p in adapters.parameters())  # attached to the student
    before = [a.weight.detach().clone() for a in adapters.values()]
    fit(student, [(x, y)], epochs=1, lr=0.05, extra_losses=terms, progress=False)
    assert all(not torch.equal(a.weight, b) for a, b in zip(adapters.values(), before))
    terms.close()
    assert "distill_aux" not in dict(student.named_children())


def test_one_gate_and_ensemble_shapes():
    torch.manual_seed(0)
    net = OneNetwork("resnet20", branches=3)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    net.eval()
    z = net(x)
    assert z.shape == (4, 10)
    assert net.last_gate.shape == (4, 3) and torch.allclose(net.last_gate.sum(1), torch.ones(4))
    assert net.last_branch_logits.shape == (4, 3, 10)
    assert torch.allclose(z, (net.last_gate[:, :, None] * net.last_branch_logits).sum(1), atol=1e-6)
    assert not torch.equal(net.branches[0]["linear"].weight, net.branches[1]["linear"].weight)
    single = net.extract(2).eval()
    assert type(single).__name__ == "CifarResNet"
    assert torch.allclose(single(x), net.last_branch_logits[:, 2], atol=1e-5)
    terms = distill_terms("one", None, net, x, T=3.0)
    batch = Batch(net, x, y, z, 0, 0)
    zs = net.last_branch_logits
    expected = sum(F.cross_entropy(zs[:, i], y) + kd_loss(zs[:, i], z, 3.0) for i in range(3))  # kd_loss has the T^2
    assert terms["one"](batch).item() == pytest.approx(expected.item(), rel=1e-5)
    assert one_loss(zs, z, y, 3.0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_moonshine_keeps_shapes_and_cuts_parameters():
    from slimkit.transform.methods import TRANSFORMS, LayerInfo

    teacher = slimkit.create_model("resnet20").eval()
    student = moonshine_student(teacher, groups=4).eval()
    x = torch.randn(2, 3, 32, 32)
    assert student(x).shape == teacher(x).shape
    convs = [m for n, m in teacher.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels % 4 == 0]
    assert len(convs) == 18 and len(student.slimkit_last_moonshine["replaced"]) == 18
    saved = sum(9 * c.in_channels * c.out_channels - (9 * c.in_channels * c.out_channels // 4 + c.out_channels ** 2)
                for c in convs)
    n_t, n_s = (sum(p.numel() for p in m.parameters()) for m in (teacher, student))
    assert n_s == n_t - saved
    for rec in student.slimkit_last_moonshine["replaced"]:
        conv = teacher.get_submodule(rec["name"])
        if conv.in_channels == conv.out_channels:  # the G(4)+pointwise factor (9/G + 1) / 9 of a square conv
            assert rec["params_after"] / rec["params_before"] == pytest.approx((9 / 4 + 1) / 9)
    # the teacher-initialised block reproduces slimkit.transform's grouped_shuffle replacement exactly
    built = TRANSFORMS.get("grouped_shuffle").build(teacher.layer2[1].conv1, None, LayerInfo(),
                                                    {"groups": 4, "refine": False})
    h = torch.randn(2, 32, 16, 16)
    assert torch.allclose(student.layer2[1].conv1(h), built(h), atol=1e-5)
    assert isinstance(teacher.layer2[1].conv1, nn.Conv2d)  # the teacher is untouched
    terms = distill_terms("moonshine", teacher, student, x)
    assert [p.student for p in terms.methods[0].pairs] == ["layer1", "layer2", "layer3"]
    terms.close()


def test_munge_shapes_labels_and_changes():
    torch.manual_seed(0)
    x = torch.randn(20, 1, 4, 4)
    out = munge(x, multiplier=2, p=0.5, s=1.0, seed=1)
    assert out.shape == (40, 1, 4, 4)
    orig = torch.cat([x, x])
    changed = (out != orig)
    assert changed.any(dim=(1, 2, 3)).all()  # every synthetic sample differs from its original
    assert 0.3 < changed.float().mean().item() < 0.7  # about p of the pixels swapped
    assert torch.equal(munge(x, p=0.0), x)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    loader = munge_loader(teacher, [(x[:10], torch.zeros(10)), (x[10:], torch.zeros(10))], multiplier=1,
                          batch_size=8, seed=0)
    assert len(loader.y) == 40 and len(loader) == 5
    with torch.no_grad():
        assert torch.equal(loader.y, teacher(loader.x).argmax(1))
    assert torch.equal(loader.x[:20], x)


def _cli_args(argv):
    from slimkit.distill.cli import add_distill_args

    p = argparse.ArgumentParser()
    p.add_argument("--json", action="store_true")
    p.add_argument("--threads", type=int)
    add_distill_args(p)
    return p.parse_args(argv)


def test_cli_distill_end_to_end_on_digits(tmp_path, capsys):
    from slimkit.data import load
    from slimkit.distill.cli import cli_distill
    from slimkit.train import evaluate

    torch.manual_seed(3)
    teacher = slimkit.create_model("digits_cnn", num_classes=10)
    weights = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), weights)
    out = tmp_path / "run"
    result = cli_distill(_cli_args(["--teacher", "digits_cnn", "--teacher-weights", str(weights), "--student",
                                    "digits_cnn", "--method", "kd", "--data", "digits", "--epochs", "1", "--limit",
                                    "60", "--batch-size", "32", "--opt", "T=2", "--out", str(out), "--json"]))
    data = load("digits", limit=60, seed=0)
    mine = evaluate(teacher, data.loader("test", 32))
    # the loss too: two random nets often share a 10% top-1, never the cross-entropy
    assert result["teacher_top1"] == mine["top1"] and result["teacher_test"]["loss"] == pytest.approx(mine["loss"])
    loaded = slimkit.load(out / "model.safetensors")
    theirs = evaluate(loaded, data.loader("test", 32))
    assert result["student_top1"] == theirs["top1"] and result["student_test"]["loss"] == pytest.approx(theirs["loss"])
    assert loaded.slimkit_history[-1]["stage"] == "distill" and loaded.slimkit_history[-1]["params"]["T"] == 2
    assert set(result["epochs"][0]) >= {"kd", "ce_correction", "loss"}
    assert json.load(open(out / "report.json"))["student_top1"] == result["student_top1"]
    assert "distill_aux" not in dict(loaded.named_children())


def test_distill_stage_in_a_recipe(tmp_path):
    from slimkit.pipeline import run_recipe

    recipe = {"model": "digits_cnn", "data": "digits", "limit": 40, "batch_size": 32, "progress": False,
              "stages": [{"method": "distill", "distill": "at+kd", "teacher": "digits_cnn", "epochs": 1, "lr": 0.01,
                          "temperature": 2.0}]}
    with pytest.raises(SlimkitError, match="unknown option"):
        run_recipe(recipe, str(tmp_path / "bad"), log=lambda m: None)
    recipe["stages"][0]["T"] = recipe["stages"][0].pop("temperature")
    report = run_recipe(recipe, str(tmp_path / "ok"), log=lambda m: None)
    assert report["steps"][-1]["stage"] == "distill"
    loaded = slimkit.load(report["artifact"])
    assert set(loaded.state_dict()) == set(slimkit.create_model("digits_cnn").state_dict())
    assert os.path.exists(tmp_path / "ok" / "stages" / "01-distill" / "last.pt")


def _tiny_cifar_context(tmp_path, n=24):
    from slimkit.data.core import Dataset, DatasetInfo, Split
    from slimkit.pipeline import Context

    g = torch.Generator().manual_seed(0)
    split = lambda: Split(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),  # noqa: E731
                          torch.arange(n) % 10)
    info = DatasetInfo("fake", 10, (3, 32, 32), (0.5,) * 3, (0.25,) * 3, tuple(str(i) for i in range(10)))
    return Context(data=Dataset(info, "fake", split(), split(), split()), out_dir=str(tmp_path), batch_size=12,
                   progress=False)


def test_one_and_moonshine_stages(tmp_path):
    from slimkit.pipeline import get_stage

    stage = get_stage("distill")
    torch.manual_seed(0)
    model = slimkit.create_model("resnet20")
    ctx = _tiny_cifar_context(tmp_path)
    out = stage(model, ctx, distill="one", branches=2, epochs=1, lr=0.01, T=3.0)
    assert type(out).__name__ == "CifarResNet" and len(ctx.details["branch_top1"]) == 2
    assert ctx.details["kept_branch"] == max(range(2), key=ctx.details["branch_top1"].__getitem__)
    assert not torch.equal(out.layer1[0].conv1.weight, model.layer1[0].conv1.weight)  # it was trained
    ctx.details = {}
    ctx.stage_index = 2
    before = sum(p.numel() for p in out.parameters())
    cheap = stage(out, ctx, distill="moonshine", groups=4, epochs=1, lr=0.01)
    assert len(ctx.details["moonshine"]["replaced"]) == 18
    assert sum(p.numel() for p in cheap.parameters()) < 0.4 * before


def test_ft_pretrains_paraphraser_and_trains_translator():
    teacher, student = _digits_pair()
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    with pytest.raises(SlimkitError, match="paraphraser"):
        distill_terms("ft", teacher, student, x)
    terms = distill_terms("ft", teacher, student, x, loader=[(x, y)] * 4, paraphraser_epochs=3, paraphraser_lr=0.05)
    ft = terms.methods[0]
    assert (ft.pairs[0].teacher, ft.pairs[0].student) == ("features.9", "features.9")
    assert len(ft.paraphraser_log) == 3 and ft.paraphraser_log[-1] < ft.paraphraser_log[0]
    assert all(not p.requires_grad for p in ft.paraphraser.parameters()) and not ft.paraphraser.training
    assert ft.paraphraser.encoder[-3].out_channels == 64  # rate 0.5 of the teacher's 128 channels
    frozen = copy.deepcopy(ft.paraphraser.state_dict())
    before = [p.detach().clone() for p in ft.aux["translator"].parameters()]
    fit(student, [(x, y)], epochs=1, lr=0.05, extra_losses=terms, progress=False)
    assert any(not torch.equal(p, b) for p, b in zip(ft.aux["translator"].parameters(), before))
    assert all(torch.equal(v, frozen[k]) for k, v in ft.paraphraser.state_dict().items())
    terms.close()
