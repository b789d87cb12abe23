"""``compile`` and ``inspect``: the compiler's two main entry points."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from . import provenance
from .artifact_dir import load_artifacts, model_summary, verified, write_artifacts, write_report
from .artifacts import generate
from .cost import graph_costs, numel
from .errors import AccelcError, show
from .fileio import atomic_dir
from .graph import TrainingGraph, training_graph
from .legalize import legalize
from .manager import PassManager
from .model import ModelInfo, check_model, check_step_memory, load_model, read_model
from .pass_api import default_passes
from .validation import VALIDATION_BATCH, validate

VERSION = "0.1.0"


def layer_table(tg: TrainingGraph, costs: dict) -> list[dict]:
    rows = []
    for layer in tg.layers:
        c = costs["layers"].get(layer.name, {})
        passes = sorted(
            {
                t[provenance.PASS]
                for n in [layer.forward] + layer.backward
                for t in [tg.tags.get(n.name)]
                if t and provenance.PASS in t
            }
        )
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
    lr: float = 1e-3,
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
    passes = [p for p in (passes or []) if p not in dflt]
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
    manager = PassManager(
        passes or [], pass_options or {}, validate_each=validate_result, memory_limit_gb=memory_limit_gb
    )
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
        final_validation = validate(art, memory_limit_gb) if (validate_result and not records) else None
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
            "costs": {"before": before, "after": after},
            "layers": layer_table(after_tg, after),
            "compile_seconds": None,
        }
        write_artifacts(art, tmp)
        report["compile_seconds"] = round(time.perf_counter() - t0, 3)
        write_report(tmp, report)  # with the content hashes of the files load_artifacts verifies
    return report


def legalized(info: ModelInfo) -> ModelInfo:
    """The model with constructs ORT Training cannot train rewritten (see compiler.legalize)."""

    model, notes = legalize(info.model)
    if not notes:
        return info
    return dataclasses.replace(
        info, model=model, warnings=list(info.warnings), legalize_notes=list(info.legalize_notes) + notes
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
        tg, costs, layers = _analyse(p, lambda: training_graph(art), art.config["optimizer"], verified(report))
        return {
            "source": "artifacts",
            "layers": layers,
            "costs": costs,
            "passes": report.get("passes", []),
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


def _analyse(path: Path, build, optimizer: str, checked: bool):
    """(training graph, costs, layer table) of a training model read from a file. Such a file may
    have been edited by hand (with its hash in report.json, or where none was recorded): a graph
    the analysis cannot follow is one line naming the file, not an internal error (-v shows why)."""
    try:
        tg = build()
        costs = graph_costs(tg, optimizer)
        return tg, costs, layer_table(tg, costs)
    except AccelcError:
        raise
    except (KeyError, ValueError, TypeError, AttributeError, IndexError, RecursionError) as e:
        raise AccelcError(
            f"'{show(path)}': the training graph cannot be analysed ({type(e).__name__}: "
            f"{show(str(e).splitlines()[0] if str(e) else '', 120)})"
            + ("" if checked else "; was it edited? recompile")
        ) from e
