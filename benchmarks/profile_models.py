"""Profile table, counter cross-check and measurement noise (the "Measure" issue's benchmark).

1. For the CIFAR ResNets and ten torchvision models: parameters, MACs (slimkit.profile), bs1
   latency and bs64 throughput (slimkit.bench, eager and frozen TorchScript) and the achieved
   fraction of this machine's measured fp32 matmul peak.
2. The same models counted by fvcore, thop and ptflops when installed, with the reason for
   each difference (see docs/benchmarks.md).
3. Measurement noise: CV of repeated bs1 latency of resnet20, timed in sequence vs interleaved.

    python benchmarks/profile_models.py --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table, record  # noqa: E402

import slimkit  # noqa: E402
from slimkit.bench import bench, compare, machine_peak, stats  # noqa: E402
from slimkit.models import default_input_size  # noqa: E402
from slimkit.profile import profile  # noqa: E402

CIFAR_MODELS = ["resnet20", "resnet56", "resnet110"]
TV_MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "shufflenet_v2_x1_0",
             "squeezenet1_1", "efficientnet_b0", "regnet_y_400mf", "mnasnet1_0"]


def _quiet(fn):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn()


def other_counters(model, x) -> list[str]:
    """MACs/FLOPs of the same model by fvcore, thop and ptflops ('-' where not installed)."""
    out = []
    try:
        from fvcore.nn import FlopCountAnalysis

        fa = FlopCountAnalysis(copy.deepcopy(model), x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        out.append(f"{int(fa.total()):,}")
    except ImportError:
        out.append("-")
    try:
        import thop

        out.append(f"{int(_quiet(lambda: thop.profile(copy.deepcopy(model), inputs=(x,), verbose=False))[0]):,}")
    except ImportError:
        out.append("-")
    try:
        from ptflops import get_model_complexity_info

        for backend in ("pytorch", "aten"):
            macs, _ = _quiet(lambda: get_model_complexity_info(copy.deepcopy(model), tuple(x.shape[1:]),
                                                               as_strings=False, print_per_layer_stat=False,
                                                               backend=backend))
            out.append(f"{int(macs):,}")
    except ImportError:
        out += ["-", "-"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5, help="rounds of the noise experiment")
    p.add_argument("--models", help="comma-separated subset (default: 3 CIFAR ResNets + 10 torchvision models)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    specs = args.models.split(",") if args.models else CIFAR_MODELS + [f"torchvision:{n}" for n in TV_MODELS]
    peak = machine_peak(args.threads)

    rows, counts = [], []
    for spec in specs:
        model = slimkit.create_model(spec).eval()
        size = default_input_size(spec)
        x = torch.randn(1, *size)
        prof = profile(model, x)
        r = bench(model, size, batch_sizes=(1, 64), threads=args.threads, modes=("eager", "torchscript"),
                  repeats=args.repeats, min_time_s=0.5, name=spec)
        cell = {m: r.results.get(m, {}) for m in ("eager", "torchscript")}
        row = [spec, "x".join(map(str, size)), f"{prof.params:,}", f"{prof.macs:,}"]
        for mode in ("eager", "torchscript"):
            bs1, bs64 = cell[mode].get(1), cell[mode].get(64)
            row += [f"{bs1['median_ms']:.2f} ({bs1['cv']:.0%})" if bs1 else "failed",
                    f"{bs64['throughput_ips']:.0f}" if bs64 else "failed",
                    f"{bs64['peak_fraction']:.0%}" if bs64 and bs64.get("peak_fraction") is not None else "-"]
        rows.append(row)
        counts.append([spec, f"{prof.macs:,}", *other_counters(model, x)])
        print(" | ".join(row), flush=True)

    noise_seq = [bench(slimkit.create_model("resnet20"), (3, 32, 32), batch_sizes=(1,), threads=1, modes=("eager",),
                       repeats=30, min_time_s=0.5, roofline=False).results["eager"][1] for _ in range(args.rounds)]
    r20 = slimkit.create_model("resnet20")
    noise_pair = [compare(r20, r20, (3, 32, 32), batch_sizes=(1,), threads=1, modes=("eager",), repeats=30,
                          min_time_s=0.5, roofline=False).results["eager"][1] for _ in range(args.rounds)]
    seq_medians = [m["median_ms"] for m in noise_seq]
    ratios = [e["ratio"]["median"] for e in noise_pair]

    body = (f"Machine peak (fp32 matmul, {args.threads} threads): median {peak.fp32_gflops:.1f} GFLOP/s, best "
            f"{peak.fp32_best_gflops:.1f}; int8: "
            f"{f'{peak.int8_gops:.1f} GOP/s' if peak.int8_gops else peak.int8_note}. "
            "Latency is the median over repeated timed runs (CV in brackets); % peak is 2 x MACs / bs64 latency "
            "over the best fp32 matmul rate (the roof). MACs are multiply-accumulates of conv/linear/matmul only.\n\n")
    body += markdown_table(["model", "input", "params", "MACs", "eager bs1 ms (CV)", "eager bs64 img/s", "eager % peak",
                            "TorchScript bs1 ms (CV)", "TorchScript bs64 img/s", "TorchScript % peak"], rows)
    body += ("\n\nThe same models counted by other tools (batch 1). Convolution and linear MACs agree everywhere "
             "(fvcore's conv+linear share equals slimkit's MACs exactly); the totals differ by what each tool adds "
             "on top: fvcore adds batch norm at 2 ops/element and adaptive pooling, and skips ReLU, residual adds "
             "and max-pool; thop adds batch norm at 4 ops/element, counts module calls only (misses functional ops "
             "such as residual adds and `F.adaptive_avg_pool2d`) and ignores linear biases; ptflops' pytorch backend "
             "adds batch norm and linear bias and counts ReLU/max-pool/avg-pool twice (its module hook and its "
             "functional patch both fire) while missing `x + y`; ptflops' aten backend adds only the linear bias. "
             "slimkit keeps all of those in a separate `other_ops` count.\n\n")
    body += markdown_table(["model", "slimkit MACs", "fvcore", "thop", "ptflops (pytorch)", "ptflops (aten)"], counts)
    seq_cv = [m["cv"] for m in noise_seq]
    pair_cv = [e["ratio"]["cv"] for e in noise_pair]
    body += (f"\n\nMeasurement noise, resnet20 bs1 eager, 1 thread, {args.rounds} rounds of 30 samples: timed alone, "
             f"the per-round CV was {', '.join(f'{c:.0%}' for c in seq_cv)} and the round medians "
             f"{', '.join(f'{m:.3f}' for m in seq_medians)} ms (CV across rounds {stats(seq_medians)['cv']:.1%}); "
             f"interleaved against itself, the per-pair ratio CV was {', '.join(f'{c:.0%}' for c in pair_cv)} and "
             f"the round ratios {', '.join(f'{r:.3f}' for r in ratios)} (CV across rounds {stats(ratios)['cv']:.1%}, "
             f"worst deviation from 1: {max(abs(r - 1) for r in ratios):.1%}).")
    record("profile-models", "Profiles, counter cross-check and measurement noise", body)


if __name__ == "__main__":
    main()
