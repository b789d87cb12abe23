"""The pass manager: runs passes in composition order over an artifact set and every stage of it,
checks each pass's preconditions, validates every stage it changed and runs its numeric
self-check. The pass contract is in :mod:`accelc.compiler.pass_api`."""

from __future__ import annotations

import time

from .artifacts import Artifacts
from .errors import AccelcError
from .pass_api import Pass, check_order, get
from .validation import validate, validate_all


class PassManager:
    """Run passes in the given order, validating after each."""

    def __init__(
        self,
        names: list[str],
        options: dict | None = None,
        validate_each: bool = True,
        memory_limit_gb: float | None = None,
    ):
        self.passes: list[Pass] = [get(n)() for n in names]
        check_order([p.name for p in self.passes if not p.default])
        options = options or {}
        # parsed where they entered (check_pass_options); a dict given here directly is parsed now
        self.options = {p.name: p.options.parse(options.get(p.name)) for p in self.passes}
        self.validate_each = validate_each
        self.memory_limit_gb = memory_limit_gb

    def _apply(self, p: Pass, art: Artifacts):
        opts = self.options[p.name]
        p.requires(art, opts)
        return p.run(art.copy() if p.in_place else art, opts)

    def run(self, art: Artifacts) -> tuple[Artifacts, list[dict]]:
        """Apply every pass (and replay it on every stage), then check once: the final artifacts and
        each stage are validated (:func:`validate`: ORT sessions and a training step, in a child
        process), after which each pass's numeric self-check compares its own before and after.

        Validating after every pass repeated the same ORT session builds (seconds each on a
        100-conv graph) passes x stages times. A graph the final validation refuses is attributed
        the way per-pass validation did: the artifacts after each pass are validated in order, and
        the first refusal is the error. The result is in :attr:`validation`."""
        records = []
        done: list[Pass] = []
        applied = []  # (record, pass, before, after, stages it changed) of every pass that changed something
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
                art.stages[name].is_stage = True
                for q in done if new else [p]:
                    r = self._apply(q, art.stages[name])
                    art.stages[name] = r.artifacts
                    art.stages[name].plan = []  # the root's plan drives training; a stage's is unused
                    stage_modified |= r.modified
                if stage_modified:
                    changed_stages.append(name)
            rec = {
                "name": p.name,
                "options": opts.to_json(),
                "modified": result.modified,
                "changes": result.changes,
                "seconds": round(time.perf_counter() - t0, 3),
            }
            if result.modified or changed_stages:
                applied.append((rec, p, before, art, changed_stages, result.modified))
            records.append(rec)
            done.append(p)
        self.validation = None
        if self.validate_each and applied:
            self.validation = self._validate(art, applied)
            for rec, p, before, after, _, modified in applied:
                t1 = time.perf_counter()
                check = p.ensures(before, after, self.options[p.name]) if modified else None
                rec["validation"] = {"self_check": check} if check else {}
                rec["check_seconds"] = round(time.perf_counter() - t1, 3)
        return art, records

    def _validate(self, art: Artifacts, applied: list) -> dict:
        changed = sorted({name for *_, stages, _ in applied for name in stages} & set(art.stages))
        try:  # the model and its stages checked side by side (one child process each)
            outs = validate_all([art] + [art.stages[name] for name in changed], self.memory_limit_gb)
            out = outs[0]
            for name, stage_out in zip(changed, outs[1:]):
                out.setdefault("stages", {})[name] = stage_out
            return out
        except AccelcError:
            for _, _, _, after, stages, _ in applied:  # the first pass whose result is refused
                validate(after, self.memory_limit_gb)
                for name in stages:
                    validate(after.stages[name], self.memory_limit_gb)
            raise
