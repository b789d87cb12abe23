"""Training plan: the controllers a compiled artifact set asks for.

Passes that decide during training record a controller spec in ``plan.json`` (and report.json);
``controllers_for`` builds them for ``accelc train`` and ``accelc bench``. Editing thresholds in
plan.json changes what the next ``accelc train`` does.
"""
from __future__ import annotations

from ..compiler.errors import AccelcError


def controllers_for(artifact_dir, session) -> list:
    from .rescale import RescaleController
    from .reuse import ReuseController
    from .skip import LarsSkipController
    out = []
    for spec in session.artifacts.plan:
        kind = spec.get("type")
        opts = {k: v for k, v in spec.items() if k != "type"}
        if kind == "skip":
            out.append(LarsSkipController(session.artifacts, opts))
        elif kind == "reuse":
            out.append(ReuseController(session.artifacts, spec))
        elif kind == "rescale":
            out.append(RescaleController(session.artifacts, spec))
        else:
            raise AccelcError(f"plan.json names an unknown controller '{kind}'")
    if len(out) > 1:
        from .compose import Composer
        comp = Composer(session.artifacts, out)
        for c in out:
            c.composer = comp
    return out
