"""accelc — compile CNN training graphs for ONNX Runtime Training with paper-derived passes.

Subcommands ('accelc SUBCOMMAND --help' for each):
  export    write a built-in zoo model as a training-ready ONNX file
  compile   build ORT training artifacts from an ONNX model and rewrite them with passes
  passes    list the passes and their options
  inspect   per-layer table of a model or artifact directory (FLOPs, bytes, what passes did)
  view      serve a model in Netron on 127.0.0.1
  train     train compiled artifacts on ORT Training
  bench     run several configurations side by side on the same model, weights and data

Built in the style of Polygraphy's tools: one class per subcommand, shared argument groups with one
set of defaults, one error policy in main(). Nothing here imports torch or ONNX Runtime
until a subcommand runs ('accelc --help' stays fast: python -X importtime -m accelc --help).

One module per tool (export, compile, passes, inspect, view, export_run, train, bench); args: the
shared argument groups and the Tool base; report and summary: the text printed; messages: where
error, warning and note lines go.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from .. import _startup
from ..compiler.compile import VERSION
from ..compiler.errors import AccelcError
from ..compiler.pass_api import PassOrderWarning
from ..launch import stop_on_signals
from . import messages
from .args import (
    ArgGroup,
    DataArgs,
    ExecArgs,
    GlobalArgs,
    MemoryArgs,
    OutputArgs,
    PassArgs,
    Tool,
    TrainingArgs,
)
from .bench import DEFAULT_CONFIGS, Bench
from .compile import Compile
from .export import Export
from .export_run import ExportRun
from .inspect import Inspect
from .passes import Passes
from .report import layer_table_text, plain
from .summary import training_summary
from .train import Train
from .view import View

__all__ = [
    "DEFAULT_CONFIGS",
    "TOOLS",
    "TOP_EXAMPLES",
    "ArgGroup",
    "Bench",
    "Compile",
    "DataArgs",
    "ExecArgs",
    "Export",
    "ExportRun",
    "GlobalArgs",
    "Inspect",
    "MemoryArgs",
    "OutputArgs",
    "Parser",
    "PassArgs",
    "Passes",
    "Tool",
    "Train",
    "TrainingArgs",
    "View",
    "build_parser",
    "layer_table_text",
    "main",
    "plain",
    "training_summary",
]

TOP_EXAMPLES = (
    "accelc export vgg -o vgg.onnx",
    "accelc compile vgg.onnx -o art --passes skip",
    "accelc train art --data fashion-mnist --epochs 3 -o run",
)


TOOLS = (Export, Compile, Passes, Inspect, View, Train, ExportRun, Bench)


class Parser(argparse.ArgumentParser):
    """argparse with accelc's error policy: a usage error is one line and a --help hint, exit 2."""

    def error(self, message):
        raise AccelcError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:

    top = Parser(
        prog="accelc",
        description=__doc__.split("\n")[0] + "\n\n'accelc SUBCOMMAND --help' describes each subcommand.",
        epilog="examples:\n" + "\n".join(f"  {e}" for e in TOP_EXAMPLES),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("--version", action="version", version=f"accelc {VERSION}")
    GlobalArgs().add(top, top=True)
    sub = top.add_subparsers(dest="cmd", metavar="SUBCOMMAND", parser_class=Parser)
    for cls in TOOLS:
        tool = cls()
        summary = cls.__doc__.splitlines()[0]
        p = sub.add_parser(
            tool.name,
            help=plain(summary),
            description=plain(cls.__doc__),
            epilog=tool.epilog(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        GlobalArgs().add(p)
        tool.add_arguments(p)
        p.set_defaults(tool=tool)
    return top


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return messages.reporting(lambda: _run(argv), verbose="-v" in argv or "--verbose" in argv)


def _run(argv: list[str]) -> int:
    _startup.done()  # from here, a Ctrl-C is the KeyboardInterrupt messages.reporting catches
    a = build_parser().parse_args(argv)
    if not getattr(a, "tool", None):
        raise AccelcError("a subcommand is required (see 'accelc --help')")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if a.quiet else "always", PassOrderWarning)  # -q: errors only
        warnings.showwarning = messages.note
        with stop_on_signals(a):  # compile, bench, export, export-run: SIGTERM/SIGHUP in one line
            return a.tool.run(a) or 0
