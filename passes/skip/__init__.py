"""skip — layer skip learning with LARS variables (IEEE ICECS 2018).

* :mod:`.rewrite`: the pass (instrument the LARS norms, or prune a fixed skip set), its options and
  the pruning every skip variant is built with;
* :mod:`.algorithm`: the run-time algorithm that decides the skip set (per epoch by LARS, or per
  step by the :mod:`.freezeout` schedule).
"""

from ...compiler.method import Method, Panel
from . import summary
from .algorithm import LarsSkip
from .rewrite import SkipOptions, SkipPass

METHOD = Method(
    name="skip",
    summary="layer skip learning with LARS variables, or FreezeOut's budgeted freezing: prune the backward of skipped layers",
    paper="Layer skip learning using LARS variables, IEEE ICECS 2018",
    options=SkipOptions,
    compile=SkipPass,
    algorithm=LarsSkip,
    after=("amp",),  # last: prunes whatever backward the passes before it left
    run_summary=summary.run_summary,
    bench_panel=Panel("skipped layers (from the epoch after the decision)", summary.panel_shows, summary.panel_draw),
)
