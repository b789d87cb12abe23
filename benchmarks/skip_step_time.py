"""Measured step time of fixed skip sets against the cost-model bound.

For the VGG-style zoo model (batch 64, 1×28×28) it compiles input-side prefixes of k skipped
layers, times training steps of every variant interleaved round-robin (same batch, medians of
`rounds` rounds), and compares the measured saving 1 - t_k/t_0 with the cost model's saving
1 - F_k/F_0 (FLOPs of forward+backward+optimizer). Usage: python benchmarks/skip_step_time.py [rounds]
"""

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import accelc
from accelc.compiler.artifact_dir import load_artifacts
from accelc.compiler.cost import graph_costs
from accelc.compiler.graph import training_graph
from accelc.passes.skip.rewrite import skip_variant
from accelc.runtime.session import TrainingSession
from accelc.zoo import export_zoo


def main(rounds=30, batch=64, model="vgg"):
    d = Path(tempfile.mkdtemp())
    export_zoo(model, d / "m.onnx")
    accelc.compile(d / "m.onnx", d / "art")
    base, _ = load_artifacts(d / "art")
    layers = training_graph(base).layer_names()
    sets = [layers[:k] for k in (0, 2, 4, 6)]
    sessions, flops = [], []
    for s in sets:
        art = skip_variant(base, s)[0] if s else base
        sessions.append(TrainingSession(art))
        flops.append(graph_costs(training_graph(art))["total"]["flops"])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int64)
    times = [[] for _ in sets]
    for r in range(rounds + 3):
        for i, s in enumerate(sessions):
            t0 = time.perf_counter()
            s.train_step(x, y)
            if r >= 3:
                times[i].append(time.perf_counter() - t0)
    t0 = statistics.median(times[0])
    rows = []
    for s, f, t in zip(sets, flops, times):
        tm = statistics.median(t)
        saving, bound = 1 - tm / t0, 1 - f / flops[0]
        rows.append(
            {
                "skipped": len(s),
                "last_skipped": s[-1] if s else None,
                "ms": tm * 1e3,
                "measured_saving": saving,
                "cost_model_saving": bound,
                "fraction_of_bound": saving / bound if bound else None,
            }
        )
        print(
            f"skip {len(s)} layers ({s[-1] if s else '-':12s}): {tm * 1e3:7.1f} ms/step  "
            f"saving {saving:6.1%}  cost-model bound {bound:6.1%}  "
            + (f"fraction of bound {saving / bound:.2f}" if bound else "")
        )
    return rows


if __name__ == "__main__":
    rows = main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
    print(json.dumps(rows))
