"""accelc's own writer of ORT Training checkpoints (compiler/ort_checkpoint.py: write_checkpoint,
freeze): byte for byte what ORT Training 1.19.2's ``onnxblock.save_checkpoint`` writes, read back
equal by accelc's reader, and skip's checkpoint rewrite (freeze_in_checkpoint) without ORT Training.
The byte comparisons need ORT Training and are skipped where it cannot be imported."""

import os
import subprocess
import sys

import numpy as np
import pytest

from accelc.compiler.errors import AccelcError
from accelc.compiler.ort_checkpoint import freeze, read_checkpoint_parameters, write_checkpoint

from conftest import BLOCK_ORT_TRAINING, export_test_model


def _ort_training():
    """ORT Training's Python API, or a clean skip where it cannot be imported (Python >= 3.13, GPU machines)."""
    from accelc.compiler.ort_training import import_ort_training

    try:
        import_ort_training()
        from onnxruntime.training import api, onnxblock
    except ImportError as e:
        pytest.skip(f"onnxruntime.training is not importable here: {e}")
    return api, onnxblock


def ort_save(trainable, frozen, tmp_path) -> bytes:
    """What ORT Training's save_checkpoint writes for the same (name, array) lists."""
    _, onnxblock = _ort_training()
    from onnx import numpy_helper

    p = tmp_path / "ort-saved"
    onnxblock.save_checkpoint(
        ([numpy_helper.from_array(a, n) for n, a in trainable], [numpy_helper.from_array(a, n) for n, a in frozen]),
        str(p),
    )
    return p.read_bytes()


def ort_freeze(checkpoint: bytes, frozen: list[str], tmp_path) -> bytes:
    """The ORT-Training-based freeze_in_checkpoint that the writer replaced (the reference)."""
    api, onnxblock = _ort_training()
    from onnx import numpy_helper

    src, dst = tmp_path / "freeze-in", tmp_path / "freeze-out"
    src.write_bytes(checkpoint)
    state = api.CheckpointState.load_checkpoint(str(src))
    trainable, non_trainable = [], []
    for name, p in state.parameters:
        t = numpy_helper.from_array(np.array(p.data), name)
        (trainable if p.requires_grad and name not in frozen else non_trainable).append(t)
    onnxblock.save_checkpoint((trainable, non_trainable), str(dst))
    return dst.read_bytes()


def ort_loads(data: bytes, tmp_path):
    """(name, value, requires_grad) as ORT Training's CheckpointState loads ``data``."""
    api, _ = _ort_training()
    p = tmp_path / "ort-load"
    p.write_bytes(data)
    state = api.CheckpointState.load_checkpoint(str(p))
    return [(n, np.array(prm.data, copy=True), prm.requires_grad) for n, prm in state.parameters]


def assert_reads_back(data: bytes, trainable, frozen):
    """accelc's reader gives every parameter with its name, dtype, shape, bits and requires_grad."""
    want = {n: (np.asarray(a), True) for n, a in trainable} | {n: (np.asarray(a), False) for n, a in frozen}
    got = read_checkpoint_parameters(data)
    assert [p.name for p in got] == sorted(want)
    for p in got:
        a, requires_grad = want[p.name]
        assert p.value.dtype == a.dtype.newbyteorder("="), p.name
        assert p.value.shape == a.shape and p.value.tobytes() == a.astype(p.value.dtype).tobytes(), p.name
        assert p.requires_grad == requires_grad, p.name


# ----------------------------------------------------------------------------- parameter sets
_rng = np.random.default_rng(0)
EVERY_DTYPE = [  # every dtype the reader accepts (ORT 1.19.2 loads), special values, scalars, zero-size
    ("w.f32", _rng.standard_normal((3, 4)).astype(np.float32)),
    ("special", np.array([np.nan, -0.0, np.inf, -np.inf, 1e-45], np.float32)),
    ("b.f64", _rng.standard_normal(5)),
    ("i64", np.array([-(2**63), 2**63 - 1, 0], np.int64)),
    ("i32", np.array([[1, -2]], np.int32)),
    ("u8", np.arange(7, dtype=np.uint8)),
    ("i8", np.array([-128, 127], np.int8)),
    ("u16", np.array([65535], np.uint16)),
    ("i16", np.array([-32768], np.int16)),
    ("u32", np.array([2**32 - 1], np.uint32)),
    ("u64", np.array([2**64 - 1], np.uint64)),
    ("scalar", np.array(3.5, np.float32)),
    ("empty", np.zeros((0, 3), np.float32)),
    ("flag", np.array([True, False])),
    ("flag0", np.array(True)),
]
UNICODE = [
    ("ünïcödé.wëight", np.ones((2, 2), np.float32)),
    ("层.偏置", np.zeros(3, np.float32)),
    ("emoji 🙂/with spaces", np.arange(4, dtype=np.int64).reshape(2, 2)),
]
SETS = {
    "every_dtype": (EVERY_DTYPE[::2], EVERY_DTYPE[1::2]),
    "no_frozen": (EVERY_DTYPE, []),
    "no_trainable": ([], EVERY_DTYPE),
    "nothing": ([], []),
    "zero_size_only": ([("e", np.zeros((0,), np.uint8))], [("e2", np.zeros((2, 0, 3), np.int64))]),
    "unicode_names": (UNICODE[:2], UNICODE[2:]),
    "unsorted_names": ([("z", np.ones(1, np.float32)), ("a", np.ones(2, np.float32))], [("m", np.array(7, np.int64))]),
    # every length of name and data modulo the alignments (padding before each vector)
    "alignments": (
        [(f"p{k}" * k, np.arange(k, dtype=np.uint8)) for k in range(1, 10)],
        [("q", np.ones((1, 3), np.int16))],
    ),
}


@pytest.mark.parametrize("name", list(SETS))
def test_bytes_identical_to_ort_save_checkpoint(name, tmp_path):
    trainable, frozen = SETS[name]
    assert write_checkpoint(trainable, frozen) == ort_save(trainable, frozen, tmp_path)


@pytest.mark.parametrize("name", list(SETS))
def test_reads_back_equal_with_accelcs_reader(name):
    trainable, frozen = SETS[name]
    assert_reads_back(write_checkpoint(trainable, frozen), trainable, frozen)


def test_ort_training_loads_it_with_names_values_and_flags(tmp_path):
    trainable, frozen = SETS["every_dtype"]
    got = ort_loads(write_checkpoint(trainable, frozen), tmp_path)
    want = {n: (a, True) for n, a in trainable} | {n: (a, False) for n, a in frozen}
    assert [n for n, _, _ in got] == sorted(want)
    for n, value, requires_grad in got:
        a, g = want[n]
        assert value.dtype == a.dtype and value.shape == a.shape and value.tobytes() == a.tobytes(), n
        assert requires_grad == g, n


def test_big_endian_and_strided_arrays_are_written_as_their_values(tmp_path):
    """A big-endian or non-contiguous array is written little-endian and contiguous: the bytes ORT
    writes for the same values in native order."""
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    odd = [("t", base.T), ("be", base.astype(">f4")), ("step", np.arange(10, dtype=np.int64)[::3])]
    native = [(n, np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("="))) for n, a in odd]
    data = write_checkpoint(odd, [])
    assert_reads_back(data, native, [])
    assert data == ort_save(native, [], tmp_path)


@pytest.mark.parametrize(
    "trainable, frozen, needle",
    [
        ([("w", np.ones(1, np.float32))], [("w", np.ones(1, np.float32))], "parameter 'w' appears twice"),
        ([("", np.ones(1, np.float32))], [], "trainable parameter #0 has no name"),
        ([], [(None, np.ones(1, np.float32))], "frozen parameter #0 has no name"),
        ([("w",)], [], "trainable parameter #0 has no name"),
        ([("half", np.ones(2, np.float16))], [], "has dtype float16"),
        ([("c", np.ones(2, np.complex64))], [], "has dtype complex64"),
        ([("s", np.array(["a"]))], [], "has dtype <U1"),
        ([("o", np.array([object()]))], [], "has dtype object"),
        ([("bad\ud800", np.ones(1, np.float32))], [], "is not valid unicode"),
    ],
)
def test_what_ort_would_not_load_is_refused_in_one_line(trainable, frozen, needle):
    with pytest.raises(AccelcError) as ei:
        write_checkpoint(trainable, frozen)
    msg = str(ei.value)
    assert msg.startswith("the checkpoint cannot be written: ") and "\n" not in msg and needle in msg, msg


def test_sizes_are_measured_as_ort_measures_them(monkeypatch):
    """ORT moves the data of a checkpoint over 1799 MiB of TensorProtos to an external file (measured
    on 1.19.2); the writer refuses there, counting each tensor's serialised TensorProto size as ORT does."""
    from onnx import numpy_helper

    from accelc.compiler import ort_checkpoint as oc

    for n, a in EVERY_DTYPE + UNICODE + [("x" * 300, np.zeros((2**16 + 3,), np.uint8))]:
        ((name, arr),) = oc._tensors_to_write([(n, a)], "t", "trainable")
        assert oc._proto_size(name, arr) == numpy_helper.from_array(a, n).ByteSize(), n
    size = numpy_helper.from_array(np.ones(4, np.float32), "w").ByteSize()
    monkeypatch.setattr(oc, "MAX_PROTO_BYTES", size)
    write_checkpoint([("w", np.ones(4, np.float32))], [])  # at the limit: written
    with pytest.raises(AccelcError, match="more than ORT Training 1.19.2 keeps in one checkpoint file"):
        write_checkpoint([("w", np.ones(5, np.float32))], [])


def test_freeze_keeps_order_dtypes_and_frozen(tmp_path):
    trainable, frozen = SETS["every_dtype"]
    data = write_checkpoint(trainable, frozen)
    out = freeze(data, ["w.f32", "u8", "special", "not-there"])  # "special" is frozen already
    moved = {"w.f32", "u8"}
    assert_reads_back(
        out, [t for t in trainable if t[0] not in moved], frozen + [t for t in trainable if t[0] in moved]
    )
    assert out == ort_freeze(data, ["w.f32", "u8", "special", "not-there"], tmp_path)


# ----------------------------------------------------------------------------- skip's artifacts
@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """vgg (BatchNorm statistics frozen) compiled as test_skip.py compiles it (compiling needs ORT Training)."""
    import accelc

    _ort_training()

    d = tmp_path_factory.mktemp("vgg")
    export_test_model("vgg", d / "m.onnx")
    accelc.compile(d / "m.onnx", d / "art")
    return d / "art"


FREEZE_SETS = [
    ["features.0.weight", "features.1.weight", "features.1.bias"],
    ["fc1.weight", "features.1.running_mean"],
    [],
    None,
]


@pytest.mark.parametrize("k", range(len(FREEZE_SETS)))
def test_freeze_in_checkpoint_equals_the_ort_training_result(compiled, k, tmp_path):
    from accelc.passes.skip.rewrite import freeze_in_checkpoint

    data = (compiled / "checkpoint").read_bytes()
    names = FREEZE_SETS[k]
    if names is None:  # everything frozen
        names = [p.name for p in read_checkpoint_parameters(data)]
    out = freeze_in_checkpoint(data, names)
    assert out == ort_freeze(data, names, tmp_path)
    got = {p.name: p for p in read_checkpoint_parameters(out)}
    before = {p.name: p for p in read_checkpoint_parameters(data)}
    assert list(got) == list(before)
    for n, p in got.items():
        assert p.requires_grad == (before[n].requires_grad and n not in names), n
        assert p.value.tobytes() == before[n].value.tobytes(), n


def test_plain_ort_training_trains_the_skip_variant(compiled, tmp_path):
    """skip_variant's artifacts (pruned graph, checkpoint rewritten by accelc's writer) load and take
    an optimizer step in plain ORT Training, the skipped layer's parameters frozen."""
    api, _ = _ort_training()
    from accelc.compiler.artifact_dir import load_artifacts, write_artifacts
    from accelc.passes.skip.rewrite import skip_variant

    base, _ = load_artifacts(compiled)
    art, _ = skip_variant(base, ["features.0", "features.3"])
    d = tmp_path / "variant"
    d.mkdir()
    write_artifacts(art, d)
    state = api.CheckpointState.load_checkpoint(str(d / "checkpoint"))
    frozen = {n for n, p in state.parameters if not p.requires_grad}
    assert {"features.0.weight", "features.3.weight"} <= frozen
    module = api.Module(str(d / "training_model.onnx"), state, str(d / "eval_model.onnx"))
    opt = api.Optimizer(str(d / "optimizer_model.onnx"), module)
    module.train()
    out = module(np.zeros((2, 1, 28, 28), np.float32), np.zeros(2, np.int64))
    opt.step()
    loss = out[0] if isinstance(out, (list, tuple)) else out
    assert np.isfinite(np.asarray(loss)).all()


def test_skip_variant_needs_no_ort_training(compiled, tmp_path):
    """In a fresh interpreter where importing onnxruntime.training fails (plain onnxruntime, GPU
    machines), skip's variant is built and its checkpoint written; the writer itself imports no
    onnxruntime at all (it only locates the generated flatbuffer classes)."""
    code = (
        BLOCK_ORT_TRAINING
        + f"""
import numpy as np
from accelc.compiler.ort_checkpoint import freeze, read_checkpoint_parameters
data = open({str(compiled / "checkpoint")!r}, "rb").read()
out = freeze(data, ["fc1.weight"])
assert not [m for m in sys.modules if m == "onnxruntime" or m.startswith("onnxruntime.")]
from accelc.compiler.artifact_dir import load_artifacts
from accelc.passes.skip.rewrite import skip_variant
art, _ = skip_variant(load_artifacts({str(compiled)!r})[0], ["features.0"])
frozen = {{p.name for p in read_checkpoint_parameters(art.checkpoint) if not p.requires_grad}}
assert "features.0.weight" in frozen, frozen
assert "onnxruntime.training" not in sys.modules
print("ok")
"""
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""}
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
