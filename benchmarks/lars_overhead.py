"""Overhead of the skip pass's LARS instrumentation on the training step.

Compiles the VGG-style zoo model twice (plain, and instrumented by `--passes skip`), then times
training steps of both interleaved (A B A B ...), with the controller's per-step λ update on the
instrumented one, and prints medians. Usage: python benchmarks/lars_overhead.py [steps]
"""

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import accelc
from accelc.passes.skip.algorithm import LarsSkip
from accelc.runtime.session import TrainingSession
from accelc.zoo import export_zoo


def main(steps=60, batch=64):
    d = Path(tempfile.mkdtemp())
    export_zoo("vgg", d / "m.onnx")
    accelc.compile(d / "m.onnx", d / "plain")
    accelc.compile(d / "m.onnx", d / "inst", passes=["skip"], pass_options={"skip": {"rule": "lars"}})  # instrumented
    a, b = TrainingSession(d / "plain"), TrainingSession(d / "inst")
    ctrl = LarsSkip(b.artifacts, b.artifacts.plan[0])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int64)
    ta, tb = [], []
    for i in range(steps + 5):
        t0 = time.perf_counter()
        a.train_step(x, y)
        t1 = time.perf_counter()
        ctrl.on_step(None, i, b.train_step(x, y))
        t2 = time.perf_counter()
        if i >= 5:
            ta.append(t1 - t0)
            tb.append(t2 - t1)
    ma, mb = statistics.median(ta), statistics.median(tb)
    ratios = sorted(b_ / a_ for a_, b_ in zip(ta, tb))
    print(
        f"plain step median {ma * 1e3:.2f} ms, instrumented + λ median {mb * 1e3:.2f} ms, "
        f"overhead {100 * (mb / ma - 1):+.2f}% (median of paired ratios {100 * (statistics.median(ratios) - 1):+.2f}%), "
        f"{steps} steps, batch {batch}"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 60)
