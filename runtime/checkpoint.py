"""Run checkpoints: numpy ``.npz`` arrays (loaded with allow_pickle=False) plus ``checkpoint.json``.

Both are written to temporary files and renamed, arrays first; ``checkpoint.json`` names the
array file it belongs to, so a crash between the two renames leaves the previous pair valid.

A checkpoint is self-describing and verified on resume, all or nothing: ``checkpoint.json``
holds the run's configuration fingerprint, the artifact set's hash and a manifest of every array
(name, shape, dtype, SHA-256); the ``.npz`` must hold exactly the manifest's arrays with those
checksums, its name must be a plain ``checkpoint-NNNN.npz`` inside the run directory (NNNN: the
epoch it holds, 1-based), and the
JSON is checked against a schema. Anything else is one line saying what is wrong.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import stat
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..compiler.errors import AccelcError, show
from ..compiler.fileio import atomic_write_bytes, atomic_write_text

META = "checkpoint.json"
FORMAT = 2
MAX_JSON_BYTES = 64 << 20
_ARRAYS = re.compile(r"checkpoint-\d{4,9}\.npz")

SCHEMA = {
    "type": "object",
    "required": [
        "format",
        "epoch",
        "arrays",
        "arrays_sha256",
        "manifest",
        "fingerprint",
        "artifacts_sha256",
        "history",
        "train_time",
        "wall_time",
        "controllers",
        "variant",
    ],
    "properties": {
        "format": {"const": FORMAT},
        "epoch": {"type": "integer", "minimum": 0, "maximum": 1_000_000},
        "arrays": {"type": "string", "pattern": r"^checkpoint-\d{4,9}\.npz$"},
        "arrays_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "manifest": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["shape", "dtype", "sha256"],
                "properties": {
                    "shape": {
                        "type": "array",
                        "items": {"type": "integer", "minimum": 0, "maximum": 2**31},
                        "maxItems": 8,
                    },
                    "dtype": {"enum": ["float32", "float64", "int64", "int32", "float16", "bool"]},
                    "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                },
            },
        },
        "fingerprint": {"type": "object"},
        "artifacts_sha256": {"type": ["string", "null"], "pattern": "^[0-9a-f]{64}$"},
        # where the artifacts were when the run trained (export-run's default; verified by the hash)
        "artifacts_dir": {"type": ["string", "null"], "maxLength": 4096},
        "history": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "train_time", "wall_time"],
                "properties": {
                    "epoch": {"type": "integer", "minimum": 1},
                    "train_loss": {"type": "number"},
                    "test_loss": {"type": "number"},
                    "train_acc": {"type": "number", "minimum": 0, "maximum": 1},
                    "test_acc": {"type": "number", "minimum": 0, "maximum": 1},
                    "train_time": {"type": "number", "minimum": 0},
                    "wall_time": {"type": "number", "minimum": 0},
                },
            },
        },
        "data_position": {
            "type": "object",
            "required": ["next_epoch", "next_step"],
            "properties": {"next_epoch": {"type": "integer", "minimum": 1}, "next_step": {"const": 0}},
            "additionalProperties": False,
        },
        "train_time": {"type": "number", "minimum": 0},
        "wall_time": {"type": "number", "minimum": 0},
        "controllers": {"type": "object", "additionalProperties": {"type": "object"}},
        # the activation layouts --layout auto chose (runtime.layout.Layouts.state); absent in
        # checkpoints written before
        "layouts": {
            "type": "array",
            "maxItems": 1024,
            "items": {
                "type": "object",
                "required": ["key", "layout"],
                "properties": {
                    "key": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                    "layout": {"enum": ["nchw", "nhwc"]},
                    "last": {"const": True},  # the layout the last step ran in
                },
                "additionalProperties": False,
            },
        },
        # per method, its decision ({} for the plain graph); a string in checkpoints written before
        # (their joined name, at most 200 characters)
        "variant": {
            "oneOf": [
                {"type": "string", "maxLength": 200},
                {
                    "type": "object",
                    "maxProperties": 64,
                    "propertyNames": {"maxLength": 100},
                    "additionalProperties": {"type": "string", "maxLength": 10_000_000},
                },
            ]
        },
    },
}


def variant_text(variant) -> str:
    """A checkpoint's variant as one readable name (``skip:a,b+reuse:off``; ``base`` for the plain
    graph), for either form it is stored in."""
    if isinstance(variant, str):
        return variant
    return "+".join(str(v) for v in variant.values()) or "base"


class CheckpointError(AccelcError):
    """A checkpoint that cannot be resumed exactly."""


def _array_sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def manifest_of(arrays: dict[str, np.ndarray]) -> dict:
    return {
        k: {"shape": list(v.shape), "dtype": str(v.dtype), "sha256": _array_sha(v)}
        for k, v in ((k, np.asarray(v)) for k, v in arrays.items())
    }


def save(run_dir: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    run_dir = Path(run_dir)
    epoch = meta["epoch"]  # the 0-based index of the epoch that ended (history[-1]["epoch"] - 1)
    name = array_name(epoch)
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    atomic_write_bytes(run_dir / name, data)
    meta = dict(
        meta,
        format=FORMAT,
        arrays=name,
        arrays_sha256=hashlib.sha256(data).hexdigest(),
        manifest=manifest_of(arrays),
    )
    atomic_write_text(run_dir / META, json.dumps(meta, indent=1))
    for old in run_dir.glob("checkpoint-*.npz"):  # keep the current file only
        if old.name != name:
            try:
                old.unlink()
            except OSError:
                pass


def array_name(epoch: int) -> str:
    """The array file of the checkpoint taken after the epoch of 0-based index ``epoch``, named by
    that epoch as users count it: ``checkpoint-0001.npz`` holds epoch 1. (Run directories written
    before this numbering name it ``checkpoint-0000.npz``; ``checkpoint.json`` names the file it
    belongs to, so they resume as they are and the next checkpoint takes the new name.)"""
    return f"checkpoint-{epoch + 1:04d}.npz"


def _read_confined(run_dir: Path, name: str, limit: int) -> bytes:
    """Bytes of RUN_DIR/name: a regular file directly inside the run directory (no symlink out)."""
    path = run_dir / name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO must not block
    except OSError as e:
        why = "is a symbolic link" if e.errno == 40 else (e.strerror or str(e))
        raise CheckpointError(f"checkpoint file '{show(path)}' {why}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CheckpointError(f"checkpoint file '{show(path)}' is not a regular file")
    with os.fdopen(fd, "rb") as fh:
        if st.st_size > limit:
            raise CheckpointError(f"checkpoint file '{show(path)}' is {st.st_size} bytes, over the {limit}-byte limit")
        return fh.read()


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def read_meta(run_dir: Path) -> dict:
    """checkpoint.json, parsed and checked against the schema."""
    import jsonschema  # loaded when a checkpoint is read

    run_dir = Path(run_dir)
    raw = _read_confined(run_dir, META, MAX_JSON_BYTES)
    try:
        meta = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"'{show(run_dir / META)}' is not valid JSON ({show(e, 120)})") from None
    except RecursionError:
        raise CheckpointError(f"'{show(run_dir / META)}' is nested too deeply to be a checkpoint") from None
    if isinstance(meta, dict) and meta.get("format") != FORMAT and "manifest" not in meta:
        raise CheckpointError(
            f"checkpoint in '{show(run_dir)}' was written by an older accelc without verification data; "
            "it cannot be resumed exactly (start a new run)"
        )
    try:
        err = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(SCHEMA).iter_errors(meta))
    except RecursionError:
        raise CheckpointError(f"'{show(run_dir / META)}' is nested too deeply to be a checkpoint") from None
    if err is not None:
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise CheckpointError(f"'{show(run_dir / META)}' is malformed at {show(where)}: {show(err.message, 160)}")
    if not _ARRAYS.fullmatch(meta["arrays"]):
        raise CheckpointError(f"'{show(run_dir / META)}' names an array file outside the run directory")
    history = meta["history"]
    if len(history) != meta["epoch"] + 1 or [h["epoch"] for h in history] != list(range(1, len(history) + 1)):
        raise CheckpointError(f"'{show(run_dir / META)}' is inconsistent: its history does not end at its epoch")
    return meta


READ_TRIES = 5  # a checkpoint a live run replaces while it is read: read again this many times


def load(run_dir: Path) -> tuple[dict[str, np.ndarray], dict] | None:
    """The verified arrays and metadata of the run's checkpoint (None when there is none).

    A consistent pair even while a training writes the run: when the array file checkpoint.json
    names is gone or differs because a newer checkpoint replaced both meanwhile (the trainer
    writes the arrays, then checkpoint.json, then deletes the previous arrays), it is read again;
    a checkpoint that keeps changing is one line saying the run is being written."""
    run_dir = Path(run_dir)
    for attempt in range(READ_TRIES):
        if not os.path.lexists(run_dir / META):
            return None
        meta = read_meta(run_dir)
        try:
            data = _read_confined(run_dir, meta["arrays"], 1 << 40)
            if hashlib.sha256(data).hexdigest() != meta["arrays_sha256"]:
                raise CheckpointError(
                    f"checkpoint arrays '{show(run_dir / meta['arrays'])}' are damaged (checksum differs from {META})"
                )
        except CheckpointError:
            if _names_now(run_dir) in (None, (meta["arrays"], meta["arrays_sha256"])):
                raise  # nothing replaced it: the run directory is damaged
            time.sleep(0.05 * (attempt + 1))
            continue
        return _verified(data, meta, run_dir)
    raise CheckpointError(
        f"the checkpoint in '{show(run_dir)}' changed while it was read ({READ_TRIES} times): the run is being "
        f"written by a training{_writer(run_dir)}; try again once it has saved its epoch or ended"
    )


def _names_now(run_dir: Path) -> tuple | None:
    """The (array file, its hash) checkpoint.json names now, or None where it cannot be read."""
    try:
        meta = json.loads(_read_confined(run_dir, META, MAX_JSON_BYTES).decode("utf-8"))
        return meta["arrays"], meta["arrays_sha256"]
    except (AccelcError, ValueError, UnicodeDecodeError, RecursionError, KeyError, TypeError):
        return None


def _writer(run_dir: Path) -> str:
    """`` (accelc process PID)`` when the run directory's lock names a live process, else ''."""
    from .runlock import LOCK

    try:
        fd = os.open(run_dir / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return ""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    if not pid.isdigit() or int(pid) == os.getpid():
        return ""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return ""
    except OSError:
        pass
    return f" (accelc process {pid})"


def _verified(data: bytes, meta: dict, run_dir: Path) -> tuple[dict[str, np.ndarray], dict]:
    name = show(run_dir / meta["arrays"])
    _check_members(data, meta["manifest"], name)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise CheckpointError(f"checkpoint arrays '{name}' are unreadable: {show(e, 160)}") from None
    man = meta["manifest"]
    missing = sorted(set(man) - set(arrays))
    extra = sorted(set(arrays) - set(man))
    if missing or extra:
        what = f"missing {show(missing[0])}" if missing else f"an unexpected array {show(extra[0])}"
        n = len(missing) + len(extra)
        raise CheckpointError(
            f"checkpoint arrays '{name}' do not match {META}: {what}" + (f" (+{n - 1} more)" * (n > 1))
        )
    for k, v in arrays.items():
        m = man[k]
        if list(v.shape) != m["shape"] or str(v.dtype) != m["dtype"] or _array_sha(v) != m["sha256"]:
            raise CheckpointError(f"checkpoint array {show(k)} in '{name}' does not match {META} (damaged or edited)")
    return arrays, meta


def _check_members(data: bytes, manifest: dict, name: str) -> None:
    """The zip holds exactly the manifest's arrays, stored uncompressed (as accelc writes them) at
    the size their shapes give: nothing is inflated before it is known to be what it claims."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise CheckpointError(f"checkpoint arrays '{name}' are unreadable: {show(e, 160)}") from None
    members = {i.filename: i for i in infos}
    if len(members) != len(infos) or set(members) != {k + ".npy" for k in manifest}:
        raise CheckpointError(f"checkpoint arrays '{name}' do not match {META} (their members differ)")
    for k, m in manifest.items():
        info = members[k + ".npy"]
        nbytes = math.prod(m["shape"]) * np.dtype(m["dtype"]).itemsize  # Python ints: no overflow
        if info.compress_type != zipfile.ZIP_STORED or not nbytes <= info.file_size <= nbytes + 4096:
            raise CheckpointError(
                f"checkpoint array {show(k)} in '{name}' is not stored as accelc writes it (compressed or wrongly sized)"
            )


def exists(run_dir) -> bool:
    return os.path.lexists(os.path.join(run_dir, META))


def check_against(
    arrays: dict[str, np.ndarray], expected: dict[str, np.ndarray], run_dir, stateful: bool = True
) -> None:
    """Every parameter of the model being resumed must be in the checkpoint with its shape, and
    the checkpoint must hold no parameter the model lacks (all or nothing, never a silent reset)."""
    want = {k: np.asarray(v) for k, v in expected.items() if k.startswith("param/")}
    have = {k: v for k, v in arrays.items() if k.startswith("param/")}
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing:
        raise CheckpointError(
            f"checkpoint in '{show(run_dir)}' lacks parameter {show(missing[0][6:])} of the model being resumed "
            f"({len(missing)} missing); it belongs to other artifacts"
        )
    if extra:
        raise CheckpointError(
            f"checkpoint in '{show(run_dir)}' holds parameter {show(extra[0][6:])} the model does not have; "
            "it belongs to other artifacts"
        )
    for k, v in want.items():
        if tuple(have[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"checkpoint parameter {show(k[6:])} has shape {tuple(have[k].shape)}, the model's is {tuple(v.shape)}"
            )
        if have[k].dtype != v.dtype:
            raise CheckpointError(f"checkpoint parameter {show(k[6:])} is {have[k].dtype}, the model's is {v.dtype}")
        if not np.isfinite(have[k]).all():
            raise CheckpointError(f"checkpoint parameter {show(k[6:])} holds NaN or Inf")
    other = sorted(k for k in arrays if not k.startswith(("param/", "optim/")))
    if other:
        raise CheckpointError(f"checkpoint in '{show(run_dir)}' holds an array {show(other[0])} accelc does not write")
    # optimizer state: "optim/<param>/<key>", for parameters the model has, the same keys for each
    per: dict[str, set] = {}
    for k in arrays:
        if k.startswith("optim/"):
            n, _, key = k[len("optim/") :].rpartition("/")
            if "param/" + n not in want:
                raise CheckpointError(
                    f"checkpoint in '{show(run_dir)}' holds optimizer state for {show(n)}, which the model does not have"
                )
            per.setdefault(n, set()).add(key)
            a = arrays[k]
            if key == "step":
                if a.size != 1 or not np.issubdtype(a.dtype, np.number) or not (a >= 0).all() or a.ndim > 1:
                    raise CheckpointError(f"checkpoint optimizer step of {show(n)} is not a count")
            elif tuple(a.shape) != tuple(want["param/" + n].shape) or a.dtype != want["param/" + n].dtype:
                raise CheckpointError(
                    f"checkpoint optimizer state {show(key)} of {show(n)} has shape {tuple(a.shape)} ({a.dtype}); "
                    f"the parameter's is {tuple(want['param/' + n].shape)}"
                )
            elif not np.isfinite(a).all() or (key == "exp_avg_sq" and (a < 0).any()):
                raise CheckpointError(f"checkpoint optimizer state {show(key)} of {show(n)} holds impossible values")
    if stateful and want and not per:
        raise CheckpointError(f"checkpoint in '{show(run_dir)}' has no optimizer state (it would be reset silently)")
    kinds = {frozenset(v) for v in per.values()}
    if len(kinds) > 1:
        n = min(per, key=lambda x: len(per[x]))
        raise CheckpointError(f"checkpoint in '{show(run_dir)}' has incomplete optimizer state for {show(n)}")


def artifacts_sha256(art_dir, max_entries: int | None = None) -> str | None:
    """One hash over the files of an artifact directory (names and contents), or None.

    ``max_entries``: for a folder that is not the user's own input (one a run records, found by
    export-run): listed without following symbolic links, and no hash (None) -- no file opened --
    when it holds more than this many entries, a symbolic link or anything but folders and
    regular files. Where it is a hash, it is the one the unbounded form gives."""
    d = Path(art_dir)
    if not d.is_dir():
        return None
    if max_entries is None:
        files = sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))
        rels = [f.relative_to(d).parts for f in files]
    else:
        rels = _listing(d, max_entries)
        if rels is None:
            return None
    h = hashlib.sha256()
    for parts in rels:
        h.update(os.path.join(*parts).encode() + b"\0")
        flags = os.O_RDONLY | (0 if max_entries is None else os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            fd = os.open(d.joinpath(*parts), flags)
        except OSError:
            if max_entries is None:
                raise
            return None
        with os.fdopen(fd, "rb") as fh:
            if max_entries is not None and not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def _listing(d: Path, max_entries: int, max_depth: int = 8) -> list[tuple] | None:
    """The relative paths (as parts) of the files :func:`artifacts_sha256` hashes, in its order,
    or None (see there); at most ``max_entries`` entries are looked at."""
    out, todo, seen = [], [((), 0)], 0
    while todo:
        rel, depth = todo.pop()
        try:
            with os.scandir(d.joinpath(*rel)) as it:
                for e in it:
                    seen += 1
                    if seen > max_entries:
                        return None
                    if e.is_dir(follow_symlinks=False):
                        if depth >= max_depth:
                            return None
                        todo.append(((*rel, e.name), depth + 1))
                    elif e.name.startswith("."):
                        continue  # not hashed (the output marker, temporaries)
                    elif e.is_file(follow_symlinks=False):
                        out.append((*rel, e.name))
                    else:  # a symbolic link, a FIFO, a device: nothing an artifact set holds
                        return None
        except OSError:
            return None
    return sorted(out)


def compare_fingerprint(saved: dict, now: dict, allow: set, run_dir) -> None:
    """Refuse a resume whose configuration differs from the checkpoint's, naming what differs;
    ``allow`` lists the settings (e.g. {"batch_size", "epochs"}) the user chose to change."""
    for k in sorted(set(saved) | set(now)):
        if k in allow:
            continue
        a, b = saved.get(k, FINGERPRINT_DEFAULTS.get(k)), now.get(k, FINGERPRINT_DEFAULTS.get(k))
        if a != b:
            flag = "--" + k.replace("_", "-")
            hint = f" (pass --allow-change {k.replace('_', '-')} to change it deliberately)" if k in CHANGEABLE else ""
            raise CheckpointError(
                f"the checkpoint in '{show(run_dir)}' was written with {flag} {show(a)}; this run has {show(b)}{hint}"
            )


CHANGEABLE = ("batch_size", "epochs", "nproc")
# settings older checkpoints do not record, at the value they were written with
FINGERPRINT_DEFAULTS = {"nproc": 1, "lr_schedule": "constant"}
