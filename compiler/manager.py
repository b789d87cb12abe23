"""The pass manager: runs passes in composition order over an artifact set and every stage of it,
checks each pass's preconditions, validates every stage it changed and runs its numeric
self-check. The pass contract is in :mod:`accelc.compiler.pass_api`."""

from __future__ import annotations

import time

from .artifacts import Artifacts
from .pass_api import Pass, check_order, get
from .validation import validate


class PassManager:
    """Run passes in the given order, validating after each."""

    def __init__(
        self,
        names: list[str],
        options: dict[str, dict] | None = None,
        validate_each: bool = True,
        memory_limit_gb: float | None = None,
    ):
        self.passes: list[Pass] = [get(n)() for n in names]
        check_order([p.name for p in self.passes if not p.default])
        options = options or {}
        self.options = {p.name: p.resolve_options(options.get(p.name)) for p in self.passes}
        self.validate_each = validate_each
        self.memory_limit_gb = memory_limit_gb

    def _apply(self, p: Pass, art: Artifacts):
        opts = self.options[p.name]
        p.requires(art, opts)
        return p.run(art.copy() if p.in_place else art, opts)

    def run(self, art: Artifacts) -> tuple[Artifacts, list[dict]]:
        records = []
        done: list[Pass] = []
        for p in self.passes:
            opts = self.options[p.name]
            t0 = time.perf_counter()
            before = art
            old_stages = set(art.stages)
            result = self._apply(p, art)
            art = result.artifacts
            # Stages (e.g. a low-resolution model) get the same rewrites as the main artifacts: a new
            # stage replays the passes that ran before it, an existing one gets this pass.
            changed_stages = []
            for name in list(art.stages):
                new = name not in old_stages
                stage_modified = new
                for q in done if new else [p]:
                    r = self._apply(q, art.stages[name])
                    art.stages[name] = r.artifacts
                    art.stages[name].plan = []  # the root's plan drives training; a stage's is unused
                    stage_modified |= r.modified
                if stage_modified:
                    changed_stages.append(name)
            rec = {
                "name": p.name,
                "options": _jsonable(opts),
                "modified": result.modified,
                "changes": result.changes,
                "seconds": round(time.perf_counter() - t0, 3),
            }
            if self.validate_each and (result.modified or changed_stages):
                rec["validation"] = validate(art, self.memory_limit_gb)
                for name in changed_stages:
                    rec["validation"].setdefault("stages", {})[name] = validate(art.stages[name], self.memory_limit_gb)
                check = p.ensures(before, art, opts) if result.modified else None
                if check:
                    rec["validation"]["self_check"] = check
            records.append(rec)
            done.append(p)
        return art, records


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)
