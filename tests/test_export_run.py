"""Trained models come out: ``accelc.export_run`` turns a run directory into an inference ONNX
model (plain onnxruntime) and an ORT training CheckpointState, equal to accelc's own eval.

Tolerance: the inference model is the artifacts' eval graph with the parameters as initialisers;
onnxruntime may fold BatchNorm into the convolutions once they are constants, so logits agree to
float32 rounding (measured max |difference| 9e-8 on VGG logits of magnitude 0.4); checked at
atol 1e-5 + rtol 1e-5 with identical argmax. ORT's own Module on the exported CheckpointState runs
the artifacts' eval graph with the same values, so its logits equal accelc's exactly.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

import accelc
from accelc import api
from accelc.compiler.errors import InvalidType, InvalidValue
from accelc.runtime import checkpoint as ckpt
from accelc.runtime.data import load_data
from accelc.zoo import export_zoo

from conftest import assert_api_refused, assert_refused, run_cli

DATA = "synthetic:192"
ATOL = RTOL = 1e-5


def _train(tmp, name: str, epochs: int, passes=None):
    export_zoo(name, tmp / f"{name}.onnx")
    art = tmp / f"art-{name}"
    accelc.compile(tmp / f"{name}.onnx", art, passes=passes)
    run = tmp / f"run-{name}"
    accelc.train(art, data=DATA, epochs=epochs, batch_size=32, run_dir=run, progress=False, test_limit=64)
    return art, run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export-run")
    return {
        "cnn3-small": _train(tmp, "cnn3-small", 2),
        "vgg": _train(tmp, "vgg", 1),  # BatchNorm: running statistics must come out
    }


def _accelc_eval(art, run, x, y):
    """accelc's eval of the run's checkpoint: the TrainingSession's eval graph with its parameters."""
    from accelc.runtime.session import TrainingSession

    arrays, _ = ckpt.load(run)
    s = TrainingSession(art)
    s.load_state_arrays(arrays)
    return s.evaluate_batch(x, y)


def _images(shape):
    ds = load_data(DATA, shape, 10, test_limit=64)
    return ds.x_test, ds.y_test


@pytest.mark.parametrize("name", ["cnn3-small", "vgg"])
def test_exported_model_equals_accelc_eval(runs, tmp_path, name):
    import onnxruntime as ort

    art, run = runs[name]
    out = tmp_path / "model.onnx"
    r = api.export_run(run, out)  # artifacts found beside the run, verified by their hash
    assert r["epoch"] == (2 if name == "cnn3-small" else 1) and r["artifacts"] == str(art)
    m = onnx.load(out)
    onnx.checker.check_model(m, full_check=True)
    assert [i.name for i in m.graph.input] == ["input"] and [o.name for o in m.graph.output] == ["output"]
    assert not {n.op_type for n in m.graph.node} & {"SoftmaxCrossEntropyLoss"} and {
        o.domain for o in m.opset_import
    } == {""}
    assert m.ir_version <= 8 and m.opset_import[0].version <= 17
    if name == "vgg":  # the running statistics are initialisers, with the trained (moved) values
        stats = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer if "running_" in t.name}
        assert len(stats) == 12 and not np.allclose(stats["features.1.running_var"], 1.0)
    x, y = _images(tuple(r["input"]["shape"][1:]))
    _, want = _accelc_eval(art, run, x, y)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)
    assert (got.argmax(1) == want.argmax(1)).all()


def test_ort_checkpoint_state_round_trip(runs, tmp_path):
    """ORT's own training API continues from the exported CheckpointState: its eval equals accelc's,
    its export_model_for_inferencing equals export_run's model, and it trains a step from there."""
    import onnxruntime as ort
    from onnxruntime.training import api as ort_api

    art, run = runs["vgg"]
    r = api.export_run(run, tmp_path / "m.onnx", artifacts=art, ort_checkpoint=tmp_path / "state.ckpt")
    assert r["ort_checkpoint_parameters"] == 34
    state = ort_api.CheckpointState.load_checkpoint(str(tmp_path / "state.ckpt"))
    arrays, _ = ckpt.load(run)
    for name, p in state.parameters:
        np.testing.assert_array_equal(p.data, arrays["param/" + name])
    module = ort_api.Module(str(art / "training_model.onnx"), state, str(art / "eval_model.onnx"))
    x, y = _images((1, 28, 28))
    module.eval()
    loss, logits = module(x, y)
    want_loss, want = _accelc_eval(art, run, x, y)
    # accelc evaluates on its ATen kernels: ORT's eval equals it to float32 rounding
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)
    assert float(loss) == pytest.approx(want_loss, rel=1e-6)
    # ORT's own export_model_for_inferencing from that state gives the model export_run wrote
    module.export_model_for_inferencing(str(tmp_path / "ort.onnx"), ["output"])
    ours, theirs = (
        ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        for f in ("m.onnx", "ort.onnx")
    )
    np.testing.assert_array_equal(ours, theirs)
    opt = ort_api.Optimizer(str(art / "optimizer_model.onnx"), module)
    module.train()
    first = float(module(x[:32], y[:32])[0])
    opt.step()
    assert np.isfinite(first)


def test_run_with_passes_exports_the_plain_model(tmp_path):
    """reuse and skip change only training: the exported model is the plain eval graph with the
    run's parameters and equals the root artifacts' eval."""
    import onnxruntime as ort

    art, run = _train(tmp_path, "cnn3-small", 1, passes="reuse,skip")
    r = api.export_run(run, tmp_path / "m.onnx")
    x, y = _images((1, 28, 28))
    _, want = _accelc_eval(art, run, x, y)
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)
    assert r["trained_variant"] == ckpt.variant_text(ckpt.read_meta(run)["variant"])


# ----------------------------------------------------------------------------- hostile inputs
def _copy_run(run, dest):
    shutil.copytree(run, dest)
    return dest


def test_refusals(runs, tmp_path):
    art, run = runs["cnn3-small"]
    out = tmp_path / "m.onnx"
    assert_api_refused(lambda: api.export_run(tmp_path / "nope", out), "not found")
    (tmp_path / "empty").mkdir()
    assert_api_refused(lambda: api.export_run(tmp_path / "empty", out), "has no checkpoint.json")
    assert_api_refused(lambda: api.export_run(run, out, epoch=3), "epoch 3 is out of range")
    assert_api_refused(lambda: api.export_run(run, out, epoch=1), "keeps the checkpoint of the last epoch only")
    assert_api_refused(lambda: api.export_run(run, out, epoch=0), "--epoch", InvalidValue)
    assert_api_refused(lambda: api.export_run(run, out, epoch="2"), "--epoch", InvalidType)
    assert_api_refused(lambda: api.export_run(run, 5), "-o must be a path", InvalidType)
    assert_api_refused(lambda: api.export_run(run, out, force=1), "force", InvalidType)
    # the artifacts: other files than the run's are refused; a moved run finds them by the path its
    # checkpoint records (train writes it), or they are named
    other, _ = runs["vgg"]
    assert_api_refused(lambda: api.export_run(run, out, artifacts=other), "trained from other artifacts")
    moved = _copy_run(run, tmp_path / "elsewhere" / "run")
    assert api.export_run(moved, out)["artifacts"] == str(art)
    out.unlink()
    assert api.export_run(moved, out, artifacts=art)["epoch"] == 2
    # an existing output: refused without force, replaced with it; never inside an input
    assert_api_refused(lambda: api.export_run(run, out, artifacts=art), "exists (use --force")
    assert api.export_run(run, out, artifacts=art, force=True)["output"] == str(out)
    assert_api_refused(lambda: api.export_run(run, run / "m.onnx"), "inside the input")
    assert_api_refused(lambda: api.export_run(run, tmp_path, artifacts=art), "is a folder")
    assert_api_refused(lambda: api.export_run(run, out, ort_checkpoint=out, force=True), "the same file")
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".m.onnx")]


def test_damaged_runs_refused(runs, tmp_path):
    art, run = runs["cnn3-small"]
    out = tmp_path / "m.onnx"
    bad = _copy_run(run, tmp_path / "bad")
    npz = next(bad.glob("checkpoint-*.npz"))
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0xFF
    npz.write_bytes(bytes(data))
    assert_api_refused(lambda: api.export_run(bad, out, artifacts=art), "damaged")
    (bad / "checkpoint.json").write_text("{not json")
    assert_api_refused(lambda: api.export_run(bad, out, artifacts=art), "not valid JSON")
    assert not out.exists()


def test_artifacts_found_by_the_path_the_checkpoint_records(runs, tmp_path):
    """A run moved away from its artifacts: found by the path checkpoint.json records
    (``artifacts_dir``), verified by the hash; a recorded path to other files is not used."""
    art, run = runs["cnn3-small"]
    moved = _copy_run(run, tmp_path / "moved" / "run")
    arrays, meta = ckpt.load(moved)
    keep = {k: meta[k] for k in meta if k not in ("format", "arrays", "arrays_sha256", "manifest")}
    ckpt.save(moved, arrays, dict(keep, artifacts_dir=str(runs["vgg"][0])))
    assert_api_refused(lambda: api.export_run(moved, tmp_path / "m.onnx"), "cannot find the artifacts")
    ckpt.save(moved, arrays, dict(keep, artifacts_dir=str(art)))
    assert api.export_run(moved, tmp_path / "m.onnx")["artifacts"] == str(art)


def test_low_resolution_stage_refused(runs, tmp_path):
    """A checkpoint whose parameters have another shape than the full-resolution model's (a
    rescale run stopped in its low-resolution stage) is refused, naming the variant."""
    art, run = runs["cnn3-small"]
    low = _copy_run(run, tmp_path / "low")
    arrays, meta = ckpt.load(low)
    arrays["param/fc.weight"] = np.zeros((10, 16), np.float32)
    keep = {k for k in ckpt.SCHEMA["required"] if k not in ("format", "arrays", "arrays_sha256", "manifest")}
    ckpt.save(low, arrays, dict({k: meta[k] for k in keep}, variant="rescale:low", data_position=meta["data_position"]))
    msg = assert_api_refused(lambda: api.export_run(low, tmp_path / "m.onnx", artifacts=art), "low-resolution")
    assert "rescale:low" in msg and "fc.weight" in msg


@pytest.mark.slow
def test_cli_export_run(runs, tmp_path):
    """``accelc export-run RUN -o M.onnx``: the model written, a refusal is one line (exit 2)."""
    # no skip when the tool is missing: a CLI without export-run fails the first assertion
    art, run = runs["vgg"]
    out = tmp_path / "m.onnx"
    r = run_cli("export-run", run, "-o", out, "--ort-checkpoint", tmp_path / "m.ckpt")
    assert r.returncode == 0 and out.is_file() and (tmp_path / "m.ckpt").is_file(), r.stderr
    assert_refused(run_cli("export-run", run, "-o", out), "exists (use --force")
    assert_refused(
        run_cli("export-run", run, "-o", tmp_path / "n.onnx", "--epoch", "7"), "out of range", tmp_path / "n.onnx"
    )
    assert_refused(
        run_cli("export-run", tmp_path / "nope", "-o", tmp_path / "n.onnx"), "not found", tmp_path / "n.onnx"
    )
    assert_refused(run_cli("export-run", run, "-o", out, "--force", "--epoch", "x"), "--epoch")
