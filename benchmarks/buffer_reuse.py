"""What the engine's buffer reuse buys: accelc's default engine with kernels writing their output over
an input that dies there (``NodeKernel.donate``, docs/engine.md#buffer-reuse) against the same engine
with that turned off, one training step (forward, backward, AdamW), side by side in one process.

    python benchmarks/buffer_reuse.py [--models vgg,resnet18,tv:resnet50,tv:mobilenet_v2]
        [--rounds 6] [--block 3] [--json OUT.json]

Both sessions load the same artifacts and train on the same batch in the same layout (the one
``--layout auto`` chose for the first). Rounds are interleaved, 0.3 s idle before each block; a
round's value is its block's median, the result the median over rounds with the min-max. The two
engines' losses and gradients are compared bit for bit on the batch first. The CPU heads the output.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import accelc
from accelc.runtime.config import ExecConfig
from accelc.runtime.session import TrainingSession

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import DEFAULT, build_module, cpu_info, interleaved  # noqa: E402


def no_reuse(sess: TrainingSession) -> None:
    """Take every donation back from the session's kernels (its runner exists: one step ran)."""
    for k in sess.runner.kernels.values():
        k.donate = ()


def run_model(name: str, rounds: int, block: int, work: Path) -> dict:
    batch, shape = DEFAULT.get(name, (16, (3, 64, 64)))
    onnx_path, art = work / f"{name.replace(':', '_')}.onnx", work / f"{name.replace(':', '_')}-art"
    accelc.export(build_module(name), torch.zeros(2, *shape), onnx_path)
    accelc.compile(onnx_path, art)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *shape)).astype(np.float32)
    y = rng.integers(0, 10, batch)
    on = TrainingSession(art)
    on.train_step(x, y)
    layout = on.engine_report()["layout"]["layout"] or "nchw"
    off = TrainingSession(art, ExecConfig(layout=layout))
    off.train_step(x, y)
    no_reuse(off)
    # the same weights: the forward and backward of both on one batch, bit for bit
    r_on, g_on = on._forward_backward(x, y), {k: v.clone() for k, v in on.grads.items()}
    r_off, g_off = off._forward_backward(x, y), {k: v.clone() for k, v in off.grads.items()}
    same_weights = all(torch.equal(on.params[k], off.params[k]) for k in on.params)
    bit_equal = r_on.loss == r_off.loss and all(torch.equal(g_on[k], g_off[k]) for k in g_on)
    before = {k.key: k.in_place for k in on.runner.kernels.values()}
    on._forward_backward(x, y)
    in_place = sum(k.in_place - before[k.key] for k in on.runner.kernels.values())
    rows = interleaved({"reuse off": off, "reuse on (default)": on}, x, y, rounds, block, "reuse off", "x_off")
    return {
        "batch": batch,
        "shape": list(shape),
        "layout": layout,
        "in_place_per_step": in_place,
        "kernels": len(on.runner.kernels),
        "bit_equal": bool(bit_equal and same_weights),
        "rows": rows,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vgg,resnet18,tv:resnet50,tv:mobilenet_v2", help="comma-separated")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default 6)")
    ap.add_argument("--block", type=int, default=3, help="timed steps per round and engine (default 3)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args(argv)
    cpu = cpu_info()
    print(f"CPU: {cpu}")
    out = {"cpu": cpu, "command": "python benchmarks/buffer_reuse.py " + " ".join(argv or sys.argv[1:]), "models": {}}
    with tempfile.TemporaryDirectory() as d:
        for name in a.models.split(","):
            r = out["models"][name] = run_model(name, a.rounds, a.block, Path(d))
            print(
                f"{name} (b{r['batch']}, {'x'.join(map(str, r['shape']))}, {r['layout']}): "
                f"{r['in_place_per_step']} of {r['kernels']} kernels in place per step, bit-equal {r['bit_equal']}"
            )
            for label, row in r["rows"].items():
                print(f"  {label:20s} {row['ms']:8.1f} ms ({row['min']}-{row['max']})  {row['x_off']:.3f}x off")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
