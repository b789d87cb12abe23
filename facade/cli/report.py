"""Report text of the command line: help text without RST markup, numbers, tables and the per-layer
table of ``accelc inspect``."""

from __future__ import annotations

import re

from ..compiler.compile import cost_total
from ..compiler.cost import gflops
from ..compiler.errors import show

_RST = (
    (re.compile(r":[a-z]+:`~?([^`]+)`"), r"\1"),  # :func:`x`, :class:`~a.b`
    (re.compile(r"``([^`]+)``"), r"'\1'"),
    (re.compile(r"`([^`]+)`"), r"'\1'"),
)


def plain(text: str) -> str:
    """Help text without RST markup (``x``, :func:`x`, `x`): what a terminal shows."""
    for pat, sub in _RST:
        text = pat.sub(sub, text)
    return text


def fmt_num(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(r):
        return "  ".join(str(c).ljust(w) for c, w in zip(r, widths))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def layer_table_text(view: dict) -> str:
    rows = []
    for r in view["layers"]:
        rows.append(
            [
                show(r["name"], 60),
                show(r["op"], 30),
                fmt_num(r["param_count"]),
                "x".join(map(str, r["weight_shape"])),
                "x".join(map(str, r["output_shape"])),
                _flops_cell(r["flops_fwd"], r.get("flops_fwd_bound")),
                _flops_cell(r["flops_bwd"], r.get("flops_bwd_bound")),
                fmt_num(r["bytes_fwd"]) + "B",
                fmt_num(r["bytes_bwd"]) + "B",
                show(",".join(r["passes"]), 60) or ("frozen" if not r["trainable"] else "-"),
            ]
        )
    out = _table(
        rows,
        ["layer", "op", "params", "weight", "output", "fwd FLOPs", "bwd FLOPs", "fwd bytes", "bwd bytes", "passes"],
    )
    ph = view["costs"]["phases"]
    out += "\n\n" + "  ".join(f"{k}: {fmt_num(v['flops'])}FLOPs {fmt_num(v['bytes'])}B" for k, v in ph.items())
    if any(r.get("flops_fwd_bound", r["flops_fwd"]) > r["flops_fwd"] for r in view["layers"]):
        out += "\nFLOPs marked ~ are expected values (known only while training), with their upper bound in ( )"
    before = cost_total(view.get("costs_before") or {})
    if before:
        out += f"\nplain ORT training step: {gflops(before['flops'])}"
    return out


def _flops_cell(flops: float, bound: float | None) -> str:
    if bound is None or bound <= flops * (1 + 1e-9):
        return fmt_num(flops)
    return f"~{fmt_num(flops)} (<={fmt_num(bound)})"
