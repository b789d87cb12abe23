"""Legalisation: rewrite forward-graph constructs that ORT Training 1.19.2 cannot train (or
cannot train safely) into exact equivalents, before the gradient graph is built. One function per
construct; each returns the nodes that replace one node and a note, or None to keep it.

* ``AveragePool``: ORT 1.19.2's CPU ``AveragePoolGrad`` kills the process with SIGFPE
  (seen on this machine for a plain 4×4/4 pool). An average pool with ``count_include_pad=1``
  (or no padding) equals a depthwise convolution whose kernel is 1/(kh·kw) everywhere; that
  Conv (a frozen constant weight) trains through ORT's ConvGrad. Pools that cannot be expressed
  so (``count_include_pad=0`` with padding, ``ceil_mode=1`` with partial windows) are refused.
* ``HardSigmoid`` / ``HardSwish`` (MobileNetV3, GhostNet): ORT 1.19.2 has no gradient builder
  for them. HardSigmoid(x) = Clip(αx + β, 0, 1) and HardSwish(x) = x · HardSigmoid(x) with
  α = 1/6, β = 1/2 — the same values, built from Mul, Add and Clip, which ORT differentiates.
* ``Where`` with an input broadcast to its output (a 0-d or per-channel parameter): ORT 1.19.2's
  gradient of Where gives that input a gradient of the output's shape, never summed over the
  broadcast axes (training fails on the shape). The input is expanded to the output's shape
  first (Expand copies; ORT's gradient of Expand sums), which changes no value.
* ``LayerNormalization`` with only its first output (as torch exports it; ConvNeXt): ORT's
  gradient builder reads the optional Mean and InvStdDev outputs and fails on an assertion
  without them. They are added (unused by the forward), which changes no value.

Before the rules, shape arithmetic is folded (:func:`fold_shape_arithmetic`): a graph that
computes a shape from ``x.shape`` (Shape, Gather, Div, Concat, ... into a Reshape, as timm's
split attention does) leaves ONNX's shape inference without the shapes after it, and the rules
above (and the passes, and the memory estimate) need them. The input's C, H and W are fixed, so
every such value is a constant but for the batch; ONNX Runtime's symbolic shape inference
computes them exactly (with the batch as a symbol), and each one is written as a constant in
the slot that reads it, the batch kept dynamic.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import provenance
from .errors import AccelcError
from .model import infer_shapes

PASS = "legalize"
# Ops ONNX Runtime's symbolic shape inference can leave as the only readers of a computed shape
# once its readers are folded: removed when nothing reads them any more.
_SHAPE_OPS = {
    "Shape", "Size", "Constant", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Add", "Sub", "Mul",
    "Div", "Mod", "Floor", "Ceil", "Neg", "Abs", "Identity", "Reshape", "Range", "Equal", "Less", "Greater",
    "Where", "Max", "Min", "ReduceProd", "ReduceSum", "ConstantOfShape", "Expand", "Not", "And", "Or",
}  # fmt: skip
_INT_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _const(name: str, value: float) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], name=name, value=numpy_helper.from_array(np.array(value, np.float32), name)
    )


def _average_pool(n, shapes, m):
    a = _attrs(n)
    k = list(a.get("kernel_shape", []))
    strides = list(a.get("strides", [1] * len(k)))
    pads = list(a.get("pads", [0] * 2 * len(k)))
    auto_pad = a.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    xs = shapes.get(n.input[0])
    where = f"AveragePool '{n.name}'"
    if not xs or len(xs) != 4 or len(k) != 2:
        raise AccelcError(
            f"{where}: needs a known 4-D input shape to be trained safely on ORT 1.19.2 "
            f"(its AveragePoolGrad crashes the process)"
        )
    if auto_pad not in ("NOTSET", "VALID"):
        raise AccelcError(
            f"{where}: auto_pad={auto_pad} is not supported (ORT 1.19.2's AveragePoolGrad "
            f"crashes; accelc rewrites pools with explicit pads only)"
        )
    if any(pads) and not a.get("count_include_pad", 0):
        raise AccelcError(
            f"{where}: padded average pooling with count_include_pad=0 cannot be trained on "
            f"ORT 1.19.2 (AveragePoolGrad crashes the process) and has no exact Conv form"
        )
    if a.get("ceil_mode", 0):
        for i in range(2):
            size = xs[2 + i] + pads[i] + pads[i + 2] - k[i]
            if size % strides[i]:
                raise AccelcError(f"{where}: ceil_mode=1 with partial windows cannot be trained on ORT 1.19.2")
    c = xs[1]
    wname = f"accelc.legalize.{n.name or n.output[0]}.avgpool_kernel".replace("/", "_")
    w = np.full((c, 1, k[0], k[1]), 1.0 / (k[0] * k[1]), dtype=np.float32)
    m.graph.initializer.append(numpy_helper.from_array(w, wname))
    conv = helper.make_node(
        "Conv",
        [n.input[0], wname],
        [n.output[0]],
        name=(n.name or "avgpool") + "_as_conv",
        group=c,
        kernel_shape=k,
        strides=strides,
        pads=pads,
    )
    note = f"AveragePool {k[0]}x{k[1]}/{strides[0]} as depthwise Conv (ORT 1.19.2 AveragePoolGrad crashes)"
    provenance.tag(conv, PASS, note=note)
    return [conv], (
        f"AveragePool '{n.name}' rewritten as a frozen depthwise Conv (ORT 1.19.2's AveragePoolGrad crashes with SIGFPE)"
    )


def _hard(n, shapes, m):
    """HardSigmoid as Clip(αx + β, 0, 1); HardSwish as x · that (α = 1/6, β = 1/2)."""
    a = _attrs(n)
    swish = n.op_type == "HardSwish"
    alpha, beta = (1.0 / 6.0, 0.5) if swish else (float(a.get("alpha", 0.2)), float(a.get("beta", 0.5)))
    base = (n.name or n.output[0]).replace("/", "_")
    x, y = n.input[0], n.output[0]
    t = [f"{base}/legal_{k}" for k in ("alpha", "beta", "zero", "one", "ax", "axb", "hsig")]
    nodes = [_const(t[0], alpha), _const(t[1], beta), _const(t[2], 0.0), _const(t[3], 1.0)]
    nodes += [
        helper.make_node("Mul", [x, t[0]], [t[4]], name=t[4]),
        helper.make_node("Add", [t[4], t[1]], [t[5]], name=t[5]),
        helper.make_node("Clip", [t[5], t[2], t[3]], [t[6] if swish else y], name=t[6]),
    ]
    if swish:
        nodes.append(helper.make_node("Mul", [x, t[6]], [y], name=f"{base}/legal_hswish"))
    for node in nodes:
        provenance.tag(node, PASS, note=f"{n.op_type} from Mul/Add/Clip (ORT 1.19.2 has no gradient for it)")
    return nodes, f"{n.op_type} '{n.name}' rewritten with Mul/Add/Clip (no ORT 1.19.2 gradient builder for it)"


def _layer_norm(n, shapes, m):
    if len(n.output) >= 3 and all(n.output[:3]):
        return None
    node = onnx.NodeProto()
    node.CopyFrom(n)
    base = (n.name or n.output[0]).replace("/", "_")
    outs = list(node.output) + [""] * (3 - len(node.output))
    outs = [o or f"{base}/legal_{k}" for o, k in zip(outs, ("y", "mean", "inv_std"))]
    del node.output[:]
    node.output.extend(outs)
    provenance.tag(node, PASS, note="Mean and InvStdDev outputs added (ORT 1.19.2's gradient builder reads them)")
    return [node], f"LayerNormalization '{n.name}': Mean and InvStdDev outputs added for ORT 1.19.2's gradient"


def _where(n, shapes, m):
    """Where(c, x, y) with x or y broadcast to the output: ORT 1.19.2's gradient of Where hands
    each of them a gradient of the output's shape (no sum over the broadcast axes), so a 0-d or
    per-channel parameter there fails to train. Each such input is expanded first to the shapes
    of the other two (Expand copies; its gradient sums over the broadcast axes), which changes no
    value."""
    out = shapes.get(n.output[0])
    constants = {c.output[0] for c in m.graph.node if c.op_type == "Constant" and c.output}
    base = (n.name or n.output[0]).replace("/", "_")
    nodes, new_inputs, changed = [], list(n.input), []
    for slot in (1, 2):
        name = n.input[slot] if slot < len(n.input) else ""
        if not name or name in constants or (out is not None and shapes.get(name) == out):
            continue
        cur = name
        for other in (k for k in (0, 1, 2) if k != slot):
            shape_of, expanded = f"{base}/legal_shape{slot}_{other}", f"{base}/legal_expand{slot}_{other}"
            nodes.append(helper.make_node("Shape", [n.input[other]], [shape_of], name=shape_of))
            nodes.append(helper.make_node("Expand", [cur, shape_of], [expanded], name=expanded))
            cur = expanded
        new_inputs[slot] = cur
        changed.append(name)
    if not changed:
        return None
    node = onnx.NodeProto()
    node.CopyFrom(n)
    del node.input[:]
    node.input.extend(new_inputs)
    nodes.append(node)
    for x in nodes:
        provenance.tag(
            x, PASS, note="Where's broadcast inputs expanded (ORT 1.19.2's Where gradient does not sum them)"
        )
    return nodes, (
        f"Where '{n.name}': broadcast input(s) {', '.join(changed)} expanded to the output's shape "
        f"(ORT 1.19.2's Where gradient does not sum over broadcast axes)"
    )


RULES = {
    "AveragePool": _average_pool,
    "HardSigmoid": _hard,
    "HardSwish": _hard,
    "LayerNormalization": _layer_norm,
    "Where": _where,
}


def _symbolic_values(model: onnx.ModelProto, sizes_symbolic: bool):
    """(values, value infos) from ONNX Runtime's symbolic shape inference: ``values`` maps each
    integer tensor it can compute (a shape, a dimension) to its value, a number or a list whose
    entries are ints or sympy expressions of the symbolic dimensions: the batch, and with
    ``sizes_symbolic`` the input's spatial sizes too. None where it cannot follow the graph, or
    had to assume two symbolic dimensions equal."""
    import logging

    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError:  # pragma: no cover - onnxruntime-training ships it
        return None
    if sizes_symbolic:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        inits = {t.name for t in m.graph.initializer}
        for vi in m.graph.input:
            if vi.name not in inits:
                for k, d in enumerate(vi.type.tensor_type.shape.dim):
                    if k >= 2:
                        d.Clear()
                        d.dim_param = f"accelc_size{k}"
        model = m
    log = logging.getLogger("onnxruntime.tools.symbolic_shape_infer")
    was = log.disabled
    log.disabled = True  # it warns about what it cannot infer; accelc says what matters in one line
    try:
        ssi = SymbolicShapeInference(2**31 - 1, False, False, 0)
        ssi._preprocess(model)
        while ssi.run_:
            ssi._infer_impl()
    except Exception:  # noqa: BLE001 - a graph it cannot follow is left as it is
        return None
    finally:
        log.disabled = was
    if ssi.suggested_merge_:
        return None
    return ssi.sympy_data_, ssi.known_vi_


def _entry(value) -> int | None:
    """An entry of a computed shape as an int, or None where it depends on a symbolic dimension."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    return int(value) if getattr(value, "is_Integer", False) else None


def _entries(value, rank: int):
    """``value`` (from the symbolic inference) as an int or a list (None for symbolic entries) of
    the given rank; None where it is not one."""
    if isinstance(value, np.ndarray):
        if value.ndim > 1:
            return None
        value = value.tolist() if value.ndim == 1 else value.item()
    if rank == 0 and not isinstance(value, (list, tuple)):
        return _entry(value)
    if rank == 1 and isinstance(value, (list, tuple)):
        return [_entry(v) for v in value]
    return None


def _is_constant(entries) -> bool:
    return entries is not None and (not isinstance(entries, list) or all(v is not None for v in entries))


def _dims_text(vi) -> list[str] | None:
    """The (symbolic) dimensions of a value info as text, as the symbolic inference writes them."""
    if vi is None or not vi.type.tensor_type.HasField("shape"):
        return None
    return [
        str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim
    ]


def _folded_value(node, slot: int, value, rank: int, vis) -> list | int | None:
    """The constant that may replace the computed input ``slot`` of ``node`` (``value`` from the
    symbolic inference), or None. Symbolic entries (the batch, a size) are kept only where a
    constant means the same for every value of the symbol: in a Reshape, 0 (copy the input's
    dimension) where the input's dimension there is the same expression, else -1 for the one
    entry left; in an Expand, 1 (keep the input's dimension) where the input's aligned dimension
    is the same expression."""
    out = _entries(value, rank)
    if out is None or _is_constant(out):
        return out
    if slot != 1 or node.op_type not in ("Reshape", "Expand"):
        return None
    in_dims = _dims_text(vis.get(node.input[0]))
    if in_dims is None:
        return None
    if node.op_type == "Expand":
        shift = len(out) - len(in_dims)
        for i, v in enumerate(out):
            if v is None:
                if i - shift < 0 or in_dims[i - shift] != str(value[i]):
                    return None
                out[i] = 1
        return out
    allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)
    for i, v in enumerate(out):
        if v is None and not allowzero and i < len(in_dims) and in_dims[i] == str(value[i]):
            out[i] = 0
    left = [i for i, v in enumerate(out) if v is None]
    if len(left) == 1 and -1 not in out and not (allowzero and 0 in out):
        out[left[0]] = -1
        left = []
    return None if left else out


def fold_shape_arithmetic(model: onnx.ModelProto, at_input_size: bool = False) -> tuple[onnx.ModelProto, str | None]:
    """A copy of ``model`` whose integer values computed from tensor shapes (a Reshape's target
    built from ``x.shape`` with Shape, Gather, Div, Concat, ...) are constants where they do not
    depend on the batch nor (unless ``at_input_size``) on the input's height and width, and a
    note; ``model`` itself and None where nothing folds.

    The values come from ONNX Runtime's symbolic shape inference, with the batch (and the sizes)
    as symbols, so the folded graph computes the same values as the original at every batch size
    (and input size): a value that depends on a symbol stays computed, or, in a Reshape or an
    Expand, becomes a constant that means the same for every value of it (see
    :func:`_folded_value`). By default the channel arithmetic folds (``C // groups``) and the
    sizes stay computed (ONNX's shape inference follows Shape, Gather, Concat on its own; the
    rescale pass changes the input size); ``at_input_size`` folds the sizes too, at the model's
    fixed input size. The shape computations nothing reads any more are removed."""
    found = _symbolic_values(model, sizes_symbolic=not at_input_size)
    if found is None:
        return model, None
    values, vis = found

    def int_rank(name: str) -> int | None:
        """The rank of a computed integer tensor (None: not one, or its rank is unknown)."""
        t = vis[name].type.tensor_type if name in values and name in vis else None
        return len(t.shape.dim) if t is not None and t.elem_type in _INT_TYPES and t.HasField("shape") else None

    def constant_value(name: str) -> bool:
        rank = int_rank(name)
        return rank is not None and _is_constant(_entries(values[name], rank))

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    constant = {t.name for t in g.initializer} | {n.output[0] for n in g.node if n.op_type == "Constant" and n.output}
    names = {o for n in g.node for o in n.output} | {t.name for t in g.initializer} | {i.name for i in g.input}
    added = []
    for node in g.node:
        if node.op_type in _SHAPE_OPS and node.output and all(constant_value(o) for o in node.output):
            continue  # a step of a constant computation: the reader of its result is what folds
        for slot, name in enumerate(node.input):
            rank = int_rank(name) if name and name not in constant else None
            value = None if rank is None else _folded_value(node, slot, values[name], rank, vis)
            if value is None:
                continue
            dtype = helper.tensor_dtype_to_np_dtype(vis[name].type.tensor_type.elem_type)
            base = f"accelc.legalize.{node.name or node.output[0]}.{slot}.folded_shape".replace("/", "_")
            cname, k = base, 0
            while cname in names:
                k += 1
                cname = f"{base}_{k}"
            names.add(cname)
            const = helper.make_node(
                "Constant", [], [cname], name=cname, value=numpy_helper.from_array(np.array(value, dtype), cname)
            )
            provenance.tag(const, PASS, note="a value computed from tensor shapes, folded to the constant it always is")
            added.append(const)
            node.input[slot] = cname
    if not added:
        return model, None
    kept = added + list(g.node)
    while True:  # drop the shape computations nothing reads any more
        read = {i for n in kept for i in n.input} | {o.name for o in g.output}
        dead = {
            id(n)
            for n in kept
            if n.op_type in _SHAPE_OPS
            and (n.op_type in ("Shape", "Size", "Constant") or all(o in values for o in n.output))
            and not any(o in read for o in n.output)
        }
        if not dead:
            break
        kept = [n for n in kept if id(n) not in dead]
    ours = {id(n) for n in added}
    folded = sum(1 for n in kept if id(n) in ours)
    del g.node[:]
    g.node.extend(kept)
    if at_input_size:
        inits = {t.name for t in g.initializer}
        data = [i for i in g.input if i.name not in inits]
        size = "x".join((_dims_text(data[0]) or [])[2:]) if data else "?"
        note = (
            f"{folded} value(s) computed from tensor shapes (Shape, Gather, Div, Concat, ...) folded to constants at "
            f"the input size {size}, the batch kept dynamic: every tensor's shape is static"
        )
    else:
        note = (
            f"{folded} value(s) computed from tensor shapes (Shape, Gather, Div, Concat, ...) folded to the constants "
            f"they are at every batch and input size: ONNX's shape inference follows the graph"
        )
    return m, note


def _needs_folding(model: onnx.ModelProto) -> bool:
    """Whether the graph computes shapes from tensors' shapes and ONNX's shape inference (at a
    fixed batch) cannot tell the shape of some tensor."""
    g = model.graph
    if not any(n.op_type in ("Shape", "Size") for n in g.node):
        return False
    shapes = infer_shapes(model, 2, scalars=True)
    return any(o and o not in shapes for n in g.node for o in n.output)


def _pool_shapes_unknown(model: onnx.ModelProto) -> bool:
    """Whether an AveragePool (which :func:`_average_pool` rewrites from its input's shape) reads
    a tensor of unknown shape."""
    pools = [n.input[0] for n in model.graph.node if n.op_type == "AveragePool" and n.input]
    if not pools:
        return False
    shapes = infer_shapes(model, 2)
    return any(x not in shapes for x in pools)


def legalize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Return a legalised copy of the forward model and notes on what changed."""
    notes = []
    if _needs_folding(model):
        model, note = fold_shape_arithmetic(model)
        notes += [note] if note else []
        if _pool_shapes_unknown(model):  # the sizes too: the pool's rewrite needs its input's shape
            model, note = fold_shape_arithmetic(model, at_input_size=True)
            notes += [note] if note else []
    if not notes and not any(n.op_type in RULES for n in model.graph.node):
        return model, []
    m = onnx.ModelProto()
    m.CopyFrom(model)
    shapes = infer_shapes(m, 2) if any(n.op_type in ("AveragePool", "Where") for n in m.graph.node) else {}
    new_nodes = []
    for n in m.graph.node:
        rule = RULES.get(n.op_type)
        done = rule(n, shapes, m) if rule else None
        if done is None:
            new_nodes.append(n)
            continue
        nodes, note = done
        new_nodes.extend(nodes)
        notes.append(note)
    if not notes:
        return model, []
    del m.graph.node[:]
    m.graph.node.extend(new_nodes)
    if m.ir_version < 10 and any(n.metadata_props for n in m.graph.node):
        m.ir_version = 10
    return m, notes
