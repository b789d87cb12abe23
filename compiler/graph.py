"""The graph view every pass shares.

A :class:`TrainingGraph` wraps an ORT training graph (forward + loss + backward + gradient
accumulators) in onnx-graphsurgeon and indexes it by trainable layer: for every Conv, Gemm and
MatMul with a weight parameter (and every node kind a method declares as a layer op:
``Method.layer_ops``, (domain, op-type prefix, layer kind), weight and bias in input slots 1 and 2
like Conv's), its forward node, backward nodes, parameters, gradient accumulators,
input/output tensors and shapes. Node tags (``metadata_props``) added by passes are kept beside
the gs graph and written on export, because gs does not carry node metadata.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import provenance
from .method import installed
from .model import LAYER_OPS

ACCUMULATOR_OP = "InPlaceAccumulatorV2"
GRAD_SUFFIX = "_grad"
BUFFER_SUFFIX = "_grad.accumulation.buffer"
ACC_OUT_SUFFIX = "_grad.accumulation.out"


def layer_kind(node) -> str | None:
    """The layer kind of a forward node (gs node), or None if it is not a layer op."""
    if node.op in LAYER_OPS and node.domain in (None, "", "ai.onnx"):
        return node.op
    for domain, prefix, kind in installed().layer_ops():
        if node.domain == domain and node.op.startswith(prefix):
            return kind
    return None


@dataclass
class Layer:
    """One trainable layer of a training graph."""

    name: str
    op: str
    forward: gs.Node
    backward: list = field(default_factory=list)  # gs.Node, topological order
    params: list = field(default_factory=list)  # parameter names (weight first)
    accumulators: list = field(default_factory=list)  # gs.Node InPlaceAccumulatorV2
    input: str = ""
    output: str = ""
    weight_shape: tuple = ()
    input_shape: tuple = ()
    output_shape: tuple = ()

    @property
    def weight(self) -> str:
        return self.params[0]


_FLOAT_TYPES = (1, 10, 11, 16)  # TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


def _float_cast(node) -> bool:
    return node.op == "Cast" and int(node.attrs.get("to", 0)) in _FLOAT_TYPES


def _through_casts(t):
    """The tensor a chain of float Casts reads (a rounding pair, Cast to a low-precision type and
    back, is the same tensor in another precision): followed back to its source."""
    while len(t.inputs) == 1 and _float_cast(t.inputs[0]) and t.inputs[0].inputs:
        t = t.inputs[0].inputs[0]
    return t


def _cast_sink(t):
    """Followed forward through float Casts that are a tensor's only reader (a rounded output)."""
    while len(t.outputs) == 1 and _float_cast(t.outputs[0]) and t.outputs[0].outputs:
        t = t.outputs[0].outputs[0]
    return t


def layer_name_for(param: str, node_name: str) -> str:
    """Readable layer name: the weight's module path ('features.0.weight' -> 'features.0')."""
    if "." in param and not param.startswith("onnx::"):
        return param.rsplit(".", 1)[0]
    return re.sub(r"^/|/[A-Za-z]+$", "", node_name).replace("/", ".") or node_name


_GRAD_TAIL = re.compile(r"_grad(_\d+)?$")
_ACC_TAIL = re.compile(r"(\.accumulation\.(buffer|out))$")
_GRAD_END = re.compile(r"_grad$")


class TrainingGraph:
    """An ORT training graph indexed by layer. Mutate ``self.graph`` (gs) and call :meth:`reindex`."""

    def __init__(self, model: onnx.ModelProto, shapes: dict[str, tuple] | None = None):
        self.opset_imports = list(model.opset_import)
        self.ir_version = model.ir_version
        self.producer = (model.producer_name, model.producer_version)
        # the model's local functions (reuse's, two per layer) are kept as they are and written back
        # by to_onnx: no pass edits their bodies, and gs importing them (nodes x functions) was
        # most of the cost of every graph view of a reused 100-conv model
        self.functions = list(model.functions)
        if self.functions:
            model = onnx.ModelProto(
                ir_version=model.ir_version,
                opset_import=model.opset_import,
                graph=model.graph,
                metadata_props=model.metadata_props,
            )
        self.graph: gs.Graph = gs.import_onnx(model)
        self.shapes = dict(shapes or {})
        self.tags: dict[str, dict[str, str]] = {}
        for n in model.graph.node:  # keep tags already on the model (from earlier passes)
            if n.metadata_props:
                self.tags[n.name] = {p.key: p.value for p in n.metadata_props}
        self.reindex()

    # ------------------------------------------------------------------ indexing
    def reindex(self) -> None:
        g = self.graph
        self.graph_inputs = {t.name for t in g.inputs}
        self.params = [t.name for t in g.inputs if (t.name + BUFFER_SUFFIX) in self.graph_inputs]
        self.all_params = self.params + [t.name for t in g.inputs if self._is_frozen_param(t)]
        by_name = {n.name: n for n in g.nodes}
        self.nodes_by_name = by_name
        self._tensor_map = g.tensors()
        self._input_shapes = {
            t.name: tuple(t.shape) for t in g.inputs if t.shape and all(isinstance(d, int) for d in t.shape)
        }
        acc_by_grad = {}
        backward_of: dict[str, list] = defaultdict(list)  # forward node name -> its "<name>_Grad/" nodes
        for n in g.nodes:
            if n.op == ACCUMULATOR_OP:
                acc_by_grad[n.inputs[1].name] = n
            if "_Grad/" in n.name:
                head = n.name.split("_Grad/")
                for k in range(1, len(head)):  # every split point: a forward name may hold "_Grad/" itself
                    backward_of["_Grad/".join(head[:k])].append(n)
        self.layers: list[Layer] = []
        used = set()
        param_set = set(self.all_params)
        for n in g.nodes:
            kind = layer_kind(n)
            if kind is None or self.is_backward(n):
                continue
            slots = (0, 1) if n.op == "MatMul" else (1, 2)
            ins = [_through_casts(t).name for t in n.inputs]  # a rounded parameter is still the parameter
            params = [ins[s] for s in slots if s < len(ins) and ins[s] in param_set]
            if n.op != "MatMul" and (not params or params[0] != ins[1]):
                continue
            if not params:
                continue
            name = layer_name_for(params[0], n.name)
            while name in used:
                name += "_"
            used.add(name)
            bwd = backward_of.get(n.name, [])
            accs = [acc_by_grad[p + GRAD_SUFFIX] for p in params if p + GRAD_SUFFIX in acc_by_grad]
            data_in = ins[1] if n.op == "MatMul" and ins[0] in param_set else ins[0]
            out = _cast_sink(n.outputs[0]).name
            self.layers.append(
                Layer(
                    name=name,
                    op=kind,
                    forward=n,
                    backward=bwd,
                    params=params,
                    accumulators=accs,
                    input=data_in,
                    output=out,
                    weight_shape=self.shape(params[0]),
                    input_shape=self.shape(data_in),
                    output_shape=self.shape(out),
                )
            )

    def _is_frozen_param(self, t) -> bool:
        return (
            t.name not in self.params
            and (t.name + BUFFER_SUFFIX) not in self.graph_inputs
            and not t.name.endswith(BUFFER_SUFFIX)
            and t.name != "lazy_reset_grad"
            and t.dtype == np.float32
            and t.name not in (self.graph.inputs[0].name,)
        )

    @staticmethod
    def is_backward(node: gs.Node) -> bool:
        return "_Grad/" in node.name or node.op == ACCUMULATOR_OP

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def shape(self, tensor: str) -> tuple:
        """Static shape of a tensor; gradient tensors take the shape of what they differentiate; a
        tensor a float Cast makes, or that only float Casts read, that of the tensor cast."""
        got = self._shape(tensor)
        if got:
            return got
        t = self._tensor_map.get(tensor)
        if t is not None:
            for other in (_through_casts(t), _cast_sink(t)):
                if other is not t:
                    got = self._shape(other.name)
                    if got:
                        return got
        return ()

    def _shape(self, tensor: str) -> tuple:
        if tensor in self.shapes:
            return self.shapes[tensor]
        base = _GRAD_TAIL.sub("", tensor)
        base = _ACC_TAIL.sub("", base)
        base = _GRAD_END.sub("", base)
        if base in self.shapes:
            return self.shapes[base]
        got = self._input_shapes.get(tensor) or self._input_shapes.get(base)
        return got or ()

    # ------------------------------------------------------------------ tagging
    def tag(self, node_name: str, pass_name: str, layer: str, note: str, **extra: str) -> None:
        """Mark a node added or changed by a pass; shown by Netron as node properties."""
        new = provenance.record(pass_name, layer, note, **extra)
        keep = provenance.kept_on_retag(self.tags.get(node_name, {}), new)
        self.tags[node_name] = {**new, **keep}

    # ------------------------------------------------------------------ export
    def to_onnx(self) -> onnx.ModelProto:
        # the graph only: passes leave the bodies of the model's local functions as they were (reuse
        # adds two per layer; walking them on every export cost seconds per pass on 100-conv models)
        self.graph.cleanup(remove_unused_graph_inputs=False, recurse_functions=False)
        if not _in_topological_order(self.graph):  # gs's sort takes a second on a 1,000-node graph
            self.graph.toposort(recurse_functions=False)
        model = gs.export_onnx(self.graph, do_type_check=False)
        have = {(f.domain, f.name) for f in model.functions}
        model.functions.extend(f for f in self.functions if (f.domain, f.name) not in have)
        del model.opset_import[:]
        model.opset_import.extend(self.opset_imports)
        model.ir_version = self.ir_version
        model.producer_name, model.producer_version = self.producer
        for n in model.graph.node:
            tags = self.tags.get(n.name)
            if tags:
                provenance.write(n, tags)
            if "_Grad/" in n.name and not n.doc_string:
                n.doc_string = "Backward pass"
        if model.ir_version < 10 and any(n.metadata_props for n in model.graph.node):
            model.ir_version = 10  # node metadata_props (provenance) need IR 10
        return model


def _in_topological_order(graph: gs.Graph) -> bool:
    """Every node reads only graph inputs, initialisers and outputs of nodes before it."""
    ready = {t.name for t in graph.inputs} | {""}
    ready |= {name for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    for n in graph.nodes:
        if any(t.name not in ready for t in n.inputs):
            return False
        ready.update(t.name for t in n.outputs)
    return True


def training_graph(art) -> TrainingGraph:
    """The graph view of an artifact set's training model, with the forward shapes at the
    artifacts' batch size (inferred once per model, cached on its ModelInfo)."""
    return TrainingGraph(art.training, art.info.shapes(int(art.config.get("batch_size", 64))))


def pruned(model: onnx.ModelProto, outputs: list) -> onnx.ModelProto:
    """``model`` cut down to the nodes ``outputs`` need, with exactly those graph outputs (the
    backward of a training graph falls away; ONNX nodes are in topological order): its inputs and
    initializers are the ones those nodes read."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    need, keep = set(outputs), []
    for n in reversed(list(g.node)):
        if any(o in need for o in n.output if o):
            keep.append(n)
            need.update(i for i in n.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    for values in (g.input, g.initializer):
        kept = [t for t in values if t.name in need]
        del values[:]
        values.extend(kept)
    del g.output[:]
    g.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in outputs)
    return m
