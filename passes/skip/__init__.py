"""skip — layer skip learning with LARS variables (IEEE ICECS 2018).

* :mod:`.rewrite`: the pass (instrument the LARS norms, or prune a fixed skip set) and the pruning
  every skip variant is built with;
* :mod:`.algorithm`: the run-time algorithm that decides the skip set per epoch.
"""

from . import algorithm, rewrite  # noqa: F401  (register the pass and its algorithm)
