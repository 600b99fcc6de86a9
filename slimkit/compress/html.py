"""``report.html``: one self-contained file (no network, images inline) that a person would rather look at than read.

Sections (each an element with its id, which the browser test checks): ``summary`` (the target,
met or not, and the headline numbers), ``card`` (the model card before/after: top-1/top-5 on the
test split, parameters, MACs, size on disk, latency per runtime and batch size, int8/float
layers), ``plan`` (what was chosen and why), ``stages`` (every step with its config and the metrics
after it), ``plots`` (Canziani et al. 2016: accuracy vs MACs with bubble area = parameters, and
accuracy vs measured latency, with the original, each stage and the search's Pareto front),
``layers`` (per-layer bars: MACs and measured latency before/after, kept channels, bits) and
``warnings`` (layers kept float, unprunable layers, noisy timings, an unmet target).

Plots are matplotlib PNGs embedded as ``data:`` URIs, so the file works offline and prints; no
script runs in the page. :func:`write_html` writes atomically.
"""

from __future__ import annotations

import base64
import html
import io
import json

SECTIONS = ("summary", "card", "plan", "stages", "plots", "layers", "warnings")

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1d2330;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.2em;border-bottom:2px solid #e3e7ee;padding-bottom:.2em;
margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}th,td{border:1px solid #d5dae3;padding:.3em .6em;
text-align:right}th{background:#f2f4f8}td:first-child,th:first-child{text-align:left}
.met{color:#0a7d33;font-weight:600}.unmet{color:#b3261e;font-weight:600}.muted{color:#667085;font-size:.9em}
.verdict{padding:.8em 1em;border-radius:6px;background:#f2f4f8;margin:1em 0}
img{max-width:100%;height:auto;border:1px solid #e3e7ee;margin:.4em 0}
td.cfg{text-align:left;max-width:560px;word-break:break-word}
code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em}
pre{background:#f6f8fa;padding:.6em;overflow-x:auto;white-space:pre-wrap}
ul.warn li{color:#8a4b00}
.grid{display:flex;flex-wrap:wrap;gap:1em}.grid>figure{flex:1 1 440px;margin:0}
figcaption{font-size:.85em;color:#667085}
@media print{body{max-width:none;margin:0}h2{break-after:avoid}img,table,figure{break-inside:avoid}}
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _png(fig) -> str:
    """A matplotlib figure as a ``data:image/png;base64`` URI (the figure is closed)."""
    from ..report import _pyplot

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(value, kind: str = "") -> str:
    if value is None:
        return "–"
    if kind == "pct":
        return f"{100 * value:.2f}%"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "ms":
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def tradeoff_plot(points: list[dict], x: str) -> str | None:
    """Accuracy vs ``x`` (``macs`` or ``latency_ms``), bubble area ~ parameters; None without two points."""
    pts = [p for p in points if p.get(x) is not None and p.get("top1") is not None]
    if len(pts) < 2:
        return None
    from ..report import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    biggest = max(p.get("params") or 1 for p in pts)
    styles = {"original": ("tab:blue", "o"), "stage": ("tab:orange", "o"), "pareto": ("tab:gray", "s"),
              "result": ("tab:green", "*")}
    scale = 1e6 if x == "macs" else 1.0
    for kind, (color, marker) in styles.items():
        group = [p for p in pts if p.get("kind") == kind]
        if not group:
            continue
        ax.scatter([p[x] / scale for p in group], [100 * p["top1"] for p in group],
                   s=[30 + 900 * (p.get("params") or 0) / biggest for p in group], c=color, marker=marker,
                   alpha=0.35 if kind == "pareto" else 0.7, label={"pareto": "search Pareto front (validation proxy)",
                                                                    "stage": "after each stage"}.get(kind, kind))
        if kind != "pareto":
            for p in group:
                ax.annotate(p["name"], (p[x] / scale, 100 * p["top1"]), fontsize=8, xytext=(5, 4),
                            textcoords="offset points")
    ax.set_xlabel("MACs (millions)" if x == "macs" else "latency (ms, measured)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("accuracy vs MACs (bubble area = parameters)" if x == "macs"
                 else "accuracy vs measured latency (bubble area = parameters)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", markerscale=0.5)
    return _png(fig)


def layers_plot(rows: list[dict]) -> str | None:
    """Per-layer bars: MACs and measured latency before/after, kept channel fraction (or rank) and bits."""
    if not rows:
        return None
    from ..report import _pyplot

    plt = _pyplot()
    n = len(rows)
    fig, axes = plt.subplots(4, 1, figsize=(max(7.5, 0.24 * n), 9), sharex=True)
    idx = range(n)
    w = 0.4
    axes[0].bar([i - w / 2 for i in idx], [r["macs_before"] / 1e6 for r in rows], w, label="before", color="tab:blue")
    axes[0].bar([i + w / 2 for i in idx], [r["macs_after"] / 1e6 for r in rows], w, label="after", color="tab:green")
    axes[0].set_ylabel("MACs (M)")
    axes[0].legend(fontsize=7)
    axes[1].bar([i - w / 2 for i in idx], [r["latency_before_ms"] for r in rows], w, color="tab:blue")
    axes[1].bar([i + w / 2 for i in idx], [r["latency_after_ms"] for r in rows], w, color="tab:green")
    axes[1].set_ylabel("latency (ms, bs1, eager)")
    # a decomposed layer keeps its channels: its bar is the rank (the core's width over the layer's), in another colour
    axes[2].bar(idx, [r.get("rank_fraction", r["kept"]) for r in rows],
                color=["tab:red" if "rank" in r else "tab:orange" for r in rows])
    axes[2].set_ylabel("kept channels\n(red: rank)" if any("rank" in r for r in rows) else "kept channels")
    axes[2].set_ylim(0, 1.05)
    axes[3].bar(idx, [r["bits"] for r in rows], color="tab:purple")
    axes[3].set_ylabel("weight bits")
    axes[3].set_xticks(list(idx))
    axes[3].set_xticklabels([r["name"] for r in rows], rotation=90, fontsize=6)
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _card_table(cards: dict) -> str:
    before, after = cards.get("before") or {}, cards.get("after") or {}
    rows = [("test top-1", "test_top1", "pct"), ("test top-5", "test_top5", "pct"), ("parameters", "params", "int"),
            ("non-zero float values", "nonzero_params", "int"),
            ("MACs", "macs", "int"), ("size on disk (bytes)", "bytes", "int"),
            ("peak activation memory (bytes)", "activation_peak_bytes", "int"), ("int8 layers", "int8_layers", ""),
            ("float conv/linear layers", "float_layers", "")]
    out = ["<table><tr><th></th><th>before</th><th>after</th><th>after / before</th></tr>"]
    for label, key, kind in rows:
        if key not in before and key not in after:
            continue
        b, a = before.get(key), after.get(key)
        ratio = (f"{a / b:.3f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b
                 and kind not in ("pct", "") else (f"{100 * (a - b):+.2f} pts" if kind == "pct" and a is not None
                                         and b is not None else ""))
        out.append(f"<tr><td>{_e(label)}</td><td>{_e(_fmt(b, kind))}</td><td>{_e(_fmt(a, kind))}</td>"
                   f"<td>{_e(ratio)}</td></tr>")
    out.append("</table>")
    lat = after.get("latency") or {}
    if lat:
        out.append("<table><tr><th>runtime</th><th>batch</th><th>before (ms)</th><th>after (ms)</th>"
                   "<th>speed-up</th></tr>")
        for rt, per in lat.items():
            for b, cell in per.items():
                out.append(f"<tr><td>{_e(rt)}</td><td>{_e(b)}</td><td>{_fmt(cell['original_ms'], 'ms')}</td>"
                           f"<td>{_fmt(cell['final_ms'], 'ms')}</td><td>x{cell['speedup']:.2f}</td></tr>")
        out.append("</table><p class='muted'>Each pair of numbers timed interleaved on this machine "
                   "(median of per-pair ratios).</p>")
    return "\n".join(out)


def _stages_table(stages: list[dict]) -> str:
    out = ["<table><tr><th>stage</th><th>config</th><th>metrics after it</th><th>seconds</th></tr>"]
    for s in stages:
        metrics = ", ".join(f"{k} {_fmt(v, 'pct' if 'top1' in k else '')}" for k, v in (s.get("metrics") or {}).items())
        config = json.dumps(s.get("config") or {}, default=str, sort_keys=True)
        out.append(f"<tr><td>{_e(s['name'])}</td><td class='cfg'><code>{_e(config)}</code></td><td>{_e(metrics)}</td>"
                   f"<td>{_fmt(s.get('seconds'))}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def render(report: dict) -> str:
    """The HTML text of ``report`` (the dict :func:`slimkit.compress.compress` or ``slimkit report`` builds)."""
    title = report.get("title", "slimkit report")
    verdict = report.get("verdict") or {}
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<style>{CSS}</style></head><body>",
             f"<h1>{_e(title)}</h1><p class='muted'>{_e(report.get('subtitle', ''))}</p>"]
    parts.append("<section id='summary'><h2>Summary</h2>")
    if verdict:
        cls, word = ("met", "target met") if verdict.get("met") else ("unmet", "target not met")
        parts.append(f"<div class='verdict'><span class='{cls}'>{word}</span> — {_e(verdict.get('message', ''))}</div>")
    for line in report.get("headline", []):
        parts.append(f"<p>{_e(line)}</p>")
    parts.append("</section>")
    parts.append("<section id='card'><h2>Model card</h2>" + _card_table(report.get("cards", {})) + "</section>")
    plan = report.get("plan")
    parts.append("<section id='plan'><h2>Plan</h2>")
    if plan:
        parts.append(f"<p><b>{_e(' → '.join(plan.get('steps', [])))}</b></p><ul>"
                     + "".join(f"<li>{_e(w)}</li>" for w in plan.get("why", [])) + "</ul>")
    else:
        parts.append("<p class='muted'>No plan: this report describes an artifact as it is.</p>")
    parts.append("</section>")
    parts.append("<section id='stages'><h2>Stages</h2>" + _stages_table(report.get("stages", [])) + "</section>")
    parts.append("<section id='plots'><h2>Trade-offs</h2><div class='grid'>")
    for x, caption in (("macs", "Accuracy vs MACs, bubble area = parameters (Canziani et al. 2016); the search's "
                                "front at its validation proxy (batch norms re-estimated, before the fine-tune)."),
                       ("latency_ms", report.get("latency_caption", "Accuracy vs measured latency."))):
        uri = tradeoff_plot(report.get("points", []), x)
        if uri:
            parts.append(f"<figure><img alt='accuracy vs {x}' src='{uri}'><figcaption>{_e(caption)}</figcaption>"
                         "</figure>")
    parts.append("</div></section>")
    parts.append("<section id='layers'><h2>Per layer</h2>")
    uri = layers_plot(report.get("layers", []))
    if uri:
        parts.append(f"<figure><img alt='per-layer bars' src='{uri}'><figcaption>Conv and linear layers in execution "
                     "order: MACs and measured latency (eager, batch 1) before (blue) and after (green), the fraction "
                     "of output channels kept (for a decomposed layer, in red, its rank over its width), and the "
                     "bits each layer's weights are stored in.</figcaption></figure>")
    parts.append("</section>")
    warnings = report.get("warnings", [])
    parts.append("<section id='warnings'><h2>Warnings</h2>" + ("<ul class='warn'>" + "".join(
        f"<li>{_e(w)}</li>" for w in warnings) + "</ul>" if warnings else "<p>None.</p>") + "</section>")
    files = report.get("files", {})
    if files:
        parts.append("<section id='files'><h2>Files</h2><ul>" + "".join(
            f"<li>{_e(k)}: <code>{_e(v)}</code></li>" for k, v in files.items()) + "</ul></section>")
    parts.append(f"<p class='muted'>{_e(report.get('footer', ''))}</p></body></html>")
    return "\n".join(parts)


def write_html(report: dict, path: str) -> str:
    """Render ``report`` and write it to ``path`` atomically; returns ``path``."""
    from ..artifact import atomic_write_text

    atomic_write_text(path, render(report))
    return path
