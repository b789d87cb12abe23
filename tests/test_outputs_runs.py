"""Reliability round 2, causes 1-3, 9 and 10: outputs are never lost, a run directory has one
writer, a resume is verified all or nothing, names are escaped, bench output is atomic.

Most cases run in-process through the Python API (which raises the CLI's errors); a few go
through the CLI to check exit code 2 and the single stderr line."""

import io
import json
import os
import shutil
import zipfile

import numpy as np
import pytest

import accelc
from accelc import AccelcError
from accelc.compiler.fileio import MARKER, atomic_dir
from accelc.runtime import checkpoint as ckpt
from accelc.runtime.runlock import RunLock
from accelc.zoo import export_zoo

from conftest import SENTINEL_TEXT, assert_api_refused, assert_refused, run_cli


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    export_zoo("cnn3-small", d / "m.onnx")
    return d / "m.onnx"


@pytest.fixture(scope="module")
def art(model):
    out = model.parent / "art"
    accelc.compile(model, out, validate_result=False)
    return out


TRAIN = dict(data="synthetic:128", epochs=2, batch_size=32, seed=3, progress=False, threads=1)


@pytest.fixture(scope="module")
def trained(art, tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    accelc.train(art, run_dir=run, **TRAIN)
    return run


def _tree(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- cause 1: data loss
@pytest.mark.cause(1)
@pytest.mark.parametrize("where", ["model_folder", "ancestor", "not_ours", "file", "symlink_to_output"])
def test_force_never_deletes_what_is_not_an_output(tmp_path, model, art, where):
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    m = home / "models" / "m.onnx"
    shutil.copy(model, m)
    (home / "models" / "notes.txt").write_text("mine")
    dest = {
        "model_folder": home / "models",
        "ancestor": home,
        "not_ours": home / "stuff",
        "file": home / "models" / "notes.txt",
        "symlink_to_output": home / "link",
    }[where]
    if where == "not_ours":
        dest.mkdir()
        (dest / "report.json").write_text("{}")  # looks a little like an output, is not one
    if where == "symlink_to_output":
        shutil.copytree(art, home / "real-art")
        dest.symlink_to(home / "real-art")
    before = _tree(home)
    assert_api_refused(lambda: accelc.compile(m, dest, force=True, validate_result=False))
    assert _tree(home) == before
    assert not [f for f in os.listdir(dest.parent) if ".old-" in f or ".tmp-" in f]


@pytest.mark.cause(1)
@pytest.mark.slow
def test_cli_output_dot_in_the_model_folder_is_refused_untouched(tmp_path, model):
    shutil.copy(model, tmp_path / "m.onnx")
    for args in (["-o", "."], ["-o", ".", "--force"], ["-o", "..", "--force"]):
        r = run_cli("compile", "m.onnx", *args, "--no-validate", cwd=tmp_path)
        assert_refused(r)
        assert (tmp_path / "m.onnx").read_bytes() == model.read_bytes()
        assert not [f for f in os.listdir(tmp_path) if f.startswith(".")], os.listdir(tmp_path)


@pytest.mark.cause(1)
def test_force_replaces_a_previous_output(tmp_path, art, model):
    out = tmp_path / "o"
    shutil.copytree(art, out)
    accelc.compile(model, out, force=True, validate_result=False)
    assert (out / MARKER).is_file() and (out / "report.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["o"]


@pytest.mark.cause(1)
@pytest.mark.parametrize("extra", ["thesis.tex", "notes/data.csv"])
def test_force_refuses_an_output_holding_user_files(tmp_path, art, model, extra):
    out = tmp_path / "o"
    shutil.copytree(art, out)
    (out / extra).parent.mkdir(exist_ok=True)
    (out / extra).write_text("mine")
    assert_api_refused(lambda: accelc.compile(model, out, force=True, validate_result=False), extra.split("/")[0])
    assert (out / extra).read_text() == "mine"


@pytest.mark.cause(1)
def test_force_refuses_an_unmarked_output(tmp_path, art, model):
    """An output without accelc's marker (written before it existed, or a look-alike with the same
    file names) is never replaced: accelc cannot know what else is in it."""
    out = tmp_path / "o"
    shutil.copytree(art, out)
    (out / MARKER).unlink()
    before = _tree(out)
    assert_api_refused(lambda: accelc.compile(model, out, force=True, validate_result=False), "marker")
    assert _tree(out) == before


# A writer killed between the two renames of the fallback path, and look-alikes of its leftovers
# (which recover() leaves alone since round 3): tests/test_round3_outputs.py.


@pytest.mark.cause(1)
def test_failure_while_writing_leaves_the_old_output(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / MARKER).write_text(json.dumps({"kind": "artifacts", "entries": ["keep"]}))
    (out / "keep").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out, force=True) as t:
            (t / "new").write_text("new")
            raise RuntimeError("boom")
    assert (out / "keep").read_text() == "old" and not (out / "new").exists()
    assert sorted(os.listdir(tmp_path)) == ["o"]


@pytest.mark.cause(1)
@pytest.mark.parametrize("force", [False, True])
def test_train_never_clears_a_folder_it_did_not_write(tmp_path, art, force):
    run = tmp_path / "precious"
    (run / "deep").mkdir(parents=True)
    (run / "thesis.tex").write_text("mine")
    (run / "deep" / "data.csv").write_text("1,2")
    before = _tree(run)
    for _ in range(2):  # a refused attempt must not make the next one look like a run folder
        assert_api_refused(lambda: accelc.train(art, run_dir=run, force=force, **TRAIN))
    assert _tree(run) == before and sorted(os.listdir(run)) == ["deep", "thesis.tex"]


@pytest.mark.cause(1)
def test_train_force_clears_a_previous_run(tmp_path, art, trained):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    accelc.train(art, run_dir=run, force=True, **dict(TRAIN, epochs=1))
    assert json.loads((run / "checkpoint.json").read_text())["epoch"] == 0


@pytest.mark.cause(3)
def test_resume_and_force_together_are_refused(tmp_path, art, trained):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert_api_refused(lambda: accelc.train(art, run_dir=run, resume=True, force=True, **TRAIN), "--resume")


@pytest.mark.cause(3)
def test_resume_without_checkpoint_json_is_refused(tmp_path, art, trained):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "checkpoint.json").unlink()
    before = _tree(run)
    assert_api_refused(lambda: accelc.train(art, run_dir=run, resume=True, **TRAIN), "checkpoint.json")
    assert _tree(run) == before


# ----------------------------------------------------------------------------- cause 2: one writer
@pytest.mark.cause(2)
def test_locked_run_dir_is_refused_with_holder_pid(tmp_path, art):
    run = tmp_path / "run"
    run.mkdir()
    lock = RunLock.acquire(run)
    try:
        msg = assert_api_refused(lambda: accelc.train(art, run_dir=run, resume=True, **TRAIN), "in use")
        assert str(os.getpid()) in msg
    finally:
        lock.release()
    assert sorted(os.listdir(run)) == [".accelc-lock"]


@pytest.mark.cause(2)
def test_run_lock_is_released_when_its_holder_dies_or_closes_it(tmp_path, art):
    """Nothing here calls release(): the kernel frees the lock of a holder killed with SIGKILL, the
    lock's context manager frees it on exit, and a training frees its run directory's on return."""
    import signal
    import subprocess
    import sys

    run = tmp_path / "run"
    run.mkdir()
    take = "import sys, time; from accelc.runtime.runlock import RunLock; "
    take += "lock = RunLock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", take, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        msg = assert_api_refused(lambda: RunLock.acquire(run), "in use")
        assert f"accelc process {holder.pid}" in msg, msg
    finally:
        holder.kill()
        holder.wait(timeout=60)
        holder.stdout.close()
    assert holder.returncode == -signal.SIGKILL  # died holding it, never released it
    with RunLock.acquire(run) as lock:  # the kernel released the dead holder's lock
        assert lock.fd >= 0
        msg = assert_api_refused(lambda: RunLock.acquire(run), "in use")  # one holder at a time
        assert f"accelc process {os.getpid()}" in msg, msg
    assert lock.fd == -1
    with RunLock.acquire(run):  # the context manager released it on exit
        pass
    trained_here = tmp_path / "trained"
    accelc.train(art, run_dir=trained_here, **dict(TRAIN, epochs=1))
    assert (trained_here / ".accelc-lock").is_file()
    with RunLock.acquire(trained_here):  # train released its lock when it returned
        pass


# ----------------------------------------------------------------------------- cause 3: resume
def _rewrite_npz(run, fn):
    meta = json.loads((run / "checkpoint.json").read_text())
    with np.load(run / meta["arrays"]) as z:
        arrays = {k: z[k] for k in z.files}
    arrays = fn(arrays)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (run / meta["arrays"]).write_bytes(buf.getvalue())
    return meta, arrays


def _consistent(run, fn):
    """Edit the arrays AND checkpoint.json consistently (a deliberate, well-formed forgery)."""
    meta, arrays = _rewrite_npz(run, fn)
    data = (run / meta["arrays"]).read_bytes()
    import hashlib

    meta["arrays_sha256"] = hashlib.sha256(data).hexdigest()
    meta["manifest"] = ckpt.manifest_of(arrays)
    (run / "checkpoint.json").write_text(json.dumps(meta))


def _meta_edit(fn):
    def edit(run):
        meta = json.loads((run / "checkpoint.json").read_text())
        fn(meta)
        (run / "checkpoint.json").write_text(json.dumps(meta))

    return edit


def _first_param(a):
    return next(k for k in a if k.startswith("param/"))


def _first_optim(a):
    return next(k for k in a if k.startswith("optim/"))


CORRUPT = {
    "npz_missing_param": (
        lambda r: _rewrite_npz(r, lambda a: {k: v for k, v in a.items() if k != _first_param(a)}),
        "damaged",
    ),
    "npz_missing_param_forged": (
        lambda r: _consistent(r, lambda a: {k: v for k, v in a.items() if k != _first_param(a)}),
        "lacks parameter",
    ),
    "npz_missing_optim_forged": (
        lambda r: _consistent(r, lambda a: {k: v for k, v in a.items() if not k.startswith("optim/")}),
        "optimizer",
    ),
    "npz_extra_param_forged": (
        lambda r: _consistent(r, lambda a: dict(a, **{"param/ghost": np.zeros(3, np.float32)})),
        "ghost",
    ),
    "npz_reshaped_forged": (
        lambda r: _consistent(r, lambda a: dict(a, **{_first_param(a): np.zeros(7, np.float32)})),
        "shape",
    ),
    "npz_truncated": (lambda r: _trunc(r), "damaged"),
    "npz_bitflip": (lambda r: _flip(r), "damaged"),
    "npz_value_edit_forged_manifest_only": (
        lambda r: _rewrite_npz(r, lambda a: dict(a, **{_first_optim(a): a[_first_optim(a)] + 1})),
        "damaged",
    ),
    "arrays_path_parent": (_meta_edit(lambda m: m.update(arrays="../elsewhere/foreign.npz")), "malformed"),
    "arrays_path_absolute": (_meta_edit(lambda m: m.update(arrays="/etc/passwd")), "malformed"),
    "json_not_json": (lambda r: (r / "checkpoint.json").write_text("{not json"), "not valid JSON"),
    "json_deep_nesting": (lambda r: (r / "checkpoint.json").write_text("[" * 100000 + "]" * 100000), "checkpoint"),
    "json_wrong_types": (_meta_edit(lambda m: m.update(epoch="one")), "epoch"),
    "json_missing_key": (_meta_edit(lambda m: m.pop("manifest")), "manifest"),
    "json_old_format": (_meta_edit(lambda m: [m.pop("manifest"), m.pop("format")]), "older accelc"),
    "npz_partial_optim_forged": (
        lambda r: _consistent(r, lambda a: {k: v for k, v in a.items() if k != _first_optim(a)}),
        "incomplete optimizer",
    ),
    "npz_foreign_optim_forged": (
        lambda r: _consistent(r, lambda a: dict(a, **{"optim/ghost/exp_avg": np.zeros(2, np.float32)})),
        "ghost",
    ),
    "json_not_utf8": (lambda r: (r / "checkpoint.json").write_bytes(b"\xff\xfe{}"), "not valid JSON"),
    "json_symlink_outside": (lambda r: _symlink_out(r), "symbolic link"),
    "json_history_mismatch": (_meta_edit(lambda m: m.update(history=[])), "inconsistent"),
    "json_controller_garbage": (_meta_edit(lambda m: m.update(controllers=[1, 2])), "controllers"),
    "artifacts_changed": (_meta_edit(lambda m: m.update(artifacts_sha256="0" * 64)), "other artifacts"),
    "artifacts_hash_dropped": (_meta_edit(lambda m: m.update(artifacts_sha256=None)), "other artifacts"),
    "npz_extra_array_forged": (lambda r: _consistent(r, lambda a: dict(a, other=np.zeros(2, np.float32))), "other"),
    "npz_param_float64_forged": (
        lambda r: _consistent(r, lambda a: dict(a, **{_first_param(a): a[_first_param(a)].astype(np.float64)})),
        "float64",
    ),
    "npz_param_int64_forged": (
        lambda r: _consistent(r, lambda a: dict(a, **{_first_param(a): a[_first_param(a)].astype(np.int64)})),
        "int64",
    ),
    "npz_param_nan_forged": (
        lambda r: _consistent(r, lambda a: dict(a, **{_first_param(a): a[_first_param(a)] * np.nan})),
        "NaN",
    ),
    "npz_step_negative_forged": (lambda r: _consistent(r, lambda a: _set_optim(a, "step", np.array(-5))), "count"),
    "npz_step_matrix_forged": (lambda r: _consistent(r, lambda a: _set_optim(a, "step", np.ones((3, 3)))), "count"),
    "npz_moment_reshaped_forged": (
        lambda r: _consistent(r, lambda a: _set_optim(a, "exp_avg", np.zeros(5, np.float32))),
        "exp_avg",
    ),
    "npz_moment_negative_v_forged": (
        lambda r: _consistent(r, lambda a: _set_optim(a, "exp_avg_sq", lambda v: -np.ones_like(v))),
        "impossible",
    ),
    "npz_compressed_bomb_forged": (lambda r: _compressed(r), "compressed"),
    "json_history_empty_objects": (_meta_edit(lambda m: m.update(history=[{}] * len(m["history"]))), "epoch"),
    "json_history_strings": (
        _meta_edit(lambda m: [h.update(test_acc="high") for h in m["history"]]),
        "test_acc",
    ),
    "json_infinity": (lambda r: _replace_text(r, '"train_time": ', '"train_time": Infinity, "x": '), "Infinity"),
    "json_variant_changed": (_meta_edit(lambda m: m.update(variant="../../etc")), "variant"),
    "json_foreign_controller": (_meta_edit(lambda m: m["controllers"].update(evil={})), "controllers"),
    "json_data_position_junk": (_meta_edit(lambda m: m.update(data_position={"next_epoch": "x"})), "data_position"),
    "json_is_a_fifo": (lambda r: _fifo(r, "checkpoint.json"), "not a regular file"),
    "npz_is_a_fifo": (lambda r: _fifo(r, json.loads((r / "checkpoint.json").read_text())["arrays"]), "regular file"),
    "json_is_a_directory": (lambda r: _dir(r, "checkpoint.json"), "not a regular file"),
    "json_epoch_huge": (_meta_edit(lambda m: m.update(epoch=10**9)), "epoch"),
    "json_epoch_1e30": (_meta_edit(lambda m: m.update(epoch=10**30)), "epoch"),
    "json_manifest_huge_shape": (
        _meta_edit(lambda m: next(iter(m["manifest"].values())).update(shape=[2**40] * 8)),
        "manifest",
    ),
    "json_manifest_overflowing_shape": (
        _meta_edit(lambda m: next(iter(m["manifest"].values())).update(shape=[2**30] * 8)),
        "not stored as accelc writes it",
    ),
}


def _set_optim(a, key, value):
    k = next(k for k in a if k.startswith("optim/") and k.endswith("/" + key))
    return dict(a, **{k: value(a[k]) if callable(value) else value})


def _compressed(run):
    """The arrays zipped with deflate (a 'bomb' shape: accelc never writes compressed members),
    checksum and manifest forged to match."""
    import hashlib

    meta = json.loads((run / "checkpoint.json").read_text())
    p = run / meta["arrays"]
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files}
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    p.write_bytes(buf.getvalue())
    meta["arrays_sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    (run / "checkpoint.json").write_text(json.dumps(meta))


def _replace_text(run, old, new):
    p = run / "checkpoint.json"
    p.write_text(p.read_text().replace(old, new, 1))


def _fifo(run, name):
    (run / name).unlink()
    os.mkfifo(run / name)


def _dir(run, name):
    (run / name).unlink()
    (run / name).mkdir()


def _trunc(run):
    meta = json.loads((run / "checkpoint.json").read_text())
    p = run / meta["arrays"]
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip(run):
    meta = json.loads((run / "checkpoint.json").read_text())
    p = run / meta["arrays"]
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x40
    p.write_bytes(bytes(b))


def _symlink_out(run):
    outside = run.parent / "outside.json"
    outside.write_text(SENTINEL_TEXT)
    (run / "checkpoint.json").unlink()
    (run / "checkpoint.json").symlink_to(outside)


@pytest.mark.cause(3)
@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_damaged_or_forged_checkpoint_is_refused_whole(tmp_path, art, trained, case):
    run = tmp_path / "run"
    shutil.copytree(trained, run, symlinks=True)
    edit, needle = CORRUPT[case]
    edit(run)
    before = _tree(run) if not case.endswith(("symlink_outside", "fifo", "directory")) else None
    msg = assert_api_refused(lambda: accelc.train(art, run_dir=run, resume=True, **TRAIN), needle)
    assert SENTINEL_TEXT not in msg
    if before is not None:
        assert _tree(run) == before  # nothing written, nothing reset


@pytest.mark.cause(3)
@pytest.mark.parametrize(
    "change,needle",
    [
        (dict(batch_size=16), "--batch-size"),
        (dict(seed=4), "--seed"),
        (dict(data="synthetic:160"), "--data"),
        (dict(epochs=3), "--epochs"),
        (dict(lr=0.5), "--lr"),
    ],
)
def test_resume_with_changed_settings_is_refused(tmp_path, art, trained, change, needle):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert_api_refused(lambda: accelc.train(art, run_dir=run, resume=True, **dict(TRAIN, **change)), needle)


@pytest.mark.cause(3)
def test_resume_with_an_allowed_change_resumes(tmp_path, art, trained):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    s = accelc.train(art, run_dir=run, resume=True, allow_change=["epochs"], **dict(TRAIN, epochs=3))
    assert s["epochs"] == 3


@pytest.mark.cause(3)
def test_resume_with_other_artifacts_is_refused(tmp_path, art, trained, model):
    other = tmp_path / "other"
    accelc.compile(model, other, lr=0.01, validate_result=False)
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert_api_refused(lambda: accelc.train(other, run_dir=run, resume=True, **TRAIN), "other artifacts")


@pytest.mark.cause(3)
def test_checkpoint_npz_with_pickled_objects_is_refused(tmp_path, art, trained):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    meta = json.loads((run / "checkpoint.json").read_text())
    with zipfile.ZipFile(run / meta["arrays"], "a") as z:
        z.writestr("evil.npy", b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, 'shape': (1,), }")
    assert_api_refused(lambda: accelc.train(art, run_dir=run, resume=True, **TRAIN), "damaged")


# ----------------------------------------------------------------------------- cause 9: output
@pytest.mark.cause(9)
def test_paths_are_escaped_in_errors(tmp_path, art):
    evil = tmp_path / "bad\nname\x1b[31m"
    msg = assert_api_refused(lambda: accelc.train(evil, run_dir=tmp_path / "r", **TRAIN))
    assert "\x1b" not in msg and "\n" not in msg and "\\x1b" in msg


@pytest.mark.cause(9)
@pytest.mark.slow
def test_cli_usage_errors_are_one_line(tmp_path):
    for args in ([], ["compile"], ["train", "x", "--epochs", "abc"], ["nonsense"], ["compile", "m.onnx", "--bogus"]):
        r = run_cli(*args)
        assert_refused(r, "--help")


@pytest.mark.cause(9)
@pytest.mark.slow
def test_sigint_names_the_checkpoint_on_disk(tmp_path, art):
    import signal
    import subprocess
    import time

    from conftest import ACCELC

    run = tmp_path / "run"
    p = subprocess.Popen(
        ACCELC + ["train", str(art), "--data", "synthetic:2048", "--epochs", "5", "--batch-size", "32", "-o", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoint.json").exists():
        time.sleep(0.05)
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    lines = [x for x in err.splitlines() if x.startswith("accelc:")]
    assert p.returncode == 130 and len(lines) == 1, err
    epoch = json.loads((run / "checkpoint.json").read_text())["epoch"] + 1
    assert f"last checkpoint on disk is epoch {epoch}" in lines[0], lines
    assert not list(run.glob(".*.tmp-*"))


# ----------------------------------------------------------------------------- cause 10: bench
@pytest.mark.cause(10)
@pytest.mark.parametrize("target", ["nonsense", "nan", "5", "-1", "0", "torch-best-0.2"])
def test_bench_target_is_validated_before_writing(tmp_path, target):
    from accelc.bench import run_bench

    out = tmp_path / "b"
    with pytest.raises(AccelcError, match="--target"):
        run_bench("cnn3-small", "synthetic:64", 1, ["ort"], out, target=target, progress=False)
    assert not out.exists() and os.listdir(tmp_path) == []


@pytest.mark.cause(10)
def test_bench_existing_output_needs_force_and_keeps_user_files(tmp_path):
    from accelc.bench import run_bench

    out = tmp_path / "b"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(AccelcError, match="already exists"):
        run_bench("cnn3-small", "synthetic:64", 1, ["ort"], out, progress=False)
    with pytest.raises(AccelcError, match="not a folder accelc wrote"):
        run_bench("cnn3-small", "synthetic:64", 1, ["ort"], out, progress=False, force=True)
    assert (out / "mine.txt").read_text() == "keep"


@pytest.mark.cause(10)
@pytest.mark.slow
def test_bench_error_after_start_leaves_nothing(tmp_path):
    out = tmp_path / "b"
    r = run_cli(
        "bench", "--model", "cnn3-small", "--data", f"fashion-mnist:{tmp_path / 'nope'}", "--configs", "ort", "-o", out
    )
    assert_refused(r, "nope", out=out)


def _evil_names_model(path):
    """Conv -> Relu -> GAP -> Flatten -> Gemm whose node and parameter names hold a newline and an
    ANSI escape."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    evil = "conv\nX\x1b[31mred\u202e"
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 3])
    w = numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), evil + ".weight")
    fw = numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "fc\x1b[2J.weight")
    nodes = [
        helper.make_node("Conv", ["input", w.name], ["c"], name=evil, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", fw.name], ["output"], name="fc\x1b[2J", transB=1),
    ]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w, fw]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, str(path))
    return evil


@pytest.mark.cause(9)
def test_layer_names_are_escaped_in_the_inspect_table(tmp_path):
    from accelc.cli import layer_table_text

    _evil_names_model(tmp_path / "m.onnx")
    accelc.compile(tmp_path / "m.onnx", tmp_path / "art", validate_result=False)
    text = layer_table_text(accelc.inspect(tmp_path / "art"))
    assert "\x1b" not in text and "\u202e" not in text and "\\x1b[31m" in text
    rows = text.split("\n\n")[0].splitlines()
    assert len(rows) == 2 + len(accelc.inspect(tmp_path / "art")["layers"])  # header, rule, one line a layer


@pytest.mark.cause(9)
def test_layer_names_are_escaped_in_errors(tmp_path):
    evil = _evil_names_model(tmp_path / "m.onnx")
    msg = assert_api_refused(
        lambda: accelc.compile(
            tmp_path / "m.onnx", tmp_path / "o", "skip", {"skip": {"layers": evil + "x"}}, validate_result=False
        )
    )
    assert "\x1b" not in msg and "\\x1b" in msg


@pytest.mark.cause(9)
@pytest.mark.slow
def test_cli_inspect_and_errors_never_emit_control_characters(tmp_path):
    _evil_names_model(tmp_path / "m.onnx")
    r = run_cli("compile", tmp_path / "m.onnx", "-o", tmp_path / "art", "--no-validate")
    assert r.returncode == 0 and "\x1b" not in r.stdout + r.stderr, r.stderr
    r = run_cli("inspect", tmp_path / "art")
    assert r.returncode == 0 and "\x1b" not in r.stdout and "\u202e" not in r.stdout
    json.loads(run_cli("inspect", tmp_path / "art", "--json").stdout)  # JSON escapes them itself
    r = run_cli("compile", tmp_path / "m.onnx", "-o", tmp_path / "o", "--passes", "skip", "--skip-layers", "a\x1b[31m")
    assert_refused(r, "\\x1b[31m", out=tmp_path / "o")


def test_a_run_that_skipped_many_layers_resumes_and_exports(tmp_path):
    """Issue 32.1: the variant of a run whose skip controller froze most layers of a deep model is
    far longer than any fixed bound on its joined name; it is stored per method, and every file
    the run wrote reads back: resume continues it, export-run exports it."""
    import onnxruntime as ort
    import torch
    from torch import nn

    import accelc

    class Deep(nn.Module):
        def __init__(self, n=24):
            super().__init__()
            self.stem = nn.Conv2d(1, 8, 3, padding=1)
            self.a_rather_long_stage_name_for_the_blocks = nn.Sequential(
                *[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()) for _ in range(n)]
            )
            self.head = nn.Linear(8 * 8 * 8, 10)

        def forward(self, x):
            return self.head(torch.flatten(self.a_rather_long_stage_name_for_the_blocks(torch.relu(self.stem(x))), 1))

    torch.manual_seed(0)
    accelc.export(Deep(), torch.zeros(2, 1, 8, 8), tmp_path / "m.onnx")
    opts = {"skip": {"tau_mode": "absolute", "tau": 1e-12, "policy": "any"}}  # every layer judged done
    accelc.compile(tmp_path / "m.onnx", tmp_path / "art", passes=["skip"], pass_options=opts)
    run = tmp_path / "run"
    accelc.train(tmp_path / "art", "synthetic:128", epochs=2, batch_size=32, run_dir=run, progress=False)
    meta = json.loads((run / "checkpoint.json").read_text())
    assert isinstance(meta["variant"], dict) and len(meta["variant"]["skip"]) > 200, meta["variant"]
    s = accelc.train(
        tmp_path / "art",
        "synthetic:128",
        epochs=3,
        batch_size=32,
        run_dir=run,
        resume=True,
        allow_change=["epochs"],
        progress=False,
    )
    assert s["epochs"] == 3
    out = accelc.export_run(run, tmp_path / "model.onnx")
    assert len(out["trained_variant"]) > 200
    x = np.zeros((2, 1, 8, 8), np.float32)
    logits = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": x}
    )
    assert np.isfinite(logits[0]).all()
