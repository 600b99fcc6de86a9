"""The before/after model card of a compress job, measured: accuracy, counts, bytes on disk, latency per runtime.

Latency is never inferred from MACs: the original and the result are timed interleaved (median of
per-pair ratios, :func:`slimkit.bench.compare`) in the target runtime and in eager PyTorch, at
every batch size of the job. Counts come from the float model (an int8 model has the same
parameters and MACs; its layers are int8 kernels, which the export's runtime-graph report checks).
"""

from __future__ import annotations

import torch
from torch import nn

NOISY_CV = 0.15  # per-pair latency ratios spread more than this: the timing is flagged in the report


def accuracy(model: nn.Module, data) -> dict:
    """Top-1 and top-5 on the test split."""
    from ..train import evaluate

    r = evaluate(model, data.loader("test", 256))
    return {"test_top1": r["top1"], "test_top5": r["top5"], "test_n": r["n"]}


def counts(model: nn.Module, example: torch.Tensor) -> dict:
    from ..profile import profile

    p = profile(model, example)
    # zeros of a sparse model still count as parameters of its dense layers; the non-zero ones are what a packed
    # file stores
    nonzero = sum(int((t != 0).sum()) for t in model.state_dict().values()
                  if isinstance(t, torch.Tensor) and t.is_floating_point())
    return {"params": p.params, "nonzero_params": nonzero, "macs": p.macs,
            "activation_peak_bytes": p.activation_peak_bytes}


def latency(original: nn.Module, final: nn.Module, example: torch.Tensor, runtimes, batch_sizes, threads: int,
            log) -> tuple[dict, list[str]]:
    """``{runtime: {bs: {original_ms, final_ms, ratio, cv}}}`` timed interleaved, and warnings on noisy timings."""
    from ..errors import SlimkitError
    from ..search.evaluate import measure_against

    out, warnings = {}, []
    for rt in runtimes:
        try:
            r = measure_against(original, final, example, rt, batch_sizes, threads, what="the result")
        except SlimkitError as e:
            warnings.append(f"latency in {rt} not measured: {e}")
            continue
        out[rt] = {}
        for b in batch_sizes:
            cell = r.results[rt][b]
            ratio = cell["ratio"]
            out[rt][str(b)] = {"original_ms": cell["a"]["median_ms"], "final_ms": cell["b"]["median_ms"],
                               "ratio": ratio["median"], "speedup": 1 / ratio["median"], "cv": ratio.get("cv")}
            if ratio.get("cv") is not None and ratio["cv"] > NOISY_CV:
                warnings.append(f"noisy timing in {rt} at batch {b}: the per-pair ratios vary by "
                                f"{ratio['cv']:.0%} (coefficient of variation); rerun on an idle machine")
        warnings += [f"{rt}: {w}" for w in r.warnings]
        log(f"measured in {rt}: " + ", ".join(f"bs{b} {c['original_ms']:.2f} -> {c['final_ms']:.2f} ms "
                                              f"(x{c['speedup']:.2f})" for b, c in out[rt].items()))
    return out, warnings


def layers(original: nn.Module, final_float: nn.Module, example: torch.Tensor, bits: dict[str, int]) -> list[dict]:
    """Per conv/linear layer of the original: MACs before/after, eager latency before/after at batch 1, kept output
    channels, the bits its weights are stored in (32 float, 8 int8, or a codebook's) and, where it was decomposed
    into a sequence of smaller layers, their inner widths (``rank``) with the sequence's MACs and time summed."""
    from ..profile import profile
    from ..report import layer_latency

    before = {r.name: r for r in profile(original, example).layers}
    after = {r.name: r.macs for r in profile(final_float, example).layers}
    t0, t1 = layer_latency(original, example), layer_latency(final_float, example)
    modules = dict(final_float.named_modules())
    rows = []
    for name, m in original.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)) or name not in before:
            continue
        now = modules.get(name)
        parts = [] if now is None or isinstance(now, (nn.Conv2d, nn.Linear)) else \
            [x for x in now.modules() if isinstance(x, (nn.Conv2d, nn.Linear))]
        last = parts[-1] if parts else now
        width0 = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        width1 = (last.out_channels if isinstance(last, nn.Conv2d) else last.out_features
                  if isinstance(last, nn.Linear) else 0)

        def summed(table: dict, name: str = name) -> float:
            return table.get(name, 0) + sum(v for k, v in table.items() if k.startswith(name + "."))

        row = {"name": name, "type": type(m).__name__, "macs_before": before[name].macs, "macs_after": summed(after),
               "latency_before_ms": t0.get(name, 0.0), "latency_after_ms": summed(t1),
               "channels_before": width0, "channels_after": width1, "kept": width1 / width0 if width0 else 0,
               "bits": bits.get(name, 32) if now is not None else 0}
        if parts:
            row["rank"] = [p.out_channels if isinstance(p, nn.Conv2d) else p.out_features for p in parts[:-1]]
            row["rank_fraction"] = row["rank"][-1] / width0 if width0 else 0  # the core's width over the layer's
        rows.append(row)
    return rows


def models_report(entries: list[tuple[str, nn.Module]], example: torch.Tensor, data=None, *, runtimes=("eager",),
                  batch_sizes=(1,), threads: int = 1, log=print) -> dict:
    """The report dict of ``slimkit report MODEL [MODEL ...] --html OUT`` for any artifacts or models.

    The first model is "before" and the last "after" (one model: both); every model is a point of the
    trade-off plots; the last model's provenance gives the stages. With ``data`` the cards carry test accuracy.
    """
    from ..search.evaluate import file_bytes

    first, last = entries[0][1], entries[-1][1]

    def card(model: nn.Module) -> dict:
        out = counts(model, example) | {"bytes": file_bytes(model)}
        if data is not None:
            out |= accuracy(model, data)
        return out

    before, after = card(first), card(last)
    warnings: list[str] = []
    if len(entries) > 1:
        after["latency"], warnings = latency(first, last, example, runtimes, batch_sizes, threads, log)
    points = []
    for i, (label, model) in enumerate(entries):
        c = before if i == 0 else after if i == len(entries) - 1 else card(model)
        ms = None
        if after.get("latency") and i in (0, len(entries) - 1):
            cell = next(iter(next(iter(after["latency"].values())).values()))
            ms = cell["original_ms" if i == 0 else "final_ms"]
        points.append({"name": label, "kind": "original" if i == 0 else "result" if i == len(entries) - 1 else "stage",
                       "top1": c.get("test_top1"), "macs": c["macs"], "params": c["params"], "latency_ms": ms})
    stages = [{"name": r.get("stage", "?"), "config": r.get("params", {}), "metrics": r.get("metrics", {})}
              for r in getattr(last, "slimkit_history", [])]
    return {"title": f"slimkit report: {entries[-1][0]}", "subtitle": " vs ".join(label for label, _ in entries),
            "cards": {"before": before, "after": after}, "stages": stages, "points": points,
            "layers": layers(first, last, example, {}) if _float(first) and _float(last) else [],
            "warnings": warnings, "footer": "Written by slimkit report."}


def _float(model: nn.Module) -> bool:
    from ..quant.core import is_quantized_module

    return not any(is_quantized_module(m) for m in model.modules())
