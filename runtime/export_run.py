"""Trained models come out: a run directory of ``accelc train`` as an inference ONNX model (and an
ORT training checkpoint).

What ORT's ``export_model_for_inferencing`` gives for its own Module, for accelc's runs: the
artifacts' eval graph (``eval_model.onnx``: BatchNorm on running statistics, the model's ops only)
cut down to the logits (the loss and the ``labels`` input removed), with the run's trained
parameters and BatchNorm running statistics as initialisers, at the artifacts' opset and IR
version (opset 17, IR 8 for the models accelc compiles), so any current ``onnxruntime`` runs it.

Everything read is untrusted and verified first: the checkpoint through
:func:`accelc.runtime.checkpoint.load` (schema, checksums, array manifest), the artifacts through
:func:`accelc.compiler.artifact_dir.load_artifacts` (their report's hashes) and against the
checkpoint's ``artifacts_sha256`` (the run was trained from these files, not others). Every
parameter the eval graph reads must be in the checkpoint with the full-resolution model's shape,
float32 and finite: the checkpoint of a run that stopped in a low-resolution stage (rescale) holds
other shapes and is refused, naming the variant. Passes that change only training (skip, reuse)
leave the parameters' meaning alone, so their runs export as the plain model.

``ort_checkpoint``: the artifacts' own ORT ``CheckpointState`` with the trained values in place of
the initial ones, so ``onnxruntime.training.api.Module(training_model.onnx, state, eval_model.onnx)``
continues from the run (ORT's optimizer starts with fresh moments: ORT keeps them inside its own
checkpoints only; accelc's are in the run's ``.npz``).
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..compiler.artifact_dir import REQUIRED, load_artifacts
from ..compiler.errors import AccelcError, ort_message, show
from ..compiler.fileio import atomic_write_bytes, output_state, recover
from ..compiler.ort_checkpoint import read_checkpoint_parameters, write_checkpoint
from . import checkpoint as ckpt

LABELS = "labels"
MAX_PROTO_BYTES = 2_000_000_000  # protobuf's limit for one serialised model (no external data here)
SUMMARY = "summary.json"


class ExportError(AccelcError):
    """A run that cannot be exported as asked."""


# ----------------------------------------------------------------------------- the run and its artifacts
def _read_run(run_dir: Path) -> tuple[dict, dict]:
    if run_dir.is_symlink() or not run_dir.is_dir():
        raise ExportError(
            f"run directory '{show(run_dir)}' " + ("is not a folder" if run_dir.exists() else "not found")
        )
    loaded = ckpt.load(run_dir)  # verified: schema, checksums, every array against the manifest
    if loaded is None:
        raise ExportError(
            f"run directory '{show(run_dir)}' has no {ckpt.META}: not a run of accelc train, "
            "or it stopped before its first epoch ended"
        )
    return loaded


def _pick_epoch(epoch, meta: dict, run_dir: Path) -> int:
    last = meta["history"][-1]["epoch"]  # 1-based, as shown (read_meta checks it is the checkpoint's)
    if epoch is None:
        return last
    if not 1 <= epoch <= last:
        raise ExportError(f"epoch {epoch} is out of range: the run in '{show(run_dir)}' trained epochs 1..{last}")
    if epoch != last:
        raise ExportError(
            f"epoch {epoch}'s parameters are not on disk: accelc train keeps the checkpoint of the last epoch "
            f"only ({last}) in '{show(run_dir)}'; export epoch {last} (the default)"
        )
    return epoch


def _summary_name(run_dir: Path) -> str | None:
    """The artifact folder's name recorded in summary.json (untrusted: a name only, or None)."""
    p = run_dir / SUMMARY
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(fd, "rb", closefd=False) as fh:
            raw = fh.read(16 << 20)
    finally:
        os.close(fd)
    try:
        name = json.loads(raw.decode("utf-8")).get("artifacts")
    except (UnicodeDecodeError, ValueError, AttributeError, RecursionError):
        return None
    if not isinstance(name, str) or not name or "/" in name or "\x00" in name or name in (".", ".."):
        return None
    return name


def _candidates(run_dir: Path, meta: dict) -> list[Path]:
    """Where the artifacts may be, in this order: the folder summary.json names, beside the run
    and in the current folder, then the path the checkpoint records (``artifacts_dir``). Each is
    only a guess: a folder is used when its files hash to the checkpoint's ``artifacts_sha256``."""
    out = []
    name = _summary_name(run_dir)
    if name:
        out += [run_dir.parent / name, Path.cwd() / name]
    recorded = meta.get("artifacts_dir")
    if isinstance(recorded, str) and recorded and "\x00" not in recorded:
        out.append(Path(recorded))
    seen, unique = set(), []
    for p in out:
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


MAX_ARTIFACT_ENTRIES = 1000  # files and folders of an artifact set found by export-run (a few dozen)


def _hash_of(d: Path) -> str | None:
    """The artifact hash of ``d`` when it can be an artifact set accelc wrote, else None: a
    folder (no symbolic link) with the files every artifact set has, checked by name before
    anything in it is listed, then listed and hashed within :data:`MAX_ARTIFACT_ENTRIES`
    entries (the path is untrusted: never a walk of whatever tree it names)."""
    if d.is_symlink() or not d.is_dir() or not all(os.path.isfile(d / f) for f in REQUIRED):
        return None
    return ckpt.artifacts_sha256(d, max_entries=MAX_ARTIFACT_ENTRIES)


def _find_artifacts(run_dir: Path, meta: dict, artifacts) -> Path:
    want = meta["artifacts_sha256"]
    if artifacts is not None:
        d = Path(artifacts)
        if not d.is_dir():
            raise ExportError(f"artifact directory '{show(d)}' " + ("is not a folder" if d.exists() else "not found"))
        if want is not None and _hash_of(d) != want:
            raise ExportError(
                f"the run in '{show(run_dir)}' was trained from other artifacts: the files of '{show(d)}' differ "
                "from the ones its checkpoint records; give the artifact directory it was trained from"
            )
        return d
    if want is None:
        raise ExportError(
            f"the run in '{show(run_dir)}' records no artifact hash (trained from artifacts in memory); "
            "give the artifact directory it was trained from (--artifacts DIR)"
        )
    for d in _candidates(run_dir, meta):
        if _hash_of(d) == want:
            return d
    raise ExportError(
        f"cannot find the artifacts the run in '{show(run_dir)}' was trained from (none beside it, in the "
        "current folder or where its checkpoint records matches its checkpoint's hash); give them with --artifacts DIR"
    )


# ----------------------------------------------------------------------------- the inference model
def _static_shape(vi: onnx.ValueInfoProto) -> tuple | None:
    tt = vi.type.tensor_type
    if not tt.HasField("shape") or not all(d.HasField("dim_value") for d in tt.shape.dim):
        return None
    return tuple(d.dim_value for d in tt.shape.dim)


def _param(arrays: dict, name: str, want_shape, variant: str, epoch: int, run_dir: Path) -> np.ndarray:
    key = "param/" + name
    if key not in arrays:
        raise ExportError(
            f"the checkpoint in '{show(run_dir)}' lacks parameter {show(name)} of the model; it belongs to other artifacts"
        )
    a = arrays[key]
    if want_shape is not None and tuple(a.shape) != tuple(want_shape):
        stage = f" (variant {show(variant)}: a low-resolution stage)" if variant != "base" else ""
        raise ExportError(
            f"the checkpoint of epoch {epoch} in '{show(run_dir)}' holds parameter {show(name)} of shape "
            f"{tuple(a.shape)}{stage}; the full-resolution model's is {tuple(want_shape)}: only an epoch trained "
            "at full resolution can be exported"
        )
    if a.dtype != np.float32:
        raise ExportError(f"checkpoint parameter {show(name)} is {a.dtype}; the model's is float32")
    if not np.isfinite(a).all():
        raise ExportError(f"checkpoint parameter {show(name)} holds NaN or Inf (the run diverged)")
    return a


def inference_model(art, arrays: dict, epoch: int, variant: str, run_dir: Path) -> onnx.ModelProto:
    """The artifacts' eval graph without the loss, the checkpoint's values as initialisers."""
    info = art.info
    model = onnx.ModelProto()
    model.CopyFrom(art.eval)
    g = model.graph
    out = info.output_name
    if out not in {o.name for o in g.output}:
        raise ExportError(f"the artifacts' eval graph has no output {show(out)} (recompile them)")
    # the nodes the logits need, in graph order
    producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    keep, stack = set(), [out]
    while stack:
        t = stack.pop()
        i = producer.get(t)
        if i is None or i in keep:
            continue
        keep.add(i)
        stack.extend(x for x in g.node[i].input if x)
    nodes = [g.node[i] for i in sorted(keep)]
    used = {x for n in nodes for x in n.input if x} | {out}
    inits = {t.name for t in g.initializer}
    new_inputs, new_inits = [], []
    for vi in g.input:
        if vi.name not in used:
            continue  # the labels
        if vi.name == info.input_name:
            new_inputs.append(vi)
            continue
        a = _param(arrays, vi.name, _static_shape(vi), variant, epoch, run_dir)
        new_inits.append(numpy_helper.from_array(np.ascontiguousarray(a), vi.name))
    if LABELS in used:
        raise ExportError("the artifacts' logits depend on the labels input; recompile them")
    kept_inits = [t for t in g.initializer if t.name in used and t.name not in {x.name for x in new_inits}]
    produced = {o for n in nodes for o in n.output}
    known = produced | {vi.name for vi in new_inputs} | inits | {t.name for t in new_inits}
    missing = sorted(used - known)
    if missing:
        raise ExportError(
            f"the artifacts' eval graph reads {show(missing[0])}, which nothing provides (recompile them)"
        )
    outputs = [o for o in g.output if o.name == out]
    value_info = [v for v in g.value_info if v.name in produced and v.name != out]
    del g.node[:], g.input[:], g.output[:], g.initializer[:], g.value_info[:]
    g.node.extend(nodes)
    g.input.extend(new_inputs)
    g.output.extend(outputs)
    g.initializer.extend(kept_inits + new_inits)
    g.value_info.extend(value_info)
    props = [p for p in model.metadata_props if p.key != "accelc.trainable"]  # a training-only note
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    for k, v in (("accelc.run_epoch", str(epoch)), ("accelc.trained_variant", variant)):
        model.metadata_props.add(key=k, value=v)
    g.doc_string = f"accelc export-run: inference model, parameters after epoch {epoch}"
    return model


def _check_model(model: onnx.ModelProto, info) -> bytes:
    """The model passes onnx's checker and runs on onnxruntime (one image of zeros)."""
    if model.ByteSize() > MAX_PROTO_BYTES:
        raise ExportError(
            f"the inference model is {model.ByteSize() / 1e9:.1f} GB, over protobuf's 2 GB for one file; "
            "export-run writes single-file models only"
        )
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"the inference model fails onnx's checker: {show(str(e).splitlines()[0], 200)}") from None
    data = model.SerializeToString()
    import onnxruntime as ort  # heavy

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        (y,) = sess.run([info.output_name], {info.input_name: np.zeros((1, *info.input_shape), np.float32)})
    except Exception as e:  # ORT refusing the graph: its reason, in one line
        raise ExportError(f"onnxruntime cannot run the inference model: {ort_message(e)}") from None
    if tuple(np.shape(y)) != (1, info.num_classes):
        raise ExportError(
            f"the inference model gives logits of shape {tuple(np.shape(y))}, not (1, {info.num_classes})"
        )
    return data


def ort_checkpoint_bytes(art, arrays: dict, epoch: int, variant: str, run_dir: Path) -> tuple[bytes, int]:
    """The artifacts' ORT CheckpointState with the run's values (every parameter it holds,
    trainable or frozen); returns (bytes, number of parameters). Read and written without ORT
    Training, byte for byte as its ``save_checkpoint`` writes them."""
    shapes = {vi.name: _static_shape(vi) for vi in art.eval.graph.input}
    try:  # the artifacts' own checkpoint: which parameters it holds, in its order, trainable or not
        held = [(p.name, p.requires_grad, p.value.shape) for p in read_checkpoint_parameters(art.checkpoint)]
    except AccelcError as e:
        raise ExportError(str(e)) from None
    groups: tuple[list, list] = ([], [])
    for name, trainable, initial_shape in held:
        a = _param(arrays, name, shapes.get(name) or initial_shape, variant, epoch, run_dir)
        groups[0 if trainable else 1].append((name, a))
    try:
        return write_checkpoint(*groups, what="the training checkpoint"), len(held)
    except AccelcError as e:
        raise ExportError(str(e)) from None


# ----------------------------------------------------------------------------- outputs
def _check_output(path: Path, force: bool, protect: list[Path], flag: str) -> None:
    if path.is_dir():
        raise ExportError(f"{flag} '{show(path)}' is a folder; give a file name")
    if not path.parent.is_dir():
        raise ExportError(f"folder '{show(path.parent)}' does not exist")
    real = Path(os.path.realpath(path))
    for p in protect:
        r = Path(os.path.realpath(p))
        if real == r or r in real.parents:
            raise ExportError(f"{flag} '{show(path)}' is inside the input '{show(p)}'; write it elsewhere")
    if os.path.lexists(path):
        if not force:
            raise ExportError(f"{flag} '{show(path)}' exists (use --force to replace it)")
        if path.is_symlink() or not path.is_file():
            raise ExportError(f"{flag} '{show(path)}' exists and is not a regular file; remove it yourself")


def export_run(
    run_dir, output, artifacts=None, epoch: int | None = None, ort_checkpoint=None, force: bool = False
) -> dict:
    """Write the trained model of ``run_dir`` (a run of ``accelc train``) as an inference ONNX
    model at ``output`` and, with ``ort_checkpoint``, an ORT training CheckpointState there.

    ``artifacts``: the artifact directory the run was trained from; by default the folder
    summary.json names beside the run or in the current folder, else the one the checkpoint
    records -- in every case verified against the checkpoint's ``artifacts_sha256``. ``epoch``:
    1-based; a run keeps its last epoch's checkpoint only, which is the default. ``force``:
    replace existing output files. Returns what was written."""
    run_dir = Path(run_dir)
    arrays, meta = _read_run(run_dir)
    epoch = _pick_epoch(epoch, meta, run_dir)
    art_dir = _find_artifacts(run_dir, meta, artifacts)
    out = Path(output)
    ckpt_out = Path(ort_checkpoint) if ort_checkpoint is not None else None
    protect = [run_dir, art_dir]
    _check_output(out, force, protect, "-o")
    if ckpt_out is not None:
        _check_output(ckpt_out, force, protect, "--ort-checkpoint")
        if os.path.abspath(ckpt_out) == os.path.abspath(out):
            raise ExportError("--ort-checkpoint and -o name the same file")
    # what each output path held when checked: only that, unchanged, is replaced at the end (a file
    # that appears there meanwhile is refused, not overwritten)
    found = {p: output_state(p) for p in (out, ckpt_out) if p is not None}
    art, _ = load_artifacts(art_dir)  # verified against its report's hashes
    variant = ckpt.variant_text(meta["variant"])
    model = inference_model(art, arrays, epoch, variant, run_dir)
    data = _check_model(model, art.info)
    state, n_state = ort_checkpoint_bytes(art, arrays, epoch, variant, run_dir) if ckpt_out is not None else (None, 0)
    # both outputs are complete in memory before either is written; each appears whole or not at all
    for p in (out, ckpt_out):
        if p is not None:
            recover(p.parent, p.name)
    atomic_write_bytes(out, data, expect=found[out])
    if ckpt_out is not None:
        atomic_write_bytes(ckpt_out, state, expect=found[ckpt_out])
    hist = next(h for h in meta["history"] if h["epoch"] == epoch)
    params = [t.name for t in model.graph.initializer]
    return {
        "output": str(out),
        "ort_checkpoint": None if ckpt_out is None else str(ckpt_out),
        "ort_checkpoint_parameters": n_state,
        "artifacts": str(art_dir),
        "epoch": epoch,
        "trained_variant": variant,
        "test_acc": hist["test_acc"],
        "input": {"name": art.info.input_name, "shape": ["N", *art.info.input_shape]},
        "output_name": art.info.output_name,
        "initialisers": len(params),
        "parameter_count": int(sum(math.prod(t.dims) for t in model.graph.initializer)),
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "ir_version": model.ir_version,
        "bytes": len(data),
    }
