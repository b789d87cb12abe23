"""Which layers reuse at run time: only those where reuse measurably beats the exact convolution.

Adaptive deep reuse saves multiply-adds, but a reused layer also hashes, clusters, gathers and
scatters; on a CPU where oneDNN's convolution takes a few milliseconds, a reused layer can take
longer than the conv it replaces. With ``choose="measured"`` (the default) the run-time algorithm
(:mod:`.algorithm`) measures every candidate layer at the start of training, on real activations,
and keeps reuse only where it wins:

* **activations**: the training batch ``state.sample()`` gives, run through the forward of the
  training graph with every reuse node put back to its exact Conv (so BatchNorm normalises with
  the batch's statistics, as in training), with the current parameter values; the conv inputs of
  the candidate layers are extra graph outputs of a pruned copy of that graph (falling back to the
  eval model when the training graph cannot run on its own);
* **reuse**: forward + backward of the layer with the kernels the runtime runs (the native C
  kernels when they build, else the torch reference; the ONNX functions inside ORT with
  ``--kernel reuse=ort``) at the layer's setting (L, H, scope, input_grad). The same run gives the
  remain ratio (clusters / rows) and the relative output error against the exact conv;
* **exact**: forward + backward of the exact conv on torch/oneDNN (the kernels of the ``conv``
  node kernel) and as ORT's Conv + ConvGrad; the faster of the two is the baseline;
* medians of a few repeats after a warm-up, the three interleaved (drift hits all alike).

A layer keeps reuse when ``reuse_ms < margin × exact_ms``. The functions here are free of the
algorithm's state: :func:`judge` is the decision (pure, testable with injected timings),
:func:`measure_layers` the measurement.
"""

from __future__ import annotations

import math
import time

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h

from ...compiler.graph import pruned
from .options import DEFAULT_MARGIN, MODES  # noqa: F401  (MODES: the choice's modes)
from .spec import ConvGeom, ReuseSpec, make_planes

ENGINES = {"onednn": "oneDNN", "ort": "ORT"}  # exact-conv engines, as the lines name them


class NotMeasurable(Exception):
    """The measurement does not apply to this run (no data, no CPU engine): nothing is chosen."""


# --------------------------------------------------------------------------- the decision
def layer_line(layer: str, rec: dict) -> str:
    """``features.3: exact (reuse 21.4 ms vs exact 5.2 ms on oneDNN at remain ratio 0.31, error 0.22)``."""
    verdict = "reuse" if rec.get("chosen") else "exact"
    if rec.get("ruled_out") and rec.get("rule") == "expected":
        return (
            f"{layer}: exact (not measured: predicted {rec['predicted_reuse_ms']:.1f} ms reused at the expected "
            f"remain ratio {rec['expected_remain_ratio']:.2f} vs exact {rec['predicted_exact_ms']:.1f} ms, "
            f"{rec['predicted_exact_ms'] / rec['predicted_reuse_ms']:.2f}x, under 1/({rec['prefilter']:g} × margin))"
        )
    if rec.get("ruled_out"):
        return (
            f"{layer}: exact (not measured: predicted {rec['predicted_floor_ms']:.1f} ms reused even with no "
            f"clusters vs exact {rec['predicted_exact_ms']:.1f} ms, over {rec['prefilter']:g} × the margin)"
        )
    if rec.get("failed"):
        return f"{layer}: {verdict} (not measured: {rec['failed']})"
    engine = ENGINES.get(rec.get("exact_engine"), rec.get("exact_engine") or "?")
    text = f"{layer}: {verdict} (reuse {rec['reuse_ms']:.1f} ms vs exact {rec['exact_ms']:.1f} ms on {engine}"
    if rec.get("remain_ratio") is not None:
        text += f" at remain ratio {rec['remain_ratio']:.2f}"
        if rec.get("error") is not None:
            text += f", error {rec['error']:.2f}"
    return text + ")"


def judge(measurements: dict, margin: float) -> tuple[list, dict]:
    """The choice: layer -> measurement (``reuse_ms``, ``exact_ms``, ... or ``failed``) to the
    layers that keep reuse (in the given order) and layer -> record (the measurement with
    ``chosen`` and ``why`` added). A layer whose measurement failed stays exact: it has not
    shown that it wins."""
    chosen, records = [], {}
    for layer, m in measurements.items():
        rec = dict(m)
        ok = (
            not rec.get("failed")
            and not rec.get("ruled_out")
            and _finite(rec.get("reuse_ms"))
            and _finite(rec.get("exact_ms"))
            and rec["reuse_ms"] < margin * rec["exact_ms"]
        )
        if (
            not rec.get("failed")
            and not rec.get("ruled_out")
            and not (_finite(rec.get("reuse_ms")) and _finite(rec.get("exact_ms")))
        ):
            rec["failed"] = "no timing"
        rec["chosen"] = bool(ok)
        rec["why"] = layer_line(layer, rec)
        records[layer] = rec
        if ok:
            chosen.append(layer)
    return chosen, records


def summary_line(records: dict, chosen: list, margin: float, setting, note: str = "") -> str:
    """The decision's reason: what was measured, what was chosen, then every layer's line."""
    L, H = setting
    ruled = sum(1 for r in records.values() if r.get("ruled_out"))
    if records and ruled == len(records):  # nothing ran: the time model decided every layer
        head = f"predicted at L={L}, H={H}, margin {margin:g} (time model, nothing measured): "
    else:
        head = f"measured at L={L}, H={H}{note}, margin {margin:g}"
        head += f" ({ruled} of {len(records)} ruled out by the time model first): " if ruled else ": "
    if not records:
        return head + "no layer to measure"
    if chosen:
        exact = [k for k in records if k not in chosen]
        head += f"reuse on {', '.join(chosen)}" + (f"; exact {', '.join(exact)}" if exact else "")
    else:
        head += "no layer is faster reused; reuse off for this run (every conv exact)"
    return head + " — " + "; ".join(rec["why"] for rec in records.values())


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --------------------------------------------------------------------------- graphs
def conv_layer_model(pads, kernel, strides, dilations, mask=(True, True, True)):
    """A model running one layer's Conv (X, W, B -> Y) and ORT Training's ConvGrad (dY, X, W -> dX,
    dW, dB): the original layer, for side-by-side timings. ``mask``: the ConvGrad outputs wanted
    (None: the forward only)."""
    attrs = dict(pads=list(pads), kernel_shape=list(kernel), strides=list(strides), dilations=list(dilations))
    nodes = [h.make_node("Conv", ["X", "W", "B"], ["Y"], **attrs)]
    outs = ["Y"]
    ins = ["X", "W", "B"]
    if mask is not None:
        grads = [n if want else "" for n, want in zip(("dX", "dW", "dB"), mask)]
        nodes.append(h.make_node("ConvGrad", ["dY", "X", "W"], grads, domain="com.microsoft", group=1, **attrs))
        outs += [g for g in grads if g]
        ins.append("dY")
    graph = h.make_graph(
        nodes,
        "conv_layer",
        [h.make_tensor_value_info(n, T.FLOAT, None) for n in ins],
        [h.make_tensor_value_info(n, T.FLOAT, None) for n in outs],
    )
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    return m


def reuse_function_model(layer: str, geom: ConvGeom, spec: ReuseSpec, in_hw, backward: bool = True):
    """One reused layer as its portable ONNX functions (what ``--kernel reuse=ort`` runs)."""
    from .onnx_form import IR_VERSION, OPSET, build_reuse_functions
    from .spec import DOMAIN

    fwd, bwd = build_reuse_functions(layer, geom, spec, tuple(in_hw), DOMAIN)
    nodes = [h.make_node(fwd.name, ["X", "W", "B", "planes"], ["Y", "ids", "centroids", "counts"], domain=DOMAIN)]
    ins, outs = ["X", "W", "B", "planes"], ["Y"]
    if backward:
        nodes.append(
            h.make_node(bwd.name, ["dY", "X", "W", "ids", "centroids", "counts"], ["dX", "dW", "dB"], domain=DOMAIN)
        )
        ins.append("dY")
        outs += ["dX", "dW", "dB"]
    graph = h.make_graph(
        nodes,
        "reuse_layer",
        [h.make_tensor_value_info(n, T.FLOAT, None) for n in ins],
        [h.make_tensor_value_info(n, T.FLOAT, None) for n in outs],
    )
    m = h.make_model(
        graph,
        opset_imports=[h.make_opsetid("", OPSET), h.make_opsetid(DOMAIN, 1)],
        functions=[fwd] + ([bwd] if backward else []),
    )
    m.ir_version = IR_VERSION
    return m


def _session(model: onnx.ModelProto, threads: int | None):
    import onnxruntime as ort  # heavy: loaded for the measurement

    from ...runtime.session import session_options

    so = session_options(threads)
    # an ORT thread that spins after its run would steal the cores of the kernels timed next
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def forward_activations(models: list, feeds: dict, names: list, threads: int | None = None) -> tuple[dict, str]:
    """The values of ``names`` for one batch: from the first of ``models`` ((label, model) pairs,
    e.g. the training graph's forward, then the eval model) that runs. Returns (name -> array,
    label of the model used)."""
    errors = []
    for label, model in models:
        try:
            m = pruned(model, names)
            sess = _session(m, threads)
            wanted = [i.name for i in sess.get_inputs()]
            missing = [n for n in wanted if n not in feeds]
            if missing:
                raise KeyError(f"needs inputs {', '.join(missing[:3])}")
            vals = sess.run(names, {n: feeds[n] for n in wanted})
            return dict(zip(names, vals)), label
        except Exception as e:  # the next model; every reason is kept for the message
            errors.append(f"{label}: {' '.join(str(e).split())[:160] or type(e).__name__}")
    raise RuntimeError("no model gave the activations (" + "; ".join(errors) + ")")


# --------------------------------------------------------------------------- the layers of a graph
def conv_sites(model: onnx.ModelProto, layers) -> dict:
    """layer -> where it sits in ``model`` (a training graph without reuse nodes): its input
    tensor, weight and bias parameters, conv attributes and which ConvGrad outputs the graph uses
    (``mask``; None when the layer has no ConvGrad, e.g. skipped)."""
    from ...compiler.graph import TrainingGraph

    tg = TrainingGraph(model, {})
    out = {}
    for layer in tg.layers:
        if layer.name not in layers or layer.op != "Conv":
            continue
        a = dict(layer.forward.attrs)
        grads = [b for b in layer.backward if b.op == "ConvGrad"]
        mask = None
        if grads:
            o = [t.name for t in grads[0].outputs] + [""] * 3
            mask = tuple(bool(n) for n in o[:3])
        out[layer.name] = {
            "x": layer.input,
            "w": layer.params[0],
            "b": layer.params[1] if len(layer.params) > 1 else None,
            "attrs": a,
            "mask": mask,
        }
    return out


def site_geom(site: dict, wshape) -> ConvGeom:
    a = site["attrs"]
    pads = tuple(int(p) for p in a.get("pads", [0, 0, 0, 0]))
    return ConvGeom(
        C=int(wshape[1]),
        Co=int(wshape[0]),
        kh=int(wshape[2]),
        kw=int(wshape[3]),
        stride=tuple(int(s) for s in a.get("strides", [1, 1])),
        pads=pads,
        dilation=tuple(int(d) for d in a.get("dilations", [1, 1])),
    )


def conv_node(geom: ConvGeom) -> onnx.NodeProto:
    return h.make_node(
        "Conv",
        ["X", "W", "B"],
        ["Y"],
        pads=list(geom.pads),
        strides=list(geom.stride),
        dilations=list(geom.dilation),
        kernel_shape=[geom.kh, geom.kw],
    )


# --------------------------------------------------------------------------- timing
def time_layer(
    layer: str,
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None,
    geom: ConvGeom,
    setting: dict,
    mask,
    impl: str,
    threads: int | None = None,
    repeats: int = 5,
    warmup: int = 1,
    budget_s: float = 20.0,
    clock=time.perf_counter,
    margin: float = DEFAULT_MARGIN,
) -> dict:
    """Forward + backward of one layer reused (``impl``) and exact (torch/oneDNN and ORT), medians
    of ``repeats`` interleaved rounds after ``warmup`` (fewer rounds, at least one, when the
    rounds pass ``budget_s``; at least :data:`CLEAR_ROUNDS` when they already decide the layer
    beyond noise, see :func:`_clear`). Returns the measurement record (milliseconds)."""
    import torch

    from ...runtime.torch_ops import Conv2d
    from .kernels import backward_torch, cluster_torch, forward_torch, hash_buckets
    from .node import reuse_backward, reuse_forward

    L = int(min(int(setting["L"]), geom.K))
    spec = ReuseSpec(L, int(setting["H"]), setting["scope"], setting["input_grad"])
    planes_np = make_planes(spec.chunks(geom.K), spec.L, spec.H, int(setting["seed"]))
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    wt = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    bias = np.zeros(geom.Co, np.float32) if b is None else np.ascontiguousarray(b, dtype=np.float32)
    bt = torch.from_numpy(bias)
    planes = torch.from_numpy(planes_np)
    ho, wo = geom.out_hw(x.shape[2], x.shape[3])
    dy_np = np.random.default_rng(0).standard_normal((x.shape[0], geom.Co, ho, wo), dtype=np.float32)
    dy_np *= 1.0 / math.sqrt(dy_np[0].size)
    dyt = torch.from_numpy(dy_np)
    backward, need = mask is not None, (False, False, False) if mask is None else tuple(mask)
    exact = Conv2d(conv_node(geom))
    with torch.no_grad():
        y_exact = exact.forward(xt, wt, bt)
    out = {}

    def run_exact():
        with torch.no_grad():
            exact.forward(xt, wt, bt)
            if backward:
                exact.backward(dyt, xt, wt, list(need))

    table = None  # clusters kept across batches (set below for a CR layer)
    if impl == "ort":
        run_reuse = _ort_runner(
            reuse_function_model(layer, geom, spec, x.shape[2:4], backward),
            threads,
            {"X": xt.numpy(), "W": wt.numpy(), "B": bias, "planes": planes_np, **({"dY": dy_np} if backward else {})},
        )
        # remain ratio and error from the torch reference: the same mathematics as the functions
        with torch.no_grad():
            ids, offs = cluster_torch(hash_buckets(xt, planes, geom, spec), spec.H, spec.scope)
            y_r, ctx = forward_torch(xt, wt, bt, ids, offs, geom, spec)
            if backward:
                backward_torch(dyt, xt, wt, ctx, geom, spec)
        out["remain_ratio"], out["error"] = ctx.remain_ratio, _rel_err(y_r, y_exact)
    else:
        last: dict = {}
        every = int(setting.get("cross_batch", 0) or 0)
        if every >= 2:  # clusters kept across batches: reuse batches timed here, a refresh below
            from .cross import ClusterTable
            from .cross import forward as cross_forward

            table = ClusterTable(10**9)
            with torch.no_grad():
                cross_forward(xt, wt, bt, planes, geom, spec, table, impl=impl)  # the refresh batch

        def run_reuse():
            with torch.no_grad():
                if table is not None:
                    y, ctx = cross_forward(xt, wt, bt, planes, geom, spec, table, impl=impl)
                else:
                    y, ctx = reuse_forward(xt, wt, bt, planes, geom, spec, impl=impl)
                if backward:
                    reuse_backward(dyt, xt, wt, ctx, geom, spec, impl=impl, need_dx=need[0], need_dw=need[1])
            last["y"], last["ctx"] = y, ctx  # the error is computed once, after the timed rounds

    run_ort = _ort_runner(
        conv_layer_model(geom.pads, (geom.kh, geom.kw), geom.stride, geom.dilation, mask if backward else None),
        threads,
        {"X": xt.numpy(), "W": wt.numpy(), "B": bias, **({"dY": dy_np} if backward else {})},
    )
    runs = {"reuse": run_reuse, "onednn": run_exact, "ort": run_ort}
    # a layer keeping clusters across batches is timed every round (its refresh is mixed in below)
    times = _interleaved(runs, warmup, repeats, budget_s, clock, margin if table is None else None)
    ms = {k: float(np.median(v) * 1e3) for k, v in times.items()}
    if impl != "ort":
        out["remain_ratio"], out["error"] = last["ctx"].remain_ratio, _rel_err(last["y"], y_exact)
    if impl != "ort" and table is not None:
        _mix_refresh(table, run_reuse, clock, ms, every, out)
    engine = min(("onednn", "ort"), key=lambda k: ms[k])
    return {
        "reuse_ms": ms["reuse"],
        "exact_ms": ms[engine],
        "exact_engine": engine,
        "onednn_ms": ms["onednn"],
        "ort_ms": ms["ort"],
        "remain_ratio": out.get("remain_ratio"),
        "error": out.get("error"),
        "L": spec.L,
        "H": spec.H,
        "impl": impl,
        "batch": int(x.shape[0]),
        "input_hw": [int(x.shape[2]), int(x.shape[3])],
        "backward": backward,
        "repeats": len(times["reuse"]),
        **(
            {"cross_batch": every, "refresh_ms": out["refresh_ms"], "kept_ms": out["kept_ms"]}
            if "refresh_ms" in out
            else {}
        ),
    }


def _ort_runner(model, threads, feeds: dict):
    """A call that runs ``model`` on ``feeds`` in an ORT session (built once, here)."""
    sess = _session(model, threads)
    return lambda: sess.run(None, feeds)


def _interleaved(runs: dict, warmup: int, repeats: int, budget_s: float, clock, margin: float | None) -> dict:
    """Seconds of each run per round, the runs interleaved in every round, after ``warmup``
    rounds: ``repeats`` rounds, fewer (at least one) past ``budget_s``, and (``margin`` given) as
    soon as the rounds decide the layer beyond noise (:func:`_clear`)."""
    times: dict = {k: [] for k in runs}
    start = clock()
    for r in range(max(0, warmup) + max(1, repeats)):
        for k, fn in runs.items():
            t = clock()
            fn()
            if r >= warmup:
                times[k].append(clock() - t)
        if r >= warmup and clock() - start > budget_s:
            break
        if margin is not None and len(times["reuse"]) >= CLEAR_ROUNDS and _clear(times, margin):
            break  # no further round could change the verdict
    return times


def _mix_refresh(table, run_reuse, clock, ms: dict, every: int, out: dict) -> None:
    """Clusters kept across batches: one step in ``every`` refreshes the table, so the layer's
    time per step is their mix (the reuse batches timed before see the batch that built the
    table: none of their rows is new). Sets ``ms["reuse"]`` and records both parts in ``out``."""
    refresh = []
    for _ in range(2):
        table.reset()
        t = clock()
        run_reuse()
        refresh.append(clock() - t)
    out["refresh_ms"] = float(min(refresh) * 1e3)
    out["kept_ms"] = ms["reuse"]
    ms["reuse"] = (out["refresh_ms"] + (every - 1) * ms["reuse"]) / every


CLEAR_ROUNDS = 2  # rounds before a measurement may stop early
CLEAR_FACTOR = 1.25  # ... when every reused run is this much slower than every exact one, or faster


def _clear(times: dict, margin: float = DEFAULT_MARGIN) -> bool:
    """Whether the rounds so far decide the layer beyond noise: the fastest reused run is
    CLEAR_FACTOR× slower than margin × the slowest exact one (the faster engine of each round), or
    the slowest reused run CLEAR_FACTOR× faster than margin × the fastest exact one."""
    exact = [min(a, b) for a, b in zip(times["onednn"], times["ort"])]
    return min(times["reuse"]) >= CLEAR_FACTOR * margin * max(exact) or CLEAR_FACTOR * max(times["reuse"]) <= (
        margin * min(exact)
    )


def _rel_err(a, b) -> float:
    a = a.detach().double()
    b = b.detach().double()
    return float((a - b).norm() / max(float(b.norm()), 1e-12))


def measure_layers(
    art,
    params: dict,
    x: np.ndarray,
    y: np.ndarray,
    settings: dict,
    impl: str,
    threads: int | None = None,
    repeats: int = 5,
    warmup: int = 1,
    budget_s: float = 60.0,
    timer=time_layer,
    margin: float = DEFAULT_MARGIN,
) -> dict:
    """layer -> measurement (see :func:`time_layer`; ``{"failed": reason}`` for a layer that could
    not be measured) of every layer in ``settings`` (layer -> L, H, scope, input_grad, seed), on
    the activations of batch (x, y) through ``art``'s graphs with the parameter values ``params``."""
    from .onnx_form import strip

    plain = strip(art.training)
    sites = conv_sites(plain, set(settings))
    out = {k: {"failed": "not a conv of this graph"} for k in settings if k not in sites}
    todo = [k for k in settings if k in sites]
    if not todo:
        return out
    feeds = {k: np.ascontiguousarray(v) for k, v in params.items()}
    feeds[art.info.input_name] = np.ascontiguousarray(x, dtype=np.float32)
    feeds["labels"] = np.ascontiguousarray(y, dtype=np.int64)
    names = list(dict.fromkeys(sites[k]["x"] for k in todo))
    acts, source = forward_activations([("training forward", plain), ("eval model", art.eval)], feeds, names, threads)
    deadline = time.perf_counter() + budget_s
    for layer in todo:
        s = sites[layer]
        try:
            w = params[s["w"]]
            b = params.get(s["b"]) if s["b"] else None
            xa = np.asarray(acts[s["x"]], dtype=np.float32)
            if xa.ndim != 4 or np.ndim(w) != 4:
                raise ValueError(f"input {xa.shape}, weight {np.shape(w)}: not a 2-D conv")
            geom = site_geom(s, np.shape(w))
            left = max(deadline - time.perf_counter(), 0.0) / max(len(todo) - todo.index(layer), 1)
            args = (layer, xa, w, b, geom, settings[layer], s["mask"], impl, threads, repeats, warmup, left)
            rec = timer(*args, margin=margin) if timer is time_layer else timer(*args)
            rec["activations"] = source
            out[layer] = rec
        except Exception as e:  # one layer's failure leaves that layer exact, never stops training
            out[layer] = {"failed": f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"}
    return {k: out[k] for k in settings}
