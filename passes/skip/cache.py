"""Caching the frozen prefix's activations (Egeria, AutoFreeze): once an input-side prefix of the
network is frozen, its output on every training image is computed once, with the evaluation
graph (BatchNorm on its running statistics, no Dropout), and the step trains the rest of the
network on those activations: the prefix's forward leaves the step too, not only its backward.

* :func:`find_cut` — the deepest forward tensor of a (pruned) training graph that every path from
  the images to the loss crosses and whose computation reads no trained parameter and no random
  op: the boundary the cache can stand at.
* :func:`cut_variant` — the training graph with that tensor as its data input (``train_input``):
  everything before it removed.
* :func:`prefix_model` — the evaluation graph cut down to what computes that tensor, from the
  images or from an earlier cut's tensor (so advancing the cut computes only the layers between).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ...compiler.artifacts import Artifacts
from ...compiler.cost import node_cost
from ...compiler.errors import AccelcError, show
from ...compiler.graph import ACCUMULATOR_OP, training_graph
from ...compiler.validation import RANDOM_OPS


def _forward(node) -> bool:
    return "_Grad/" not in node.name and node.op_type != ACCUMULATOR_OP


def find_cut(training: onnx.ModelProto, eval_model: onnx.ModelProto, data: str, trained: set[str]) -> str | None:
    """The deepest tensor the cache can stand at in ``training`` (see the module doc), or None.

    A tensor T qualifies when it depends on ``data``; nothing it depends on reads a ``trained``
    parameter or comes from a random op; the evaluation graph computes it too (under the same
    name); and no other tensor computed on the way to it (nor ``data``) is read by a node outside
    that computation or is a graph output — so the graph with T as its input needs nothing else
    from before it."""
    nodes = list(training.graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    readers: dict[str, list[int]] = defaultdict(list)
    for i, n in enumerate(nodes):
        for t in n.input:
            if t:
                readers[t].append(i)
    outputs = {o.name for o in training.graph.output}
    in_eval = {o for n in eval_model.graph.node for o in n.output}
    # forward propagation: what depends on the data; what depends on a trained parameter or a random op
    from_data, tainted = {data}, set(trained)
    candidates = []
    for n in nodes:
        if not _forward(n):
            continue
        ins = [t for t in n.input if t]
        if any(t in from_data for t in ins):
            from_data.update(o for o in n.output if o)
        if n.op_type in RANDOM_OPS or any(t in tainted for t in ins):
            tainted.update(o for o in n.output if o)
        candidates += [o for o in n.output if o and o in from_data and o not in tainted and o in in_eval]
    for t in reversed(candidates):
        if _closed(t, nodes, producer, readers, outputs, data):
            return t
    return None


def _closed(t: str, nodes, producer, readers, outputs, data) -> bool:
    """Whether everything computed on the way to ``t`` (and ``data``) is read only on that way."""
    inside, stack = set(), [producer[t]]
    while stack:
        i = stack.pop()
        if i in inside:
            continue
        inside.add(i)
        stack.extend(producer[x] for x in nodes[i].input if x and x in producer)
    made = {o for i in inside for o in nodes[i].output if o and o != t} | {data}
    return not any(m in outputs or any(r not in inside for r in readers.get(m, ())) for m in made)


def intensity(art: Artifacts, tensor: str) -> float:
    """Forward FLOPs (cost model) of everything that computes ``tensor``, per byte of ``tensor``,
    per image: what the cache saves per step against what storing and re-reading it costs. Low for
    a cheap layer with a wide output (the zoo VGG's first conv: ~6), high once a pool has shrunk
    the output of costly convolutions (through its second conv and pool: ~590)."""
    tg = training_graph(art)
    nodes = [n for n in tg.graph.nodes if not tg.is_backward(n)]
    producer = {o.name: n for n in nodes for o in n.outputs if o.name}
    seen, stack, flops = set(), [producer[tensor]], 0.0
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        flops += node_cost(tg, n).flops
        stack.extend(producer[t.name] for t in n.inputs if t.name in producer)
    batch = int(art.config.get("batch_size", 64))
    per_image = int(np.prod(art.info.shapes(1)[tensor][1:])) * 4
    return flops / batch / max(per_image, 1)


def cut_variant(art: Artifacts, tensor: str) -> Artifacts:
    """``art`` whose training graph reads ``tensor`` as its data (``train_input``) in place of the
    images, with everything that computed it removed (parameters only it read included)."""
    out = art.copy()
    tg = training_graph(out)
    g = tg.graph
    t = g.tensors().get(tensor)
    shape = art.info.shapes(1).get(tensor)
    data = g.inputs[0]
    if t is None or not shape or data.name != art.info.input_name:
        raise AccelcError(f"skip cache: the training graph has no tensor '{show(tensor)}' of known shape to start from")
    t.inputs.clear()
    t.dtype = np.float32
    t.shape = [data.shape[0] if data.shape else "batch", *shape[1:]]
    g.inputs = [t] + [i for i in g.inputs[1:]]
    g.cleanup(remove_unused_graph_inputs=True, recurse_functions=False)
    if "labels" not in {i.name for i in g.inputs} or any(x.name == data.name for n in g.nodes for x in n.inputs):
        raise AccelcError(f"skip cache: the rest of the training graph does not start at '{show(tensor)}' alone")
    tg.reindex()
    out.training = tg.to_onnx()
    out.train_input = tensor
    return out


def prefix_model(
    eval_model: onnx.ModelProto, data: str, start: str | None, end: str, shapes: dict
) -> onnx.ModelProto | None:
    """The evaluation graph cut down to what computes ``end``: from the images (``start`` None)
    or from the tensor ``start`` (an earlier cut). Its first input is where it starts, the others
    are parameters. None when ``end`` is not computed from ``start`` alone."""
    g = gs.import_onnx(eval_model)
    tensors = g.tensors()
    if end not in tensors or (start is not None and start not in tensors):
        return None
    y = tensors[end]
    y.dtype = np.float32
    g.outputs = [y]
    first = tensors[data]
    if start is not None:
        first = tensors[start]
        first.inputs.clear()
        first.dtype, first.shape = np.float32, ["batch", *shapes[start][1:]]
    g.inputs = [first] + [i for i in g.inputs if i.name not in (data, "labels", first.name)]
    g.cleanup(remove_unused_graph_inputs=True)
    if start is not None and any(x.name == data for n in g.nodes for x in n.inputs):
        return None
    if not g.inputs or g.inputs[0].name != first.name:
        return None
    model = gs.export_onnx(g, do_type_check=False)
    del model.opset_import[:]
    model.opset_import.extend(eval_model.opset_import)
    model.ir_version = eval_model.ir_version
    return model
