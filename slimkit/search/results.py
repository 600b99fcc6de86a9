"""What a finished study says: its trials as rows, the Pareto front, the best policy per budget, the plot.

Every completed trial becomes a row: the policy, the accuracy proxy, the MAC and parameter ratios,
the predicted latency ratio per batch size and the packed bytes on disk. The Pareto front is over
accuracy (higher), latency (lower; bytes on disk when the study has a size budget and no latency
one, else MACs) and parameters (lower), among all completed
trials, so a user sees what a looser or tighter budget would have bought. :func:`choose` takes the
best feasible rows by proxy and measures each whole on the runtime (the closed loop), keeping the
first that meets the budget as measured: no reported result violates its budget on the machine.
"""

from __future__ import annotations

import re
from collections.abc import Callable

BUDGET_LEVELS = (0.8, 0.9, 1.0, 1.1, 1.25)  # per-budget table: these multiples of the study's budget


def trial_rows(study) -> list[dict]:
    """One row per completed trial, best proxy first."""
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        a = t.user_attrs
        if "policy" not in a:
            continue
        rows.append({"trial": t.number, "policy": a["policy"], "proxy": float(t.values[0]),
                     "macs_ratio": a.get("macs_ratio"), "params_ratio": a.get("params_ratio"),
                     "latency_ratio": a.get("latency_ratio"), "latency": a.get("latency"),
                     "size_ratio": a.get("size_ratio"), "bytes": a.get("bytes"),
                     "feasible": all(c <= 0 for c in a.get("constraints", [0.0])),
                     "evaluated": a.get("proxy") != "skipped: over budget",
                     "int8_layers": a.get("int8_layers", 0), "warm_start": a.get("warm_start")})
    rows.sort(key=lambda r: (-r["proxy"], r["trial"]))
    return rows


def cost_key(rows: list[dict]) -> str:
    """The cost a study is read by: latency when it has a latency budget, else bytes on disk, else MACs."""
    for key in ("latency_ratio", "size_ratio"):
        if any(r.get(key) is not None for r in rows):
            return key
    return "macs_ratio"


AXIS_LABELS = {"latency_ratio": "predicted latency (fraction of the original)",
               "size_ratio": "packed bytes on disk (fraction of the original's file)",
               "macs_ratio": "MACs (fraction of the original)"}


def pareto_front(rows: list[dict]) -> list[dict]:
    """The rows no other row beats on accuracy, latency (or MACs) and parameters at once, cheapest first."""
    key = cost_key(rows)
    pts = [r for r in rows if r["evaluated"]]

    def dominates(a, b):
        ge = a["proxy"] >= b["proxy"] and a[key] <= b[key] and a["params_ratio"] <= b["params_ratio"]
        return ge and (a["proxy"] > b["proxy"] or a[key] < b[key] or a["params_ratio"] < b["params_ratio"])

    front = [r for r in pts if not any(dominates(o, r) for o in pts if o is not r)]
    return sorted(front, key=lambda r: (r[key], -r["proxy"]))


def per_budget(rows: list[dict], budget: float, key: str) -> list[dict]:
    """The best proxy within each of :data:`BUDGET_LEVELS` times ``budget`` (on predicted costs)."""
    out = []
    for level in BUDGET_LEVELS:
        b = budget * level
        within = [r for r in rows if r["evaluated"] and r[key] is not None and r[key] <= b]
        best = max(within, key=lambda r: r["proxy"]) if within else None
        out.append({"budget": b, "trial": best["trial"] if best else None, "proxy": best["proxy"] if best else None,
                    key: best[key] if best else None, "policy": best["policy"] if best else None})
    return out


def choose(rows: list[dict], measure: Callable[[dict], float] | None, budget: float | None, finalists: int,
           log: Callable[[str], None], rounds: int = 6) -> tuple[dict, list[dict]]:
    """The best feasible row whose whole-model measurement meets ``budget`` (checked in rounds of ``finalists``).

    ``measure(policy)`` is the closed-loop latency ratio; without it (no latency budget) the best
    feasible row is chosen as is. Each distinct policy is measured once (TPE proposes a good point
    again and again). When a round finds none within budget, the table's bias is learnt from it: the
    next round takes only candidates whose prediction, scaled by the median measured/predicted ratio
    seen so far, meets the budget. A candidate meets the budget when two measurements in a row do.
    Raises when no candidate meets the measured budget.
    """
    import json
    import statistics

    from ..errors import SlimkitError
    from .space import policy_text

    feasible = [r for r in rows if r["feasible"] and r["evaluated"]]
    if not feasible:
        raise SlimkitError("search: no completed trial meets the budget; run more --trials or relax the budget")
    if measure is None:
        return feasible[0], []
    distinct, seen = [], set()
    for r in feasible:  # best proxy first: the first trial of each model stands for it
        # two policies build the same model when they differ only in the widths of removed blocks: the
        # same proxy, predicted latency and parameters say so
        keys = {json.dumps(r["policy"], sort_keys=True),
                (round(r["proxy"], 9), round(r["latency_ratio"], 9), round(r.get("params_ratio", 0.0), 9))}
        if not keys & seen:
            seen |= keys
            distinct.append(r)
    checked: list[dict] = []
    done: set[int] = set()
    bias = 1.0
    for _ in range(rounds):
        pool = [r for r in distinct if r["trial"] not in done and r["latency_ratio"] * bias <= budget]
        if not pool:
            break
        for r in pool[:finalists]:
            m = measure(r["policy"])
            if m <= budget:  # a pass is confirmed by a second measurement: noise alone can pass a near miss
                m = max(m, measure(r["policy"]))
            done.add(r["trial"])
            checked.append({**r, "measured_ratio": m, "meets": m <= budget})
            log(f"finalist trial {r['trial']}: proxy {r['proxy']:.4f}, predicted {r['latency_ratio']:.3f}, "
                f"measured {m:.3f} ({'meets' if m <= budget else 'misses'} {budget:g}): {policy_text(r['policy'])}")
        met = [c for c in checked if c["meets"]]
        if met:
            return max(met, key=lambda c: c["proxy"]), checked
        bias = max(bias, statistics.median(c["measured_ratio"] / c["latency_ratio"] for c in checked))
        log(f"no finalist within budget: the table predicts {bias:.3f}x too fast here; next round takes "
            f"candidates predicted at or below {budget / bias:.3f}")
    best = min(c["measured_ratio"] for c in checked)
    raise SlimkitError(f"search: none of the {len(checked)} best candidates meets the latency budget {budget:g} when "
                       f"measured whole (best measured {best:.3f}); the per-layer table is optimistic on this "
                       "machine: use --latency-model measure, lower --target-latency a little or add trials")


def plot(rows: list[dict], front: list[dict], path: str, budget: float | None, title: str) -> str:
    """Accuracy proxy against latency (or MACs), parameters as colour, the front joined; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..artifact import atomic_write

    key = cost_key(rows)
    pts = [r for r in rows if r["evaluated"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    sc = ax.scatter([r[key] for r in pts], [r["proxy"] for r in pts], c=[r["params_ratio"] for r in pts], s=14,
                    cmap="viridis", alpha=0.8)
    fig.colorbar(sc, ax=ax, label="parameters (fraction of the original)")
    ax.plot([r[key] for r in front], [r["proxy"] for r in front], "r-o", ms=4, lw=1, label="Pareto front")
    if budget is not None:
        ax.axvline(budget, color="grey", ls="--", lw=1, label=f"budget {budget:g}")
    ax.set_xlabel(AXIS_LABELS[key])
    ax.set_ylabel("accuracy proxy (top-1, BN re-estimated)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def redact(url: str) -> str:
    """A storage URL without its password."""
    return re.sub(r"://([^:@/]+):[^@/]*@", r"://\1:***@", url)


def markdown(results: dict) -> str:
    """The study as Markdown: the chosen policy, the finalists, the best per budget and the Pareto front."""
    from .space import policy_text

    s, ch = results["study"], results["chosen"]
    key = results["cost_key"]
    lines = [f"# Search {s['name']}", "",
             f"{s['complete']} trials complete ({s['pruned']} pruned, {s['failed']} failed) in {s['seconds']:.0f} s "
             f"({s['seconds_per_trial']:.2f} s per trial, {s['trials_per_hour']:.0f} per hour); storage "
             f"{s['storage']}.", "",
             f"Chosen: trial {ch['trial']}, proxy {ch['proxy']:.4f}, {key} {ch[key]:.3f} "
             + {"latency_ratio": "predicted", "size_ratio": "packed"}.get(key, "counted")
             + (f", {ch['measured_ratio']:.3f} measured" if ch.get("measured_ratio") is not None else "")
             + f": {policy_text(ch['policy'])}", ""]
    if results.get("finalists"):
        lines += ["| trial | proxy | predicted | measured | meets |", "|---|---|---|---|---|"]
        lines += [f"| {f['trial']} | {f['proxy']:.4f} | {f['latency_ratio']:.3f} | {f['measured_ratio']:.3f} | "
                  f"{'yes' if f['meets'] else 'no'} |" for f in results["finalists"]]
        lines.append("")
    lines += [f"| budget ({key}) | best trial | proxy |", "|---|---|---|"]
    lines += [f"| {b['budget']:.3f} | {b['trial'] if b['trial'] is not None else '-'} | "
              f"{b['proxy']:.4f} |" if b["proxy"] is not None else f"| {b['budget']:.3f} | - | - |"
              for b in results["per_budget"]]
    lines += ["", f"| trial | proxy | {key} | params | policy |", "|---|---|---|---|---|"]
    lines += [f"| {r['trial']} | {r['proxy']:.4f} | {r[key]:.3f} | {r['params_ratio']:.3f} | "
              f"{policy_text(r['policy'])} |" for r in results["pareto"]]
    final = results.get("final")
    if final:
        lines += ["", "Final model: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in final.items() if not isinstance(v, (dict, list)))]
    return "\n".join(lines) + "\n"
