"""Faults lose nothing (issue 22): SIGKILL and restart, a full or read-only disk, NaN, two writers, bad images."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, cli, one_line_error
from safetensors.torch import load_file

import slimkit
from slimkit import SlimkitError


def _files(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


@contextlib.contextmanager
def _tmpfs(path, size: str = "64k", read_only: bool = False):
    os.makedirs(path, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.decode().strip() or 'mount failed'})")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


# -- a full disk and a read-only folder: one line, nothing partial ------------------------------------------

def test_disk_full_is_one_line_and_leaves_nothing(tmp_path):
    model = slimkit.create_model("digits_cnn")
    with _tmpfs(tmp_path / "full", "64k") as full:
        with pytest.raises(SlimkitError, match="No space left on device"):
            slimkit.save(model, os.path.join(full, "m.safetensors"))
        assert _files(full) == []
        line = one_line_error(*cli("export", "digits_cnn", "--out", os.path.join(full, "m.onnx"))[::2])
        assert "m.onnx" in line or "No space" in line
        assert _files(full) == []


def test_read_only_folder_is_one_line(tmp_path):
    with _tmpfs(tmp_path / "ro", read_only=True) as ro:
        with pytest.raises(SlimkitError, match="Read-only file system"):
            slimkit.save(slimkit.create_model("digits_cnn"), os.path.join(ro, "m.safetensors"))
        one_line_error(*cli("quantize", "digits_cnn", "--data", "digits", "--out", os.path.join(ro, "q"))[::2])


def test_a_failing_write_is_named_even_without_tmpfs(tmp_path, monkeypatch):
    # the same path where mounting is not allowed: the writer raises ENOSPC halfway
    import safetensors.torch as st

    def full(tensors, path, metadata=None):
        open(path, "wb").write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st, "save_file", full)
    with pytest.raises(SlimkitError, match=r"m.safetensors: cannot write \(No space left on device\)"):
        slimkit.save(slimkit.create_model("digits_cnn"), tmp_path / "m.safetensors")
    assert _files(tmp_path) == []


# -- two writers of one output ---------------------------------------------------------------------------------

def test_a_second_writer_of_the_same_out_is_refused(tmp_path):
    from slimkit.cli_args import OutputLock

    out = str(tmp_path / "run")
    with OutputLock(out):
        line = one_line_error(*cli("quantize", "digits_cnn", "--data", "digits", "--out", out)[::2])
        assert "is being written by another slimkit process" in line
        assert not os.path.exists(os.path.join(out, "model.safetensors"))
    code, _, err = cli("quantize", "digits_cnn", "--data", "digits", "--limit", "50", "--out", out)
    assert code == 0, err  # released: the next run proceeds


# -- NaN / Inf ---------------------------------------------------------------------------------------------------

def test_nan_in_training_names_epoch_step_and_layer():
    from slimkit.train import fit

    model = slimkit.create_model("digits_cnn")
    data = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(3)]
    data.append((torch.full((16, 1, 8, 8), 3e38), torch.zeros(16, dtype=torch.long)))  # finite, but overflows
    with pytest.raises(SlimkitError, match=r"NaN/Inf at epoch 1, step 4: first NaN/Inf in the output of layer "
                                           r"\S+ \(Conv2d\)") as e:
        fit(model, data, epochs=2, progress=False)
    assert "\n" not in str(e.value)


def test_nan_in_calibration_names_the_batch():
    from slimkit.quant import quantize

    bad = torch.randn(4, 1, 8, 8)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(SlimkitError, match="calibration: batch 2 holds NaN/Inf"):
        quantize(slimkit.create_model("digits_cnn").eval(), [torch.randn(4, 1, 8, 8), bad])


# -- SIGKILL at a random point, then the same command again ------------------------------------------------------

def _run_killed(cmd: list[str], out: str, watch: str, delay: float) -> None:
    """Start ``cmd``, SIGKILL it ``delay`` s after ``watch`` (a checkpoint) first appears under ``out``."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if any(watch in f for f in _files(out)) if os.path.isdir(out) else False:
            break
        time.sleep(0.05)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


def _tensors(path: str) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in load_file(path).items()}


@pytest.mark.parametrize("command,watch", [
    (["train", "digits_cnn", "--epochs", "4", "--lr", "0.05"], "checkpoint.pt"),
    (["prune", "digits_cnn", "--target-macs", "0.5", "--finetune-epochs", "4", "--lr", "0.02"], "checkpoint.pt"),
])
def test_killed_run_restarts_to_the_same_result(tmp_path, command, watch):
    base = [sys.executable, "-m", "slimkit.cli", *command, "--data", "digits", "--threads", "1"]
    ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
    assert subprocess.run(base + ["--out", ref], cwd=ROOT, capture_output=True).returncode == 0
    rng = np.random.default_rng(abs(hash(command[0])) % 2**32)
    _run_killed(base + ["--out", killed], killed, watch, float(rng.uniform(0.0, 0.5)))
    assert not any(os.path.basename(f).startswith(".tmp-") for f in _files(killed)), _files(killed)
    r = subprocess.run(base + ["--out", killed], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a, b = _tensors(os.path.join(ref, "model.safetensors")), _tensors(os.path.join(killed, "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # bit-identical


def test_killed_export_leaves_no_partial_file(tmp_path):
    out = str(tmp_path / "m.onnx")
    cmd = [sys.executable, "-m", "slimkit.cli", "export", "torchvision:resnet18", "--input-size", "3,64,64",
           "--out", out]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(6)  # inside the export or its verification
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    visible = sorted(f for f in os.listdir(tmp_path) if not f.startswith("."))
    assert visible in ([], ["m.onnx", "m.onnx.json"]), visible  # all or nothing (killed before or after the moves)
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True).returncode == 0
    assert os.path.getsize(out) > 1_000_000


# -- data from anywhere: bad image folders ---------------------------------------------------------------------

def _folder(root, layout: dict[str, dict[str, list]]):
    from PIL import Image

    for split, classes in layout.items():
        for cls, images in classes.items():
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(images):
                if isinstance(img, bytes):
                    (d / f"{i}.jpg").write_bytes(img)
                else:
                    Image.new(img, (8, 8), 128 if img == "L" else (10, 20, 30, 255)[:len(img)]).save(
                        d / f"{i}.{'png' if img == 'RGBA' else 'jpg'}")


def test_grayscale_and_rgba_images_are_read_as_rgb(tmp_path):
    from slimkit.data import load

    _folder(tmp_path, {"train": {"a": ["L", "RGB"], "b": ["RGBA", "RGB"]}, "test": {"a": ["RGB"], "b": ["L"]}})
    data = load(f"imagefolder:{tmp_path}", val_size=0)
    assert data.info.input_size[0] == 3 and len(data.train) == 4


@pytest.mark.parametrize("layout,message", [
    ({"train": {"a": ["RGB", b"\xff\xd8 not a jpeg"], "b": ["RGB"]}, "test": {"a": ["RGB"], "b": ["RGB"]}},
     r"cannot decode image .*1\.jpg"),
    ({"train": {"a": ["RGB"], "b": []}, "test": {"a": ["RGB"], "b": ["RGB"]}}, r"class folder .*b.* holds no images"),
    ({"train": {"a": ["RGB"], "b": ["RGB"]}, "test": {"a": ["RGB"], "c": ["RGB"]}},
     r"class folders \['c'\] in .*test are not in .*train"),
])
def test_bad_image_folders_are_one_line(tmp_path, layout, message):
    from slimkit.data import load

    _folder(tmp_path, layout)
    with pytest.raises(SlimkitError, match=message) as e:
        load(f"imagefolder:{tmp_path}", val_size=0)
    assert "\n" not in str(e.value)


def test_a_missing_test_split_is_one_line_where_it_is_needed(tmp_path):
    _folder(tmp_path, {"train": {"a": ["RGB"], "b": ["RGB"]}})
    line = one_line_error(*cli("eval", "torchvision:resnet18", "--num-classes", "2", "--data",
                           f"imagefolder:{tmp_path}")[::2])
    assert "split 'test'" in line and "is empty" in line
