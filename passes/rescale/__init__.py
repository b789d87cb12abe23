"""rescale — progressive resizing (the default) and fast training of CNNs via kernel rescaling
(Gusmão et al., 2016; ``--rescale-mode kernel``), in one folder:

* :mod:`.options`: the options of both modes and the plan entry's fields;
* :mod:`.rewrite`: the kernel and head resampling, the low-resolution stage, the pass;
* :mod:`.ramp`, :mod:`.progressive`: progressive mode's resolution ramp and its stages (one per size);
* :mod:`.algorithm`: the run-time algorithms (the stage first, then the switch; progressive: the ramp).
"""

from ...compiler.method import Method, Panel
from . import summary
from .algorithm import Rescale
from .rewrite import PLAN_FIELDS, RescaleOptions, RescalePass

METHOD = Method(
    name="rescale",
    summary="progressive resizing: the input size ramps up over the epochs, every parameter shared (or, "
    "--rescale-mode kernel, kernel rescaling: a low-resolution stage with downscaled kernels first, then "
    "full resolution)",
    paper="Gusmão et al., Fast training of CNNs via kernel rescaling, 2016",
    options=RescaleOptions,
    compile=RescalePass,
    algorithm=Rescale,
    after=("opt",),  # first of the optional methods: every later pass also rewrites the stage it makes
    plan_fields=PLAN_FIELDS,
    run_summary=summary.run_summary,
    bench_panel=Panel("resolution stage (input height)", summary.panel_shows, summary.panel_draw),
)
