"""Unstructured sparsity, weight sharing and the packed file (issue 19): exact counts, bit-identical files, sizes."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch
from conftest import cli, one_line_error
from torch import nn

import slimkit
from slimkit import SlimkitError
from slimkit.sparse import ShareConfig, SparsifyConfig, kmeans_1d, pack, read_packed, share, sizes, sparsify
from slimkit.sparse.coding import code_lengths, decode, encode, pack_bits, unpack_bits
from slimkit.sparse.masks import cubic, prunable_layers
from slimkit.sparse.pack import _decode_tensor, _layouts, _Payload

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _weights(model):
    return {n: m.weight.detach() for n, m in prunable_layers(model)}


@pytest.fixture(scope="module")
def digits():
    from slimkit.data import load
    from slimkit.train import fit

    torch.manual_seed(0)
    data = load("digits", limit=600)
    model = slimkit.create_model("digits_cnn")
    fit(model, data.loader("train", 64), epochs=5, lr=0.1, progress=False)  # ~0.96 top-1
    return model.eval(), data


def _tuner(data, log=None):
    from slimkit.train import fit

    def run(model, epochs, tag):
        if log is not None:
            log.append((tag, epochs))
        fit(model, data.loader("train", 64), epochs=epochs, lr=0.05, progress=False)
        return model

    return run


# -- coding ---------------------------------------------------------------------------------------

def test_huffman_lengths_are_optimal_for_a_known_distribution():
    # counts 1, 1, 2, 4: the Huffman tree has depths 3, 3, 2, 1
    assert code_lengths(np.array([1, 1, 2, 4])).tolist() == [3, 3, 2, 1]
    assert code_lengths(np.array([0, 5, 0])).tolist() == [0, 1, 0]  # a lone symbol still takes a bit


@seed(19)
@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.lists(st.integers(0, 40), min_size=0, max_size=400), st.integers(41, 300))
def test_every_coder_round_trips_any_stream(symbols, alphabet):
    s = np.array(symbols, dtype=np.int64)
    for coder in ("bits", "huffman", "lzma"):
        name, data = encode(s, alphabet, ("bits", coder))
        assert np.array_equal(decode(name, data, alphabet, len(s), "t"), s)


def test_huffman_beats_fixed_bits_on_a_skewed_stream_and_is_chosen():
    rng = np.random.default_rng(0)
    s = rng.geometric(0.5, size=5000) - 1  # most symbols small: entropy ~2 bits vs 5 fixed
    s = np.minimum(s, 31)
    name, data = encode(s, 32, ("bits", "huffman"))
    assert name == "huffman" and len(data) < 0.5 * len(pack_bits(s, 5))
    assert np.array_equal(decode(name, data, 32, len(s), "t"), s)


def test_corrupt_streams_are_one_error():
    from slimkit.sparse.coding import _huffman_encode

    s = np.arange(100) % 7
    h = _huffman_encode(s, 8)
    assert np.array_equal(decode("huffman", h, 8, 100, "t"), s)
    for bad in (h[:-3], h[:8] + bytes([30]) * 8 + h[16:], b"", h + b"\0"):
        with pytest.raises(SlimkitError):
            decode("huffman", bad, 8, 100, "t")
    with pytest.raises(SlimkitError, match="corrupt lzma"):
        decode("lzma", b"\xff" * 40, 8, 100, "t")
    with pytest.raises(SlimkitError, match="bytes where"):
        unpack_bits(b"\0" * 3, 5, 100, "t")


def test_an_lzma_bomb_stops_at_the_declared_count():
    from slimkit.sparse.coding import lzma_pack, lzma_unpack

    bomb = lzma_pack(b"\0" * (8 << 20))  # 8 MiB of zeros in a few kB
    with pytest.raises(SlimkitError, match="bytes where"):
        decode("lzma", bomb, 2, 80, "t")  # 80 one-bit symbols need 10 bytes: decoding stops there
    with pytest.raises(SlimkitError, match="cannot hold"):
        lzma_unpack(bomb, 1 << 40, "t")  # a declared size no stream of this length can honestly hold


# -- sparsity -------------------------------------------------------------------------------------

def test_layer_scope_gives_every_layer_the_exact_sparsity_and_keeps_the_largest():
    model = slimkit.create_model("resnet20").eval()
    r = sparsify(model, SparsifyConfig(sparsity=0.7, scope="layer", edges="same"))
    before, after = _weights(model), _weights(r.model)
    for row in r.layers:
        w, kept = before[row["name"]], after[row["name"]] != 0
        assert row["nnz"] == round(0.3 * w.numel())
        assert w[kept].abs().min() >= w[~kept].abs().max()  # magnitude: the largest stay
        assert torch.equal(after[row["name"]][kept], w[kept])  # kept weights untouched
    assert not any(type(m).__name__.startswith("Parametrized") for m in r.model.modules())  # baked


def test_global_scope_meets_the_target_with_the_edge_rule():
    model = slimkit.create_model("resnet20").eval()
    r = sparsify(model, SparsifyConfig(sparsity=0.8))
    rows = {row["name"]: row for row in r.layers}
    assert set(r.edges) == {"conv1", "linear"} and all(v == 0.4 for v in r.edges.values())
    assert abs(rows["conv1"]["sparsity"] - 0.4) < 0.01 and abs(rows["linear"]["sparsity"] - 0.4) < 0.01
    rest = [row for n, row in rows.items() if n not in r.edges]
    zeros = sum(row["numel"] - row["nnz"] for row in rest)
    assert abs(zeros / sum(row["numel"] for row in rest) - 0.8) < 1e-3
    assert len({round(row["sparsity"], 2) for row in rest}) > 3  # global: layers differ
    keep = sparsify(model, SparsifyConfig(sparsity=0.8, edges="keep"))
    assert {row["name"]: row["sparsity"] for row in keep.layers}["conv1"] == 0.0


def test_retraining_keeps_the_zeros_and_recovers(digits):
    model, data = digits
    from slimkit.train import evaluate

    test = data.loader("test", 100)
    base = evaluate(model, test)["top1"]
    oneshot = sparsify(model, SparsifyConfig(sparsity=0.85))
    calls = []
    tuned = sparsify(model, SparsifyConfig(sparsity=0.85, rounds=2), finetune=_tuner(data, calls), epochs=4)
    assert calls == [("round1", 2), ("round2", 2)]
    assert abs(tuned.sparsity - 0.85) < 0.02  # global over the rest, the two edge layers at half
    assert base > 0.9
    assert evaluate(tuned.model, test)["top1"] > evaluate(oneshot.model, test)["top1"] + 0.05
    assert evaluate(tuned.model, test)["top1"] > base - 0.05


def test_agp_follows_the_cubic_schedule_and_ends_at_the_target(digits):
    model, data = digits
    assert cubic(0, 100, 0.0, 0.9, 0.5) == 0.0 and cubic(50, 100, 0.0, 0.9, 0.5) == pytest.approx(0.9)
    assert cubic(25, 100, 0.0, 0.9, 0.5) == pytest.approx(0.9 * (1 - 0.5**3))
    seen = []

    def tune(m, epochs, tag):
        def probe(module, args):
            if module.training:
                w = [lay.weight for _, lay in prunable_layers(module)]
                seen.append(float(sum((x == 0).sum() for x in w) / sum(x.numel() for x in w)))

        h = m.register_forward_pre_hook(probe)
        out = _tuner(data)(m, epochs, tag)
        h.remove()
        return out

    r = sparsify(model, SparsifyConfig(sparsify="agp", sparsity=0.8, scope="layer", edges="same", every=1),
                 loader=data.loader("train", 64), finetune=tune, epochs=2)
    assert abs(r.sparsity - 0.8) < 0.005
    assert seen[0] < 0.2 and max(seen) > 0.75 and all(b >= a - 1e-6 for a, b in zip(seen, seen[1:]))
    with pytest.raises(SlimkitError, match="prunes while training"):
        sparsify(model, SparsifyConfig(sparsify="agp"))


def test_obd_scores_by_fisher_times_squared_weight(digits):
    model, data = digits
    with pytest.raises(SlimkitError, match="needs training data"):
        sparsify(model, SparsifyConfig(sparsify="obd"))
    r = sparsify(model, SparsifyConfig(sparsify="obd", sparsity=0.6, scope="layer", edges="same", batches=2),
                 loader=data.loader("train", 64, shuffle=False))
    from slimkit.sparse.masks import fisher_diagonal

    layers = prunable_layers(model)
    fisher = fisher_diagonal(model, data.loader("train", 64, shuffle=False), 2, layers)
    w = dict(layers)["features.3"].weight.detach() if "features.3" in dict(layers) else layers[1][1].weight.detach()
    name = "features.3" if "features.3" in dict(layers) else layers[1][0]
    saliency = 0.5 * fisher[name] * w**2
    kept = _weights(r.model)[name] != 0
    assert saliency[kept].min() >= saliency[~kept].max()
    assert not torch.equal(kept, w.abs() >= w.abs().flatten().kthvalue(int(0.6 * w.numel())).values)  # not |w|


def _regression(n_in=20, support=(2, 5, 11, 17), seed=0, batches=40):
    g = torch.Generator().manual_seed(seed)
    true = torch.zeros(1, n_in)
    true[0, list(support)] = torch.tensor([1.5, -2.0, 1.0, -1.2])
    data = []
    for _ in range(batches):
        x = torch.randn(32, n_in, generator=g)
        data.append((x, x @ true.T))
    return true, data


def _mse_tuner(data, lr=0.05):
    def run(model, epochs, tag):
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        model.train()
        for _ in range(epochs):
            for x, y in data:
                opt.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
        model.eval()
        return model

    return run


def test_dns_splices_back_the_true_support_that_one_shot_magnitude_loses():
    true, data = _regression()
    model = nn.Sequential(nn.Linear(20, 1, bias=False))
    with torch.no_grad():  # a misleading start: the true weights small, four wrong ones large
        model[0].weight.copy_(0.01 * torch.ones(1, 20))
        model[0].weight[0, [0, 1, 3, 4]] = 0.5
    cfg = dict(sparsity=0.8, scope="layer", edges="same")
    oneshot = sparsify(model, SparsifyConfig(sparsify="magnitude", **cfg), finetune=_mse_tuner(data), epochs=3)
    dns = sparsify(model, SparsifyConfig(sparsify="dns", every=5, **cfg), loader=data, finetune=_mse_tuner(data),
                   epochs=3)
    support = set(torch.nonzero(true[0]).flatten().tolist())
    # one-shot magnitude fixed its mask at the start, on the misleading weights
    assert set(torch.nonzero(oneshot.model[0].weight[0]).flatten().tolist()) != support
    assert set(torch.nonzero(dns.model[0].weight[0]).flatten().tolist()) == support
    assert torch.allclose(dns.model[0].weight, true, atol=0.05)


def test_obd_prunes_by_curvature_where_magnitude_prunes_the_wrong_weight():
    # two inputs of very different scale: the small weight on the large input matters most (h_ii w^2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 2, generator=g) * torch.tensor([10.0, 0.1])
    y = (x[:, 0] * 0.1 + x[:, 1] * 1.0 > 0).long()
    model = nn.Sequential(nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[-0.1, -1.0], [0.1, 1.0]]))  # row 1: the logit of class 1
    loader = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 512, 64)]
    cfg = dict(sparsity=0.5, scope="layer", edges="same")
    by_obd = sparsify(model, SparsifyConfig(sparsify="obd", batches=8, **cfg), loader=loader).model
    by_mag = sparsify(model, SparsifyConfig(sparsify="magnitude", **cfg)).model
    assert torch.equal(by_obd[0].weight != 0, torch.tensor([[True, False], [True, False]]))
    assert torch.equal(by_mag[0].weight != 0, torch.tensor([[False, True], [False, True]]))
    loss = lambda m: float(nn.functional.cross_entropy(m(x), y).detach())  # noqa: E731
    assert loss(by_obd) < loss(by_mag)


@pytest.mark.parametrize("method", ["magnitude", "obd", "agp", "dns", "iht", "l1", "l0", "sensitivity"])
def test_every_method_meets_the_target_exactly_and_keeps_accuracy(digits, method):
    from slimkit.sparse.masks import layer_targets
    from slimkit.train import evaluate

    model, data = digits
    r = sparsify(model, SparsifyConfig(sparsify=method, sparsity=0.9), loader=data.loader("train", 64),
                 finetune=_tuner(data), epochs=3)
    fixed, ranked = layer_targets(prunable_layers(model), 0.9, "global", "half")
    rows = {row["name"]: row for row in r.layers}
    for n, target in fixed.items():  # the edge layers at half, exactly
        assert rows[n]["nnz"] == round((1 - target) * rows[n]["numel"]), n
    rest = [rows[n] for n in ranked]
    assert sum(row["nnz"] for row in rest) == round(0.1 * sum(row["numel"] for row in rest))
    assert not any(parametrize_left(m) for m in r.model.modules())
    assert evaluate(r.model, data.loader("test", 100))["top1"] > 0.85, method


def parametrize_left(m: nn.Module) -> bool:
    return hasattr(m, "parametrizations")


def test_bad_configs_name_the_field():
    with pytest.raises(SlimkitError, match="sparsity"):
        SparsifyConfig(sparsity=1.0)
    with pytest.raises(SlimkitError, match="rounds"):
        SparsifyConfig(sparsify="agp", rounds=2)
    with pytest.raises(SlimkitError, match="no conv or linear"):
        sparsify(nn.Sequential(nn.ReLU()), SparsifyConfig())


# -- sharing --------------------------------------------------------------------------------------

def test_kmeans_matches_a_direct_lloyd_computation():
    rng = np.random.default_rng(0)
    v = rng.normal(size=2000).astype(np.float32)
    c, codes = kmeans_1d(torch.from_numpy(v), 8, iterations=100)
    ref = np.linspace(v.min(), v.max(), 8).astype(np.float64)
    for _ in range(100):
        a = np.abs(v[:, None] - ref[None]).argmin(1)
        ref = np.array([v[a == j].mean() if (a == j).any() else ref[j] for j in range(8)])
    assert np.allclose(np.sort(ref), c.numpy(), atol=1e-4)
    assert np.array_equal(np.abs(v[:, None] - c.numpy()[None]).argmin(1), codes.numpy())


def test_sharing_keeps_zeros_and_at_most_2_to_the_bits_values():
    model = sparsify(slimkit.create_model("resnet20").eval(), SparsifyConfig(sparsity=0.7)).model
    r = share(model, ShareConfig(conv_bits=4, linear_bits=3, edge_bits=6))
    before, after = _weights(model), _weights(r.model)
    for row in r.layers:
        assert row["values"] <= 2 ** row["bits"]
        assert row["bits"] == (6 if row["name"] in ("conv1", "linear") else 4)
        assert torch.equal(before[row["name"]] == 0, after[row["name"]] == 0)


def test_centroid_gradients_are_the_sums_over_each_cluster():
    from slimkit.sparse.share import attach_shared

    torch.manual_seed(0)
    lin = nn.Linear(20, 6)
    with torch.no_grad():
        lin.weight[lin.weight.abs() < 0.05] = 0
    dense = nn.Linear(20, 6)
    shared = attach_shared(lin, 3)
    dense.load_state_dict({"weight": lin.weight.detach().clone(), "bias": lin.bias.detach().clone()})
    x = torch.randn(5, 20)
    lin(x).pow(2).sum().backward()
    dense(x).pow(2).sum().backward()
    codes = shared.codes.flatten()
    kept = codes >= 0
    expected = torch.zeros_like(shared.codebook).index_add_(0, codes[kept], dense.weight.grad.flatten()[kept])
    assert torch.allclose(shared.codebook.grad, expected, atol=1e-5)


def test_share_with_centroid_finetune_moves_only_the_codebook(digits):
    model, data = digits
    sparse = sparsify(model, SparsifyConfig(sparsity=0.7, scope="layer", edges="same")).model
    r = share(sparse, ShareConfig(conv_bits=3, linear_bits=3, edge_bits=3), finetune=_tuner(data), epochs=1)
    untuned = share(sparse, ShareConfig(conv_bits=3, linear_bits=3, edge_bits=3))
    for (n, a), (_, b) in zip(prunable_layers(r.model), prunable_layers(untuned.model)):
        wa, wb = a.weight.detach(), b.weight.detach()
        assert torch.equal(wa == 0, wb == 0)
        # the same weights share a value before and after: codes fixed, centroids moved
        assert len(torch.unique(torch.stack([wa[wb != 0], wb[wb != 0]]), dim=1).T) == len(torch.unique(wb[wb != 0]))
    assert any(not torch.equal(a.weight, b.weight) for (_, a), (_, b) in zip(prunable_layers(r.model),
                                                                            prunable_layers(untuned.model)))


# -- the packed file ------------------------------------------------------------------------------

@pytest.mark.parametrize("density", [1.0, 0.6, 0.2, 0.03, 0.0])
@pytest.mark.parametrize("distinct", [None, 5])
def test_every_layout_decodes_to_the_same_tensor(density, distinct):
    torch.manual_seed(0)
    t = torch.randn(16, 8, 3, 3)
    if distinct:
        t = torch.round(t * 2) / 2  # few distinct values: the codebook path
        t = t.clamp(-1, 1)
    t[torch.rand_like(t) > density] = 0
    seen = set()
    for rec, streams in _layouts(t.numpy(), ("bits", "huffman", "lzma")):
        payload = _Payload()
        record = {"dtype": "float32", "shape": list(t.shape), **rec,
                  "streams": {k: payload.add(d, **meta) for k, (meta, d) in streams.items()}}
        blob = b"".join(payload.parts)
        out = _decode_tensor("w", record, lambda s: blob[s["offset"]:s["offset"] + s["length"]], "t")
        assert torch.equal(out, t), rec
        seen.add(rec["layout"] + (f"/{rec['gap_bits']}" if "gap_bits" in rec else ""))
    assert "dense" in seen and (density == 1.0 or {"bitmap", "csr"} <= seen and any("relative" in s for s in seen))


def test_packed_file_is_bit_identical_small_and_adds_up(tmp_path):
    torch.manual_seed(0)
    model = slimkit.create_model("resnet20").eval()
    s = share(sparsify(model, SparsifyConfig(sparsity=0.9)).model, ShareConfig()).model
    dense = slimkit.save(s, tmp_path / "m.safetensors")
    p = pack(s, tmp_path / "m.slimpack")
    x = torch.randn(3, 3, 32, 32)
    loaded = slimkit.load(p)
    assert torch.equal(loaded(x), s(x))
    state = s.state_dict()
    assert all(torch.equal(t, state[k]) for k, t in loaded.state_dict().items())
    assert os.path.getsize(p) * 10 < os.path.getsize(dense)
    b = sizes(p)
    assert b["header"] + sum(b["components"].values()) == b["file"] == os.path.getsize(p)
    assert b["layers"]["layer2.0.conv1"]["layout"] in ("relative", "csr", "bitmap")
    # Huffman pays on top of fixed-width bits
    bits_only = pack(s, tmp_path / "b.slimpack", coders=("bits",))
    assert os.path.getsize(p) < os.path.getsize(bits_only)


def test_dense_models_pack_losslessly_too(tmp_path):
    model = slimkit.create_model("digits_cnn").eval()
    model.register_buffer("empty_bf16", torch.zeros(0, dtype=torch.bfloat16))  # found in review: did not load
    p = pack(model, tmp_path / "d.slimpack")
    state = model.state_dict()
    assert all(torch.equal(t, state[k]) for k, t in read_packed(p)[1].items())


def _packed_bytes(tmp_path) -> bytes:
    m = sparsify(slimkit.create_model("digits_cnn").eval(), SparsifyConfig(sparsity=0.8)).model
    return open(pack(m, tmp_path / "g.slimpack", meta={"input_size": [1, 8, 8]}), "rb").read()


def _header(data: bytes) -> tuple[dict, int]:
    from slimkit.sparse.coding import lzma_unpack

    _, coder, n, length = struct.unpack("<IIQQ", data[8:32])
    raw = data[32:32 + n]
    return json.loads(lzma_unpack(raw, length, "t") if coder else raw), 32 + n


def test_truncated_or_tampered_packed_files_are_one_error(tmp_path):
    data = _packed_bytes(tmp_path)
    header, start = _header(data)
    cuts = {0, 8, 12, 16, 24, 32, 40, start - 1, start, len(data) - 1}
    for rec in header["tensors"].values():
        for s in rec["streams"].values():
            cuts |= {start + s["offset"], start + s["offset"] + s["length"] // 2}
    bad = tmp_path / "bad.slimpack"
    for cut in sorted(c for c in cuts if 0 <= c < len(data)):
        bad.write_bytes(data[:cut])
        with pytest.raises(SlimkitError) as e:
            slimkit.load(str(bad))
        assert "\n" not in str(e.value)

    def tampered(edit) -> str:
        h = json.loads(json.dumps(header))
        edit(h)
        text = json.dumps(h).encode()
        bad.write_bytes(data[:8] + struct.pack("<IIQQ", 1, 0, len(text), len(text)) + text + data[start:])
        with pytest.raises(SlimkitError) as e:
            slimkit.load(str(bad))
        assert "\n" not in str(e.value)
        return str(e.value)

    name = next(k for k, r in header["tensors"].items() if r["layout"] != "raw")
    assert "larger than" in tampered(lambda h: h["tensors"][name].update(shape=[1 << 20, 1 << 16]))
    # found in review: shapes that overflow floats or hide behind a zero, unhashable fields, unknown streams,
    # float counts far beyond what the layout needs (an lzma bomb would expand them)
    for shape in ([10**400], [10**200, 10**200, 0], [0, 2**64], [0, 2**62]):
        tampered(lambda h, shape=shape: h["tensors"][name].update(shape=shape))
    tampered(lambda h: h["tensors"][name].update(dtype=[]))
    tampered(lambda h: h["tensors"][name].update(layout={}))
    assert "unknown stream" in tampered(lambda h: h["tensors"][name]["streams"].update(
        bogus={"offset": 0, "length": 0, "coder": "raw", "count": 0}))
    streams = header["tensors"][name]["streams"]
    float_stream = "codebook" if "codebook" in streams else "values"
    assert "float values" in tampered(lambda h: h["tensors"][name]["streams"][float_stream].update(count=2**28))
    assert "runs past" in tampered(lambda h: next(iter(h["tensors"][name]["streams"].values())).update(offset=1 << 40))
    assert "layout" in tampered(lambda h: h["tensors"][name].update(layout="zip"))
    assert "nnz" in tampered(lambda h: h["tensors"][name].update(nnz=10**9))
    tampered(lambda h: h["tensors"][name].update(shape=[3, 3]))
    tampered(lambda h: h["artifact"].update(format="pickle"))


@seed(19)
@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(st.data())
def test_flipped_bytes_in_a_packed_file_load_or_fail_in_one_line(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("flip")
    raw = bytearray(_FLIP_SOURCE.get("bytes") or _FLIP_SOURCE.setdefault("bytes", _packed_bytes(folder)))
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    p = folder / "f.slimpack"
    p.write_bytes(bytes(raw))
    try:
        slimkit.load(str(p))
    except SlimkitError as e:
        assert "\n" not in str(e)


_FLIP_SOURCE: dict = {}


# -- commands and stages --------------------------------------------------------------------------

def test_sparsify_then_share_commands_write_packed_models_every_command_reads(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    code, stdout, err = cli("sparsify", "digits_cnn", "--data", "digits", "--limit", "120", "--sparsity", "0.8",
                            "--finetune-epochs", "1", "--json", "--out", a)
    assert code == 0, err
    r = json.loads(stdout)
    assert abs(r["sparsify"]["sparsity"] - 0.8) < 0.01 and r["packed_bytes"] == os.path.getsize(r["packed"])
    code, stdout, err = cli("share", a, "--bits", "conv=4,linear=3", "--data", "digits", "--limit", "120",
                            "--finetune-epochs", "1", "--json", "--out", b)
    assert code == 0, err
    r = json.loads(stdout)
    assert [row["bits"] for row in r["share"]["layers"]][1] == 4 and r["ratio"] > 8
    model = slimkit.load(r["packed"])
    assert [h["stage"] for h in model.slimkit_history] == ["sparsify", "share"]
    for n, m in prunable_layers(model):
        assert float((m.weight == 0).float().mean()) > 0.35, n  # the zeros of stage 1 survive stage 2
    code, stdout, err = cli("info", r["packed"])
    assert code == 0 and "positions" in stdout and "codebook" in stdout and "layout" in stdout, err
    code, stdout, err = cli("eval", r["packed"], "--data", "digits", "--limit", "120", "--json")
    assert code == 0 and abs(json.loads(stdout)["top1"] - r["test_top1_after"]) < 1e-9, err
    code, stdout, err = cli("pack", r["artifact"], "--out", str(tmp_path / "again.slimpack"), "--json")
    assert code == 0, err
    again = json.loads(stdout)
    assert again["file"] == os.path.getsize(again["packed"])
    assert abs(again["file"] - os.path.getsize(r["packed"])) < 64  # the same tensors (records in another order)
    state = model.state_dict()
    assert all(torch.equal(t, state[k]) for k, t in slimkit.load(again["packed"]).state_dict().items())


@pytest.mark.parametrize("command, args, needle", [
    ("sparsify", ["--sparsity", "1.5"], "--sparsity"),
    ("sparsify", ["--method", "agp"], "--data"),
    ("sparsify", ["--method", "agp", "--data", "digits", "--limit", "60"], "prunes while training"),
    ("sparsify", ["--method", "obd"], "--data"),
    ("sparsify", ["--method", "magnitud"], "magnitude"),
    ("share", ["--bits", "conv=9"], "conv"),
    ("share", ["--bits", "kernel=3"], "--bits"),
    ("share", ["--weighting", "hessian"], "--data"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, command, args, needle):
    code, _, err = cli(command, "digits_cnn", *args, "--out", str(tmp_path / "o"))
    assert needle in one_line_error(code, err)
    assert not os.path.exists(tmp_path / "o" / "model.slimpack")


def test_pack_refuses_a_file_that_is_not_an_artifact(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"nonsense")
    code, _, err = cli("pack", str(bad), "--out", str(tmp_path / "y.slimpack"))
    assert "x.safetensors" in one_line_error(code, err)
    assert not os.path.exists(tmp_path / "y.slimpack")


def test_recipe_stages_retrain_with_masks_and_codebooks_held(tmp_path):
    from slimkit.pipeline import run_recipe

    recipe = {"model": "digits_cnn", "data": "digits", "limit": 120, "progress": False, "pack": True, "stages": [
        {"method": "sparsify", "sparsity": 0.75, "scope": "layer", "edges": "same", "finetune": {"epochs": 1}},
        {"method": "share", "conv_bits": 3, "linear_bits": 3, "edge_bits": 3, "finetune": {"epochs": 1,
                                                                                          "distill": "kd"}}]}
    report = run_recipe(recipe, str(tmp_path), log=lambda _: None)
    model = slimkit.load(report["artifact"])
    for n, m in prunable_layers(model):
        w = m.weight.detach()
        assert abs(float((w == 0).float().mean()) - 0.75) < 0.01, n
        assert len(torch.unique(w[w != 0])) <= 8, n
    assert [s["stage"] for s in model.slimkit_history][-2:] == ["sparsify", "share"]
    packed = slimkit.load(report["packed"])
    assert report["packed_bytes"] * 4 < report["artifact_bytes"]
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in packed.state_dict().items())


# -- sparse execution -----------------------------------------------------------------------------

def _sparse_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.Flatten(),
                          nn.Linear(64 * 8 * 8, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    return sparsify(model, SparsifyConfig(sparsity=0.95, scope="layer", edges="same")).model


def test_sparse_execution_swaps_only_where_measured_faster_and_stays_equivalent(tmp_path):
    from slimkit.sparse.execute import SparseConv1x1, SparseLinear, sparse_execution

    x = torch.randn(4, 3, 8, 8)
    dense = _sparse_mlp()
    ref = dense(x)
    kept, decisions = sparse_execution(_sparse_mlp(), (3, 8, 8), batch_sizes=(1, 4), min_speedup=1e9, pairs=1,
                                       window_s=0.001)
    assert not any(isinstance(m, (SparseLinear, SparseConv1x1)) for m in kept.modules())
    assert {d["name"] for d in decisions} == {"0", "4", "6"}  # the 3x3 conv is not eligible
    assert all(set(d["speedup"]) == {"1", "4"} for d in decisions)
    swapped, _ = sparse_execution(_sparse_mlp(), (3, 8, 8), min_speedup=0.0, pairs=1, window_s=0.001)
    assert isinstance(swapped[0], SparseConv1x1) and isinstance(swapped[4], SparseLinear)
    assert torch.allclose(swapped(x), ref, atol=1e-5)
    # the swapped model saves, loads and exports like any other (dense while traced)
    p = slimkit.save(swapped, tmp_path / "s.safetensors")
    back = slimkit.load(p)
    assert isinstance(back[4], SparseLinear) and torch.allclose(back(x), ref, atol=1e-5)
    packed = slimkit.load(pack(swapped, tmp_path / "s.slimpack"))
    assert torch.allclose(packed(x), ref, atol=1e-5)
    traced = torch.jit.trace(swapped, x)
    assert torch.allclose(traced(x), ref, atol=1e-5)


def test_sensitivity_scope_spares_the_sensitive_layers_and_meets_the_target(tmp_path):
    from slimkit.data import load
    from slimkit.sparse.sensitivity import plot
    from slimkit.train import evaluate, fit

    torch.manual_seed(0)
    data = load("digits", limit=600)
    model = slimkit.create_model("digits_resnet")  # 14 conv/linear layers: room for an allocation
    fit(model, data.loader("train", 64), epochs=3, lr=0.1, progress=False)
    model.eval()
    with pytest.raises(SlimkitError, match="sensitivity"):
        sparsify(model, SparsifyConfig(scope="sensitivity"))
    r = sparsify(model, SparsifyConfig(sparsity=0.6, scope="sensitivity"), loader=data.loader("train", 64),
                 val=data.loader("val", 72))
    scan, rows = r.scan, {row["name"]: row for row in r.layers}
    rest = [n for n in rows if n not in r.edges]
    zeros = sum(rows[n]["numel"] - rows[n]["nnz"] for n in rest)
    assert abs(zeros / sum(rows[n]["numel"] for n in rest) - 0.6) < 0.005
    # the layer whose accuracy falls most in the scan is pruned less than the typical layer
    at = scan["levels"].index(0.9)
    drop = {n: scan["base"] - scan["layers"][n]["accuracy"][at] for n in rest}
    most = max(drop, key=drop.get)
    assert rows[most]["sparsity"] < float(np.median([rows[n]["sparsity"] for n in rest]))
    uniform = sparsify(model, SparsifyConfig(sparsity=0.6, scope="layer"))
    test = data.loader("test", 100)
    # after 3 epochs on 600 images the two allocations are a few test images apart, and which is ahead moves with
    # the CPU's float summation order (seen: 51.0% vs 51.5%); the allocation itself is asserted above, so here
    # the sensitivity plan must not lose to the uniform one by more than two test images
    planned, even = evaluate(r.model, test), evaluate(uniform.model, test)
    assert planned["top1"] >= even["top1"] - 2 / planned["n"] - 1e-9
    assert os.path.getsize(plot(scan, str(tmp_path / "s.png"), scan["plan"])) > 5000


def test_recipes_choose_the_method_by_the_stage_name_key():
    from slimkit.lowbit import LowBitConfig
    from slimkit.pipeline import stage_configs

    _, cfg, _ = stage_configs({"method": "sparsify", "sparsify": "dns", "sparsity": 0.5}, 1)
    assert cfg.method == "dns"
    _, cfg, _ = stage_configs({"method": "lowbit", "lowbit": "ttq"}, 1)
    assert isinstance(cfg, LowBitConfig) and cfg.method == "ttq" and cfg.bits == 2
    with pytest.raises(SlimkitError, match="sparsify"):
        stage_configs({"method": "sparsify", "sparsify": "mag"}, 1)


def test_a_frozen_input_model_is_still_retrained(digits):
    import copy

    model, data = digits
    frozen = copy.deepcopy(model).requires_grad_(False)  # e.g. a model that served as a distillation teacher
    r = sparsify(frozen, SparsifyConfig(sparsity=0.5), finetune=_tuner(data), epochs=1)
    oneshot = sparsify(frozen, SparsifyConfig(sparsity=0.5))
    assert any(not torch.equal(a, b) for a, b in zip(r.model.parameters(), oneshot.model.parameters()))
    assert not any(p.requires_grad for p in frozen.parameters())  # the input is left as it was


def test_hessian_weighted_kmeans_pulls_centroids_to_the_weights_that_matter(digits):
    v = torch.tensor([0.0, 1.0, 10.0, 11.0])
    plain, _ = kmeans_1d(v, 2)
    weighted, _ = kmeans_1d(v, 2, weights=torch.tensor([1.0, 1000.0, 1.0, 1.0]))
    assert plain[0] == pytest.approx(0.5) and weighted[0] == pytest.approx(1000 / 1001, abs=1e-4)
    model, data = digits
    with pytest.raises(SlimkitError, match="hessian"):
        share(model, ShareConfig(weighting="hessian"))
    r = share(model, ShareConfig(conv_bits=3, linear_bits=3, edge_bits=3, weighting="hessian", batches=2),
              loader=data.loader("train", 64))
    assert all(row["values"] <= 8 for row in r.layers)
