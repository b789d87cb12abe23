"""How long a reused layer takes against the exact conv on this machine: a time cost model.

The FLOP accounting of :mod:`.cost` says how much arithmetic reuse saves; it cannot say whether
the layer gets faster, because most of what a reused layer does is not GEMM arithmetic (hashing,
cluster numbering, centroid sums, gathers and scatters) and runs at other speeds than oneDNN's
convolution. This model predicts milliseconds instead:

* **units**: each phase of the native kernels (:mod:`.native`) is counted in its own unit, from
  the layer's shape, batch, setting and remain ratio r (clusters / row-chunks): with R output rows
  (batch · Ho · Wo), K = C·kh·kw, G chunks of L, Co outputs and H hyperplanes —
  hashing R·G·L·H multiply-adds (a grouped oneDNN conv when L is whole channels, ``hash_conv``,
  else the C kernel, ``hash_rows``), numbering R·G codes, centroid sums R·G·L values, the centroid
  GEMMs r·R·G·L·Co multiply-adds each (forward, weight gradient, and the per-cluster input
  gradient), the output gather R·G·Co, the per-cluster gradient sums R·G·Co, the exact input
  gradient R·K·Co multiply-adds on oneDNN, the per-cluster input gradient's scatter R·G·L; the
  exact conv is R·K·Co multiply-adds per pass (forward, input and weight gradient) on oneDNN;
* **machine profile**: the seconds per unit of every phase, timed once per process on a probe
  layer (64→64, 3×3, 16×16, batch 32, post-ReLU random activations) with the kernels training
  runs — instrumented phase by phase — and the exact conv on oneDNN; the fastest of 3 rounds after
  a warm-up (another process on the cores only slows a round), about half a second in all. What a
  call costs regardless of size (Python, dispatch, thread start-up) is what a tiny layer takes
  beyond its units;
* **prediction**: Σ units × seconds per unit, for the reused layer and the exact one. ``floor_ms``
  is the reused layer at r = 0 (no centroid GEMM at all): what reuse costs before it saves
  anything. A layer whose floor is already slower than the exact conv cannot win at any remain
  ratio.

Checked against the per-layer measurement of ``--reuse-choose measured`` by
``benchmarks/reuse_cost_check.py`` (``docs/reuse-cost-model.md``).
"""

from __future__ import annotations

import math
import time

import numpy as np

from .spec import ConvGeom, ReuseSpec, geom_from_config, make_planes

# the probe layer: big enough that every phase takes well over a timer tick, small enough for
# half a second in all
PROBE = {"N": 32, "C": 64, "HW": 16, "Co": 64, "k": 3, "L": 144, "H": 8}
ROUNDS = 3
_PROFILE: dict = {}  # torch thread count -> profile (one probe per process and thread count)


class NoProfile(Exception):
    """The machine profile could not be measured (no native kernels, no torch)."""


def units(
    geom: ConvGeom,
    batch: int,
    in_hw,
    L: int,
    H: int,
    input_grad: str,
    remain: float,
    mask=(True, True, True),
    cross_batch: int = 0,
):
    """phase -> count of its unit for one training step of the layer, reused and exact.
    ``mask``: the ConvGrad outputs the graph uses (dX, dW, dB); None: forward only.
    ``cross_batch`` K ≥ 2 (:mod:`.cross`): the GEMMs run on the table (2^H centroids per chunk),
    and rows are summed on the refresh batch only (1/K of the steps; rows in new codes on the
    other batches are not counted: an optimistic bound)."""
    ho, wo = geom.out_hw(int(in_hw[0]), int(in_hw[1]))
    R = float(batch) * ho * wo
    L = int(min(int(L), geom.K))
    G = -(-geom.K // L)
    co, K = float(geom.Co), float(geom.K)
    r = min(max(float(remain), 0.0), 1.0)
    gemm = r * R * G * L * co
    sums = R * G * L
    if int(cross_batch) >= 2:
        gemm = float(2**H) * G * L * co if r > 0 else 0.0
        sums /= int(cross_batch)
    hash_key = "hash_conv" if L % (geom.kh * geom.kw) == 0 else "hash_rows"
    reuse = {hash_key: R * G * L * H, "compact": R * G, "sums": sums, "gemm": gemm, "gather": R * G * co}
    exact = {"conv_fwd": R * K * co}
    if mask is not None:
        need_dx, need_dw = bool(mask[0]), bool(mask[1])
        if need_dw or (need_dx and input_grad == "cluster"):
            reuse["grad_sums"] = R * G * co
            reuse["gemm"] += gemm if need_dw else 0.0
        else:  # only the bias gradient's sum over dY
            reuse["grad_sums"] = R * co
        if need_dx and input_grad == "cluster":
            reuse["gemm"] += gemm
            reuse["scatter_dx"] = R * G * L
        elif need_dx:
            reuse["dx_exact"] = R * K * co
        if need_dx:
            exact["conv_dx"] = R * K * co
        if need_dw:
            exact["conv_dw"] = R * K * co
    return reuse, exact


def _probe_once() -> dict:
    """phase -> seconds per unit, timed on the probe layer with the native kernels."""
    import torch

    from ...runtime.torch_ops import Conv2d
    from . import native
    from .choice import conv_node

    if not native.available():
        raise NoProfile(f"native reuse kernels unavailable ({native.error()})")
    p = PROBE
    g = torch.Generator().manual_seed(0)
    geom = ConvGeom(C=p["C"], Co=p["Co"], kh=p["k"], kw=p["k"], pads=(1, 1, 1, 1))
    x = torch.randn(p["N"], p["C"], p["HW"], p["HW"], generator=g).clamp_min_(0)
    w = torch.randn(p["Co"], p["C"], p["k"], p["k"], generator=g) * (1.0 / math.sqrt(geom.K))
    b = torch.zeros(p["Co"])
    dy = torch.randn(p["N"], p["Co"], p["HW"], p["HW"], generator=g) * 0.01
    specs = {
        "exact": ReuseSpec(p["L"], p["H"], "image", "exact"),  # L = 16 channels · 9: the grouped-conv hash
        "cluster": ReuseSpec(p["L"], p["H"], "image", "cluster"),
    }
    rows_spec = ReuseSpec(128, p["H"], "image", "exact")  # L not whole channels: the C hash
    planes = {k: torch.from_numpy(make_planes(s.chunks(geom.K), s.L, s.H, 1)) for k, s in specs.items()}
    rows_planes = torch.from_numpy(make_planes(rows_spec.chunks(geom.K), rows_spec.L, rows_spec.H, 1))
    conv = Conv2d(conv_node(geom))
    samples: dict = {}
    remains: dict = {}
    for rnd in range(1 + ROUNDS):
        seconds: dict = {}
        with torch.no_grad():
            for key, spec in specs.items():
                prof: dict = {}
                _, ctx = native.forward(x, w, b, planes[key], geom, spec, prof=prof)
                native.backward(dy, x, w, ctx, geom, spec, prof=prof)
                remains[key] = ctx.remain_ratio
                if key == "exact":
                    seconds.update({k: v for k, v in prof.items() if k != "gemm"})
                    seconds["gemm"] = prof.get("gemm", 0.0)
                else:
                    seconds["scatter_dx"] = prof.get("scatter_dx", 0.0)
            t = time.perf_counter()
            native.hash_buckets(x, rows_planes, geom, rows_spec)
            seconds["hash_rows"] = time.perf_counter() - t
            t = time.perf_counter()
            conv.forward(x, w, b)
            t1 = time.perf_counter()
            conv.backward(dy, x, w, [True, False, False])
            t2 = time.perf_counter()
            conv.backward(dy, x, w, [False, True, False])
            t3 = time.perf_counter()
        seconds.update(conv_fwd=t1 - t, conv_dx=t2 - t1, conv_dw=t3 - t2)
        if rnd:  # the first round warms caches and oneDNN's primitive cache
            for k, v in seconds.items():
                samples.setdefault(k, []).append(v)
    # the fastest round: a probe that shares the cores with another process is slowed, never sped up
    best = {k: float(np.min(v)) for k, v in samples.items()}
    # the units the probe ran, phase by phase (as :func:`units` counts them)
    reuse_u, exact_u = units(geom, p["N"], (p["HW"], p["HW"]), p["L"], p["H"], "exact", remains["exact"])
    rows_units = units(geom, p["N"], (p["HW"], p["HW"]), rows_spec.L, p["H"], "exact", 0.0, None)[0]["hash_rows"]
    cl_units = units(geom, p["N"], (p["HW"], p["HW"]), p["L"], p["H"], "cluster", remains["cluster"])[0]["scatter_dx"]
    per = {k: best[k] / reuse_u[k] for k in reuse_u if reuse_u[k] > 0 and k in best}
    per["hash_rows"] = best["hash_rows"] / rows_units
    per["scatter_dx"] = best["scatter_dx"] / cl_units
    per.update({k: best[k] / exact_u[k] for k in ("conv_fwd", "conv_dx", "conv_dw")})
    per.update(_overheads(per))
    return {
        "seconds_per_unit": per,
        "probe": dict(PROBE, remain_ratio=round(remains["exact"], 4), threads=torch.get_num_threads()),
        "probe_ms": {k: round(v * 1e3, 3) for k, v in best.items()},
    }


def _overheads(per: dict) -> dict:
    """Seconds per call that do not scale with the layer (Python, dispatch, thread start-up,
    allocation): what a tiny layer (16→16, 3×3, 8×8, batch 2) takes beyond its units, once per
    reused layer-step (``call_reuse``) and per exact conv pass (``call_exact``)."""
    import torch

    from ...runtime.torch_ops import Conv2d
    from . import native
    from .choice import conv_node

    geom = ConvGeom(C=16, Co=16, kh=3, kw=3, pads=(1, 1, 1, 1))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 8, 8, generator=g).clamp_min_(0)
    w = torch.randn(16, 16, 3, 3, generator=g) * 0.1
    b = torch.zeros(16)
    dy = torch.randn(2, 16, 8, 8, generator=g) * 0.01
    spec = ReuseSpec(144, 8, "image", "exact")
    planes = torch.from_numpy(make_planes(1, 144, 8, 1))
    conv = Conv2d(conv_node(geom))
    reuse_t, exact_t, remain = [], [], 1.0
    with torch.no_grad():
        for rnd in range(1 + 2 * ROUNDS):
            t = time.perf_counter()
            _, ctx = native.forward(x, w, b, planes, geom, spec)
            native.backward(dy, x, w, ctx, geom, spec)
            t1 = time.perf_counter()
            conv.forward(x, w, b)
            conv.backward(dy, x, w, [True, True, True])
            t2 = time.perf_counter()
            remain = ctx.remain_ratio
            if rnd:
                reuse_t.append(t1 - t)
                exact_t.append(t2 - t1)
    reuse_u, exact_u = units(geom, 2, (8, 8), 144, 8, "exact", remain)
    reuse_s = sum(v * per[k] for k, v in reuse_u.items())
    exact_s = sum(v * per[k] for k, v in exact_u.items())
    return {
        "call_reuse": max(float(np.min(reuse_t)) - reuse_s, 0.0),
        "call_exact": max(float(np.min(exact_t)) - exact_s, 0.0) / 3,
    }


def profile() -> dict:
    """This machine's profile at the current torch thread count (probed once per process)."""
    import torch

    key = torch.get_num_threads()
    if key not in _PROFILE:
        try:
            _PROFILE[key] = _probe_once()
        except NoProfile:
            raise
        except Exception as e:  # the model is advice: a failed probe is said, never fatal
            raise NoProfile(f"{type(e).__name__}: {' '.join(str(e).split())[:160]}") from None
    return _PROFILE[key]


def predict(
    geom: ConvGeom,
    batch: int,
    in_hw,
    L: int,
    H: int,
    input_grad: str,
    remain: float,
    mask=(True, True, True),
    prof: dict | None = None,
    cross_batch: int = 0,
) -> dict:
    """Predicted milliseconds of one training step of the layer: ``reuse_ms`` at ``remain``,
    ``floor_ms`` (reuse at remain ratio 0), ``exact_ms`` (oneDNN), ``speedup`` = exact / reuse and
    the phases of the reused layer."""
    per = (prof or profile())["seconds_per_unit"]
    reuse_u, exact_u = units(geom, batch, in_hw, L, H, input_grad, remain, mask, cross_batch)
    floor_u, _ = units(geom, batch, in_hw, L, H, input_grad, 0.0, mask, cross_batch)
    # the fixed cost of a call: once per reused layer-step, once per exact conv pass
    reuse_u["call_reuse"] = floor_u["call_reuse"] = 1.0
    exact_u["call_exact"] = float(len(exact_u))
    phases = {k: v * per[k] * 1e3 for k, v in reuse_u.items()}
    reuse_ms = sum(phases.values())
    exact_ms = sum(v * per[k] * 1e3 for k, v in exact_u.items())
    floor_ms = sum(v * per[k] * 1e3 for k, v in floor_u.items())
    return {
        "reuse_ms": reuse_ms,
        "floor_ms": floor_ms,
        "exact_ms": exact_ms,
        "speedup": exact_ms / reuse_ms if reuse_ms > 0 else math.inf,
        "remain_ratio": float(remain),
        "phases_ms": {k: round(v, 3) for k, v in phases.items()},
    }


def predict_config(cfg: dict, batch: int, remain: float, mask=(True, True, True), prof: dict | None = None) -> dict:
    """:func:`predict` for a layer's compiled reuse config (``geom``, ``in_hw``, L, H, input_grad)."""
    return predict(
        geom_from_config(cfg),
        batch,
        cfg["in_hw"],
        cfg["L"],
        cfg["H"],
        cfg["input_grad"],
        remain,
        mask,
        prof,
        int(cfg.get("cross_batch", 0) or 0),
    )


def hopeless(pred: dict, margin: float, slack: float) -> bool:
    """Whether the layer cannot win even at remain ratio 0, with the model's error allowed for:
    ``floor_ms ≥ slack · margin · exact_ms``."""
    return pred["floor_ms"] >= slack * margin * pred["exact_ms"]


def annotate(changes: list, configs: dict, batch: int) -> str | None:
    """Add ``predicted`` (this machine's time model at the expected remain ratio, see
    :func:`expected_remain`) to the pass's ``reused`` change records; returns why nothing was
    predicted (None when every record got its prediction)."""
    from .cost import expected_remain

    try:
        prof = profile()
    except NoProfile as e:
        return str(e)
    threads = prof["probe"]["threads"]
    for c in changes:
        cfg = configs.get(c.get("layer")) if c.get("action") == "reused" else None
        if cfg is None:
            continue
        r = expected_remain(cfg, batch)
        p = predict_config(cfg, batch, r, (True, True, True), prof)
        c["predicted"] = {
            "reuse_ms": round(p["reuse_ms"], 3),
            "exact_ms": round(p["exact_ms"], 3),
            "floor_ms": round(p["floor_ms"], 3),
            "speedup": round(p["speedup"], 4),
            "remain_ratio": round(r, 4),
            "batch": int(batch),
            "threads": int(threads),
        }
    return None


def _num(v) -> bool:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:  # a JSON integer too large for a float is not a number of milliseconds either
        return math.isfinite(v) and abs(v) < 1e300
    except OverflowError:
        return False


def explain_lines(changes: list) -> list[str]:
    """One line per reused layer with its prediction (from report.json's change records, so a
    record edited by hand or from another version is skipped, never trusted into an error)."""
    lines = []
    for c in changes if isinstance(changes, list) else []:
        p = c.get("predicted") if isinstance(c, dict) else None
        if not isinstance(p, dict) or not all(_num(p.get(k)) for k in ("reuse_ms", "exact_ms", "floor_ms")):
            continue
        if p["reuse_ms"] <= 0 or p["exact_ms"] <= 0:
            continue
        s = p["exact_ms"] / p["reuse_ms"]
        verdict = "faster" if s > 1 else "slower"
        line = (
            f"{str(c.get('layer'))[:80]}: predicted {s:.2f}x ({verdict}): reuse {p['reuse_ms']:.1f} ms vs exact "
            f"{p['exact_ms']:.1f} ms per step"
        )
        if _num(p.get("remain_ratio")):
            line += f" at remain ratio {p['remain_ratio']:.2f}"
        line += f"; {p['floor_ms']:.1f} ms even with no clusters"
        if p["floor_ms"] >= p["exact_ms"]:
            line += " (cannot win at any remain ratio)"
        lines.append(line)
    if lines:
        first = next(c["predicted"] for c in changes if isinstance(c, dict) and isinstance(c.get("predicted"), dict))
        head = "reuse time model (this machine at compile"
        if _num(first.get("batch")) and _num(first.get("threads")):
            head += f", batch {int(first['batch'])}, {int(first['threads'])} threads"
        head += "; training measures and decides, --reuse-choose):"
        lines.insert(0, head)
    return lines
