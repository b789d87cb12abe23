"""Model coverage: torchvision's and timm's classification CNNs through accelc, as a user would.

For every model (random weights, 10 classes, a small input): export in training mode, compile
with the default passes and with each of skip, reuse and rescale, compare loss and gradients with
torch autograd on one batch (float32, and float64 to judge where float32 itself is
ill-conditioned), train a few steps in accelc's runtime in lockstep with torch eager (same
weights, data and AdamW), and check that every parameter torch trains is trained. Dropout and
stochastic depth are set to 0 before export (their random masks cannot match torch's);
tests/test_models.py covers them active.

Each model runs in a subprocess of its own (a native crash is one row, not the end of the run;
peak memory is the model's own). Writes a JSON file and a markdown table.

    python benchmarks/model_coverage.py                       # every model -> docs/results/model-coverage.md
    python benchmarks/model_coverage.py --models tv:squeezenet1_0,timm:resnet10t -o /tmp/cov

torchvision's wheel for torch 2.13 is a CUDA build whose compiled ops cannot load beside the CPU
torch; classification models need none of them. :func:`torchvision_without_ops` defines the two
op schemas its Python side registers fake kernels for, so ``import torchvision`` works (the
models then build from torchvision's own code; its detection ops stay unavailable).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

from accelc.torch_baseline import torchvision_without_ops  # noqa: F401  (also used by tests/test_coverage.py)

# (library, name, input size): every model fits 2 cores at these sizes; AlexNet and VGG need
# 224x224 for their adaptive pooling to export
MODELS = [
    ("tv", "resnet18", 64),
    ("tv", "mobilenet_v2", 64),
    ("tv", "mobilenet_v3_small", 64),
    ("tv", "squeezenet1_0", 64),
    ("tv", "shufflenet_v2_x0_5", 64),
    ("tv", "densenet121", 64),
    ("tv", "googlenet", 64),
    ("tv", "mnasnet0_5", 64),
    ("tv", "regnet_y_400mf", 64),
    ("tv", "efficientnet_b0", 64),
    ("tv", "convnext_tiny", 64),
    ("tv", "alexnet", 224),
    ("tv", "vgg11_bn", 224),
    ("timm", "resnet10t", 64),
    ("timm", "mobilenetv3_small_050", 64),
    ("timm", "ghostnet_100", 64),
    ("timm", "rexnet_100", 64),
    ("timm", "convnext_atto", 64),
    ("timm", "efficientnet_b0", 64),
    ("timm", "regnetx_002", 64),
    # families added by issue 32: mixed-kernel grouped convs (123 convs), multi-scale residual
    # blocks, deep layer aggregation, cross-stage partial, split attention (shape arithmetic)
    ("timm", "mixnet_s", 64),
    ("timm", "res2net50_26w_4s", 64),
    ("timm", "dla34", 64),
    ("timm", "cspresnet50", 64),
    ("timm", "resnest14d", 64),
]
SMALL = ["tv:squeezenet1_0", "tv:mobilenet_v3_small", "timm:resnet10t"]  # what CI runs
PASSES = ("none", "skip", "reuse", "rescale", "all")
PASS_LISTS = {"none": [], "all": ["rescale", "reuse", "skip"]}  # otherwise the pass alone
BATCH = 4
STEPS = 3


def build(lib: str, name: str):
    import torch

    torchvision_without_ops()
    torch.manual_seed(0)
    if lib == "tv":
        import torchvision

        kw = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
        module = getattr(torchvision.models, name)(weights=None, num_classes=10, **kw)
    else:
        import timm

        module = timm.create_model(name, pretrained=False, num_classes=10)
    for m in module.modules():  # dropout masks cannot match torch's: compare without them
        if isinstance(m, torch.nn.Dropout) or type(m).__name__ == "StochasticDepth":  # torchvision's
            m.p = 0.0
        if hasattr(m, "drop_rate"):
            m.drop_rate = 0.0
    return module.train()


def off_gradients(ours: dict, t32: dict, t64: dict, tol: float = 1e-4) -> dict:
    """Gradients of ours that are off: each is compared with torch float32 (relative ``tol``, 1e-6
    absolute, for gradients zero in exact arithmetic). Where float32 itself is ill-conditioned (a
    BatchNorm over few values, a ReLU input within rounding of 0: torch float32 is then far from
    torch float64 too), the judge is float64: ours may be off float64 by no more than ``tol`` plus
    twice torch float32's own error. Returns {name: error vs the judge}. (The tests use it too.)"""
    bad = {}
    for k, g64 in t64.items():
        g, g32 = np.asarray(ours[k], np.float64), np.asarray(t32[k], np.float64)
        if np.linalg.norm(g - g32) <= tol * np.linalg.norm(g32) + 1e-6:
            continue
        e_ours, e_t32 = np.linalg.norm(g - g64), np.linalg.norm(g32 - g64)
        if e_ours > tol * np.linalg.norm(g64) + 2 * e_t32 + 1e-6:
            bad[k] = float(e_ours / max(np.linalg.norm(g64), 1e-30))
    return bad


def _rel(a, b, floor: float) -> float:
    """Relative error; ``floor`` (1e-4 of the model's largest gradient norm) keeps gradients that
    are zero in exact arithmetic from dividing by rounding noise."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), floor, 1e-30))


def _torch_grads(module, x, y, dtype, channels_last: bool = False):
    import torch
    import torch.nn.functional as F

    m = copy.deepcopy(module).to(dtype)
    xt = torch.from_numpy(x).to(dtype)
    if channels_last:  # another valid order of float32's sums
        m, xt = m.to(memory_format=torch.channels_last), xt.contiguous(memory_format=torch.channels_last)
    loss = F.cross_entropy(m(xt), torch.from_numpy(y))
    loss.backward()
    return float(loss), {k: p.grad.numpy() for k, p in m.named_parameters() if p.grad is not None}


def _outcome(fn):
    """(status, detail, seconds): ok / refused (accelc's one-line reason) / internal error."""
    from accelc.compiler.errors import AccelcError

    t0 = time.perf_counter()
    try:
        detail = fn()
        return "ok", detail, time.perf_counter() - t0
    except AccelcError as e:
        return "refused", str(e), time.perf_counter() - t0
    except Exception as e:  # an internal error: what this suite exists to find
        return "error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", time.perf_counter() - t0


def run_model(lib: str, name: str, size: int, work: Path, runs: str = "every", passes_run=PASSES) -> dict:
    import torch

    import accelc
    from accelc.compiler.artifact_dir import load_artifacts
    from accelc.runtime.session import TrainingSession
    from accelc.runtime.torch_engine import TorchSession

    torch.set_num_threads(1)
    row = {"model": f"{lib}:{name}", "input": f"3x{size}x{size}"}
    module = build(lib, name)
    torch_params = [k for k, p in module.named_parameters() if p.requires_grad]
    row["params"] = int(sum(p.numel() for p in module.parameters()))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, 3, size, size)).astype(np.float32)
    y = rng.integers(0, 10, BATCH).astype(np.int64)
    onnx_path = work / "m.onnx"
    row["export"] = _outcome(lambda: accelc.export(copy.deepcopy(module), torch.zeros(2, 3, size, size), onnx_path))
    if row["export"][0] != "ok":
        return row
    for passes in [p for p in PASSES if p in passes_run]:
        art = work / f"art-{passes}"
        names = PASS_LISTS.get(passes, [passes])
        # the passes' defaults (rescale's ramp ends every run at full size, so the run below exports it)
        status = _outcome(lambda: accelc.compile(onnx_path, art, passes=names, force=True))
        row[f"compile:{passes}"] = status[:1] + (status[1] if status[0] != "ok" else "",) + status[2:]
        if status[0] != "ok":
            continue
        report = status[1]
        if passes == "none":
            frozen = sorted(set(torch_params) - set(report["model"]["params"]))
            row["frozen_silently"] = [f for f in frozen if not any(f in w for w in report["warnings"])]
            row["frozen_reported"] = [f for f in frozen if f not in row["frozen_silently"]]

            def gradients():
                from accelc.runtime.config import ExecConfig

                sess = TrainingSession(art)
                loss, grads, _ = sess.compute_gradients(x, y)
                engine = sess.engine_report()
                # the same batch with the whole step on ORT Training's kernels (the reference engine)
                ort_loss, ort_grads, _ = TrainingSession(art, ExecConfig(kernels={"all": "ort"})).compute_gradients(
                    x, y
                )
                tl32, t32 = _torch_grads(module, x, y, torch.float32)
                _, t32cl = _torch_grads(module, x, y, torch.float32, channels_last=True)
                _, t64 = _torch_grads(module, x, y, torch.float64)
                common = [k for k in t32 if k in grads]
                floor = 1e-4 * max(np.linalg.norm(t64[k]) for k in common)
                ours = {k: grads[k] for k in common}
                ref64 = {k: t64[k] for k in common}
                # each parameter is judged against both of torch's float32 orders: a ReLU6 or ReLU
                # input within rounding of its kink flips a mask in one order and not in another,
                # and every gradient before it follows; off only where off against both
                off_each = [set(off_gradients(ours, t, ref64)) for t in (t32, t32cl)]
                return {
                    "loss_diff": abs(loss - tl32),
                    "max_rel_err_vs_torch32": max(_rel(grads[k], t32[k], floor) for k in common),
                    "max_rel_err_vs_float64": max(_rel(grads[k], t64[k], floor) for k in common),
                    "torch32_vs_float64": max(_rel(t[k], t64[k], floor) for t in (t32, t32cl) for k in common),
                    "torch32_orders": max(_rel(t32cl[k], t32[k], floor) for k in common),
                    "off": sorted(off_each[0] & off_each[1]),
                    "off_one_order": sorted(off_each[0] ^ off_each[1]),
                    "ort_segments": engine.get("ort_segments"),
                    "fell_back": engine.get("fell_back", {}),
                    "eval_engine": engine.get("eval"),
                    "vs_ort_loss_diff": abs(loss - ort_loss),
                    "vs_ort_max_rel_err": max(_rel(grads[k], ort_grads[k], floor) for k in common),
                    "ort_max_rel_err_vs_float64": max(_rel(ort_grads[k], t64[k], floor) for k in common),
                }

            row["gradients"] = _outcome(gradients)

            def lockstep():
                sess = TrainingSession(art)
                ref = TorchSession(copy.deepcopy(module), sess.hyper, sess.lr)
                # torch against itself in another valid float32 order: the floor of the comparison
                # (AdamW's normalised steps grow rounding differences in ill-conditioned models)
                other = TorchSession(copy.deepcopy(module).to(memory_format=torch.channels_last), sess.hyper, sess.lr)
                diffs, floor = [], []
                for s in range(STEPS):
                    xs = rng.standard_normal((BATCH, 3, size, size)).astype(np.float32)
                    ys = rng.integers(0, 10, BATCH).astype(np.int64)
                    want = ref.train_step(xs, ys).loss
                    diffs.append(abs(sess.train_step(xs, ys).loss - want))
                    floor.append(abs(other.train_step(xs, ys).loss - want))
                return {"max_loss_diff": max(diffs), "torch_orders_loss_diff": max(floor), "steps": STEPS}

            row["lockstep"] = _outcome(lockstep)
        else:

            def train_steps():
                a, _ = load_artifacts(art)
                out = {}
                for label, variant in [("full", a)] + [(k, v) for k, v in a.stages.items()]:
                    sess = TrainingSession(variant)
                    shape = variant.info.input_shape
                    xs = rng.standard_normal((BATCH, *shape)).astype(np.float32)
                    losses = [sess.train_step(xs, y).loss for _ in range(2)]
                    if not all(np.isfinite(losses)):
                        raise RuntimeError(f"non-finite loss {losses} ({label})")
                    out[label] = losses[-1]
                return out

            row[f"train:{passes}"] = _outcome(train_steps)

            def run_resume_export():
                """As a user goes on: train two epochs, resume for a third, export the trained model;
                plain onnxruntime runs it."""
                import onnxruntime as ort

                run, exported = work / f"run-{passes}", work / f"model-{passes}.onnx"
                kw = {"batch_size": BATCH, "run_dir": run, "progress": False, "force": True}
                accelc.train(art, "synthetic:8", epochs=2, **kw)
                kw.pop("force")
                s = accelc.train(art, "synthetic:8", epochs=3, resume=True, allow_change=["epochs"], **kw)
                out = accelc.export_run(run, exported, force=True)
                logits = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"]).run(
                    None, {out["input"]["name"]: x[:2]}
                )[0]
                if s.get("epochs") != 3 or not np.isfinite(logits).all():
                    raise RuntimeError(
                        f"resumed to {s.get('epochs')} epochs; exported logits finite: {np.isfinite(logits).all()}"
                    )
                return {"variant": out.get("trained_variant"), "epochs": s.get("epochs")}

            if runs == "every" or passes == runs:
                row[f"run:{passes}"] = _outcome(run_resume_export)
    return row


def child(spec: str, out: str, runs: str = "every", passes_run=PASSES) -> None:
    lib, name, size = spec.split(":")
    with tempfile.TemporaryDirectory(prefix="accelc-cov-") as d:
        try:
            row = run_model(lib, name, int(size), Path(d), runs, passes_run)
        except Exception as e:
            row = {"model": f"{lib}:{name}", "fatal": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out).write_text(json.dumps(row, default=str))


def markdown(rows: list[dict], seconds: float) -> str:
    def cell(v):
        if v is None:
            return "—"
        status, detail, secs = v[0], v[1], v[2]
        if status == "ok":
            return f"ok ({secs:.0f} s)"
        return f"{status}: {str(detail).replace('|', '/')[:140]}"

    lines = [
        "# Model coverage: torchvision and timm CNNs through accelc",
        "",
        f"`python benchmarks/model_coverage.py` on {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
        f"{seconds / 60:.1f} min. Random weights, 10 classes, batch {BATCH}, dropout and stochastic depth 0. Gradients: accelc's "
        f"default compile against torch autograd on the same weights and batch (max relative error over "
        f"parameters, against float32 and float64, norms below 1e-4 of the largest gradient's counted from that "
        f"floor; 'judged ok': every gradient within 1e-4 of torch float32, "
        f"or no further from float64 than twice torch float32's own error, judged per parameter against "
        f"each of torch's two float32 orders (contiguous, channels-last): off only where off against "
        f"both). Lockstep: {STEPS} AdamW steps "
        f"in accelc's runtime and torch eager, largest loss difference; in brackets torch eager against "
        f"itself with channels-last weights (another valid float32 order), the floor of that comparison. Passes "
        f"(`all`: rescale,reuse,skip): compile (its seconds), two training steps of every variant (and stage) in "
        f"accelc's runtime, then a run as a user makes one: `accelc.train` two epochs, resume it for a third, "
        f"`export_run` the trained model and run it in plain onnxruntime (the run's seconds). Engine: accelc's default (every op on "
        f"its ATen kernels; 'ORT segments' counts the parts of the step still left to ORT, and which ops), "
        f"against the same batch with the whole step on ORT Training's kernels (`--kernel all=ort`), and ORT's own "
        f"distance from float64 beside it.",
        "",
        "| model | input | params | export | compile | gradients (vs f32 / vs f64 / torch f32 vs f64, worse order) | judged | "
        "ORT segments per step (fell back) | vs `--kernel all=ort` (Δloss / grad; ORT vs f64) | "
        "lockstep max Δloss (torch vs torch, other order) | frozen silently | skip | reuse | rescale | all | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "fatal" in r:
            lines.append(f"| {r['model']} | fatal: {r['fatal'][:200]} |" + " |" * 14)
            continue
        g = r.get("gradients")
        if g and g[0] == "ok":
            gd = g[1]
            gtxt = (
                f"{gd['max_rel_err_vs_torch32']:.1e} / {gd['max_rel_err_vs_float64']:.1e} / "
                f"{gd['torch32_vs_float64']:.1e}"
            )
            judged = "ok" if not gd["off"] else f"off: {', '.join(gd['off'][:3])}"
            if not gd["off"] and gd.get("off_one_order"):
                judged = (
                    f"ok ({len(gd['off_one_order'])} within one torch order only; torch's orders differ by "
                    f"{gd['torch32_orders']:.1e})"
                )
            fb = ", ".join(f"{k}×{v}" for k, v in sorted(gd.get("fell_back", {}).items()))
            segtxt = f"{gd.get('ort_segments')}" + (f" ({fb})" if fb else "")
            vsort = (
                f"{gd['vs_ort_loss_diff']:.1e} / {gd['vs_ort_max_rel_err']:.1e}; {gd['ort_max_rel_err_vs_float64']:.1e}"
                if "vs_ort_loss_diff" in gd
                else "—"
            )
        else:
            gtxt, judged, segtxt, vsort = cell(g), "—", "—", "—"
        ls = r.get("lockstep")
        lstxt = (
            f"{ls[1]['max_loss_diff']:.1e} ({ls[1].get('torch_orders_loss_diff', float('nan')):.1e})"
            if ls and ls[0] == "ok"
            else cell(ls)
        )

        def passcell(p):
            c = r.get(f"compile:{p}")
            if c is None or c[0] != "ok":
                return cell(c)
            for stage in ("train", "run"):
                v = r.get(f"{stage}:{p}")
                if v is None or v[0] != "ok":
                    return f"{stage}: {cell(v)}"
            return f"ok ({c[2]:.0f} s; run {r[f'run:{p}'][2]:.0f} s)"

        lines.append(
            f"| {r['model']} | {r.get('input', '')} | {r.get('params', 0) / 1e6:.1f}M | {cell(r.get('export'))} "
            f"| {cell(r.get('compile:none'))} | {gtxt} | {judged} | {segtxt} | {vsort} | {lstxt} "
            f"| {', '.join(r.get('frozen_silently', [])) or 'none'} | {passcell('skip')} | {passcell('reuse')} "
            f"| {passcell('rescale')} | {passcell('all')} | {r.get('peak_rss_mb', 0):.0f} |"
        )
    counts = {k: 0 for k in ("ok", "refused", "error")}
    for r in rows:
        for k, v in r.items():
            if (k.startswith(("compile:", "train:", "run:")) or k in ("export", "gradients", "lockstep")) and v:
                counts[v[0]] += 1
    lines += [
        "",
        f"Outcomes over all stages: {counts['ok']} ok, {counts['refused']} refused with a reason, "
        f"{counts['error']} internal errors; {sum('fatal' in r for r in rows)} fatal (a crashed model process).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="all", help="comma list of lib:name (tv:..., timm:...), 'small' or 'all'")
    ap.add_argument(
        "-o", "--output", default="docs/results/model-coverage", help="output stem (.json and .md are added)"
    )
    ap.add_argument(
        "--runs",
        default="every",
        choices=["every", *PASSES[1:]],
        help="after which pass lists a run is trained, resumed and exported: every one, or only that one",
    )
    ap.add_argument(
        "--passes",
        default=",".join(PASSES),
        help=f"comma list of the pass lists to compile (of {','.join(PASSES)}; default every one), e.g. "
        "rescale,all after a change of rescale's defaults: 'none' holds the gradient and lockstep checks",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    passes_run = [p for p in a.passes.split(",") if p]
    bad = [p for p in passes_run if p not in PASSES]
    if bad or not passes_run:
        ap.error(f"--passes takes pass lists of {','.join(PASSES)}, got '{a.passes}'")
    if set(passes_run) != set(PASSES) and a.output == ap.get_default("output") and not a.child:
        ap.error("--passes with a part of the pass lists writes a partial table: give it its own -o")
    if a.child:
        child(a.child, a.child_out, a.runs, passes_run)
        return 0
    sizes = {f"{lib}:{name}": size for lib, name, size in MODELS}
    wanted = list(sizes) if a.models == "all" else SMALL if a.models == "small" else a.models.split(",")
    rows, t0 = [], time.perf_counter()
    for spec in wanted:
        lib, name = spec.split(":")
        size = sizes.get(spec, 64)
        with tempfile.NamedTemporaryFile(suffix=".json") as fh:
            p = subprocess.run(
                [sys.executable, __file__, "--child", f"{lib}:{name}:{size}", "--child-out", fh.name, "--runs", a.runs]
                + ["--passes", ",".join(passes_run)],
                capture_output=True,
                text=True,
            )
            text = Path(fh.name).read_text()
            row = json.loads(text) if text else {"model": spec, "fatal": f"exit {p.returncode}: {p.stderr[-300:]}"}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "trace"}, default=str)[:400], flush=True)
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))
    out.with_suffix(".md").write_text(markdown(rows, time.perf_counter() - t0))
    print(f"wrote {out.with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
