import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import CIFAR_JPEG, RESNET20, ROOT, need

import slimkit
from slimkit.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_bad_input_gives_one_clear_line(capsys, tmp_path):
    cases = [
        (["eval", "resnet21", "--data", "digits"], "unknown model 'resnet21'"),
        (["eval", "digits_cnn", "--data", "mnist"], "mnist"),
        (["eval", "digits_cnn", "--data", f"cifar10:{tmp_path}/nope"], "nope"),
        (["eval", "digits_cnn", "--weights", str(tmp_path / "w.th"), "--data", "digits"], "weights file not found"),
        (["eval", "resnet20", "--data", "digits"], "cannot take input of shape (1, 8, 8)"),
        (["eval", "digits_cnn", "--num-classes", "3", "--data", "digits"],
         "predicts 3 classes but dataset digits has 10"),
        (["info", str(tmp_path / "x.safetensors")], "artifact not found"),
        (["compress", "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path)], "recipe not found"),
    ]
    torch.save({"state_dict": {"module.fc.weight": torch.zeros(2, 2)}}, tmp_path / "wrong.th")
    cases.append((["eval", "digits_cnn", "--weights", str(tmp_path / "wrong.th"), "--data", "digits"],
                  "does not fit the model (missing keys: features.0.weight"))
    for argv, expected in cases:
        code, out, err = run(capsys, *argv, "--json")
        assert code == 2, argv
        assert out == "", argv
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("slimkit: error: ") and expected in lines[0], (argv, err)


def test_recipe_errors_name_the_problem(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    for body, expected in [("model: digits_cnn\ndata: digits\nstages:\n  - method: prunee\n", "unknown stage 'prunee'"),
                           ("model: digits_cnn\ndata: digits\nepochs: 3\n", "unknown key(s) ['epochs']"),
                           ("model: [digits_cnn\n", "not valid YAML"),
                           ("data: digits\n", "'model' must be given")]:
        recipe.write_text(body)
        code, out, err = run(capsys, "compress", "--recipe", str(recipe), "--out", str(tmp_path / "o"))
        assert code == 2 and expected in err, (body, err)


def test_train_eval_info_compress_json(capsys, tmp_path):
    code, out, _ = run(capsys, "train", "digits_cnn", "--data", "digits", "--epochs", "6", "--lr", "0.1",
                       "--out", str(tmp_path / "t"), "--json")
    assert code == 0
    trained = json.loads(out)
    assert len(trained["epochs"]) == 6 and trained["test"]["top1"] > 0.8
    artifact = trained["artifact"]

    code, out, _ = run(capsys, "eval", artifact, "--data", "digits", "--json")
    ev = json.loads(out)
    assert code == 0 and set(ev) >= {"top1", "top5", "n"} and ev["top1"] == trained["test"]["top1"]

    code, out, _ = run(capsys, "info", artifact, "--json")
    info = json.loads(out)
    assert info["history"][0]["stage"] == "train" and info["artifact_bytes"] == os.path.getsize(artifact)

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": artifact, "data": "digits", "stages": [
        {"method": "finetune", "epochs": 1, "lr": 0.01}]}))
    code, out, _ = run(capsys, "compress", "--recipe", str(recipe), "--out", str(tmp_path / "c"), "--json")
    report = json.loads(out)
    assert code == 0 and [s["stage"] for s in report["steps"]] == ["input", "finetune"]
    assert report["steps"][0]["metrics"]["test_top1"] == pytest.approx(trained["test"]["top1"])
    with open(tmp_path / "c" / "report.json") as f:
        assert json.load(f)["artifact_bytes"] == os.path.getsize(tmp_path / "c" / "model.safetensors")
    code, out, _ = run(capsys, "info", str(tmp_path / "c" / "model.safetensors"), "--json")
    assert [s["stage"] for s in json.loads(out)["history"]] == ["train", "finetune"]


def test_entry_point_exit_code():
    exe = os.path.join(os.path.dirname(sys.executable), "slimkit")
    if not os.path.exists(exe):
        pytest.skip("slimkit is not installed as a command in this environment")
    proc = subprocess.run([exe, "eval", "resnet21", "--data", "digits"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "slimkit: error: unknown model 'resnet21' (known: " + proc.stderr.split("(known: ")[1].strip())
    assert "Traceback" not in proc.stderr


def test_reference_resnet20_accuracy_on_cifar_jpeg_subset(capsys):
    need(CIFAR_JPEG)
    code, out, _ = run(capsys, "eval", "resnet20", "--weights", need(RESNET20), "--data", f"cifar10:{CIFAR_JPEG}",
                       "--limit", "2000", "--json")
    result = json.loads(out)
    assert code == 0 and result["n"] == 2000
    assert result["top1"] >= 0.78


def test_recipe_stage_recovers_by_distillation_from_the_pre_stage_model(capsys, tmp_path):
    """`finetune: {distill: kd}` teaches the pruned model with the model as it was before the stage."""
    code, out, _ = run(capsys, "train", "digits_cnn", "--data", "digits", "--epochs", "6", "--lr", "0.1",
                       "--out", str(tmp_path / "t"), "--json")
    artifact = json.loads(out)["artifact"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": artifact, "data": "digits", "stages": [
        {"method": "prune", "criterion": "l1", "target_macs": 0.5, "round_to": 4,
         "finetune": {"distill": "kd", "epochs": 1, "lr": 0.01}}]}))
    code, out, _ = run(capsys, "compress", "--recipe", str(recipe), "--out", str(tmp_path / "c"), "--json")
    report = json.loads(out)
    assert code == 0
    pruned = report["steps"][1]
    assert pruned["metrics"]["macs"] <= 0.5 * report["steps"][0]["metrics"]["macs"]
    assert pruned["finetune"]["distill"] == "kd" and pruned["details"]["kept"]
    assert os.path.isdir(tmp_path / "c" / "stages" / "01-distill")
    assert report["steps"][0]["metrics"]["test_top1"] > 0.9
    assert pruned["metrics"]["test_top1"] > 0.75  # one epoch of KD recovers most of a 2x MAC cut


def test_recipe_stage_distills_from_a_named_teacher(capsys, tmp_path):
    """`finetune: {distill: kd, teacher: PATH}` teaches with that model: a random teacher teaches badly."""
    code, out, _ = run(capsys, "train", "digits_cnn", "--data", "digits", "--epochs", "6", "--lr", "0.1",
                       "--out", str(tmp_path / "t"), "--json")
    artifact = json.loads(out)["artifact"]
    torch.manual_seed(0)
    random_teacher = tmp_path / "random.pt"
    torch.save(slimkit.create_model("digits_cnn", num_classes=10).state_dict(), random_teacher)
    tops = {}
    for name, extra in (("own", {}), ("random", {"teacher": "digits_cnn", "teacher_weights": str(random_teacher)})):
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump({"model": artifact, "data": "digits", "stages": [
            {"method": "prune", "criterion": "l1", "target_macs": 0.5, "round_to": 4,
             "finetune": {"distill": "kd", "epochs": 1, "lr": 0.01, **extra}}]}))
        code, out, _ = run(capsys, "compress", "--recipe", str(recipe), "--out", str(tmp_path / name), "--json")
        assert code == 0
        tops[name] = json.loads(out)["steps"][1]["metrics"]["test_top1"]
    assert tops["own"] > tops["random"] + 0.1  # alpha 0.9 of the loss follows a teacher that knows nothing
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({"model": artifact, "data": "digits", "stages": [
        {"method": "prune", "criterion": "l1", "target_macs": 0.5, "finetune": {"teacher": "digits_cnn"}}]}))
    code, _, err = run(capsys, "compress", "--recipe", str(recipe), "--out", str(tmp_path / "bad"))
    assert code != 0 and "finetune.teacher goes with finetune.distill" in err
