"""An inference graph of an engine's model run over many rows with the engine's kernels and its
current parameter values (:meth:`~accelc.runtime.session.TrainingSession.infer`): e.g. a frozen
prefix of the network computed once over the training set, whose activations a variant then
trains on."""

from __future__ import annotations

import numpy as np
import torch

from ..compiler.errors import AccelcError, ort_message, show
from .executor import SegmentedRunner
from .layout import in_layout
from .ort_options import session_options


def run_forward(sess, model, x: np.ndarray, output: str, chunk: int = 256) -> np.ndarray:
    """``output`` of ``model`` for every row of ``x`` (fed to the graph's first input; every other
    input is a parameter the session holds), computed ``chunk`` rows at a time without gradients,
    as one float32 array with a row per row of ``x`` (NCHW; the kernels run in the layout the
    training step chose)."""
    data = model.graph.input[0].name
    params = [i.name for i in model.graph.input[1:]]
    missing = [p for p in params if p not in sess.params]
    if missing:
        raise AccelcError(
            f"the inference graph needs inputs the session does not hold: {', '.join(map(show, missing[:5]))}"
        )
    try:
        engine = sess._eval_engine(model, session_options(sess.exec.threads))
    except AccelcError:
        raise
    except Exception as e:
        raise AccelcError(f"ONNX Runtime cannot load the inference graph: {ort_message(e)}") from None
    out = None  # a CPU tensor the rows are copied into (its numpy view is returned)
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            rows = np.ascontiguousarray(x[i : i + chunk], dtype=np.float32)
            if isinstance(engine, SegmentedRunner):
                # in the layout the training step chose (NHWC pools and BatchNorm are much faster where
                # it won); the copy into ``out`` makes the rows dense NCHW
                xt = in_layout(torch.from_numpy(rows).to(sess.device), sess.layouts.last)
                feeds = {data: xt, **{p: sess.params[p] for p in params}}
                outs, _ = engine.run(feeds)
                y = outs[output]
            else:
                feeds = {data: rows, **{p: sess.params[p].detach().cpu().numpy() for p in params}}
                (y,) = engine.run([output], feeds)
                y = torch.from_numpy(np.asarray(y, dtype=np.float32))
            if out is None:
                out = torch.empty((len(x), *y.shape[1:]), dtype=torch.float32)
            out[i : i + len(y)].copy_(y)
    return out.numpy() if out is not None else np.empty((0,), np.float32)
