"""Data-parallel training (issue 20): ranks on torch.distributed (gloo, localhost) train exactly what
one process trains on the whole global batch; controllers decide the same on every rank; a dead
rank ends the job at once with one line, and --resume continues exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import accelc
from accelc.zoo import export_zoo

from conftest import ACCELC, assert_api_refused, assert_refused, run_cli

pytestmark = pytest.mark.slow  # every test starts worker processes

DATA = "synthetic:512"


def params(run, epoch):
    z = np.load(run / f"checkpoint-{epoch:04d}.npz")  # checkpoint-NNNN holds epoch NNNN (1-based)
    return {k[len("param/") :]: z[k] for k in z.files if k.startswith("param/")}


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    export_zoo("cnn3-small", d / "m.onnx")  # no BatchNorm: the ranks' update is the one-process update
    return d


@pytest.fixture(scope="module")
def art(model):
    accelc.compile(model / "m.onnx", model / "art")
    return model / "art"


# Three epochs are compared bit-for-bit close on ORT Training's kernels (``aten=ort``: their sums do not
# depend on the thread count). ATen's GEMM and reductions do: on this data one process with 1 thread
# and one with 2 threads end 3 epochs 3.6e-3 apart (AdamW turns 1e-7 rounding differences in
# near-zero gradients into whole steps), so the default engine is compared after one epoch.
EXACT = {"aten": "ort"}


@pytest.fixture(scope="module")
def single(art, tmp_path_factory):
    """One process, global batch 32, one thread (the reference)."""
    run = tmp_path_factory.mktemp("single") / "run"
    accelc.train(art, DATA, epochs=3, batch_size=32, run_dir=run, threads=1, progress=False, kernels=EXACT)
    return run


def test_default_engine_two_ranks_equal_one_process_for_an_epoch(art, tmp_path):
    a, b = tmp_path / "one", tmp_path / "two"
    accelc.train(art, DATA, epochs=1, batch_size=32, run_dir=a, threads=1, progress=False)
    accelc.train(art, DATA, epochs=1, batch_size=32, run_dir=b, nproc=2, progress=False)
    p1, p2 = params(a, 1), params(b, 1)
    assert max(float(np.abs(p1[k] - p2[k]).max()) for k in p1) <= 1e-5
    ma, mb = metrics(a)[0], metrics(b)[0]
    assert abs(ma["train_loss"] - mb["train_loss"]) <= 1e-5 * max(1.0, abs(ma["train_loss"]))


def test_two_ranks_equal_one_process(art, single, tmp_path):
    run = tmp_path / "run"
    s = accelc.train(art, DATA, epochs=3, batch_size=32, run_dir=run, nproc=2, progress=False, kernels=EXACT)
    assert s["distributed"]["world_size"] == 2 and s["distributed"]["backend"] == "gloo"
    a, b = metrics(single), metrics(run)
    for x, y in zip(a, b):  # the loss of each epoch, averaged over the global batches
        assert abs(x["train_loss"] - y["train_loss"]) <= 1e-5 * max(1.0, abs(x["train_loss"]))
        assert x["train_acc"] == y["train_acc"] and abs(x["test_acc"] - y["test_acc"]) < 1e-12
    p1, p2 = params(single, 3), params(run, 3)
    assert p1.keys() == p2.keys()
    worst = max(float(np.abs(p1[k] - p2[k]).max()) for k in p1)
    assert worst <= 1e-5, worst
    # only rank 0 wrote the run directory
    assert sorted(f.name for f in run.iterdir() if not f.name.startswith(".")) == [
        "checkpoint-0003.npz",
        "checkpoint.json",
        "curves.png",
        "metrics.csv",
        "metrics.jsonl",
        "steps.csv",
        "summary.json",
    ]


def test_torchrun_equals_one_process(art, single, tmp_path):
    """The same artifacts under torchrun (the launcher torch users already use)."""
    run = tmp_path / "run"
    from accelc.runtime.distributed import free_port

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    torchrun += ["--master-port", str(free_port())]
    r = subprocess.run(
        torchrun + ["-m", "accelc", "train", str(art), "--data", DATA, "--epochs", "3", "--batch-size", "32"]
        + ["-o", str(run), "-q", "--kernel", "aten=ort"],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    p1, p2 = params(single, 3), params(run, 3)
    assert max(float(np.abs(p1[k] - p2[k]).max()) for k in p1) <= 1e-5


def test_fixed_skip_set_equal_one_process(model, tmp_path):
    art = tmp_path / "art"
    accelc.compile(model / "m.onnx", art, passes=["skip"], pass_options={"skip": {"layers": ["c1"]}})
    one, two = tmp_path / "one", tmp_path / "two"
    accelc.train(art, DATA, epochs=2, batch_size=32, run_dir=one, threads=1, progress=False)
    accelc.train(art, DATA, epochs=2, batch_size=32, run_dir=two, nproc=2, progress=False)
    p1, p2 = params(one, 2), params(two, 2)
    assert np.array_equal(p1["c1.weight"], p2["c1.weight"])  # skipped: never changed on either
    assert max(float(np.abs(p1[k] - p2[k]).max()) for k in p1) <= 1e-5


def test_adaptive_skip_same_decisions_on_every_rank(model, tmp_path):
    """The controller fires after epoch 1 (absolute τ tiny); every rank decides on its own from the
    all-reduced gradients, rank 0's decision is applied, and the run makes the one-process decisions."""
    art = tmp_path / "art"
    opts = {"skip": {"rule": "lars", "tau_mode": "absolute", "tau": 1e-9}}
    accelc.compile(model / "m.onnx", art, passes=["skip"], pass_options=opts)
    one, two = tmp_path / "one", tmp_path / "two"
    accelc.train(art, DATA, epochs=3, batch_size=32, run_dir=one, threads=1, progress=False)
    accelc.train(art, DATA, epochs=3, batch_size=32, run_dir=two, nproc=2, progress=False)
    m1, m2 = metrics(one), metrics(two)
    assert [m["ranks_agree"] for m in m2] == [True, True, True]
    assert [m["variant"] for m in m2] == [m["variant"] for m in m1]
    assert m2[1]["variant"] != "base"  # it did switch, on both ranks at the same step
    for a, b in zip(m1, m2):  # λ from the averaged gradient = λ of the one-process gradient
        la, lb = a["skip"]["lambda"], b["skip"]["lambda"]
        assert la.keys() == lb.keys()
        assert all(abs(la[k] - lb[k]) <= 1e-4 * abs(la[k]) for k in la), (la, lb)


def _wait_for(path, timeout=120):
    t = time.monotonic()
    while not path.exists():
        assert time.monotonic() - t < timeout, f"{path} never appeared"
        time.sleep(0.05)


def _rank_pid(parent: int, rank: int) -> int:
    """The worker of ``rank`` that ``parent`` started (from /proc)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:  # the launcher gives each worker its rank there
                env = fh.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if ppid == parent and f"ACCELC_RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank}")


def test_killed_rank_ends_the_job_and_resume_is_exact(art, tmp_path):
    run, ref = tmp_path / "run", tmp_path / "ref"
    args = ["train", str(art), "--data", "synthetic:4096", "--epochs", "3", "--batch-size", "32", "--nproc", "2"]
    p = subprocess.Popen(ACCELC + args + ["-o", str(run), "-q"], stderr=subprocess.PIPE, text=True)
    _wait_for(run / "checkpoint.json")  # epoch 1 saved: kill rank 1 in the middle of epoch 2
    time.sleep(0.3)
    os.kill(_rank_pid(p.pid, 1), signal.SIGKILL)
    t0 = time.monotonic()
    _, err = p.communicate(timeout=60)
    assert time.monotonic() - t0 < 30
    assert p.returncode == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "rank 1 of 2 was killed by SIGKILL during epoch 2" in err and "--resume" in err, err
    assert "epoch 1" in err
    assert not [q for q in os.listdir("/proc") if q.isdigit() and _is_worker_of(int(q), p.pid)]
    r = run_cli(*args, "-o", run, "-q", "--resume")
    assert r.returncode == 0, r.stderr
    r = run_cli(*args, "-o", ref, "-q")
    assert r.returncode == 0, r.stderr
    a, b = params(run, 3), params(ref, 3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert [m["train_loss"] for m in metrics(run)] == [m["train_loss"] for m in metrics(ref)]


def _is_worker_of(pid: int, parent: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1]) == parent
    except OSError:
        return False


def test_resume_with_other_nproc_needs_allow_change(art, single, tmp_path):
    run = tmp_path / "run"
    accelc.train(art, DATA, epochs=1, batch_size=32, run_dir=run, threads=1, progress=False)
    r = run_cli(
        "train", art, "--data", DATA, "--epochs", "2", "--batch-size", "32", "-o", run, "--resume", "--nproc", "2",
        "--allow-change", "epochs",
    )  # fmt: skip
    assert_refused(r, "--nproc 1; this run has 2 (pass --allow-change nproc")
    s = accelc.train(
        art,
        DATA,
        epochs=2,
        batch_size=32,
        run_dir=run,
        resume=True,
        nproc=2,
        allow_change=["nproc", "epochs"],
        progress=False,
    )
    assert s["epochs"] == 2


def test_refusals(art, tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", art, "--data", DATA, "--batch-size", "33", "--nproc", "2", "-o", out)
    assert_refused(r, "--batch-size 33 (the global batch) must be a multiple of the number of processes (2)", out)
    r = run_cli("train", art, "--data", DATA, "--nproc", "0", "-o", out)
    assert_refused(r, "--nproc", out)
    r = run_cli("train", art, "--data", DATA, "--nproc", "2", "--dist-timeout", "0", "-o", out)
    assert_refused(r, "--dist-timeout", out)
    env = dict(os.environ, RANK="0", WORLD_SIZE="2")
    r = subprocess.run(
        ACCELC + ["train", str(art), "--data", DATA, "--nproc", "2", "-o", str(out)], capture_output=True, text=True,
        env=env, timeout=120,
    )  # fmt: skip
    assert_refused(r, "under torchrun, leave it out", out)
    assert_api_refused(lambda: accelc.train(art, DATA, batch_size=33, run_dir=out, nproc=2), "multiple", ValueError)
    assert_api_refused(lambda: accelc.train(art, DATA, run_dir=out, nproc=0), "--nproc", ValueError)
    assert not out.exists()


def test_bucket_layout_views_in_reverse_parameter_order():
    """Gradient buffers are views into flat buckets (filled from the last parameter), so the graph
    writes into what is all-reduced; no collective needed to check the layout."""
    import torch

    from accelc.runtime.distributed import DistConfig, GradReducer

    class G:  # the group the layout reads: only its config
        config = DistConfig(bucket_mb=1.0)
        world = 1

    red = GradReducer(G())
    shapes = {"a": (256, 256), "b": (512, 256), "c": (384, 256)}  # 256, 512, 384 KiB: c+b fill 1 MiB
    views = red.layout(shapes, torch.float32, "cpu")
    assert [sorted(b["names"]) for b in red.buckets] == [["b", "c"], ["a"]]
    for n, v in views.items():
        assert tuple(v.shape) == shapes[n] and v.is_contiguous()
        v.fill_(1.0)
    assert float(sum(b["flat"].sum() for b in red.buckets)) == sum(np.prod(s) for s in shapes.values())


def test_bench_nproc_refusals_and_model(tmp_path):
    out = tmp_path / "sc"
    r = run_cli("bench", "--model", "cnn3-small", "--nproc", "1", "-o", out)
    assert_refused(r, "--nproc must be at least 2", out)
    r = run_cli("bench", "--model", "cnn3-small", "--nproc", "2", "--threads", "1", "-o", out)
    assert_refused(r, "--nproc sets the threads itself", out)
    r = run_cli("bench", "--model", "cnn3-small", "--nproc", "3", "--batch-size", "32", "-o", out)
    assert_refused(r, "multiple of every process count", out)
    from accelc.scaling import predict

    rows = [
        {"processes": 1, "threads_each": 2, "step_ms": 100.0},
        {"processes": 2, "threads_each": 1, "step_ms": 60.0, "gradient_bytes": 10**7},
    ]
    p = predict(rows, 64, bandwidths_gbit=(10.0,), latency_us=0.0)["machines"]
    # ring all-reduce of 10 MB on 2 machines at 10 Gbit/s: 2·(1/2)·8e7 bit / 1e10 bit/s = 8 ms
    assert abs(p["2@10Gbit"]["allreduce_ms"] - 8.0) < 1e-9 and abs(p["2@10Gbit"]["step_ms"] - 58.0) < 1e-9


def test_rank_without_the_checkpoint_is_refused(art, tmp_path):
    """Two machines without a shared run directory: rank 1 cannot see rank 0's checkpoint. Both
    ranks stop with the reason instead of training different things (started as torchrun would)."""
    from accelc.runtime.distributed import free_port

    run = tmp_path / "run"
    accelc.train(art, DATA, epochs=1, batch_size=32, run_dir=run, threads=1, progress=False)
    port = str(free_port())
    procs = []
    for rank, out in ((0, run), (1, tmp_path / "elsewhere")):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        env["MASTER_PORT"] = port
        args = ["train", str(art), "--data", DATA, "--epochs", "2", "--batch-size", "32", "-o", str(out), "--resume"]
        args += ["--allow-change", "nproc,epochs", "--dist-timeout", "60"]
        procs.append(subprocess.Popen(ACCELC + args, stderr=subprocess.PIPE, text=True, env=env))
    errs = [p.communicate(timeout=120)[1] for p in procs]
    for p, err in zip(procs, errs):
        assert p.returncode == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "rank 1: the ranks do not start from the same state (rank 0: epoch 2, this rank: epoch 1)" in errs[1]
    assert "a file system all machines share" in errs[0] and "a file system all machines share" in errs[1]
    assert len(metrics(run)) == 1  # nothing trained


CLOSE_RELEASES = """
import json, os, torch
from accelc.runtime.distributed import DistConfig, Group, free_port

def threads():
    return {open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")}

g = Group(DistConfig(rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}", timeout_s=60))
torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # imports torch._dynamo, as a session's does
g.sum([1.0])
before = threads()
g.close()
print(json.dumps([sorted(before), sorted(threads())]))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads the process's threads from Linux's /proc")
def test_close_releases_the_group_threads():
    """Group.close leaves no native thread of the group (gloo's, rank 0's store server) behind, even
    when torch imports torch.distributed.nn after the group exists (its functions' defaults bound
    group.WORLD): a thread left running into the interpreter's exit can abort a rank after its one
    line (SIGABRT, 'terminate called without an active exception'). A fresh interpreter: this one
    may have imported torch.distributed.nn already."""
    r = subprocess.run([sys.executable, "-c", CLOSE_RELEASES], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    before, after = (set(names) for names in json.loads(r.stdout))
    native = {n for n in before if n.startswith(("pt_gloo", "gloo", "pt_tcpstore"))}
    assert native, before  # the group had them (the check below is not vacuous)
    assert not native & after, after
