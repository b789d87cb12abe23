"""amp — mixed-precision training as a training-graph rewrite (issue 18).

Reference: Micikevicius et al., "Mixed Precision Training" (ICLR 2018), and torch.autocast's CPU
op lists for what runs in which type: convolutions and GEMMs (forward, input gradient and weight
gradient) in the low-precision type with float32 accumulation; master weights, optimizer state
(:mod:`accelc.runtime.optim`), BatchNorm and its statistics, the loss, softmax and reductions in
float32. ``--amp-dtype bf16`` (default) needs no loss scaling; ``--amp-dtype fp16`` gets dynamic
loss scaling (skip the step and halve the scale on a non-finite gradient, double it after
``--amp-growth-interval`` good steps), as torch's GradScaler and ORT's mixed-precision training do.

The graph form (:mod:`.rewrite`), and what plain ONNX Runtime can run
---------------------------------------------------------------------
The low precision is written as standard ``Cast`` pairs: every input of a low-precision node is
``Cast(to=bf16) -> Cast(to=float)`` of the tensor (once per tensor; the forward's rounded
activation and weight are what the backward reads), and its outputs are rounded the same way.
The Conv/ConvGrad/Gemm nodes themselves keep float32 types. Why not bf16-typed Convs: measured
with a tiny session here, ORT 1.19.2's CPU EP has no bf16 Conv, ConvGrad, Gemm or MatMul kernel
(Conv and ConvGrad with bf16 inputs are even rejected as invalid graphs: the opset-17 type
constraint of Conv excludes bfloat16), while Cast to and from bf16 runs; fp16 Conv, ConvGrad, Gemm
and MatMul do run on ORT's CPU EP. So the graph stays valid ONNX that plain ORT Training runs, on
CPU and CUDA alike, computing float32 arithmetic on rounded values — the numerics of bf16 inputs
with float32 accumulation, up to summation order and the rounding of outputs — but no faster.
(ORT's CUDA EP would have fp16 Conv/Gemm kernels for an fp16-typed graph; this form does not use
them.) The fp16 loss scale is the initializer ``accelc.amp.loss_scale``: plain ORT applies it as
a static scale and never skips a step.

Where the speed comes from (:mod:`.kernels`)
--------------------------------------------
accelc's runtime claims every marked node (``accelc.exec = amp``, through the kernel provider the
method declares, like opt's ``conv_onednn``) and runs the convs and GEMMs on oneDNN's bf16/fp16 kernels
through torch, the rounding pairs as real conversions (the second Cast of an input pair hands the
low-precision tensor on untouched). ORT keeps BatchNorm, ReLU, pooling, the loss and their
gradients in float32. On a CPU without native bf16 (oneDNN's own check), the default ``auto``
implementation computes the same rounded values with float32 kernels (``emulate``): the same
numerics at float32 speed plus the casts — bf16 arithmetic there is an order of magnitude slower.

Composition: after opt (its oneDNN marks on Conv/ConvGrad are replaced by amp's), after
rescale and reuse (reuse's custom nodes stay float32), before skip (whose pruning removes a
skipped layer's backward casts with it: they are named after the backward node they feed).
"""

from ...compiler.method import Method
from ...runtime.kernels import BuildContext, KernelProvider
from .rewrite import AmpOptions, AmpPass, amp_role


def _claims(node) -> bool:
    return amp_role(node) is not None


def _build(node, ctx: BuildContext):
    from .kernels import AmpKernel  # heavy: torch, loaded when a graph is run

    return AmpKernel(node, ctx)


METHOD = Method(
    name="amp",
    summary="mixed precision: convs and GEMMs in bf16 (or fp16 with dynamic loss scaling), the rest float32",
    paper="Micikevicius et al., Mixed Precision Training (ICLR 2018); torch.autocast's CPU op lists",
    options=AmpOptions,
    compile=AmpPass,
    # after rescale and reuse, whose stages and nodes it sees (and so after opt, whose oneDNN marks
    # on Conv/ConvGrad it replaces with its own); before skip, whose pruning removes the casts of a
    # skipped layer's backward with it
    after=("reuse",),
    kernels=(
        KernelProvider(
            name="amp",
            implementations=("auto", "lowp", "emulate"),
            claims=_claims,
            build=_build,
            summary="nodes marked by the amp pass: convs/GEMMs in bf16/fp16 on oneDNN (torch), casts, loss scaling",
        ),
    ),
)
