"""One training schedule for several passes: the variant that carries every controller's decision.

With ``--passes rescale,reuse,skip`` three controllers decide during training: the resolution
stage (rescale), the reuse setting (L, H, on/off), the skip set. Each alone would build its
variant from the compiled artifacts and undo the others' decisions, so when more than one is
present they share a :class:`Composer`, which builds the variant from all current decisions:

1. the stage's artifacts (``stage-low/`` until rescale switches, then the full-resolution ones);
2. the reuse setting applied to that stage's unreused training graph (a rescaled kernel keeps its
   (L, H) — L clipped to the new K = C·kh·kw — and gets hyperplanes drawn afresh for its shape from
   the same per-layer seed);
3. the skip set pruned from the result (a reused layer that is skipped computes no weight
   gradient; on an input-side prefix its backward node disappears).
"""
from __future__ import annotations


class Composer:
    def __init__(self, root, controllers: list):
        self.root = root
        self.by_name = {c.name: c for c in controllers}
        self._cache: dict = {}

    def artifacts(self):
        rs, ru, sk = (self.by_name.get(n) for n in ("rescale", "reuse", "skip"))
        stage = rs.spec["stage"] if rs is not None and not rs.switched else None
        base = self.root if stage is None else self.root.stages[stage]
        reuse = ru.settings(base) if ru is not None else None
        skip = list(sk.skipped) if sk is not None else []
        key = (stage, repr(sorted((k, sorted(v.items())) for k, v in reuse.items())) if reuse is not None else None,
               tuple(skip))
        if key not in self._cache:
            art = base
            if reuse is not None:
                from ..passes.reuse import reuse_variant
                art = reuse_variant(base, reuse)
            if skip:
                from ..passes.skip import skip_variant
                art, _ = skip_variant(art, skip)
            self._cache[key] = art
        return self._cache[key]

    def describe(self) -> str:
        rs, ru, sk = (self.by_name.get(n) for n in ("rescale", "reuse", "skip"))
        parts = []
        if rs is not None:
            parts.append("low" if not rs.switched else "full")
        if ru is not None:
            parts.append(ru.describe())
        if sk is not None and sk.skipped:
            parts.append("skip:" + ",".join(sk.skipped))
        return "+".join(parts) or "base"
