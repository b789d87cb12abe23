"""The ``aten`` node kernels: the ops of CNN training graphs (ONNX's and ORT Training's gradient
ops) on torch's ATen kernels (oneDNN and ATen's vectorised CPU loops; cuDNN/cuBLAS on CUDA), so a
training step needs no ORT segment when every node is claimed.

Generic: the kernels know ops, never passes. A pass's own provider (a node it marked or added) is
asked first; this provider claims what is left that it has a kernel for (:func:`supports`), and
ORT runs anything else (``accelc train`` reports which ops fell back). ``--kernel aten=ort``
leaves these ops to ORT; ``--kernel all=ort`` runs the whole step on ORT, as plain ORT users get it.

Each kernel computes what ORT's kernel computes (tests/test_aten.py checks every one against ORT's
on random inputs): bit-equal where the arithmetic is the same (shape ops, ReLU and its gradient,
pooling, elementwise), to float32 rounding where the order of a reduction differs (BatchNorm, GEMM,
softmax cross-entropy). Two internal conventions differ from ORT's and stay inside this provider:
MaxPool's ``Indices`` are torch's (per (n, c) plane) and are read only by this provider's
MaxPoolGrad, which also needs the pooled input's shape (the forward kernel records it under
``<Indices>#shape``, a tuple: the input itself is freed after its last reader); :func:`supports` claims a MaxPool and its MaxPoolGrad on the same rules, so
the two are always claimed together.
"""

from __future__ import annotations

import onnx
from onnx import helper

from .kernels import BuildContext, KernelProvider, NodeKernel

MS = "com.microsoft"
OWN = "ai.accelc.aten"  # nodes only this provider's rewrite makes (and only it runs)
NAME = "aten"
IMPL = "torch"

# the (domain, op) pairs this provider has a kernel for ("" is ONNX's domain); the kernels are in
# :mod:`accelc.runtime.aten_ops` (torch), loaded when a graph is run
CONV_OPS = {("", "Conv"), (MS, "ConvGrad")}
OPS = CONV_OPS | {("", op) for op in (
    "Relu", "Div", "Sum", "Identity", "Cast", "Shape", "Reshape", "Flatten", "Expand", "ReduceSum", "ReduceMean",
    "ReduceMax", "ReduceL2", "ReduceSumSquare", "Gemm", "MatMul", "Transpose", "Concat", "Split", "Unsqueeze",
    "Squeeze", "Slice", "Clip", "Where", "Softmax", "Gather", "Pad", "Dropout", "BatchNormalization", "AveragePool",
    "GlobalAveragePool", "GlobalMaxPool", "SoftmaxCrossEntropyLoss", "MaxPool", "MaxPoolGrad",
    "Neg", "Sqrt", "Exp", "Log", "Abs", "Reciprocal", "Sigmoid", "Tanh", "Erf", "Floor", "Ceil", "Not",
    "Add", "Sub", "Mul", "Pow", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Equal", "And", "Or", "Max", "Min",
    "Constant", "Size", "LayerNormalization", "LeakyRelu",
)} | {(MS, op) for op in (
    "ReluGrad", "Scale", "ConcatTraining", "DropoutGrad", "BatchNormInternal", "BatchNormalizationGrad",
    "SoftmaxCrossEntropyLossGrad", "SplitTraining", "SliceGrad", "SigmoidGrad", "TanhGrad", "QuickGelu", "QuickGeluGrad",
    "LayerNormalizationGrad", "Gelu", "GeluGrad", "FusedMatMul", "LeakyReluGrad", "SoftmaxGrad_13",
)} | {(OWN, "ClipGrad")}  # fmt: skip


def attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def domain_of(node: onnx.NodeProto) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def supports(node: onnx.NodeProto) -> bool:
    """Whether this provider has a kernel for ``node`` with its attributes."""
    key = (domain_of(node), node.op_type)
    if key not in OPS:
        return False
    a = attrs(node)
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", ""):
        return False
    if key in CONV_OPS:
        return len(a.get("kernel_shape", [])) == 2
    if node.op_type in ("MaxPool", "MaxPoolGrad", "AveragePool"):
        ks = a.get("kernel_shape", [])
        pads = a.get("pads", [0] * 2 * len(ks))
        return (
            len(ks) == 2
            and a.get("storage_order", 0) == 0
            and pads[: len(ks)] == pads[len(ks) :]  # torch pads symmetrically
            and all(p <= k // 2 for p, k in zip(pads, ks))
        )
    if node.op_type == "FusedMatMul":
        return not a.get("transBatchA", 0) and not a.get("transBatchB", 0)
    if node.op_type == "LayerNormalization":
        return a.get("stash_type", 1) == 1
    if node.op_type == "Pad":
        return a.get("mode", "constant") == "constant" and len(node.input) < 4
    if node.op_type == "SoftmaxCrossEntropyLoss" or node.op_type == "SoftmaxCrossEntropyLossGrad":
        return a.get("reduction", "mean") in ("none", "mean", "sum")
    return True


def _scalar_zero(t: onnx.TensorProto | None) -> bool:
    if t is None:
        return False
    from onnx import numpy_helper

    v = numpy_helper.to_array(t)
    return v.size == 1 and float(v.reshape(-1)[0]) == 0.0


def fuse_gradient_chains(model: onnx.ModelProto) -> onnx.ModelProto:
    """Two exact rewrites of gradient chains, each placed where the chain's Mul was and only where
    its mask feeds nothing else:

    * Mul(dY, Cast(Greater(X, 0), float)) -> com.microsoft::ReluGrad(dY, X): one pass over memory
      (ATen's threshold_backward) instead of three, and no float mask kept from the forward to the
      backward. The same values for finite dY (the chain is how the ``opt`` pass spells ReluGrad for
      ORT's vectorised kernels; ORT runs this node too).
    * Mul(dY, Cast(And(GreaterOrEqual(X, lo), LessOrEqual(X, hi)), float)) -> ClipGrad(dY, X, lo, hi)
      in this provider's own domain (ORT's gradient of Clip, e.g. ReLU6), with the chain as its ONNX
      local function (ORT runs it too): the mask as bytes in the backward instead of a float mask
      from the forward; the same values, NaN included."""
    g = model.graph
    nodes = list(g.node)  # protobuf hands out a new wrapper per access: positions are the keys
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, int] = {}
    for n in nodes:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    outs = {o.name for o in g.output}
    producer = {o: k for k, n in enumerate(nodes) for o in n.output}
    drop, repl = set(), {}

    def single(k) -> bool:  # a node whose outputs feed exactly one node and no graph output
        return all(consumers.get(o) == 1 and o not in outs for o in nodes[k].output if o)

    for pos, n in enumerate(nodes):
        if n.op_type != "Mul" or domain_of(n) != "":
            continue
        clip = _clip_grad_chain(n, nodes, producer, single)
        if clip is not None:
            (x, lo, hi, dy), chain = clip
            fused = helper.make_node("ClipGrad", [dy, x, lo, hi], [n.output[0]], name=n.name, domain=OWN)
            fused.metadata_props.extend(n.metadata_props)
            repl[pos] = fused
            drop.update(chain)
            continue
        for side in (0, 1):
            kc = producer.get(n.input[side])
            cast = nodes[kc] if kc is not None else None
            if cast is None or cast.op_type != "Cast" or attrs(cast).get("to") != onnx.TensorProto.FLOAT:
                continue
            kg = producer.get(cast.input[0])
            gt = nodes[kg] if kg is not None else None
            if gt is None or gt.op_type != "Greater" or not _scalar_zero(inits.get(gt.input[1])):
                continue
            if not single(kc) or not single(kg):
                continue
            fused = helper.make_node(
                "ReluGrad", [n.input[1 - side], gt.input[0]], [n.output[0]], name=n.name, domain=MS
            )
            fused.metadata_props.extend(n.metadata_props)
            repl[pos] = fused
            drop.update((kc, kg))
            break
    if not repl:
        return model
    m = _rebuilt(model, nodes, repl, drop, (MS, OWN))
    if any(n.domain == OWN and n.op_type == "ClipGrad" for n in repl.values()):
        if not any(f.domain == OWN and f.name == "ClipGrad" for f in m.functions):
            onnx_opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 17)
            m.functions.append(_clip_grad_function(onnx_opset))
    return m


def pool_before_relu(model: onnx.ModelProto) -> onnx.ModelProto:
    """An exact rewrite: MaxPool(Relu(a)) -> Relu(MaxPool(a)) where the ReLU's output feeds only
    the pool (and, in a training graph, the ReLU's own gradient). ReLU is monotone, so the pooled
    values are equal bit for bit; the pool's indices differ only in windows with no positive value,
    whose gradient the ReLU zeroes either way. In the backward, ReluGrad(MaxPoolGrad(dP, I), a)
    becomes MaxPoolGrad(ReluGrad(dP, P), I) over the pooled tensor P: the ReLU and its gradient run
    on a quarter of the elements (a 2x2 pool), and the pre-ReLU activation ``a`` is freed after the
    pool instead of being kept for the backward (the pooled output P, which the gradient reads
    now, is kept anyway for the next layer's ConvGrad). The gradient is the same value for finite
    inputs: a position gets dP of the windows whose maximum it is, and only where it is positive."""
    g = model.graph
    nodes = list(g.node)
    consumers: dict[str, list[int]] = {}
    for k, n in enumerate(nodes):
        for i in n.input:
            consumers.setdefault(i, []).append(k)
    outs = {o.name for o in g.output}
    repl: dict[int, onnx.NodeProto] = {}
    for kr, relu in enumerate(nodes):
        if relu.op_type != "Relu" or domain_of(relu) != "" or relu.output[0] in outs:
            continue
        a, r = relu.input[0], relu.output[0]
        readers = consumers.get(r, [])
        pools = [k for k in readers if nodes[k].op_type == "MaxPool" and domain_of(nodes[k]) == ""]
        if len(pools) != 1 or any(k in repl for k in (kr, pools[0])):
            continue
        kp = pools[0]
        pool = nodes[kp]
        idx = pool.output[1] if len(pool.output) > 1 else ""
        if pool.input[0] != r or idx in outs:  # the indices change in windows with no positive value
            continue
        read = bool(idx) and bool(consumers.get(idx))
        back = _pool_relu_backward(nodes, consumers, outs, idx, a, r) if read else None
        if read and back is None:  # indices read by a gradient this rewrite does not know
            continue
        if any(k != kp and (back is None or k != back[1]) for k in readers):
            continue
        pooled = pool.output[0]
        pre = f"{pooled}__maxpool_before_relu"
        new_pool = helper.make_node("MaxPool", [a], [pre, *pool.output[1:]], name=pool.name)
        new_pool.attribute.extend(pool.attribute)
        new_relu = helper.make_node("Relu", [pre], [pooled], name=relu.name)
        for old, new in ((pool, new_pool), (relu, new_relu)):
            new.metadata_props.extend(old.metadata_props)
        repl[kr], repl[kp] = new_pool, new_relu
        if back is not None:
            kq, kg = back
            q, grad = nodes[kq], nodes[kg]
            dpre = f"{grad.output[0]}__maxpool_before_relu"
            new_grad = helper.make_node("ReluGrad", [q.input[0], pooled], [dpre], name=grad.name, domain=MS)
            new_q = helper.make_node("MaxPoolGrad", [dpre, q.input[1]], list(grad.output), name=q.name)
            new_q.attribute.extend(q.attribute)
            for old, new in ((grad, new_grad), (q, new_q)):
                new.metadata_props.extend(old.metadata_props)
            repl[kq], repl[kg] = new_grad, new_q
    if not repl:
        return model
    return _rebuilt(model, nodes, repl, (), {n.domain for n in repl.values() if n.domain})


def _rebuilt(model: onnx.ModelProto, nodes: list, repl: dict, drop, domains) -> onnx.ModelProto:
    """A copy of ``model`` whose nodes are ``nodes`` with those at the positions of ``repl``
    replaced and those in ``drop`` left out, importing the opsets of ``domains`` (version 1)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.node[:]
    m.graph.node.extend(repl.get(k, n) for k, n in enumerate(nodes) if k not in drop)
    for dom in domains:
        if not any(o.domain == dom for o in m.opset_import):
            m.opset_import.append(helper.make_opsetid(dom, 1))
    return m


def _pool_relu_backward(nodes, consumers, outs, idx, a, r):
    """(MaxPoolGrad position, ReluGrad position) when the pool's indices ``idx`` are read only by
    a MaxPoolGrad whose output feeds only ReluGrad(·, a or r); else None."""
    if len(consumers[idx]) != 1:
        return None
    kq = consumers[idx][0]
    q = nodes[kq]
    if q.op_type != "MaxPoolGrad" or domain_of(q) != "" or q.input[1] != idx or q.output[0] in outs:
        return None
    readers = consumers.get(q.output[0], [])
    if len(readers) != 1:
        return None
    kg = readers[0]
    grad = nodes[kg]
    if grad.op_type != "ReluGrad" or domain_of(grad) != MS or grad.input[0] != q.output[0]:
        return None
    if grad.input[1] not in (a, r):
        return None
    return kq, kg


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """This provider's exact rewrites of a graph before its nodes are claimed."""
    return pool_before_relu(fuse_gradient_chains(model))


def _clip_grad_function(opset: int) -> onnx.FunctionProto:
    """ClipGrad's ONNX form (the chain it replaces, as a local function): ORT runs it where this
    provider does not (a segment, the typing session of the executor)."""
    nodes = [
        helper.make_node("GreaterOrEqual", ["X", "lo"], ["a"]),
        helper.make_node("LessOrEqual", ["X", "hi"], ["b"]),
        helper.make_node("And", ["a", "b"], ["m"]),
        helper.make_node("Cast", ["m"], ["mf"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Mul", ["dY", "mf"], ["dX"]),
    ]
    return helper.make_function(
        OWN, "ClipGrad", ["dY", "X", "lo", "hi"], ["dX"], nodes, [helper.make_opsetid("", opset)]
    )


def _clip_grad_chain(mul, nodes, producer, single):
    """((X, lo, hi, dY), positions of the mask's nodes) when ``mul`` is dY times the float mask of
    lo <= X <= hi, else None."""
    for side in (0, 1):
        k_cast = producer.get(mul.input[side])
        if k_cast is None or nodes[k_cast].op_type != "Cast" or not single(k_cast):
            continue
        if attrs(nodes[k_cast]).get("to") != onnx.TensorProto.FLOAT:
            continue
        k_and = producer.get(nodes[k_cast].input[0])
        if k_and is None or nodes[k_and].op_type != "And" or not single(k_and):
            continue
        parts = [producer.get(i) for i in nodes[k_and].input]
        if any(k is None or not single(k) for k in parts):
            continue
        by_op = {nodes[k].op_type: nodes[k] for k in parts}
        ge, le = by_op.get("GreaterOrEqual"), by_op.get("LessOrEqual")
        if ge is None or le is None or ge.input[0] != le.input[0]:
            continue
        return (ge.input[0], ge.input[1], le.input[1], mul.input[1 - side]), {k_cast, k_and, *parts}
    return None


def _build(node: onnx.NodeProto, ctx: BuildContext) -> NodeKernel:
    from .aten_ops import build  # heavy: torch, loaded when a graph is run

    return build(node, ctx)


PROVIDER = KernelProvider(
    name=NAME,
    implementations=(IMPL,),
    claims=supports,
    build=_build,
    summary="every standard op of a CNN training graph (BatchNorm, pooling, loss, GEMM, elementwise, shape) on ATen",
    generic=True,
    prepare=prepare,
    cpu_only=False,  # torch's kernels: cuDNN/cuBLAS on CUDA tensors
)
