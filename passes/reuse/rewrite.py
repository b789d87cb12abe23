"""Pass ``reuse``: adaptive deep reuse — LSH-clustered rows in a conv's forward and backward.

Paper: Ning, Guan, Shen, "Adaptive Deep Reuse: Accelerating CNN Training on the Fly", ICDE 2019
(reported: 63–69% less training time without accuracy loss). The rows of a layer's unfolded
input are cut into sub-vectors of length L and hashed with H random hyperplanes; rows with one
hash ID share one centroid, so the layer's GEMM runs on centroids only, forward and backward.

What the pass does to the training graph, for each chosen conv (group 1, 2-D):

* the forward ``Conv`` becomes one node ``ai.accelc.reuse::ReuseConv_<layer>`` (inputs X, W, B,
  the layer's hyperplanes; outputs Y and the cluster assignment handed to the backward);
* ORT's ``ConvGrad`` becomes ``ReuseConvGrad_<layer>`` (dY, X, W, assignment → dX, dW, dB):
  dW from centroids and per-cluster sums of dY, dB exact, dX exact (default) or per cluster;
* both are ONNX local functions made of standard ops (:mod:`accelc.passes.reuse.onnx_form`):
  plain ORT runs them (the portable reference path) and Netron shows one node per layer, with the
  pass's metadata. accelc's runtime runs them with fused native kernels instead (the ``reuse``
  node kernel, :mod:`accelc.passes.reuse.node`);
* the hyperplanes are fixed per layer (seeded from ``seed`` and the layer name) and saved as an
  initializer ``accelc.reuse.<layer>.planes`` [G, L, H];
* the eval model is not changed: evaluation uses the exact convolution.

Each reuse node keeps the node it replaced (metadata ``accelc.reuse.original``), so the runtime
algorithm can put the exact layer back or build other settings (L, H) without losing what later
passes added; ``plan.json`` names the strategy.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import zlib

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...compiler import provenance
from ...compiler.artifacts import Artifacts
from ...compiler.errors import AccelcError
from ...compiler.graph import TrainingGraph, training_graph
from ...compiler.pass_api import Pass, PassResult
from .onnx_form import build_reuse_functions, strip
from .options import DEFAULT_RECALIBRATE, ReuseOptions, cross_batch_conflict  # noqa: F401  (re-exported)
from .spec import CONFIG_KEY, DOMAIN, FORWARD_PREFIX, ORIGINAL_KEY, ConvGeom, ReuseSpec, make_planes

PASS = "reuse"


def layer_seed(seed: int, layer: str) -> int:
    return (int(seed) * 1000003 + zlib.crc32(layer.encode())) % (2**31)


def conv_geom(node: onnx.NodeProto, wshape: tuple) -> ConvGeom:
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    if int(a.get("group", 1)) != 1:
        raise AccelcError(f"reuse: conv '{node.name}' is grouped (group={a['group']}); only group-1 convs are reused")
    auto = a.get("auto_pad", b"NOTSET")
    if (auto.decode() if isinstance(auto, bytes) else auto) not in ("NOTSET", ""):
        raise AccelcError(f"reuse: conv '{node.name}' uses auto_pad; export with explicit pads")
    if len(wshape) != 4:
        raise AccelcError(f"reuse: conv '{node.name}' is not 2-D")
    pads = tuple(a.get("pads", [0, 0, 0, 0]))
    return ConvGeom(
        C=wshape[1],
        Co=wshape[0],
        kh=wshape[2],
        kw=wshape[3],
        stride=tuple(a.get("strides", [1, 1])),
        pads=(pads[0], pads[1], pads[2], pads[3]),
        dilation=tuple(a.get("dilations", [1, 1])),
    )


def candidate_layers(tg) -> list:
    """Layers the pass can reuse: group-1 2-D convs with at least 8 input channels (the input
    layer, with 1–3 channels, has K = 9–27: nothing to cluster)."""
    out = []
    for layer in tg.layers:
        if layer.op != "Conv" or len(layer.weight_shape) != 4:
            continue
        if int(layer.forward.attrs.get("group", 1)) != 1 or layer.weight_shape[1] < 8:
            continue
        if not any(b.op == "ConvGrad" for b in layer.backward):
            continue
        out.append(layer)
    return out


def unknown_input(layer) -> bool:
    """The layer's input size is known only at run time (e.g. after a channel shuffle)."""
    return len(layer.input_shape) != 4


def layer_settings(tg, layers, L: int, H: int, scope: str, input_grad: str, seed: int, cross_batch: int = 0) -> dict:
    """Per-layer reuse settings (L clipped to the layer's K). Without ``layers``: every candidate
    whose input size is known when compiling (the others stay exact; see :func:`unknown_input`)."""
    cands = {layer.name: layer for layer in candidate_layers(tg)}
    names = [n for n, layer in cands.items() if not unknown_input(layer)] if layers is None else layers
    out = {}
    for name in names:
        if name not in cands:
            raise AccelcError(f"reuse: '{name}' is not a reusable layer; candidates: {', '.join(cands) or 'none'}")
        layer = cands[name]
        if unknown_input(layer):
            raise AccelcError(
                f"reuse: the input size of '{name}' is known only at run time; leave it out of --reuse-layers"
            )
        K = int(np.prod(layer.weight_shape[1:]))
        out[name] = {
            "L": int(min(L, K)),
            "H": int(H),
            "scope": scope,
            "input_grad": input_grad,
            "seed": layer_seed(seed, name),
            "cross_batch": int(cross_batch),
        }
    return out


def apply(training: onnx.ModelProto, shapes: dict, settings: dict) -> tuple[onnx.ModelProto, list]:
    """Rewrite ``training`` (a graph without reuse) so that the layers in ``settings`` are reused.

    ``settings``: layer -> {"L", "H", "scope", "input_grad", "seed"} and optionally
    "cross_batch" (the kernels' cluster table across batches, :mod:`.cross`); layers absent stay
    exact."""
    tg = TrainingGraph(training, shapes)
    by_layer = {layer.name: layer for layer in tg.layers}
    m = onnx.ModelProto()
    m.CopyFrom(training)
    nodes = {n.name: n for n in m.graph.node}
    inits = {t.name for t in m.graph.initializer}
    changes = []
    for name, s in settings.items():
        layer = by_layer.get(name)
        if layer is None:
            raise AccelcError(f"reuse: no layer '{name}' in the training graph")
        grads = [b for b in layer.backward if b.op == "ConvGrad"]
        if layer.op != "Conv":
            raise AccelcError(f"reuse: layer '{name}' is not a conv")
        # no ConvGrad: a layer skipped on an input-side prefix; only its forward is reused
        fwd, bwd = nodes[layer.forward.name], (nodes[grads[0].name] if grads else None)
        geom = conv_geom(fwd, tuple(layer.weight_shape))
        in_hw = tuple(layer.input_shape[2:4])
        if len(in_hw) != 2:
            raise AccelcError(f"reuse: the input shape of '{name}' is unknown")
        spec = ReuseSpec(int(s["L"]), int(s["H"]), s["scope"], s["input_grad"])
        G = spec.chunks(geom.K)
        f_fwd, f_bwd = build_reuse_functions(name, geom, spec, in_hw, domain=DOMAIN)
        safe = "".join(ch if ch.isalnum() else "_" for ch in name)
        planes_name = f"accelc.reuse.{name}.planes"
        planes = make_planes(G, spec.L, spec.H, int(s["seed"]))
        if planes_name not in inits:
            m.graph.initializer.append(numpy_helper.from_array(planes, planes_name))
            inits.add(planes_name)
        bias = fwd.input[2] if len(fwd.input) > 2 and fwd.input[2] else ""
        if not bias:
            bias = f"accelc.reuse.{name}.zero_bias"
            if bias not in inits:
                m.graph.initializer.append(numpy_helper.from_array(np.zeros(geom.Co, np.float32), bias))
                inits.add(bias)
        aux = [f"accelc.reuse.{safe}.{k}" for k in ("ids", "centroids", "counts")]
        config = {
            "layer": name,
            "L": spec.L,
            "H": spec.H,
            "scope": spec.scope,
            "input_grad": spec.input_grad,
            "seed": int(s["seed"]),
            "cross_batch": int(s.get("cross_batch", 0)),
            "G": G,
            "geom": {
                "C": geom.C,
                "Co": geom.Co,
                "kh": geom.kh,
                "kw": geom.kw,
                "stride": list(geom.stride),
                "pads": list(geom.pads),
                "dilation": list(geom.dilation),
            },
            "in_hw": list(in_hw),
        }
        note = (
            f"adaptive deep reuse: rows cut into {G} chunks of L={spec.L}, hashed by H={spec.H} hyperplanes "
            f"(scope {spec.scope}); GEMM on centroids"
        )
        if int(s.get("cross_batch", 0)) >= 2:
            note += f"; clusters kept across {int(s['cross_batch'])} batches"
        new_f = helper.make_node(
            f_fwd.name,
            [fwd.input[0], fwd.input[1], bias, planes_name],
            [fwd.output[0]] + aux,
            name=fwd.name,
            domain=DOMAIN,
        )
        pairs = [(new_f, note, fwd)]
        if bwd is not None:
            outs = list(bwd.output) + [""] * (3 - len(bwd.output))
            outs = [o if o else f"accelc.reuse.{safe}.unused_{i}" for i, o in enumerate(outs)]
            new_b = helper.make_node(
                f_bwd.name,
                [bwd.input[0], fwd.input[0], fwd.input[1]] + aux,
                outs,
                name=bwd.name,
                domain=DOMAIN,
                doc_string="Backward pass",
            )
            pairs.append((new_b, f"reuse backward: dW from centroids, dB exact, dX {spec.input_grad}", bwd))
        for nd, extra, orig in pairs:
            provenance.tag(
                nd,
                PASS,
                name,
                extra,
                **{CONFIG_KEY: json.dumps(config), ORIGINAL_KEY: base64.b64encode(orig.SerializeToString()).decode()},
            )
        for nd, _, orig in pairs:
            orig.CopyFrom(nd)
        funcs = [f_fwd] + ([f_bwd] if bwd is not None else [])
        m.functions.extend(funcs)
        changes.append(
            {
                "layer": name,
                "action": "reused",
                "L": spec.L,
                "H": spec.H,
                "chunks": G,
                "scope": spec.scope,
                "input_grad": spec.input_grad,
                "nodes": [nd.name for nd, _, _ in pairs],
                "functions": [f.name for f in funcs],
            }
        )
    if settings and not any(o.domain == DOMAIN for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return m, changes


def reused_layers(model: onnx.ModelProto) -> dict:
    """layer -> config of every reused layer in a training graph (from the nodes' metadata)."""
    out = {}
    for n in model.graph.node:
        if n.domain == DOMAIN and n.op_type.startswith(FORWARD_PREFIX):
            cfg = provenance.props(n).get(CONFIG_KEY)
            if cfg:
                c = json.loads(cfg)
                out[c["layer"]] = c
    return out


def reuse_variant(base: Artifacts, settings: dict) -> Artifacts:
    """``base`` (compiled with reuse) with other reuse settings; ``{}`` switches reuse off."""
    art = base.copy()
    plain = strip(base.training)
    shapes = training_graph(art).shapes
    art.training, _ = apply(plain, shapes, settings)
    return art


class ReusePass(Pass):
    @classmethod
    def details(cls, record: dict) -> list[str]:
        from .predict import explain_lines

        return explain_lines(record.get("changes") or [])

    def run(self, art: Artifacts, options: ReuseOptions) -> PassResult:
        out = art.copy()
        tg = training_graph(out)
        L, H = options.L, options.H
        if options.strategy == "lh":
            L, H = options.schedule[0]
        why = cross_batch_conflict(options.cross_batch, options.strategy, options.H, options.schedule)
        if why:
            raise AccelcError(f"--reuse-cross-batch {why}")
        settings = layer_settings(
            tg,
            options.layers,
            L,
            H,
            options.scope,
            options.input_grad,
            options.seed,
            options.cross_batch,
        )
        if not settings:
            return PassResult(
                out, False, [{"action": "none", "why": "no reusable conv (group 1, >= 8 input channels)"}]
            )
        out.training, changes = apply(art.training, tg.shapes, settings)
        batch = int((art.config or {}).get("batch_size") or 0)
        if batch > 0:  # the time model's prediction per layer (advice; training measures)
            from . import predict

            why = predict.annotate(changes, reused_layers(out.training), batch)
            if why:
                changes.append({"action": "not predicted", "why": f"reuse time model: {why}"})
        if options.layers is None:
            changes += [
                {"layer": layer.name, "action": "exact", "why": "input size known only at run time"}
                for layer in candidate_layers(tg)
                if unknown_input(layer)
            ]
        resolved = dataclasses.replace(options, layers=list(settings), L=L, H=H)
        out.plan = [p for p in out.plan if p.get("type") != self.name] + [self.method.plan_entry(resolved)]
        return PassResult(out, True, changes)
