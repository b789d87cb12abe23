"""Issue 32, section 4 (round 3 of hostile input): training runs, their logs and export-run.

- a kill right after the last checkpoint loses no epoch record: ``--resume`` restores
  metrics.jsonl, metrics.csv, steps.csv and the TensorBoard epoch records from the checkpoint;
- export-run looks for the artifacts beside the run first and never walks (or opens the files of)
  a folder that checkpoint.json names: only a folder that looks like artifacts is hashed, bounded;
- ``--resume`` reads steps.csv in bounded memory, whatever its size;
- export-run racing a live run reads a consistent checkpoint or says the run is being written;
- a resume never writes through a symbolic link planted as ``RUN/tensorboard`` or ``steps.csv``;
- a resume refuses to leave logs of an earlier ``--log`` stale beside metrics.jsonl;
- a full disk is one line with no torn steps.csv row and no thread traceback, and a resume drops
  a torn last row;
- a broken TensorBoard install is one line.

In-process through the Python API (which raises the CLI's errors) except where marked slow.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import re
import shutil
import sys
import tracemalloc
import types
from pathlib import Path

import pytest

import accelc
from accelc.runtime import checkpoint as ckpt
from accelc.runtime import train as train_mod
from accelc.zoo import export_zoo

from conftest import assert_api_refused, assert_refused, run_cli

DATA = "synthetic:256"  # 8 steps of 32 an epoch
STEPS = 8
TRAIN = dict(data=DATA, batch_size=32, test_limit=64, seed=1, progress=False, threads=1)
LOGS = "csv,tensorboard"  # what the runs below log (a resume continues the same logs)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A folder holding the compiled cnn3-small as ``art`` (runs made beside it find it)."""
    d = tmp_path_factory.mktemp("round3")
    export_zoo("cnn3-small", d / "m.onnx")
    accelc.compile(d / "m.onnx", d / "art", validate_result=False)
    return d


@pytest.fixture(scope="module")
def one_epoch(home):
    """A finished 1-epoch run beside the artifacts, csv and TensorBoard logs (read-only: copy it)."""
    run = home / "run1"
    accelc.train(home / "art", run_dir=run, epochs=1, log="csv,tensorboard", **TRAIN)
    return run


def _copy(run, dest):
    shutil.copytree(run, dest, symlinks=True)
    return dest


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _jsonl(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def _tb_steps(run, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


class _Killed(BaseException):
    """Stands for SIGKILL at a chosen point (not an Exception: nothing may handle it)."""


# ----------------------------------------------------------------------------- the last epoch's record
@pytest.mark.parametrize("when", ["after", "before"])
def test_a_kill_around_the_last_checkpoint_loses_no_epoch_record(home, tmp_path, monkeypatch, when):
    """Killed right after (or right before) the checkpoint of the last epoch is written: the
    resume ends with every epoch in metrics.jsonl, metrics.csv, steps.csv and TensorBoard, each
    once, matching the checkpoint's history."""
    run = tmp_path / "run"
    real_save = ckpt.save

    def save(run_dir, arrays, meta):
        if meta["epoch"] == 1 and when == "before":
            raise _Killed
        real_save(run_dir, arrays, meta)
        if meta["epoch"] == 1:
            raise _Killed

    monkeypatch.setattr(ckpt, "save", save)
    with pytest.raises(_Killed):
        accelc.train(home / "art", run_dir=run, epochs=2, log="csv,tensorboard", **TRAIN)
    monkeypatch.setattr(ckpt, "save", real_save)
    held = ckpt.read_meta(run)["epoch"] + 1
    assert held == (2 if when == "after" else 1)
    s = accelc.train(home / "art", run_dir=run, epochs=2, resume=True, log="csv,tensorboard", **TRAIN)
    history = s["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert _jsonl(run / "metrics.jsonl") == history
    assert [int(r["epoch"]) for r in _rows(run / "metrics.csv")] == [1, 2]
    assert [float(r["test_acc"]) for r in _rows(run / "metrics.csv")] == [h["test_acc"] for h in history]
    rows = _rows(run / "steps.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 2 * STEPS + 1))
    assert [int(r["epoch"]) for r in rows] == [1] * STEPS + [2] * STEPS
    for e in (1, 2):  # the step rows are the ones the checkpointed epochs trained
        losses = [float(r["loss"]) for r in rows if int(r["epoch"]) == e]
        assert abs(sum(losses) / len(losses) - history[e - 1]["train_loss"]) < 1e-6
    assert _tb_steps(run, "epoch/test_acc") == [1, 2]
    assert _tb_steps(run, "step/loss") == list(range(1, 2 * STEPS + 1))
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2


def test_a_resume_with_nothing_left_to_train_restores_metrics_jsonl(home, one_epoch, tmp_path):
    run = _copy(one_epoch, tmp_path / "run")
    (run / "metrics.jsonl").write_text("")  # the record a kill after the checkpoint loses
    (run / "metrics.csv").unlink()
    s = accelc.train(home / "art", run_dir=run, epochs=1, resume=True, log="csv,tensorboard", **TRAIN)
    assert _jsonl(run / "metrics.jsonl") == s["history"] and len(s["history"]) == 1
    assert [int(r["epoch"]) for r in _rows(run / "metrics.csv")] == [1]


# ----------------------------------------------------------------------------- export-run: no tree walk
_WATCH: list = []  # [(folder, list of events seen under it)] while a test watches


def _audit(event, args):
    if not _WATCH or event not in ("open", "os.scandir", "os.listdir"):
        return
    p = args[0] if args else None
    if isinstance(p, (str, bytes, os.PathLike)):
        p = os.fsdecode(p)
        for folder, seen in _WATCH:
            if p == folder or p.startswith(folder + os.sep):
                seen.append((event, p))


sys.addaudithook(_audit)


@pytest.fixture
def decoy(tmp_path):
    """A big tree that looks like artifacts at its top (their file names, empty) and what it saw."""
    d = tmp_path / "decoy"
    for i in range(40):
        sub = d / f"d{i:02d}"
        sub.mkdir(parents=True)
        for j in range(50):
            (sub / f"f{j}").write_bytes(b"x")
    for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint", "report.json"):
        (d / name).write_bytes(b"")
    seen: list = []
    _WATCH.append((str(d), seen))
    yield d, seen
    _WATCH.clear()


def _record(run, **change):
    arrays, meta = ckpt.load(run)
    keep = {k: v for k, v in meta.items() if k not in ("format", "arrays", "arrays_sha256", "manifest")}
    ckpt.save(run, arrays, dict(keep, **change))


def test_export_run_never_walks_the_folder_checkpoint_json_names(home, one_epoch, decoy, tmp_path, monkeypatch):
    d, seen = decoy
    monkeypatch.chdir(tmp_path)
    beside = _copy(one_epoch, home / "run-decoy")  # beside the artifacts: found there first
    try:
        _record(beside, artifacts_dir=str(d))
        r = accelc.export_run(beside, tmp_path / "a.onnx")
        assert r["artifacts"] == str(home / "art")
        assert seen == [], seen[:5]
    finally:
        shutil.rmtree(beside)
    moved = _copy(one_epoch, tmp_path / "away" / "run")  # nothing beside: the recorded folder alone
    _record(moved, artifacts_dir=str(d))
    assert_api_refused(lambda: accelc.export_run(moved, tmp_path / "b.onnx"), "cannot find the artifacts")
    opened = [p for e, p in seen if e == "open"]
    assert opened == [] and len(seen) < 41, (len(seen), seen[:5])  # no file opened, not every folder listed
    assert not (tmp_path / "b.onnx").exists()
    _record(moved, artifacts_dir=str(home / "art"))  # a recorded folder that is the artifacts: used
    assert accelc.export_run(moved, tmp_path / "c.onnx")["artifacts"] == str(home / "art")


def test_bounded_artifact_hash_equals_the_recorded_one(home):
    art = home / "art"
    assert ckpt.artifacts_sha256(art, max_entries=1000) == ckpt.artifacts_sha256(art)
    assert ckpt.artifacts_sha256(art, max_entries=3) is None  # more entries than allowed: no hash


# ----------------------------------------------------------------------------- steps.csv read in bounded memory
def test_resume_reads_a_huge_steps_csv_in_bounded_memory(home, one_epoch, tmp_path):
    run = _copy(one_epoch, tmp_path / "run")
    size = 12 << 20
    with open(run / "steps.csv", "a") as fh:  # rows that look valid, far more than the run trained
        line = "1,{},1,0.5,100.0,1.0,base,28x28\n"
        i, n = 100, 0
        while n < size:
            s = line.format(i)
            fh.write(s)
            n += len(s)
            i += 1
    history = ckpt.read_meta(run)["history"]
    tracemalloc.start()
    try:
        logs = train_mod.RunLogs(run, ("csv",), history, total_steps=STEPS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    logs.close()
    assert peak < 4 << 20, peak  # not the file's size (12 MB), nor its rows as objects
    rows = _rows(run / "steps.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    # one endless line (no newline): read up to a bound, never whole
    with open(run / "steps.csv", "a") as fh:
        fh.write("1," + "9" * size)
    tracemalloc.start()
    try:
        train_mod.RunLogs(run, ("csv",), history, total_steps=STEPS).close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak
    s = accelc.train(home / "art", run_dir=run, epochs=2, resume=True, allow_change=["epochs"], log=LOGS, **TRAIN)
    rows = _rows(run / "steps.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 2 * STEPS + 1)) and len(s["history"]) == 2


# ----------------------------------------------------------------------------- export-run racing a live run
def _next_checkpoint(run, meta, arrays, epoch):
    """What the live run writes: the checkpoint of 0-based ``epoch`` (a new array file; the old
    one is deleted)."""
    h = meta["history"][0]
    history = [dict(h, epoch=e + 1) for e in range(epoch + 1)]
    keep = {k: v for k, v in meta.items() if k not in ("format", "arrays", "arrays_sha256", "manifest")}
    ckpt.save(run, arrays, dict(keep, epoch=epoch, history=history))


def test_export_run_racing_a_live_run_reads_a_consistent_checkpoint(home, one_epoch, tmp_path, monkeypatch):
    run = _copy(one_epoch, home / "run-race")
    try:
        arrays, meta = ckpt.load(run)
        real = ckpt.read_meta
        calls = []

        def read_meta(run_dir):  # the run writes its next checkpoint just after export-run read this one
            m = real(run_dir)
            calls.append(m["epoch"])
            if len(calls) == 1:
                _next_checkpoint(run, meta, arrays, 1)
            return m

        monkeypatch.setattr(ckpt, "read_meta", read_meta)
        r = accelc.export_run(run, tmp_path / "m.onnx")
        assert r["epoch"] == 2 and (tmp_path / "m.onnx").is_file()

        def always(run_dir):  # a writer that replaces it on every read: one clear line, no "No such file"
            m = real(run_dir)
            _next_checkpoint(run, meta, arrays, 2 if m["epoch"] == 1 else 1)
            return m

        monkeypatch.setattr(ckpt, "read_meta", always)
        msg = assert_api_refused(lambda: accelc.export_run(run, tmp_path / "n.onnx"), "changed while")
        assert "No such file" not in msg and "being written" in msg
        assert not (tmp_path / "n.onnx").exists()
    finally:
        shutil.rmtree(run)


# ----------------------------------------------------------------------------- symbolic links in the run
def test_resume_never_writes_tensorboard_through_a_symlink(home, one_epoch, tmp_path):
    run = _copy(one_epoch, tmp_path / "run")
    outside = tmp_path / "outside"
    shutil.move(run / "tensorboard", outside)
    before = sorted(p.name for p in outside.iterdir())
    os.symlink(outside, run / "tensorboard")
    assert_api_refused(
        lambda: accelc.train(
            home / "art", run_dir=run, epochs=2, resume=True, allow_change=["epochs"], log=LOGS, **TRAIN
        ),
        "symbolic link",
    )
    assert sorted(p.name for p in outside.iterdir()) == before
    assert ckpt.read_meta(run)["epoch"] == 0  # refused before training


def test_resume_never_writes_steps_csv_through_a_symlink(home, one_epoch, tmp_path):
    run = _copy(one_epoch, tmp_path / "run")
    target = tmp_path / "outside" / "made.csv"
    target.parent.mkdir()
    (run / "steps.csv").unlink()
    os.symlink(target, run / "steps.csv")  # dangling: appending through it would create the target
    assert_api_refused(
        lambda: accelc.train(
            home / "art", run_dir=run, epochs=2, resume=True, allow_change=["epochs"], log=LOGS, **TRAIN
        ),
        "symbolic link",
    )
    assert not os.path.lexists(target)


# ----------------------------------------------------------------------------- logs of an earlier --log
@pytest.mark.parametrize("log, needle", [("none", "metrics.csv"), ("csv", "tensorboard")])
def test_resume_refuses_to_leave_earlier_logs_stale(home, one_epoch, tmp_path, log, needle):
    """A run logged with csv and tensorboard, resumed without one of them: refused (its files
    would stop matching metrics.jsonl), nothing changed; resumed with them, it continues them."""
    run = _copy(one_epoch, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and not p.name.startswith(".")}
    msg = assert_api_refused(
        lambda: accelc.train(
            home / "art", run_dir=run, epochs=2, resume=True, allow_change=["epochs"], log=log, **TRAIN
        ),
        needle,
    )
    assert "--log csv,tensorboard" in msg
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and not p.name.startswith(".")}
    assert after == before


# ----------------------------------------------------------------------------- torn rows, full disk
def test_resume_drops_a_torn_last_steps_row(home, one_epoch, tmp_path):
    run = _copy(one_epoch, tmp_path / "run")
    data = (run / "steps.csv").read_bytes()
    (run / "steps.csv").write_bytes(data[:-3])  # the last row cut inside its last field
    accelc.train(home / "art", run_dir=run, epochs=2, resume=True, allow_change=["epochs"], log=LOGS, **TRAIN)
    text = (run / "steps.csv").read_text()
    assert text.endswith("\n")
    rows = _rows(run / "steps.csv")
    hw = rows[0]["input_hw"]
    assert re.fullmatch(r"\d+x\d+", hw) and all(r["input_hw"] == hw for r in rows), rows
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(set(steps)) and steps[-STEPS:] == list(range(STEPS + 1, 2 * STEPS + 1))


@pytest.fixture
def full_disk(monkeypatch):
    """``arm(match)``: from then on, a write to a file whose path ``match`` accepts writes half its
    bytes, then fails with ENOSPC (through open() and os.write alike); ``disarm()`` ends it."""
    import builtins

    state = {"match": None, "hits": 0}
    real_open, real_write = builtins.open, os.write

    def failing(path) -> bool:
        return state["match"] is not None and state["match"](os.fsdecode(path))

    class Full(io.RawIOBase):
        def __init__(self, fh):
            self.fh = fh

        def write(self, b):
            state["hits"] += 1
            self.fh.write(b[: len(b) // 2])
            self.fh.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def writable(self):
            return True

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def close(self):
            self.fh.close()
            super().close()

    def fake_open(file, mode="r", *a, **kw):
        fh = real_open(file, mode, *a, **kw)
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax") and failing(file):
            return Full(fh)
        return fh

    def fake_write(fd, data):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if failing(path):
            state["hits"] += 1
            real_write(fd, bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "write", fake_write)

    def arm(match):
        state["match"] = match

    def disarm():
        state["match"] = None

    return types.SimpleNamespace(arm=arm, disarm=disarm, state=state)


def test_a_full_disk_while_logging_steps_is_one_line_and_leaves_no_torn_row(home, tmp_path, full_disk, monkeypatch):
    run = tmp_path / "run"
    real_save = ckpt.save

    def save(run_dir, arrays, meta):  # after epoch 1's checkpoint the disk is full for steps.csv
        real_save(run_dir, arrays, meta)
        full_disk.arm(lambda p: p.endswith("/steps.csv"))

    monkeypatch.setattr(ckpt, "save", save)
    try:
        msg = assert_api_refused(
            lambda: accelc.train(home / "art", run_dir=run, epochs=2, log="csv", **TRAIN), "No space left on device"
        )
    finally:
        monkeypatch.setattr(ckpt, "save", real_save)
        full_disk.disarm()
    assert "steps.csv" in msg and full_disk.state["hits"] >= 1
    text = (run / "steps.csv").read_text()
    assert text.endswith("\n") and [int(r["step"]) for r in _rows(run / "steps.csv")] == list(range(1, STEPS + 1))
    s = accelc.train(home / "art", run_dir=run, epochs=2, resume=True, log="csv", **TRAIN)
    assert [int(r["step"]) for r in _rows(run / "steps.csv")] == list(range(1, 2 * STEPS + 1))
    assert len(s["history"]) == 2


def test_a_full_disk_under_tensorboard_is_one_line_without_a_thread_traceback(home, tmp_path, full_disk, capfd):
    run = tmp_path / "run"
    full_disk.arm(lambda p: "/tensorboard/events.out.tfevents." in p)
    try:
        msg = assert_api_refused(
            lambda: accelc.train(home / "art", run_dir=run, epochs=1, log="tensorboard", **TRAIN),
            "No space left on device",
        )
    finally:
        full_disk.disarm()
    assert "tensorboard" in msg
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception in thread" not in err, err


# ----------------------------------------------------------------------------- a broken TensorBoard install
class _BrokenModule(types.ModuleType):
    def __getattr__(self, name):  # what an incompatible protobuf does on import
        raise TypeError("Descriptors cannot be created directly.")


def test_a_broken_tensorboard_install_is_one_line(home, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", _BrokenModule("torch.utils.tensorboard"))
    run = tmp_path / "run"
    msg = assert_api_refused(
        lambda: accelc.train(home / "art", run_dir=run, epochs=1, log="tensorboard", **TRAIN), "tensorboard"
    )
    assert "TypeError" in msg and "--log csv" in msg
    assert not run.exists()  # nothing half-written: the run directory it made is gone


@pytest.mark.slow
def test_cli_a_broken_tensorboard_install_is_one_line(home, tmp_path):
    """Through the CLI: a tensorboard package whose import raises something else than ImportError."""
    shim = tmp_path / "shim"
    (shim / "tensorboard").mkdir(parents=True)
    (shim / "tensorboard" / "__init__.py").write_text("raise TypeError('Descriptors cannot be created directly.')\n")
    env = dict(os.environ, PYTHONPATH=f"{shim}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    import subprocess

    from conftest import ACCELC

    out = tmp_path / "run"
    r = subprocess.run(
        ACCELC + ["train", str(home / "art"), "--data", DATA, "--epochs", "1", "--batch-size", "32",
                  "--test-limit", "64", "-o", str(out), "--log", "tensorboard", "--threads", "1"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert_refused(r, "tensorboard", out=out)
    assert "TypeError" in r.stderr


@pytest.mark.slow
def test_cli_export_run_with_a_recorded_system_folder(one_epoch, tmp_path):
    moved = _copy(one_epoch, tmp_path / "away" / "run")
    _record(moved, artifacts_dir="/usr")
    r = run_cli("export-run", moved, "-o", tmp_path / "m.onnx", timeout=30, cwd=tmp_path)  # /usr walked: never ends
    assert_refused(r, "cannot find the artifacts", out=tmp_path / "m.onnx")
