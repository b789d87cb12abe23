"""Peak memory of training, accelc against torch eager: one process per measurement (its own peak
resident set, from getrusage), the configurations interleaved over rounds.

    python benchmarks/memory.py                          # torchvision vgg11_bn, 3x224x224, batch 32
    python benchmarks/memory.py --model tv:resnet18 --size 64 --batch 64 --rounds 1

Measured per round: ``torch`` (eager, a few AdamW steps), ``compile`` (accelc.compile with the
default passes) and ``accelc`` (the compiled artifacts, the same steps in accelc's runtime).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(kind: str, spec: str, size: int, batch: int, steps: int, work: Path) -> dict:
    import torch
    from model_coverage import build

    lib, name = spec.split(":")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int64)
    t0 = time.perf_counter()
    if kind == "torch":
        from accelc.runtime.torch_engine import TorchSession

        hyper = {"kind": "adamw", "alpha": 0.9, "beta": 0.999, "epsilon": 1e-6, "weight_decay": 0.0}
        sess = TorchSession(build(lib, name), hyper, 1e-3)
        for _ in range(steps):
            sess.train_step(x, y)
    elif kind == "compile":
        import accelc

        accelc.export(build(lib, name), torch.zeros(2, 3, size, size), work / "m.onnx")
        accelc.compile(work / "m.onnx", work / "art", force=True, batch_size=batch)
    else:
        from accelc.runtime.config import ExecConfig
        from accelc.runtime.session import TrainingSession

        sess = TrainingSession(work / "art", ExecConfig(layout=kind.partition("-")[2] or "auto"))
        for _ in range(steps):
            sess.train_step(x, y)
        layout = sess.engine_report().get("layout", {})
        return {"kind": kind, "peak_rss_mb": _peak_mb(), "seconds": time.perf_counter() - t0, "layout": layout}
    return {"kind": kind, "peak_rss_mb": _peak_mb(), "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tv:vgg11_bn")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--layouts", default="auto", help="accelc's --layout per measurement, comma list (default auto), e.g. auto,nchw"
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.model, a.size, a.batch, a.steps, Path(a.work))))
        return 0
    ours = ["accelc" if lay == "auto" else f"accelc-{lay}" for lay in a.layouts.split(",")]
    results: dict = {k: [] for k in ["torch", "compile", *ours]}
    with tempfile.TemporaryDirectory(prefix="accelc-mem-") as work:
        for r in range(a.rounds):
            for kind in results:
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    kind,
                    "--work",
                    work,
                    "--model",
                    a.model,
                    "--size",
                    str(a.size),
                    "--batch",
                    str(a.batch),
                    "--steps",
                    str(a.steps),
                ]
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode != 0:
                    print(f"{kind}: failed: {p.stderr.strip().splitlines()[-1:]}")
                    return 1
                res = json.loads(p.stdout.strip().splitlines()[-1])
                results[kind].append(res)
                print(
                    f"round {r + 1} {kind:8s} peak RSS {res['peak_rss_mb']:8.0f} MB  ({res['seconds']:.1f} s)"
                    + (f", layout {res['layout']}" if res.get("layout") else ""),
                    flush=True,
                )
    med = {k: statistics.median(x["peak_rss_mb"] for x in v) for k, v in results.items()}
    print(
        f"{a.model} {a.size}x{a.size} batch {a.batch}, {a.steps} steps, medians of {a.rounds} rounds: "
        f"torch {med['torch']:.0f} MB, accelc compile {med['compile']:.0f} MB, "
        + ", ".join(f"{k} training {med[k]:.0f} MB ({med[k] / med['torch']:.2f}x torch)" for k in ours)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
