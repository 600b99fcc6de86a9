"""Fuzzed files (issue 22): every loader of files from anywhere answers bad bytes with one SlimkitError, nothing else.

Fixed-seed, time-boxed hypothesis runs over the artifact loader, the training-checkpoint and
weights readers and the CIFAR-batch reader: random bytes, a real file truncated at every section
boundary, flipped bytes, headers with malformed or oversized JSON, and pickles that try to run code.
``SLIMKIT_FUZZ_EXAMPLES`` raises the example count for the longer documented run (docs/robustness.md).
"""

from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import slimkit  # noqa: E402
from slimkit import SlimkitError  # noqa: E402

EXAMPLES = int(os.environ.get("SLIMKIT_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def artifact_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz") / "m.safetensors"
    slimkit.save(slimkit.create_model("digits_cnn").eval(), path, meta={"input_size": [1, 8, 8]})
    return path.read_bytes()


def _load_bytes(tmp_path, data: bytes, name: str = "x.safetensors"):
    p = tmp_path / name
    p.write_bytes(data)
    return slimkit.load(str(p))


def _only_slimkit_error(fn) -> None:
    """``fn`` either succeeds or raises SlimkitError with a one-line message; any other exception fails."""
    try:
        fn()
    except SlimkitError as e:
        assert str(e) and "\n" not in str(e).strip(), repr(e)


def _boundaries(data: bytes) -> list[int]:
    """Every section boundary of a safetensors file: length prefix, header, each tensor's start and end."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    cuts = {0, 4, 8, 8 + n // 2, 8 + n, len(data) - 1}
    for k, v in header.items():
        if k != "__metadata__":
            a, b = v["data_offsets"]
            cuts |= {8 + n + a, 8 + n + (a + b) // 2, 8 + n + b - 1}
    return sorted(c for c in cuts if 0 <= c < len(data))


def test_truncated_at_every_section_boundary(artifact_bytes, tmp_path):
    cuts = _boundaries(artifact_bytes)
    assert len(cuts) > 10
    for cut in cuts:
        with pytest.raises(SlimkitError):
            _load_bytes(tmp_path, artifact_bytes[:cut])


@seed(22)
@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_are_one_error(tmp_path, data):
    with pytest.raises(SlimkitError):
        _load_bytes(tmp_path, data)


@seed(22)
@FUZZ
@given(st.data())
def test_flipped_bytes_load_or_fail_in_one_line(artifact_bytes, tmp_path, data):
    buf = bytearray(artifact_bytes)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    _only_slimkit_error(lambda: _load_bytes(tmp_path, bytes(buf)))


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=30),
                     lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner,
                                                                                  max_size=5), max_leaves=30)


@seed(22)
@FUZZ
@given(st.data())
def test_mutated_header_json_loads_or_fails_in_one_line(artifact_bytes, tmp_path, data):
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    n = struct.unpack("<Q", artifact_bytes[:8])[0]
    meta = json.loads(json.loads(artifact_bytes[8:8 + n])["__metadata__"]["slimkit"])
    node, path = meta, []
    while isinstance(node, (dict, list)) and node and data.draw(st.booleans()):  # walk to a random field
        key = data.draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
        path.append(key)
        node = node[key]
    target = meta
    for k in path[:-1]:
        target = target[k]
    if path:
        target[path[-1]] = data.draw(_JSON)
    else:
        meta = data.draw(_JSON)
    blob = st_save(st_load(artifact_bytes), metadata={"slimkit": json.dumps(meta)})
    _only_slimkit_error(lambda: _load_bytes(tmp_path, blob))


def test_huge_and_deep_headers_are_refused(artifact_bytes, tmp_path):
    n = struct.unpack("<Q", artifact_bytes[:8])[0]
    for body in (b"{" * 100000, b'{"a": "' + b"x" * 50_000_000 + b'"}', b"[" * 5000 + b"]" * 5000):
        data = struct.pack("<Q", len(body)) + body
        with pytest.raises(SlimkitError):
            _load_bytes(tmp_path, data)
    # a length prefix claiming more header than the file holds, or than memory
    for claimed in (n + 10, 2**40, 2**63):
        with pytest.raises(SlimkitError):
            _load_bytes(tmp_path, struct.pack("<Q", claimed) + artifact_bytes[8:])


class _Call:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def _pickles(marker: str) -> dict[str, object]:
    import subprocess

    return {"os.system": _Call(os.system, f"touch {marker}"),
            "eval": _Call(eval, f"open({marker!r}, 'w')"),
            "subprocess": _Call(subprocess.call, ["touch", marker]),
            "nested in a state_dict": {"state_dict": {"conv.weight": torch.zeros(1), "x": _Call(os.system,
                                                                                               f"touch {marker}")}},
            "exec": _Call(exec, f"open({marker!r}, 'w')")}


@pytest.mark.parametrize("kind", list(_pickles("m")))
def test_malicious_pickles_never_run_in_any_reader(tmp_path, kind):
    from slimkit.data import load as load_data
    from slimkit.models.registry import load_weights
    from slimkit.train.engine import load_checkpoint

    marker = tmp_path / "MARKER"
    payload = _pickles(str(marker))[kind]
    ckpt = tmp_path / "ckpt.pt"
    with open(ckpt, "wb") as f:
        pickle.dump(payload, f)
    with pytest.raises(SlimkitError):
        load_checkpoint(str(ckpt))
    torch.save(payload, tmp_path / "weights.th")  # torch's own zip format, the same payload inside
    with pytest.raises(SlimkitError):
        load_weights(slimkit.create_model("digits_cnn"), str(tmp_path / "weights.th"))
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in ("data_batch_1", "test_batch"):
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": payload, b"labels": [0]}, f)
    with pytest.raises(SlimkitError):
        load_data(f"cifar10:{tmp_path / 'cifar'}")
    assert not marker.exists(), f"{kind} ran"


@seed(22)
@FUZZ
@given(st.binary(max_size=4096))
def test_random_checkpoint_weights_and_cifar_bytes_are_one_error(tmp_path, data):
    from slimkit.data.sources import _read_batch
    from slimkit.models.registry import load_weights
    from slimkit.train.engine import load_checkpoint

    p = tmp_path / "blob"
    p.write_bytes(data)
    _only_slimkit_error(lambda: load_checkpoint(str(p)))
    _only_slimkit_error(lambda: load_weights(slimkit.create_model("digits_cnn"), str(p)))
    _only_slimkit_error(lambda: _read_batch(str(p)))
