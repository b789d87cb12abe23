"""``accelc view``: serve a model in Netron on 127.0.0.1."""

from __future__ import annotations

from .. import checks
from .args import MemoryArgs, Tool


class View(Tool):
    """Serve one model in Netron on 127.0.0.1 until Ctrl-C (only that model and its external data)."""

    name = "view"
    examples = (
        "accelc view art",
        "accelc view art --changes",
        "accelc view art --graph stage-32x32 --changes   # a stage of rescale's ramp",
        "accelc view art --graph stage-low/eval --port 8081   # the kernel mode's stage",
    )

    def add_arguments(self, p):
        p.add_argument("path", help="ONNX file or artifact directory (its training model, or --graph)")
        p.add_argument(
            "--graph",
            default=None,
            metavar="GRAPH",
            help="of an artifact directory: training (default), eval, optimizer, a stage (rescale's: stage-HxW "
            "per size of its ramp, stage-low in --rescale-mode kernel) or a stage's graph (stage-32x32/eval)",
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
        # accelc.netron.start() returns a server that runs while the caller's process lives

    def run(self, a):
        from ..netron import serve  # heavy: netron

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
