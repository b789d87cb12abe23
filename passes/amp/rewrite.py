"""The ``amp`` pass: the training-graph rewrite (see the package doc for the design).

Every 2-D Conv, its ConvGrad, every Gemm layer and the Gemm nodes of its backward become
*low-precision nodes*: each of their float inputs is replaced by the tensor rounded to the low
type, ``Cast(to=low) -> Cast(to=float)`` (a rounding pair), and each of their outputs is rounded
the same way before anything reads it. A tensor is rounded once, whatever number of low-precision
nodes read it: the forward's rounded activation and weight are what the ConvGrad / backward Gemm
read. For fp16, the loss gradient seed is multiplied by the loss scale and every parameter
gradient divided by it (``Mul``/``Div`` with the initializer ``accelc.amp.loss_scale``).

Every node added or changed carries provenance (``accelc.pass = amp``), ``accelc.exec = amp`` (the
runtime's ``amp`` kernel claims it) and ``accelc.amp.role`` (what the kernel does with it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from ...compiler import provenance
from ...compiler.artifacts import Artifacts
from ...compiler.errors import AccelcError
from ...compiler.graph import ACCUMULATOR_OP, TrainingGraph, training_graph
from ...compiler.options import Options, choice, int_at_least, option, positive_float
from ...compiler.pass_api import Pass, PassResult
from ...compiler.validation import random_feeds, run_lowered

PASS = "amp"
ENGINE = "amp"  # the value of provenance.EXEC the runtime's ``amp`` kernel claims
ROLE = "accelc.amp.role"
DTYPE = "accelc.amp.dtype"
LAYOUT = "accelc.amp.layout"
ALIAS = "accelc.amp.alias"  # on a rounding pair's second Cast: every reader is a low-precision node
GROWTH = "accelc.amp.growth_interval"
SCALE = "accelc.amp.loss_scale"  # the loss-scale initializer (fp16)
INPUT_SUFFIX = "/amp_q"  # the name of a rounded input: <tensor>/amp_q

# roles (the kernel's dispatch)
CAST_LOW, CAST_BACK, CONV, CONV_GRAD, GEMM, SCALE_SEED, UNSCALE = (
    "cast_low",
    "cast_back",
    "conv",
    "conv_grad",
    "gemm",
    "scale_seed",
    "unscale",
)
LOW_TYPES = {"bf16": TensorProto.BFLOAT16, "fp16": TensorProto.FLOAT16}


def amp_role(node) -> str | None:
    """The amp role of an ONNX node, or None if the amp pass did not mark it."""
    p = {x.key: x.value for x in node.metadata_props}
    return p.get(ROLE) if p.get(provenance.EXEC) == ENGINE else None


def _float_tensor(t) -> bool:
    if isinstance(t, gs.Constant):
        return t.values.dtype == np.float32
    return t.dtype in (None, np.float32)


class _Rewriter:
    def __init__(self, tg: TrainingGraph, options: dict):
        self.tg = tg
        self.g = tg.graph
        self.low = LOW_TYPES[options.dtype]
        self.options = options
        self.rounded: dict[str, gs.Variable] = {}  # tensor name -> its rounded version
        self.pairs: list[tuple[gs.Node, gs.Node]] = []  # (cast to low, cast back)
        self.compute: set[str] = set()  # names of the low-precision nodes
        self.already: set[str] = set()  # tensors that are a rounding pair's output (rounded already)
        self.added: list[gs.Node] = []

    def _tag(self, node: gs.Node, layer: str, role: str, note: str) -> None:
        self.tg.tag(
            node.name,
            PASS,
            self.tg.tags.get(node.name, {}).get(provenance.LAYER, layer),
            note,
            **{
                provenance.EXEC: ENGINE,
                ROLE: role,
                DTYPE: self.options.dtype,
                LAYOUT: self.options.layout,
            },
        )

    def _pair(self, src: gs.Variable, dst: gs.Variable, base: str, layer: str, what: str) -> None:
        lo = gs.Variable(f"{base}/amp_lo", dtype=None)
        a = gs.Node("Cast", name=f"{base}/amp_to_low", inputs=[src], outputs=[lo], attrs={"to": self.low})
        b = gs.Node("Cast", name=f"{base}/amp_to_float", inputs=[lo], outputs=[dst], attrs={"to": TensorProto.FLOAT})
        self.g.nodes.extend([a, b])
        self.added += [a, b]
        self.pairs.append((a, b))
        self.already.add(dst.name)
        self._tag(a, layer, CAST_LOW, f"{what}: rounded to {self.options.dtype} (once per tensor)")
        self._tag(b, layer, CAST_BACK, f"{what}: back to float for the readers (a no-op under accelc's runtime)")

    def round_input(self, node: gs.Node, k: int, layer: str) -> None:
        t = node.inputs[k]
        if not t.name or not _float_tensor(t):
            return
        if t.name in self.already:  # produced by a rounding pair already (e.g. a conv's output)
            return
        r = self.rounded.get(t.name)
        if r is None:
            r = gs.Variable(f"{t.name}{INPUT_SUFFIX}", dtype=np.float32, shape=getattr(t, "shape", None))
            # a backward reader names the pair after itself, so the pair counts as backward
            # (tg.is_backward) and skip's pruning removes it with the layer's backward
            base = node.name + f"/amp_in{k}" if TrainingGraph.is_backward(node) else t.name
            self._pair(t, r, base, layer, f"input {k} of {node.name}")
            self.rounded[t.name] = r
        node.inputs[k] = r

    def round_outputs(self, node: gs.Node, layer: str) -> None:
        for k, out in enumerate(list(node.outputs)):
            if not out.name:
                continue
            raw = gs.Variable(f"{out.name}/amp_raw", dtype=None, shape=out.shape)
            node.outputs[k] = raw
            self._pair(raw, out, f"{node.name}/amp_out{k}", layer, f"output {k} of {node.name}")

    def low_node(self, node: gs.Node, layer: str, role: str) -> None:
        self.compute.add(node.name)
        for k in range(len(node.inputs)):
            self.round_input(node, k, layer)
        self.round_outputs(node, layer)
        self._tag(
            node,
            layer,
            role,
            f"runs in {self.options.dtype} with float32 accumulation under accelc's runtime "
            f"(plain ORT: float32 on the rounded inputs, the same values up to summation order)",
        )

    def loss_scaling(self, init: float) -> list[str]:
        """fp16: seed·S and every parameter gradient ÷ S. Returns the gradients unscaled."""
        g = self.g
        loss = g.outputs[0].name
        tensors = g.tensors()
        seed = tensors.get(loss + "_grad")
        if not isinstance(seed, gs.Constant):
            raise AccelcError(
                f"--amp-dtype fp16 needs the loss gradient seed '{loss}_grad' (a constant) for loss scaling; "
                "this training graph has none: use --amp-dtype bf16"
            )
        scale = gs.Constant(SCALE, np.array(init, dtype=np.float32))
        scaled = gs.Variable(f"{loss}_grad/amp_scaled", dtype=np.float32)
        for n in list(g.nodes):
            for k, t in enumerate(n.inputs):
                if t is seed:
                    n.inputs[k] = scaled
        m = gs.Node("Mul", name=f"{loss}_Grad/amp_loss_scale", inputs=[seed, scale], outputs=[scaled])
        g.nodes.append(m)
        self._tag(m, "loss", SCALE_SEED, "fp16 loss scaling: the loss gradient seed times the current loss scale")
        self.tg.tags[m.name][GROWTH] = str(self.options.growth_interval)
        done = []
        for acc in [n for n in g.nodes if n.op == ACCUMULATOR_OP]:
            grad = acc.inputs[1]
            if grad.name in done:
                continue
            producer = grad.inputs[0] if grad.inputs else None
            if producer is None:
                continue
            raw = gs.Variable(f"{grad.name}/amp_scaled", dtype=np.float32, shape=grad.shape)
            producer.outputs[producer.outputs.index(grad)] = raw
            d = gs.Node(
                "Div",
                name=f"{producer.name.split('_Grad/')[0]}_Grad/amp_unscale_{len(done)}",
                inputs=[raw, scale],
                outputs=[grad],
            )
            g.nodes.append(d)
            self._tag(
                d,
                producer.name.split("_Grad/")[0],
                UNSCALE,
                "fp16 loss scaling: the gradient divided by the loss scale; a non-finite one skips the step",
            )
            self.tg.tags[d.name][GROWTH] = str(self.options.growth_interval)
            done.append(grad.name)
        return done

    def finish(self) -> None:
        """A pair's second Cast may hand the low tensor on untouched when every reader is a
        low-precision node (the runtime then never widens it)."""
        readers: dict[str, list[gs.Node]] = {}
        for n in self.g.nodes:
            for t in n.inputs:
                readers.setdefault(t.name, []).append(n)
        outs = {o.name for o in self.g.outputs}
        for _, b in self.pairs:
            r = readers.get(b.outputs[0].name, [])
            alias = bool(r) and b.outputs[0].name not in outs and all(n.name in self.compute for n in r)
            self.tg.tags[b.name][ALIAS] = "1" if alias else "0"


def rewrite(tg: TrainingGraph, options: dict) -> list[dict]:
    rw = _Rewriter(tg, options)
    changes = []
    for layer in tg.layers:
        if layer.op == "Conv" and len(layer.weight_shape) == 4:
            auto = layer.forward.attrs.get("auto_pad", "NOTSET")
            if (auto.decode() if isinstance(auto, bytes) else auto) not in ("NOTSET", ""):
                continue
            rw.low_node(layer.forward, layer.name, CONV)
            grads = [b for b in layer.backward if b.op == "ConvGrad"]
            for b in grads:
                rw.low_node(b, layer.name, CONV_GRAD)
            changes.append(
                {"layer": layer.name, "summary": f"{layer.name}: Conv + {len(grads)} ConvGrad in {options.dtype}"}
            )
        elif layer.op == "Gemm":
            rw.low_node(layer.forward, layer.name, GEMM)
            grads = [b for b in layer.backward if b.op == "Gemm"]
            for b in grads:
                rw.low_node(b, layer.name, GEMM)
            changes.append(
                {
                    "layer": layer.name,
                    "summary": f"{layer.name}: Gemm + {len(grads)} backward Gemm in {options.dtype}",
                }
            )
    if not changes:
        return []
    if options.dtype == "fp16":
        unscaled = rw.loss_scaling(options.loss_scale)
        changes.append({"summary": f"fp16 dynamic loss scaling: seed × S, {len(unscaled)} gradients ÷ S"})
    rw.finish()
    n_pairs = len(rw.pairs)
    changes.append({"summary": f"{n_pairs} rounding pairs (Cast to {options.dtype} and back), one per tensor"})
    return changes


@dataclass(frozen=True)
class AmpOptions(Options):
    dtype: str = option(
        "bf16", "the low-precision type (bf16: no loss scaling; fp16: dynamic loss scaling)", choice("bf16", "fp16")
    )
    layout: str = option(
        "nchw",
        "memory layout of the activations inside the low-precision convs (channels_last: converted around each conv)",
        choice("nchw", "channels_last"),
    )
    loss_scale: float = option(
        65536.0, "fp16: the initial loss scale (torch's GradScaler default 2^16)", positive_float
    )
    growth_interval: int = option(
        2000, "fp16: good steps before the loss scale doubles (a non-finite gradient halves it)", int_at_least(1)
    )


class AmpPass(Pass):
    def run(self, art: Artifacts, options: dict) -> PassResult:
        tg = training_graph(art)
        changes = rewrite(tg, options)
        return PassResult.of_graph(art, tg, changes)

    def ensures(self, before: Artifacts, after: Artifacts, options: dict) -> str | None:
        """Two checks on a random batch with random parameters, run by plain ORT:

        * wiring, exact: the rewritten graph with its roundings made identities (every Cast to the
          low type made a Cast to float) gives the unrewritten graph's loss and gradients (1e-5,
          the loss scale cancels: it is a power of two);
        * rounding: with the roundings, the loss is within 2% of float32 and every output finite
          (fp16: at loss scale 1, since the initial scale may overflow, which the runtime handles).
          (Gradients are not bounded elementwise here: on a randomly initialised BatchNorm net,
          bf16 alone moves some weight gradients by 20-30% in torch's autocast as well; the tests
          compare with torch autocast.)"""
        import onnx
        import onnx.numpy_helper
        import onnxruntime as ort  # heavy: loaded when the check runs

        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(before.training.SerializeToString(), so, providers=["CPUExecutionProvider"])
        feeds = random_feeds(sess, before, np.random.default_rng(0), params="random", batch=2)
        a = run_lowered(before, before.training, feeds)
        rounded = after.training
        if options.dtype == "fp16":  # at the initial scale fp16 may overflow (the runtime then skips the step)
            rounded = onnx.ModelProto()
            rounded.CopyFrom(after.training)
            for t in rounded.graph.initializer:
                if t.name == SCALE:
                    t.CopyFrom(onnx.numpy_helper.from_array(np.array(1.0, np.float32), SCALE))
        b = run_lowered(after, rounded, feeds)
        ident = onnx.ModelProto()
        ident.CopyFrom(after.training)
        for n in ident.graph.node:
            if n.op_type == "Cast" and amp_role(n) == CAST_LOW:
                for at in n.attribute:
                    if at.name == "to":
                        at.i = TensorProto.FLOAT
        c = run_lowered(after, ident, feeds)
        if set(a) != set(b) or set(a) != set(c):
            raise AccelcError("amp self-check failed: the rewritten graph has other outputs")
        worst = 0.0
        for k in a:
            x, z = np.asarray(a[k], np.float64), np.asarray(c[k], np.float64)
            if float(np.linalg.norm(x - z)) > 1e-5 * float(np.linalg.norm(x)) + 1e-8:
                raise AccelcError(f"amp self-check failed: without rounding, '{k}' differs from the unrewritten graph")
            worst = max(worst, float(np.max(np.abs(x - z))) if x.size else 0.0)
            if not np.all(np.isfinite(b[k])):
                raise AccelcError(f"amp self-check failed: '{k}' is not finite in {options.dtype}")
        loss = next(iter(a))
        rel = abs(float(np.ravel(b[loss])[0]) - float(np.ravel(a[loss])[0])) / max(
            abs(float(np.ravel(a[loss])[0])), 1e-12
        )
        if rel > 0.02:
            raise AccelcError(f"amp self-check failed: the loss in {options.dtype} is {rel:.2%} from float32 (> 2%)")
        return (
            f"without rounding: loss and {len(a) - 1} outputs equal the unrewritten graph's (max abs diff {worst:.2g}); "
            f"in {options.dtype}: loss {rel:.2%} from float32, all outputs finite"
        )
