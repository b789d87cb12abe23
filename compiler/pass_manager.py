"""Pass contract, registry and manager.

A pass is a class with a ``name``, a one-line ``summary``, the ``paper`` it implements,
documented ``options`` and ``run(artifacts, options) -> PassResult``. It edits the training graph
through :class:`~accelc.compiler.graph.TrainingGraph`, tags every node it adds or changes, and may
declare ``self_check(before, after, options)``, a numeric check that runs after it.

After every pass the manager validates the result: ONNX shape inference on the training graph,
ORT sessions created for the training and eval models, then the pass's self-check.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import onnx

from .artifacts import Artifacts
from .errors import AccelcError, ort_message


@dataclass
class Option:
    """A documented pass option. ``parse`` turns the CLI string into a value (raise ValueError if bad)."""

    default: Any
    help: str
    parse: Callable[[str], Any] = str
    flag: str | None = None  # CLI flag, e.g. "--skip-layers"; default --<pass>-<option>


# ---------------------------------------------------------------- option parsers shared by passes
def choice(*values: str):
    """Parser: one of ``values`` ('choose from a, b')."""
    def parse(text):
        if text not in values:
            raise ValueError(f"choose from {', '.join(values)}")
        return text
    return parse


def int_at_least(low: int):
    """Parser: an integer >= ``low``."""
    def parse(text):
        v = int(text)
        if v < low:
            raise ValueError(f"must be an integer >= {low}")
        return v
    return parse


def name_list(text):
    """Parser: comma-separated names (a list passes through)."""
    if isinstance(text, (list, tuple)):
        return list(text)
    return [s.strip() for s in str(text).split(",") if s.strip()]


@dataclass
class PassResult:
    artifacts: Artifacts
    modified: bool
    changes: list = field(default_factory=list)  # JSON-ready records of what changed


class Pass:
    name: str = ""
    summary: str = ""
    paper: str = ""
    options: dict[str, Option] = {}

    def run(self, artifacts: Artifacts, options: dict) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def self_check(self, before: Artifacts, after: Artifacts, options: dict) -> str | None:
        """Numeric check of the rewrite; return a short description of what was checked, or None."""
        return None

    def resolve_options(self, given: dict) -> dict:
        unknown = set(given) - set(self.options)
        if unknown:
            raise AccelcError(f"pass '{self.name}' has no option(s) {sorted(unknown)}; "
                              f"valid: {', '.join(self.options) or 'none'}")
        out = {}
        for k, opt in self.options.items():
            v = given.get(k, opt.default)
            if isinstance(v, str) and opt.parse is not str:
                try:
                    v = opt.parse(v)
                except (ValueError, TypeError) as e:
                    raise AccelcError(f"bad value '{given[k]}' for {opt.flag or '--' + self.name + '-' + k}: {e}") from None
            out[k] = v
        return out


REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    REGISTRY[cls.name] = cls
    return cls


def available() -> dict[str, type[Pass]]:
    from .. import passes  # noqa: F401  (registers the passes)
    return dict(REGISTRY)


def parse_pass_list(text: str | None) -> list[str]:
    if text is None or text.strip() in ("", "none"):
        return []
    names = [p.strip() for p in text.split(",") if p.strip()]
    reg = available()
    bad = [n for n in names if n not in reg]
    if bad:
        raise AccelcError(f"unknown pass(es) {', '.join(bad)}; available: {', '.join(reg) or 'none'} (or 'none')")
    if len(set(names)) != len(names):
        raise AccelcError(f"a pass is listed twice in --passes {text}")
    check_order(names)
    return names


# The order passes compose in: rescale makes the low-resolution stage that every later pass also
# rewrites; reuse replaces Conv/ConvGrad; skip instruments (and prunes) whatever backward is left,
# so a reused layer that is skipped loses its backward too.
PASS_ORDER = ("opt", "rescale", "reuse", "skip")


def check_order(names: list[str]) -> None:
    ranked = [n for n in names if n in PASS_ORDER]
    want = sorted(ranked, key=PASS_ORDER.index)
    if ranked != want:
        raise AccelcError(f"passes compose only in the order {', '.join(PASS_ORDER[1:])}: give --passes "
                          f"{','.join(want)} (got {','.join(ranked)}); rescale's low-resolution stage is "
                          f"rewritten by the passes after it, and skip prunes the backward reuse leaves")


def random_feeds(session, art: Artifacts, rng, params: str = "random", batch: int = 2) -> dict:
    """Feeds for a raw training graph: random data and labels, lazy_reset_grad true, parameters
    random (uniform ±0.1) or constant 0.01 (cheapest: enough to exercise every kernel)."""
    import numpy as np
    feeds = {}
    for i in session.get_inputs():
        if i.name == "labels":
            feeds[i.name] = rng.integers(0, art.info.num_classes, batch).astype(np.int64)
        elif i.type == "tensor(bool)":
            feeds[i.name] = np.array([True])
        elif i.name == art.info.input_name:
            feeds[i.name] = rng.standard_normal([batch, *art.info.input_shape]).astype(np.float32)
        else:
            shape = [batch if not isinstance(d, int) else d for d in i.shape]
            if params == "constant" or i.name.endswith("_grad.accumulation.buffer"):
                feeds[i.name] = np.full(shape, 0.01 if params == "constant" else 0.0, np.float32)
            else:
                feeds[i.name] = (rng.random(shape, dtype=np.float32) - 0.5) * 0.2
    return feeds


def run_lowered(art: Artifacts, model, feeds) -> dict:
    """Run a training graph once with its accumulators lowered away: {output: value} for the loss,
    logits, gradients and statistics
    (InPlaceAccumulatorV2 outputs only a flag, so the raw graph's outputs carry no gradients)."""
    import onnxruntime as ort

    from ..runtime.session import lower_training_model
    model, _ = lower_training_model(model, art.info.output_name)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    outs = sess.run(None, {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}})
    return dict(zip([o.name for o in sess.get_outputs()], outs))


def _validate_in_process(art: Artifacts) -> dict:
    import numpy as np
    import onnxruntime as ort
    try:
        onnx.shape_inference.infer_shapes(art.training, strict_mode=False)
    except Exception as e:
        raise AccelcError(f"shape inference failed on the rewritten training graph: {str(e).splitlines()[0]}") from None
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sessions = {}
    for name, m in (("training", art.training), ("eval", art.eval)):
        try:
            sessions[name] = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise AccelcError(f"ORT rejects the {name} model: {ort_message(e)}") from None
    # One forward+backward on a random batch of 2: constructs that crash ORT's kernels show up
    # here, in the child, rather than in the user's training run.
    feeds = random_feeds(sessions["training"], art, np.random.default_rng(0), params="constant")
    try:
        loss = sessions["training"].run(None, feeds)[0]
    except Exception as e:
        raise AccelcError(f"ORT fails to run the training graph: {ort_message(e)}") from None
    return {"ort_session": True, "shape_inference": True, "training_step": bool(np.all(np.isfinite(loss)))}


def validate(art: Artifacts) -> dict:
    """Shape inference, ORT sessions for the training and eval models and one training step on a
    random batch, in a forked child process: a native crash (ORT 1.19.2 can die with SIGFPE on
    some op combinations) becomes a clear compile-time error instead of killing accelc."""
    import json
    import os
    import signal
    t0 = time.perf_counter()
    if not hasattr(os, "fork"):
        out = _validate_in_process(art)
    else:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(r)
            import faulthandler
            faulthandler.disable()  # the parent reports a crash in one line; no dump on the terminal
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            code = 0
            try:
                res = _validate_in_process(art)
            except AccelcError as e:
                res, code = {"error": str(e)}, 3
            except BaseException as e:  # noqa: BLE001
                res, code = {"error": f"{type(e).__name__}: {e}"}, 4
            with os.fdopen(w, "w") as fh:
                fh.write(json.dumps(res))
            os._exit(code)
        os.close(w)
        with os.fdopen(r) as fh:
            payload = fh.read()
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            sig = signal.Signals(os.WTERMSIG(status)).name
            raise AccelcError(f"ONNX Runtime crashed ({sig}) while validating the training graph: the model uses a "
                              f"construct ORT Training 1.19.2 cannot run; run `accelc inspect` on it and report the "
                              f"layer types (not written)")
        out = json.loads(payload or "{}")
        if "error" in out:
            raise AccelcError(out["error"])
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


class PassManager:
    """Run passes in the given order, validating after each."""

    def __init__(self, names: list[str], options: dict[str, dict] | None = None, validate_each: bool = True):
        reg = available()
        check_order(list(names))
        self.passes = [reg[n]() for n in names]
        options = options or {}
        self.options = {p.name: p.resolve_options(options.get(p.name, {})) for p in self.passes}
        self.validate_each = validate_each

    def run(self, art: Artifacts) -> tuple[Artifacts, list[dict]]:
        records = []
        done = []
        for p in self.passes:
            opts = self.options[p.name]
            t0 = time.perf_counter()
            before = art
            old_stages = set(art.stages)
            result = p.run(art.copy(), opts)
            art = result.artifacts
            # Stages (rescale's low-resolution model) get the same rewrites as the main artifacts:
            # a new stage replays the passes that ran before it, an existing one gets this pass.
            for name in list(art.stages):
                todo = [q for q in done if q is not p] if name not in old_stages else [p]
                for q in todo:
                    st = art.stages[name]
                    art.stages[name] = q.run(st.copy(), self.options[q.name]).artifacts
                    art.stages[name].plan = []
            rec = {"name": p.name, "options": _jsonable(opts), "modified": result.modified,
                   "changes": result.changes, "seconds": round(time.perf_counter() - t0, 3)}
            if result.modified and self.validate_each:
                rec["validation"] = validate(art)
                check = p.self_check(before, art, opts)
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
