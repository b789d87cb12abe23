"""rescale — fast training of CNNs via kernel rescaling (Gusmão et al., 2016), in one folder:

* :mod:`.rewrite`: the kernel and head resampling, the low-resolution stage and the pass;
* :mod:`.algorithm`: the run-time algorithm that trains the stage first and switches.
"""

from . import algorithm, rewrite  # noqa: F401  (register the pass and its algorithm)
