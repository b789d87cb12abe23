"""``accelc passes``: list the passes and their options."""

from __future__ import annotations

import json

from ..compiler.pass_api import registered
from .args import Tool, default_text
from .report import plain


class Passes(Tool):
    """List the registered passes, their papers and options."""

    name = "passes"
    examples = ("accelc passes", "accelc passes --json")

    def add_arguments(self, p):
        p.add_argument("--json", action="store_true", help="machine-readable output")

    def run(self, a):
        reg = registered()
        if a.json:
            print(
                json.dumps(
                    {
                        n: {
                            "summary": c.summary,
                            "paper": c.paper,
                            "options": {
                                k: {"default": o.default, "help": o.help, "flag": c.flag(k), "choices": o.choices}
                                for k, o in c.options.fields().items()
                            },
                        }
                        for n, c in reg.items()
                    },
                    indent=1,
                    default=str,
                )
            )
            return 0
        if not reg:
            print("no passes registered")
        for n, c in reg.items():
            print(f"{n}: {c.summary}\n  paper: {c.paper}")
            for k, o in c.options.fields().items():
                choices = " {" + ",".join(o.choices) + "}" if o.choices else ""
                print(f"  {c.flag(k) + choices:28s} {plain(o.help)}{default_text(o.default)}")
        return 0
