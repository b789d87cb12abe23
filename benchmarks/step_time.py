"""One training step (forward, backward, AdamW) per engine, side by side: torch eager fp32,
torch channels_last fp32, torch.compile fp32, accelc on ORT (``--kernel all=ort``, the whole step on
ORT Training's kernels, as plain ORT users get it), accelc's engine with the activations in NCHW
(``--layout nchw``, ONNX's layout) and accelc's default (every op on its ATen kernels, the layout
chosen by timing both at the first step: ``--layout auto``) — with a per-op-kind profile of the
accelc engines.
Writes docs/step_time.md and .json.

    python benchmarks/step_time.py [--models vgg,resnet18,tv:resnet50,tv:mobilenet_v2] [--rounds 5]
        [--block 3] [--no-compile] [--out docs]

Every engine starts from the same weights (accelc's initial checkpoint loaded into the torch
module) and trains on the same batch. Rounds are interleaved: each round runs every engine for one
untimed step and ``--block`` timed steps; a round's value is its block's median, the result the
median over rounds with the min–max of the round values. 0.3 s idle before every block, so an
engine does not start while the previous one's thread pools still spin. The CPU (model, flags,
torch's capability) heads every table: compare only numbers from one run.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import accelc
from accelc.runtime.config import ExecConfig
from accelc.runtime.session import TrainingSession
from accelc.runtime.torch_engine import TorchSession
from accelc.runtime.train.summary import cpu_model_and_flags
from accelc.zoo import ZOO, zoo_module

sys.path.insert(0, str(Path(__file__).resolve().parent))
DEFAULT = {  # model -> (batch, input shape)
    "vgg": (64, (1, 28, 28)),
    "resnet18": (32, (3, 64, 64)),
    "tv:resnet50": (16, (3, 128, 128)),
    "tv:mobilenet_v2": (32, (3, 128, 128)),
}


def cpu_info() -> dict:
    model, flags = cpu_model_and_flags()
    keep = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma")
    return {
        "model": model,
        "cores": os.cpu_count(),
        "flags": sorted(f for f in keep if f in flags),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def build_module(name: str):
    if name in ZOO:
        return zoo_module(name)[0]
    from model_coverage import build  # torchvision/timm with the CPU shims

    lib, _, model = name.partition(":")
    return build(lib, model)


class TorchCL:
    """torch eager in channels_last (module and input)."""

    def __init__(self, module, hyper):
        self.eng = TorchSession(module.to(memory_format=torch.channels_last), hyper, 1e-3)

    def train_step(self, x, y):
        return self.eng.train_step(torch.from_numpy(x).contiguous(memory_format=torch.channels_last), y)


class TorchCompiled:
    """torch.compile (inductor) of the module, trained like torch eager."""

    def __init__(self, module, hyper):
        self.eng = TorchSession(module, hyper, 1e-3)
        self.eng.module = torch.compile(module)


class Profiled:
    """Per-op-kind milliseconds of an accelc engine: every node kernel timed around its run, every
    ORT segment around its session run, the optimizer and the rest of the step."""

    def __init__(self, sess: TrainingSession):
        self.sess = sess
        self.agg = collections.Counter()

    def run(self, x, y, steps: int) -> dict:
        agg, sess = self.agg, self.sess
        orig_run = {}
        runner = sess.runner
        for kern in runner.kernels.values() if runner else ():
            cls = type(kern)
            if cls not in orig_run:
                orig_run[cls] = cls.run

                def timed(self, env, bound, _orig=cls.run):
                    t0 = time.perf_counter()
                    r = _orig(self, env, bound)
                    agg[self.node.op_type] += (time.perf_counter() - t0) * 1e3
                    return r

                cls.run = timed
        wrapped = []
        for seg in runner.segments if runner else ():
            run = seg["session"].run_with_iobinding

            def seg_timed(io, ro=None, run=run):
                t0 = time.perf_counter()
                run(io, ro)
                agg["ORT segments"] += (time.perf_counter() - t0) * 1e3

            seg["session"].run_with_iobinding = seg_timed
            wrapped.append((seg, run))
        opt_step = sess.optimizer.step

        def opt_timed(*a, **k):
            t0 = time.perf_counter()
            opt_step(*a, **k)
            agg["optimizer (AdamW)"] += (time.perf_counter() - t0) * 1e3

        sess.optimizer.step = opt_timed
        try:
            sess.train_step(x, y)
            agg.clear()
            total = 0.0
            for _ in range(steps):
                t0 = time.perf_counter()
                if runner is None:  # the whole graph in one ORT session
                    t1 = time.perf_counter()
                    sess.train_step(x, y)
                    agg["ORT (whole graph)"] += (time.perf_counter() - t1) * 1e3
                else:
                    sess.train_step(x, y)
                total += (time.perf_counter() - t0) * 1e3
        finally:
            for cls, orig in orig_run.items():
                cls.run = orig
            for seg, run in wrapped:
                seg["session"].run_with_iobinding = run
            del sess.optimizer.step
        out = {k: round(v / steps, 2) for k, v in agg.most_common()}
        if runner is None:
            out["ORT (whole graph)"] = round(out.get("ORT (whole graph)", 0.0) - out.get("optimizer (AdamW)", 0.0), 2)
        out["step (total)"] = round(total / steps, 2)
        out["rest (Python, binding)"] = round(
            out["step (total)"] - sum(v for k, v in out.items() if k != "step (total)"), 2
        )
        out["ORT segments"] = len(runner.segments) if runner else 1
        return out


def torch_profile(eng, x, y, steps: int, top: int = 15) -> dict:
    """torch's own profiler over ``steps`` steps of a torch engine: the ``top`` ATen ops by self CPU
    time (ms/step), the rest summed, and the step's total."""
    from torch.profiler import ProfilerActivity, profile

    eng.train_step(x, y)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            eng.train_step(x, y)
    total = (time.perf_counter() - t0) * 1e3 / steps
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    out = {e.key: round(e.self_cpu_time_total / 1e3 / steps, 2) for e in ops[:top]}
    out["(other ops)"] = round(sum(e.self_cpu_time_total for e in ops[top:]) / 1e3 / steps, 2)
    out["step (total, profiled)"] = round(total, 2)
    return out


def time_block(eng, x, y, block: int) -> float:
    eng.train_step(x, y)
    vals = []
    for _ in range(block):
        t0 = time.perf_counter()
        eng.train_step(x, y)
        vals.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(vals)


def interleaved(engines: dict, x, y, rounds: int, block: int, base: str, ratio: str, log: bool = False) -> dict:
    """Interleaved rounds of every engine (0.3 s idle before each block, a round's value its
    block's median; every other round in the reverse order, so no engine always follows the same
    one): label -> median ms, min, max, ``ratio`` (median / ``base``'s median), rounds."""
    values = collections.defaultdict(list)
    for r in range(rounds):
        for label in list(engines) if r % 2 == 0 else list(engines)[::-1]:
            time.sleep(0.3)
            values[label].append(time_block(engines[label], x, y, block))
        if log:
            print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {values[k][-1]:.1f}" for k in engines), flush=True)
    ref = statistics.median(values[base])
    return {
        k: {
            "ms": round(statistics.median(v), 2),
            "min": round(min(v), 2),
            "max": round(max(v), 2),
            ratio: round(statistics.median(v) / ref, 3),
            "rounds": [round(t, 2) for t in v],
        }
        for k, v in values.items()
    }


def run_model(name: str, rounds: int, block: int, compiled: bool, work: Path) -> dict:
    batch, shape = DEFAULT.get(name, (16, (3, 64, 64)))
    module = build_module(name)
    onnx_path = work / f"{name.replace(':', '_')}.onnx"
    art = work / f"{name.replace(':', '_')}-art"
    accelc.export(module, torch.zeros(2, *shape), onnx_path)
    accelc.compile(onnx_path, art)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *shape)).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int64)
    ort_sess = TrainingSession(art, ExecConfig(kernels={"all": "ort"}))
    nchw_sess = TrainingSession(art, ExecConfig(layout="nchw"))
    aten_sess = TrainingSession(art, ExecConfig())  # --layout auto: measured at its first step
    weights = {k: torch.from_numpy(v) for k, v in ort_sess.param_arrays().items()}

    def torch_module():
        import copy

        m = copy.deepcopy(module)
        m.load_state_dict(weights, strict=False)
        return m.train()

    hyper = ort_sess.hyper
    engines = {
        "torch eager fp32": TorchSession(torch_module(), hyper, 1e-3),
        "torch channels_last fp32": TorchCL(torch_module(), hyper),
    }
    if compiled:
        t0 = time.perf_counter()
        try:
            eng = TorchCompiled(torch_module(), hyper).eng
            eng.train_step(x, y)
            engines["torch.compile fp32"] = eng
        except Exception as e:  # inductor needs a working C++ toolchain
            print(f"  torch.compile unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        print(f"  torch.compile warm-up {time.perf_counter() - t0:.1f} s")
    engines["accelc --kernel all=ort"] = ort_sess
    engines["accelc --layout nchw"] = nchw_sess
    engines["accelc default"] = aten_sess
    for e in engines.values():  # untimed warm-up of every engine
        e.train_step(x, y)
    rows = interleaved(engines, x, y, rounds, block, "torch eager fp32", "x_torch_fp32", log=True)
    profiles = {
        "accelc --kernel all=ort": Profiled(ort_sess).run(x, y, 3),
        "accelc --layout nchw": Profiled(nchw_sess).run(x, y, 3),
        "accelc default": Profiled(aten_sess).run(x, y, 3),
    }
    fell_back = aten_sess.runner.fallback_ops() if aten_sess.runner else {"(whole graph)": 1}
    torch_rows = [k for k in rows if k.startswith("torch")]
    best_torch = min(torch_rows, key=lambda k: rows[k]["ms"])
    # round by round against the best torch row: the two blocks of a round ran seconds apart, so
    # a drift of the machine's speed between rounds cancels
    paired = {}
    for label in ("accelc default", "accelc --layout nchw"):
        q = [a / b for a, b in zip(rows[label]["rounds"], rows[best_torch]["rounds"])]
        paired[label] = {"median": round(statistics.median(q), 3), "min": round(min(q), 3), "max": round(max(q), 3)}
    return {
        "batch": batch,
        "input": list(shape),
        "rows": rows,
        "profile": profiles,
        "torch_profile": {"row": best_torch, "ops": torch_profile(engines[best_torch], x, y, 3)},
        "paired": {"against": best_torch, "rows": paired},
        "ort_segments_default": len(aten_sess.runner.segments) if aten_sess.runner else 1,
        "layout_default": aten_sess.engine_report().get("layout"),
        "fell_back": dict(fell_back),
    }


def _layout_words(rep) -> str:
    if not rep or not rep.get("layout"):
        return "not chosen"
    ms = rep.get("measured_ms")
    how = f"measured NCHW {ms['nchw']:.1f} ms, NHWC {ms['nhwc']:.1f} ms" if ms else rep.get("not_measured")
    return f"{rep['layout'].upper()} ({how})"


def markdown(res: dict) -> str:
    cpu = res["cpu"]
    lines = [
        "# Step time: accelc's engine against torch and ORT",
        "",
        f"Generated by `{res['command']}` on {res['date']}.",
        "",
        f"CPU: {cpu['model']}, {cpu['cores']} cores, flags {', '.join(cpu['flags'])}; torch {cpu['torch']} "
        f"(capability {cpu['torch_cpu_capability']}, {cpu['threads']} threads). Medians over {res['rounds']} "
        f"interleaved rounds of {res['block']} steps (min–max of the round values); one step = forward, backward "
        "and AdamW on one batch.",
        "",
    ]
    for name, m in res["models"].items():
        lines += [
            f"## {name} (batch {m['batch']}, {'×'.join(map(str, m['input']))})",
            "",
            "| engine | ms/step | min–max | × torch eager fp32 |",
            "|---|---|---|---|",
        ]
        for label, r in m["rows"].items():
            lines.append(f"| {label} | {r['ms']:.1f} | {r['min']:.1f}–{r['max']:.1f} | {r['x_torch_fp32']:.2f} |")
        pr = m.get("paired")
        if pr:
            lines += [""] + [
                f"{label} against {pr['against']}, the ratio of the two in each round: median "
                f"**{q['median']:.2f}×** ({q['min']:.2f}–{q['max']:.2f})."
                for label, q in pr["rows"].items()
            ]
        lines += [
            "",
            f"ORT segments per step in accelc default: {m['ort_segments_default']}"
            + (f" (fell back: {m['fell_back']})" if m["fell_back"] else "")
            + f". accelc default's layout (`--layout auto`): {_layout_words(m.get('layout_default'))}.",
            "",
            "Per-op-kind profile (ms/step, 3 steps):",
            "",
            "| op kind | " + " | ".join(m["profile"]) + " |",
            "|---|" + "---|" * len(m["profile"]),
        ]
        kinds = list(dict.fromkeys(k for p in m["profile"].values() for k in p))
        for k in kinds:
            lines.append(f"| {k} | " + " | ".join(str(p.get(k, "")) for p in m["profile"].values()) + " |")
        lines.append("")
        tp = m.get("torch_profile")
        if tp:
            lines += [
                f"torch's own profiler on the best torch row ({tp['row']}), self CPU time of its ATen ops "
                "(ms/step, 3 steps; the profiler's overhead included in the total):",
                "",
                "| ATen op | ms/step |",
                "|---|---|",
            ]
            lines += [f"| {k} | {v} |" for k, v in tp["ops"].items()]
            lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(DEFAULT), help="comma list: zoo names or tv:NAME / timm:NAME")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--block", type=int, default=3, help="timed steps per engine per round (default 3)")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile row")
    ap.add_argument(
        "--out", default=str(Path(__file__).resolve().parent.parent / "docs"), help="folder for step_time.md/.json"
    )
    a = ap.parse_args(argv)
    res = {
        "command": "python benchmarks/step_time.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_info(),
        "rounds": a.rounds,
        "block": a.block,
        "models": {},
    }
    print(f"CPU: {res['cpu']}")
    with tempfile.TemporaryDirectory() as d:
        for name in a.models.split(","):
            print(f"{name}:", flush=True)
            res["models"][name] = run_model(name, a.rounds, a.block, not a.no_compile, Path(d))
    write_results(Path(a.out), "step_time", res, markdown(res))
    return 0


def write_results(out: Path, stem: str, res: dict, md: str) -> None:
    """OUT/STEM.json and OUT/STEM.md, and the table on the terminal."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (out / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    raise SystemExit(main())
