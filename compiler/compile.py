"""``compile`` and ``inspect``: the compiler's two main entry points."""
from __future__ import annotations

import json
import time
from pathlib import Path

import onnx

from .artifacts import Artifacts, generate, model_summary
from .cost import _numel, graph_costs
from .errors import AccelcError, atomic_dir
from .graph import TrainingGraph, infer_shapes
from .legalize import legalize
from .model import ModelInfo, check_model, load_model, read_model
from .pass_manager import PassManager, validate

VERSION = "0.1.0"


_SHAPES: dict = {}


def training_graph(art: Artifacts) -> TrainingGraph:
    """The graph view of an artifact set's training model (forward shapes inferred once per model)."""
    key = (id(art.info.model), art.config.get("batch_size", 64))
    if key not in _SHAPES or _SHAPES[key][0] is not art.info.model:
        if len(_SHAPES) > 16:
            _SHAPES.clear()
        _SHAPES[key] = (art.info.model, infer_shapes(art.info.model, key[1]))
    return TrainingGraph(art.training, _SHAPES[key][1])


def layer_table(tg: TrainingGraph, costs: dict) -> list[dict]:
    rows = []
    for layer in tg.layers:
        c = costs["layers"].get(layer.name, {})
        passes = sorted({t["accelc.pass"] for n in [layer.forward] + layer.backward
                         for t in [tg.tags.get(n.name)] if t})
        rows.append({
            "name": layer.name, "op": layer.op, "params": list(layer.params),
            "param_count": int(sum(_numel(tg.shape(p)) for p in layer.params)),
            "weight_shape": list(layer.weight_shape), "input_shape": list(layer.input_shape),
            "output_shape": list(layer.output_shape),
            "flops_fwd": c.get("forward", {}).get("flops", 0.0), "flops_bwd": c.get("backward", {}).get("flops", 0.0),
            "bytes_fwd": c.get("forward", {}).get("bytes", 0.0), "bytes_bwd": c.get("backward", {}).get("bytes", 0.0),
            "backward_nodes": len(layer.backward), "trainable": all(p in tg.params for p in layer.params),
            "passes": passes,
        })
    return rows


def compile_model(model_path, out_dir, passes: list[str] | None = None, pass_options: dict | None = None,
                  loss: str = "cross_entropy", optimizer: str = "adamw", lr: float = 1e-3,
                  batch_size: int = 64, force: bool = False, validate_result: bool = True,
                  info: ModelInfo | None = None, opt: bool = True) -> dict:
    """Compile a forward ONNX model into ORT training artifacts rewritten by ``passes``.

    The ``opt`` pass (exact speed rewrites) runs first unless ``opt`` is False; with
    ``passes=[]`` and ``opt=False`` the artifacts are ORT's plain generate_artifacts output.
    """
    passes = [p for p in (passes or []) if p != "opt"]
    if opt:
        passes = ["opt"] + passes
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    if info is None:
        if Path(model_path).resolve() == out_dir.resolve():
            raise AccelcError("output path is the input model; choose another -o")
        info = load_model(model_path)
    manager = PassManager(passes or [], pass_options or {}, validate_each=validate_result)
    with atomic_dir(out_dir, force=force) as tmp:
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
        final_validation = validate(art) if (validate_result and not records) else None
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
        art.write(tmp)
        report["compile_seconds"] = round(time.perf_counter() - t0, 3)
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
    return report


def legalized(info: ModelInfo) -> ModelInfo:
    """The model with constructs ORT Training cannot train rewritten (see compiler.legalize)."""
    import dataclasses
    model, notes = legalize(info.model)
    if not notes:
        return info
    return dataclasses.replace(info, model=model, warnings=list(info.warnings),
                               legalize_notes=list(info.legalize_notes) + notes)


def load_artifacts(directory) -> tuple[Artifacts, dict]:
    """Read a compiled artifact directory back (for inspect, the runtime and variant building)."""
    d = Path(directory)
    if not d.exists():
        raise AccelcError(f"'{d}': no such file or directory")
    if not d.is_dir():
        raise AccelcError(f"'{d}' is not an artifact directory")
    missing = [f for f in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint", "report.json")
               if not (d / f).exists()]
    if missing:
        raise AccelcError(f"'{d}' is not an accelc artifact directory (missing {', '.join(missing)})")
    try:
        report = json.loads((d / "report.json").read_text())
    except (ValueError, OSError) as e:
        raise AccelcError(f"'{d}/report.json' is unreadable: {e}") from None
    models = {}
    for f in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
        try:
            models[f], _ = read_model(d / f)
        except AccelcError as e:
            raise AccelcError(f"artifact {f}: {e}") from None
    ev = models["eval_model.onnx"]
    info = _info_from_eval(ev, report)
    plan = []
    if (d / "plan.json").exists():
        try:
            plan = json.loads((d / "plan.json").read_text()).get("controllers", [])
        except (ValueError, OSError, AttributeError) as e:
            raise AccelcError(f"'{d}/plan.json' is unreadable: {e}") from None
    art = Artifacts(models["training_model.onnx"], ev, models["optimizer_model.onnx"],
                    (d / "checkpoint").read_bytes(), info, dict(report.get("options", {})), plan=plan)
    for spec in plan:
        stage = spec.get("stage")
        if stage:
            if "/" in stage or stage.startswith("."):
                raise AccelcError(f"plan.json names a stage '{stage}' outside the artifact directory")
            art.stages[stage] = load_artifacts(d / stage)[0]
    return art, report


def _info_from_eval(ev: onnx.ModelProto, report: dict) -> ModelInfo:
    """Rebuild the forward model description from the eval model (forward graph + loss)."""
    m = report["model"]
    fwd = onnx.ModelProto()
    fwd.CopyFrom(ev)
    g = fwd.graph
    keep = [n for n in g.node if not n.op_type.startswith("SoftmaxCrossEntropyLoss")]
    del g.node[:]
    g.node.extend(keep)
    ins = [i for i in g.input if i.name != "labels"]
    del g.input[:]
    g.input.extend(ins)
    outs = [o for o in g.output if o.name == m["output_name"]]
    del g.output[:]
    g.output.extend(outs)
    # parameters are graph inputs in the eval model; shape inference needs their shapes, which inputs carry
    return ModelInfo(model=fwd, path=None, sha256=report["input"].get("sha256", ""), input_name=m["input_name"],
                     input_shape=tuple(m["input_shape"]), output_name=m["output_name"],
                     num_classes=m["num_classes"], params=list(m["params"]), frozen=list(m["frozen"]))


def inspect_path(path) -> dict:
    """Per-layer view of an artifact directory or an ONNX model (forward models are compiled in memory)."""
    p = Path(path)
    if p.is_dir():
        art, report = load_artifacts(p)
        tg = training_graph(art)
        costs = graph_costs(tg, art.config.get("optimizer", "adamw"))
        return {"source": "artifacts", "layers": layer_table(tg, costs), "costs": costs,
                "passes": report.get("passes", []), "fixups": report.get("fixups", [])}
    model, sha = read_model(p)
    if any(n.op_type == "InPlaceAccumulatorV2" for n in model.graph.node):
        tg = TrainingGraph(model, {})
        costs = graph_costs(tg)
        return {"source": "training_model", "layers": layer_table(tg, costs), "costs": costs, "passes": []}
    info = check_model(model, sha, p)
    art, notes = generate(legalized(info))
    tg = training_graph(art)
    costs = graph_costs(tg)
    return {"source": "model", "layers": layer_table(tg, costs), "costs": costs, "passes": [],
            "warnings": info.warnings}
