"""Cost accounting: FLOPs and bytes read/written per node, rolled up per layer and per phase.

The model is analytic (no timing): a multiply-add counts 2 FLOPs, elementwise ops count a small
constant per element, and bytes are the float32 sizes of every tensor a node reads and writes.
The optimizer phase is counted per trainable element (AdamW ≈ 12 FLOPs, reads p, g, m, v and
writes p, m, v; SGD 2 FLOPs, reads p, g and writes p).

Methods whose nodes are not standard ops declare their cost (``Method.costs``: pairs of
``claims(node)`` and ``flops(tg, node)``, the latter a number or ``{"flops": expected,
"flops_bound": upper bound, "note": what the expected value assumes}``; bytes are counted from the
tensors, as for any node). A node
whose cost depends on what happens at run time (e.g. how many clusters a reuse node finds) is
counted at its *expected* value (``flops``) and at its upper bound (``flops_bound``); for every
other node the two are equal. ``assumptions`` says what the expected values assume.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np

from .graph import ACCUMULATOR_OP, TrainingGraph
from .method import installed

# FLOPs per output element of elementwise-like ops.
_ELEMENTWISE = {
    "Relu": 1,
    "ReluGrad": 1,
    "Add": 1,
    "Sub": 1,
    "Mul": 1,
    "Div": 1,
    "Sum": 1,
    "Identity": 0,
    "Reshape": 0,
    "Flatten": 0,
    "Shape": 0,
    "Expand": 0,
    "Scale": 1,
    "Sigmoid": 4,
    "Tanh": 4,
    "BatchNormInternal": 6,
    "BatchNormalization": 4,
    "BatchNormalizationGrad": 8,
    "Dropout": 2,
    ACCUMULATOR_OP: 1,
    "SoftmaxCrossEntropyLoss": 5,
    "SoftmaxCrossEntropyLossGrad": 3,
    "SoftmaxCrossEntropyLossInternal": 5,
    "SoftmaxCrossEntropyLossInternalGrad": 3,
    "Concat": 0,
    "Split": 0,
    "Slice": 0,
    "Transpose": 0,
    "Gather": 0,
    "Cast": 0,
}
OPTIMIZER_COST = {"adamw": (12, 28), "sgd": (2, 12)}  # (FLOPs, bytes) per trainable element


@dataclass
class Cost:
    flops: float = 0.0  # expected
    bytes_read: float = 0.0
    bytes_written: float = 0.0
    flops_bound: float | None = None  # upper bound; None: equal to flops

    def __post_init__(self):
        if self.flops_bound is None:
            self.flops_bound = self.flops

    @property
    def bytes(self) -> float:
        return self.bytes_read + self.bytes_written

    def __iadd__(self, other: "Cost") -> "Cost":
        self.flops += other.flops
        self.bytes_read += other.bytes_read
        self.bytes_written += other.bytes_written
        self.flops_bound += other.flops_bound
        return self

    def as_dict(self) -> dict:
        d = asdict(self)
        d["bytes"] = self.bytes
        return d


def gflops(x: float) -> str:
    """FLOPs as people read them: ``11.37 GFLOPs``, ``28.90 MFLOPs``."""
    return f"{x / 1e9:.2f} GFLOPs" if abs(x) >= 1e7 else f"{x / 1e6:.2f} MFLOPs"


def numel(shape) -> int:
    return int(np.prod(shape)) if shape else 0


def _attr(node, name, default):
    return node.attrs.get(name, default)


def conv_macs(tg: TrainingGraph, w: str, y: str) -> int:
    """Multiply-adds of a convolution with weight ``w`` and output ``y``."""
    ws, ys = tg.shape(w), tg.shape(y)
    if not ws or not ys:
        return 0
    # Y = [N, Cout, *spatial]; W = [Cout, Cin/g, *k]
    return numel(ys) * numel(ws[1:])


def conv_grad_flops(tg: TrainingGraph, node) -> float:
    """FLOPs of a ConvGrad-like node: inputs dY, X, W; outputs dX, dW, dB (any may be absent)."""
    ins = [t.name for t in node.inputs]
    outs = [t.name for t in node.outputs]
    macs = numel(tg.shape(ins[0])) * numel(tg.shape(ins[2])[1:])
    flops = 0.0
    if len(outs) > 0 and outs[0]:
        flops += 2.0 * macs
    if len(outs) > 1 and outs[1]:
        flops += 2.0 * macs
    if len(outs) > 2 and outs[2]:
        flops += numel(tg.shape(ins[0]))
    return flops


def _hook_cost(tg: TrainingGraph, node) -> tuple[float, float, str | None] | None:
    hook = next((f for claims, f in installed().costs() if claims(node)), None)
    if hook is None:
        return None
    v = hook(tg, node)
    if isinstance(v, dict):
        f = float(v["flops"])
        return f, float(v.get("flops_bound", f)), v.get("note")
    return float(v), float(v), None


def node_cost(tg: TrainingGraph, node, notes: list | None = None) -> Cost:
    """The node's cost; where a pass's hook counts it, the hook's note (what the expected value
    assumes) is appended to ``notes``."""
    ins = [t.name for t in node.inputs]
    outs = [t.name for t in node.outputs]
    rd = 4.0 * sum(numel(tg.shape(t)) for t in ins if t)
    wr = 4.0 * sum(numel(tg.shape(t)) for t in outs if t)
    op = node.op
    flops = 0.0
    hooked = _hook_cost(tg, node)
    if hooked is not None:
        flops, bound, note = hooked
        if note and notes is not None:
            notes.append(note)
        return Cost(flops, rd, wr, bound)
    if op == "Conv":
        flops = 2.0 * conv_macs(tg, ins[1], outs[0])
        if len(ins) > 2 and ins[2]:
            flops += numel(tg.shape(outs[0]))
    elif op == "ConvGrad":
        flops = conv_grad_flops(tg, node)
    elif op in ("Gemm", "MatMul"):
        a, b = tg.shape(ins[0]), tg.shape(ins[1])
        y = tg.shape(outs[0])
        if a and b and y:
            ta = _attr(node, "transA", 0) if op == "Gemm" else 0
            k = a[-2] if ta else a[-1]
            flops = 2.0 * numel(y) * k
            if op == "Gemm" and len(ins) > 2 and ins[2]:
                flops += numel(y)
    elif op in ("MaxPool", "AveragePool"):
        k = numel(_attr(node, "kernel_shape", [1]))
        flops = numel(tg.shape(outs[0])) * k
    elif op in ("MaxPoolGrad", "AveragePoolGrad", "GlobalAveragePool", "ReduceSum", "ReduceMean"):
        flops = numel(tg.shape(ins[0]))
    else:
        flops = _ELEMENTWISE.get(op, 1) * max((numel(tg.shape(t)) for t in outs if t), default=0)
    return Cost(flops, rd, wr)


def phase_of(node) -> str:
    return "backward" if TrainingGraph.is_backward(node) else "forward"


def graph_costs(tg: TrainingGraph, optimizer: str = "adamw") -> dict:
    """Per-layer and per-phase costs of a training graph; JSON-ready."""
    owner = {}
    for layer in tg.layers:
        owner[layer.forward.name] = layer.name
        for b in layer.backward + layer.accumulators:
            owner[b.name] = layer.name
    per_layer: dict[str, dict[str, Cost]] = defaultdict(lambda: {"forward": Cost(), "backward": Cost()})
    phases = {"forward": Cost(), "backward": Cost(), "optimizer": Cost()}
    notes: list[str] = []
    for node in tg.graph.nodes:
        c = node_cost(tg, node, notes)
        ph = phase_of(node)
        phases[ph] += c
        per_layer[owner.get(node.name, "(other)")][ph] += c
    f_el, b_el = OPTIMIZER_COST.get(optimizer, OPTIMIZER_COST["adamw"])
    trained = sum(numel(tg.shape(p)) for p in tg.params)
    phases["optimizer"] = Cost(f_el * trained, b_el * trained * 4 / 7, b_el * trained * 3 / 7)
    total = Cost()
    for c in phases.values():
        total += c
    return {
        "phases": {k: v.as_dict() for k, v in phases.items()},
        "total": total.as_dict(),
        "layers": {k: {ph: c.as_dict() for ph, c in v.items()} for k, v in per_layer.items()},
        "trainable_elements": trained,
        "assumptions": list(dict.fromkeys(notes)),  # what expected (not bounded) FLOPs assume
    }
