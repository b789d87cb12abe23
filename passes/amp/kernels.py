"""The ``amp`` node kernel: what accelc's runtime does with the nodes the amp pass marked.

Implementations (``accelc train --kernel amp=IMPL``):

* ``lowp``: the rounding pairs make real low-precision tensors (the second Cast of a pair whose
  readers are all low-precision nodes hands the bf16/fp16 tensor on untouched); Conv, ConvGrad and
  Gemm run on oneDNN's bf16/fp16 kernels through torch (float32 accumulation, low-precision
  output, like torch's autocast); loss scaling is dynamic (:class:`LossScaler`).
* ``emulate``: the same values computed with float32 kernels on the rounded tensors (the rounding
  pairs still round): for CPUs without native bf16/fp16 arithmetic, where oneDNN's low-precision
  convolutions fall back to reference code (measured here, AVX2 only: a 64×32×28×28 3×3 conv
  65 ms in bf16 against 7 ms in float32; a 2048² bf16 GEMM 0.3 GFLOP/s).
* ``auto`` (the default): ``lowp`` where oneDNN reports native support for the type
  (``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` / ``..._fp16_supported()``), else ``emulate``.
* ``ort``: ORT runs every node of the graph as written (float32 arithmetic on rounded values,
  the static loss scale of the graph's initializer, no step skipping).
"""

from __future__ import annotations

import onnx
import torch
from onnx import helper

from ...compiler import provenance
from ...runtime.kernels import SKIP_UPDATE, BuildContext, NodeKernel, store
from ...runtime.torch_ops import Conv2d
from .rewrite import (
    ALIAS,
    CAST_BACK,
    CAST_LOW,
    CONV,
    CONV_GRAD,
    DTYPE,
    GEMM,
    GROWTH,
    INPUT_SUFFIX,
    LAYOUT,
    SCALE,
    SCALE_SEED,
    UNSCALE,
    amp_role,
)

TORCH_LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
ONNX_TO_TORCH = {onnx.TensorProto.BFLOAT16: torch.bfloat16, onnx.TensorProto.FLOAT16: torch.float16}


def native(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs ``dtype`` convolutions and GEMMs natively on this CPU."""
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve(impl: str, dtype: torch.dtype) -> str:
    """``auto`` -> ``lowp`` or ``emulate`` for this CPU."""
    if impl == "auto":
        return "lowp" if native(dtype) else "emulate"
    return impl


class LossScaler:
    """Dynamic loss scaling (as torch's GradScaler and ORT's mixed-precision training): a step
    with a non-finite gradient is skipped and the scale halved; after ``growth_interval`` good
    steps in a row the scale doubles. The scale lives in the graph's loss-scale tensor, which the
    seed ``Mul`` and the unscaling ``Div`` nodes read; one scaler per runner (it hangs on that
    tensor), fed by every unscaling kernel of the step."""

    def __init__(self, tensor: torch.Tensor, growth_interval: int, backoff: float = 0.5, growth: float = 2.0):
        self.tensor = tensor
        self.growth_interval = int(growth_interval)
        self.backoff, self.growth = backoff, growth
        self.members = 0  # unscaling kernels that report per step
        self.good = 0
        self.seen = 0
        self.found_inf = False
        self.skipped = 0
        self.history: list[float] = []  # the scale after each step

    @property
    def scale(self) -> float:
        return float(self.tensor.reshape(-1)[0])

    def begin(self) -> None:
        self.seen, self.found_inf = 0, False

    def report(self, finite: bool) -> bool:
        """One gradient's verdict; after the step's last one the scale is updated. Returns
        whether the step so far has a non-finite gradient."""
        self.seen += 1
        self.found_inf |= not finite
        if self.seen >= self.members:
            s = self.scale
            if self.found_inf:
                s *= self.backoff
                self.good = 0
                self.skipped += 1
            else:
                self.good += 1
                if self.good >= self.growth_interval:
                    s *= self.growth
                    self.good = 0
            self.tensor.fill_(s)
            self.history.append(s)
        return self.found_inf


def scaler_of(tensor: torch.Tensor, growth_interval: int) -> LossScaler:
    sc = getattr(tensor, "_accelc_amp_scaler", None)
    if sc is None:
        sc = LossScaler(tensor, growth_interval)
        tensor._accelc_amp_scaler = sc
    return sc


class AmpKernel(NodeKernel):
    """One node marked by the amp pass (see the module doc); ``role`` picks what it does. Its
    arithmetic reads either memory layout (the loss scaler is state: it is not ``stateless``)."""

    any_layout = True

    def __init__(self, node: onnx.NodeProto, ctx: BuildContext):
        super().__init__(node)
        meta = provenance.props(node)
        self.role = amp_role(node) or _role_from_op(node)
        self.attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        self.low = TORCH_LOW.get(meta.get(DTYPE, ""), None)
        if self.role == CAST_LOW:
            self.low = ONNX_TO_TORCH[int(self.attrs["to"])]
        self.mode = resolve(ctx.impl, self.low or torch.bfloat16)
        self.alias = meta.get(ALIAS) == "1" and self.mode == "lowp"
        self.channels_last = meta.get(LAYOUT) == "channels_last"
        self._buf = None
        # a pair rounding a node's input (its output named <tensor>/amp_q) feeds only this step's
        # low-precision nodes; the low-precision half of every pair is read by its second Cast only
        self.reuse = self.role == CAST_LOW or (self.role == CAST_BACK and self.outputs[0].endswith(INPUT_SUFFIX))
        if self.role in (CONV, CONV_GRAD):
            self.conv = Conv2d(node)
        if self.role in (SCALE_SEED, UNSCALE):
            scale = ctx.initializers[SCALE]
            self.scaler = scaler_of(scale, int(meta.get(GROWTH, "2000")))
            if self.role == UNSCALE:
                self.scaler.members += 1

    # ------------------------------------------------------------------ helpers
    def _compute(self, t: torch.Tensor) -> torch.Tensor:
        """An input in the dtype the arithmetic runs in."""
        want = self.low if (self.mode == "lowp" and self.low is not None) else torch.float32
        return t if t.dtype == want else t.to(want)

    def _fmt(self, t: torch.Tensor) -> torch.Tensor:
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last and t.dim() == 4 else t

    # ------------------------------------------------------------------ run
    def run(self, env: dict, bound: dict) -> dict | None:
        out = getattr(self, "_" + self.role)(env, bound)
        return out if out is not None else {"op": self.role}

    def _into(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``t`` converted to ``dtype`` in this kernel's own buffer, reused from step to step (its
        output is an intermediate: no graph output, read only within the step)."""
        buf = self._buf
        if buf is None or buf.shape != t.shape or buf.dtype != dtype:
            buf = self._buf = torch.empty(t.shape, dtype=dtype)
        return buf.copy_(t)

    def _cast_low(self, env, bound):
        t = env[self.inputs[0]]
        store(self.outputs[0], t if t.dtype == self.low else self._into(t, self.low), env, bound)

    def _cast_back(self, env, bound):
        t = env[self.inputs[0]]
        if self.alias or t.dtype == torch.float32:
            out = t
        elif self.reuse:  # an input pair: read by the low-precision nodes of this step only
            out = self._into(t, torch.float32)
        else:  # an output pair: may be a graph output (the logits) the caller keeps
            out = t.float()
        store(self.outputs[0], out, env, bound)

    def _conv(self, env, bound):
        x = self._fmt(self._compute(env[self.inputs[0]]))
        w = self._fmt(self._compute(env[self.inputs[1]]))
        b = self._compute(env[self.inputs[2]]) if len(self.inputs) > 2 and self.inputs[2] else None
        store(self.outputs[0], self.conv.forward(x, w, b), env, bound)

    def _conv_grad(self, env, bound):
        dy = self._fmt(self._compute(env[self.inputs[0]]))
        x = self._fmt(self._compute(env[self.inputs[1]]))
        w = self._fmt(self._compute(env[self.inputs[2]]))
        mask = [bool(i < len(self.outputs) and self.outputs[i] and self.wanted[i]) for i in range(3)]
        dx, dw, db = self.conv.backward(dy, x, w, mask)
        for i, t in enumerate((dx, dw, db)):
            if mask[i]:
                store(self.outputs[i], t, env, bound)

    def _gemm(self, env, bound):
        a = self._compute(env[self.inputs[0]])
        b = self._compute(env[self.inputs[1]])
        if self.attrs.get("transA", 0):
            a = a.t()
        if self.attrs.get("transB", 0):
            b = b.t()
        alpha, beta = float(self.attrs.get("alpha", 1.0)), float(self.attrs.get("beta", 1.0))
        if len(self.inputs) > 2 and self.inputs[2] and beta != 0.0:
            c = self._compute(env[self.inputs[2]])
            y = torch.addmm(c.expand(a.shape[0], b.shape[1]), a, b, beta=beta, alpha=alpha)
        else:
            y = torch.mm(a, b)
            if alpha != 1.0:
                y = y * alpha
        store(self.outputs[0], y, env, bound)

    def _scale_seed(self, env, bound):
        self.scaler.begin()
        store(self.outputs[0], env[self.inputs[0]] * env[self.inputs[1]], env, bound)

    def _unscale(self, env, bound):
        g = env[self.inputs[0]].float() / env[self.inputs[1]]
        finite = bool(torch.isfinite(g).all())
        store(self.outputs[0], g, env, bound)
        return {"op": UNSCALE, SKIP_UPDATE: self.scaler.report(finite), "loss_scale": self.scaler.scale}


def _role_from_op(node) -> str:
    """The role of a node a later pass re-tagged (its amp keys dropped, ``accelc.exec`` kept)."""
    if node.op_type == "Cast":
        to = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "to")
        return CAST_LOW if to in ONNX_TO_TORCH else CAST_BACK
    return {"Conv": CONV, "ConvGrad": CONV_GRAD, "Gemm": GEMM, "Mul": SCALE_SEED, "Div": UNSCALE}[node.op_type]
