"""accelc — compile CNN training graphs for ONNX Runtime Training with paper-derived passes.

Subcommands (``accelc SUBCOMMAND --help`` for each):
  export    write a built-in zoo model as a training-ready ONNX file
  compile   build ORT training artifacts from an ONNX model and rewrite them with passes
  passes    list the passes and their options
  inspect   per-layer table of a model or artifact directory (FLOPs, bytes, what passes did)
  view      serve a model in Netron on 127.0.0.1
  train     train compiled artifacts on ORT Training
  bench     run several configurations side by side on the same model, weights and data
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback


def _fmt_num(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def layer_table_text(view: dict) -> str:
    rows = []
    for r in view["layers"]:
        rows.append([r["name"], r["op"], _fmt_num(r["param_count"]), "x".join(map(str, r["weight_shape"])),
                     "x".join(map(str, r["output_shape"])), _fmt_num(r["flops_fwd"]), _fmt_num(r["flops_bwd"]),
                     _fmt_num(r["bytes_fwd"]) + "B", _fmt_num(r["bytes_bwd"]) + "B",
                     ",".join(r["passes"]) or ("frozen" if not r["trainable"] else "-")])
    out = _table(rows, ["layer", "op", "params", "weight", "output", "fwd FLOPs", "bwd FLOPs", "fwd bytes",
                        "bwd bytes", "passes"])
    ph = view["costs"]["phases"]
    out += "\n\n" + "  ".join(f"{k}: {_fmt_num(v['flops'])}FLOPs {_fmt_num(v['bytes'])}B" for k, v in ph.items())
    return out


# ----------------------------------------------------------------------------- commands
def cmd_export(a) -> int:
    """Write a built-in zoo model (or list the zoo) as an ONNX file exported for training."""
    from .export import ZOO, export_zoo
    if a.list or not a.name:
        for k, (_, shape, desc) in ZOO.items():
            print(f"{k:12s} input {'x'.join(map(str, shape)):9s} {desc}")
        return 0
    if not a.output:
        raise AccelcError("export needs -o OUTPUT.onnx")
    shape = _parse_shape(a.input_shape) if a.input_shape else None
    export_zoo(a.name, a.output, shape, a.num_classes, a.seed)
    if not a.quiet:
        print(f"wrote {a.output}")
    return 0


def _parse_shape(text: str):
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise AccelcError(f"--input-shape must be C,H,W integers, got '{text}'") from None
    if len(shape) != 3 or min(shape) <= 0:
        raise AccelcError(f"--input-shape must be three positive integers C,H,W, got '{text}'")
    return shape


def _pass_options(a, names) -> dict:
    from .pass_manager import available
    opts: dict = {}
    for pname, cls in available().items():
        for oname, opt in cls.options.items():
            dest = _opt_dest(pname, oname, opt)
            val = getattr(a, dest, None)
            if val is not None:
                if pname not in names:
                    raise AccelcError(f"{_opt_flag(pname, oname, opt)} given but pass '{pname}' is not in --passes")
                opts.setdefault(pname, {})[oname] = val
    return opts


def _opt_flag(pname, oname, opt):
    return opt.flag or f"--{pname}-{oname.replace('_', '-')}"


def _opt_dest(pname, oname, opt):
    return _opt_flag(pname, oname, opt).lstrip("-").replace("-", "_")


def cmd_compile(a) -> int:
    """Build ORT training artifacts (training/eval/optimizer models, checkpoint) and run passes."""
    from .compile import compile_model
    from .pass_manager import parse_pass_list
    names = parse_pass_list(a.passes)
    report = compile_model(a.model, a.output, names, _pass_options(a, names + ([] if a.no_opt else ["opt"])),
                           loss=a.loss, optimizer=a.optimizer, lr=a.lr, batch_size=a.batch_size, force=a.force,
                           validate_result=not a.no_validate, opt=not a.no_opt)
    for w in report["warnings"]:
        print(f"accelc: warning: {w}", file=sys.stderr)
    if not a.quiet:
        b, f = report["costs"]["before"]["total"], report["costs"]["after"]["total"]
        ran = [p["name"] for p in report["passes"]]
        print(f"compiled {a.model} -> {a.output} in {report['compile_seconds']:.2f}s "
              f"(passes: {','.join(ran) or 'none'}; {report['model']['param_count']:,} params)")
        if names:
            print(f"training-step cost: {_fmt_num(b['flops'])}FLOPs -> {_fmt_num(f['flops'])}FLOPs, "
                  f"{_fmt_num(b['bytes'])}B -> {_fmt_num(f['bytes'])}B")
    return 0


def cmd_passes(a) -> int:
    """List the registered passes, their papers and options."""
    from .pass_manager import available
    reg = available()
    if a.json:
        print(json.dumps({n: {"summary": c.summary, "paper": c.paper,
                              "options": {k: {"default": o.default, "help": o.help, "flag": _opt_flag(n, k, o)}
                                          for k, o in c.options.items()}} for n, c in reg.items()},
                         indent=1, default=str))
        return 0
    if not reg:
        print("no passes registered")
    for n, c in reg.items():
        print(f"{n}: {c.summary}\n  paper: {c.paper}")
        for k, o in c.options.items():
            print(f"  {_opt_flag(n, k, o):28s} {o.help} (default: {o.default})")
    return 0


def cmd_inspect(a) -> int:
    """Per-layer table: name, op, params, shapes, forward/backward FLOPs and bytes, what passes did."""
    from .compile import inspect_path
    view = inspect_path(a.path)
    if a.json:
        print(json.dumps({"layers": view["layers"], "costs": view["costs"], "passes": view.get("passes", [])},
                         indent=1))
    else:
        print(layer_table_text(view))
        for p in view.get("passes", []):
            print(f"pass {p['name']}: modified={p['modified']} " + "; ".join(
                c.get("summary", "") for c in p.get("changes", []) if isinstance(c, dict))[:400])
    return 0


def cmd_view(a) -> int:
    """Serve a model in Netron on 127.0.0.1 (blocks until Ctrl-C unless --no-block)."""
    from .view import serve
    serve(a.path, a.port, block=not a.no_block, browse=a.browse)
    return 0


def cmd_train(a) -> int:
    """Train compiled artifacts on ORT Training: metrics.jsonl, summary.json, plot, checkpoints."""
    from ..runtime.train import train_cli
    return train_cli(a)


def cmd_bench(a) -> int:
    """Run configurations (torch eager, ORT, ORT + passes) side by side; write bench.json/.md and plots."""
    from ..runtime.bench import bench_cli
    return bench_cli(a)


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .pass_manager import available
    top = argparse.ArgumentParser(prog="accelc", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="show tracebacks and details")
    common.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    sub = top.add_subparsers(dest="cmd", metavar="SUBCOMMAND")

    def add(name, fn, **kw):
        p = sub.add_parser(name, parents=[common], help=fn.__doc__.splitlines()[0], description=fn.__doc__, **kw)
        p.set_defaults(fn=fn)
        return p

    p = add("export", cmd_export)
    p.add_argument("name", nargs="?", help="zoo model name (omit or --list to list the zoo)")
    p.add_argument("-o", "--output", help="output .onnx path")
    p.add_argument("--list", action="store_true", help="list the zoo")
    p.add_argument("--input-shape", help="C,H,W of the input (default: the model's own)")
    p.add_argument("--num-classes", type=int, default=10, help="classes of the head (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights (default 0)")

    p = add("compile", cmd_compile)
    p.add_argument("model", help="forward ONNX model exported for training (see accelc export / accelc.export)")
    p.add_argument("-o", "--output", required=True, help="artifact directory to create")
    p.add_argument("--passes", default="none", help="comma-separated passes in order, or 'none' (default)")
    p.add_argument("--loss", default="cross_entropy", help="loss appended to the model (cross_entropy)")
    p.add_argument("--optimizer", default="adamw", help="adamw (default) or sgd")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate recorded for training (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size used for cost accounting (default 64)")
    p.add_argument("--force", action="store_true", help="replace the output directory if it exists")
    p.add_argument("--no-validate", action="store_true", help="skip ORT-session and numeric validation")
    p.add_argument("--no-opt", action="store_true",
                   help="do not run the default 'opt' pass (with --passes none: ORT's plain artifacts, unchanged)")
    for pname, cls in available().items():
        for oname, opt in cls.options.items():
            p.add_argument(_opt_flag(pname, oname, opt), dest=_opt_dest(pname, oname, opt), default=None,
                           help=f"[{pname}] {opt.help} (default: {opt.default})")

    p = add("passes", cmd_passes)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("inspect", cmd_inspect)
    p.add_argument("path", help="artifact directory, training model or forward ONNX model")
    p.add_argument("--json", action="store_true", help="print {'layers': [...]} as JSON, in topological order")

    p = add("view", cmd_view)
    p.add_argument("path", help="ONNX file or artifact directory (shows its training model)")
    p.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (default 8080)")
    p.add_argument("--no-block", action="store_true", help="start the server and return (for scripts)")
    p.add_argument("--browse", action="store_true", help="open a web browser")

    from ..runtime.train import add_train_args
    add_train_args(add("train", cmd_train))
    from ..runtime.bench import add_bench_args
    add_bench_args(add("bench", cmd_bench))
    return top


from .errors import AccelcError  # noqa: E402


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verbose = "-v" in argv or "--verbose" in argv
    try:
        parser = build_parser()
        a = parser.parse_args(argv)
        a.argv = list(argv)
        if not getattr(a, "fn", None):
            parser.print_help()
            return 2
        return a.fn(a) or 0
    except AccelcError as e:
        if verbose:
            traceback.print_exc()
        print(f"accelc: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("accelc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        if verbose:
            traceback.print_exc()
        print(f"accelc: error: {e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", file=sys.stderr)
        return 2
    except Exception as e:  # never a traceback for users; -v shows it
        if verbose:
            traceback.print_exc()
        print(f"accelc: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              f"(run with -v for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
