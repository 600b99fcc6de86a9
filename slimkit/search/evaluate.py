"""How a candidate is judged during the search: an accuracy proxy, its cost counts and its latency on the runtime.

The accuracy proxy is EagleEye's (Li et al., ECCV 2020): a pruned network's batch-norm statistics
are stale, so they are re-estimated on a few training batches (every BN's running statistics reset
and accumulated as a plain average, no gradient), then top-1 is taken on fixed validation
batches. That ranks candidates the way their fine-tuned accuracy would, at the price of a few
forward passes instead of training. Latency comes from a per-layer table measured on the target
runtime (:class:`RuntimeLatencyTable`); the finalists are then measured whole.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..errors import SlimkitError


def recalibrate_bn(model: nn.Module, batches: Iterable, device: str | torch.device = "cpu") -> nn.Module:
    """Re-estimate every batch norm's running mean and variance on ``batches`` (adaptive BN, EagleEye)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    saved = {m: m.momentum for m in bns}
    was = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches, not an exponential one
    model.train()
    try:
        with torch.no_grad():
            for x, *_ in batches:
                model(x.to(device))
    finally:
        for m, mom in saved.items():
            m.momentum = mom
        model.train(was)
    return model


def accuracy_proxy(model: nn.Module, calib: Sequence, val: Sequence, device: str | torch.device = "cpu") -> float:
    """Top-1 on ``val`` batches after BN statistics re-estimated on ``calib`` batches (a copy is changed)."""
    from ..train import evaluate

    work = recalibrate_bn(copy.deepcopy(model), calib, device)
    return evaluate(work, val, device=device)["top1"]


FOLDS_BN = ("onnxruntime", "openvino")  # their graph optimisers fold batch norm into the conv before it


class RuntimeLatencyTable:
    """Predicted latency of a candidate on one runtime from per-layer times measured on that runtime.

    The whole model is measured once per batch size; each conv/linear layer of a candidate (and
    batch norm, in the runtimes that do not fold it into the conv: eager and TorchScript) is timed
    alone at the widths it has and the input size it sees (one-layer models in the runtime), cached
    by configuration. A layer's time is the median of its samples (the statistic the whole model
    is measured with) less the runtime's cost of calling a model at all (a one-ReLU model timed the
    same way), which a layer inside the whole model does not pay. The prediction starts from the
    measured whole-model time and adds ``a`` times the change in summed layer time plus ``c`` per
    timed layer added or removed (the pruner's latency table,
    :class:`slimkit.prune.latency.LatencyTable`, for any runtime and for removed blocks too).

    ``a = 1, c = 0`` is the plain table. :meth:`calibrate` fits both per batch size on a few
    candidates measured whole: a runtime that fuses layers gains less than their isolated times
    say (``a < 1``), and eager PyTorch pays a dispatch cost per module that no isolated layer
    time separates from the compute but that removing a block saves (``c > 0``).
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, runtime: str = "eager",
                 batch_sizes: Sequence[int] = (1,), threads: int = 1, repeats: int = 5,
                 saved: dict | None = None) -> None:
        from ..bench.runners import MODES

        if runtime not in MODES:
            raise SlimkitError(f"search: unknown runtime {runtime!r} (known: {', '.join(MODES)})")
        self.runtime, self.batch_sizes, self.threads, self.repeats = runtime, tuple(batch_sizes), threads, repeats
        self.example = example
        self.cache: dict[str, float] = {}
        self.added: dict[str, float] = {}  # measured here, not in ``saved``
        self.timed = (nn.Conv2d, nn.Linear) if runtime in FOLDS_BN else (nn.Conv2d, nn.Linear,
                                                                            nn.modules.batchnorm._BatchNorm)
        if saved is not None and self.matches(saved):
            # a study keeps the table it started with: its trials' constraints were computed against it
            self.reference = {int(b): float(s) for b, s in saved["reference"].items()}
            self.overhead = {int(b): float(s) for b, s in saved.get("overhead", {}).items()}
            self.cache.update(saved["layers"])
            self.fit = {int(b): tuple(v) for b, v in saved.get("fit", {}).items()}
        else:
            self.reference = {b: self.model_seconds(model, b) for b in self.batch_sizes}
            self.overhead = {b: self.seconds(nn.ReLU(), example.new_zeros((b, 1, 1, 1))) for b in self.batch_sizes}
            self.fit = {}
        self.fit = {b: self.fit.get(b, (1.0, 0.0)) for b in self.batch_sizes}
        self.reference_layers = self.layers(model)
        self._time_layers(self.reference_layers, "latency table: layers of the original timed")
        self.calibration: list[dict] = list(saved.get("calibration", [])) if saved and self.matches(saved) else []

    def matches(self, saved: dict) -> bool:
        return (saved.get("runtime") == self.runtime and saved.get("threads") == self.threads
                and sorted(int(b) for b in saved.get("overhead", {})) == sorted(self.batch_sizes)
                and sorted(int(b) for b in saved.get("reference", {})) == sorted(self.batch_sizes))

    def to_dict(self) -> dict:
        """The table as JSON: runtime, threads, whole-model seconds per batch size, per-layer seconds."""
        return {"runtime": self.runtime, "threads": self.threads,
                "reference": {str(b): s for b, s in self.reference.items()},
                "overhead": {str(b): s for b, s in self.overhead.items()},
                "fit": {str(b): list(v) for b, v in self.fit.items()}, "calibration": self.calibration,
                "layers": dict(self.cache)}

    def seconds(self, module: nn.Module, x: torch.Tensor, fastest: bool = False) -> float:
        """Median (or fastest) seconds of one call of ``module`` on ``x`` in this table's runtime."""
        from ..bench import build_runner, fixed_threads, time_interleaved

        with fixed_threads(self.threads):
            runner = build_runner(module.eval(), self.runtime, x, self.threads)
            (samples,) = time_interleaved([runner], warmup=2, repeats=self.repeats, min_time_s=0.05,
                                          min_sample_s=2e-3)
        return min(samples) if fastest else sorted(samples)[len(samples) // 2]

    def model_seconds(self, model: nn.Module, batch: int) -> float:
        return self.seconds(model, self.example.new_zeros((batch, *self.example.shape[1:])))

    def layers(self, model: nn.Module) -> dict[str, tuple]:
        """``{name: (layer config, input shape)}`` of the timed layers a forward pass calls."""
        found: dict[str, tuple] = {}
        handles = []
        for name, m in model.named_modules():
            if isinstance(m, self.timed):
                def hook(mod, args, out, n=name):
                    if n not in found and args and isinstance(args[0], torch.Tensor):
                        found[n] = (_config(mod), tuple(args[0].shape[1:]), mod)
                handles.append(m.register_forward_hook(hook))
        try:
            with torch.no_grad():
                model.eval()(self.example)
        finally:
            for h in handles:
                h.remove()
        return found

    def layer_seconds(self, config: tuple, shape: tuple, module: nn.Module, batch: int) -> float:
        key = repr((config, shape, batch))  # plain ints, bools and strings: a stable JSON key
        if key not in self.cache:
            t = self.seconds(copy.deepcopy(module), torch.randn(batch, *shape))
            self.cache[key] = self.added[key] = max(t - self.overhead[batch], 0.0)
        return self.cache[key]

    def _time_layers(self, layers: dict[str, tuple], desc: str) -> None:
        """Time (or find cached) every layer of ``layers`` at every batch size, with a progress bar."""
        from ..progress import Progress

        bar = Progress(len(layers) * len(self.batch_sizes), f"{desc} in {self.runtime}")
        for b in self.batch_sizes:
            for c, s, m in layers.values():
                self.layer_seconds(c, s, m, b)
                bar.update()
        bar.close()

    def features(self, candidate: nn.Module) -> dict[int, tuple[float, int]]:
        """Per batch size: (summed layer seconds, timed layers) of ``candidate`` minus the original's."""
        layers = self.layers(candidate)
        out = {}
        for b in self.batch_sizes:
            before = sum(self.layer_seconds(c, s, m, b) for c, s, m in self.reference_layers.values())
            after = sum(self.layer_seconds(c, s, m, b) for c, s, m in layers.values())
            out[b] = (after - before, len(layers) - len(self.reference_layers))
        return out

    def predict(self, candidate: nn.Module) -> dict[int, float]:
        """Predicted seconds of ``candidate`` per batch size."""
        out = {}
        for b, (ds, dl) in self.features(candidate).items():
            a, c = self.fit[b]
            out[b] = max(self.reference[b] + a * ds + c * dl, 1e-9)
        return out

    def calibrate(self, model: nn.Module, anchors: Sequence[nn.Module], repeats: int = 15) -> list[dict]:
        """Fit ``a`` and ``c`` (class docstring) per batch size to ``anchors`` measured whole against ``model``.

        Least squares on ``measured - reference = a * d_seconds + c * d_layers`` with both
        non-negative (a column that does not vary among the anchors is left out); returns, and
        keeps in :attr:`calibration`, each anchor's measured and predicted ratios.
        """
        import numpy as np

        from ..progress import Progress

        feats = [self.features(m) for m in anchors]
        bar = Progress(len(anchors), f"latency table: policies timed whole in {self.runtime}")
        measured = []
        for m in anchors:
            measured.append(measured_ratios(model, m, self.example, self.runtime, self.batch_sizes, self.threads,
                                            repeats))
            bar.update()
        bar.close()
        for b in self.batch_sizes:
            y = np.array([(r[b] - 1.0) * self.reference[b] for r in measured])
            x = np.array([f[b] for f in feats], dtype=float)
            self.fit[b] = _nonnegative_fit(x, y)
        self.calibration = [{"measured": {str(b): r[b] for b in self.batch_sizes},
                             "predicted": {str(b): p / self.reference[b] for b, p in self.predict(m).items()}}
                            for m, r in zip(anchors, measured)]
        return self.calibration

    def ratio(self, candidate: nn.Module) -> float:
        """The worst, over batch sizes, of predicted candidate latency / measured original latency."""
        pred = self.predict(candidate)
        return max(pred[b] / self.reference[b] for b in self.batch_sizes)


def _config(m: nn.Module) -> tuple:
    if isinstance(m, nn.Conv2d):
        return ("conv", m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                m.bias is not None)
    if isinstance(m, nn.Linear):
        return ("linear", m.in_features, m.out_features, m.bias is not None)
    return ("bn", m.num_features)


def _nonnegative_fit(x, y) -> tuple[float, float]:
    """``(a, c) >= 0`` minimising ``|x @ (a, c) - y|``: the best of the full fit and each one-column fit."""
    import numpy as np

    best, best_err = (1.0, 0.0), float("inf")
    for cols in ((0, 1), (0,), (1,)):
        sub = x[:, cols]
        if not np.any(sub):  # e.g. no anchor removes a layer
            continue
        coef = np.linalg.lstsq(sub, y, rcond=None)[0]
        if np.any(coef < 0):
            continue
        full = np.zeros(2)
        full[list(cols)] = coef
        err = float(np.sum((x @ full - y) ** 2))
        if err < best_err:
            best, best_err = (float(full[0]), float(full[1])), err
    return best


def measure_against(reference: nn.Module, candidate: nn.Module, example: torch.Tensor, runtime: str,
                    batch_sizes: Sequence[int], threads: int, repeats: int = 15, what: str = "the candidate"):
    """The interleaved comparison of ``candidate`` with ``reference`` in ``runtime`` (a ``CompareResult``)."""
    from ..bench import compare

    r = compare(reference, candidate, tuple(example.shape[1:]), batch_sizes=tuple(batch_sizes), threads=threads,
                modes=(runtime,), warmup=3, repeats=repeats, min_time_s=0.3, roofline=False)
    if r.errors:
        raise SlimkitError(f"search: cannot time {what} in {runtime}: {r.errors}")
    return r


def measured_ratios(reference: nn.Module, candidate: nn.Module, example: torch.Tensor, runtime: str,
                    batch_sizes: Sequence[int], threads: int, repeats: int = 15) -> dict[int, float]:
    """Interleaved candidate / reference latency in ``runtime`` per batch size (:func:`slimkit.bench.compare`)."""
    r = measure_against(reference, candidate, example, runtime, batch_sizes, threads, repeats)
    return {b: r.ratio(runtime, b) for b in batch_sizes}


def measured_ratio(reference: nn.Module, candidate: nn.Module, example: torch.Tensor, runtime: str,
                   batch_sizes: Sequence[int], threads: int, repeats: int = 15) -> float:
    """The closed-loop check: interleaved candidate / reference latency in ``runtime``, the worst batch size."""
    return max(measured_ratios(reference, candidate, example, runtime, batch_sizes, threads, repeats).values())


def file_bytes(model: nn.Module, packed: bool = False) -> int:
    """Bytes of the model on disk (written to a temporary file): its artifact, or with ``packed`` the file
    ``slimkit pack`` writes (sparse indices, codebooks, Huffman), what a sparse or shared-weight model costs."""
    import os
    import tempfile

    from ..artifact import save
    from ..sparse import pack

    with tempfile.TemporaryDirectory(prefix="slimkit-size-") as tmp:
        write, name = (pack, "m.slimpack") if packed else (save, "m.safetensors")
        return os.path.getsize(write(model, os.path.join(tmp, name)))


def finite(x: float) -> float:
    return x if math.isfinite(x) else float("inf")
