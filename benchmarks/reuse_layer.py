"""Layer micro-benchmark of adaptive deep reuse against ORT's Conv + ConvGrad (issue 5).

One 64→128, 3×3, pad 1 convolution on 64×32×32 activations from real images: Fashion-MNIST
pictures (resized to 32×32) through a seeded 1→64 3×3 conv, batch-normalised, ReLU. Times are
medians of ``--repeats`` runs, all in this one process on this machine:

* ORT: the layer's Conv and ORT Training's ConvGrad (dX, dW, dB) in one InferenceSession;
* torch (oneDNN) conv forward + convolution_backward, for reference;
* reuse (accelc native kernels): hash + cluster + forward, then backward with the exact input
  gradient (default) and with the per-cluster one, at remain ratios near 0.05, 0.1 and 0.3.

Output error = ‖Y_reuse − Y‖/‖Y‖, weight-gradient error = ‖dW_reuse − dW‖/‖dW‖. Speed-ups are
medians over interleaved rounds of (ORT time / reuse time) within the same round.

    python benchmarks/reuse_layer.py [--batch 64] [--repeats 5] [-o docs/reuse_layer.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from accelc.passes.reuse import native as rn
from accelc.passes.reuse.algorithm import conv_layer_model
from accelc.passes.reuse.node import reuse_backward, reuse_forward
from accelc.passes.reuse.spec import ConvGeom, ReuseSpec, make_planes
from accelc.runtime.data import fashion_mnist, resize

SETTINGS = [(144, 6), (144, 8), (144, 16)]  # (L, H) giving remain ratios near 0.05, 0.1, 0.3 here


def activations(n: int) -> torch.Tensor:
    xtr = fashion_mnist()[0][:n]
    img = torch.from_numpy(np.ascontiguousarray(resize(xtr, (32, 32)), dtype=np.float32))
    img = (img - img.mean()) / img.std()
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(64, 1, 3, 3, generator=g) * (2 / 9) ** 0.5
    a = torch.nn.functional.conv2d(img, w1, padding=1)
    a = (a - a.mean((0, 2, 3), keepdim=True)) / a.std((0, 2, 3), keepdim=True)
    return torch.relu(a).contiguous()


def median_ms(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts) * 1e3)


def ort_session(threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    model = conv_layer_model((1, 1, 1, 1), (3, 3), (1, 1), (1, 1))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("-o", "--output", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    threads = torch.get_num_threads()
    x = activations(a.batch)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(128, 64, 3, 3, generator=g) * (2 / 576) ** 0.5
    b = torch.zeros(128)
    geom = ConvGeom(64, 128, 3, 3, (1, 1), (1, 1, 1, 1))
    y_ref = torch.nn.functional.conv2d(x, w, b, padding=1)
    dy = torch.randn(y_ref.shape, generator=g) / y_ref.numel() ** 0.5
    _, dw_ref, _ = torch.ops.aten.convolution_backward(
        dy, x, w, [128], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, True]
    )
    feeds = {"X": x.numpy(), "W": w.numpy(), "B": b.numpy(), "dY": dy.numpy()}
    sess = ort_session(threads)
    res = {
        "machine": f"{platform.processor() or platform.machine()}, {threads} threads",
        "batch": a.batch,
        "layer": "64->128 3x3 pad 1 on 64x32x32",
        "repeats": a.repeats,
        "native_kernels": rn.available(),
    }

    # Everything is timed in interleaved rounds (ORT, torch, every reuse setting, then again), and
    # each reuse time is compared with the ORT time of its own round: this machine is shared, and
    # its speed drifts by tens of percent within a minute.
    def ort_step():
        sess.run(["Y", "dX", "dW", "dB"], feeds)

    def torch_step():
        torch.nn.functional.conv2d(x, w, b, padding=1)
        torch.ops.aten.convolution_backward(
            dy, x, w, [128], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, True]
        )

    cases = []
    for L, H in SETTINGS:
        for ig in ("exact", "cluster"):
            spec = ReuseSpec(L, H, "image", ig)
            planes = torch.from_numpy(make_planes(spec.chunks(geom.K), L, H, seed=0))
            y, ctx = reuse_forward(x, w, b, planes, geom, spec)
            _, dw, _ = reuse_backward(dy, x, w, ctx, geom, spec)

            def step(spec=spec, planes=planes):
                _, cc = reuse_forward(x, w, b, planes, geom, spec)
                reuse_backward(dy, x, w, cc, geom, spec)

            cases.append(
                (
                    spec,
                    planes,
                    step,
                    {
                        "L": L,
                        "H": H,
                        "input_grad": ig,
                        "remain_ratio": ctx.remain_ratio,
                        "output_error": float((y - y_ref).norm() / y_ref.norm()),
                        "dW_error": float((dw - dw_ref).norm() / dw_ref.norm()),
                    },
                )
            )
    fns = [ort_step, torch_step] + [c[2] for c in cases]
    for f in fns:  # warm-up
        f()
    times = [[] for _ in fns]
    for _ in range(a.repeats):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            f()
            times[i].append((time.perf_counter() - t) * 1e3)
    res["ort_ms"] = float(np.median(times[0]))
    res["torch_ms"] = float(np.median(times[1]))
    rows = []
    for k, (spec, planes, _, row) in enumerate(cases):
        t = times[2 + k]
        row.update(
            {
                "fwd_bwd_ms": float(np.median(t)),
                "speedup_vs_ort": float(np.median([o / r for o, r in zip(times[0], t)])),
                "speedup_vs_torch": float(np.median([o / r for o, r in zip(times[1], t)])),
            }
        )
        rows.append(row)
        print(
            f"L={row['L']:4d} H={row['H']:2d} dX={row['input_grad']:7s} remain={row['remain_ratio']:.3f} "
            f"out_err={row['output_error']:.3f} dW_err={row['dW_error']:.3f} fwd+bwd={row['fwd_bwd_ms']:6.1f} ms "
            f"speed-up vs ORT {row['speedup_vs_ort']:.2f}x (median of paired rounds), vs torch "
            f"{row['speedup_vs_torch']:.2f}x",
            flush=True,
        )
    res["reuse"] = rows
    print(f"ORT Conv+ConvGrad {res['ort_ms']:.1f} ms, torch conv fwd+bwd {res['torch_ms']:.1f} ms")
    if a.output:
        from accelc.compiler.fileio import atomic_write_text

        atomic_write_text(a.output, json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
