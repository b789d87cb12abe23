"""accelc's own reader of ORT Training checkpoints (compiler/ort_checkpoint.py): the same parameters
as ORT Training's CheckpointState, bit for bit, and one AccelcError line for any damaged or
hand-made file -- without importing onnxruntime.training."""

import os
import random
import subprocess
import sys

import numpy as np
import pytest

from accelc.compiler.errors import AccelcError
from accelc.compiler.ort_checkpoint import read_checkpoint_parameters, read_parameters

from conftest import BLOCK_ORT_TRAINING

PREFIX = "the artifacts' checkpoint cannot be read: "


def _fbs():
    """The generated flatbuffer classes plain onnxruntime ships (the reader registers them)."""
    import importlib

    from accelc.compiler.ort_checkpoint import _schema_classes

    _schema_classes("test")
    return {n: importlib.import_module(f"ort_flatbuffers_py.fbs.{n}") for n in ("Checkpoint", "ModuleState", "Tensor")}


def _ort_parameters(data: bytes, tmp_path):
    """(name, value, requires_grad) as ORT Training's CheckpointState gives them."""
    pytest.importorskip("onnxruntime.training")
    from accelc.compiler.ort_training import import_ort_training

    import_ort_training()
    from onnxruntime.training import api

    p = tmp_path / "ort-checkpoint"
    p.write_bytes(data)
    state = api.CheckpointState.load_checkpoint(str(p))
    return [(n, np.array(prm.data, copy=True), prm.requires_grad) for n, prm in state.parameters]


def assert_same_as_ort(data: bytes, tmp_path):
    mine = read_checkpoint_parameters(data)
    ort = _ort_parameters(data, tmp_path)
    assert [p.name for p in mine] == [n for n, _, _ in ort]  # names and order
    for p, (name, value, requires_grad) in zip(mine, ort):
        assert p.value.dtype == value.dtype and p.value.shape == value.shape, name
        assert p.value.tobytes() == value.tobytes(), name  # bit-equal (NaN payloads, signed zeros)
        assert p.requires_grad == requires_grad, name
        assert p.value.flags.writeable, name  # an array of its own, not a view of the bytes
    return mine


def build(tensors, version=2, ident=b"ODTC", nominal=None, external=None, lists=("trainable", "frozen")):
    """A checkpoint made by hand with the generated builders. ``tensors``: dicts with name (str or
    bytes, or None for no name), dims (list or None), data_type (int), raw (bytes or None, or an
    int: share the raw_data vector of that earlier tensor), trainable, external_offset."""
    f = _fbs()
    import flatbuffers

    T, M, C = f["Tensor"], f["ModuleState"], f["Checkpoint"]
    b = flatbuffers.Builder(1024)
    offsets, raws = {"trainable": [], "frozen": []}, []
    for t in tensors:
        name = t.get("name")
        name_off = None if name is None else b.CreateString(name if isinstance(name, bytes) else name.encode())
        dims_off = None
        if t.get("dims") is not None:
            dims_off = b.CreateNumpyVector(np.asarray(t["dims"], dtype=np.int64))
        raw = t.get("raw", b"")
        raw_off = raws[raw] if isinstance(raw, int) else (None if raw is None else b.CreateByteVector(raw))
        raws.append(raw_off)
        T.Start(b)
        if name_off is not None:
            T.AddName(b, name_off)
        if dims_off is not None:
            T.AddDims(b, dims_off)
        T.AddDataType(b, t.get("data_type", 1))
        if raw_off is not None:
            T.AddRawData(b, raw_off)
        if t.get("external_offset") is not None:
            T.AddExternalDataOffset(b, t["external_offset"])
        offsets["trainable" if t.get("trainable", True) else "frozen"].append(T.End(b))
    vectors = {}
    for kind in lists or ():
        b.StartVector(4, len(offsets[kind]), 4)
        for o in reversed(offsets[kind]):
            b.PrependUOffsetTRelative(o)
        vectors[kind] = b.EndVector()
    M.Start(b)
    if "trainable" in vectors:
        M.AddRequiresGradParams(b, vectors["trainable"])
    if "frozen" in vectors:
        M.AddFrozenParams(b, vectors["frozen"])
    if nominal is not None:
        M.AddIsNominalState(b, nominal)
    if external is not None:
        M.AddHasExternalData(b, external)
    ms = M.End(b)
    C.Start(b)
    C.AddVersion(b, version)
    if lists is not None:
        C.AddModuleState(b, ms)
    b.Finish(C.End(b), file_identifier=ident)
    return bytes(b.Output())


def f32(*values):
    return np.asarray(values, dtype=np.float32).tobytes()


def refused(data, needle=""):
    with pytest.raises(AccelcError) as ei:
        read_parameters(data)
    msg = str(ei.value)
    assert msg.startswith(PREFIX) and "\n" not in msg and needle in msg, msg
    return msg


def only_accelc_errors(data):
    """Reading ``data`` returns parameters or raises AccelcError (one line): nothing else."""
    try:
        params = read_parameters(data)
    except AccelcError as e:
        assert str(e).startswith(PREFIX) and "\n" not in str(e), str(e)
        return None
    assert sum(v.nbytes for v in params.values()) <= len(data)
    return params


# ----------------------------------------------------------------------------- artifacts
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Checkpoints of compiled zoo models: no frozen parameters (cnn3-small), BatchNorm running
    statistics frozen (resnet), and resnet's with its classifier and a BatchNorm frozen as the skip pass
    does (freeze_in_checkpoint), and resnet's saved by ORT's CheckpointState with properties."""
    import accelc
    from accelc.passes.skip.rewrite import freeze_in_checkpoint
    from accelc.zoo import export_zoo

    out = {}
    for name in ("cnn3-small", "resnet"):
        d = tmp_path_factory.mktemp(name)
        export_zoo(name, d / "m.onnx")
        accelc.compile(d / "m.onnx", d / "art")
        out[name] = (d / "art" / "checkpoint").read_bytes()
    out["resnet-skip"] = freeze_in_checkpoint(out["resnet"], ["fc.weight", "layers.0.bn1.weight"])
    # as ORT saves a CheckpointState: with a property bag (ints, floats, strings)
    from accelc.compiler.ort_training import import_ort_training

    import_ort_training()
    from onnxruntime.training import api

    d = tmp_path_factory.mktemp("props")
    (d / "in").write_bytes(out["resnet"])
    state = api.CheckpointState.load_checkpoint(str(d / "in"))
    state.properties["epoch"], state.properties["lr"], state.properties["note"] = 3, 0.5, "x"
    api.CheckpointState.save_checkpoint(state, str(d / "out"))
    out["resnet-props"] = (d / "out").read_bytes()
    return out


@pytest.mark.cause(6)
@pytest.mark.parametrize("name", ["cnn3-small", "resnet", "resnet-skip", "resnet-props"])
def test_artifact_checkpoints_read_as_ort_reads_them(checkpoints, name, tmp_path):
    mine = assert_same_as_ort(checkpoints[name], tmp_path)
    frozen = {p.name for p in mine if not p.requires_grad}
    if name == "cnn3-small":
        assert not frozen
    else:
        assert any("running_mean" in n for n in frozen), frozen
    if name == "resnet-skip":
        assert {"fc.weight", "layers.0.bn1.weight"} <= frozen


@pytest.mark.cause(6)
def test_the_session_reads_float32_parameters_in_ort_order(checkpoints):
    from accelc.runtime.session import read_checkpoint_params

    params = read_checkpoint_params(checkpoints["resnet"])
    assert list(params) == sorted(params)
    assert all(v.dtype == np.float32 and v.flags.writeable for v in params.values())
    with pytest.raises(AccelcError, match="cannot be read"):
        read_checkpoint_params(checkpoints["resnet"][:1000])


@pytest.mark.cause(6)
def test_hand_made_checkpoint_of_every_dtype_reads_as_ort_reads_it(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "w.f32": rng.standard_normal((3, 4)).astype(np.float32),
        "special": np.array([np.nan, -0.0, np.inf, -np.inf, 1e-45], np.float32),
        "b.f64": rng.standard_normal(5),
        "i64": np.array([-(2**63), 2**63 - 1, 0], np.int64),
        "i32": np.array([[1, -2]], np.int32),
        "u8": np.arange(7, dtype=np.uint8),
        "i8": np.array([-128, 127], np.int8),
        "u16": np.array([65535], np.uint16),
        "i16": np.array([-32768], np.int16),
        "u32": np.array([2**32 - 1], np.uint32),
        "u64": np.array([2**64 - 1], np.uint64),
        "scalar": np.array(3.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "flag": np.array([True, False]),
    }
    types = {"float32": 1, "uint8": 2, "int8": 3, "uint16": 4, "int16": 5, "int32": 6, "int64": 7, "bool": 9}
    types.update({"float64": 11, "uint32": 12, "uint64": 13})  # every type ORT 1.19.2 loads from a checkpoint
    tensors = [
        {
            "name": n,
            "dims": list(a.shape),
            "data_type": types[a.dtype.name],
            "raw": a.tobytes(),
            "trainable": k % 2 == 0,
        }
        for k, (n, a) in enumerate(arrays.items())
    ]
    data = build(tensors)
    mine = assert_same_as_ort(data, tmp_path)
    for p in mine:
        assert p.value.dtype == arrays[p.name].dtype and p.value.tobytes() == arrays[p.name].tobytes()


@pytest.mark.cause(6)
def test_a_checkpoint_without_module_state_holds_no_parameters_as_in_ort(tmp_path):
    data = build([], lists=None)
    assert read_parameters(data) == {}
    assert _ort_parameters(data, tmp_path) == []


# ----------------------------------------------------------------------------- hostile inputs
GOOD = {"name": "w", "dims": [2], "data_type": 1, "raw": f32(1, 2)}

HAND_MADE = {
    "dims_disagree_with_data": ([{**GOOD, "dims": [3]}], "shape (3,) (3 values) but 8 bytes"),
    "dims_too_few": ([{**GOOD, "dims": [1]}], "but 8 bytes"),
    "negative_dim": ([{**GOOD, "dims": [-2]}], "negative dimension"),
    "negative_dims_cancel": ([{**GOOD, "dims": [-1, -2]}], "negative dimension"),
    "huge_dims": ([{**GOOD, "dims": [2**40, 2**40]}], "but 8 bytes"),
    "no_dims": ([{**GOOD, "dims": None}], "has no dims"),
    "rank_65": ([{**GOOD, "dims": [1] * 65, "raw": f32(1)}], "65 dimensions"),
    "string_type": ([{**GOOD, "data_type": 8}], "data type STRING"),
    "float16_type": ([{**GOOD, "data_type": 10, "raw": b"\0" * 4}], "data type FLOAT16"),  # ORT refuses it too
    "bfloat16_type": ([{**GOOD, "data_type": 16, "raw": b"\0" * 4}], "data type BFLOAT16"),
    "undefined_type": ([{**GOOD, "data_type": 0}], "data type UNDEFINED"),
    "unknown_type": ([{**GOOD, "data_type": 99}], "data type number 99"),
    "no_name": ([{**GOOD, "name": None}], "has no name"),
    "empty_name": ([{**GOOD, "name": ""}], "has no name"),
    "name_not_utf8": ([{**GOOD, "name": b"w\xff"}], "not UTF-8"),
    "duplicate_name": ([GOOD, GOOD], "appears twice"),
    "duplicate_across_lists": ([GOOD, {**GOOD, "trainable": False}], "appears twice"),
    "external_tensor": ([{**GOOD, "raw": None, "external_offset": 0}], "external data file"),
    "no_data": ([{**GOOD, "raw": None}], "but 0 bytes"),
}


@pytest.mark.cause(6)
@pytest.mark.parametrize("case", sorted(HAND_MADE))
def test_hand_made_tensors_are_refused(case):
    tensors, needle = HAND_MADE[case]
    refused(build(tensors), needle)


@pytest.mark.cause(6)
def test_names_from_the_file_are_shown_safely():
    msg = refused(build([{**GOOD, "name": "evil\n\x1b[31m"}, {**GOOD, "name": "evil\n\x1b[31m"}]), "appears twice")
    assert "\x1b" not in msg


@pytest.mark.cause(6)
def test_shared_data_vectors_cannot_allocate_more_than_the_file():
    """Ten thousand tensors pointing at one 400 kB data vector would allocate 4 GB: refused."""
    big = {"name": "t0", "dims": [100_000], "data_type": 1, "raw": bytes(400_000)}
    data = build([big] + [{**big, "name": f"t{k}", "raw": 0} for k in range(1, 10_000)])
    assert len(data) < 2_000_000
    refused(data, "more bytes than the file holds")


@pytest.mark.cause(6)
@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"version": 1}, "version 1 is not supported"),
        ({"version": 3}, "version 3 is not supported"),
        ({"version": 0}, "version 0 is not supported"),
        ({"ident": b"ORTM"}, "not an ORT training checkpoint"),
        ({"nominal": True}, "nominal checkpoint"),
        ({"external": True}, "external data file"),
        ({"lists": ("trainable",)}, "no frozen parameter list"),
        ({"lists": ("frozen",)}, "no trainable parameter list"),
    ],
)
def test_hand_made_checkpoints_are_refused(kw, needle):
    refused(build([GOOD], **kw), needle)
    assert read_parameters(build([GOOD]))["w"].tolist() == [1.0, 2.0]  # the same, unchanged, reads


@pytest.mark.cause(6)
@pytest.mark.parametrize("data", [b"", b"\0", b"ODTC", bytes(15), b"\x0c\0\0\0ODTC" + bytes(8), b"\xff" * 64])
def test_empty_and_tiny_files_are_refused(data):
    refused(data)


@pytest.mark.cause(6)
def test_not_bytes_is_refused():
    with pytest.raises(AccelcError, match="expected bytes"):
        read_parameters("ODTC")


@pytest.mark.cause(6)
def test_wrong_identifier_is_refused(checkpoints):
    data = bytearray(checkpoints["cnn3-small"])
    data[4:8] = b"ORTM"
    refused(bytes(data), "not an ORT training checkpoint")
    refused(checkpoints["cnn3-small"][8:], "")


@pytest.mark.cause(6)
@pytest.mark.parametrize("name", ["cnn3-small", "resnet"])
def test_truncated_checkpoints_are_refused(checkpoints, name):
    data = checkpoints[name]
    for k in range(50):
        refused(data[: len(data) * k // 50])
    full = read_parameters(data)
    for cut in range(1, 65):  # the last bytes may be padding after the last string
        params = only_accelc_errors(data[:-cut])
        assert params is None or all(np.array_equal(params[n], full[n]) for n in full), cut


def _metadata_positions(data: bytes) -> list[int]:
    """Every byte position of ``data`` outside the tensors' raw data (tables, vtables, offsets,
    names, dims): where a flip changes the structure rather than a value."""
    f = _fbs()
    ms = f["Checkpoint"].Checkpoint.GetRootAs(data, 0).ModuleState()
    payload = np.zeros(len(data), bool)
    for n, get in ((ms.RequiresGradParamsLength(), ms.RequiresGradParams), (ms.FrozenParamsLength(), ms.FrozenParams)):
        for j in range(n):
            t = get(j)
            start = t._tab.Vector(t._tab.Offset(12))  # raw_data's first byte
            payload[start : start + t.RawDataLength()] = True
    return [int(i) for i in np.flatnonzero(~payload)]


@pytest.mark.cause(6)
@pytest.mark.parametrize("name", ["cnn3-small", "resnet-skip", "resnet-props"])
def test_bit_flips_give_one_accelc_error_or_what_ort_reads(checkpoints, name, tmp_path):
    """200 variants (seeded) of 1-3 flipped bits, half anywhere (mostly values), half in the
    structure: each is one AccelcError line, or reads -- and then exactly as ORT Training reads it
    (a flipped value, a changed name): nothing ORT's verifier refuses gets through."""
    data = checkpoints[name]
    structure = _metadata_positions(data)
    rng = random.Random(29)
    refusals = 0
    for k in range(200):
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(len(data)) if k % 2 else rng.choice(structure)
            flipped[pos] ^= 1 << rng.randrange(8)
        if only_accelc_errors(bytes(flipped)) is None:
            refusals += 1
        else:
            assert_same_as_ort(bytes(flipped), tmp_path)
    assert refusals >= 50, refusals  # the structural flips are mostly caught


@pytest.mark.cause(6)
def test_random_bytes_with_the_identifier_give_one_accelc_error():
    rng = np.random.default_rng(29)
    for n in (16, 64, 1024, 65536):
        for _ in range(25):
            data = bytearray(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            data[4:8] = b"ODTC"
            only_accelc_errors(bytes(data))


# ----------------------------------------------------------------------------- no ORT Training
@pytest.mark.cause(6)
def test_the_reader_imports_neither_ort_training_nor_onnxruntime(checkpoints, tmp_path):
    """In a fresh interpreter where importing onnxruntime.training fails, as on a machine with plain
    onnxruntime or Python >= 3.13, the checkpoint still reads, and the onnxruntime package itself
    is never imported (the reader only locates its generated flatbuffer classes)."""
    p = tmp_path / "checkpoint"
    p.write_bytes(checkpoints["resnet"])
    code = (
        BLOCK_ORT_TRAINING
        + f"""
from accelc.runtime.session import read_checkpoint_params
params = read_checkpoint_params(open({str(p)!r}, "rb").read())
assert len(params) == 47, len(params)
bad = sorted(m for m in sys.modules if m == "onnxruntime" or m.startswith("onnxruntime."))
assert not bad, bad
print("ok", len(params))
"""
    )
    env = {**os.environ, "PYTHONPATH": ""}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok 47", r.stderr[-3000:]
