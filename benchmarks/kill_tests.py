"""Kill tests: accelc killed at random moments must leave whole outputs and no orphans.

  compile  kill -9 at moments spread over the measured compile duration (half of them while
           --force replaces an existing output): the output is complete or absent, never partial,
           and a replaced output is the old one or the new one, never neither
  parent   kill (SIGKILL, SIGTERM or SIGHUP) of `accelc train`'s parent process alone: its
           training worker must be gone within 2 s, every time
  group    kill -9 of the whole process group during training, then --resume: the final
           metrics equal an uninterrupted run's

    python benchmarks/kill_tests.py [--kills 20] [--json out.json]

The test suite runs the same functions with fewer kills (tests/test_kills.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ACCELC = [sys.executable, "-m", "accelc"]
ARTIFACT_FILES = {"training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint", "report.json"}


def _run(*args, timeout=600):
    return subprocess.run(ACCELC + [str(a) for a in args], capture_output=True, text=True, timeout=timeout)


def _complete(out: Path) -> bool:
    if not out.is_dir() or not ARTIFACT_FILES <= set(os.listdir(out)):
        return False
    json.loads((out / "report.json").read_text())
    return _run("inspect", out).returncode == 0


def kill_compile(model: Path, work: Path, kills: int = 20, seed: int = 7) -> dict:
    """kill -9 ``accelc compile`` at moments spread over its measured duration."""
    rng = random.Random(seed)
    t0 = time.perf_counter()
    ref = _run("compile", model, "-o", work / "ref")
    duration = time.perf_counter() - t0
    assert ref.returncode == 0, ref.stderr
    # the output a replacement starts from differs from the new one in the recorded lr
    old = _run("compile", model, "-o", work / "old", "--lr", "0.0123", "--no-validate")
    assert old.returncode == 0, old.stderr
    stats = {"kills": 0, "duration_s": round(duration, 2), "complete": 0, "absent": 0, "partial": 0}
    stats.update({"replace_old": 0, "replace_new": 0, "replace_lost": 0})
    n_fresh, n_replace = (kills + 1) // 2, kills // 2
    for i in range(kills):
        # moments stratified over [0.05, 1.6] x the measured duration (separately for fresh outputs
        # and replacements), jittered: early, middle and after the end
        replace = i % 2 == 1
        j, n = (i // 2, n_replace) if replace else (i // 2, n_fresh)
        frac = 0.05 + 1.55 * (j + rng.random()) / n
        out = work / f"o{i}"
        if replace:
            shutil.copytree(work / "old", out)
        p = subprocess.Popen(
            ACCELC + ["compile", str(model), "-o", str(out)] + (["--force"] if replace else []),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(frac * duration)
        p.send_signal(signal.SIGKILL)
        p.wait()
        stats["kills"] += 1
        # the next run (here: a compile that is refused at once) cleans what the killed one left
        if replace:
            if not _complete(out):
                stats["replace_lost"] += 1
            elif json.loads((out / "report.json").read_text())["options"]["lr"] == 0.0123:
                stats["replace_old"] += 1
            else:
                stats["replace_new"] += 1
        elif out.exists():
            stats["complete" if _complete(out) else "partial"] += 1
        else:
            stats["absent"] += 1
    # a later run to each name clears what killed runs left behind
    for i in range(kills):
        _run("compile", model, "-o", work / f"o{i}", "--no-validate")  # refused (exists) or written
    stats["leftovers"] = len([f for f in os.listdir(work) if ".tmp-" in f or ".old-" in f])
    return stats


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


TRAIN = ["--data", "synthetic:2048", "--epochs", "3", "--batch-size", "32", "--seed", "7", "--threads", "1"]


def kill_train_parent(art: Path, work: Path, kills: int = 20, seed: int = 11) -> dict:
    """Kill the parent of ``accelc train`` alone; its worker must be gone within 2 s."""
    rng = random.Random(seed)
    sigs = [signal.SIGKILL, signal.SIGTERM, signal.SIGHUP]
    stats = {"kills": 0, "worker_gone_2s": 0, "worker_gone_max_s": 0.0, "by_signal": {}}
    for i in range(kills):
        run = work / f"p{i}"
        p = subprocess.Popen(
            ACCELC + ["train", str(art), *TRAIN, "-o", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.time() + 60
        workers = []
        while time.time() < deadline and not workers:
            workers = _children(p.pid)
            time.sleep(0.02)
        assert workers, "no training worker started"
        time.sleep(rng.uniform(0.2, 6.0))  # while it imports, loads, trains or writes a checkpoint
        if p.poll() is not None:
            continue
        sig = sigs[i % len(sigs)]
        p.send_signal(sig)
        t0 = time.perf_counter()
        p.wait() if sig == signal.SIGKILL else None
        while any(_alive(w) for w in workers) and time.perf_counter() - t0 < 10:
            time.sleep(0.01)
        gone = time.perf_counter() - t0
        p.wait(timeout=30)
        stats["kills"] += 1
        stats["by_signal"][sig.name] = stats["by_signal"].get(sig.name, 0) + 1
        stats["worker_gone_2s"] += gone <= 2.0
        stats["worker_gone_max_s"] = round(max(stats["worker_gone_max_s"], gone), 3)
        for w in workers:  # never leave one behind, whatever happened
            if _alive(w):
                os.kill(w, signal.SIGKILL)
    return stats


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def kill_group_resume(art: Path, work: Path, kills: int = 20, seed: int = 13) -> dict:
    """kill -9 the whole process group of ``accelc train`` mid-run, then --resume: exact."""
    rng = random.Random(seed)
    t0 = time.perf_counter()
    ref = _run("train", art, *TRAIN, "-o", work / "ref-run")
    duration = time.perf_counter() - t0
    assert ref.returncode == 0, ref.stderr
    want = _metrics(work / "ref-run")
    stats = {"kills": 0, "duration_s": round(duration, 2), "resumed_exact": 0, "max_abs_diff": 0.0}
    stats["killed_after_epochs"] = {}
    for i in range(kills):
        run = work / f"g{i}"
        p = subprocess.Popen(
            ACCELC + ["train", str(art), *TRAIN, "-o", str(run)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        # moments stratified over [0.05, 0.95] x the measured run: start-up, every epoch, checkpoints
        time.sleep((0.05 + 0.9 * (i + rng.random()) / kills) * duration)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        done = len(_metrics(run)) if (run / "metrics.jsonl").exists() else 0
        stats["killed_after_epochs"][done] = stats["killed_after_epochs"].get(done, 0) + 1
        time.sleep(0.2)  # the worker dies with its parent (PR_SET_PDEATHSIG)
        args = ["train", art, *TRAIN, "-o", run] + (["--resume"] if run.exists() else [])
        r = _run(*args)
        assert r.returncode == 0, r.stderr
        got = _metrics(run)
        diff = max(
            abs(x[k] - y[k]) for x, y in zip(want, got) for k in ("train_loss", "train_acc", "test_loss", "test_acc")
        )
        stats["kills"] += 1
        stats["max_abs_diff"] = max(stats["max_abs_diff"], diff)
        stats["resumed_exact"] += len(got) == len(want) and diff <= 1e-6
        stats.setdefault("leftovers", 0)
        stats["leftovers"] += len([f for f in os.listdir(run) if ".tmp-" in f])
    return stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20, help="kills per test (default 20)")
    ap.add_argument("--only", default="compile,parent,group", help="which tests, comma-separated")
    ap.add_argument("--json", default=None, help="write the figures here")
    a = ap.parse_args()
    from accelc.zoo import export_zoo

    out = {}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        export_zoo("vgg", d / "vgg.onnx")
        export_zoo("cnn3-small", d / "s.onnx")
        assert _run("compile", d / "s.onnx", "-o", d / "art").returncode == 0
        for name, fn, arg in (
            ("compile", kill_compile, d / "vgg.onnx"),
            ("parent", kill_train_parent, d / "art"),
            ("group", kill_group_resume, d / "art"),
        ):
            if name in a.only.split(","):
                w = d / name
                w.mkdir()
                t0 = time.perf_counter()
                out[name] = fn(arg, w, a.kills)
                out[name]["seconds"] = round(time.perf_counter() - t0, 1)
                print(name, json.dumps(out[name]), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
