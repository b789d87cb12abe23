"""The artifact directory format: ORT's four standard files (loadable by plain
``onnxruntime.training.api``), accelc's ``report.json`` and ``plan.json``, and one subdirectory
per stage (e.g. a low-resolution model), each an artifact directory of its own."""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from .artifacts import Artifacts
from .errors import AccelcError
from .model import ModelInfo, read_model

MODELS = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx")
REQUIRED = MODELS + ("checkpoint", "report.json")


def model_summary(info: ModelInfo) -> dict:
    return {
        "input_name": info.input_name,
        "input_shape": list(info.input_shape),
        "output_name": info.output_name,
        "num_classes": info.num_classes,
        "params": info.params,
        "frozen": info.frozen,
        "param_count": info.param_count,
    }


def _save(model: onnx.ModelProto, path: Path) -> None:
    if model.ByteSize() > 1_900_000_000:
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data"
        )
    else:
        with open(path, "wb") as fh:
            fh.write(model.SerializeToString())


def write_artifacts(art: Artifacts, directory: Path) -> None:
    """Write an artifact set (and its stages) into an existing, empty directory."""
    directory = Path(directory)
    _save(art.training, directory / "training_model.onnx")
    _save(art.eval, directory / "eval_model.onnx")
    _save(art.optimizer, directory / "optimizer_model.onnx")
    (directory / "checkpoint").write_bytes(art.checkpoint)
    for name, data in art.extra_files.items():
        (directory / name).write_bytes(data)
    (directory / "plan.json").write_text(json.dumps({"controllers": art.plan}, indent=1))
    for name, stage in art.stages.items():
        (directory / name).mkdir()
        write_artifacts(stage, directory / name)
        (directory / name / "report.json").write_text(
            json.dumps(
                {
                    "input": {"sha256": stage.info.sha256},
                    "model": model_summary(stage.info),
                    "options": stage.config,
                    "stage_of": "..",
                    "passes": [],
                },
                indent=1,
            )
        )


def load_artifacts(directory) -> tuple[Artifacts, dict]:
    """Read a compiled artifact directory back (for inspect, the runtime and variant building)."""
    d = Path(directory)
    if not d.exists():
        raise AccelcError(f"'{d}': no such file or directory")
    if not d.is_dir():
        raise AccelcError(f"'{d}' is not an artifact directory")
    missing = [f for f in REQUIRED if not (d / f).exists()]
    if missing:
        raise AccelcError(f"'{d}' is not an accelc artifact directory (missing {', '.join(missing)})")
    try:
        report = json.loads((d / "report.json").read_text())
    except (ValueError, OSError) as e:
        raise AccelcError(f"'{d}/report.json' is unreadable: {e}") from None
    models = {}
    for f in MODELS:
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
    art = Artifacts(
        models["training_model.onnx"],
        ev,
        models["optimizer_model.onnx"],
        (d / "checkpoint").read_bytes(),
        info,
        dict(report.get("options", {})),
        plan=plan,
    )
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
    return ModelInfo(
        model=fwd,
        path=None,
        sha256=report["input"].get("sha256", ""),
        input_name=m["input_name"],
        input_shape=tuple(m["input_shape"]),
        output_name=m["output_name"],
        num_classes=m["num_classes"],
        params=list(m["params"]),
        frozen=list(m["frozen"]),
    )
