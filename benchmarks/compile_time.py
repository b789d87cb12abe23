"""Compile time and peak memory per model and pass list, as a user runs it: ``accelc compile
M.onnx -o A --passes P`` in a process of its own, wall time and the child's peak RSS
(``wait4``'s rusage), with the time each pass took for its rewrites (every stage) and for the
checks of them (``report.json``: ``seconds``, ``check_seconds``, the final validation's).

Models are exported once (torchvision/timm at the coverage suite's input sizes, random weights,
10 classes) into the work folder and reused. ``--pythonpath`` runs another accelc tree with the
same interpreter (e.g. an older commit laid out as the package installs: ``DIR/accelc/...``), for
before/after tables from one machine.

    python benchmarks/compile_time.py --models timm:mixnet_s,tv:densenet121 -o docs/compile-time
    python benchmarks/compile_time.py --models small --passes none,rescale,reuse,skip
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from model_coverage import MODELS, SMALL  # noqa: E402

PASS_LISTS = ["none", "skip", "reuse", "rescale", "rescale,reuse,skip"]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def export(spec: str, size: int, path: Path) -> int:
    """Export ``spec`` (lib:name) to ``path`` in a child process; returns its number of Conv nodes."""
    code = (
        "import sys, torch, onnx; sys.path.insert(0, %r)\n"
        "from model_coverage import build\nimport accelc\n"
        "lib, name = %r.split(':')\nm = build(lib, name)\n"
        "accelc.export(m, torch.zeros(2, 3, %d, %d), %r)\n"
        "print(sum(n.op_type == 'Conv' for n in onnx.load(%r).graph.node))\n"
    ) % (str(HERE), spec, size, size, str(path), str(path))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"export of {spec} failed: {p.stderr.strip().splitlines()[-1:]}")
    return int(p.stdout.strip().splitlines()[-1])


def compile_once(model: Path, out: Path, passes: str, pythonpath: str | None) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, "-m", "accelc", "compile", str(model), "-o", str(out), "--force"]
    if passes != "none":
        cmd += ["--passes", passes]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read()
    proc.stderr.close()
    row = {"passes": passes, "seconds": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}
    if os.waitstatus_to_exitcode(status):
        row["error"] = err.strip().splitlines()[-1] if err.strip() else f"exit {status}"
        return row
    report = json.loads((out / "report.json").read_text())
    row["passes_detail"] = {
        p["name"]: {"rewrite_s": p.get("seconds"), "check_s": p.get("check_seconds")} for p in report["passes"]
    }
    v = report.get("validation") or {}
    row["validation_s"] = round(v.get("seconds") or 0, 2)  # the model and its stages, checked side by side
    return row


def markdown(rows: list[dict], pass_lists: list[str], meta: dict) -> str:
    head = "| model | convs | " + " | ".join(f"`{p}` s (MB)" for p in pass_lists) + " | worst / none |"
    lines = [
        "# Compile time",
        "",
        f"`python benchmarks/compile_time.py {meta['argv']}` on {meta['date']}, {meta['cpu']}, "
        f"{meta['cores']} cores, {meta['minutes']:.1f} min. Wall time of `accelc compile M.onnx -o A "
        "--passes P` in a process of its own and that process's peak RSS; models exported once at the "
        "coverage suite's input sizes (random weights, 10 classes).",
        "",
        head,
        "|" + "---|" * (len(pass_lists) + 3),
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | - | {r['error']} |")
            continue
        by = {c["passes"]: c for c in r["compiles"]}
        cells = []
        for p in pass_lists:
            c = by.get(p)
            cells.append("-" if c is None else c.get("error", f"{c['seconds']:.1f} ({c['peak_rss_mb']:.0f})"))
        base = by.get("none", {}).get("seconds")
        worst = max((c["seconds"] for c in r["compiles"] if "error" not in c), default=None)
        ratio = f"{worst / base:.2f}x" if base and worst else "-"
        lines.append(f"| {r['model']} | {r['convs']} | " + " | ".join(cells) + f" | {ratio} |")
    lines += [
        "",
        "Where the time of the longest pass list went (per pass: its rewrites on every stage / its "
        "numeric self-check), then the one validation of the final artifacts and their stages (ORT "
        "sessions and a training step in a child process); the rest is loading, ORT's artifact "
        "generation and writing:",
        "",
    ]
    longest = pass_lists[-1]
    for r in rows:
        c = next((c for c in r.get("compiles", []) if c["passes"] == longest and "error" not in c), None)
        if c:
            parts = ", ".join(
                f"{k} {v['rewrite_s'] or 0:.1f}/{v['check_s'] or 0:.1f}" for k, v in c["passes_detail"].items()
            )
            lines.append(f"- {r['model']}: {parts}; validation {c['validation_s']:.1f} s of {c['seconds']:.1f} s")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="all", help="comma list of lib:name, 'small' or 'all' (the coverage suite's)")
    ap.add_argument("--passes", default=",".join(p.replace(",", "+") for p in PASS_LISTS),
                    help="comma list of pass lists, '+' joining the passes of one list (none = defaults only)")  # fmt: skip
    ap.add_argument("--work", default="/tmp/accelc-compile-time", help="folder for the exported models and outputs")
    ap.add_argument("--pythonpath", help="run another accelc tree (DIR holding accelc/) with this interpreter")
    ap.add_argument("-o", "--output", help="output stem: writes .json and .md")
    a = ap.parse_args(argv)
    sizes = {f"{lib}:{name}": size for lib, name, size in MODELS}
    wanted = list(sizes) if a.models == "all" else SMALL if a.models == "small" else a.models.split(",")
    pass_lists = [p.replace("+", ",") for p in a.passes.split(",")]
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    meta = {
        "argv": " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
    }
    print(f"CPU: {meta['cpu']}, {meta['cores']} cores", flush=True)
    rows, t0 = [], time.perf_counter()
    for spec in wanted:
        model = work / (spec.replace(":", "_") + ".onnx")
        row = {"model": spec}
        try:
            convs_file = model.with_suffix(".convs")
            if not model.exists() or not convs_file.exists():
                convs_file.write_text(str(export(spec, sizes.get(spec, 64), model)))
            row["convs"] = int(convs_file.read_text())
        except RuntimeError as e:
            row["error"] = str(e)
            rows.append(row)
            continue
        row["compiles"] = []
        for passes in pass_lists:
            c = compile_once(model, work / f"out-{spec.replace(':', '_')}", passes, a.pythonpath)
            row["compiles"].append(c)
            print(json.dumps({"model": spec, **{k: v for k, v in c.items() if k != "passes_detail"}}), flush=True)
        rows.append(row)
    meta["minutes"] = (time.perf_counter() - t0) / 60
    if a.output:
        out = Path(a.output)
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        out.with_suffix(".md").write_text(markdown(rows, pass_lists, meta))
        print(f"wrote {out.with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
