"""accelc.passes: one package per method, each declaring its :class:`~accelc.compiler.method.Method`
(its pass, options, run-time algorithm, kernels and cost hooks) in its ``__init__``. ``METHODS``
lists the built-in ones; the facade installs them (:func:`accelc.compiler.method.install`) when
``accelc`` is imported. A new built-in method is one more folder here and one line below."""

from . import amp, opt, rescale, reuse, skip

METHODS = (
    opt.METHOD,
    rescale.METHOD,
    reuse.METHOD,
    amp.METHOD,
    skip.METHOD,
)
