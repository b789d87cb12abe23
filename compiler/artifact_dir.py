"""The artifact directory format: ORT's four standard files (loadable by plain
``onnxruntime.training.api``), accelc's ``report.json`` and ``plan.json``, and one subdirectory
per stage (e.g. a low-resolution model), each an artifact directory of its own.

``report.json`` records the sha256 of every model file, the checkpoint and ``plan.json``
(``"files"``); :func:`load_artifacts` refuses a directory whose files no longer match it, or whose
files lie outside it, are not regular files, or do not fit :mod:`accelc.compiler.schemas`."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import onnx

from . import schemas
from .artifacts import Artifacts
from .errors import AccelcError, show
from .model import ModelInfo, read_model

MODELS = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx")
REQUIRED = MODELS + ("checkpoint", "report.json")
HASHED = MODELS + ("checkpoint", "plan.json")  # and a model's external data (NAME.data) where written
MAX_STAGE_DEPTH = 4
ACCUMULATOR = "InPlaceAccumulatorV2"  # ORT's gradient accumulator: in every training graph, no eval graph


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(directory: Path) -> dict:
    """sha256 of every file of ``directory`` that ``report.json`` vouches for (models, their
    external data, checkpoint, plan)."""
    directory = Path(directory)
    names = [n for m in MODELS for n in (m, m + ".data")] + list(HASHED[len(MODELS) :])
    return {n: _sha256(directory / n) for n in names if (directory / n).is_file()}


def write_report(directory: Path, report: dict) -> dict:
    """Write ``report`` as ``directory/report.json`` with the content hashes of the artifact files
    (``report["files"]``, added in place), so a file changed after compile is noticed on load."""
    report["files"] = file_hashes(directory)
    (Path(directory) / "report.json").write_text(json.dumps(report, indent=1))
    return report


def write_artifacts(art: Artifacts, directory: Path) -> None:
    """Write an artifact set (and its stages) into an existing, empty directory.

    The caller writes the root's ``report.json`` (:func:`write_report`) after this; each stage gets
    its own here."""
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
        write_report(
            directory / name,
            {
                "input": {"sha256": stage.info.sha256},
                "model": model_summary(stage.info),
                "options": stage.config,
                "stage_of": "..",
                "passes": [],
            },
        )


# ----------------------------------------------------------------------------- reading back
# Every file read here is untrusted: it may have been edited, damaged, truncated, replaced by a
# directory, a FIFO or a symbolic link since accelc wrote it. Each is resolved and must lie inside
# the artifact directory, be a regular file, and (JSON) fit the schema of compiler.schemas; the
# files report.json vouches for must still have the content hash it recorded. Artifacts without
# that record (an older accelc's, or a report edited to drop it) are refused: nothing would
# notice a graph changed after compile.


def verified(report: dict) -> bool:
    """Whether the artifact files were checked against content hashes recorded at compile time."""
    return isinstance(report.get("files"), dict)


def load_artifacts(directory) -> tuple[Artifacts, dict]:
    """Read a compiled artifact directory back (for inspect, the runtime and variant building).

    Anything wrong with it, whatever the file and however it is wrong, is one AccelcError line."""
    d = Path(directory)
    try:
        st = os.stat(d)
    except OSError as e:
        if os.path.islink(d):
            raise AccelcError(f"'{show(d)}' is a broken symbolic link") from None
        why = "no such file or directory" if isinstance(e, FileNotFoundError) else e.strerror or "cannot be read"
        raise AccelcError(f"'{show(d)}': {why}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise AccelcError(f"'{show(d)}' is not an artifact directory")
    try:
        real = d.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise AccelcError(f"'{show(d)}': {getattr(e, 'strerror', None) or 'cannot be resolved'}") from None
    return _load(d, real, 0)


def _load(d: Path, real: Path, depth: int) -> tuple[Artifacts, dict]:
    missing = [f for f in REQUIRED if not os.path.lexists(d / f)]
    if missing:
        raise AccelcError(f"'{show(d)}' is not an accelc artifact directory (missing {', '.join(missing)})")
    report = _read_json(d, real, "report.json", schemas.REPORT)
    hashes = report.get("files")
    if hashes is None:  # written before accelc recorded hashes, or the record was removed
        raise AccelcError(
            f"'{show(d / 'report.json')}' records no file hashes (artifacts of an older accelc, or an edited "
            "report): they cannot be verified; recompile"
        )
    unlisted = [f for f in (*MODELS, "checkpoint", "plan.json") if f not in hashes and os.path.lexists(d / f)]
    if unlisted:
        raise AccelcError(f"'{show(d / 'report.json')}' records no hash of {unlisted[0]}; recompile")
    for name, want in hashes.items():
        if not os.path.lexists(d / name):
            raise AccelcError(f"'{show(d / name)}' is missing (report.json lists it); recompile")
        path = _inside(d, real, name)
        if _hash_file(path, d / name) != want:
            raise AccelcError(
                f"'{show(d / name)}' was changed after compile (hash differs from report.json); recompile"
            )
    models = {}
    for f in MODELS:
        _inside(d, real, f)
        try:
            models[f], _ = read_model(d / f)
        except AccelcError as e:
            msg = str(e)
            raise AccelcError(msg if str(d / f) in msg else f"'{show(d / f)}': {msg}") from None
    for f in MODELS:
        _check_wiring(models[f], d / f)
    checkpoint = _CheckpointFile(d, real, hashes["checkpoint"])
    plan = []
    if os.path.lexists(d / "plan.json"):
        plan = _read_json(d, real, "plan.json", schemas.plan_schema())["controllers"]
    ev = models["eval_model.onnx"]
    info = _info_from_eval(ev, report, models["training_model.onnx"], d)
    art = Artifacts(
        models["training_model.onnx"],
        ev,
        models["optimizer_model.onnx"],
        checkpoint,
        info,
        dict(report["options"]),
        plan=plan,
    )
    for spec in plan:  # the stage a plan entry names, and every stage of its list (one per size)
        listed = spec.get("stages") if isinstance(spec.get("stages"), list) else []
        names = [spec.get("stage")] + [s.get("dir") for s in listed if isinstance(s, dict)]
        for stage in names:
            if isinstance(stage, str) and stage and stage not in art.stages:
                art.stages[stage] = _load_stage(d, real, stage, depth)
    return art, report


class _CheckpointFile:
    """A loaded directory's checkpoint, read when it is used (it is as large as the model). The
    file is held open from loading on, so a directory recompiled, replaced or removed meanwhile (a
    training run's artifacts, a temporary directory) still gives what was loaded; every read is
    checked against report.json's hash again, so a file edited in place is refused, never used."""

    def __init__(self, d: Path, real: Path, sha256: str):
        self.shown, self.sha256 = d / "checkpoint", sha256
        self._fh = _open(_inside(d, real, "checkpoint"), self.shown)

    def __call__(self) -> bytes:
        parts, offset = [], 0
        try:
            while chunk := os.pread(self._fh.fileno(), 1 << 30, offset):
                parts.append(chunk)
                offset += len(chunk)
        except (OSError, ValueError) as e:  # ValueError: closed
            raise AccelcError(f"cannot read '{show(self.shown)}': {getattr(e, 'strerror', None) or e}") from None
        data = b"".join(parts)
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise AccelcError(f"'{show(self.shown)}' was changed after the artifacts were loaded; recompile")
        return data

    def __reduce__(self):  # another process gets the bytes (an open file does not travel)
        return (bytes, (self(),))

    def __repr__(self) -> str:
        return f"<checkpoint {show(self.shown)}, read when used>"


def _check_wiring(model, shown: Path) -> None:
    """Every node reads only graph inputs, initializers or outputs of nodes before it, and every
    graph output is produced: a graph with a node removed or rewired is refused here, not deep
    inside a training step."""
    g = model.graph
    known = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    for n in g.node:
        for i in n.input:
            if i not in known:
                raise AccelcError(
                    f"'{show(shown)}': node '{show(n.name or n.op_type)}' reads '{show(i)}', which nothing before it "
                    "produces (edited after compile?); recompile"
                )
        known.update(n.output)
    for o in g.output:
        if o.name not in known:
            raise AccelcError(f"'{show(shown)}': graph output '{show(o.name)}' is produced by no node; recompile")


def _load_stage(d: Path, real: Path, stage: str, depth: int) -> Artifacts:
    sd = d / stage
    if depth >= MAX_STAGE_DEPTH:
        raise AccelcError(f"'{show(sd)}': stages nested more than {MAX_STAGE_DEPTH} deep")
    if not os.path.lexists(sd):
        raise AccelcError(f"'{show(sd)}' is missing (plan.json names the stage '{show(stage)}'); recompile")
    try:
        sreal = sd.resolve(strict=True)
    except (OSError, RuntimeError):
        raise AccelcError(f"'{show(sd)}' is a broken symbolic link") from None
    if real not in sreal.parents:  # strictly below: a link to '.' or '..' cannot loop
        raise AccelcError(f"'{show(sd)}' points outside the artifact directory; refused")
    if not sreal.is_dir():
        raise AccelcError(f"'{show(sd)}' is not a directory (plan.json names the stage '{show(stage)}')")
    return _load(sd, sreal, depth + 1)[0]


def _inside(d: Path, real: Path, name: str) -> Path:
    """``d/name`` resolved; it must exist, lie inside the artifact directory and be a regular file."""
    p = d / name
    try:
        r = p.resolve(strict=True)
    except FileNotFoundError:
        raise AccelcError(f"'{show(p)}' is missing or a broken symbolic link") from None
    except (OSError, RuntimeError):
        raise AccelcError(f"'{show(p)}' cannot be resolved (symbolic link loop?)") from None
    if real not in r.parents:
        raise AccelcError(f"'{show(p)}' points outside the artifact directory; refused")
    try:
        mode = os.stat(r).st_mode
    except OSError as e:
        raise AccelcError(f"'{show(p)}': {e.strerror}") from None
    if stat.S_ISDIR(mode):
        raise AccelcError(f"'{show(p)}' is a directory, not a file")
    if not stat.S_ISREG(mode):
        raise AccelcError(f"'{show(p)}' is not a regular file")
    return r


def _open(r: Path, shown: Path):
    try:
        fd = os.open(r, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise AccelcError(f"cannot read '{show(shown)}': {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced between the check and the open
        os.close(fd)
        raise AccelcError(f"'{show(shown)}' is not a regular file")
    return os.fdopen(fd, "rb")


def _read_bytes(r: Path, shown: Path, limit: int | None = None) -> bytes:
    with _open(r, shown) as fh:
        size = os.fstat(fh.fileno()).st_size
        if limit is not None and size > limit:
            raise AccelcError(
                f"'{show(shown)}' is {size:,} bytes, larger than any file accelc writes ({limit:,}); refused"
            )
        try:
            return fh.read() if limit is None else fh.read(limit + 1)
        except OSError as e:
            raise AccelcError(f"cannot read '{show(shown)}': {e.strerror}") from None


def _hash_file(r: Path, shown: Path) -> str:
    h = hashlib.sha256()
    with _open(r, shown) as fh:
        try:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        except OSError as e:
            raise AccelcError(f"cannot read '{show(shown)}': {e.strerror}") from None
    return h.hexdigest()


def _read_json(d: Path, real: Path, name: str, schema: dict):
    shown = d / name
    data = _read_bytes(_inside(d, real, name), shown, schemas.MAX_JSON_BYTES)
    what = f"'{show(shown)}'"
    doc = schemas.parse_json(data, what)
    schemas.check(doc, schema, what)
    return doc


def _dims(vi) -> list:
    return [x.dim_value if x.HasField("dim_value") else None for x in vi.type.tensor_type.shape.dim]


def _info_from_eval(ev: onnx.ModelProto, report: dict, training: onnx.ModelProto, d: Path) -> ModelInfo:
    """Rebuild the forward model description from the eval model (forward graph + loss), after
    checking that what report.json says about the model matches the graphs."""
    m = report["model"]
    what = f"'{show(d / 'report.json')}'"
    # the two graphs in each other's place (or any forward graph as the training model)
    if any(n.op_type == ACCUMULATOR for n in ev.graph.node):
        raise AccelcError(f"'{show(d / 'eval_model.onnx')}' holds a training graph (gradient accumulators); recompile")
    if not any(n.op_type == ACCUMULATOR for n in training.graph.node) and not any(
        i.name == "lazy_reset_grad" for i in training.graph.input
    ):
        raise AccelcError(f"'{show(d / 'training_model.onnx')}' is not a training graph (no gradients); recompile")
    ev_in = {i.name: i for i in ev.graph.input}
    ev_out = {o.name: o for o in ev.graph.output}
    tr_in = {i.name for i in training.graph.input}
    if m["input_name"] not in ev_in or m["input_name"] not in tr_in:
        raise AccelcError(f"{what}: model.input_name '{show(m['input_name'], 80)}' is not an input of the graphs")
    if m["output_name"] not in ev_out:
        raise AccelcError(
            f"{what}: model.output_name '{show(m['output_name'], 80)}' is not an output of eval_model.onnx"
        )
    dims = _dims(ev_in[m["input_name"]])[1:]
    want = list(m["input_shape"])
    if len(dims) != len(want) or any(a is not None and a != b for a, b in zip(dims, want)):
        raise AccelcError(f"{what}: model.input_shape {want} does not match eval_model.onnx's input {dims}")
    classes = _dims(ev_out[m["output_name"]])
    if classes and classes[-1] is not None and classes[-1] != m["num_classes"]:
        raise AccelcError(
            f"{what}: model.num_classes {m['num_classes']} does not match eval_model.onnx's output ({classes[-1]})"
        )
    known = set(ev_in) | tr_in | {t.name for g in (ev, training) for t in g.graph.initializer}
    for field in ("params", "frozen"):
        stray = [p for p in m[field] if p not in known]
        if stray:
            raise AccelcError(f"{what}: model.{field} names '{show(stray[0], 80)}', which no graph holds")
    suffix = "_grad.accumulation.buffer"
    trained = [n[: -len(suffix)] for n in tr_in if n.endswith(suffix)]
    unlisted = [p for p in trained if p not in m["params"]]
    if unlisted:
        raise AccelcError(f"{what}: model.params lacks '{show(unlisted[0], 80)}', which training_model.onnx trains")
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
