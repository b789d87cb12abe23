"""The whole-graph engine on a GPU: step time against torch eager (NCHW and channels_last) on CUDA,
and accelc's CUDA gradients against torch float64 on the CPU. One prepared run for a lent GPU
machine, which has torch with CUDA but no ORT Training (so nothing can be compiled there):

    python benchmarks/cuda_check.py prepare .cuda-check      # here: compile, save the batches
    # there (the device tool's run, carry [".cuda-check"]; accelc laid out as a package, as make lint does):
    mkdir -p /tmp/pkg/accelc && cp -r facade/. /tmp/pkg/accelc/ && \
      for p in compiler runtime passes; do cp -r $p /tmp/pkg/accelc/; done && \
      PYTHONPATH=/tmp/pkg python benchmarks/cuda_check.py run .cuda-check --out $OUT

``prepare`` compiles the models (the zoo VGG and ResNet, torchvision MobileNetV2; ResNet-50's
100 MB checkpoint does not fit the 64 MiB a device call carries) and stores one batch per model.
``run`` (``--device cpu`` runs it here, to check the script) times, per model, interleaved rounds of
torch eager fp32, torch channels_last fp32, accelc ``--layout nchw`` and accelc's default
(``--layout auto``) on the device, medians with min–max, CUDA synchronised around every step;
then judges accelc's gradients on the device against torch float64 on the CPU, with torch float32
on the device (NCHW and channels_last) as float32's own error (the coverage suite's judge). Writes OUT/cuda_check.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
MODELS = {"vgg": (64, (1, 28, 28)), "resnet": (64, (3, 32, 32)), "tv:mobilenet_v2": (32, (3, 128, 128))}


def _module(name: str):
    from step_time import build_module

    return build_module(name)


def prepare(out: Path) -> None:
    import accelc

    out.mkdir(parents=True, exist_ok=True)
    for name, (batch, shape) in MODELS.items():
        d = out / name.replace(":", "_")
        module = _module(name)
        accelc.export(module, torch.zeros(2, *shape), d.with_suffix(".onnx"))
        accelc.compile(d.with_suffix(".onnx"), d)
        rng = np.random.default_rng(0)
        np.save(d / "x.npy", rng.standard_normal((batch, *shape)).astype(np.float32))
        np.save(d / "y.npy", rng.integers(0, 10, batch).astype(np.int64))
        print(f"{name}: {d}")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(eng, x, y, block: int, device: str) -> float:
    eng.train_step(x, y)
    _sync(device)
    vals = []
    for _ in range(block):
        t0 = time.perf_counter()
        eng.train_step(x, y)
        _sync(device)
        vals.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(vals)


def _torch_grads(module, params, x, y, dtype, device, fmt=torch.contiguous_format) -> dict:
    m = copy.deepcopy(module).to(device=device, dtype=dtype).train().to(memory_format=fmt)
    m.load_state_dict({k: torch.from_numpy(v).to(dtype) for k, v in params.items()}, strict=False)
    xt = torch.from_numpy(x).to(device=device, dtype=dtype).contiguous(memory_format=fmt)
    F.cross_entropy(m(xt), torch.from_numpy(y).to(device)).backward()
    return {k: p.grad.double().cpu().numpy() for k, p in m.named_parameters()}


def run_model(name: str, d: Path, device: str, rounds: int, block: int) -> dict:
    from accelc.runtime.config import ExecConfig
    from accelc.runtime.session import TrainingSession
    from accelc.runtime.torch_engine import TorchSession

    x, y = np.load(d / "x.npy"), np.load(d / "y.npy")
    module = _module(name)
    accelc_nchw = TrainingSession(d, ExecConfig(device=device, layout="nchw"))
    accelc_auto = TrainingSession(d, ExecConfig(device=device))
    params = accelc_nchw.param_arrays()
    grads_at_start = {}
    for layout, sess in (("nchw", TrainingSession(d, ExecConfig(device=device, layout="nchw"))),
                         ("nhwc", TrainingSession(d, ExecConfig(device=device, layout="nhwc")))):  # fmt: skip
        grads_at_start[layout] = sess.compute_gradients(x, y)[1]
    g64 = _torch_grads(module, params, x, y, torch.float64, "cpu")
    g32 = {
        layout: _torch_grads(module, params, x, y, torch.float32, device, fmt)
        for layout, fmt in (("nchw", torch.contiguous_format), ("nhwc", torch.channels_last))
    }
    judge = {}
    for layout, go in grads_at_start.items():
        worst = 0.0
        for k, g in g64.items():
            if k in go:  # float32's own error: torch's in either layout (a ReLU kink goes either way)
                f32 = max(np.linalg.norm(g32["nchw"][k] - g), np.linalg.norm(g32["nhwc"][k] - g))
                tol = 2 * f32 + 1e-4 * np.linalg.norm(g) + 1e-6
                worst = max(worst, float(np.linalg.norm(go[k] - g) / tol))
        judge[layout] = {"worst_error_over_tolerance": round(worst, 3), "ok": worst <= 1.0}

    def torch_module(fmt):
        m = copy.deepcopy(module)
        m.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()}, strict=False)
        return m.to(device).to(memory_format=fmt).train()

    xt = torch.from_numpy(x).to(device)
    engines = {
        "torch eager fp32": (TorchSession(torch_module(torch.contiguous_format), accelc_nchw.hyper, 1e-3, device), xt),
        "torch channels_last fp32": (
            TorchSession(torch_module(torch.channels_last), accelc_nchw.hyper, 1e-3, device),
            xt.contiguous(memory_format=torch.channels_last),
        ),
        "accelc --layout nchw": (accelc_nchw, x),
        "accelc default": (accelc_auto, x),
    }
    values: dict[str, list] = {k: [] for k in engines}
    for r in range(rounds):
        for label, (eng, xx) in engines.items():
            values[label].append(_time(eng, xx, y, block, device))
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in values.items()), flush=True)
    base = statistics.median(values["torch eager fp32"])
    rows = {
        k: {"ms": round(statistics.median(v), 2), "min": round(min(v), 2), "max": round(max(v), 2),
            "x_torch_fp32": round(statistics.median(v) / base, 3)}
        for k, v in values.items()
    }  # fmt: skip
    rep = accelc_auto.engine_report()
    return {"batch": len(x), "input": list(x.shape[1:]), "rows": rows, "gradients": judge, "engine": rep}


def markdown(res: dict) -> str:
    lines = [f"# accelc's engine on {res['device_name']}", "", f"`{res['command']}`, {res['date']}.", ""]
    for name, m in res["models"].items():
        lines += [f"## {name} (batch {m['batch']}, {'×'.join(map(str, m['input']))})", ""]
        lines += ["| engine | ms/step | min–max | × torch eager fp32 |", "|---|---|---|---|"]
        for label, r in m["rows"].items():
            lines.append(f"| {label} | {r['ms']:.2f} | {r['min']:.2f}–{r['max']:.2f} | {r['x_torch_fp32']:.2f} |")
        g = ", ".join(
            f"{k}: {'ok' if v['ok'] else 'OFF'} ({v['worst_error_over_tolerance']})" for k, v in m["gradients"].items()
        )
        lines += ["", f"Gradients against torch float64 on the CPU (worst error / tolerance): {g}.", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("prepare", "run"))
    ap.add_argument("dir", help="where prepare writes the artifacts and batches, and run reads them")
    ap.add_argument("--device", default="cuda", help="run: the device (cuda; cpu checks the script here)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--block", type=int, default=5, help="timed steps per engine per round")
    ap.add_argument("--out", default=".", help="run: folder for cuda_check.json/.md")
    a = ap.parse_args(argv)
    d = Path(a.dir)
    if a.what == "prepare":
        prepare(d)
        return 0
    name = torch.cuda.get_device_name() if a.device == "cuda" else "CPU"
    res = {"command": "python benchmarks/cuda_check.py " + " ".join(argv or sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M"), "device_name": name, "torch": torch.__version__, "models": {}}  # fmt: skip
    print(f"device: {name}, torch {torch.__version__}")
    for m in MODELS:
        print(f"{m}:", flush=True)
        res["models"][m] = run_model(m, d / m.replace(":", "_"), a.device, a.rounds, a.block)
    from step_time import write_results

    write_results(Path(a.out), "cuda_check", res, markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
