"""The parameters of an ORT Training checkpoint, read without ONNX Runtime Training.

An artifact set's ``checkpoint`` is ORT Training's flatbuffer (schema
``onnxruntime/core/flatbuffers/schema/ort_training_checkpoint.fbs``, file identifier ``ODTC``):
a ``Checkpoint`` table whose ``module_state`` holds two vectors of ``Tensor`` tables,
``requires_grad_params`` and ``frozen_params`` (name, dims, data_type, little-endian
``raw_data``). ORT Training is not installable everywhere accelc runs (no 1.19.2 wheel for
Python >= 3.13, not on the GPU machines), while plain ``onnxruntime`` ships the generated Python
classes of that schema (``onnxruntime/tools/ort_format_model/ort_flatbuffers_py/fbs``) and needs the
``flatbuffers`` package: this module reads the parameters with those, imported on first use.

The file is untrusted. flatbuffers' Python reader checks no bounds (an offset past the end raises
``struct.error``, a negative one silently reads from the end, a string is cut short), so every
table, vector and string is checked here before the generated classes read it, as ORT's own
``flatbuffers::Verifier`` does: the identifier, the version (ORT 1.19.2 reads exactly version 2),
every offset inside the file and aligned, each tensor's type one ORT 1.19.2 loads, dims non-negative
with their product times the item size equal to the data's length, names non-empty, valid UTF-8
and unique, and no more bytes allocated than the file holds (two tensors could share one data
vector). Tensors kept in an external data file and nominal checkpoints (names without values)
are refused. Every failure is one :class:`AccelcError` line.

The parameters come in ORT's order (``CheckpointState.parameters`` iterates them sorted by name,
trainable and frozen together), with the dtype the checkpoint stores.

:func:`write_checkpoint` writes a parameters-only checkpoint byte for byte as ORT Training 1.19.2's
``onnxblock.save_checkpoint`` does, with the same generated classes and ``flatbuffers``' Builder;
:func:`freeze` re-saves a checkpoint with more parameters frozen (skip's variants, export-run).
"""

from __future__ import annotations

import importlib
import importlib.util
import struct
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import AccelcError, show

FILE_IDENTIFIER = b"ODTC"
VERSIONS = (2,)  # ORT 1.19.2's kCheckpointVersion: the only version it reads (checkpoint_version.h)
MAX_RANK = 64
_MIN_SIZE = 16  # root offset, identifier, the smallest vtable and table

# TensorDataType (ort.fbs) -> numpy, little-endian as the flatbuffer stores them: the types ORT
# 1.19.2 itself loads from a checkpoint (it refuses FLOAT16, BFLOAT16, complex, FLOAT8, STRING)
_DTYPES = {
    1: "<f4",  # FLOAT
    2: "u1",  # UINT8
    3: "i1",  # INT8
    4: "<u2",  # UINT16
    5: "<i2",  # INT16
    6: "<i4",  # INT32
    7: "<i8",  # INT64
    9: "?",  # BOOL
    11: "<f8",  # DOUBLE
    12: "<u4",  # UINT32
    13: "<u8",  # UINT64
}

# The schema (ort_training_checkpoint.fbs, and ort.fbs's Tensor): table -> (vtable offset, field,
# kind) per field; kind: a scalar's size, "string", "strings", ("vector", element size),
# ("table", T) or ("tables", T). The vtable offsets are the numbers the generated classes read.
_SCHEMA = {
    "Checkpoint": (
        (4, "version", 4),
        (6, "module_state", ("table", "ModuleState")),
        (8, "optimizer_groups", ("tables", "OptimizerGroup")),
        (10, "property_bag", ("table", "PropertyBag")),
    ),
    "ModuleState": (
        (4, "requires_grad_params", ("tables", "Tensor")),
        (6, "frozen_params", ("tables", "Tensor")),
        (8, "is_nominal_state", 1),
        (10, "has_external_data", 1),
    ),
    "Tensor": (
        (4, "name", "string"),
        (6, "doc_string", "string"),
        (8, "dims", ("vector", 8)),
        (10, "data_type", 4),
        (12, "raw_data", ("vector", 1)),
        (14, "string_data", "strings"),
        (16, "external_data_offset", 8),
    ),
    "OptimizerGroup": (
        (4, "group_name", "string"),
        (6, "step", 8),
        (8, "initial_learning_rate", 4),
        (10, "optimizer_states", ("tables", "ParameterOptimizerState")),
    ),
    "ParameterOptimizerState": ((4, "param_name", "string"), (6, "momentums", ("tables", "Tensor"))),
    "PropertyBag": (
        (4, "ints", ("tables", "IntProperty")),
        (6, "floats", ("tables", "FloatProperty")),
        (8, "strings", ("tables", "StringProperty")),
    ),
    "IntProperty": ((4, "name", "string"), (6, "value", 8)),
    "FloatProperty": ((4, "name", "string"), (6, "value", 4)),
    "StringProperty": ((4, "name", "string"), (6, "value", "string")),
}
MAX_OBJECTS = 1_000_000  # tables and strings one verification visits (flatbuffers' max_tables)


class CheckpointParameter(NamedTuple):
    name: str
    value: np.ndarray
    requires_grad: bool


class _Bad(Exception):
    """Why the checkpoint cannot be read (becomes the AccelcError's reason)."""


def read_parameters(data: bytes, what: str = "the artifacts' checkpoint") -> dict[str, np.ndarray]:
    """All parameters (trainable and frozen) of the ORT Training checkpoint ``data``: name ->
    a numpy array of its own (the stored dtype), in ORT's order (sorted by name). ``what`` names
    the file in the error: ``"<what> cannot be read: <why>"``."""
    return {p.name: p.value for p in read_checkpoint_parameters(data, what)}


def read_checkpoint_parameters(data: bytes, what: str = "the artifacts' checkpoint") -> list[CheckpointParameter]:
    """:func:`read_parameters` with each parameter's ``requires_grad`` (trainable or frozen)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise AccelcError(f"{what} cannot be read: expected bytes, got {type(data).__name__}")
    fbs = _schema_classes(what)
    try:
        return _read(bytes(data) if not isinstance(data, bytes) else data, fbs)
    except _Bad as e:
        raise AccelcError(f"{what} cannot be read: {e}") from None
    except (struct.error, ValueError, IndexError, TypeError, OverflowError) as e:
        # the checks above leave none of these; kept so no file can turn into a traceback
        raise AccelcError(f"{what} cannot be read: malformed flatbuffer ({type(e).__name__}: {show(e, 120)})") from None


# ----------------------------------------------------------------------------- the schema classes
_FBS: list = []


def _schema_classes(what: str, failing: str = "cannot be read"):
    """(Checkpoint, TensorDataType names) from plain onnxruntime's generated flatbuffer classes,
    imported without importing onnxruntime itself (nor ORT Training)."""
    if _FBS:
        return _FBS[0]
    try:
        import flatbuffers  # noqa: F401

        if "ort_flatbuffers_py" not in sys.modules:
            spec = importlib.util.find_spec("onnxruntime")  # locates the package without running it
            if spec is None or not spec.origin:
                raise ImportError("onnxruntime is not installed")
            pkg = Path(spec.origin).parent / "tools" / "ort_format_model" / "ort_flatbuffers_py"
            init = pkg / "__init__.py"
            if not (pkg / "fbs" / "Checkpoint.py").is_file() or not init.is_file():
                raise ImportError(f"onnxruntime has no checkpoint schema classes at {pkg}")
            # the generated classes import each other as top-level 'ort_flatbuffers_py'
            mspec = importlib.util.spec_from_file_location(
                "ort_flatbuffers_py", init, submodule_search_locations=[str(pkg)]
            )
            module = importlib.util.module_from_spec(mspec)
            sys.modules["ort_flatbuffers_py"] = module
            try:
                mspec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop("ort_flatbuffers_py", None)
                raise
        checkpoint = importlib.import_module("ort_flatbuffers_py.fbs.Checkpoint").Checkpoint
        types = importlib.import_module("ort_flatbuffers_py.fbs.TensorDataType").TensorDataType
    except ImportError as e:
        raise AccelcError(
            f"{what} {failing}: ORT checkpoints need onnxruntime and the flatbuffers package ({show(e, 160)})"
        ) from None
    type_names = {v: k for k, v in vars(types).items() if k.isupper() and isinstance(v, int)}
    _FBS.append((checkpoint, type_names))
    return _FBS[0]


# ----------------------------------------------------------------------------- verification
class _Verifier:
    """Checks the whole flatbuffer against :data:`_SCHEMA` before anything reads it, as ORT's
    ``VerifyCheckpointBuffer`` does: every table, vtable, field, vector and string inside the file
    and aligned, strings terminated, and at most :data:`MAX_OBJECTS` objects visited (vectors of
    offsets may point many times at one table)."""

    def __init__(self, data: bytes):
        self.data, self.n, self.objects = data, len(data), 0

    def get(self, fmt: str, pos: int, where: str):
        if pos < 0 or pos + struct.calcsize(fmt) > self.n:
            raise _Bad(f"{where} points outside the file")
        return struct.unpack_from(fmt, self.data, pos)[0]

    def count(self, where: str) -> None:
        self.objects += 1
        if self.objects > MAX_OBJECTS:
            raise _Bad(f"it holds more than {MAX_OBJECTS} objects (at {where})")

    def target(self, at: int, where: str) -> int:
        """Where the uoffset at ``at`` points (never at itself, never past 2**31: flatbuffers' rules)."""
        off = self.get("<I", at, where)
        if off == 0:
            raise _Bad(f"{where} points at itself")
        if off >= 1 << 31 or at + off >= self.n:
            raise _Bad(f"{where} points outside the file")
        return at + off

    def vector(self, pos: int, elem: int, where: str) -> tuple[int, int]:
        """(first element's position, length) of the vector at ``pos``."""
        if pos % 4:
            raise _Bad(f"{where} is misaligned")
        length = self.get("<I", pos, where)
        if pos + 4 + length * elem > self.n:
            raise _Bad(f"{where} reaches past the end of the file")
        return pos + 4, length

    def string(self, pos: int, where: str) -> None:
        self.count(where)
        start, length = self.vector(pos, 1, where)
        if start + length >= self.n or self.data[start + length] != 0:
            raise _Bad(f"{where} is not terminated")

    def table(self, pos: int, kind: str, where: str) -> None:
        self.count(where)
        if pos % 4:
            raise _Bad(f"{where} is misaligned")
        vt = pos - self.get("<i", pos, where)
        if vt % 2:
            raise _Bad(f"{where} has a misaligned vtable")
        vt_size, t_size = self.get("<H", vt, where), self.get("<H", vt + 2, where)
        if vt_size < 4 or vt_size % 2 or vt + vt_size > self.n:
            raise _Bad(f"{where} has a malformed vtable")
        if t_size < 4 or pos + t_size > self.n:
            raise _Bad(f"{where} reaches past the end of the file")
        for slot, name, field_kind in _SCHEMA[kind]:
            off = self.get("<H", vt + slot, where) if slot < vt_size else 0
            if off:
                self.field(pos + off, off, t_size, field_kind, f"{where}.{name}")

    def field(self, at: int, off: int, t_size: int, kind, where: str) -> None:
        size = kind if isinstance(kind, int) else 4
        if off < 4 or off + size > t_size:
            raise _Bad(f"{where} lies outside its table")
        if at % size:
            raise _Bad(f"{where} is misaligned")
        if isinstance(kind, int):
            return
        pos = self.target(at, where)
        if kind == "string":
            self.string(pos, where)
        elif kind == "strings":
            start, length = self.vector(pos, 4, where)
            for j in range(length):
                self.string(self.target(start + 4 * j, f"{where}[{j}]"), f"{where}[{j}]")
        elif kind[0] == "vector":
            self.vector(pos, kind[1], where)
        elif kind[0] == "table":
            self.table(pos, kind[1], where)
        else:  # ("tables", T)
            start, length = self.vector(pos, 4, where)
            for j in range(length):
                self.table(self.target(start + 4 * j, f"{where}[{j}]"), kind[1], f"{where}[{j}]")


# ----------------------------------------------------------------------------- reading
def _read(data: bytes, fbs) -> list[CheckpointParameter]:
    checkpoint_cls, type_names = fbs
    if len(data) < _MIN_SIZE:
        raise _Bad(f"it is too short to be an ORT checkpoint ({len(data)} bytes)")
    if data[4:8] != FILE_IDENTIFIER:
        raise _Bad(f"it is not an ORT training checkpoint (file identifier {show(data[4:8])}, expected b'ODTC')")
    v = _Verifier(data)
    v.table(v.target(0, "the root table"), "Checkpoint", "checkpoint")
    # verified: the generated classes read inside the file from here on
    ckpt = checkpoint_cls.GetRootAs(data, 0)
    if ckpt.Version() not in VERSIONS:
        raise _Bad(f"checkpoint version {ckpt.Version()} is not supported (ORT 1.19.2 reads version {VERSIONS[-1]})")
    ms = ckpt.ModuleState()
    if ms is None:
        return []  # as ORT: a checkpoint without a module state holds no parameters
    if ms.IsNominalState():
        raise _Bad("it is a nominal checkpoint (parameter names without values)")
    if ms.HasExternalData():
        raise _Bad("its parameters are kept in an external data file (not supported)")
    params: dict[str, CheckpointParameter] = {}
    budget = [len(data)]  # bytes the parameters may still take: never more than the file holds
    for trainable, kind in ((True, "trainable"), (False, "frozen")):
        if ms.RequiresGradParamsIsNone() if trainable else ms.FrozenParamsIsNone():
            raise _Bad(f"the module state has no {kind} parameter list")  # as ORT
        length = ms.RequiresGradParamsLength() if trainable else ms.FrozenParamsLength()
        tensor_at = ms.RequiresGradParams if trainable else ms.FrozenParams
        for j in range(length):
            p = _parameter(tensor_at(j), f"{kind} parameter #{j}", trainable, type_names, budget)
            if p.name in params:
                raise _Bad(f"parameter {show(p.name)!r} appears twice")
            params[p.name] = p
    return [params[name] for name in sorted(params)]


def _parameter(t, where: str, trainable: bool, type_names: dict, budget: list) -> CheckpointParameter:
    """One verified Tensor table as a parameter (a copy of its data, in the stored dtype)."""
    raw_name = t.Name()
    if not raw_name:
        raise _Bad(f"{where} has no name")
    try:
        name = raw_name.decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad(f"the name of {where} is not UTF-8: {show(raw_name)}") from None
    label = f"parameter {show(name)!r}"
    if t.ExternalDataOffset() != -1:
        raise _Bad(f"{label} is kept in an external data file (not supported)")
    data_type = t.DataType()
    if data_type not in _DTYPES:
        kind = type_names.get(data_type, f"number {data_type}")
        raise _Bad(f"{label} has data type {kind}, which ONNX Runtime 1.19.2 does not load from a checkpoint")
    dtype = np.dtype(_DTYPES[data_type])
    if t.DimsIsNone():
        raise _Bad(f"{label} has no dims")
    if t.DimsLength() > MAX_RANK:
        raise _Bad(f"{label} has {t.DimsLength()} dimensions (at most {MAX_RANK})")
    dims = [int(d) for d in t.DimsAsNumpy()] if t.DimsLength() else []
    if any(d < 0 for d in dims):
        raise _Bad(f"{label} has a negative dimension {dims}")
    nbytes = t.RawDataLength()
    count = 1
    for d in dims:
        count *= d
    if count * dtype.itemsize != nbytes:
        raise _Bad(f"{label} has shape {tuple(dims)} ({count} values) but {nbytes} bytes of {dtype.name} data")
    budget[0] -= nbytes
    if budget[0] < 0:
        raise _Bad(f"its parameters take more bytes than the file holds (at {label}): data vectors are shared")
    raw = t.RawDataAsNumpy() if nbytes else np.empty(0, np.uint8)  # a view of the file's bytes
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.size != nbytes:
        raise _Bad(f"the data of {label} could not be read")
    value = raw.view(dtype).astype(dtype.newbyteorder("="), copy=True).reshape(dims)
    return CheckpointParameter(name, value, trainable)


# ----------------------------------------------------------------------------- writing
# numpy (kind, item size) -> TensorDataType: every type the reader accepts
_CODES = {(np.dtype(s).kind, np.dtype(s).itemsize): code for code, s in _DTYPES.items()}
# ORT 1.19.2's save_checkpoint moves the data to an external file (which the reader refuses) once the
# tensors' TensorProto sizes, rounded up to whole MiB, reach 1800 MiB (measured: 1799 MiB - 3 bytes
# stay in the file, 1799 MiB + 21 bytes go external); the writer refuses where ORT goes external
MAX_PROTO_BYTES = 1799 * 1024 * 1024


def write_checkpoint(trainable, frozen, what: str = "the checkpoint") -> bytes:
    """An ORT Training checkpoint holding ``trainable`` and ``frozen`` (each a list of (name, numpy
    array)), byte for byte what ORT Training 1.19.2's ``onnxblock.save_checkpoint`` writes for the
    same tensors (``numpy_helper.from_array``) -- without ORT Training: version 2, identifier
    ``ODTC``, a ``Checkpoint`` with only ``module_state``, whose ``requires_grad_params`` and
    ``frozen_params`` list the tensors in the order given (name, dims, data_type, little-endian
    ``raw_data``; no doc string, optimizer groups, property bag, nominal or external-data flag).
    Every dtype the reader accepts is written as stored; names must be non-empty and unique."""
    flatbuffers, fbs = _writer_classes(what)
    lists = (_tensors_to_write(trainable, what, "trainable"), _tensors_to_write(frozen, what, "frozen"))
    names = [n for tensors in lists for n, _ in tensors]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise AccelcError(f"{what} cannot be written: parameter {show(dup.decode())!r} appears twice")
    total = sum(a.nbytes for tensors in lists for _, a in tensors)
    if sum(_proto_size(*t) for tensors in lists for t in tensors) > MAX_PROTO_BYTES:
        raise AccelcError(
            f"{what} cannot be written: its parameters take {total / 2**20:.0f} MiB, more than ORT Training "
            f"1.19.2 keeps in one checkpoint file (about {MAX_PROTO_BYTES / 2**20:.0f} MiB)"
        )
    tensor_cls, module_cls, checkpoint_cls = fbs
    b = flatbuffers.Builder(total + 1024 + 256 * len(names))
    vectors = []
    for tensors in lists:  # as ORT's FromTensorProtos: every tensor table, then the two vectors
        vectors.append([_write_tensor(b, tensor_cls, *t) for t in tensors])
    for j, offsets in enumerate(vectors):
        b.StartVector(4, len(offsets), 4 if offsets else 1)  # C++ aligns no empty vector
        for o in reversed(offsets):
            b.PrependUOffsetTRelative(o)
        vectors[j] = b.EndVector()
    module_cls.Start(b)
    module_cls.AddRequiresGradParams(b, vectors[0])
    module_cls.AddFrozenParams(b, vectors[1])
    module_state = module_cls.End(b)
    checkpoint_cls.Start(b)
    checkpoint_cls.AddVersion(b, VERSIONS[-1])
    checkpoint_cls.AddModuleState(b, module_state)
    b.Finish(checkpoint_cls.End(b), file_identifier=FILE_IDENTIFIER)
    return bytes(b.Output())


def freeze(checkpoint: bytes, frozen_names, what: str = "the checkpoint") -> bytes:
    """``checkpoint`` rewritten with the parameters named in ``frozen_names`` frozen (requires_grad
    False; the frozen stay frozen): every parameter in ORT's order (sorted by name) with its stored
    dtype, as ORT Training's ``save_checkpoint`` of its ``CheckpointState.parameters`` writes it."""
    frozen_names = set(frozen_names)
    lists: tuple[list, list] = ([], [])
    for p in read_checkpoint_parameters(checkpoint, what):
        lists[0 if p.requires_grad and p.name not in frozen_names else 1].append((p.name, p.value))
    return write_checkpoint(*lists, what=what)


def _writer_classes(what: str):
    """(flatbuffers, (Tensor, ModuleState, Checkpoint) generated modules)."""
    _schema_classes(what, "cannot be written")
    import flatbuffers

    mods = tuple(
        importlib.import_module(f"ort_flatbuffers_py.fbs.{n}") for n in ("Tensor", "ModuleState", "Checkpoint")
    )
    return flatbuffers, mods


def _tensors_to_write(params, what: str, kind: str) -> list[tuple[bytes, np.ndarray]]:
    """(UTF-8 name, the array as a contiguous little-endian one) per (name, array) of ``params``."""
    out = []
    for j, item in enumerate(params):
        name, value = item if isinstance(item, (tuple, list)) and len(item) == 2 else (None, None)
        if not isinstance(name, str) or not name:
            raise AccelcError(f"{what} cannot be written: {kind} parameter #{j} has no name")
        try:
            encoded = name.encode("utf-8")
        except UnicodeEncodeError:
            raise AccelcError(f"{what} cannot be written: the name {show(name)!r} is not valid unicode") from None
        a = np.asarray(value)
        code = _CODES.get((a.dtype.kind, a.dtype.itemsize))
        if code is None:
            raise AccelcError(
                f"{what} cannot be written: parameter {show(name)!r} has dtype {a.dtype}, which ONNX Runtime 1.19.2 does not load from a checkpoint"
            )
        if a.ndim > MAX_RANK:
            raise AccelcError(f"{what} cannot be written: parameter {show(name)!r} has {a.ndim} dimensions")
        out.append((encoded, a.astype(np.dtype(_DTYPES[code]), order="C", copy=False)))  # keeps 0-d
    return out


def _proto_size(name: bytes, a: np.ndarray) -> int:
    """The size of the tensor as the serialised ``onnx.TensorProto`` ORT's save_checkpoint is given
    (``numpy_helper.from_array``: unpacked dims, data_type, name, raw_data), as ORT measures it."""

    def varint(v: int) -> int:
        return max(1, (v.bit_length() + 6) // 7)

    code = _CODES[(a.dtype.kind, a.dtype.itemsize)]
    fields = sum(1 + varint(d) for d in a.shape) + 1 + varint(code)
    return fields + 1 + varint(len(name)) + len(name) + 1 + varint(a.nbytes) + a.nbytes


def _write_tensor(b, tensor_cls, name: bytes, a: np.ndarray) -> int:
    """One Tensor table, built as ORT's SaveInitializerOrtFormat builds it: name, dims, raw data."""
    name_off = b.CreateString(name)
    b.StartVector(8, a.ndim, 8 if a.ndim else 1)  # dims as int64; C++ aligns no empty vector
    for d in reversed(a.shape):
        b.PrependInt64(d)
    dims_off = b.EndVector()
    raw_off = b.CreateByteVector(a.tobytes())  # little-endian already
    tensor_cls.Start(b)
    tensor_cls.AddName(b, name_off)
    tensor_cls.AddDims(b, dims_off)
    tensor_cls.AddDataType(b, _CODES[(a.dtype.kind, a.dtype.itemsize)])
    tensor_cls.AddRawData(b, raw_off)
    return tensor_cls.End(b)
