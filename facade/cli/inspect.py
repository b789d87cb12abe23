"""``accelc inspect``: the per-layer table of a model or artifact directory."""

from __future__ import annotations

import json

from .. import api
from ..compiler.compile import explain
from ..compiler.errors import show
from .args import Tool
from .report import layer_table_text


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
                no_cuda = eng.get("cuda", {}).get("no_cuda_kernel", {})
                print(
                    "--device cuda: "
                    + (
                        "refused, no CUDA kernel for " + ", ".join(f"{k}×{v}" for k, v in sorted(no_cuda.items()))
                        if no_cuda
                        else "every node has a CUDA kernel"
                    )
                )
            lines = explain(view)
            if lines:
                print()
            for line in lines:
                print(line)
        return 0
