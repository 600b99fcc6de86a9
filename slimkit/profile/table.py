"""The text table of a :class:`~slimkit.profile.core.Profile`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .core import LayerStats, Profile

BAR_WIDTH = 12


def human(n: float, unit: str = "") -> str:
    """``1234567 -> '1.23M'``; bytes (``unit='B'``) use powers of 1024 (``'1.18 MiB'``)."""
    if unit == "B":
        for suffix, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if abs(n) >= scale:
                return f"{n / scale:.2f} {suffix}"
        return f"{int(n)} B"
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(int(n))


def _shape(shape: list[int] | None) -> str:
    return "x".join(str(d) for d in shape) if shape else "-"


def _row_cells(i: int, row: LayerStats, total_macs: int, max_macs: int) -> list[str]:
    share = row.macs / total_macs if total_macs else 0.0
    bar = "#" * round(BAR_WIDTH * row.macs / max_macs) if max_macs else ""
    flag = " ?" if row.uncounted else ""
    return [str(i), (row.name or "<model>") + flag, row.type,
            f"{_shape(row.input_shape)} -> {_shape(row.output_shape)}",
            human(row.params), human(row.macs), f"{100 * share:5.1f}%", bar, human(row.other_ops),
            human(row.activation_bytes, "B"), human(row.weight_bytes, "B"), str(row.calls)]


def format_table(p: Profile, top: int | None = None) -> str:
    """Render ``p`` as aligned text (see :meth:`Profile.table`)."""
    header = ["#", "layer", "type", "input -> output", "params", "MACs", "MAC %", "", "other ops", "written",
              "weights", "calls"]
    right = {0, 4, 5, 6, 8, 9, 10, 11}
    max_macs = max((r.macs for r in p.layers), default=0)
    numbered = list(enumerate(p.layers, 1))
    hidden: list[LayerStats] = []
    if top is not None and top < len(numbered):
        keep = {id(r) for _, r in sorted(numbered, key=lambda ir: -ir[1].macs)[:max(top, 0)]}
        hidden = [r for _, r in numbered if id(r) not in keep]
        numbered = [(i, r) for i, r in numbered if id(r) in keep]
    body = [_row_cells(i, r, p.macs, max_macs) for i, r in numbered]
    if hidden:
        h_macs = sum(r.macs for r in hidden)
        body.append(["", f"({len(hidden)} other layers)", "", "", human(sum(r.params for r in hidden)), human(h_macs),
                     f"{100 * h_macs / p.macs if p.macs else 0:5.1f}%", "", human(sum(r.other_ops for r in hidden)),
                     human(sum(r.activation_bytes for r in hidden), "B"),
                     human(sum(r.weight_bytes for r in hidden), "B"), ""])
    total = ["", "total", "", "", human(p.params), human(p.macs), "100.0%", "", human(p.other_ops),
             human(p.activation_bytes, "B"), human(p.weight_bytes, "B"), ""]
    widths = [max(len(r[c]) for r in [header, *body, total]) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if k in right else c.ljust(w) for k, (c, w) in enumerate(zip(cells,
                                                                                                 widths))).rstrip()

    rule = "-" * len(line(header))
    shape = ", ".join(_shape(s) for s in p.input_shape) if p.input_shape and isinstance(p.input_shape[0], list) \
        else _shape(p.input_shape)
    out = [f"profile of {p.model_type or 'model'} on input {shape}", line(header), rule]
    out += [line(r) for r in body]
    out += [rule, line(total), ""]
    out.append(f"params {p.params:,}   MACs {p.macs:,}   other ops {p.other_ops:,}")
    out.append(f"weights {p.weight_bytes:,} B   activations written {p.activation_bytes:,} B   "
               f"peak live activations {p.activation_peak_bytes:,} B")
    e = p.energy_breakdown_mj
    out.append(f"energy estimate {p.energy_mj_estimate:.4g} mJ per inference (Horowitz 2014, 45 nm: MACs "
               f"{e.get('macs', 0):.3g} + weights from DRAM {e.get('weights_dram', 0):.3g} + activations in SRAM "
               f"{e.get('activations_sram', 0):.3g} mJ)")
    if p.uncounted:
        where = [r.name or "<model>" for r in p.layers if r.uncounted]
        ops = ", ".join(f"{k} x{v}" for k, v in p.uncounted.items())
        out.append(f"uncounted ops (not in the totals; layers marked ?): {ops} in {', '.join(where[:6])}"
                   + (" ..." if len(where) > 6 else ""))
    else:
        out.append("uncounted ops: none")
    return "\n".join(out)
