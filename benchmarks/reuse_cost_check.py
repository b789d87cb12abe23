"""The reuse time cost model (passes/reuse/predict.py) against measurement, layer by layer.

For each workload of the protocol (benchmarks/workloads.json: the zoo model at its input size,
Fashion-MNIST, batch 64) every reusable conv is compiled as a reuse candidate and measured the way
``--reuse-choose measured`` measures it at the start of training (choice.measure_layers: the
first training batch's activations, the native kernels against oneDNN and ORT, interleaved
medians). The model predicts the same layer (a) at the remain ratio the measurement found, which
isolates the time model, and (b) at the remain ratio it expects at compile time (uniform codes),
which is what ``accelc compile``/``inspect`` show. ``floor`` is the prediction at remain ratio 0.

    python benchmarks/reuse_cost_check.py [--repeats 5] [--settings 144x8,144x16] [--md docs/reuse-cost-model.md]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

import accelc
from accelc.passes.reuse import choice as ch
from accelc.passes.reuse import predict as P
from accelc.passes.reuse.cost import expected_remain
from accelc.passes.reuse.rewrite import reused_layers, strip
from accelc.runtime.data import load_data
from accelc.runtime.session import TrainingSession
from accelc.zoo import export_zoo

HERE = Path(__file__).resolve().parent


def run(repeats: int, settings: list, batch: int = 64) -> dict:
    work = json.loads((HERE / "workloads.json").read_text())["workloads"]
    prof = P.profile()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, wl in work.items():
            shape = tuple(int(v) for v in wl["input_shape"].split(","))
            d = Path(tmp) / name
            d.mkdir()
            export_zoo(wl["model"], d / "m.onnx", input_shape=shape)
            accelc.compile(d / "m.onnx", d / "art", passes=["reuse"], batch_size=batch, lr=wl["lr"])
            sess = TrainingSession(d / "art")
            art = sess.artifacts
            cfgs = reused_layers(art.training)
            ds = load_data("fashion-mnist", sess.info.input_shape, 10, 512, 64)
            _, x, y = next(iter(ds.batches(0, batch, 0)))
            sites = ch.conv_sites(strip(art.training), set(cfgs))
            for L, H in settings:
                lay = {
                    k: {"L": L, "H": H, "scope": c["scope"], "input_grad": c["input_grad"], "seed": c["seed"]}
                    for k, c in cfgs.items()
                }
                meas = ch.measure_layers(art, sess.param_arrays(), x, y, lay, "native", None, repeats, 1, 300.0)
                for k, m in meas.items():
                    if m.get("failed"):
                        print(f"{name} {k}: not measured ({m['failed']})", file=sys.stderr)
                        continue
                    cfg = dict(
                        cfgs[k], L=min(L, cfgs[k]["geom"]["C"] * cfgs[k]["geom"]["kh"] * cfgs[k]["geom"]["kw"]), H=H
                    )
                    mask = sites[k]["mask"]
                    at_meas = P.predict_config(cfg, batch, m["remain_ratio"], mask, prof)
                    r_exp = expected_remain(cfg, batch)
                    at_exp = P.predict_config(cfg, batch, r_exp, mask, prof)
                    rows.append(_row(name, k, cfg["L"], H, m, at_meas, at_exp, r_exp))
    rows += micro(repeats, prof)
    return {"profile": prof, "batch": batch, "repeats": repeats, "rows": rows, "summary": summarise(rows)}


def _row(workload, layer, L, H, m, at_meas, at_exp, r_exp) -> dict:
    """One layer setting: the measurement ``m`` (choice.time_layer) against the model at the
    measured (``at_meas``) and the expected (``at_exp``, remain ``r_exp``) remain ratio; printed."""
    r = {
        "workload": workload,
        "layer": layer,
        "L": L,
        "H": H,
        "remain_measured": m["remain_ratio"],
        "remain_expected": r_exp,
        "reuse_ms": m["reuse_ms"],
        "onednn_ms": m["onednn_ms"],
        "exact_ms": m["exact_ms"],
        "exact_engine": m["exact_engine"],
        "pred_reuse_ms": at_meas["reuse_ms"],
        "pred_exact_ms": at_meas["exact_ms"],
        "pred_floor_ms": at_meas["floor_ms"],
        "pred_reuse_ms_expected": at_exp["reuse_ms"],
        "measured_speedup": m["exact_ms"] / m["reuse_ms"],
        "pred_speedup": at_meas["exact_ms"] / at_meas["reuse_ms"],
        "pred_speedup_expected": at_exp["exact_ms"] / at_exp["reuse_ms"],
        "phases_ms": at_meas["phases_ms"],
    }
    print(
        f"{workload[:14]:14s} {layer:16s} L{L}H{H} r {r['remain_measured']:.2f} "
        f"reuse {r['reuse_ms']:6.1f} pred {r['pred_reuse_ms']:6.1f} | oneDNN {r['onednn_ms']:6.1f} "
        f"pred {r['pred_exact_ms']:6.1f} | floor {r['pred_floor_ms']:6.1f}",
        flush=True,
    )
    return r


def micro(repeats: int, prof: dict) -> list:
    """The layer micro-benchmark's conv (64→128, 3×3, 32×32, batch 64, activations of real images:
    benchmarks/reuse_layer.py), where reuse can win, at coarse settings with both input gradients."""
    sys.path.insert(0, str(HERE))
    import torch
    from reuse_layer import activations

    from accelc.passes.reuse.spec import ConvGeom

    x = activations(64).numpy()
    geom = ConvGeom(C=64, Co=128, kh=3, kw=3, pads=(1, 1, 1, 1))
    w = (torch.randn(128, 64, 3, 3, generator=torch.Generator().manual_seed(0)) * (2.0 / 576) ** 0.5).numpy()
    rows = []
    for L, H, grad in ((144, 6, "cluster"), (144, 8, "cluster"), (144, 8, "exact"), (144, 16, "exact")):
        setting = {"L": L, "H": H, "scope": "image", "input_grad": grad, "seed": 1}
        m = ch.time_layer("micro", x, w, None, geom, setting, (True, True, True), "native", None, repeats, 1, 300.0)
        p = P.predict(geom, 64, (32, 32), L, H, grad, m["remain_ratio"], (True, True, True), prof)
        cfg = {
            "geom": {"C": 64, "Co": 128, "kh": 3, "kw": 3, "stride": [1, 1], "pads": [1, 1, 1, 1], "dilation": [1, 1]},
            "in_hw": [32, 32],
            "L": L,
            "H": H,
            "scope": "image",
            "input_grad": grad,
        }
        r_exp = expected_remain(cfg, 64)
        pe = P.predict(geom, 64, (32, 32), L, H, grad, r_exp, (True, True, True), prof)
        rows.append(_row("micro 64→128 32×32", f"dX {grad}", L, H, m, p, pe, r_exp))
    return rows


def _logerr(a, b) -> float:
    return abs(math.log(a / b))


def summarise(rows: list) -> dict:
    """Error of the model: median and largest |log(predicted / measured)| as a factor."""
    out = {}
    for key, pred, meas in (
        ("reuse", "pred_reuse_ms", "reuse_ms"),
        ("exact (oneDNN)", "pred_exact_ms", "onednn_ms"),
        ("speed-up", "pred_speedup", "measured_speedup"),
    ):
        e = [_logerr(r[pred], r[meas]) for r in rows]
        if e:
            out[key] = {"median_factor": float(math.exp(np.median(e))), "max_factor": float(math.exp(max(e)))}
    verdict = [(r["pred_speedup"] > 1) == (r["measured_speedup"] > 1) for r in rows]
    out["same_verdict"] = f"{sum(verdict)}/{len(verdict)}"
    floors = [r for r in rows if r["pred_floor_ms"] >= r["exact_ms"]]
    out["floor_above_measured_exact"] = f"{len(floors)}/{len(rows)}"
    out["floor_above_but_won"] = [f"{r['workload']}/{r['layer']}" for r in floors if r["measured_speedup"] > 1]
    return out


def markdown(res: dict, cmd: str) -> str:
    lines = [
        "# reuse: the time cost model against measurement",
        "",
        "`passes/reuse/predict.py` predicts how long a reused layer takes against the exact conv on the "
        "machine it runs on: every phase of the native kernels (hashing, numbering, centroid sums, "
        "centroid GEMMs, output gather, gradient sums, exact or per-cluster input gradient) is counted in "
        "its own unit from the layer's shape and setting, and multiplied by the seconds per unit a probe "
        "layer took on this machine (about half a second, once per process). `accelc compile` and "
        "`accelc inspect` print the prediction per layer at the expected remain ratio; the measured "
        "choice (`--reuse-choose measured`) uses it to leave out, without measuring, the layers that "
        "cannot win at any remain ratio (`--reuse-prefilter`, default 1.5: reuse's predicted time with "
        "no clusters at all ≥ 1.5 × margin × the predicted exact conv). This page checks the model "
        "against the measurement the choice makes, layer by layer.",
        "",
        f"`{cmd}` — batch {res['batch']}, {res['repeats']} interleaved rounds per layer, native kernels, "
        f"{res['profile']['probe']['threads']} threads. Machine profile (probe layer 64→64 3×3 16×16, batch 32), "
        "ms per phase: " + ", ".join(f"{k} {v:.1f}" for k, v in res["profile"]["probe_ms"].items()) + ".",
        "",
        "Predicted at the measured remain ratio (the time model alone) and at the expected one (what "
        "`accelc compile`/`inspect` show). Exact = oneDNN (the model predicts oneDNN; the measured "
        "baseline of the choice is the faster of oneDNN and ORT).",
        "",
        "| workload | layer | L×H | remain meas. / exp. | reuse ms meas. | pred. | oneDNN ms meas. | pred. | "
        "speed-up meas. | pred. | pred. at exp. | floor ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['workload']} | {r['layer']} | {r['L']}×{r['H']} | {r['remain_measured']:.2f} / {r['remain_expected']:.2f} "
            f"| {r['reuse_ms']:.1f} | {r['pred_reuse_ms']:.1f} | {r['onednn_ms']:.1f} | {r['pred_exact_ms']:.1f} "
            f"| {r['measured_speedup']:.2f} | {r['pred_speedup']:.2f} | {r['pred_speedup_expected']:.2f} "
            f"| {r['pred_floor_ms']:.1f} |"
        )
    s = res["summary"]
    lines += ["", "Model error (|log(predicted / measured)| as a factor):", ""]
    for k in ("reuse", "exact (oneDNN)", "speed-up"):
        if k in s:
            lines.append(f"* {k}: median ×{s[k]['median_factor']:.2f}, largest ×{s[k]['max_factor']:.2f}")
    lines.append(f"* same verdict (faster or not) as the measurement: {s['same_verdict']}")
    lines.append(
        f"* floor (reuse at remain ratio 0) at or above the measured exact time: {s['floor_above_measured_exact']}"
        f"; of those, measured faster reused: {', '.join(s['floor_above_but_won']) or 'none'}"
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--settings", default="144x8", help="L×H settings, e.g. 144x8,144x16")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--md", help="write the markdown table here")
    a = ap.parse_args()
    settings = [tuple(int(v) for v in s.split("x")) for s in a.settings.split(",")]
    res = run(a.repeats, settings)
    print(json.dumps(res["summary"], indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    if a.md:
        Path(a.md).write_text(markdown(res, "python benchmarks/" + " ".join([Path(sys.argv[0]).name] + sys.argv[1:])))


if __name__ == "__main__":
    main()
