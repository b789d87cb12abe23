"""The activations' memory layout, chosen for the whole training step.

ONNX graphs are NCHW. ATen's kernels (oneDNN's convolutions, BatchNorm, ReLU, pooling and their
gradients) also run NHWC — torch's ``channels_last`` — and on some CPUs and models that is much
faster (depthwise convolutions most of all). Here the choice is the engine's, for the whole graph:
the data enter the step in the chosen layout and every kernel keeps its input's layout, so the
activations and their gradients stay NHWC from the first convolution to the flatten before the
head; the 4-D parameters (convolution weights), their gradient buffers and the optimizer's moments
take the same layout (:func:`params_in_layout`: oneDNN reorders an NCHW weight for an NHWC
convolution at every call, forward and backward, and its weight gradient comes back NHWC). Kernels
that read NCHW only (a method's own, where it does not say otherwise) are handed the NCHW form of
their inputs, and ORT (a whole-graph session, a segment) is always handed NCHW parameters.

``--layout auto`` (the default) measures: at the first step of a batch shape, the step's forward
and backward run alternately in both layouts (one untimed and :data:`TIMED` timed runs each) and
the faster is kept (NHWC only when at least :data:`MARGIN` faster; when the fastest runs are
within :data:`CLOSE` of that line, :data:`TIMED` more runs each decide). It does not measure, and keeps
NCHW, where the input is not an image batch, where the step's activations are below
:data:`MEASURE_FROM_BYTES` (a layout saves less there than the measurement's noise), or where a
kernel of the step keeps state between runs (the extra runs would change it). ``nchw`` / ``nhwc``
force a layout. The choice and the measurement go in the engine report (``summary.json``).
"""

from __future__ import annotations

import hashlib
import time
from typing import Callable

NCHW, NHWC = "nchw", "nhwc"
TIMED = 3  # timed runs per layout
MARGIN = 0.03  # NHWC must be this much faster to be chosen
CLOSE = 0.05  # fastest runs this close (relative) to the margin's line: TIMED more runs each
MEASURE_FROM_BYTES = 64 << 20  # activations (and their gradients) of one step
MAX_KEPT = 1024  # choices a checkpoint may carry (one per parameter shapes and batch shape)


def key_digest(key) -> str:
    """A step's key (its parameters' names and shapes, its batch shape: tuples of strings and
    ints, whose repr is the same in every process) as the SHA-256 hex digest a checkpoint carries
    (``Layouts.state``)."""
    return hashlib.sha256(repr(key).encode()).hexdigest()


def in_layout(x, layout: str):
    """``x`` (a torch tensor) in ``layout``: NHWC applies to 4-D tensors only."""
    import torch  # heavy: loaded already when a step runs

    if layout == NHWC and x.dim() == 4:
        # a fresh NHWC tensor, not ``contiguous(memory_format=...)``: a one-channel batch is dense
        # in both layouts, and only NHWC strides make the convolutions after it run NHWC
        return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last).copy_(x)
    return x


def params_in_layout(tensors, state: dict, layout: str) -> int:
    """Give the 4-D tensors among ``tensors`` (parameters and gradient buffers) and the 4-D
    tensors of their optimizer ``state`` (a torch optimizer's, keyed by parameter) the memory
    layout of ``layout``, in place: the same tensor objects (their ``.data`` swapped, as
    ``Module.to(memory_format=...)`` does), so the optimizer, the bound buffers and every holder
    keep working. Values are unchanged. Returns how many tensors moved.

    Measured on torchvision resnet50 (batch 16, 128x128, NHWC, 2-core AVX2 EPYC, torch's profiler
    over 3 steps): with NCHW weights, 1,321 ``copy_`` per step took 33.2 ms (a 512x512x3x3 weight
    copied four times per step: reordered for the forward and the backward convolution, its NHWC
    gradient transposed into the NCHW buffer), torch channels_last 9.9 ms."""
    import torch

    fmt = torch.channels_last if layout == NHWC else torch.contiguous_format
    moved = 0
    for t in tensors:
        for u in [t, *(v for v in state.get(t, {}).values() if isinstance(v, torch.Tensor))]:
            if u.dim() == 4 and not u.is_contiguous(memory_format=fmt):
                u.data = u.data.contiguous(memory_format=fmt)
                moved += 1
    return moved


def why_not_measured(x_dims: int, act_bytes: int | None, kernels) -> str | None:
    """Why ``auto`` keeps NCHW without measuring this step (None: it measures)."""
    if x_dims != 4:
        return "the input is not an image batch"
    if act_bytes is not None and act_bytes < MEASURE_FROM_BYTES:
        return f"activations {act_bytes / 2**20:.0f} MiB < {MEASURE_FROM_BYTES >> 20} MiB"
    keeping = sorted({type(k).__name__ for k in kernels if not k.stateless})
    if keeping:
        return f"kernels keep state between runs ({', '.join(keeping[:3])})"
    return None


def measure(run: Callable[[str], None], prepare: Callable[[str], None] | None = None) -> tuple[str, dict]:
    """Time ``run(layout)`` (one forward and backward) in both layouts, interleaved: one untimed
    and :data:`TIMED` timed runs each, ``prepare(layout)`` untimed before each (the parameters
    moved to the layout). Returns the faster layout and each one's fastest run in ms."""
    times: dict[str, list[float]] = {NCHW: [], NHWC: []}

    def rounds(n: int, warm: bool) -> None:
        for r in range(n):
            for layout in (NCHW, NHWC):
                if prepare is not None:
                    prepare(layout)
                t0 = time.perf_counter()
                run(layout)
                if r or not warm:  # the first round warms both up
                    times[layout].append((time.perf_counter() - t0) * 1e3)

    rounds(TIMED + 1, True)
    # a close call is measured again: on a shared machine one slow run of a few can move the
    # fastest by several percent (the zoo VGG at 28x28 measured NHWC 1.6% faster once, and 16%
    # faster in whole steps run interleaved after it)
    ratio = min(times[NHWC]) / max(min(times[NCHW]), 1e-9)
    if abs(ratio - (1.0 - MARGIN)) < CLOSE:
        rounds(TIMED, False)
    med = {k: round(min(v), 3) for k, v in times.items()}
    choice = NHWC if med[NHWC] < med[NCHW] * (1.0 - MARGIN) else NCHW
    return choice, med


class Layouts:
    """One engine's layout choices: one per (parameter shapes, batch shape), made at the first step
    of a variant that brings a new one (variants that only prune the backward share it)."""

    def __init__(self, forced: str):
        self.forced = forced  # "auto", or the layout every step runs in
        self.chosen: dict = {}
        self.last = forced if forced != "auto" else NCHW  # the evaluation graph runs in it
        self.report: dict = {"layout": forced} if forced != "auto" else {"layout": None, "auto": True}
        self.choices: list = []  # every choice made by measuring, in order ("choices" in the report)
        self.last_key: str | None = None  # the digest of the key the last step ran with
        self.restored = 0  # choices a checkpoint gave (restore)
        self._digests: dict = {}  # key -> key_digest(key), computed once per key

    def state(self) -> list[dict]:
        """The choices made so far, for a checkpoint: a resumed run reuses them instead of measuring
        again (under load a measurement may choose otherwise, and the resumed run would not be
        the uninterrupted one bit for bit). [] when the layout is forced."""
        if self.forced != "auto":
            return []
        out = [{"key": k, "layout": v} for k, v in list(self.chosen.items())[-MAX_KEPT:]]
        for c in out:
            if c["key"] == self.last_key:
                c["last"] = True  # the evaluation graph (and skip's prefix cache) runs in its layout
        return out

    def restore(self, choices: list[dict]) -> None:
        """The choices :meth:`state` gave (a checkpoint's, checked against its schema), taken as
        made; nothing when the layout is forced."""
        if self.forced != "auto" or not choices:
            return
        for c in choices[:MAX_KEPT]:
            if c.get("layout") in (NCHW, NHWC) and isinstance(c.get("key"), str):
                self.chosen[c["key"]] = c["layout"]
                if c.get("last") is True:
                    self.last, self.last_key = c["layout"], c["key"]
        self.restored = len(self.chosen)
        self.report = {
            "layout": self.last,
            "measured_ms": None,
            "not_measured": f"{self.restored} choice(s) restored from the checkpoint",
            "auto": True,
            "restored": self.restored,
            "choices": self.choices,
        }

    def known(self, key) -> str | None:
        """The layout of a step keyed ``key`` when it is forced or chosen already, else None."""
        if self.forced != "auto":
            return self.forced
        digest = self._digests.get(key)
        if digest is None:
            digest = self._digests[key] = key_digest(key)
        got = self.chosen.get(digest)
        if got is not None:
            self.last, self.last_key = got, digest
        return got

    def for_step(self, key, x_dims: int, act_bytes: Callable, kernels, run: Callable, agree=None, prepare=None) -> str:
        """The layout of a step keyed ``key``: forced, chosen before, or chosen now (``run`` and
        ``prepare`` as for :func:`measure`; ``act_bytes()`` the step's activation bytes or None;
        ``agree``, in data-parallel training, makes every rank take rank 0's choice)."""
        got = self.known(key)
        if got is None:
            why = why_not_measured(x_dims, act_bytes() if x_dims == 4 else None, kernels)
            got, med = measure(run, prepare) if why is None else (NCHW, None)
            if agree is not None:
                got = agree(got)
            self.last_key = self._digests[key]  # known() computed it
            self.chosen[self.last_key] = got
            self.choices.append({"layout": got, "measured_ms": med, "not_measured": why})
            restored = {"restored": self.restored} if self.restored else {}
            self.report = {**self.choices[-1], "auto": True, **restored, "choices": self.choices}
        self.last = got
        return got
