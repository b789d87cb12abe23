"""accelc.passes: one package per method, each owning its graph rewrite, ONNX form, run-time
algorithm, kernels and cost hook. Importing this package registers them all with the compiler's
and the runtime's registries; a new method is one more folder here (and one import below)."""

from . import amp, opt, rescale, reuse, skip  # noqa: F401
