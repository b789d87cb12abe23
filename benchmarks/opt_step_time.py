"""The `opt` pass: per-op profile and step time before and after, against torch eager.

Compiles the VGG-style zoo model with `--no-opt` and with the default `opt` pass. Profiles, per op
type and in ms per step: the plain graph on ORT (ORT's profiler); the opt graph with ORT's own
conv kernels; the opt graph as accelc runs it by default (ORT segments profiled by ORT, the
oneDNN-marked Conv/ConvGrad timed around each call). Then times full training steps (forward +
backward + optimizer) of the three ORT variants and torch eager in alternating blocks, medians. Usage: python benchmarks/opt_step_time.py [rounds] [model]
"""

import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import accelc
from accelc.compiler.artifact_dir import load_artifacts
from accelc.compiler.lowering import lower_training_model
from accelc.runtime.config import ExecConfig
from accelc.runtime.session import TrainingSession, read_checkpoint_params
from accelc.runtime.torch_engine import TorchSession
from accelc.zoo import export_zoo, zoo_module


def profile(art_dir, x, y, runs=10):
    art, _ = load_artifacts(art_dir)
    low, _ = lower_training_model(art.training, art.info.output_name)
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.log_severity_level = 3
    so.profile_file_prefix = tempfile.mkdtemp() + "/p"
    s = ort.InferenceSession(low.SerializeToString(), so)
    params = read_checkpoint_params(art.checkpoint)
    feeds = {
        i.name: (x if i.name == art.info.input_name else y if i.name == "labels" else params[i.name])
        for i in s.get_inputs()
    }
    for _ in range(runs + 2):
        s.run(None, feeds)
    ev = json.load(open(s.end_profiling()))
    agg = collections.Counter()
    for e in ev:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            agg[e["args"]["op_name"]] += e["dur"] / 1000 / (runs + 2)
    return agg


def profile_runner(art_dir, x, y, runs=10):
    """Per-op ms per step of the default execution: ORT segments + oneDNN convs."""
    from accelc.passes.opt import onednn as ex

    sess = TrainingSession(art_dir)
    runner = sess.runner
    agg = collections.Counter()
    orig = ex.OneDNNConv.run

    def timed(self, env, bound):
        t0 = time.perf_counter()
        orig(self, env, bound)
        agg[("ConvGrad" if self.backward else "Conv") + " (oneDNN)"] += (time.perf_counter() - t0) * 1e3 / runs

    for seg in runner.segments:
        run = seg["session"].run_with_iobinding

        def wrapped(io, ro=None, run=run):
            t0 = time.perf_counter()
            run(io, ro)
            agg["ORT segments (all ops)"] += (time.perf_counter() - t0) * 1e3 / runs

        seg["session"].run_with_iobinding = wrapped
    sess.compute_gradients(x, y)
    agg.clear()
    ex.OneDNNConv.run = timed
    try:
        for _ in range(runs):
            sess.compute_gradients(x, y)
    finally:
        ex.OneDNNConv.run = orig
    return agg, len(runner.segments)


def main(rounds=20, model="vgg", batch=64):
    d = Path(tempfile.mkdtemp())
    export_zoo(model, d / "m.onnx")
    accelc.compile(d / "m.onnx", d / "noopt", opt=False)
    accelc.compile(d / "m.onnx", d / "opt")
    module, shape = zoo_module(model)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *shape)).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int64)
    pa, pb = profile(d / "noopt", x, y), profile(d / "opt", x, y)
    print(f"{'op':28s} {'no-opt ms':>10s} {'opt (ORT convs) ms':>18s}")
    for op in sorted(set(pa) | set(pb), key=lambda o: -max(pa.get(o, 0), pb.get(o, 0)))[:12]:
        print(f"{op:28s} {pa.get(op, 0):10.2f} {pb.get(op, 0):18.2f}")
    print(f"{'kernel total':28s} {sum(pa.values()):10.2f} {sum(pb.values()):18.2f}")
    pc, nseg = profile_runner(d / "opt", x, y)
    print(f"default execution (opt graph, conv_onednn, {nseg} ORT segments), ms per step:")
    for op, v in pc.most_common():
        print(f"  {op:28s} {v:8.2f}")
    a, c, b = (
        TrainingSession(d / "noopt"),
        TrainingSession(d / "opt", ExecConfig(kernels={"conv": "ort"})),
        TrainingSession(d / "opt"),
    )
    t = TorchSession(module, a.hyper, 1e-3)
    # Blocks of steps per variant, the blocks alternated: step-by-step interleaving penalises the
    # ORT-only variants (torch's OpenMP workers, still spinning after a oneDNN variant's step,
    # compete with ORT's threads: 365 vs ~210 ms measured), which is not how training runs.
    times = {"ort (no opt)": [], "ort (opt, ORT convs)": [], "ort (opt)": [], "torch": []}
    engines = (("ort (no opt)", a), ("ort (opt, ORT convs)", c), ("ort (opt)", b), ("torch", t))
    block = max(3, rounds // 3)
    for _ in range(3):
        for name, eng in engines:
            for r in range(block + 2):
                t0 = time.perf_counter()
                eng.train_step(x, y)
                if r >= 2:
                    times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:22s} {v:7.1f} ms/step   ×torch {v / med['torch']:.2f}")
    print(
        f"opt saves {100 * (1 - med['ort (opt)'] / med['ort (no opt)']):.1f}% of the ORT step "
        f"(batch {batch}, {torch.get_num_threads()} torch threads, 3 alternating blocks of {block} steps "
        f"per variant)"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20, sys.argv[2] if len(sys.argv) > 2 else "vgg")
