"""The runtime's ``aten`` kernels, op by op, against ORT's own kernels on random inputs.

Each case is a small graph run twice: by an ORT session, and by the SegmentedRunner with every node
claimed (no ORT segment). Bit-equal where the arithmetic is the same (shape ops, ReLU and its
gradient, pooling, comparisons, adds and products); to float32 rounding (rtol 1e-5 to 1e-6,
stated per case) where the order of a reduction or a transcendental's polynomial differs
(BatchNorm, GEMM, softmax cross-entropy, exp/erf/...)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from accelc.runtime import aten
from accelc.runtime.config import ExecConfig
from accelc.runtime.executor import SegmentedRunner, claimed, prepared
from accelc.runtime.kernels import providers
from accelc.runtime.session import session_options

MS = "com.microsoft"
RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _same_inputs_in_any_order():
    """Each test draws the same inputs whichever worker runs it, in whatever order."""
    global RNG
    RNG = np.random.default_rng(0)


_NPT = {np.float32: TensorProto.FLOAT, np.int64: TensorProto.INT64, np.bool_: TensorProto.BOOL}


def f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def i64(v):
    return np.asarray(v, dtype=np.int64)


def model(nodes, feeds: dict, outputs: list, inits: dict | None = None, opset: int = 17, shapes: dict | None = None):
    """``shapes``: output name -> shape, for ORT kernels that read their output's shape from the
    graph (MaxPoolGrad)."""
    ins = [helper.make_tensor_value_info(k, _NPT[v.dtype.type], v.shape) for k, v in feeds.items()]
    shapes = shapes or {}
    outs = [
        helper.make_tensor_value_info(o, TensorProto.FLOAT, shapes[o])
        if o in shapes
        else helper.make_empty_tensor_value_info(o)
        for o in outputs
    ]
    init = [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()]
    g = helper.make_graph(nodes, "case", ins, outs, init)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)])
    m.ir_version = 8
    return m


def both(nodes, feeds, outputs, inits=None, opset=17, shapes=None):
    """(ORT's outputs, the aten runner's outputs), after checking that no node fell back to ORT."""
    cfg = ExecConfig(kernels={"conv": "ort"} if "conv" in providers() else {})
    _, ref, got = run_both(model(nodes, feeds, outputs, inits, opset, shapes), feeds, outputs, cfg)
    return ref, got


def run_both(m, feeds, outputs, cfg=None):
    """(``m`` as the runner ran it, ORT's outputs for ``m``, the aten runner's) after checking that
    no node fell back to ORT. The runner runs ``m`` after the active providers' rewrites."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(outputs, feeds)
    cfg = cfg or ExecConfig()
    m2 = prepared(m, cfg)
    runner = SegmentedRunner(m2, session_options(), ["CPUExecutionProvider"], cfg, claimed(m2, cfg))
    assert runner.segments == [], runner.fallback_ops()
    got, _ = runner.run({k: torch.from_numpy(v.copy()) for k, v in feeds.items()})
    return m2, ref, [got[o].numpy() for o in outputs]


def same(nodes, feeds, outputs, inits=None, opset=17):
    ref, got = both(nodes, feeds, outputs, inits, opset)
    for r, g in zip(ref, got):
        assert r.shape == g.shape and r.dtype == g.dtype
        np.testing.assert_array_equal(r, g)


def close(nodes, feeds, outputs, inits=None, rtol=1e-5, atol=1e-6, opset=17):
    ref, got = both(nodes, feeds, outputs, inits, opset)
    for r, g in zip(ref, got):
        assert r.shape == g.shape and r.dtype == g.dtype
        np.testing.assert_allclose(g, r, rtol=rtol, atol=atol)


N = helper.make_node


def test_relu_and_grads_bit_equal():
    x, dy = f32(4, 3, 5, 5), f32(4, 3, 5, 5)
    same([N("Relu", ["x"], ["y"])], {"x": x}, ["y"])
    same([N("ReluGrad", ["dy", "x"], ["dx"], domain=MS)], {"dy": dy, "x": x}, ["dx"])


def test_opt_relu_grad_chain_fused_and_bit_equal():
    nodes = [
        N("Greater", ["x", "zero"], ["m"]),
        N("Cast", ["m"], ["mf"], to=TensorProto.FLOAT),
        N("Mul", ["dy", "mf"], ["dx"]),
    ]
    x, dy = f32(2, 3, 4, 4), f32(2, 3, 4, 4)
    zero = {"zero": np.zeros((), np.float32)}
    m = prepared(model(nodes, {"x": x, "dy": dy}, ["dx"], zero), ExecConfig())
    assert [n.op_type for n in m.graph.node] == ["ReluGrad"]
    same(nodes, {"x": x, "dy": dy}, ["dx"], zero)
    # the mask read elsewhere: not fused
    m = prepared(model(nodes, {"x": x, "dy": dy}, ["dx", "mf"], zero), ExecConfig())
    assert [n.op_type for n in m.graph.node] == ["Greater", "Cast", "Mul"]


def _relu_pool(grad_reads: str, attrs: dict, backward: bool = True):
    nodes = [N("Relu", ["a"], ["r"]), N("MaxPool", ["r"], ["p", "idx"] if backward else ["p"], **attrs)]
    if backward:
        nodes += [
            N("MaxPoolGrad", ["dp", "idx"], ["dr"], **attrs),
            N("ReluGrad", ["dr", grad_reads], ["da"], domain=MS),
        ]
    return nodes


@pytest.mark.parametrize("grad_reads", ["a", "r"])
@pytest.mark.parametrize(
    "attrs", [dict(kernel_shape=[2, 2], strides=[2, 2]), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])]
)
def test_pool_before_relu_bit_equal(grad_reads, attrs):
    # halves and whole numbers: ties between positive maxima, exact zeros and all-negative windows
    a = np.round(f32(2, 3, 9, 9) * 2) / 2
    nodes = _relu_pool(grad_reads, attrs)
    m2, ref, got = run_both(model(nodes[:2], {"a": a}, ["p"]), {"a": a}, ["p"])  # forward only (evaluation)
    assert [n.op_type for n in m2.graph.node] == ["MaxPool", "Relu"]
    np.testing.assert_array_equal(ref[0], got[0])
    feeds = {"a": a, "dp": f32(*ref[0].shape)}
    m = model(nodes, feeds, ["p", "da"], shapes={"da": a.shape})
    m.graph.value_info.append(helper.make_tensor_value_info("dr", TensorProto.FLOAT, a.shape))  # ORT's MaxPoolGrad
    m2, ref, got = run_both(m, feeds, ["p", "da"])
    assert [n.op_type for n in m2.graph.node] == ["MaxPool", "Relu", "ReluGrad", "MaxPoolGrad"]
    for r, g in zip(ref, got):
        np.testing.assert_array_equal(r, g)
    assert (ref[0] == 0).any() and (ref[1] == 0).any() and (ref[1] != 0).any()


def test_pool_before_relu_left_alone_where_the_relu_output_or_indices_feed_more():
    attrs = dict(kernel_shape=[2, 2], strides=[2, 2])
    a, dp = f32(1, 2, 4, 4), f32(1, 2, 2, 2)
    nodes = _relu_pool("a", attrs)
    # the ReLU output read by another node
    extra = nodes + [N("Identity", ["r"], ["r2"])]
    m = prepared(model(extra, {"a": a, "dp": dp}, ["p", "da", "r2"]), ExecConfig())
    assert [n.op_type for n in m.graph.node][:2] == ["Relu", "MaxPool"]
    # the pool's gradient read by something other than the ReLU's gradient
    extra = nodes + [N("Identity", ["dr"], ["dr2"])]
    m = prepared(model(extra, {"a": a, "dp": dp}, ["p", "da", "dr2"]), ExecConfig())
    assert [n.op_type for n in m.graph.node][:2] == ["Relu", "MaxPool"]
    # the ReLU output is a graph output
    m = prepared(model(nodes[:2], {"a": a}, ["p", "r"]), ExecConfig())
    assert [n.op_type for n in m.graph.node] == ["Relu", "MaxPool"]


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Max", "Min"])
def test_binary_broadcast_bit_equal(op):
    same([N(op, ["a", "b"], ["c"])], {"a": f32(4, 3, 5), "b": f32(3, 1)}, ["c"])


@pytest.mark.parametrize("op", ["Greater", "Less", "Equal", "GreaterOrEqual", "LessOrEqual"])
def test_comparisons_bit_equal(op):
    a = np.round(f32(6, 7))
    same([N(op, ["a", "b"], ["c"])], {"a": a, "b": np.round(f32(7))}, ["c"])


def test_integer_div_truncates_like_onnx():
    same([N("Div", ["a", "b"], ["c"])], {"a": i64([-7, 7, -8, 9]), "b": i64([2, -2, 3, 4])}, ["c"])


@pytest.mark.parametrize("op", ["Neg", "Abs", "Floor", "Ceil", "Relu"])
def test_exact_unary_bit_equal(op):
    same([N(op, ["x"], ["y"])], {"x": f32(3, 8)}, ["y"])


@pytest.mark.parametrize("op", ["Sqrt", "Exp", "Log", "Reciprocal", "Sigmoid", "Tanh", "Erf"])
def test_transcendental_unary_to_float32_rounding(op):
    x = f32(5, 16)
    if op in ("Sqrt", "Log"):
        x = np.abs(x) + 0.1
    close([N(op, ["x"], ["y"])], {"x": x}, ["y"], rtol=2e-6, atol=1e-7)


def test_pow_sum_identity_cast():
    close([N("Pow", ["a", "b"], ["c"])], {"a": np.abs(f32(4, 4)) + 0.5, "b": f32(4)}, ["c"], rtol=2e-6)
    close([N("Sum", ["a", "b", "c"], ["s"])], {"a": f32(3, 4), "b": f32(3, 4), "c": f32(3, 4)}, ["s"], rtol=1e-7)
    same([N("Identity", ["a"], ["b"])], {"a": f32(2, 2)}, ["b"])
    same([N("Cast", ["a"], ["b"], to=TensorProto.INT64)], {"a": f32(5) * 10}, ["b"])
    same([N("Cast", ["a"], ["b"], to=TensorProto.FLOAT)], {"a": i64([1, -2, 3])}, ["b"])


def test_shape_ops_bit_equal():
    x = f32(2, 3, 4, 5)
    same([N("Shape", ["x"], ["s"])], {"x": x}, ["s"])
    same([N("Shape", ["x"], ["s"], start=1, end=-1)], {"x": x}, ["s"], opset=17)
    same([N("Reshape", ["x", "s"], ["y"])], {"x": x}, ["y"], {"s": i64([0, -1, 5])})
    same([N("Flatten", ["x"], ["y"], axis=1)], {"x": x}, ["y"])
    same([N("Flatten", ["x"], ["y"], axis=2)], {"x": x}, ["y"])
    same([N("Expand", ["a", "s"], ["y"])], {"a": f32(3, 1)}, ["y"], {"s": i64([2, 3, 4])})
    same([N("Transpose", ["x"], ["y"], perm=[0, 2, 3, 1])], {"x": x}, ["y"])
    same([N("Unsqueeze", ["a", "ax"], ["y"])], {"a": f32(3, 4)}, ["y"], {"ax": i64([0, -1])})
    same([N("Squeeze", ["a", "ax"], ["y"])], {"a": f32(3, 1, 4, 1)}, ["y"], {"ax": i64([1, -1])})
    same(
        [N("Slice", ["x", "st", "en", "ax", "sp"], ["y"])],
        {"x": x},
        ["y"],
        {"st": i64([1, -4]), "en": i64([100, -1]), "ax": i64([1, 3]), "sp": i64([1, 2])},
    )
    same([N("Gather", ["a", "i"], ["y"], axis=1)], {"a": f32(3, 5)}, ["y"], {"i": i64([[0, -1], [2, 2]])})


def test_concat_split_bit_equal():
    a, b = f32(2, 3, 4), f32(2, 5, 4)
    same([N("Concat", ["a", "b"], ["c"], axis=1)], {"a": a, "b": b}, ["c"])
    same([N("ConcatTraining", ["a", "b"], ["c", "len"], axis=1, domain=MS)], {"a": a, "b": b}, ["c", "len"])
    same([N("Split", ["b", "sp"], ["p", "q"], axis=1)], {"b": b}, ["p", "q"], {"sp": i64([2, 3])})
    same([N("Split", ["a"], ["p", "q", "r"], axis=1)], {"a": a}, ["p", "q", "r"])


def test_clip_where_pad_scale():
    x = f32(3, 4, 5)
    same([N("Clip", ["x", "lo", "hi"], ["y"])], {"x": x}, ["y"], {"lo": np.float32(-0.5), "hi": np.float32(0.7)})
    same([N("Where", ["c", "a", "b"], ["y"])], {"c": f32(3, 4) > 0, "a": f32(3, 4), "b": f32(4)}, ["y"])
    pads = i64([0, 1, 2, 0, 2, 1])
    same([N("Pad", ["x", "p"], ["y"])], {"x": x}, ["y"], {"p": pads})
    same([N("Scale", ["x", "s"], ["y"], scale_down=1, domain=MS)], {"x": x}, ["y"], {"s": np.float32(4.0)})
    same([N("Scale", ["x", "s"], ["y"], scale_down=0, domain=MS)], {"x": x}, ["y"], {"s": np.float32(3.0)})


@pytest.mark.parametrize("keep", [0, 1])
def test_reductions(keep):
    x = f32(4, 3, 6, 6)
    close([N("ReduceSum", ["x", "ax"], ["y"], keepdims=keep)], {"x": x}, ["y"], {"ax": i64([0, 2])}, rtol=1e-5)
    close([N("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=keep)], {"x": x}, ["y"], rtol=1e-5)
    close([N("ReduceL2", ["x"], ["y"], keepdims=keep)], {"x": x}, ["y"], rtol=1e-5)
    same([N("ReduceMax", ["x"], ["y"], axes=[1], keepdims=keep)], {"x": x}, ["y"])
    close([N("ReduceSumSquare", ["x"], ["y"], axes=[1], keepdims=keep)], {"x": x}, ["y"], rtol=1e-5)


def test_gemm_matmul_softmax():
    a, b, c = f32(6, 8), f32(5, 8), f32(5)
    close([N("Gemm", ["a", "b", "c"], ["y"], transB=1, alpha=0.5, beta=2.0)], {"a": a, "b": b, "c": c}, ["y"])
    close([N("Gemm", ["a", "b"], ["y"], transA=1, beta=0.0)], {"a": f32(8, 6), "b": f32(8, 5)}, ["y"])
    close([N("MatMul", ["a", "b"], ["y"])], {"a": f32(2, 3, 6, 8), "b": f32(8, 4)}, ["y"])
    close([N("Softmax", ["a"], ["y"], axis=1)], {"a": a}, ["y"], rtol=2e-6)


def test_a_weight_gradient_gemm_writes_straight_into_its_buffer():
    """A Gemm whose output is a preallocated (bound) buffer -- a weight gradient the optimizer
    reads -- is computed into it: no transient of the gradient's size, and ORT's values (to float32
    rounding). Alpha scales it in place; a Gemm with a C input still copies."""
    import onnxruntime as ort

    a, b = f32(8, 6), f32(8, 5)
    for alpha in (1.0, 0.5):
        nodes = [N("Gemm", ["a", "b"], ["dw"], transA=1, alpha=alpha)]
        m = model(nodes, {"a": a, "b": b}, ["dw"])
        so = ort.SessionOptions()
        so.log_severity_level = 3
        (ref,) = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
            ["dw"], {"a": a, "b": b}
        )
        cfg = ExecConfig()
        runner = SegmentedRunner(m, session_options(), ["CPUExecutionProvider"], cfg, claimed(m, cfg))
        buf = torch.full((6, 5), float("nan"))
        copies = []
        real_copy = torch.Tensor.copy_

        def counting_copy(self, src, *args, **kw):
            copies.append(tuple(self.shape))
            return real_copy(self, src, *args, **kw)

        torch.Tensor.copy_ = counting_copy
        try:
            got, _ = runner.run({"a": torch.from_numpy(a.copy()), "b": torch.from_numpy(b.copy())}, {"dw": buf})
        finally:
            torch.Tensor.copy_ = real_copy
        assert got["dw"] is buf and copies == []  # written in place, nothing copied
        np.testing.assert_allclose(buf.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_softmax_grad_and_leaky_relu_and_its_grad():
    """SoftmaxGrad_13 (ResNeSt's split attention) within float32 rounding of ORT's; LeakyRelu and
    its gradient (CSPResNet) bit-equal."""
    dy = f32(4, 2, 3, 5)
    y = np.exp(f32(4, 2, 3, 5))
    y = (y / y.sum(axis=1, keepdims=True)).astype(np.float32)
    close(
        [N("SoftmaxGrad_13", ["dy", "y"], ["dx"], axis=1, domain=MS)], {"dy": dy, "y": y}, ["dx"], rtol=1e-5, atol=1e-7
    )
    close(
        [N("SoftmaxGrad_13", ["dy", "y"], ["dx"], axis=-1, domain=MS)], {"dy": dy, "y": y}, ["dx"], rtol=1e-5, atol=1e-7
    )
    x = f32(4, 3, 5, 5)
    same([N("LeakyRelu", ["x"], ["y"], alpha=0.1)], {"x": x}, ["y"])
    same([N("LeakyRelu", ["x"], ["y"])], {"x": x}, ["y"])
    same([N("LeakyReluGrad", ["dy", "y"], ["dx"], alpha=0.1, domain=MS)], {"dy": f32(4, 3, 5, 5), "y": x}, ["dx"])


def test_batchnorm_training_and_its_gradient():
    x = f32(8, 4, 5, 5) * 3 + 1
    scale, bias, mean, var = f32(4), f32(4), f32(4), np.abs(f32(4)) + 0.5
    feeds = {"x": x, "s": scale, "b": bias, "m": mean, "v": var}
    bn = N(
        "BatchNormInternal", ["x", "s", "b", "m", "v"], ["y", "rm", "rv", "sm", "isd"],
        domain=MS, epsilon=1e-5, momentum=0.9, training_mode=1,
    )  # fmt: skip
    close([bn], feeds, ["y", "rm", "rv", "sm", "isd"], rtol=1e-5, atol=1e-5)
    grad = N("BatchNormalizationGrad", ["dy", "x", "s", "sm", "isd"], ["dx", "ds", "db"], domain=MS, epsilon=1e-5)
    close([bn, grad], {**feeds, "dy": f32(8, 4, 5, 5)}, ["dx", "ds", "db"], rtol=1e-4, atol=1e-5)
    infer = N("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-5)
    close([infer], feeds, ["y"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "attrs",
    [
        dict(kernel_shape=[2, 2], strides=[2, 2]),
        dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
        dict(kernel_shape=[3, 3], strides=[1, 1], dilations=[2, 2]),
    ],
)
def test_maxpool_and_its_gradient_bit_equal(attrs):
    x = f32(2, 3, 9, 9)
    pool = N("MaxPool", ["x"], ["y", "idx"], **attrs)
    grad = N("MaxPoolGrad", ["dy", "idx"], ["dx"], **attrs)
    ref, got = both([pool], {"x": x}, ["y"])
    np.testing.assert_array_equal(ref[0], got[0])
    dy = f32(*ref[0].shape)
    # the pair: torch's indices stay inside the provider, the gradient is ORT's to the bit
    ref, got = both([pool, grad], {"x": x, "dy": dy}, ["y", "dx"], shapes={"dx": x.shape})
    for r, g in zip(ref, got):
        np.testing.assert_array_equal(r, g)


def test_maxpool_gradient_bit_equal_when_its_indices_are_kept_as_int32():
    # a plane of more than 65,536 positions: the indices are kept as int32, not uint16
    attrs = dict(kernel_shape=[2, 2], strides=[2, 2])
    x = f32(1, 2, 260, 260)
    pool = N("MaxPool", ["x"], ["y", "idx"], **attrs)
    grad = N("MaxPoolGrad", ["dy", "idx"], ["dx"], **attrs)
    dy = f32(1, 2, 130, 130)
    ref, got = both([pool, grad], {"x": x, "dy": dy}, ["y", "dx"], shapes={"dx": x.shape})
    for r, g in zip(ref, got):
        np.testing.assert_array_equal(r, g)


@pytest.mark.parametrize("plane,dtype", [(9, "uint16"), (1 << 16, "uint16"), ((1 << 16) + 1, "int32")])
def test_maxpool_indices_are_kept_narrow_and_widened_exactly(plane, dtype):
    from accelc.runtime.aten_pool import narrow_indices, widen_indices

    # the extreme positions of the plane and some between, in channels_last strides
    vals = torch.tensor([0, 1, plane // 2, plane - 2, plane - 1] * 4, dtype=torch.int64).clamp(0, plane - 1)
    idx = vals.reshape(1, 2, 2, 5).contiguous(memory_format=torch.channels_last)
    narrow = narrow_indices(idx.clone(), plane)
    assert str(narrow.dtype) == f"torch.{dtype}"
    assert narrow.is_contiguous(memory_format=torch.channels_last)
    wide = widen_indices(narrow)
    assert wide.dtype == torch.int64 and torch.equal(wide, idx)
    assert wide.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("include", [0, 1])
def test_average_pools(include):
    x = f32(2, 3, 8, 8)
    close(
        [
            N(
                "AveragePool",
                ["x"],
                ["y"],
                kernel_shape=[3, 3],
                strides=[2, 2],
                pads=[1, 1, 1, 1],
                count_include_pad=include,
            )
        ],
        {"x": x},
        ["y"],
        rtol=1e-6,
    )
    close([N("GlobalAveragePool", ["x"], ["y"])], {"x": x}, ["y"], rtol=1e-6)
    same([N("GlobalMaxPool", ["x"], ["y"])], {"x": x}, ["y"])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_softmax_cross_entropy_and_its_gradient(reduction, weighted):
    s, lab = f32(6, 5) * 3, i64([0, 4, 2, 2, 1, 3])
    feeds = {"s": s, "lab": lab}
    ins = ["s", "lab"]
    if weighted:
        feeds["w"] = np.abs(f32(5)) + 0.1
        ins.append("w")
    loss = N("SoftmaxCrossEntropyLoss", ins, ["l", "lp"], reduction=reduction)
    close([loss], feeds, ["l", "lp"], rtol=1e-5)
    dl = f32(6) if reduction == "none" else np.float32(1.5)
    gin = ["dl", "lp", "lab"] + (["w"] if weighted else [])
    grad = N("SoftmaxCrossEntropyLossGrad", gin, ["ds"], reduction=reduction, domain=MS)
    # d scores = dloss·(softmax - onehot): at a probability near 1 the difference is as exact as
    # float32's rounding of 1 (1.2e-7) times dloss allows, whatever the order
    close([loss, grad], {**feeds, "dl": np.asarray(dl, np.float32)}, ["ds"], rtol=1e-5, atol=5e-7)


def test_softmax_cross_entropy_ignore_index():
    s, lab = f32(6, 5), i64([0, -1, 2, -1, 1, 3])
    loss = N("SoftmaxCrossEntropyLoss", ["s", "lab"], ["l", "lp"], reduction="mean", ignore_index=-1)
    grad = N("SoftmaxCrossEntropyLossGrad", ["dl", "lp", "lab"], ["ds"], reduction="mean", ignore_index=-1, domain=MS)
    close([loss, grad], {"s": s, "lab": lab, "dl": np.asarray(1.0, np.float32)}, ["l", "ds"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "attrs",
    [
        dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
        dict(kernel_shape=[3, 3], pads=[0, 1, 1, 0], strides=[2, 2]),
        dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1], group=4),
    ],
)
def test_conv_and_its_gradient(attrs):
    g = attrs.get("group", 1)
    x, w = f32(2, 4, 7, 7), f32(8, 4 // g, 3, 3)
    conv = N("Conv", ["x", "w"], ["y"], **attrs)
    ref, _ = both([conv], {"x": x, "w": w}, ["y"])
    grad = N("ConvGrad", ["dy", "x", "w"], ["dx", "dw"], domain=MS, **attrs)
    close([conv, grad], {"x": x, "w": w, "dy": f32(*ref[0].shape)}, ["y", "dx", "dw"], rtol=1e-4, atol=1e-5)


def test_unsupported_attributes_fall_back_to_ort():
    assert not aten.supports(N("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], pads=[0, 0, 1, 1]))
    assert not aten.supports(N("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], storage_order=1))
    assert not aten.supports(N("Conv", ["x", "w"], ["y"], kernel_shape=[3], auto_pad="SAME_UPPER"))
    assert not aten.supports(N("Pad", ["x", "p"], ["y"], mode="reflect"))
    assert not aten.supports(N("NonZero", ["x"], ["y"]))
    assert aten.supports(N("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]))


def test_claim_table_matches_the_kernels():
    from accelc.runtime import aten_ops

    assert set(aten_ops.TABLE) | set(aten_ops.CLASSES) | aten_ops.CONV == aten.OPS


def test_kernel_all_ort_claims_nothing():
    m = model([N("Relu", ["x"], ["y"])], {"x": f32(2, 2)}, ["y"])
    assert claimed(m, ExecConfig(kernels={"all": "ort"})) == {}
    assert len(claimed(m, ExecConfig())) == 1
    assert claimed(m, ExecConfig(kernels={"aten": "ort"})) == {}


def test_kernel_all_accepts_only_ort():
    from accelc.compiler.errors import InvalidValue

    with pytest.raises(InvalidValue, match="only all=ort"):
        ExecConfig(kernels={"all": "torch"}).check()


def test_unsupported_node_runs_in_an_ort_segment_between_kernels():
    nodes = [N("Relu", ["x"], ["a"]), N("NonZero", ["a"], ["nz"]), N("Shape", ["nz"], ["s"]), N("Neg", ["x"], ["b"])]
    feeds = {"x": f32(3, 4)}
    import onnxruntime as ort

    m = model(nodes, feeds, ["s", "b"])
    cfg = ExecConfig()
    runner = SegmentedRunner(m, session_options(), ["CPUExecutionProvider"], cfg, claimed(m, cfg))
    assert runner.fallback_ops() == {"NonZero": 1}
    got, _ = runner.run({"x": torch.from_numpy(feeds["x"])})
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(["s", "b"], feeds)
    np.testing.assert_array_equal(got["s"].numpy(), ref[0])
    np.testing.assert_array_equal(got["b"].numpy(), ref[1])


def test_dropout_identity_when_not_training_and_its_gradient():
    x, dy = f32(4, 6), f32(4, 6)
    inits = {"r": np.float32(0.3), "t": np.asarray(False)}
    same([N("Dropout", ["x", "r", "t"], ["y", "m"])], {"x": x}, ["y", "m"], inits)
    same([N("Dropout", ["x"], ["y"])], {"x": x}, ["y"])
    grad = N("DropoutGrad", ["dy", "m", "r", "t"], ["dx"], domain=MS)
    same([N("Dropout", ["x", "r", "t"], ["y", "m"]), grad], {"x": x, "dy": dy}, ["dx"], inits)


def test_dropout_training_scales_kept_values_and_the_gradient_follows_the_mask():
    x, dy = np.abs(f32(64, 64)) + 1.0, f32(64, 64)
    inits = {"r": np.float32(0.25), "t": np.asarray(True)}
    nodes = [N("Dropout", ["x", "r", "t"], ["y", "m"]), N("DropoutGrad", ["dy", "m", "r", "t"], ["dx"], domain=MS)]
    m = model(nodes, {"x": x, "dy": dy}, ["y", "m", "dx"], inits)
    cfg = ExecConfig()
    runner = SegmentedRunner(m, session_options(), ["CPUExecutionProvider"], cfg, claimed(m, cfg))
    assert runner.segments == []
    out, _ = runner.run({"x": torch.from_numpy(x), "dy": torch.from_numpy(dy)})
    y, mask, dx = out["y"].numpy(), out["m"].numpy(), out["dx"].numpy()
    assert 0.2 < 1 - mask.mean() < 0.3
    np.testing.assert_allclose(y, np.where(mask, x / 0.75, 0), rtol=1e-6)
    np.testing.assert_allclose(dx, np.where(mask, dy / 0.75, 0), rtol=1e-6)


def test_constant_size_and_the_gradient_ops_of_real_models():
    x = f32(2, 3, 4, 5)
    same([N("Constant", [], ["c"], value=numpy_helper.from_array(f32(3, 2)))], {}, ["c"])
    same([N("Constant", [], ["c"], value_ints=[1, 2, 3])], {}, ["c"])
    same([N("Size", ["x"], ["n"])], {"x": x}, ["n"])
    same([N("SplitTraining", ["x", "sp"], ["a", "b"], axis=1, domain=MS)], {"x": x}, ["a", "b"], {"sp": i64([1, 2])})
    grad = N("SliceGrad", ["dy", "shape", "st", "en", "ax", "sp"], ["dx"], domain=MS)
    inits = {"shape": i64(x.shape), "st": i64([1, 0]), "en": i64([3, 100]), "ax": i64([1, 3]), "sp": i64([1, 2])}
    same([grad], {"dy": f32(2, 2, 4, 3)}, ["dx"], inits)
    y = 1 / (1 + np.exp(-x))
    close([N("SigmoidGrad", ["dy", "y"], ["dx"], domain=MS)], {"dy": x, "y": y.astype(np.float32)}, ["dx"], rtol=1e-6)
    t = np.tanh(x).astype(np.float32)
    close([N("TanhGrad", ["dy", "y"], ["dx"], domain=MS)], {"dy": x, "y": t}, ["dx"], rtol=1e-6)


@pytest.mark.parametrize("alpha", [1.0, 1.702])
def test_quick_gelu_and_its_gradient(alpha):
    x, dy = f32(4, 8) * 3, f32(4, 8)
    close([N("QuickGelu", ["x"], ["y"], alpha=alpha, domain=MS)], {"x": x}, ["y"], rtol=1e-5, atol=1e-6)
    g = N("QuickGeluGrad", ["dy", "x"], ["dx"], alpha=alpha, domain=MS)
    close([g], {"dy": dy, "x": x}, ["dx"], rtol=1e-5, atol=1e-6)


def test_layer_norm_and_its_gradient():
    x, s_, b = f32(2, 5, 4, 6), f32(6), f32(6)
    ln = N("LayerNormalization", ["x", "s", "b"], ["y", "m", "isd"], axis=-1, epsilon=1e-5)
    close([ln], {"x": x, "s": s_, "b": b}, ["y", "m", "isd"], rtol=1e-5, atol=1e-6)
    g = N("LayerNormalizationGrad", ["dy", "x", "s", "m", "isd"], ["dx", "ds", "db"], axis=-1, epsilon=1e-5, domain=MS)
    close([ln, g], {"x": x, "s": s_, "b": b, "dy": f32(2, 5, 4, 6)}, ["dx", "ds", "db"], rtol=1e-4, atol=1e-5)


def test_gelu_and_fused_matmul():
    x, dy = f32(4, 8) * 2, f32(4, 8)
    close([N("Gelu", ["x"], ["y"], domain=MS)], {"x": x}, ["y"], rtol=1e-5, atol=1e-6)
    close([N("GeluGrad", ["dy", "x"], ["dx"], domain=MS)], {"dy": dy, "x": x}, ["dx"], rtol=1e-5, atol=1e-6)
    fm = N("FusedMatMul", ["a", "b"], ["y"], transA=1, transB=0, alpha=0.5, domain=MS)
    close([fm], {"a": f32(3, 6, 4), "b": f32(3, 6, 5)}, ["y"], rtol=1e-5, atol=1e-6)
    fm = N("FusedMatMul", ["a", "b"], ["y"], transB=1, domain=MS)
    close([fm], {"a": f32(2, 3, 4, 6), "b": f32(5, 6)}, ["y"], rtol=1e-5, atol=1e-6)


def _clip_chain():
    return [
        N("GreaterOrEqual", ["x", "lo"], ["a"]),
        N("LessOrEqual", ["x", "hi"], ["b"]),
        N("And", ["a", "b"], ["m"]),
        N("Cast", ["m"], ["mf"], to=TensorProto.FLOAT),
        N("Mul", ["dy", "mf"], ["dx"]),
    ]


def test_clip_gradient_chain_fused_and_equal():
    """ORT's gradient of Clip (ReLU6): Mul(dY, Cast(And(X >= lo, X <= hi))) -> one ClipGrad node,
    one pass (hardtanh_backward with the bounds moved out by one ulp): ORT's values wherever X and
    dY are finite, the bounds themselves (and -0.0 on the bound 0) passing dY as in the chain."""
    nodes = _clip_chain()
    x = np.round(f32(40, 6, 5) * 4)  # values on the bounds 0 and 6 included
    x[0, 0, 0], x[0, 0, 1], x[3, 3, 3] = 0.0, 6.0, -0.0
    x[5, 0, :] = [np.float32(6.0000005), -1e-45, 1e-45, np.nextafter(np.float32(6), np.float32(0)), -1e-38]
    dy = f32(40, 6, 5)
    inits = {"lo": np.float32(0.0), "hi": np.float32(6.0)}
    m = prepared(model(nodes, {"x": x, "dy": dy}, ["dx"], inits), ExecConfig())
    assert [(n.domain, n.op_type) for n in m.graph.node] == [(aten.OWN, "ClipGrad")]
    ref, got = both(nodes, {"x": x, "dy": dy}, ["dx"], inits)
    np.testing.assert_array_equal(ref[0], got[0])  # -0.0 == 0.0: equal values, signs aside
    assert got[0][0, 0, 0] == dy[0, 0, 0] and got[0][0, 0, 1] == dy[0, 0, 1] and got[0][3, 3, 3] == dy[3, 3, 3]
    # non-finite dY where the mask is 0: torch autograd's 0.0 where the chain has NaN·0
    x2, dy2 = x.copy(), dy.copy()
    x2[1, 2, 3], dy2[1, 2, 3] = 10.0, np.nan
    x2[2, 0, 0], dy2[2, 0, 0] = -3.0, np.inf
    x2[1, 1, 1], dy2[1, 1, 1] = 3.0, np.nan  # inside the range: NaN passes
    ref, got = both(nodes, {"x": x2, "dy": dy2}, ["dx"], inits)
    assert np.isnan(ref[0][1, 2, 3]) and np.isnan(ref[0][2, 0, 0]) and np.isnan(ref[0][1, 1, 1])
    assert got[0][1, 2, 3] == 0.0 and got[0][2, 0, 0] == 0.0 and np.isnan(got[0][1, 1, 1])
    finite = np.isfinite(ref[0])
    np.testing.assert_array_equal(ref[0][finite], got[0][finite])
    # NaN X: 0.0 (ATen's vector loop) or dY (its scalar tail) where the chain has 0.0 (dY·0)
    x3 = x.copy()
    x3[4, :, :] = np.nan
    ref, got = both(nodes, {"x": x3, "dy": dy}, ["dx"], inits)
    nan_x = np.isnan(x3)
    assert (ref[0][nan_x] == 0).all() and ((got[0][nan_x] == 0) | (got[0][nan_x] == dy[nan_x])).all()
    np.testing.assert_array_equal(ref[0][~nan_x], got[0][~nan_x])
    # the mask read elsewhere: left as it is
    m = prepared(model(nodes, {"x": x, "dy": dy}, ["dx", "m"], inits), ExecConfig())
    assert len(m.graph.node) == 5


def test_clip_gradient_three_pass_form_is_bit_equal():
    """Where the one-pass bound would be a subnormal that this thread flushes (lo = 0 under
    torch.set_flush_denormal), the three-pass form runs: bit-equal to ORT's chain, NaN·0 and the
    sign of zero included (checked against the chain in numpy's arithmetic: ORT's own session
    resets the thread's subnormal mode when it starts)."""
    x = np.round(f32(4, 6, 5) * 4)
    x[0, 0, 0], x[0, 0, 1], x[3, 3, 3], x[2, 2, 2] = 0.0, 6.0, -0.0, np.nan
    dy = f32(4, 6, 5)
    dy[1, 1, 1] = np.nan
    x[1, 2, 3], dy[1, 2, 3] = 10.0, np.nan
    x[2, 0, 0], dy[2, 0, 0] = -3.0, np.inf
    from types import SimpleNamespace

    from accelc.runtime.aten_ops import _clip_grad

    chain = dy * ((x >= 0) & (x <= 6)).astype(np.float32)  # ORT's chain, in numpy's arithmetic
    k = SimpleNamespace(free=(), in_place=0)
    lo, hi = torch.tensor(0.0), torch.tensor(6.0)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormals")
    try:
        got = _clip_grad(k, torch.from_numpy(dy), torch.from_numpy(x), lo, hi).numpy()
    finally:
        torch.set_flush_denormal(False)
    np.testing.assert_array_equal(chain, got)  # NaN where the chain has NaN
    np.testing.assert_array_equal(np.signbit(chain), np.signbit(got))  # signed zeros too
    one = _clip_grad(k, torch.from_numpy(dy), torch.from_numpy(x), lo, hi).numpy()  # the one pass
    assert np.isnan(chain[1, 2, 3]) and one[1, 2, 3] == 0.0
    neg_zero = (chain == 0) & np.signbit(chain)  # masked elements of negative dY: -0.0 in the chain
    assert neg_zero.any() and not np.signbit(one[neg_zero]).any()  # +0.0 in the one pass
    # bounds that are not values of float32 take it too: the same values as the chain
    got = _clip_grad(k, torch.from_numpy(dy), torch.from_numpy(x), torch.tensor(0.1, dtype=torch.float64), hi)
    np.testing.assert_array_equal(dy * ((x >= 0.1) & (x <= 6)).astype(np.float32), got.numpy())
