"""opt's rules, one class each (pattern, check, rewrite), in the style of onnxscript's rewriter.

A rule's :meth:`Rule.matches` yields the nodes (or layers) its pattern matches, :meth:`Rule.check`
says whether one of them can be rewritten, :meth:`Rule.rewrite` rewrites it in the graph view and
returns the change record; :meth:`Rule.apply` runs the three over a graph.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ...compiler import provenance
from ...compiler.graph import TrainingGraph

PASS = "opt"
ENGINE = "onednn"  # the value of provenance.EXEC that the runtime's ``conv`` kernel claims


def marked_for_onednn(node) -> bool:
    """Whether an ONNX node was marked by :class:`ConvOneDNN` (the ``conv`` kernel's claim)."""
    return node.op_type in ("Conv", "ConvGrad") and any(
        p.key == provenance.EXEC and p.value == ENGINE for p in node.metadata_props
    )


class Rule:
    name = ""

    def matches(self, tg: TrainingGraph):  # pragma: no cover - interface
        raise NotImplementedError

    def check(self, tg: TrainingGraph, match) -> bool:
        return True

    def rewrite(self, tg: TrainingGraph, match) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    def finish(self, tg: TrainingGraph) -> None:
        """After all rewrites (e.g. clean up the graph)."""

    def apply(self, tg: TrainingGraph) -> list[dict]:
        changes = [self.rewrite(tg, m) for m in list(self.matches(tg)) if self.check(tg, m)]
        if changes:
            self.finish(tg)
        return changes


class ReluGradAsMul(Rule):
    """ReluGrad(dY, X) -> Mul(dY, Cast(Greater(X, 0), float)): the same values for finite dY, on
    vectorised kernels (ORT's ReluGrad kernel is scalar)."""

    name = "relu_grad"

    def matches(self, tg):
        return [n for n in tg.graph.nodes if n.op == "ReluGrad"]

    def __init__(self):
        self.zero = gs.Constant("accelc.opt.zero", np.zeros((), dtype=np.float32))  # one per graph

    def rewrite(self, tg, n) -> dict:
        g = tg.graph
        zero = self.zero
        dy, x = n.inputs[0], n.inputs[1]
        out = n.outputs[0]
        base = n.name or out.name
        mask = gs.Variable(f"{base}/opt_mask", dtype=np.bool_)
        maskf = gs.Variable(f"{base}/opt_maskf", dtype=np.float32)
        new = [
            gs.Node("Greater", name=f"{base}/opt_greater", inputs=[x, zero], outputs=[mask]),
            gs.Node("Cast", name=f"{base}/opt_cast", inputs=[mask], outputs=[maskf], attrs={"to": 1}),
            gs.Node("Mul", name=f"{base}/opt_mul", inputs=[dy, maskf], outputs=[out]),
        ]
        n.outputs.clear()
        n.inputs.clear()
        g.nodes.extend(new)
        layer = base.split("_Grad/")[0]
        for m in new:
            tg.tag(m.name, PASS, layer, "ReluGrad as Mul(dY, Cast(X > 0)): vectorised kernels, same values")
        return {"node": base, "summary": f"{base}: ReluGrad -> Greater/Cast/Mul"}

    def finish(self, tg):
        tg.graph.cleanup(remove_unused_graph_inputs=False).toposort()


class ConvOneDNN(Rule):
    """Mark every 2-D Conv (explicit pads) and its ConvGrad to run on oneDNN under accelc's runtime.
    The graph is unchanged: plain ORT still runs it as it is."""

    name = "conv_onednn"

    def matches(self, tg):
        return [layer for layer in tg.layers if layer.op == "Conv" and len(layer.weight_shape) == 4]

    def check(self, tg, layer) -> bool:
        auto = layer.forward.attrs.get("auto_pad", "NOTSET")
        return (auto.decode() if isinstance(auto, bytes) else auto) in ("NOTSET", "")

    def rewrite(self, tg, layer) -> dict:
        grads = [b for b in layer.backward if b.op == "ConvGrad"]
        for m in [layer.forward] + grads:
            old = tg.tags.get(m.name, {})
            tg.tag(
                m.name,
                old.get(provenance.PASS, PASS),
                old.get(provenance.LAYER, layer.name),
                "runs on oneDNN's convolution kernels under accelc's runtime (same mathematics; plain ORT "
                "runs it unchanged)",
                **{provenance.EXEC: ENGINE},
            )
        return {"node": layer.forward.name, "summary": f"{layer.name}: Conv/ConvGrad marked for oneDNN"}


RULES = {r.name: r for r in (ReluGradAsMul, ConvOneDNN)}
