"""Validation of an artifact set: shape inference, ORT sessions for the training and eval models
and one training step on a random batch, in a forked child process, so that a native crash (ORT
1.19.2 can die with SIGFPE on some op combinations) becomes a clear compile-time error instead of
killing accelc. Also the helpers numeric self-checks share (random feeds, running a training graph
with its accumulators lowered away)."""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import time
import zlib

import numpy as np
import onnx

from .artifacts import Artifacts
from .errors import AccelcError, exception_text, ort_message
from .lowering import lower_training_model
from .model import check_step_memory
from .resources import fmt_bytes, max_threads, memory_limit

VALIDATION_BATCH = 2  # the batch of the validation step and of the passes' numeric self-checks


def random_feeds(session, art: Artifacts, rng, params: str = "random", batch: int = VALIDATION_BATCH) -> dict:
    """Feeds for a raw training graph: random data and labels, lazy_reset_grad true, parameters
    random (uniform ±0.1) or constant 0.01 (cheapest: enough to exercise every kernel)."""
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
                # a 0-d parameter (a learnt scale) must be fed as a 0-d array, not a numpy scalar
                feeds[i.name] = np.asarray((rng.random(shape, dtype=np.float32) - 0.5) * 0.2, np.float32)
    return feeds


# Random ops and the type of their ``seed`` attribute (ONNX: int for Dropout, float otherwise).
RANDOM_OPS = {
    "Dropout": int,
    "RandomUniformLike": float,
    "RandomNormalLike": float,
    "RandomUniform": float,
    "RandomNormal": float,
    "Bernoulli": float,
    "Multinomial": float,
}


def seed_random_ops(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose random ops (active dropout, stochastic depth) draw from a seed of
    their own, taken from the node's name: two graphs that differ only by a rewrite then draw the
    same masks, whatever order their nodes run in, so a numeric check compares like with like."""
    if not any(n.op_type in RANDOM_OPS for n in model.graph.node):
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in m.graph.node:
        kind = RANDOM_OPS.get(n.op_type)
        if kind is not None:
            keep = [a for a in n.attribute if a.name != "seed"]
            del n.attribute[:]
            n.attribute.extend(keep)
            n.attribute.append(onnx.helper.make_attribute("seed", kind(zlib.crc32(n.name.encode()) % 65536)))
    return m


def run_lowered(art: Artifacts, model, feeds) -> dict:
    """Run a training graph once with its accumulators lowered away: {output: value} for the loss,
    logits, gradients and statistics
    (InPlaceAccumulatorV2 outputs only a flag, so the raw graph's outputs carry no gradients).
    Random ops are seeded (:func:`seed_random_ops`): the result is a function of the feeds."""
    import onnxruntime as ort  # heavy: loaded when a check runs

    model, _ = lower_training_model(seed_random_ops(model), art.info.output_name)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    outs = sess.run(None, {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}})
    return dict(zip([o.name for o in sess.get_outputs()], outs))


def _validate_in_process(art: Artifacts) -> dict:
    import onnxruntime as ort  # heavy: loaded when a check runs

    try:
        onnx.shape_inference.infer_shapes(art.training, strict_mode=False)
    except Exception as e:
        raise AccelcError(f"shape inference failed on the rewritten training graph: {exception_text(e)}") from None
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


def _limit_child_memory(limit: int) -> None:
    """Backstop for the shape-based estimate (shapes shape inference cannot tell count 0): cap the
    child's address space at what it maps now plus the memory limit, so an allocation past it
    fails inside ORT (a clear error) instead of swapping the machine."""
    try:
        import resource

        with open("/proc/self/statm") as fh:
            mapped = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        # room for thread stacks and malloc arenas (address space, mostly never touched)
        cap = mapped + limit + (1 << 30) + (128 << 20) * max_threads()
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        if soft == resource.RLIM_INFINITY or soft > cap:
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (ImportError, OSError, ValueError):
        pass


def validate(art: Artifacts, memory_limit_gb: float | None = None) -> dict:
    """Shape inference, ORT sessions for the training and eval models and one training step on a
    random batch, in a forked child process: a native crash (ORT 1.19.2 can die with SIGFPE on
    some op combinations) becomes a clear compile-time error instead of killing accelc.

    The step's memory is estimated from the shapes first and refused over ``memory_limit_gb``
    (default: :func:`accelc.compiler.resources.memory_limit`), before anything is allocated."""
    return validate_all([art], memory_limit_gb)[0]


def validate_all(arts: list[Artifacts], memory_limit_gb: float | None = None) -> list[dict]:
    """:func:`validate` each artifact set (a model and its stages), their children running at the
    same time (each builds its own ORT sessions; the parent only waits). The first refusal in
    ``arts``' order is raised, after every child has ended. Each result's ``seconds`` is the wall
    time of the whole group."""
    t0 = time.perf_counter()
    for art in arts:  # every estimate before any child starts
        check_step_memory(art.info, VALIDATION_BATCH, memory_limit_gb, "validating the model")
    if not hasattr(os, "fork"):
        outs = [_validate_in_process(art) for art in arts]
    else:
        limit = memory_limit(memory_limit_gb)
        children = [_spawn(art, limit) for art in arts]
        results = [_collect(pid, r) for pid, r in children]
        for res in results:
            if isinstance(res, AccelcError):
                raise res
        outs = results
    for out in outs:
        out["seconds"] = round(time.perf_counter() - t0, 3)
    return outs


def _spawn(art: Artifacts, limit: int) -> tuple[int, int]:
    """Fork the child that validates ``art``; returns (pid, read end of its result pipe)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)

        faulthandler.disable()  # the parent reports a crash in one line; no dump on the terminal
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        _limit_child_memory(limit)
        code = 0
        try:
            res = _validate_in_process(art)
        except AccelcError as e:
            res, code = {"error": str(e)}, 3
        except MemoryError:
            res, code = (
                {
                    "error": f"validating the model ran out of memory (limit {fmt_bytes(limit)}; "
                    "raise it with --memory-limit GB if this machine has the memory)"
                },
                3,
            )
        except BaseException as e:  # noqa: BLE001
            res, code = {"error": f"{type(e).__name__}: {e}"}, 4
        with os.fdopen(w, "w") as fh:
            fh.write(json.dumps(res))
        os._exit(code)
    os.close(w)
    return pid, r


def _collect(pid: int, r: int) -> dict | AccelcError:
    """The child's result, or the refusal it ends in (returned, so that every child is reaped)."""
    with os.fdopen(r) as fh:
        payload = fh.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status)).name
        return AccelcError(
            f"ONNX Runtime crashed ({sig}) while validating the training graph: the model uses a "
            f"construct ORT Training 1.19.2 cannot run; run `accelc inspect` on it and report the "
            f"layer types (not written)"
        )
    try:
        out = json.loads(payload or "{}")
    except ValueError:
        return AccelcError("validating the model failed: its checking process sent no result")
    if "error" in out:
        return AccelcError(out["error"])
    return out
