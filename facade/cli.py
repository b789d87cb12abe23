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
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import traceback
import warnings
from pathlib import Path

from . import _startup, api
from . import passes as _passes  # noqa: F401  (registers the passes: their options become flags)
from .bench import markdown, parse_configs, run_bench
from .compiler import checks
from .compiler.artifact_dir import load_artifacts
from .compiler.compile import DEFAULT_LR, VERSION, cost_total, explain
from .compiler.cost import gflops
from .compiler.errors import AccelcError, show
from .compiler.model import check_step_memory
from .compiler.pass_api import PassOrderWarning, parse_pass_list, registered
from .launch import launch_local, local_threads, stop_on_signals, supervise, torchrun_config
from .runtime.config import ExecConfig, parse_kernel_choices
from .runtime.data import check_data
from .runtime.distributed import DEFAULT_TIMEOUT_S, MAX_WORLD, DistConfig
from .runtime.kernels import ORT, providers
from .runtime.runlock import die_with_parent
from .runtime.train import open_run_dir, release_run_dir
from .scaling import markdown as scaling_markdown
from .scaling import run_scaling

DEFAULT_CONFIGS = "torch,ort"
_RST = (
    (re.compile(r":[a-z]+:`~?([^`]+)`"), r"\1"),  # :func:`x`, :class:`~a.b`
    (re.compile(r"``([^`]+)``"), r"'\1'"),
    (re.compile(r"`([^`]+)`"), r"'\1'"),
)


def plain(text: str) -> str:
    """Help text without RST markup (``x``, :func:`x`, `x`): what a terminal shows."""
    for pat, sub in _RST:
        text = pat.sub(sub, text)
    return text


def _fmt_num(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(r):
        return "  ".join(str(c).ljust(w) for c, w in zip(r, widths))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def layer_table_text(view: dict) -> str:
    rows = []
    for r in view["layers"]:
        rows.append(
            [
                show(r["name"], 60),
                show(r["op"], 30),
                _fmt_num(r["param_count"]),
                "x".join(map(str, r["weight_shape"])),
                "x".join(map(str, r["output_shape"])),
                _flops_cell(r["flops_fwd"], r.get("flops_fwd_bound")),
                _flops_cell(r["flops_bwd"], r.get("flops_bwd_bound")),
                _fmt_num(r["bytes_fwd"]) + "B",
                _fmt_num(r["bytes_bwd"]) + "B",
                show(",".join(r["passes"]), 60) or ("frozen" if not r["trainable"] else "-"),
            ]
        )
    out = _table(
        rows,
        ["layer", "op", "params", "weight", "output", "fwd FLOPs", "bwd FLOPs", "fwd bytes", "bwd bytes", "passes"],
    )
    ph = view["costs"]["phases"]
    out += "\n\n" + "  ".join(f"{k}: {_fmt_num(v['flops'])}FLOPs {_fmt_num(v['bytes'])}B" for k, v in ph.items())
    if any(r.get("flops_fwd_bound", r["flops_fwd"]) > r["flops_fwd"] for r in view["layers"]):
        out += "\nFLOPs marked ~ are expected values (known only while training), with their upper bound in ( )"
    before = cost_total(view.get("costs_before") or {})
    if before:
        out += f"\nplain ORT training step: {gflops(before['flops'])}"
    return out


def _flops_cell(flops: float, bound: float | None) -> str:
    if bound is None or bound <= flops * (1 + 1e-9):
        return _fmt_num(flops)
    return f"~{_fmt_num(flops)} (<={_fmt_num(bound)})"


# ----------------------------------------------------------------------------- argument groups
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
            help="synthetic[:N] | fashion-mnist[:DIR] | imagefolder:DIR (default synthetic)",
        )
        g.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
        g.add_argument("--test-limit", type=int, default=None, help="use only the first N test images")


class TrainingArgs(ArgGroup):
    def add(self, parser, lr=DEFAULT_LR, lr_help: str = "", epochs: int = 3, **_):
        g = parser.add_argument_group("training")
        g.add_argument("--epochs", type=int, default=epochs, help=f"epochs to train (default {epochs})")
        g.add_argument("--batch-size", type=int, default=64, help="training batch size (default 64)")
        g.add_argument("--seed", type=int, default=0, help="seed of the data order (default 0)")
        g.add_argument("--lr", type=float, default=lr, help=lr_help or f"learning rate (default {lr})")


class ExecArgs(ArgGroup):
    def add(self, parser, **_):
        g = parser.add_argument_group("execution")
        g.add_argument("--device", default="cpu", help="cpu (default) or cuda (needs the gpu extra)")
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

    @staticmethod
    def config(a):

        return ExecConfig(device=a.device, threads=a.threads, kernels=parse_kernel_choices(a.kernel))


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
            for oname, opt in cls.options.items():
                flag = cls.flag(oname)
                pg.add_argument(
                    flag,
                    dest=_dest(flag),
                    default=None,
                    metavar="{" + ",".join(opt.choices) + "}" if opt.choices else oname.upper(),
                    help=plain(f"{opt.help}{_default_text(opt.default)}").replace("%", "%%"),
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
            for oname in cls.options:
                val = getattr(a, _dest(cls.flag(oname)), None)
                if val is not None:
                    if names is not None and pname not in names:
                        raise AccelcError(f"{cls.flag(oname)} given but pass '{pname}' is not in --passes")
                    opts.setdefault(pname, {})[oname] = val
        return opts


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _default_text(value) -> str:
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


TOP_EXAMPLES = (
    "accelc export vgg -o vgg.onnx",
    "accelc compile vgg.onnx -o art --passes skip",
    "accelc train art --data fashion-mnist --epochs 3 -o run",
)


class Export(Tool):
    """Write a built-in zoo model (or list the zoo) as an ONNX file exported for training."""

    name = "export"
    examples = (
        "accelc export --list",
        "accelc export vgg -o vgg.onnx",
        "accelc export largekernel --input-shape 1,64,64 -o lk.onnx",
    )

    def add_arguments(self, p):
        p.add_argument("name", nargs="?", help="zoo model name (omit or --list to list the zoo)")
        p.add_argument("-o", "--output", help="output .onnx path")
        p.add_argument("--list", action="store_true", help="list the zoo")
        p.add_argument("--input-shape", help="C,H,W of the input (default: the model's own)")
        p.add_argument("--num-classes", type=int, default=10, help="classes of the head (default 10)")
        p.add_argument("--seed", type=int, default=0, help="seed of the initial weights (default 0)")
        MemoryArgs().add(p)

    def run(self, a):
        from .compiler.export import ZOO, export_zoo  # heavy: torch

        if a.list or not a.name:
            for k, (_, shape, desc) in ZOO.items():
                print(f"{k:12s} input {'x'.join(map(str, shape)):9s} {desc}")
            return 0
        if not a.output:
            raise AccelcError("export needs -o OUTPUT.onnx")
        export_zoo(a.name, a.output, a.input_shape, a.num_classes, a.seed, memory_limit_gb=a.memory_limit)
        if not a.quiet:
            print(f"wrote {show(a.output)}")
        return 0


class Compile(Tool):
    """Build ORT training artifacts (training/eval/optimizer models, checkpoint) and run passes."""

    name = "compile"
    examples = (
        "accelc compile vgg.onnx -o art",
        "accelc compile vgg.onnx -o art-skip --passes skip",
        "accelc compile vgg.onnx -o art-fixed --passes skip --skip-layers features.0,features.3",
    )

    def add_arguments(self, p):
        p.add_argument("model", help="forward ONNX model exported for training (see accelc export / accelc.export)")
        OutputArgs().add(p, what="artifact directory")
        PassArgs().add(p)
        g = p.add_argument_group("training graph")
        g.add_argument("--loss", default="cross_entropy", help="loss appended to the model: cross_entropy (default)")
        g.add_argument("--optimizer", default="adamw", help="adamw (default) or sgd")
        g.add_argument(
            "--lr", type=float, default=DEFAULT_LR, help=f"learning rate recorded for training (default {DEFAULT_LR})"
        )
        g.add_argument("--batch-size", type=int, default=64, help="batch size used for cost accounting (default 64)")
        g.add_argument("--no-validate", action="store_true", help="skip ORT-session and numeric validation")
        MemoryArgs().add(p)

    def run(self, a):
        names = parse_pass_list(a.passes)
        report = api.compile(
            a.model,
            a.output,
            names,
            PassArgs.options(a, names + ([] if a.no_opt else ["opt"])),
            loss=a.loss,
            optimizer=a.optimizer,
            lr=a.lr,
            batch_size=a.batch_size,
            force=a.force,
            validate_result=not a.no_validate,
            opt=not a.no_opt,
            memory_limit_gb=a.memory_limit,
        )
        for w in report["warnings"]:
            print(f"accelc: warning: {show(w, 2000)}", file=sys.stderr)
        if not a.quiet:
            b, f = report["costs"]["before"]["total"], report["costs"]["after"]["total"]
            ran = [p["name"] for p in report["passes"]]
            print(
                f"compiled {show(a.model)} -> {show(a.output)} in {report['compile_seconds']:.2f}s "
                f"(passes: {','.join(ran) or 'none'}; {report['model']['param_count']:,} params)"
            )
            for line in explain(report):
                print(line)
            if names:
                bound = f" expected (at most {gflops(f['flops_bound'])})" if f["flops_bound"] > f["flops"] else ""
                print(
                    f"training-step cost (cost model): {gflops(b['flops'])} -> {gflops(f['flops'])}{bound}, "
                    f"{_fmt_num(b['bytes'])}B -> {_fmt_num(f['bytes'])}B read and written"
                )
        return 0


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
                                for k, o in c.options.items()
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
            for k, o in c.options.items():
                choices = " {" + ",".join(o.choices) + "}" if o.choices else ""
                print(f"  {c.flag(k) + choices:28s} {plain(o.help)}{_default_text(o.default)}")
        return 0


class Inspect(Tool):
    """Per-layer table: name, op, params, shapes, forward/backward FLOPs and bytes, what passes did."""

    name = "inspect"
    examples = ("accelc inspect art", "accelc inspect vgg.onnx --json")

    def add_arguments(self, p):
        p.add_argument("path", help="artifact directory, training model or forward ONNX model")
        p.add_argument("--json", action="store_true", help="print {'layers': [...]} as JSON, in topological order")

    def run(self, a):
        view = api.inspect(a.path)
        if a.json:
            print(
                json.dumps(
                    {
                        "layers": view["layers"],
                        "costs": view["costs"],
                        "passes": view.get("passes", []),
                        "verified": view.get("verified"),
                        "warnings": view.get("warnings", []),
                        "engine": view.get("engine"),
                    },
                    indent=1,
                )
            )
        else:
            print(layer_table_text(view))
            for w in view.get("warnings", []):
                print(f"note: {show(w, 400)}")
            eng = view.get("engine")
            if eng:
                fb = ", ".join(f"{k}×{v}" for k, v in sorted(eng["fell_back"].items()))
                print(
                    f"engine: {eng['kernel_nodes']} of {eng['nodes']} training-graph nodes on accelc's kernels"
                    + (f"; left to ORT: {fb}" if fb else "; no ORT in the step")
                )
            lines = explain(view)
            if lines:
                print()
            for line in lines:
                print(line)
        return 0


class View(Tool):
    """Serve one model in Netron on 127.0.0.1 until Ctrl-C (only that model and its external data)."""

    name = "view"
    examples = (
        "accelc view art",
        "accelc view art --changes",
        "accelc view art --graph stage-low/eval --port 8081",
    )

    def add_arguments(self, p):
        p.add_argument("path", help="ONNX file or artifact directory (its training model, or --graph)")
        p.add_argument(
            "--graph",
            default=None,
            metavar="GRAPH",
            help="of an artifact directory: training (default), eval, optimizer, a stage (stage-low) "
            "or a stage's graph (stage-low/eval)",
        )
        p.add_argument(
            "--changes",
            action="store_true",
            help="mark what the passes touched: each node a pass added or changed is titled [PASS] OpType",
        )
        p.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (default 8080; 0 picks a free one)")
        p.add_argument("--browse", action="store_true", help="open a web browser")
        MemoryArgs().add(p)
        # no --no-block: a command that returns cannot keep serving without daemonising; from Python,
        # accelc.compiler.view.start() returns a server that runs while the caller's process lives

    def run(self, a):
        from .compiler.view import serve  # heavy: netron

        checks.memory_limit_gb(getattr(a, "memory_limit", None))
        serve(
            a.path,
            a.port,
            block=True,
            browse=a.browse,
            memory_limit=getattr(a, "memory_limit", None),
            graph=a.graph,
            changes=a.changes,
        )
        return 0


class ExportRun(Tool):
    """Write a trained run as an inference ONNX model (and an ORT training checkpoint)."""

    name = "export-run"
    examples = (
        "accelc export-run run -o model.onnx",
        "accelc export-run run -o model.onnx --artifacts art --ort-checkpoint model.ckpt",
    )

    def add_arguments(self, p):
        p.add_argument("run", help="run directory written by accelc train")
        p.add_argument("-o", "--output", required=True, help="inference ONNX model to write (.onnx)")
        p.add_argument(
            "--artifacts",
            help="artifact directory the run was trained from (default: found beside the run or in the "
            "current folder, verified by the hash its checkpoint records)",
        )
        p.add_argument(
            "--epoch", type=int, default=None, help="epoch to export, from 1 (default: the last, the one a run keeps)"
        )
        p.add_argument(
            "--ort-checkpoint",
            metavar="PATH",
            help="also write an ORT training CheckpointState with the trained parameters "
            "(onnxruntime.training.api.Module(training_model.onnx, state, eval_model.onnx) continues from it)",
        )
        p.add_argument("--force", action="store_true", help="replace output files that exist")

    def run(self, a):
        r = api.export_run(
            a.run, a.output, artifacts=a.artifacts, epoch=a.epoch, ort_checkpoint=a.ort_checkpoint, force=a.force
        )
        if not a.quiet:
            print(
                f"wrote {show(r['output'])}: epoch {r['epoch']} (test accuracy {r['test_acc']:.4f}), "
                f"{r['parameter_count']:,} parameter values, opset {r['opset'].get('ai.onnx')}, IR {r['ir_version']}"
            )
            if r["ort_checkpoint"]:
                print(
                    f"wrote {show(r['ort_checkpoint'])}: ORT CheckpointState of {r['ort_checkpoint_parameters']} "
                    f"parameters (artifacts: {show(r['artifacts'])})"
                )
        return 0


class Train(Tool):
    """Train compiled artifacts on ORT Training: metrics.jsonl, summary.json, plot, checkpoints."""

    name = "train"
    examples = (
        "accelc train art --data fashion-mnist --epochs 3 -o run",
        "accelc train art --data synthetic:2000 --epochs 5 -o run --resume",
        "accelc train art --data synthetic:2000 --epochs 8 -o run --resume --allow-change epochs",
        "accelc train art --kernel conv=ort -o run-ort-convs",
    )

    def add_arguments(self, p):
        p.add_argument("artifacts", help="artifact directory made by accelc compile")
        DataArgs().add(p)
        TrainingArgs().add(p, lr=None, lr_help="learning rate (default: the one compiled in)")
        ExecArgs().add(p)
        MemoryArgs().add(p)
        OutputArgs().add(p, output="run", what="run directory", force_help="replace a non-empty run directory")
        p.add_argument(
            "--resume",
            action="store_true",
            help="continue from the run directory's last checkpoint (verified: same artifacts, data and settings)",
        )
        p.add_argument(
            "--allow-change",
            metavar="SETTINGS",
            default=None,
            help="with --resume: settings that may differ from the checkpoint's, comma-separated: "
            "batch-size, epochs (e.g. --resume --epochs 10 --allow-change epochs)",
        )
        g = p.add_argument_group("data-parallel training (torch.distributed: gloo on CPU, NCCL on CUDA)")
        g.add_argument(
            "--nproc",
            type=int,
            default=1,
            metavar="N",
            help="train on N processes of this machine, data-parallel: each trains 1/N of every "
            "--batch-size batch (the global batch, a multiple of N) with the cores shared among them; "
            "gradients are averaged before every step, so the result is the one-process run's. "
            "Several machines: start 'torchrun --nnodes M --nproc-per-node N ... -m accelc train ...' "
            "on each instead (default 1), e.g. --nproc 2",
        )
        g.add_argument(
            "--dist-timeout",
            type=float,
            default=DEFAULT_TIMEOUT_S,
            metavar="SECONDS",
            help=f"end the job when a rank waits this long for the others (default {DEFAULT_TIMEOUT_S:g})",
        )
        p.add_argument(
            "--log",
            metavar="{csv,tensorboard,none}[,...]",
            default="csv",
            help="logs besides metrics.jsonl, comma-separated: csv (metrics.csv, steps.csv), tensorboard "
            "(RUN_DIR/tensorboard/, needs the tensorboard package), none (default: csv), e.g. --log csv,tensorboard",
        )
        p.add_argument("--dist-rank", type=int, default=None, help=argparse.SUPPRESS)  # worker of --nproc
        p.add_argument("--dist-world", type=int, default=None, help=argparse.SUPPRESS)
        p.add_argument("--dist-init", default=None, help=argparse.SUPPRESS)
        p.add_argument("--error-fd", type=int, default=None, help=argparse.SUPPRESS)  # worker: its error line
        p.add_argument("--lock-fd", type=int, default=None, help=argparse.SUPPRESS)  # worker: the parent's lock
        p.add_argument("--supervised-by", type=int, default=None, help=argparse.SUPPRESS)  # worker: parent PID
        p.add_argument(
            "--in-process",
            action="store_true",
            help="train in this process (default: in a supervised worker process, so a native crash "
            "inside ONNX Runtime is reported with what was saved)",
        )

    @staticmethod
    def dist_config(a):
        """This process's rank: from --nproc's hidden worker flags, from torchrun's environment,
        or None (one process)."""
        if a.dist_rank is not None:
            return DistConfig(
                rank=a.dist_rank, world_size=a.dist_world, init_method=a.dist_init, timeout_s=a.dist_timeout
            )
        return torchrun_config(os.environ, a.dist_timeout)

    def run(self, a):
        if a.supervised_by is not None and (not a.in_process or a.supervised_by != os.getppid()):
            # the PID of the accelc process that started this worker (its parent), never a user's
            raise AccelcError(
                "--supervised-by is accelc's own flag for the training worker it starts; leave it out "
                "(to train in this process, give --in-process)"
            )
        checks.positive_int("--nproc", a.nproc, MAX_WORLD)
        checks.positive_float("--dist-timeout", a.dist_timeout, 86400)
        if a.in_process and a.nproc > 1 and a.dist_rank is None:
            raise AccelcError(
                f"--in-process trains in this one process and --nproc {a.nproc} starts {a.nproc} processes: "
                "give one or the other"
            )
        dist = self.dist_config(a)
        if dist is not None and a.nproc > 1 and a.dist_rank is None:
            raise AccelcError(
                "--nproc starts its own processes: under torchrun, leave it out (torchrun sets the ranks)"
            )
        world = dist.world_size if dist else a.nproc
        if a.batch_size % world:
            raise AccelcError(
                f"--batch-size {a.batch_size} (the global batch) must be a multiple of the number of processes ({world})"
            )
        if a.threads is None and world > 1:  # the cores shared among this machine's ranks
            a.threads = local_threads(os.environ, a.nproc if dist is None else world)
        if a.error_fd is not None:
            global _ERROR_FD
            _ERROR_FD = a.error_fd
        if not a.in_process:
            # check what can be checked cheaply here, lock the run directory, then train in a
            # supervised worker that holds the same lock and dies with this process
            api.check_train_args(
                epochs=a.epochs,
                batch_size=a.batch_size,
                seed=a.seed,
                lr=a.lr,
                threads=a.threads,
                train_limit=a.train_limit,
                test_limit=a.test_limit,
                device=a.device,
                data=a.data,
                memory_limit_gb=a.memory_limit,
            )
            art, _ = load_artifacts(a.artifacts)
            check_step_memory(art.info, a.batch_size, a.memory_limit, f"training at --batch-size {a.batch_size}")
            check_data(
                a.data,
                art.info.input_shape,
                art.info.num_classes,
                a.train_limit,
                a.test_limit,
                memory_limit_gb=a.memory_limit,
            )
            ExecArgs.config(a)
            worker = a.argv + ["--in-process", "--supervised-by", str(os.getpid())]
            if dist is not None and dist.rank != 0:  # a torchrun rank that does not write the run directory
                return supervise(
                    worker + ["--threads", str(a.threads)], Path(os.path.abspath(a.output)), None, a.epochs
                )
            rd, lock = open_run_dir(a.output, a.resume, a.force, protect=[a.artifacts])
            try:
                if a.nproc > 1:
                    return launch_local(worker, a.nproc, rd, lock, a.epochs, a.threads)
                if a.threads is not None:
                    worker += ["--threads", str(a.threads)]
                return supervise(worker + ["--lock-fd", str(lock.fd)], rd, lock, a.epochs)
            finally:
                release_run_dir(rd, lock, lock.created)
        if a.supervised_by is not None:
            die_with_parent(a.supervised_by)
            global _SUPERVISED
            _SUPERVISED = True
        s = api.train(
            a.artifacts,
            a.data,
            a.epochs,
            a.batch_size,
            a.output,
            a.device,
            a.seed,
            a.resume,
            a.lr,
            a.threads,
            a.train_limit,
            a.test_limit,
            a.force,
            progress=not a.quiet,
            kernels=ExecArgs.config(a).kernels,
            allow_change=a.allow_change or (),
            memory_limit_gb=a.memory_limit,
            log=a.log,
            _lock_fd=a.lock_fd,
            _dist=dist,
        )
        if not a.quiet and (dist is None or dist.rank == 0):
            for line in training_summary(s, _read_json(Path(a.artifacts) / "plan.json").get("controllers"),
                                         _read_json(Path(a.artifacts) / "report.json")):  # fmt: skip
                print(line)
            print(
                f"final test accuracy {s['final_test_acc']:.4f} (best {s['best_test_acc']:.4f} at epoch "
                f"{s['best_epoch']}), {s['train_time']:.1f}s training; wrote {show(a.output)}/"
            )
        return 0


def _read_json(path: Path) -> dict:
    """A JSON file train has already verified (plan.json, report.json), or {} where it cannot be read."""
    try:
        v = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return v if isinstance(v, dict) else {}


def _epochs(es: list[int]) -> str:
    es = sorted(es)
    if not es:
        return "no epoch"
    if es == list(range(es[0], es[-1] + 1)):
        return f"epoch {es[0]}" if len(es) == 1 else f"epochs {es[0]}-{es[-1]}"
    return "epochs " + ",".join(map(str, es))


def training_summary(s: dict, plan: list | None = None, report: dict | None = None) -> list[str]:
    """What every controller decided and when, and the step cost against the plain ORT step, from
    a training summary (summary.json), the artifacts' plan and their compile report."""
    plan = [c for c in plan or [] if isinstance(c, dict)]
    opts = {c.get("type"): c for c in plan}
    ctl = s.get("controllers") or {}
    hist = s.get("history") or []
    decisions = s.get("decisions") or []
    lines = []
    for name, rep in ctl.items():
        rep = rep if isinstance(rep, dict) else {}
        mine = [d for d in decisions if d.get("controller") == name]
        if name == "rescale" and rep:
            low = [e["epoch"] for e in rep.get("epochs", []) if e.get("stage") == "low"]
            hw = next((m.get("input_hw") for m in hist if m.get("epoch") in low and m.get("input_hw")), None)
            at = f" ({'x'.join(map(str, hw))})" if hw else ""
            if rep.get("switch_epoch"):
                why = mine[0]["why"].split(";")[0] if mine else ""
                text = f"rescale: {_epochs(low)} at low resolution{at}, full resolution from epoch {rep['switch_epoch'] + 1}"
                text += f" ({why})" if why else ""
            else:
                text = f"rescale: {_epochs(low)} at low resolution{at}; the switch to full resolution never came"
            if rep.get("low_over_full_epoch_time"):
                text += f"; a low-resolution epoch took {rep['low_over_full_epoch_time']:.2f}x a full one (measured)"
            lines.append(text)
        elif name == "reuse" and rep:
            eps = rep.get("epochs") or []
            setting = "x".join(map(str, eps[0].get("setting") or [])) if eps else ""
            per = []
            for layer in (eps[0].get("layers") or {}) if eps else {}:
                rs = [e["layers"][layer].get("remain_ratio") for e in eps if layer in e.get("layers", {})]
                rs = [r for r in rs if r is not None]
                if rs:
                    per.append(f"{layer} {rs[0]:.2f}" + (f"->{rs[-1]:.2f}" if len(rs) > 1 else ""))
            choice = rep.get("choice") if isinstance(rep.get("choice"), dict) else {}
            if rep.get("choose") == "measured" and choice and not rep.get("chosen"):
                text = f"reuse ({rep.get('strategy')}, L x H {setting}): no layer was faster reused, so every layer "
                text += "stayed exact: " + "; ".join(
                    show(str((v or {}).get("why") or k), 160) for k, v in list(choice.items())[:6]
                )
            else:
                text = f"reuse ({rep.get('strategy')}, L x H {setting}): remain ratio per layer (measured) "
                text += ", ".join(per) if per else "not measured"
                if choice and rep.get("choose") == "measured":
                    text += f"; reused (measured faster): {', '.join(rep.get('chosen') or []) or 'none'}"
            if "reused_layer_macs_saved" in rep:
                text += f"; the reused layers' multiply-adds {-rep['reused_layer_macs_saved']:+.0%} over the run"
            for d in rep.get("switches") or []:
                text += f"; after epoch {d.get('epoch')}: {d.get('why')}"
            lines.append(text)
        elif name == "skip" and rep:
            lines.append(_skip_summary(rep, mine, opts.get("skip") or {}))
        else:
            for d in mine:
                lines.append(f"{name}: after epoch {d.get('epoch')}: {show(str(d.get('why')), 300)}")
    flops = [(m.get("steps", 0), m["flops_per_step"]) for m in hist if m.get("flops_per_step")]
    costs = (report or {}).get("costs")
    plain_flops = cost_total(costs.get("before") or {}).get("flops") if isinstance(costs, dict) else None
    if flops and plain_flops and ctl:
        steps = sum(n for n, _ in flops) or 1
        mean = sum(n * f for n, f in flops) / steps
        lines.append(
            f"step cost (cost model, reuse at its expected remain ratio): {gflops(mean)} on average against "
            f"{gflops(plain_flops)} for the plain ORT step ({mean / plain_flops - 1:+.1%}); per epoch: "
            + ", ".join(f"{gflops(f)}" for _, f in flops)
            + " (time against plain ORT: accelc bench measures it)"
        )
    return lines


def _skip_summary(rep: dict, decisions: list, opt: dict) -> str:
    lam = [e for e in rep.get("lambdas") or [] if isinstance(e, dict)]
    tau, mode = opt.get("tau", 2.0), opt.get("tau_mode", "relative")
    skips = [d for d in decisions if d.get("action") == "skip"]
    if skips:
        parts = []
        for d in skips:
            vals = ", ".join(
                f"{k} λ {v:.3g}"
                + (
                    f" > {tau} x {d['first'][k]:.3g}"
                    if mode == "relative" and (d.get("first") or {}).get(k)
                    else (f" > {tau}" if mode == "absolute" else "")
                )
                for k, v in (d.get("lam") or {}).items()
                if v is not None
            )
            parts.append(f"after epoch {d.get('epoch')}: skip {', '.join(d.get('skipped') or [])} ({vals})")
        text = "skip: " + "; ".join(parts)
    else:
        text = f"skip: skipped nothing in {len(lam)} epoch(s)"
        first = {k: v for k, v in (lam[0] if lam else {}).items() if k != "epoch"}
        if len(lam) <= int(opt.get("min_epochs", 1)):
            text += f": the first decision comes after epoch {int(opt.get('min_epochs', 1)) + 1}"
        elif mode == "growth":
            text += f": no layer's λ growth per epoch fell under {tau}"
        elif mode == "absolute":
            top = max(((k, v, e["epoch"]) for e in lam for k, v in e.items() if k != "epoch"), key=lambda t: t[1])
            text += f": no layer's λ passed {tau} (largest: {top[0]} {top[1]:.3g} at epoch {top[2]})"
        else:
            ratios = [
                (k, v / first[k], e["epoch"]) for e in lam[1:] for k, v in e.items() if k != "epoch" and first.get(k)
            ]
            done = [d for d in decisions if d.get("action") == "keep"]
            if done:
                text += f": {done[-1].get('why')}"
            elif ratios:
                top = max(ratios, key=lambda t: t[1])
                text += (
                    f": no layer's λ passed {tau} x its first-epoch λ (largest: {top[0]} at "
                    f"{top[1]:.2f}x in epoch {top[2]})"
                )
    return text


def _note(message, category, *_args, **_kw) -> None:
    """accelc's own warnings (e.g. passes put into order) as one 'accelc: note:' line; others as usual."""
    if issubclass(category, PassOrderWarning):
        print(f"accelc: note: {show(str(message), 400)}", file=sys.stderr)
    else:
        print(f"accelc: warning: {show(str(message), 400)}", file=sys.stderr)


_SUPERVISED = False  # a training worker: its supervisor reports interruptions, in one line
_ERROR_FD = None  # a worker of --nproc: its error line goes to this pipe (the launcher prints one line)


def _error_line(line: str) -> None:
    if _ERROR_FD is not None:
        with contextlib.suppress(OSError):
            os.write(_ERROR_FD, (line + "\n").encode())
            return
    print(line, file=sys.stderr)


class Bench(Tool):
    """Run configurations (torch eager, ORT, ORT + passes) side by side; write bench.json/.md and plots."""

    name = "bench"
    examples = (
        "accelc bench --model vgg --data fashion-mnist --configs torch,ort,ort+skip -o bench-out",
        "accelc bench --model cnn3-small --configs ort,ort+skip --skip-policy suffix --skip-tau 1.5 --epochs 2",
        "accelc bench --model vgg --config-file benchmarks/bench-vgg32.json --input-shape 1,32,32 -o bench-out",
        "accelc bench --model vgg --data fashion-mnist --train-limit 4096 --nproc 2 -o scaling-out",
        "accelc bench --model vgg --data fashion-mnist --input-shape 1,32,32 --target 0.88 --seeds 0,1,2 "
        "--epochs 8 --configs torch,ort,ort+skip -o tta-out",
    )

    def add_arguments(self, p):
        p.add_argument("--model", default="vgg", help="zoo model name or ONNX path (default vgg)")
        DataArgs().add(p)
        TrainingArgs().add(p)
        p.add_argument(
            "--configs",
            default=None,
            metavar="CONFIG[,CONFIG...]",
            help="comma list of torch (eager), torch-amp (eager, bf16 autocast), ort, ort-noopt, "
            f"ort+PASS[+PASS...], ort+all (every pass) (default {DEFAULT_CONFIGS}, or none with --config-file); "
            "pass options: the same flags as compile (below), for every configuration that runs the pass",
        )
        p.add_argument(
            "--config-file",
            default=None,
            metavar="FILE.json",
            help='named configurations with options of their own, e.g. {"configs": ["torch", "ort", '
            '{"name": "reuse-off", "passes": ["reuse"], "options": {"reuse": {"strategy": "off"}}}]}',
        )
        p.add_argument("--repeats", type=int, default=1, help="run every configuration R times, report medians")
        p.add_argument(
            "--seeds",
            default=None,
            metavar="S[,S...]",
            help="run every configuration once per seed (initial weights of a zoo model and data order), "
            "configurations interleaved per seed; reports median and min–max time to target and how many "
            "seeds reached it, e.g. --seeds 0,1,2 (default: --seed)",
        )
        p.add_argument(
            "--target",
            default="ort-best",
            help="target accuracy, judged on the validation split: a number such as 0.88 (a fixed target, "
            "as MLPerf), ort-best (default: ort's best) or torch-best-0.2 (torch eager's best minus 0.2 points)",
        )
        p.add_argument(
            "--val-split",
            default="auto",
            metavar="N|FRACTION|auto",
            help="hold out the last N (or FRACTION of the) training images as the validation split that "
            "decides the target and the controllers; the test split only reports. auto (default): "
            "min(5000, 10%%), none under 1000 training images; 0: none (decided on test, flagged)",
        )
        p.add_argument(
            "--stop-at-target",
            action="store_true",
            help="stop each configuration after the epoch that reached the (fixed) target; final accuracy "
            "is then the accuracy at the target",
        )
        p.add_argument("--threads", type=int, default=None, help="threads for ORT and torch (default: all cores)")
        p.add_argument(
            "--input-shape",
            default=None,
            help="C,H,W of a zoo model's input (default: the model's own; "
            "rescale needs a final feature map divisible by its factor)",
        )
        p.add_argument(
            "--nproc",
            type=int,
            default=None,
            metavar="N",
            help="measure data-parallel scaling instead of comparing configurations: the same training "
            "with 1..N processes of one thread each (and 1 process with every core), interleaved; "
            "writes scaling.json/.md/.png with the all-reduce cost per step, e.g. --nproc 2",
        )
        PassArgs().add(p, selection=False)
        OutputArgs().add(p, output="bench-out", what="output directory")

    def run(self, a):
        if a.epochs <= 0 or a.repeats <= 0:
            raise AccelcError("--epochs and --repeats must be positive")
        if a.nproc is not None:
            if a.threads is not None:
                raise AccelcError("--nproc sets the threads itself (1 per process, and all cores for one process)")
            given = [
                flag
                for flag, changed in (
                    ("--seeds", a.seeds is not None),
                    ("--stop-at-target", a.stop_at_target),
                    ("--val-split", a.val_split != "auto"),
                    ("--target", a.target != "ort-best"),
                )
                if changed
            ]
            if given:
                raise AccelcError(
                    f"--nproc measures throughput only; {', '.join(given)} apply to the configuration comparison"
                )
            rep = run_scaling(
                a.model, a.data, a.epochs, a.output, a.nproc, a.batch_size, a.seed, a.lr, a.repeats,
                a.train_limit, a.test_limit,
                checks.input_shape("--input-shape", a.input_shape) if a.input_shape else None,
                force=a.force, progress=not a.quiet,
            )  # fmt: skip
            if not a.quiet:
                print(scaling_markdown(rep))
                print(f"wrote {show(a.output)}/scaling.json, scaling.md, scaling.png")
            return 0
        text = a.configs if a.configs is not None or a.config_file is not None else DEFAULT_CONFIGS
        configs = parse_configs(text, PassArgs.options(a, None), a.config_file)
        rep = run_bench(
            a.model,
            a.data,
            a.epochs,
            configs,
            a.output,
            a.batch_size,
            a.seed,
            a.lr,
            a.repeats,
            a.train_limit,
            a.test_limit,
            a.target,
            progress=not a.quiet,
            threads=a.threads,
            input_shape=checks.input_shape("--input-shape", a.input_shape) if a.input_shape else None,
            force=a.force,
            seeds=a.seeds,
            val_split=a.val_split,
            stop_at_target=a.stop_at_target,
        )
        if not a.quiet:
            print(markdown(rep))
            print(
                f"wrote {show(a.output)}/bench.json, bench.md, accuracy_vs_time.png, time_to_target.png, "
                "controllers.png"
            )
        return 0


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
    verbose = "-v" in argv or "--verbose" in argv
    try:
        _startup.done()  # from here, a Ctrl-C is the KeyboardInterrupt caught below
        parser = build_parser()
        a = parser.parse_args(argv)
        a.argv = list(argv)
        if not getattr(a, "tool", None):
            raise AccelcError("a subcommand is required (see 'accelc --help')")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if a.quiet else "always", PassOrderWarning)  # -q: errors only
            warnings.showwarning = _note
            with stop_on_signals(a):  # compile, bench, export, export-run: SIGTERM/SIGHUP in one line
                return a.tool.run(a) or 0
    except AccelcError as e:
        if verbose:
            traceback.print_exc()
        _error_line(f"accelc: error: {show(e, 2000)}")
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        if not _SUPERVISED:  # a worker's supervisor says it, once
            print("accelc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        if verbose:
            traceback.print_exc()
        where = f": {show(e.filename)}" if e.filename else ""
        _error_line(f"accelc: error: {show(e.strerror or e)}{where}")
        return 2
    except Exception as e:  # never a traceback for users; -v shows it
        if verbose:
            traceback.print_exc()
        _error_line(f"accelc: internal error: {type(e).__name__}: {show(e, 300)} (run with -v for details)")
        return 1
    finally:
        if _SUPERVISED:  # a signal the supervisor forwards late must not interrupt interpreter shutdown
            signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    sys.exit(main())
