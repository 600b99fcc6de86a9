"""Contract suites: what every registry entry must do, checked over the registries themselves.

The anchors are timm's ``tests/test_models.py`` (parametrised over ``list_models()``) and Optuna's
shipped sampler test case: a method is tested the moment it is registered, because the test
lists the registry, never a hand-kept list. Kept in the package so later families (and plug-ins)
run the same checks over their entries::

    import pytest
    from slimkit.testing import contracts

    @pytest.mark.parametrize("name", contracts.stage_names())
    def test_stage(name, tmp_path):
        contracts.check_stage(name, tmp_path)

Each ``check_*`` raises ``AssertionError`` naming the entry and what it broke.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import torch
from torch import nn

from .helpers import random_batches, randomize_bn, zeroed_copy

# int8 against float on the digits CNN: the relative L2 error of the logits an observer may give
# (measured 0.01-0.03 for the five observers; the bound leaves room, a broken observer is at ~1)
QUANT_TOLERANCE = 0.1
# the model every stage contract runs on: small, with BN, residual blocks (for prune_blocks) and
# option-A shortcuts, on the embedded digits data
STAGE_MODEL = "digits_resnet"


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


# -- models ---------------------------------------------------------------------------------------

def model_names() -> list[str]:
    from ..models import MODELS

    return MODELS.names()


def check_model(name: str, tmp_dir: str, *, round_trip: bool = True) -> None:
    """Builds, runs forward and backward, profiles, and (``round_trip``) loads back from an artifact identically."""
    import slimkit

    from ..models import MODELS
    from ..profile import profile

    entry = MODELS.get(name)
    torch.manual_seed(0)
    model = slimkit.create_model(name, num_classes=7)
    small = entry.input_size[1] <= 64
    batch = 2 if small else 1  # BN trains with two samples; the ImageNet-size nets run with BN in eval mode
    model.train(small)
    x = torch.randn(batch, *entry.input_size)
    out = model(x)
    assert out.shape == (batch, 7), f"{name}: output {tuple(out.shape)} for 7 classes"
    assert torch.isfinite(out).all(), f"{name}: non-finite output"
    out.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert grads[-1] is not None and any(g is not None and g.abs().sum() > 0 for g in grads[:-2]), \
        f"{name}: no gradient reaches the body"
    model.eval()
    for p in model.parameters():
        p.grad = None
    prof = profile(model, x[:1])
    assert prof.params == sum(p.numel() for p in model.parameters()), f"{name}: profiled parameters differ"
    assert prof.macs > 0, f"{name}: no MACs counted"
    if round_trip:
        path = slimkit.save(model, os.path.join(tmp_dir, f"{name}.safetensors"))
        loaded = slimkit.load(path)
        with torch.no_grad():
            assert _same(loaded(x[:1]), model(x[:1])), f"{name}: artifact does not reproduce the outputs"


# -- pruning criteria -------------------------------------------------------------------------------

def criterion_names() -> list[str]:
    from ..prune import CRITERIA

    return CRITERIA.names()


def check_criterion(name: str) -> None:
    """One finite score per prunable channel class, deterministic under a seed, pruned == zeroed copy."""
    import slimkit

    from ..prune import CRITERIA, PruneConfig, build_graph, prune

    entry = CRITERIA.get(name)
    model = randomize_bn(slimkit.create_model("digits_resnet"))
    x = torch.zeros(1, 1, 8, 8)
    batches = random_batches(2, 8)
    graph = build_graph(model, x)
    kwargs = {"loader": batches, "batches": 2, "seed": 3, "device": "cpu"} if entry.needs_data else (
        {"seed": 3} if entry.needs_seed else {})
    before = copy.deepcopy(model.state_dict())
    scores = np.asarray(entry(model, graph, **kwargs))
    assert scores.shape == (graph.num_classes,), f"{name}: {scores.shape} scores for {graph.num_classes} classes"
    prunable = graph.prunable()
    assert np.isfinite(scores[prunable]).all(), f"{name}: non-finite score for a prunable channel"
    again = np.asarray(entry(model, graph, **kwargs))
    assert np.array_equal(scores, again, equal_nan=True), f"{name}: not deterministic under a fixed seed"
    assert all(_same(v, before[k]) for k, v in model.state_dict().items()), f"{name}: scoring changed the model"
    config = PruneConfig(criterion=name, ratio=0.3, round_to=4, reconstruct="none", batches=2)
    r = prune(model, x, config, loader=batches, seed=3)
    assert r.macs_after < r.macs_before, f"{name}: nothing was pruned"
    probe = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(r.model.eval()(probe), zeroed_copy(model, r.kept)(probe), atol=1e-5), \
            f"{name}: the pruned model differs from the zeroed copy"


# -- recipe stages ---------------------------------------------------------------------------------

def stage_names() -> list[str]:
    from ..pipeline import STAGES, load_stage_modules

    load_stage_modules()
    return STAGES.names()


def stage_context(tmp_dir: str):
    """A pipeline context on 40 images per split of the embedded digits data."""
    from ..data import load
    from ..pipeline import Context

    return Context(data=load("digits", limit=40, seed=0), out_dir=str(tmp_dir), batch_size=16, progress=False)


def check_stage(name: str, tmp_dir: str) -> None:
    """Its example runs; its result's artifact loads with identical outputs; the provenance rebuilds the config."""
    import slimkit

    from ..artifact import history
    from ..pipeline import get_stage

    entry = get_stage(name)
    config = entry.config.from_options(entry.example, where=f"{name} example")
    assert entry.config.from_dict(config.to_dict()) == config, f"{name}: to_dict/from_dict does not round-trip"
    ctx = stage_context(tmp_dir)
    torch.manual_seed(0)
    model = slimkit.create_model(STAGE_MODEL)
    out = entry.run(model, ctx, config)
    assert isinstance(out, nn.Module), f"{name}: returned {type(out).__name__}"
    history(out).append({"stage": name, "params": config.to_dict()})
    path = slimkit.save(out, os.path.join(str(tmp_dir), f"{name}.safetensors"))
    loaded = slimkit.load(path)
    x = next(iter(ctx.data.loader("test", 8)))[0]
    out.eval()
    with torch.no_grad():
        assert _same(loaded(x), out(x)), f"{name}: the artifact does not reproduce the stage's outputs"
    record = loaded.slimkit_history[-1]
    assert record["stage"] == name and entry.config.from_dict(record["params"]) == config, \
        f"{name}: the provenance does not rebuild the config"


# -- distillation methods ---------------------------------------------------------------------------

def distill_names() -> list[str]:
    from ..distill import METHODS

    return METHODS.names()


def check_distill(name: str) -> None:
    """Trains one step (finite terms, the student changes) and leaves the teacher exactly as it was."""
    import slimkit

    from ..distill import METHODS, OneNetwork, distill_terms, moonshine_student
    from ..train import fit

    method = METHODS.get(name)
    torch.manual_seed(0)
    if name == "one":  # its own teacher: a multi-branch CIFAR ResNet
        teacher, student = None, OneNetwork("resnet20", branches=2, num_classes=10)
        batches = random_batches(1, 4, (3, 32, 32))
    else:
        teacher = randomize_bn(slimkit.create_model("digits_cnn"), seed=1)
        student = moonshine_student(teacher, 4) if name == "moonshine" else slimkit.create_model("digits_cnn")
        batches = random_batches(1, 8)
    opts = {"loader": batches} if "loader" in method.defaults else {}
    before_teacher = copy.deepcopy(teacher.state_dict()) if teacher is not None else {}
    before_student = [p.detach().clone() for p in student.parameters()]
    with distill_terms(name, teacher, student, batches[0][0][:2], **opts) as terms:
        run = fit(student, batches, epochs=1, lr=0.05, extra_losses=terms, progress=False)
    logged = run.last
    assert all(np.isfinite(logged[k]) for k in terms), f"{name}: a loss term is not finite: {logged}"
    assert any(not torch.equal(p, b) for p, b in zip(student.parameters(), before_student)), \
        f"{name}: the student did not train"
    if teacher is not None:
        assert not teacher.training or method.needs_teacher is False, f"{name}: the teacher was left in train mode"
        assert all(_same(v, before_teacher[k]) for k, v in teacher.state_dict().items()), \
            f"{name}: the teacher changed"
    assert "distill_aux" not in dict(student.named_children()), f"{name}: auxiliary modules left on the student"


# -- calibration observers (int8) -------------------------------------------------------------------

def observer_names() -> list[str]:
    from ..quant import OBSERVERS

    return OBSERVERS.names()


def check_observer(name: str) -> tuple[float, float]:
    """The int8 model runs on int8 kernels and its logits stay within :data:`QUANT_TOLERANCE` of float.

    Returns (relative L2 error, top-1 agreement) on the digits test images, for the record.
    """
    import slimkit

    from ..data import load
    from ..quant import QuantConfig, calibration_loader, is_quantized_module, quantize

    data = load("digits", limit=100, seed=0)
    torch.manual_seed(0)
    model = randomize_bn(slimkit.create_model("digits_cnn"))
    q = quantize(model, calibration_loader(data, 64, 32), QuantConfig(observer=name))
    assert any(is_quantized_module(m) for m in q.modules()), f"{name}: no layer runs an int8 kernel"
    x = next(iter(data.loader("test", 100)))[0]
    with torch.no_grad():
        f, i = model(x), q(x)
    err = float((i - f).norm() / f.norm())
    agree = float((i.argmax(1) == f.argmax(1)).float().mean())
    assert err <= QUANT_TOLERANCE, f"{name}: int8 logits are {err:.3f} (relative L2) from float"
    return err, agree


# -- decompositions --------------------------------------------------------------------------------------------

def decomposition_names() -> list[str]:
    from ..decompose import DECOMPOSITIONS

    return DECOMPOSITIONS.names()


def check_decomposition(name: str) -> None:
    """At full rank the replacement reproduces its layer; its closed-form MACs and parameters are the profiler's."""
    from ..decompose import DECOMPOSITIONS
    from ..profile import profile

    d = DECOMPOSITIONS.get(name)
    g = torch.Generator().manual_seed(0)
    layer = next(m for m in (nn.Linear(24, 16), nn.Conv2d(6, 10, 1, 2), nn.Conv2d(6, 10, 3, 2, 1))
                 if d.check(m) is None).double().eval()
    x = torch.randn(3, 24, generator=g) if isinstance(layer, nn.Linear) else torch.randn(3, 6, 9, 9, generator=g)
    x = x.double()
    rank = d.max_rank(layer)
    if name == "cp":  # a kernel of known CP rank 3: ALS recovers it exactly
        a, b, c, e = (torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (10, 6, 3, 3))
        with torch.no_grad():
            layer.weight.copy_(torch.einsum("or,cr,ir,jr->ocij", a, b, c, e))
        rank = 3
    new = d.build(layer, rank, x, {"iterations": 300, "seed": 0}).eval()
    with torch.no_grad():
        y, got = layer(x), new(x)
    assert got.shape == y.shape and float((got - y).norm() / y.norm()) < 1e-4, f"{name}: full rank is not exact"
    in_hw = (1, 1) if x.dim() == 2 else tuple(x.shape[2:])
    out_hw = (1, 1) if x.dim() == 2 else tuple(y.shape[2:])
    p = profile(new.float(), x[:1].float())
    assert (p.macs, p.params) == d.cost(layer, rank, in_hw, out_hw), f"{name}: closed-form cost differs"


# -- sparsity and low-bit methods ------------------------------------------------------------------

def sparsifier_names() -> list[str]:
    from ..sparse import SPARSIFIERS

    return SPARSIFIERS.names()


def _digits_job():
    """The digits CNN, 40 images per split, and a one-epoch fine-tune callable."""
    import slimkit

    from ..data import load
    from ..train import fit

    data = load("digits", limit=40, seed=0)
    torch.manual_seed(0)
    model = slimkit.create_model("digits_cnn").eval()

    def tune(m: nn.Module, epochs: int, tag: str) -> nn.Module:
        fit(m, data.loader("train", 16), epochs=epochs, lr=0.01, progress=False)
        return m

    return model, data, tune


def check_sparsifier(name: str, tmp_dir: str) -> None:
    """It meets the target exactly (edge layers at half, the rest ranked globally), leaves plain layers, and
    its model packs into a file that loads bit-identical."""
    import slimkit

    from ..sparse import SPARSIFIERS, SparsifyConfig, pack, sparsify
    from ..sparse.masks import layer_targets, prunable_layers

    model, data, tune = _digits_job()
    entry = SPARSIFIERS.get(name)
    config = SparsifyConfig(sparsify=name, sparsity=0.6)
    r = sparsify(model, config, loader=data.loader("train", 16), finetune=tune, epochs=3 if name == "iht" else 1)
    fixed, ranked = layer_targets(prunable_layers(model), 0.6, "global", "half")
    rows = {row["name"]: row for row in r.layers}
    for n, target in fixed.items():
        assert rows[n]["nnz"] == round((1 - target) * rows[n]["numel"]), f"{name}: {n} is not at {target}"
    rest = [rows[n] for n in ranked]
    assert sum(row["nnz"] for row in rest) == round(0.4 * sum(row["numel"] for row in rest)), \
        f"{name}: the ranked layers are not at the target"
    assert not any(hasattr(m, "parametrizations") for m in r.model.modules()), f"{name}: masks left attached"
    assert entry.paper and entry.summary, f"{name}: the registry entry lacks its facts"
    path = pack(r.model, os.path.join(str(tmp_dir), f"{name}.slimpack"))
    x = next(iter(data.loader("test", 8)))[0]
    assert torch.equal(slimkit.load(path)(x), r.model(x)), f"{name}: the packed file does not reproduce it"


def lowbit_names() -> list[str]:
    from ..lowbit import METHODS

    return METHODS.names()


def check_lowbit(name: str, tmp_dir: str) -> None:
    """Each quantized layer holds at most the values its bits allow (binary: two per output channel), the
    edge layers are at 8 bits, and the packed file reproduces the model bit for bit."""
    import slimkit

    from ..lowbit import LowBitConfig, lowbit
    from ..sparse import pack
    from ..sparse.masks import prunable_layers

    model, data, tune = _digits_job()
    config = LowBitConfig(lowbit=name, act_bits=4)
    r = lowbit(model, config, loader=data.loader("train", 16), finetune=tune, epochs=1)
    for row, (_, layer) in zip(r.layers, prunable_layers(r.model)):
        w = layer.weight.detach()
        if row["edge"]:
            assert row["bits"] == 8 and row["values"] <= 255, f"{name}: {row['name']} is not at 8 bits"
        elif name == "binary":
            per_channel = max(len(torch.unique(c)) for c in w.reshape(w.shape[0], -1))
            assert per_channel <= 2, f"{name}: {row['name']} has {per_channel} values in a channel"
        else:
            limit = 3 if name == "ttq" else 2 ** config.bits
            assert row["values"] <= limit, f"{name}: {row['name']} holds {row['values']} values"
    path = pack(r.model, os.path.join(str(tmp_dir), f"{name}.slimpack"))
    x = next(iter(data.loader("test", 8)))[0]
    assert torch.equal(slimkit.load(path)(x), r.model(x)), f"{name}: the packed file does not reproduce it"
