"""``compile`` and ``inspect``: the compiler's two main entry points."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from . import provenance
from .artifact_dir import load_artifacts, model_summary, verified, write_artifacts, write_report
from .artifacts import DEFAULT_LR, generate  # noqa: F401  (DEFAULT_LR: re-exported, see below)
from .cost import gflops, graph_costs, numel
from .errors import AccelcError, exception_text, show
from .fileio import atomic_dir
from .graph import TrainingGraph, training_graph
from .legalize import legalize
from .manager import PassManager
from .model import ModelInfo, check_model, check_step_memory, load_model, read_model
from .pass_api import default_passes, describe_changes, get, in_order, registered
from .validation import VALIDATION_BATCH, validate

VERSION = "0.1.0"
# DEFAULT_LR (from .artifacts): AdamW's learning rate when none is given (torch's and ORT's default,
# 1e-3); compile records it (train uses the one compiled in) and bench uses it (3e-4 before issue 19)


def layer_passes(tg: TrainingGraph, records: list | None = None) -> dict[str, list[str]]:
    """layer -> the passes that touched it, in pass order: from the provenance of its nodes (its
    forward, backward and accumulator nodes, and any node tagged with the layer) and from the pass
    records (a change naming the layer or one of its nodes). A node a later pass replaced keeps
    only the later pass's tag; the records keep the earlier one."""
    order = {n: i for i, n in enumerate(registered())}
    owner: dict[str, str] = {}
    for layer in tg.layers:
        for n in [layer.forward] + layer.backward + layer.accumulators:
            owner[n.name] = layer.name
    found: dict[str, set] = {layer.name: set() for layer in tg.layers}
    for name, t in tg.tags.items():
        if provenance.PASS not in t:
            continue
        lay = owner.get(name) or t.get(provenance.LAYER)
        if lay in found:
            found[lay].add(t[provenance.PASS])
    for rec in records if isinstance(records, list) else []:
        if not isinstance(rec, dict) or not rec.get("modified"):
            continue
        changes = rec.get("changes") if isinstance(rec.get("changes"), list) else []
        for c in changes:
            if not isinstance(c, dict) or not isinstance(rec.get("name"), str):
                continue
            lay = c.get("layer") if isinstance(c.get("layer"), str) else None
            lay = lay if lay in found else owner.get(c.get("node")) if isinstance(c.get("node"), str) else None
            if lay in found:
                found[lay].add(str(rec.get("name")))
    return {k: sorted(v, key=lambda n: (order.get(n, len(order)), n)) for k, v in found.items()}


def layer_table(tg: TrainingGraph, costs: dict, records: list | None = None) -> list[dict]:
    rows = []
    touched = layer_passes(tg, records)
    for layer in tg.layers:
        c = costs["layers"].get(layer.name, {})
        passes = touched.get(layer.name, [])
        rows.append(
            {
                "name": layer.name,
                "op": layer.op,
                "params": list(layer.params),
                "param_count": int(sum(numel(tg.shape(p)) for p in layer.params)),
                "weight_shape": list(layer.weight_shape),
                "input_shape": list(layer.input_shape),
                "output_shape": list(layer.output_shape),
                "flops_fwd": c.get("forward", {}).get("flops", 0.0),
                "flops_bwd": c.get("backward", {}).get("flops", 0.0),
                "bytes_fwd": c.get("forward", {}).get("bytes", 0.0),
                "bytes_bwd": c.get("backward", {}).get("bytes", 0.0),
                "flops_fwd_bound": c.get("forward", {}).get("flops_bound", c.get("forward", {}).get("flops", 0.0)),
                "flops_bwd_bound": c.get("backward", {}).get("flops_bound", c.get("backward", {}).get("flops", 0.0)),
                "backward_nodes": len(layer.backward),
                "trainable": all(p in tg.params for p in layer.params),
                "passes": passes,
            }
        )
    return rows


def compile_model(
    model_path,
    out_dir,
    passes: list[str] | None = None,
    pass_options: dict | None = None,
    loss: str = "cross_entropy",
    optimizer: str = "adamw",
    lr: float = DEFAULT_LR,
    batch_size: int = 64,
    force: bool = False,
    validate_result: bool = True,
    info: ModelInfo | None = None,
    defaults: bool = True,
    memory_limit_gb: float | None = None,
) -> dict:
    """Compile a forward ONNX model into ORT training artifacts rewritten by ``passes``.

    The default passes (those declaring ``default = True``) run first unless ``defaults`` is
    False; with ``passes=[]`` and ``defaults=False`` the artifacts are ORT's plain
    generate_artifacts output.
    """
    dflt = default_passes()
    passes = in_order([get(p).name for p in (passes or []) if p not in dflt])
    if defaults:
        passes = dflt + passes
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    if info is None:
        if Path(model_path).resolve() == out_dir.resolve():
            raise AccelcError("output path is the input model; choose another -o")
        info = load_model(model_path)
    if validate_result:  # refused from the shapes, before ORT or torch is loaded
        check_step_memory(info, VALIDATION_BATCH, memory_limit_gb, "validating the model")
    manager = _CostingManager(
        passes or [], pass_options or {}, validate_each=validate_result, memory_limit_gb=memory_limit_gb
    )
    manager.optimizer = optimizer
    with atomic_dir(out_dir, force=force, kind="artifacts", protect=[model_path] if model_path else []) as tmp:
        legal = legalized(info)
        art, notes = generate(legal, loss, optimizer, lr, batch_size)
        notes = legal.legalize_notes + notes
        before_tg = training_graph(art)
        before = graph_costs(before_tg, optimizer)
        art, records = manager.run(art)
        if any(r["modified"] for r in records):
            after_tg = training_graph(art)
            after = graph_costs(after_tg, optimizer)
        else:
            after_tg, after = before_tg, before
        prev = before["total"]
        for rec in records:  # the training step's cost after each pass: what each one is predicted to save
            prev = manager.after.get(rec["name"]) or prev
            rec["cost_after"] = {k: prev[k] for k in ("flops", "flops_bound", "bytes")}
        stages = {name: graph_costs(training_graph(st), optimizer)["total"] for name, st in art.stages.items()}
        # the final artifacts and their stages validated once (by the manager when a pass changed them)
        final_validation = manager.validation or (validate(art, memory_limit_gb) if validate_result else None)
        report = {
            "accelc_version": VERSION,
            "input": {"file": Path(model_path).name if model_path else None, "sha256": info.sha256},
            "model": model_summary(info),
            "options": dict(art.config),
            "fixups": notes,
            "warnings": list(info.warnings),
            "passes": records,
            "plan": art.plan,
            "validation": final_validation,
            "costs": {"before": before, "after": after, "stages": stages},
            "layers": layer_table(after_tg, after, records),
            "compile_seconds": None,
        }
        write_artifacts(art, tmp)
        report["compile_seconds"] = round(time.perf_counter() - t0, 3)
        write_report(tmp, report)  # with the content hashes of the files load_artifacts verifies
    return report


def _cost_change(a: dict, b: dict) -> str:
    """``11.37 GFLOPs -> 9.02 GFLOPs (-20.7%)``, with the bound where it differs."""
    fa, fb = float(a.get("flops", 0.0)), float(b.get("flops", 0.0))
    text = f"{gflops(fa)} -> {gflops(fb)}"
    if fa:
        text += f" ({(fb - fa) / fa:+.1%})"
    bound = float(b.get("flops_bound", fb))
    if bound > fb * (1 + 1e-9):
        text += f" expected, at most {gflops(bound)}"
    return text


def explain(report: dict) -> list[str]:
    """What each pass did and what it is predicted to save, in plain lines, from a compile report
    (or the view of an artifact directory): one line per pass (its :meth:`Pass.explain` and the
    training step's cost before -> after it), one per compiled stage, and what the cost model
    assumed where a cost is known only at run time."""
    lines = []
    costs = _dict(report.get("costs"))
    prev = cost_total(_dict(costs.get("before")) or _dict(report.get("costs_before")))
    plan = report.get("plan") if isinstance(report.get("plan"), list) else []
    for rec in report.get("passes") if isinstance(report.get("passes"), list) else []:
        if not isinstance(rec, dict) or not isinstance(rec.get("name"), str):
            continue
        reg = registered().get(rec["name"])
        try:
            said = reg.explain(rec, plan) if reg is not None else [describe_record(rec)]
        except Exception:  # a record from another version: say what can be said
            said = [describe_record(rec)]
        after = cost_total({"total": rec.get("cost_after")})
        if after and prev:
            same = abs(float(after.get("flops_bound", after["flops"])) - float(prev.get("flops_bound", prev["flops"])))
            if abs(after["flops"] - prev["flops"]) <= 5e-4 * prev["flops"] and same <= 5e-4 * prev["flops"]:
                said.append(f"training-step FLOPs unchanged ({gflops(after['flops'])})")
            else:
                said.append(f"training step {_cost_change(prev, after)}")
            prev = after
        lines.append(f"pass {show(rec['name'], 40)}: " + "; ".join(show(x, 4000) for x in said if x))
        try:
            lines += [f"  {show(d, 300)}" for d in (reg.details(rec) if reg is not None else [])]
        except Exception:  # a record from another version: its details are left out
            pass
    full = cost_total(_dict(costs.get("after"))).get("flops")
    for name, c in _dict(costs.get("stages")).items():
        c = cost_total({"total": c})
        if not c:
            continue
        ratio = f" ({c['flops'] / full:.2f}x the full step)" if full else ""
        lines.append(
            f"stage {show(name, 40)}: {gflops(c['flops'])} per training step{ratio}; "
            f"the run-time controllers decide when it trains"
        )
    notes = (_dict(costs.get("after")) or costs).get("assumptions")
    notes = [n for n in notes if isinstance(n, str)] if isinstance(notes, list) else []
    if notes:
        lines.append("cost model (expected values; training reports what ran):")
        lines += [f"  {show(n, 300)}" for n in notes]
    return lines


def _dict(v) -> dict:
    return v if isinstance(v, dict) else {}


def cost_total(costs) -> dict:
    """``costs["total"]`` with numeric flops (flops_bound defaulting to flops), or {} (a report
    from an older accelc, or one edited by hand)."""
    t = _dict(_dict(costs).get("total"))
    num = (int, float)
    if not isinstance(t.get("flops"), num) or isinstance(t.get("flops"), bool):
        return {}
    bound = t.get("flops_bound")
    out = {"flops": float(t["flops"]), "flops_bound": float(bound) if isinstance(bound, num) else float(t["flops"])}
    if isinstance(t.get("bytes"), num):
        out["bytes"] = float(t["bytes"])
    return out


def describe_record(rec: dict) -> str:
    return describe_changes(rec.get("changes") or []) or ("rewrote the training graph" if rec.get("modified") else "")


class _CostingManager(PassManager):
    """The pass manager, also recording the training step's cost after each pass on the main
    artifacts (the first time a pass is applied in a run is on them; stages come after)."""

    optimizer = "adamw"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.after: dict[str, dict] = {}

    def _apply(self, p, art):
        result = super()._apply(p, art)
        if p.name not in self.after:
            self.after[p.name] = (
                graph_costs(training_graph(result.artifacts), self.optimizer)["total"] if result.modified else {}
            )
        return result


def legalized(info: ModelInfo) -> ModelInfo:
    """The model with constructs ORT Training cannot train rewritten (see compiler.legalize)."""

    model, notes = legalize(info.model)
    if not notes:
        return info
    return dataclasses.replace(
        info,
        model=model,
        warnings=list(info.warnings),
        legalize_notes=list(info.legalize_notes) + notes,
        source=info.source or info.model,
    )


UNVERIFIED = (
    "artifacts written before accelc recorded file hashes in report.json: could not verify that the files "
    "are unchanged since compile (recompile to get the check)"
)


def inspect_path(path) -> dict:
    """Per-layer view of an artifact directory or an ONNX model (forward models are compiled in memory).

    An artifact directory is loaded through :func:`load_artifacts` (every file checked); the view's
    ``warnings`` say when its files could not be verified against the hashes of report.json."""
    p = Path(path)
    if p.is_dir():
        art, report = load_artifacts(p)
        records = report.get("passes", []) if isinstance(report.get("passes"), list) else []
        tg, costs, layers = _analyse(p, lambda: training_graph(art), art.config["optimizer"], verified(report), records)
        before = (report.get("costs") or {}).get("before") if isinstance(report.get("costs"), dict) else None
        return {
            "source": "artifacts",
            "layers": layers,
            "costs": costs,
            "costs_before": before if isinstance(before, dict) else None,
            "plan": list(art.plan),
            "passes": records,
            "fixups": report.get("fixups", []),
            "verified": verified(report),
            "warnings": [] if verified(report) else [UNVERIFIED],
        }
    model, sha = read_model(p)
    if any(n.op_type == "InPlaceAccumulatorV2" for n in model.graph.node):
        _, costs, layers = _analyse(p, lambda: TrainingGraph(model, {}), "adamw", False)
        return {"source": "training_model", "layers": layers, "costs": costs, "passes": []}
    info = check_model(model, sha, p)
    art, notes = generate(legalized(info))
    tg = training_graph(art)
    costs = graph_costs(tg)
    return {
        "source": "model",
        "layers": layer_table(tg, costs),
        "costs": costs,
        "passes": [],
        "warnings": info.warnings,
    }


def _analyse(path: Path, build, optimizer: str, checked: bool, records: list | None = None):
    """(training graph, costs, layer table) of a training model read from a file. Such a file may
    have been edited by hand (with its hash in report.json, or where none was recorded): a graph
    the analysis cannot follow is one line naming the file, not an internal error (-v shows why)."""
    try:
        tg = build()
        costs = graph_costs(tg, optimizer)
        return tg, costs, layer_table(tg, costs, records)
    except AccelcError:
        raise
    except (KeyError, ValueError, TypeError, AttributeError, IndexError, RecursionError) as e:
        raise AccelcError(
            f"'{show(path)}': the training graph cannot be analysed ({type(e).__name__}: "
            f"{exception_text(e, 120) if str(e) else ''})" + ("" if checked else "; was it edited? recompile")
        ) from e
