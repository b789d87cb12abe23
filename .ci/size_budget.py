"""The size budget of accelc's product code (part of `make lint`): no module over MAX_FILE lines and
no function over MAX_FUNCTION lines in compiler/, runtime/, passes/ and facade/. A module or a
function that outgrows its budget is split by responsibility, not exempted.

    python .ci/size_budget.py           # exit 1 and one line per offender when over budget
    python .ci/size_budget.py --top 5   # also the largest files and functions
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

MAX_FILE = 650  # lines of a module
MAX_FUNCTION = 120  # lines of a function or method, decorators and docstring included
ROOTS = ("compiler", "runtime", "passes", "facade")


def sizes(root: Path) -> tuple[list, list]:
    files, functions = [], []
    for d in ROOTS:
        for p in sorted((root / d).rglob("*.py")):
            text = p.read_text(encoding="utf-8")
            rel = p.relative_to(root).as_posix()
            files.append((len(text.splitlines()), rel))
            for node in ast.walk(ast.parse(text, rel)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                    functions.append((node.end_lineno - first + 1, f"{rel}:{node.lineno} {node.name}"))
    return sorted(files, reverse=True), sorted(functions, reverse=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--top", type=int, default=0, help="also print the N largest files and functions")
    a = p.parse_args(argv)
    files, functions = sizes(Path(__file__).resolve().parent.parent)
    over = [f"{name}: {n} lines (budget {MAX_FILE} per module)" for n, name in files if n > MAX_FILE]
    over += [f"{name}: {n} lines (budget {MAX_FUNCTION} per function)" for n, name in functions if n > MAX_FUNCTION]
    if a.top:
        print("largest modules:", ", ".join(f"{name} {n}" for n, name in files[: a.top]))
        print("largest functions:", ", ".join(f"{name} {n}" for n, name in functions[: a.top]))
    for line in over:
        print(f"size budget: {line}", file=sys.stderr)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
