"""The run summary ``accelc train`` prints: what every controller decided and when (in the words of
each method's ``run_summary``), and the step cost against the plain ORT step."""

from __future__ import annotations

from ..compiler.compile import cost_total
from ..compiler.cost import gflops
from ..compiler.errors import AccelcError, show
from ..compiler.method import installed


def _options(method, entry: dict):
    """A method's typed options from its plan entry (its defaults where the entry holds none or
    holds what does not parse: the summary of a run still shows)."""
    try:
        return method.options.parse(entry.get("options") if isinstance(entry.get("options"), dict) else None)
    except AccelcError:
        return method.options.parse(None)


def training_summary(s: dict, plan: list | None = None, report: dict | None = None) -> list[str]:
    """What every controller decided and when (each method's ``run_summary``, or its decisions
    one per line), and the step cost against the plain ORT step, from a training summary
    (summary.json), the artifacts' plan and their compile report."""
    plan = [c for c in plan or [] if isinstance(c, dict)]
    entries = {c.get("type"): c for c in plan}
    ctl = s.get("controllers") or {}
    hist = s.get("history") or []
    decisions = s.get("decisions") or []
    methods = installed()
    lines = []
    for name, rep in ctl.items():
        rep = rep if isinstance(rep, dict) else {}
        mine = [d for d in decisions if d.get("controller") == name]
        method = methods.by_name.get(name)
        if method is not None and method.run_summary is not None and rep:
            lines += method.run_summary(rep, mine, _options(method, entries.get(name) or {}), hist)
        else:
            for d in mine:
                lines.append(f"{name}: after epoch {d.get('epoch')}: {show(str(d.get('why')), 300)}")
    flops = [(m.get("steps", 0), m["flops_per_step"]) for m in hist if m.get("flops_per_step")]
    costs = (report or {}).get("costs")
    plain_flops = cost_total(costs.get("before") or {}).get("flops") if isinstance(costs, dict) else None
    if flops and plain_flops and ctl:
        steps = sum(n for n, _ in flops) or 1
        mean = sum(n * f for n, f in flops) / steps
        lines.append(
            f"step cost (cost model, reuse at its expected remain ratio): {gflops(mean)} on average against "
            f"{gflops(plain_flops)} for the plain ORT step ({mean / plain_flops - 1:+.1%}); per epoch: "
            + ", ".join(f"{gflops(f)}" for _, f in flops)
            + " (time against plain ORT: accelc bench measures it)"
        )
    return lines
