"""The argument groups several tools share (one set of defaults each) and the :class:`Tool` base."""

from __future__ import annotations

import argparse

from .. import api  # noqa: F401  (installs the methods: their options become flags)
from ..compiler.compile import DEFAULT_LR
from ..compiler.errors import AccelcError
from ..compiler.pass_api import registered
from ..runtime.config import LAYOUTS
from ..runtime.kernels import ORT, providers
from .report import plain


class ArgGroup:
    """A set of options several subcommands share, added with one set of defaults."""

    title = ""

    def add(self, parser: argparse.ArgumentParser, **defaults) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class GlobalArgs(ArgGroup):
    """-v / -q, accepted before or after the subcommand."""

    def add(self, parser, top: bool = False, **defaults):
        kw = {} if top else {"default": argparse.SUPPRESS}
        parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks and details", **kw)
        parser.add_argument("-q", "--quiet", action="store_true", help="print only errors", **kw)


class OutputArgs(ArgGroup):
    def add(self, parser, output: str | None = None, what: str = "output directory", force_help: str = ""):
        if output is None:
            parser.add_argument("-o", "--output", required=True, help=f"{what} to create")
        else:
            parser.add_argument("-o", "--output", default=output, help=f"{what} (default {output})")
        parser.add_argument("--force", action="store_true", help=force_help or f"replace the {what} if it exists")


class DataArgs(ArgGroup):
    def add(self, parser, **_):
        g = parser.add_argument_group("data")
        g.add_argument(
            "--data",
            default="synthetic",
            help="synthetic[:N] | fashion-mnist[:DIR] | fashion-mnist-multiscale[:DIR] | imagefolder:DIR (default synthetic)",
        )
        g.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
        g.add_argument("--test-limit", type=int, default=None, help="use only the first N test images")


class TrainingArgs(ArgGroup):
    def add(self, parser, lr=DEFAULT_LR, lr_help: str = "", epochs: int = 3, schedule: bool = False, **_):
        """``schedule``: also --lr-schedule."""
        g = parser.add_argument_group("training")
        g.add_argument("--epochs", type=int, default=epochs, help=f"epochs to train (default {epochs})")
        g.add_argument("--batch-size", type=int, default=64, help="training batch size (default 64)")
        g.add_argument("--seed", type=int, default=0, help="seed of the data order (default 0)")
        g.add_argument("--lr", type=float, default=lr, help=lr_help or f"learning rate (default {lr})")
        if schedule:
            g.add_argument(
                "--lr-schedule",
                default="constant",
                metavar="constant|linear[:W]",
                help="the learning rate over the run: constant (default), or linear: the epochs are a budget, "
                "the rate rises over the first W of its steps (default 0.05) and falls linearly to zero at the "
                "last, e.g. --epochs 16 --lr-schedule linear:0.1",
            )


class ExecArgs(ArgGroup):
    def add(self, parser, **_):
        g = parser.add_argument_group("execution")
        g.add_argument(
            "--device",
            default="cpu",
            help="cpu (default) or cuda: the whole step on torch's CUDA kernels (a torch with CUDA and a GPU; no ORT "
            "Training CUDA build), refused by op name when an op has no CUDA kernel, e.g. --device cuda",
        )
        g.add_argument(
            "--threads",
            type=int,
            default=None,
            help="threads of ORT and of accelc's kernels (default: all cores; with --nproc, the cores shared among the processes)",
        )

        kinds = ", ".join(f"{n}={'|'.join(p.implementations + (ORT,))}" for n, p in providers().items())
        g.add_argument(
            "--kernel",
            action="append",
            default=[],
            metavar="NAME=IMPL",
            help=f"implementation of a node kernel, repeatable: {kinds or 'none registered'} "
            f"(default: the first on CPU, {ORT} on CUDA); all={ORT} runs the whole step on ORT Training's own "
            "kernels (the reference), e.g. --kernel all=ort",
        )

        g.add_argument(
            "--layout",
            default="auto",
            metavar="|".join(LAYOUTS),
            help="memory layout of the activations for the whole step: nchw (ONNX's), nhwc (torch's "
            "channels_last) or auto (default: the faster of the two, timed on the first step of each batch "
            "shape, when the step's activations reach 64 MiB; else nchw), e.g. --layout nhwc",
        )


class MemoryArgs(ArgGroup):
    def add(self, parser, **_):
        parser.add_argument(
            "--memory-limit",
            type=float,
            default=None,
            metavar="GB",
            help="refuse work whose memory estimate (from the shapes, before allocating) exceeds GB "
            "(default: 80%% of the memory available when the command starts), e.g. --memory-limit 40",
        )


class PassArgs(ArgGroup):
    """--passes, --no-opt and every registered pass's option flags."""

    def add(self, parser, selection: bool = True, **_):
        """``selection``: also --passes and --no-opt (compile); bench takes only the option flags."""
        reg = registered()
        g = parser.add_argument_group("passes")
        optional = [n for n, c in reg.items() if not c.default]
        if selection:
            self._selection(g, optional)
        for pname, cls in reg.items():
            pg = parser.add_argument_group(f"pass {pname}", plain(cls.summary))
            for oname, opt in cls.options.fields().items():
                flag = cls.flag(oname)
                pg.add_argument(
                    flag,
                    dest=_dest(flag),
                    default=None,
                    metavar="{" + ",".join(opt.choices) + "}" if opt.choices else oname.upper(),
                    help=plain(f"{opt.help}{default_text(opt.default)}").replace("%", "%%"),
                )

    @staticmethod
    def _selection(g, optional):
        g.add_argument(
            "--passes",
            default="none",
            metavar="PASS[,PASS...]",
            help=f"passes to run, comma-separated, or 'none' (default); passes: {', '.join(optional)} "
            f"(given in another order, they run in this one, with a note); 'accelc passes' describes them",
        )
        g.add_argument(
            "--no-opt",
            action="store_true",
            help="do not run the default 'opt' pass (with --passes none: ORT's plain artifacts, unchanged)",
        )

    @staticmethod
    def options(a, names: list[str] | None) -> dict:
        """The pass option flags given, {pass: {option: value}}; ``names``: the passes that run
        (None: bench, where parse_configs checks that some configuration runs each)."""
        opts: dict = {}
        for pname, cls in registered().items():
            for oname in cls.options.fields():
                val = getattr(a, _dest(cls.flag(oname)), None)
                if val is not None:
                    if names is not None and pname not in names:
                        raise AccelcError(f"{cls.flag(oname)} given but pass '{pname}' is not in --passes")
                    opts.setdefault(pname, {})[oname] = val
        return opts


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def default_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        value = ",".join(":".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v) for v in value)
    return f" (default: {value})"


# ----------------------------------------------------------------------------- tools
class Tool:
    """One subcommand: its name, description (first line = summary), examples, arguments, run."""

    name = ""
    examples: tuple = ()

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        pass

    def run(self, a) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def epilog(self) -> str:
        return "examples:\n" + "\n".join(f"  {e}" for e in self.examples) if self.examples else ""
