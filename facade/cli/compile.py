"""``accelc compile``: build ORT training artifacts from an ONNX model and rewrite them with passes."""

from __future__ import annotations

import sys

from .. import api
from ..compiler.compile import DEFAULT_LR, explain
from ..compiler.cost import gflops
from ..compiler.errors import show
from ..compiler.pass_api import default_passes, parse_pass_list
from .args import MemoryArgs, OutputArgs, PassArgs, Tool
from .report import fmt_num


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
            PassArgs.options(a, names + ([] if a.no_opt else default_passes())),
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
                    f"{fmt_num(b['bytes'])}B -> {fmt_num(f['bytes'])}B read and written"
                )
        return 0
