"""Round 3 (issue 32, section 4): outputs are never lost to what happens while a command runs.

* An output is checked when the command starts and written when it ends: whatever appeared at the
  output in between (a user's folder, a second writer's output) or changed there (a replaced or
  added-to output under ``--force``) is refused and left as it is, never deleted or replaced.
* Only temporaries accelc provably made (a proof file inside naming the folder, owned by this
  user) are cleaned up or restored; folders that merely look like them are left alone.
* SIGTERM/SIGHUP to compile or bench is one line, the conventional exit code (128 + signal, as
  train) and no temporary left behind.

Races are made deterministic: in-process, the folder appears from inside the writer's body; through
the CLI, the test waits for the command's temporary folder before making it."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

import accelc
from accelc import AccelcError
from accelc.compiler import fileio
from accelc.compiler.fileio import MARKER, atomic_dir, recover
from accelc.zoo import export_zoo

from conftest import ACCELC, assert_api_refused, assert_refused


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


def _tree(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _temporaries(parent, name):
    return sorted(f for f in os.listdir(parent) if f.startswith(f".{name}."))


def _marked(d, entries=("keep",), text="old"):
    """A folder that is an accelc output of kind artifacts holding ``entries``."""
    d.mkdir()
    for e in entries:
        (d / e).write_text(text)
    (d / MARKER).write_text(json.dumps({"kind": "artifacts", "entries": sorted(entries)}))
    return d


def _dead_pid():
    """The PID of a child that has exited and been reaped."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def _killed_writer(body):
    """Run ``body()`` in a forked child that dies inside it (no cleanup, like kill -9)."""
    pid = os.fork()
    if pid == 0:
        try:
            body()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    return pid


@pytest.fixture(params=["renameat2", "plain_rename"])
def renames(request, monkeypatch):
    """Both ways outputs are moved into place: renameat2 (NOREPLACE, EXCHANGE) and, where the
    system or file system has none, plain renames and links."""
    if request.param == "plain_rename":
        monkeypatch.setattr(fileio, "_renameat2", lambda a, b, flags: -1)
    return request.param


# ----------------------------------------------------------------------------- appeared or changed
@pytest.mark.parametrize("what", ["folder", "empty_folder", "file"])
def test_an_output_that_appears_while_writing_is_refused_not_replaced(tmp_path, what, renames):
    out = tmp_path / "o"
    with pytest.raises(AccelcError, match="appeared") as ei:
        with atomic_dir(out) as t:
            (t / "result").write_text("new")
            if what == "file":
                out.write_text("mine")
            else:
                out.mkdir()
                if what == "folder":
                    (out / "precious.txt").write_text("mine")
    assert "\n" not in str(ei.value)
    if what == "file":
        assert out.read_text() == "mine"
    else:
        assert _tree(out) == ({"precious.txt": b"mine"} if what == "folder" else {})
    assert _temporaries(tmp_path, "o") == []


def test_a_second_writer_into_the_same_missing_output_is_refused(tmp_path, renames):
    out = tmp_path / "o"
    with pytest.raises(AccelcError, match="appeared"):
        with atomic_dir(out) as first:
            (first / "result").write_text("first")
            with atomic_dir(out, force=True) as second:
                (second / "result").write_text("second")
    assert (out / "result").read_text() == "second"
    assert _temporaries(tmp_path, "o") == []


def test_force_refuses_an_output_replaced_while_writing(tmp_path, renames):
    out = _marked(tmp_path / "o")
    with pytest.raises(AccelcError, match="changed"):
        with atomic_dir(out, force=True) as t:
            (t / "keep").write_text("new")
            os.rename(out, tmp_path / "moved")
            _marked(out, text="another")  # looks like the checked output; is not it
    assert _tree(out) == {"keep": b"another", MARKER: (out / MARKER).read_bytes()}
    assert (tmp_path / "moved" / "keep").read_text() == "old"
    assert _temporaries(tmp_path, "o") == []


def test_force_refuses_an_output_a_user_added_to_while_writing(tmp_path, renames):
    out = _marked(tmp_path / "o")
    with pytest.raises(AccelcError, match="precious.txt"):
        with atomic_dir(out, force=True) as t:
            (t / "keep").write_text("new")
            (out / "precious.txt").write_text("mine")
    assert (out / "precious.txt").read_text() == "mine" and (out / "keep").read_text() == "old"
    assert _temporaries(tmp_path, "o") == []


def test_force_replaces_the_output_it_checked(tmp_path, renames):
    out = _marked(tmp_path / "o")
    with atomic_dir(out, force=True) as t:
        (t / "keep").write_text("new")
    assert (out / "keep").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["o"]


def test_export_refuses_a_file_that_appeared_at_its_output(tmp_path, monkeypatch):
    from accelc.compiler import export as export_mod
    from accelc.zoo import zoo_module

    out = tmp_path / "m.onnx"
    real = export_mod.export_bytes

    def slow_export(*a, **k):  # the user's file appears while the model is being exported
        out.write_text("mine")
        return real(*a, **k)

    monkeypatch.setattr(export_mod, "export_bytes", slow_export)
    module, shape = zoo_module("cnn3-small")
    import torch

    assert_api_refused(lambda: accelc.export(module, torch.zeros(2, *shape), out), "appeared")
    assert out.read_text() == "mine"
    assert _temporaries(tmp_path, "m.onnx") == []


def test_export_replaces_the_file_it_found(tmp_path):
    import torch

    from accelc.zoo import zoo_module

    out = tmp_path / "m.onnx"
    out.write_text("old")
    module, shape = zoo_module("cnn3-small")
    accelc.export(module, torch.zeros(2, *shape), out)
    assert out.read_bytes()[:4] != b"old" and sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_export_run_refuses_a_file_that_appeared_at_its_output(tmp_path, art, monkeypatch):
    """export-run checks -o (and --ort-checkpoint) first and writes last: a file that appears there
    meanwhile is kept, the export refused; the file it found with --force is the one replaced."""
    from accelc.runtime import export_run as er

    run = tmp_path / "run"
    accelc.train(art, "synthetic:32", epochs=1, batch_size=16, run_dir=run, progress=False)
    out = tmp_path / "model.onnx"
    real = er._check_model

    def slow_check(*a, **k):  # the user's file appears while the model is being built
        out.write_text("mine")
        return real(*a, **k)

    monkeypatch.setattr(er, "_check_model", slow_check)
    assert_api_refused(lambda: accelc.export_run(run, out), "appeared")
    assert out.read_text() == "mine"
    monkeypatch.setattr(er, "_check_model", real)
    accelc.export_run(run, out, force=True)  # found and replaced: the file checked, unchanged
    assert out.read_bytes()[:4] != b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "run"]


def _start(args, parent, name, timeout=120):
    """Start the CLI and return once its temporary folder for ``parent/name`` exists."""
    p = subprocess.Popen(ACCELC + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not [f for f in os.listdir(parent) if f.startswith(f".{name}.tmp-")]:
        if p.poll() is not None or time.monotonic() > deadline:
            out, err = p.communicate()
            pytest.fail(f"no temporary folder seen (rc {p.returncode}): {err[-2000:]}")
        time.sleep(0.01)
    return p


def _finish(p, timeout=300):
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@pytest.mark.slow
@pytest.mark.parametrize("force", [False, True])
def test_compile_keeps_what_a_user_put_at_the_output_while_it_ran(tmp_path, model, art, force):
    """The issue's case: (accelc compile m.onnx -o out & sleep 3; mkdir out; echo mine >
    out/precious.txt; wait) -- and the same into an output --force is replacing."""
    out = tmp_path / "out"
    if force:
        shutil.copytree(art, out)
    before = _tree(out) if force else {}
    p = _start(["compile", model, "-o", out, "--no-validate"] + (["--force"] if force else []), tmp_path, "out")
    out.mkdir(exist_ok=True)
    (out / "precious.txt").write_text("mine\n")
    r = _finish(p)
    assert_refused(r, "changed" if force else "appeared")
    assert _tree(out) == dict(before, **{"precious.txt": b"mine\n"})
    assert _temporaries(tmp_path, "out") == []


@pytest.mark.slow
def test_bench_keeps_a_folder_made_at_its_output_while_it_ran(tmp_path):
    out = tmp_path / "b"
    args = ["bench", "--model", "cnn3-small", "--configs", "ort", "--epochs", "1", "--data", "synthetic:64"]
    p = _start(args + ["--batch-size", "32", "-o", out, "-q"], tmp_path, "b")
    out.mkdir()
    (out / "precious.txt").write_text("mine\n")
    r = _finish(p)
    assert_refused(r, "appeared")
    assert _tree(out) == {"precious.txt": b"mine\n"}
    assert _temporaries(tmp_path, "b") == []


# ----------------------------------------------------------------------------- look-alikes
def test_user_folders_named_like_temporaries_are_left_alone(tmp_path, model, art):
    dead = _dead_pid()
    tmp_like = tmp_path / f".o.tmp-{dead}-x"
    tmp_like.mkdir()
    (tmp_like / "thesis.tex").write_text("mine")
    old_like = tmp_path / f".o.old-{dead}-x"
    shutil.copytree(art, old_like)  # even a real accelc output (with its marker), kept there by the user
    file_like = tmp_path / f".o.tmp-{dead}-y"
    file_like.write_text("mine")
    before = {p: _tree(p) for p in (tmp_like, old_like)}
    recover(tmp_path, "o")
    accelc.compile(model, tmp_path / "o", validate_result=False)  # recovers first, then writes o
    assert {p: _tree(p) for p in (tmp_like, old_like)} == before and file_like.read_text() == "mine"
    assert json.loads((tmp_path / "o" / "report.json").read_text())["input"]  # the new output, not old_like


def test_what_a_killed_writer_left_is_removed(tmp_path):
    out = tmp_path / "o"

    def body():
        with atomic_dir(out) as t:
            (t / "half").write_text("x")
            os._exit(0)

    _killed_writer(body)
    assert _temporaries(tmp_path, "o")  # the killed writer's folder
    recover(tmp_path, "o")
    assert os.listdir(tmp_path) == []


def test_an_output_hidden_by_a_killed_replacement_is_put_back(tmp_path, monkeypatch):
    """The two-rename path (file systems that cannot exchange): a writer killed between the renames
    leaves the old output hidden; the next run puts it back under the name."""
    out = _marked(tmp_path / "o")

    def body():  # in the child only: no exchange, and killed before the second rename
        monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
        monkeypatch.setattr(fileio, "_place", lambda a, b: os._exit(0))
        with atomic_dir(out, force=True) as t:
            (t / "keep").write_text("new")

    _killed_writer(body)
    assert not out.exists() and _temporaries(tmp_path, "o")
    recover(tmp_path, "o")
    assert (out / "keep").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["o"]
    assert sorted(os.listdir(out)) == [MARKER, "keep"]


# ----------------------------------------------------------------------------- signals
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_to_compile_is_one_line_and_leaves_nothing(tmp_path, model, sig):
    out = tmp_path / "out"
    p = _start(["compile", model, "-o", out], tmp_path, "out")
    p.send_signal(sig)
    r = _finish(p)
    assert_refused(r, f"compile stopped by {sig.name}; nothing was written to", out=out, code=128 + sig.value)


@pytest.mark.slow
def test_sigterm_to_bench_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "b"
    args = ["bench", "--model", "cnn3-small", "--configs", "ort", "--epochs", "1", "--data", "synthetic:64"]
    p = _start(args + ["--batch-size", "32", "-o", out, "-q"], tmp_path, "b")
    time.sleep(1.0)  # into the work
    p.send_signal(signal.SIGTERM)
    r = _finish(p)
    assert_refused(r, "bench stopped by SIGTERM; nothing was written to", out=out, code=128 + signal.SIGTERM.value)


def test_a_signal_during_the_final_rename_waits_until_the_output_is_whole(tmp_path, monkeypatch):
    """A signal handler that raises (as the CLI's does) cannot cut the exchange in half: the
    signal is taken once the output is in place and the temporary folder is gone."""

    class Stop(BaseException):
        pass

    def handler(signum, frame):
        raise Stop()

    real = fileio._place

    def place(a, b):
        signal.raise_signal(signal.SIGTERM)
        return real(a, b)

    monkeypatch.setattr(fileio, "_place", place)
    old = signal.signal(signal.SIGTERM, handler)
    try:
        out = tmp_path / "o"
        with pytest.raises(Stop):
            with atomic_dir(out) as t:
                (t / "result").write_text("new")
    finally:
        signal.signal(signal.SIGTERM, old)
    assert (out / "result").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["o"]
