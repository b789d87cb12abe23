"""A short interleaved A/B of one training step: accelc's default engine against torch eager fp32 on a
torchvision model, in one process, the same batch and starting weights.

    python benchmarks/engine_ab.py resnet50 16 128 [--rounds 4]

Each round runs torch eager, then accelc: one untimed step, then two timed steps (their mean is the
round's value), 0.3 s idle before each block. Prints the CPU, the medians and every round's value.
For the full table (more engines, per-op profiles) use benchmarks/step_time.py.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a torchvision model name, e.g. resnet50")
    ap.add_argument("batch", type=int)
    ap.add_argument("size", type=int, help="input height and width")
    ap.add_argument("--rounds", type=int, default=4)
    a = ap.parse_args(argv)

    from model_coverage import build
    from step_time import cpu_info

    import accelc
    from accelc.runtime.session import TrainingSession
    from accelc.runtime.torch_engine import TorchSession

    print(f"CPU: {cpu_info()}")
    module = build("tv", a.model)
    with tempfile.TemporaryDirectory() as d:
        accelc.export(copy.deepcopy(module), torch.zeros(2, 3, a.size, a.size), f"{d}/m.onnx")
        accelc.compile(f"{d}/m.onnx", f"{d}/art")
        rng = np.random.default_rng(0)
        x = rng.standard_normal((a.batch, 3, a.size, a.size)).astype(np.float32)
        y = rng.integers(0, 10, a.batch)
        ours = TrainingSession(f"{d}/art")
        module.load_state_dict({k: torch.from_numpy(v) for k, v in ours.param_arrays().items()}, strict=False)
        ref = TorchSession(module, ours.hyper, 1e-3)
        res: dict[str, list[float]] = {"torch eager fp32": [], "accelc default": []}
        for e in (ref, ours):
            e.train_step(x, y)
        for _ in range(a.rounds):
            for label, e in (("torch eager fp32", ref), ("accelc default", ours)):
                time.sleep(0.3)
                e.train_step(x, y)
                t0 = time.perf_counter()
                e.train_step(x, y)
                e.train_step(x, y)
                res[label].append((time.perf_counter() - t0) / 2 * 1e3)
    base = statistics.median(res["torch eager fp32"])
    for label, v in res.items():
        med = statistics.median(v)
        print(f"{label}: {med:.0f} ms/step ({med / base:.2f}x torch eager), rounds {[round(t) for t in v]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
