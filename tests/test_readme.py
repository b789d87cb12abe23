"""The README serves a newcomer: short, the two commands a fresh machine needs first, every method
in its pass table, and no link in it or in docs/ that leads nowhere."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _pages() -> list[Path]:
    return [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_readme_is_at_most_150_lines():
    n = len(README.read_text().splitlines())
    assert n <= 150, f"README.md has {n} lines; move detail to docs/"


def test_readme_starts_with_make_demo_and_make_test():
    lines = README.read_text().splitlines()
    first_block = lines[lines.index("```sh") + 1 :]
    assert lines.index("```sh") < 5, "the commands come right after the title"
    assert first_block[0].startswith("make demo") and first_block[1].startswith("make test")


def test_readme_pass_table_lists_every_installed_pass():
    """The pass names come from the tool itself (`accelc passes --json`), not from a list kept here."""
    p = subprocess.run(
        [sys.executable, "-m", "accelc", "passes", "--json"], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert p.returncode == 0, p.stderr
    names = list(json.loads(p.stdout))
    assert {"opt", "amp", "rescale", "reuse", "skip"} <= set(names)
    rows = [line for line in README.read_text().splitlines() if line.startswith("| ")]
    for name in names:
        assert any(re.match(rf"\| \[?`{name}`", row) for row in rows), f"pass {name} missing from the README's table"
        assert (ROOT / "docs" / "methods" / f"{name}.md").is_file(), f"no docs/methods/{name}.md"


def test_every_relative_link_resolves():
    broken = []
    for page in _pages():
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL, or an anchor in the same page
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "links to nothing:\n" + "\n".join(broken)


def test_generated_results_go_to_docs_results_never_the_readme():
    makefile = (ROOT / "Makefile").read_text()
    assert "--results docs/results/time-to-accuracy.md" in makefile
    assert "model_coverage.py -o docs/results/model-coverage" in makefile
    assert "--readme" not in makefile and "README" not in re.sub(r"(?m)^#.*$", "", makefile)
