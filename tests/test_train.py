import os

import pytest
import torch
from torch import nn

from slimkit import SlimkitError, create_model
from slimkit.data import load
from slimkit.train import Batch, evaluate, fit


@pytest.fixture(scope="module")
def digits():
    return load("digits", seed=0)


class Killed(Exception):
    pass


@pytest.mark.parametrize("optimizer,schedule", [("sgd", "cosine"), ("yogi", "onecycle"), ("accelegrad", "constant"),
                                                ("adamw", "onecycle")])
def test_resume_after_kill_is_identical(tmp_path, digits, optimizer, schedule):
    lr = {"sgd": 0.05, "yogi": 0.01, "accelegrad": 0.5, "adamw": 0.003}[optimizer]
    kwargs = dict(epochs=4, optimizer=optimizer, lr=lr, schedule=schedule, seed=3, progress=False)

    torch.manual_seed(0)
    full = create_model("digits_cnn")
    full_log = fit(full, digits.loader("train", 64, seed=3), checkpoint_dir=str(tmp_path / "full"), **kwargs)

    def kill_after_two(epoch, record):
        if epoch == 2:
            raise Killed

    torch.manual_seed(0)
    part = create_model("digits_cnn")
    with pytest.raises(Killed):
        fit(part, digits.loader("train", 64, seed=3), checkpoint_dir=str(tmp_path / "part"),
            on_epoch_end=kill_after_two, **kwargs)
    resumed = create_model("digits_cnn")  # a fresh process would start from fresh weights
    log = fit(resumed, digits.loader("train", 64, seed=3), checkpoint_dir=str(tmp_path / "part"), **kwargs)

    assert [r["epoch"] for r in log.epochs] == [1, 2, 3, 4]
    assert [r["loss"] for r in log.epochs] == [r["loss"] for r in full_log.epochs]
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert not [f for f in os.listdir(tmp_path / "part") if ".tmp" in f]


def test_fit_learns_digits_and_evaluate_reports_fractions(digits):
    model = create_model("digits_cnn")
    before = evaluate(model, digits.loader("test", 256))
    log = fit(model, digits.loader("train", 64), epochs=8, lr=0.05, progress=False,
              val=digits.loader("val", 256))
    after = evaluate(model, digits.loader("test", 256))
    assert after["n"] == len(digits.test)
    assert after["top1"] > 0.9 > before["top1"]
    assert after["top1"] <= after["top5"] <= 1.0
    assert log.last["val_top1"] > 0.9 and log.last["images_per_s"] > 0


def test_extra_loss_terms_are_added_and_logged(digits):
    model = create_model("digits_cnn")
    seen = []

    def l1(batch: Batch) -> torch.Tensor:
        seen.append(batch.step)
        return 1e-3 * sum(p.abs().sum() for p in batch.model.parameters())

    log = fit(model, digits.loader("train", 128), epochs=1, lr=0.05, extra_losses={"l1": l1}, progress=False)
    assert seen == list(range(len(digits.loader("train", 128))))
    assert log.last["l1"] > 0

    # a term that grows weights' norm must change the result versus plain CE
    plain, pushed = create_model("digits_cnn"), create_model("digits_cnn")
    pushed.load_state_dict(plain.state_dict())
    fit(plain, digits.loader("train", 128), epochs=1, lr=0.05, progress=False)
    fit(pushed, digits.loader("train", 128), epochs=1, lr=0.05, progress=False,
        extra_losses={"shrink": lambda b: 1.0 * sum((p ** 2).sum() for p in b.model.parameters())})
    def norm(m):
        return sum((p ** 2).sum().item() for p in m.parameters())

    assert norm(pushed) < norm(plain)


def test_fit_input_errors(digits):
    with pytest.raises(SlimkitError, match="unknown optimizer 'sgdd'"):
        fit(create_model("digits_cnn"), digits.loader("train", 64), epochs=1, optimizer="sgdd", progress=False)
    with pytest.raises(SlimkitError, match="unknown schedule 'linear'"):
        fit(create_model("digits_cnn"), digits.loader("train", 64), epochs=1, schedule="linear", progress=False)


def test_checkpoint_of_another_model_is_refused(tmp_path, digits):
    fit(create_model("digits_cnn"), digits.loader("train", 256), epochs=1, progress=False,
        checkpoint_dir=str(tmp_path))
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(SlimkitError, match="does not match this model"):
        fit(other, digits.loader("train", 256), epochs=2, progress=False, checkpoint_dir=str(tmp_path))
