"""The reliability corpus, counted: runs the suite's hostile-input tests and reports, per cause of
issue 15 (and the round-1 cases that must keep holding), how many cases ran and how they ended.

Every case asserts its own contract (exit 2, one stderr line, no traceback, nothing left behind,
no sentinel text echoed; or the API's AccelcError with the CLI's message), so a case that passes is
a clean refusal (or, for the positive cases, a correct success) and a failure names its kind in
pytest's output.

    python benchmarks/reliability_corpus.py [--md docs/reliability.md] [--json out.json] [-n 2]
    python benchmarks/reliability_corpus.py --collect    # count the cases per cause, run nothing

A test's cause is its ``@pytest.mark.cause(N)`` marker (read from the source, so the count needs no
test name to carry it), else its file's cause in BY_FILE, else 0 (round 1).
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FILES = [
    "tests/test_outputs_runs.py",
    "tests/test_kills.py",
    "tests/test_data_checks.py",
    "tests/test_scalars_resources.py",
    "tests/test_untrusted_files.py",
    "tests/test_view_security.py",
    "tests/test_api_parity.py",
    "tests/test_reliability.py",
    "tests/test_view.py",
    "tests/test_round3_outputs.py",
    "tests/test_round3_runs.py",
    "tests/test_round3_inputs.py",
    "tests/test_round3_models.py",
    "tests/test_round_trip.py",
    "tests/test_ort_checkpoint.py",
]
# round 3 (issue 32): one cause per file, its tests named for the behaviour
BY_FILE = {
    "test_round3_outputs": 13,
    "test_round3_runs": 14,
    "test_round3_inputs": 15,
    "test_round3_models": 16,
    "test_round_trip": 17,
}
CAUSES = {
    1: "data loss (--force, -o, kills during compile)",
    2: "orphaned worker, run-directory lock",
    3: "resume all or nothing (verified checkpoints)",
    4: "labels and data files",
    5: "scalar parameters",
    6: "files accelc reads back",
    7: "resources (memory, threads)",
    8: "accelc view",
    9: "output and names",
    10: "accelc bench",
    11: "flags and the Python API agree",
    12: "compile accepts what train cannot run",
    13: "round 3: outputs that appear while writing, look-alike temporaries, signals",
    14: "round 3: a run's last records, export-run's search, steps.csv, logs, full disk",
    15: "round 3: unbounded inputs, raw exceptions, reserved bench names",
    16: "round 3: shape arithmetic, planted library, Where, rendezvous",
    17: "round 3: every file accelc writes reads back (62-conv model, every pass)",
    0: "round 1 (must keep holding)",
}


def _marked_cause(decorators) -> int | None:
    """N of a ``pytest.mark.cause(N)`` among ``decorators`` (AST nodes), else None."""
    for d in decorators:
        if (
            isinstance(d, ast.Call)
            and isinstance(d.func, ast.Attribute)
            and d.func.attr == "cause"
            and isinstance(d.func.value, ast.Attribute)
            and d.func.value.attr == "mark"
            and d.args
            and isinstance(d.args[0], ast.Constant)
            and isinstance(d.args[0].value, int)
        ):
            return d.args[0].value
    return None


def _pytestmark(tree: ast.Module) -> int | None:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            marks = node.value.elts if isinstance(node.value, (ast.List, ast.Tuple)) else [node.value]
            return _marked_cause(marks)
    return None


def cause_markers(files=FILES) -> dict[tuple[str, str], int]:
    """(module, test function) -> N for every test carrying ``@pytest.mark.cause(N)`` (on itself, its
    class, or the module's ``pytestmark``) in ``files``."""
    table: dict[tuple[str, str], int] = {}
    for f in files:
        tree = ast.parse((REPO / f).read_text(), f)
        module = Path(f).stem
        module_cause = _pytestmark(tree)
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                class_cause = _marked_cause(node.decorator_list) or module_cause
                funcs = [(n, class_cause) for n in node.body if isinstance(n, ast.FunctionDef)]
            elif isinstance(node, ast.FunctionDef):
                funcs = [(node, module_cause)]
            else:
                continue
            for fn, outer in funcs:
                c = _marked_cause(fn.decorator_list) or outer
                if c is not None:
                    table[(module, fn.name)] = c
    return table


def _module_of(classname: str) -> str:
    """'tests.test_kills' or 'tests.test_x.TestY' (junit classname) or 'tests/test_x.py' -> 'test_x'."""
    parts = classname.replace("/", ".").removesuffix(".py").split(".")
    return next((p for p in parts if p.startswith("test_")), parts[-1])


def cause_of(name: str, module: str = "", markers: dict | None = None) -> int:
    """The cause of test ``name`` (``test_f`` or ``test_f[param]``) in ``module``: its marker, else
    its file's cause, else 0."""
    mod = _module_of(module)
    marked = (cause_markers() if markers is None else markers).get((mod, name.split("[", 1)[0]))
    if marked is not None:
        return marked
    return BY_FILE.get(mod, 0)


def collect() -> int:
    """Count the cases per cause from ``pytest --collect-only`` (runs no test)."""
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", *FILES], cwd=REPO, capture_output=True, text=True
    )
    if r.returncode != 0:
        print(r.stdout[-3000:] + r.stderr[-3000:], file=sys.stderr)
        return 1
    markers = cause_markers()
    counts: Counter = Counter()
    for line in r.stdout.splitlines():
        if "::" in line:
            path, _, rest = line.partition("::")
            counts[cause_of(rest.split("[", 1)[0].split("::")[-1], path, markers)] += 1
    print(
        json.dumps(
            {"total": sum(counts.values()), "by_cause": {str(k): v for k, v in sorted(counts.items())}}, indent=1
        )
    )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--md", default=None, help="write a markdown table here")
    ap.add_argument("--json", default=None, help="write the counts here")
    ap.add_argument("-n", default="2", help="pytest-xdist workers (default 2)")
    ap.add_argument("--collect", action="store_true", help="only count the cases per cause (runs no test)")
    a = ap.parse_args()
    if a.collect:
        return collect()
    markers = cause_markers()
    with tempfile.TemporaryDirectory() as d:
        xml = Path(d) / "r.xml"
        t0 = time.time()
        subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-n", a.n, f"--junitxml={xml}", *FILES],
            cwd=REPO,
            check=False,
        )
        seconds = time.time() - t0
        root = ET.parse(xml).getroot()
    counts: dict[int, Counter] = defaultdict(Counter)
    failures = []
    for tc in root.iter("testcase"):
        name = tc.get("name")
        kind = "passed"
        for tag in ("failure", "error", "skipped"):
            if tc.find(tag) is not None:
                kind = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
        counts[cause_of(name, tc.get("classname") or "", markers)][kind] += 1
        if kind in ("failed", "error"):
            failures.append(f"{tc.get('classname')}::{name}")
    total = Counter()
    for c in counts.values():
        total.update(c)
    report = {
        "seconds": round(seconds, 1),
        "total": dict(total),
        "by_cause": {str(k): dict(v) for k, v in sorted(counts.items())},
        "failures": failures,
    }
    print(json.dumps(report, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    if a.md:
        rows = [
            f"| {k or '-'} | {CAUSES[k]} | {sum(v.values())} | {v['passed']} | {v['failed'] + v['error']} | {v['skipped']} |"
            for k, v in sorted(counts.items(), key=lambda kv: (kv[0] == 0, kv[0]))
        ]
        Path(a.md).write_text(
            "# Reliability corpus\n\n"
            "Generated by `python benchmarks/reliability_corpus.py --md docs/reliability.md` "
            f"({time.strftime('%Y-%m-%d')}, {seconds:.0f} s). A case is one test id; several ids loop "
            "over more inputs inside (e.g. the 44 traversal paths of the Netron server). Each asserts exit 2, "
            "one stderr line, no traceback, nothing left behind and no sentinel text echoed (or the API's "
            "AccelcError with the CLI's message), or, for positive cases, the correct result.\n\n"
            "| cause | what | cases | passed | failed | skipped |\n|---|---|---|---|---|---|\n"
            + "\n".join(rows)
            + f"\n| | **total** | {sum(total.values())} | {total['passed']} | {total['failed'] + total['error']} "
            f"| {total['skipped']} |\n"
        )
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
