"""Pruning a network whose middle is concat -> channel shuffle -> SE gate -> grouped conv (issue 22's goal).

For slimkit and Torch-Pruning on the same :class:`slimkit.testing.helpers.ShuffleGateNet`, at the
uniform ratios 0.3, 0.5 and 0.7 and at a target of 0.5x of the MACs (slimkit's ``target_macs``;
Torch-Pruning's global ratio bisected to it): whether the pruned model runs, its MACs, its
equivalence to the original with the removed channels zeroed (slimkit records the kept
channels; Torch-Pruning does not, so only "runs" is checked there), and its batch-1 latency in
eager PyTorch as a ratio to the original (interleaved medians, 1 thread, CIFAR-sized input).

    python benchmarks/prune_any.py
"""

from __future__ import annotations

import argparse
import copy
import statistics
import warnings

import torch
from common import markdown_table, record

from slimkit.bench import build_runner, time_interleaved
from slimkit.profile import profile
from slimkit.prune import prune
from slimkit.testing import randomize_bn, zeroed_copy
from slimkit.testing.helpers import ShuffleGateNet


def _tp(model, ratio, x):
    import torch_pruning as tp

    m = copy.deepcopy(model).eval()
    pruner = tp.pruner.MetaPruner(m, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
                                  ignored_layers=[m.head], round_to=1)
    pruner.step()
    return m


def _tp_target(model, target, x, macs0):
    lo, hi, best = 0.0, 0.95, None
    for _ in range(12):
        mid = (lo + hi) / 2
        try:
            m = _tp(model, mid, x)
            macs = profile(m, x).macs
        except Exception:
            hi = mid
            continue
        if macs <= target * macs0:
            hi, best = mid, m
        else:
            lo = mid
    return best


def _speed(model, pruned, x) -> float:
    runners = [build_runner(m.eval(), "eager", x, 1) for m in (model, pruned)]
    times = time_interleaved(runners, repeats=30, min_time_s=2.0)
    return statistics.median(a / b for a, b in zip(times[0], times[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = randomize_bn(ShuffleGateNet()).eval()
    x = torch.randn(1, 3, args.size, args.size)
    xs = torch.randn(4, 3, args.size, args.size, dtype=torch.float64)
    macs0 = profile(model, x).macs
    m64 = copy.deepcopy(model).double()
    rows = []
    for label, kw in (("ratio 0.3", {"ratio": 0.3}), ("ratio 0.5", {"ratio": 0.5}), ("ratio 0.7", {"ratio": 0.7}),
                      ("target 0.5x MACs", {"target_macs": 0.5})):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = prune(m64, xs[:1], criterion="l1", round_to=1, **kw)
        with torch.no_grad():
            diff = (r.model(xs) - zeroed_copy(m64, r.kept)(xs)).abs().max().item()
        pruned = r.model.float().eval()
        notes = "; ".join(str(w.message)[:80] for w in caught) or "none"
        rows.append(["slimkit", label, "yes", f"{profile(pruned, x).macs / macs0:.3f}", f"{diff:.1e}",
                     f"{_speed(model, pruned, x):.2f}x", notes])
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            continue
        try:
            tpm = _tp_target(model, 0.5, x, macs0) if "target_macs" in kw else _tp(model, kw["ratio"], x)
            if tpm is None:
                raise RuntimeError("no global ratio gave a model that runs and meets the target")
            with torch.no_grad():
                tpm(x)
            rows.append(["Torch-Pruning " + torch_pruning.__version__, label, "yes",
                         f"{profile(tpm, x).macs / macs0:.3f}", "n/a", f"{_speed(model, tpm, x):.2f}x", "-"])
        except Exception as e:
            msg = str(e).strip().splitlines()[0][:110] if str(e).strip() else type(e).__name__
            rows.append(["Torch-Pruning " + torch_pruning.__version__, label, "no", "-", "-", "-",
                         f"{type(e).__name__}: {msg}"])
    body = (f"ShuffleGateNet (slimkit.testing.helpers): stem -> [3x3 | 1x1] concat -> nn.ChannelShuffle(4) -> SE gate "
            f"-> grouped 3x3 conv (groups=4) -> chunk(2) -> depthwise x2 on one half -> concat -> conv -> linear; "
            f"{macs0:,} MACs at {args.size}x{args.size}, random weights with random batch-norm statistics. "
            f"Before issue 22 slimkit blocked every channel the shuffle, the grouped conv and the chunk touched and "
            f"could not get below 0.86x of the MACs. MACs are slimkit's profile of the pruned model; 'max diff' is "
            f"the largest difference, in float64, between the pruned model and the original with the removed "
            f"channels zeroed; speed-up is eager PyTorch at batch 1, 1 thread, median of interleaved rounds.\n\n"
            + markdown_table(["tool", "request", "runs", "MACs after", "max diff vs zeroed copy", "bs1 speed-up",
                              "warnings / error"], rows))
    record("prune-any", "Pruning through concat, shuffle, SE gate, grouped conv and chunk", body)


if __name__ == "__main__":
    main()
