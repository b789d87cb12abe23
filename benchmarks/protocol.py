"""The time-to-accuracy protocol (MLPerf Training / DAWNBench style) over the standard workloads.

Every workload of ``benchmarks/workloads.json`` (the zoo VGG and ResNet at 32×32 and largekernel at
64×64 on real Fashion-MNIST, largekernel at 64×64 on fashion-mnist-multiscale: a workload's
``"data"``, default fashion-mnist) runs through ``accelc bench`` with a validation split held out of
the training images, a fixed target accuracy judged on it, several seeds with the configurations
interleaved per seed, and every configuration up to the workload's epoch cap. Each workload writes
``OUT/<workload>/`` (bench.json, bench.md, time_to_target.png, ...); ``OUT/protocol.md`` gathers the
tables, and ``--results docs/results/time-to-accuracy.md`` writes them as a whole results page (the
README is never rewritten).

    python benchmarks/protocol.py -o bench-out                       # the standard set (make bench)
    python benchmarks/protocol.py --quick -o bench-quick             # one seed, fewer images: trying things
    python benchmarks/protocol.py --calibrate -o bench-calibrate     # ort alone: proposes each fixed target
    python benchmarks/protocol.py --workloads vgg32 --configs ort,ort+skip -o out
    python benchmarks/protocol.py --report-only -o docs/tta --results docs/results/time-to-accuracy.md
    python benchmarks/protocol.py --budgets 2,4,8 --workloads vgg32 --train-limit 10000 --configs torch,ort,ort+skip \\
        -o bench-budget                                               # protocol v2, budgeted (make bench-budget)
    python benchmarks/protocol.py --report-only -o bench-budget --workloads vgg32   # its fronts again

``--calibrate`` trains ``ort`` alone for every seed and proposes, per workload, the highest
multiple of 0.005 that *every* seed's validation accuracy reached by the middle of the epoch cap:
a target the baseline reaches reliably after several epochs, leaving the second half of the cap
for configurations that need more epochs. The chosen values are then written into workloads.json
by hand (once); the test split plays no part in it.

``--budgets 2,4,8`` (protocol v2, budgeted): per workload and budget of E epochs, every
configuration and seed (interleaved) trains all E epochs, the learning rate warmed up and decayed
linearly to zero over them (``--lr-schedule linear``), with no stop at the target; each budget
writes ``OUT/<workload>/budget-<E>/``. ``benchmarks/fronts.py`` then gives each configuration's
time-versus-accuracy front over the budgets and, per budget, every configuration's time to ort's
(and torch's) validation accuracy there: ``OUT/<workload>/fronts.json``, ``fronts.md`` and
``fronts.png``, also gathered in ``protocol.md`` (and ``--results``). ``--report-only`` rebuilds
them from the budget folders.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STANDARD = {
    "torch",
    "torch-amp",
    "ort",
    "ort-noopt",
    "ort+skip",
    "ort+reuse",
    "ort+rescale",
    "ort+all",
    "ort+rescale+reuse+skip",
}


def load_workloads(path: Path) -> dict:
    return json.loads(path.read_text())


def run(args) -> int:
    from accelc.bench import markdown, run_bench

    spec = load_workloads(Path(args.workloads_file))
    names = args.workloads.split(",") if args.workloads else list(spec["workloads"])
    unknown = [n for n in names if n not in spec["workloads"]]
    if unknown:
        print(f"protocol: unknown workload(s) {unknown}; known: {list(spec['workloads'])}", file=sys.stderr)
        return 2
    budgets = parse_budgets(args.budgets) if args.budgets else None
    if budgets and (args.epochs or args.calibrate):
        raise Refused("--budgets gives the epochs of every run: leave out --epochs and --calibrate")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    seeds = args.seeds or spec["seeds"]
    configs = args.configs or ",".join(spec["configs"])
    if args.config_file:  # named configurations with options of their own (a study)
        from accelc.bench import parse_configs

        configs = parse_configs(None, None, args.config_file)
    if args.calibrate:
        configs = "ort"
    names_of = list(configs) if isinstance(configs, dict) else configs.split(",")
    # the protocol's pass settings (chosen on vgg32's validation split), for every configuration
    # running the pass; --pass-options replaces them
    pass_options = json.loads(args.pass_options) if args.pass_options else spec.get("pass_options")
    for name in names:
        w = dict(spec["workloads"][name])
        if args.quick:
            w.update({k: v for k, v in spec["quick"].items() if k != "seeds"})
            seeds = args.seeds or spec["quick"]["seeds"]
        if args.train_limit is not None:
            w["train_limit"] = args.train_limit
        target = w["target"]
        if args.calibrate or target is None:
            target = "ort-best" if "ort" in names_of else "torch-best-0.2"
        if budgets:
            po = None if isinstance(configs, dict) else pass_options
            run_budgets(name, w, budgets, args, out, seeds=seeds, configs=configs, target=target, pass_options=po)
            continue
        print(f"protocol: {name}: {w['model']} {w['input_shape']}, seeds {seeds}, target {target}", file=sys.stderr)
        t0 = time.perf_counter()
        rep = run_bench(
            w["model"],
            args.data or w.get("data", "fashion-mnist"),
            args.epochs or w["epochs"],
            configs,
            out / name,
            batch_size=w.get("batch_size", 64),
            lr=w["lr"],
            train_limit=w["train_limit"],
            test_limit=w["test_limit"],
            target=str(target),
            input_shape=tuple(int(v) for v in w["input_shape"].split(",")),
            seeds=seeds,
            val_split=w["val_split"],
            stop_at_target=bool(spec.get("stop_at_target")) and not args.calibrate and w["target"] is not None,
            force=True,
            progress=not args.quiet,
            pass_options=None if isinstance(configs, dict) else pass_options,
        )
        print(f"protocol: {name} took {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        print(markdown(rep))
        if args.calibrate:
            cap = args.epochs or w["epochs"]
            print(f"protocol: {name}: proposed target {propose_target(rep, cap)}", file=sys.stderr)
    results = Path(args.results) if args.results else None
    report(out, names, results, " ".join(sys.argv[1:]), list(spec["workloads"]))
    return 0


def parse_budgets(text: str) -> list[int]:
    """``--budgets 2,4,8``: distinct positive epoch counts, smallest first."""
    try:
        budgets = [int(v) for v in text.split(",")]
    except ValueError:
        budgets = []
    if not budgets or min(budgets) < 1 or len(set(budgets)) != len(budgets):
        raise Refused(f"--budgets takes distinct positive epoch counts, e.g. 2,4,8, got '{text}'")
    return sorted(budgets)


def run_budgets(name: str, w: dict, budgets: list[int], args, out: Path, **kw) -> None:
    """Protocol v2 on workload ``name``: per budget E, every configuration and seed (interleaved)
    trains all E epochs with the learning rate warmed up and decayed linearly to zero over them,
    into ``out/<name>/budget-<E>/``; then the workload's fronts (fronts.json, .md, .png)."""
    from accelc.bench import markdown, run_bench

    (out / name).mkdir(parents=True, exist_ok=True)
    for e in budgets:
        print(
            f"protocol: {name}: budget {e} epochs (linear schedule): {w['model']} {w['input_shape']}, "
            f"seeds {kw['seeds']}, train limit {w['train_limit']}",
            file=sys.stderr,
        )
        t0 = time.perf_counter()
        rep = run_bench(
            w["model"],
            args.data or w.get("data", "fashion-mnist"),
            e,
            kw["configs"],
            out / name / f"budget-{e}",
            batch_size=w.get("batch_size", 64),
            lr=w["lr"],
            lr_schedule="linear",
            train_limit=w["train_limit"],
            test_limit=w["test_limit"],
            target=str(kw["target"]),
            input_shape=tuple(int(v) for v in w["input_shape"].split(",")),
            seeds=kw["seeds"],
            val_split=w["val_split"],
            stop_at_target=False,
            force=True,
            progress=not args.quiet,
            pass_options=kw["pass_options"],
        )
        print(f"protocol: {name}: budget {e} took {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        print(markdown(rep))
    fr = _fronts().write_fronts(out / name, name)
    if fr is not None:
        print(_fronts().markdown(fr))


def _fronts():
    """benchmarks/fronts.py (this script's folder is not a package)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import fronts

    return fronts


def propose_target(rep: dict, cap: int) -> float | None:
    """The highest multiple of 0.005 that every ort run's validation accuracy reached by epoch
    cap // 2 (from the calibration run; validation only)."""
    hist = rep["configs"]["ort"]["histories"]
    by = max(1, cap // 2)
    key = "val_acc" if "val_acc" in hist[0][0] else "test_acc"
    worst = min(max(m[key] for m in h if m["epoch"] <= by) for h in hist)
    return round(math.floor(worst / 0.005 + 1e-9) * 0.005, 3)


def table(rep: dict) -> list[str]:
    def f(x, fmt):
        return "—" if x is None else fmt.format(x)

    lines = [
        "| config | reached | time to target (s), median (min–max) | test acc at target | final test acc "
        "| ×torch | ×torch-amp | ×ort |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c, r in rep["configs"].items():
        rng = r.get("time_to_target_range")
        t = "—" if r["time_to_target"] is None else f"{r['time_to_target']:.0f} ({rng[0]:.0f}–{rng[1]:.0f})"
        lines.append(
            f"| {c} | {r['reached']}/{r['runs']} | {t} | {f(r['test_acc_at_target'], '{:.4f}')} "
            f"| {r['final_test_acc']:.4f} | {f(r.get('time_to_target_ratio_vs_torch'), '{:.2f}')} "
            f"| {f(r.get('time_to_target_ratio_vs_torch-amp'), '{:.2f}')} "
            f"| {f(r.get('time_to_target_ratio_vs_ort'), '{:.2f}')} |"
        )
    for c, why in (rep.get("not_run") or {}).items():
        lines.append(f"| {c} | not run: {why} | | | | | | |")
    return lines


def study_table(rep: dict) -> list[str]:
    """A study's table (one row per named configuration): time and epochs to the target, test
    accuracy there, median s/epoch, and what the controllers did when (layers frozen by skip, in
    the epoch after the decision; rescale's switch)."""
    lines = [
        "| config | reached | time to target (s) | epochs to target | test acc at target | s/epoch | what happened |",
        "|---|---|---|---|---|---|---|",
    ]
    for c, r in rep["configs"].items():
        acts = []
        for d in r.get("decisions", []):
            if d["action"] == "skip":
                acts.append(f"ep {d['epoch'] + 1}: skip {', '.join(d.get('skipped') or [])}")
            elif d["action"] in ("switch", "off", "refine", "freeze", "resize"):  # freeze, resize: the defaults'
                acts.append(f"ep {d['epoch'] + 1}: {d['action']}")
        lam = (r.get("controllers") or {}).get("skip", {}).get("lambdas") or []
        if not acts and lam:
            acts.append("nothing skipped")
        t = r["time_to_target"]
        lines.append(
            f"| {c} | {r['reached']}/{r['runs']} | {'—' if t is None else f'{t:.1f}'} "
            f"| {'—' if r.get('epochs_to_target') is None else r['epochs_to_target']} "
            f"| {'—' if r.get('test_acc_at_target') is None else format(r['test_acc_at_target'], '.4f')} "
            f"| {r['epoch_seconds']:.1f} | {'; '.join(acts) or '—'} |"
        )
    return lines


def reuse_choice_table(rep: dict) -> list[str]:
    """The reuse controller's per-layer choice at the start of the first ort+reuse run: chosen or
    not, measured ms both ways, remain ratio and output error on the real batch."""
    row = rep["configs"].get("ort+reuse")
    dec = [d for d in (row or {}).get("decisions", []) if d.get("action") == "choose" and d.get("layers")]
    if not dec:
        return []
    lines = [
        f"Reuse layer choice (ort+reuse, first seed, epoch {dec[0]['epoch']}, L={dec[0].get('L')}, "
        f"H={dec[0].get('H')}):",
        "",
        "| layer | reused | reuse ms (fwd+bwd) | exact ms | exact engine | remain ratio | output error |",
        "|---|---|---|---|---|---|---|",
    ]

    def f(x, fmt):
        return "—" if x is None else fmt.format(x)

    for layer, r in dec[0]["layers"].items():
        lines.append(
            f"| {layer} | {'yes' if r.get('chosen') else 'no'} | {f(r.get('reuse_ms'), '{:.1f}')} "
            f"| {f(r.get('exact_ms'), '{:.1f}')} | {r.get('exact_engine', '—')} "
            f"| {f(r.get('remain_ratio'), '{:.3f}')} | {f(r.get('error'), '{:.3f}')} |"
        )
    return lines + [""]


class Refused(Exception):
    """A one-line refusal (exit 2)."""


def report(out: Path, names: list[str], results: Path | None, argv: str, all_names: list[str] | None = None) -> None:
    """OUT/protocol.md from every workload's bench.json and budgeted fronts (``OUT/<workload>/
    budget-<E>/``: fronts.json, .md and .png rebuilt there); with ``results``, that whole results
    page too (only when every workload of the workloads file has its bench.json or budget folders:
    a partial run never replaces the published tables)."""
    if not out.is_dir():
        raise Refused(f"output folder '{out}' does not exist")
    fronts = _fronts()
    missing = [
        n for n in (all_names or names) if not (out / n / "bench.json").is_file() and not fronts.budget_dirs(out / n)
    ]
    if results is not None and missing:
        raise Refused(
            f"not rewriting {results}: no bench.json for {', '.join(missing)} in '{out}' "
            "(run every workload, or leave out --results)"
        )
    parts = []
    budgeted = fixed = False
    for name in names:
        fr = fronts.write_fronts(out / name, name)  # protocol v2: the budget folders' fronts
        if fr is not None:
            budgeted = True
            parts += [fronts.markdown(fr), ""]
        p = out / name / "bench.json"
        if not p.exists():
            continue
        rep = json.loads(p.read_text())
        fixed = True
        study = not set(rep["configs"]) <= STANDARD  # named configurations: a study
        parts += [
            f"#### {name}: {rep['model']} at {'×'.join(str(v) for v in rep['input_shape'][1:])}, "
            f"target {rep['target_acc']:.4f} ({rep['decided_on'].split(' ')[0]} split)",
            "",
            f"{rep['train_images']} training / {rep['val_images']} validation / {rep['test_images']} test "
            f"images, up to {rep['epochs']} epochs, seeds {', '.join(map(str, rep['seeds']))}, "
            f"batch {rep['batch_size']}, lr {rep['lr']}, {rep['date']} (`{name}/bench.md`).",
            "",
            *(study_table(rep) if study else table(rep)),
            "",
            *reuse_choice_table(rep),
        ]
    body = "\n".join(parts)
    (out / "protocol.md").write_text(f"# Time to accuracy\n\n`python benchmarks/protocol.py {argv}`\n\n{body}")
    if results is None:
        return
    results.parent.mkdir(parents=True, exist_ok=True)
    tmp = results.with_name(f".{results.name}.tmp")
    tmp.write_text(results_page(body, argv, out, results, budgeted, fixed))
    os.replace(tmp, results)  # a reader sees the old page or the new one, never half of it
    print(f"protocol: wrote {results}", file=sys.stderr)


def results_page(body: str, argv: str, out: Path, results: Path, budgeted: bool = False, fixed: bool = True) -> str:
    """The whole results page: a title, where it comes from, a link to the protocol's rules and
    analysis (docs/time-to-accuracy.md, relative to the page), what the tables are (the fixed-target
    runs', ``fixed``; the budgeted fronts', ``budgeted``), then the tables."""
    rules = os.path.relpath(HERE.parent / "docs" / "time-to-accuracy.md", results.resolve().parent)
    fixed_text = (
        "Each configuration trains until its validation accuracy reaches the workload's fixed target "
        "(or the epoch cap); the tables give the training time to get there (median and min–max over "
        "the seeds, configurations interleaved per seed), how many seeds got there, and the test "
        "accuracy at that point. Every run's epochs, the controllers' decisions and the plots are in "
        f"`{out}/<workload>/bench.md`.\n\n"
    )
    v2 = (
        "Budgeted fronts (protocol v2, `--budgets`): every configuration trains each budget of E epochs "
        "in full, the learning rate warmed up and decayed linearly to zero over it; the tables give each "
        "budget's training time and final accuracies over the seeds (configurations interleaved per seed), "
        "and per budget each configuration's time to ort's validation accuracy there, interpolated along "
        f"its front. Every run's epochs and the plots are in `{out}/<workload>/budget-<E>/bench.md` and "
        f"`{out}/<workload>/fronts.png`.\n\n"
    )
    source = f"`{out}/*/bench.json`" if fixed or not budgeted else f"`{out}/*/budget-*/bench.json`"
    regen = "`make bench` rewrites this page; " if fixed or not budgeted else ""
    return (
        "# Time to accuracy: results\n\n"
        f"Generated by `python benchmarks/protocol.py {argv}` from {source} ({regen}do not edit it by "
        "hand). The rules, the workloads, how each target was "
        f"chosen and what the numbers mean: [the protocol]({rules}).\n\n"
        f"{fixed_text if fixed or not budgeted else ''}{v2 if budgeted else ''}{body}"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-o", "--output", default="bench-out", help="output folder (default bench-out)")
    p.add_argument("--workloads", default=None, help="comma list (default: all of the workloads file)")
    p.add_argument("--workloads-file", default=str(HERE / "workloads.json"), help="default benchmarks/workloads.json")
    p.add_argument("--configs", default=None, help="override the configurations, e.g. ort,ort+skip")
    p.add_argument(
        "--config-file", default=None, help="named configurations (accelc bench --config-file), e.g. a study"
    )
    p.add_argument("--pass-options", default=None, help='JSON {pass: {option: value}}, e.g. {"skip": {"tau": 1.5}}')
    p.add_argument("--seeds", default=None, help="override the seeds, e.g. 0,1,2")
    p.add_argument("--epochs", type=int, default=None, help="override every workload's epoch cap")
    p.add_argument(
        "--budgets",
        default=None,
        help="protocol v2: epoch budgets, e.g. 2,4,8; each trained in full with the linear schedule, "
        "no stop at the target; writes OUT/<workload>/budget-<E>/ and fronts.json/.md/.png",
    )
    p.add_argument(
        "--train-limit", type=int, default=None, help="override every workload's training images (before --val-split)"
    )
    p.add_argument("--data", default=None, help='every workload\'s data (default: its "data", else fashion-mnist)')
    p.add_argument("--quick", action="store_true", help="one seed, fewer images and epochs: for trying things")
    p.add_argument("--calibrate", action="store_true", help="ort alone; proposes each workload's fixed target")
    p.add_argument("--report-only", action="store_true", help="only rebuild protocol.md (and --results)")
    p.add_argument(
        "--results",
        default=None,
        help="also write the tables as this whole results page, e.g. docs/results/time-to-accuracy.md",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    from accelc.compiler.errors import AccelcError

    try:
        if args.report_only:
            spec = load_workloads(Path(args.workloads_file))
            names = args.workloads.split(",") if args.workloads else list(spec["workloads"])
            results = Path(args.results) if args.results else None
            report(Path(args.output), names, results, " ".join(sys.argv[1:]), list(spec["workloads"]))
            return 0
        return run(args)
    except (Refused, AccelcError, KeyError, ValueError, OSError) as e:  # one line, exit 2
        what = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        print(f"protocol: error: {what}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
