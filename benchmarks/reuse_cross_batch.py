"""Cluster reuse across batches (CR, passes/reuse/cross.py): the layer, then the whole network.

Layer: the micro-benchmark's conv (64→128, 3×3, pad 1, batch 64, activations of real images:
benchmarks/reuse_layer.py). Batch A (images 0–63) builds the table, batch B (images 64–127) is
the measured step: with CR its rows use A's centroids where their code is kept. Against the
exact conv on B: output error ‖Y − Y_exact‖/‖Y_exact‖ and weight-gradient error (same dY).
Forward + backward (exact input gradient), 7 rounds interleaved with oneDNN's exact conv,
medians; the refresh step (a batch that rebuilds the table) is timed too, and a CR layer's time
per step is (refresh + (K−1)·reuse step)/K.

Network: the zoo VGG at 32×32 on Fashion-MNIST (4,000 training and 2,000 test images, 2 epochs,
batch 64, lr 0.001, seed 0), every candidate layer reused (``choose=all``) within the image,
within the batch, and across batches (K = 8); plain ORT alongside; training seconds, remain
ratio, share of rows in kept clusters and test accuracy per epoch (nothing is tuned on it).

    python benchmarks/reuse_cross_batch.py [--rounds 7] [--epochs 2] [--skip-network] [--md docs/reuse-cross-batch.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from reuse_layer import activations  # noqa: E402

from accelc.passes.reuse import cross  # noqa: E402
from accelc.passes.reuse.node import reuse_backward, reuse_forward  # noqa: E402
from accelc.passes.reuse.spec import ConvGeom, ReuseSpec, make_planes  # noqa: E402
from accelc.runtime.torch_ops import Conv2d  # noqa: E402

K_DEFAULT = 8


def _err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def layer(rounds: int, every: int = K_DEFAULT) -> list:
    from accelc.passes.reuse.choice import conv_node

    acts = activations(128)
    xa, xb = acts[:64].contiguous(), acts[64:].contiguous()
    geom = ConvGeom(C=64, Co=128, kh=3, kw=3, pads=(1, 1, 1, 1))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 64, 3, 3, generator=g) * (2.0 / 576) ** 0.5
    b = torch.zeros(128)
    dy = torch.randn(64, 128, 32, 32, generator=g) * (1.0 / 128**0.5)
    conv = Conv2d(conv_node(geom))
    with torch.no_grad():
        y_exact = conv.forward(xb, w, b)
        _, dw_exact, _ = conv.backward(dy, xb, w, [False, True, False])
    configs = []
    for H in (8, 12):
        configs += [("image", H, 0), ("batch", H, 0), ("batch", H, every)]
    runs = {}
    for scope, H, k in configs:
        spec = ReuseSpec(144, H, scope, "exact")
        planes = torch.from_numpy(make_planes(spec.chunks(geom.K), 144, H, 1))
        name = f"{'CR K=' + str(k) if k else 'scope ' + scope}, H={H}"

        def step(spec=spec, planes=planes, k=k, table=None):
            if k:
                y, ctx = cross.forward(xb, w, b, planes, geom, spec, table)
            else:
                y, ctx = reuse_forward(xb, w, b, planes, geom, spec)
            _, dw, _ = reuse_backward(dy, xb, w, ctx, geom, spec)
            return y, ctx, dw

        runs[name] = (step, k, spec, planes)
    times = {n: [] for n in runs} | {"exact (oneDNN)": []}
    refresh = {n: [] for n, r in runs.items() if r[1]}
    out = {}
    with torch.no_grad():
        for rnd in range(1 + rounds):
            t = time.perf_counter()
            conv.forward(xb, w, b)
            conv.backward(dy, xb, w, [True, True, True])
            if rnd:
                times["exact (oneDNN)"].append(time.perf_counter() - t)
            for n, (step, k, spec, planes) in runs.items():
                table = None
                if k:
                    table = cross.ClusterTable(k)
                    t = time.perf_counter()
                    cross.forward(xa, w, b, planes, geom, spec, table)  # batch A builds the table
                    if rnd:
                        refresh[n].append(time.perf_counter() - t)
                t = time.perf_counter()
                y, ctx, dw = step(table=table)
                if rnd:
                    times[n].append(time.perf_counter() - t)
                if rnd == rounds:
                    kept = table.stats["rows_kept"] / table.stats["rows"] * 2 if k else None  # B's rows
                    out[n] = {
                        "remain_ratio": ctx.remain_ratio,
                        "error": _err(y, y_exact),
                        "dw_error": _err(dw, dw_exact),
                        "rows_in_kept_clusters": kept,
                    }
    exact_ms = float(np.median(times["exact (oneDNN)"]) * 1e3)
    rows = [{"config": "exact (oneDNN)", "ms": exact_ms, "step_ms": exact_ms}]
    for n, (_, k, _, _) in runs.items():
        ms = float(np.median(times[n]) * 1e3)
        r = {"config": n, "ms": ms, **out[n]}
        if k:
            r["refresh_ms"] = float(np.median(refresh[n]) * 1e3)
            # the refresh runs the table's forward only; its step adds the same backward as a reuse step
            r["step_ms"] = (r["refresh_ms"] + ms + (k - 1) * ms) / k
        else:
            r["step_ms"] = ms
        r["speedup"] = exact_ms / r["step_ms"]
        rows.append(r)
        print(json.dumps(r), flush=True)
    return rows


def network(epochs: int) -> list:
    import accelc
    from accelc.zoo import export_zoo

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        export_zoo("vgg", d / "m.onnx", input_shape=(1, 32, 32))
        configs = {
            "ort": None,
            "reuse, scope image": {"choose": "all"},
            "reuse, scope batch": {"choose": "all", "scope": "batch"},
            f"reuse, CR K={K_DEFAULT}": {"choose": "all", "scope": "batch", "cross_batch": K_DEFAULT},
        }
        for name, opts in configs.items():
            art = d / f"art-{len(rows)}"
            accelc.compile(
                d / "m.onnx",
                art,
                ["reuse"] if opts else [],
                pass_options={"reuse": opts} if opts else None,
                lr=0.001,
                validate_result=False,
            )
            s = accelc.train(
                art,
                data="fashion-mnist",
                epochs=epochs,
                batch_size=64,
                train_limit=4000,
                test_limit=2000,
                run_dir=d / f"run-{len(rows)}",
                progress=False,
                seed=0,
            )
            hist = [json.loads(x) for x in (d / f"run-{len(rows)}" / "metrics.jsonl").read_text().splitlines()]
            per = []
            for m in hist:
                lay = m.get("reuse") or {}
                rem = [v["remain_ratio"] for v in lay.values() if v.get("remain_ratio") is not None]
                kept = [v["rows_in_kept_clusters"] for v in lay.values() if v.get("rows_in_kept_clusters") is not None]
                per.append(
                    {
                        "epoch": m["epoch"],
                        "train_time": m.get("train_time"),
                        "test_acc": m.get("test_acc"),
                        "remain_ratio": float(np.mean(rem)) if rem else None,
                        "rows_in_kept_clusters": float(np.mean(kept)) if kept else None,
                    }
                )
            rows.append({"config": name, "train_time": s.get("train_time"), "epochs": per})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(layer_rows: list, net_rows: list, cmd: str) -> str:
    lines = ["# reuse: clusters kept across batches (CR)", "", f"`{cmd}`", ""]
    if layer_rows:
        lines += [
            "## The layer (64→128, 3×3, 32×32, batch 64, real activations; table from batch A, step on batch B)",
            "",
            "| config | fwd+bwd ms | refresh fwd ms | per step ms | × vs oneDNN | remain ratio | rows in kept clusters "
            "| output error | dW error |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in layer_rows:
            if r["config"].startswith("exact"):
                lines.append(f"| {r['config']} | {r['ms']:.1f} | | {r['step_ms']:.1f} | 1.00 | 1 | | 0 | 0 |")
                continue
            kept = "" if r.get("rows_in_kept_clusters") is None else f"{r['rows_in_kept_clusters']:.3f}"
            ref = f"{r['refresh_ms']:.1f}" if "refresh_ms" in r else ""
            lines.append(
                f"| {r['config']} | {r['ms']:.1f} | {ref} | {r['step_ms']:.1f} | {r['speedup']:.2f} "
                f"| {r['remain_ratio']:.4f} | {kept} | {r['error']:.3f} | {r['dw_error']:.3f} |"
            )
    if net_rows:
        lines += [
            "",
            "## The network (zoo VGG 32×32, Fashion-MNIST 4,000 train / 2,000 test, batch 64, every candidate layer reused)",
            "",
            "| config | epoch | training time so far (s) | remain ratio | rows in kept clusters | test acc |",
            "|---|---|---|---|---|---|",
        ]
        for r in net_rows:
            for e in r["epochs"]:

                def f(v, p=3):
                    return "" if v is None else f"{v:.{p}f}"

                lines.append(
                    f"| {r['config']} | {e['epoch']} | {f(e['train_time'], 1)} | {f(e['remain_ratio'])} "
                    f"| {f(e['rows_in_kept_clusters'])} | {f(e['test_acc'], 4)} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--skip-network", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--md")
    a = ap.parse_args()
    lr = layer(a.rounds)
    nr = [] if a.skip_network else network(a.epochs)
    if a.json:
        Path(a.json).write_text(json.dumps({"layer": lr, "network": nr}, indent=1))
    if a.md:
        Path(a.md).write_text(
            markdown(lr, nr, "python benchmarks/" + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]))
        )


if __name__ == "__main__":
    main()
