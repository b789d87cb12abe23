"""Lowering of a training graph for execution outside ORT's training Module: the gradient
accumulators are stripped (with ``lazy_reset_grad`` true they are identities) and raw gradients,
BatchNorm running-statistics updates and probe outputs become graph outputs."""

from __future__ import annotations

import onnx

from .graph import ACCUMULATOR_OP, BUFFER_SUFFIX

BN_OPS = ("BatchNormInternal", "BatchNormalization")
PROBE_PREFIX = "accelc."  # graph outputs a pass adds for the runtime (e.g. norms a controller reads)


def lower_training_model(model: onnx.ModelProto, logits_name: str) -> tuple[onnx.ModelProto, dict]:
    """Strip gradient accumulators and expose raw gradients and BN running-stat updates as outputs.

    Returns the lowered model and a description: {"loss", "logits", "grads": {param: output},
    "bn_stats": {output: param}, "bn": [per-BatchNorm running-variance correction data]}.

    ORT's BatchNormInternal updates running_var with the biased batch variance; torch uses the
    unbiased one. The saved inverse std is exposed too, so the runtime can apply torch's
    n/(n-1) correction (see TrainingSession._update_bn_stats).
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    input_names = {i.name for i in g.input}
    grads = {}
    keep = []
    for n in g.node:
        if n.op_type == ACCUMULATOR_OP:
            buf = n.input[0]
            grads[buf[: -len(BUFFER_SUFFIX)]] = n.input[1]
        else:
            keep.append(n)
    bn_stats = {}
    bn = []
    for n in keep:
        if n.op_type in BN_OPS and len(n.output) >= 3 and len(n.input) >= 5:
            for o, i in ((n.output[1], n.input[3]), (n.output[2], n.input[4])):
                if o and i in input_names:
                    bn_stats[o] = i
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            if n.op_type == "BatchNormInternal" and len(n.output) >= 5 and n.output[4] and n.output[2]:
                bn.append(
                    {
                        "x": n.input[0],
                        "var_out": n.output[2],
                        "inv_std": n.output[4],
                        "momentum": float(attrs.get("momentum", 0.9)),
                        "epsilon": float(attrs.get("epsilon", 1e-5)),
                    }
                )
    del g.node[:]
    g.node.extend(keep)
    ins = [i for i in g.input if not i.name.endswith(BUFFER_SUFFIX) and i.name != "lazy_reset_grad"]
    del g.input[:]
    g.input.extend(ins)
    loss = g.output[0].name
    probes = [o.name for o in g.output if o.name.startswith(PROBE_PREFIX)]
    names = [loss]
    if logits_name:
        names.append(logits_name)
    names += list(grads.values()) + list(bn_stats) + [b["inv_std"] for b in bn] + probes
    del g.output[:]
    for nm in names:
        g.output.append(onnx.helper.make_empty_tensor_value_info(nm))
    return m, {"loss": loss, "logits": logits_name, "grads": grads, "bn_stats": bn_stats, "bn": bn, "probes": probes}
