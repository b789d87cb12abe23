"""The training session: one model's parameters and optimizer state, run on ORT.

Design (and why not ``onnxruntime.training.api.Module``/``Optimizer``): the passes swap between
compiled *variants* of one model between epochs (fewer trained parameters, other shapes), carrying
every parameter value and the optimizer state exactly; ORT's Module binds a fixed trainable set and
hides the moments in its CheckpointState, so a swap would be a lossy round trip. Here:

* the artifact's ``training_model.onnx`` runs in an ORT InferenceSession (the training kernels —
  ConvGrad, ReluGrad, BatchNormInternal, ... — are ORT Training's own). The gradient-accumulator
  nodes are lowered away (with ``lazy_reset_grad`` true they are identities), and gradients are
  written straight into preallocated buffers through IOBinding;
* parameters live in torch tensors that ORT reads in place (zero copy, CPU or CUDA; NCHW for ORT,
  NHWC convolution weights while accelc's engine runs a step NHWC: ``layout.params_in_layout``);
* the optimizer step is the artifact's own optimizer op (AdamW mode 0/1 or SGD, hyper-parameters
  read from ``optimizer_model.onnx``) computed with torch tensor ops, in place;
* BatchNorm running statistics, which ORT's training graph computes but never writes back, are
  copied back after each step (ORT's own Module leaves them at their initial values).

A variant swap replaces only the ORT session; parameters and optimizer state stay where they are.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch

from ..compiler.artifact_dir import load_artifacts
from ..compiler.artifacts import Artifacts, optimizer_hyperparameters
from ..compiler.errors import AccelcError, ort_message, show
from ..compiler.graph import pruned
from ..compiler.lowering import lower_training_model
from ..compiler.model import activation_bytes
from ..compiler.ort_checkpoint import read_parameters
from .config import ExecConfig
from .engine import EngineBase, ParamUpdate, StepResult
from .executor import SegmentedRunner, claimed, fell_back, prepared
from .kernels import SKIP_UPDATE, Bound
from .layout import NCHW, Layouts, in_layout, params_in_layout
from .optim import load_optimizer_state_arrays, make_optimizer, optimizer_state_arrays
from .ort_options import SHRINK_FROM_BYTES, run_options, session_options  # noqa: F401  (the session's API)


def read_checkpoint_params(checkpoint: bytes) -> dict[str, np.ndarray]:
    """All parameters (trainable and frozen) of an ORT checkpoint, as float32 numpy arrays of their
    own, in ORT's order (by name). Read by accelc's own checkpoint reader (no ORT Training needed:
    compiler/ort_checkpoint.py); a damaged file is one AccelcError line."""
    return {name: np.asarray(v, dtype=np.float32) for name, v in read_parameters(checkpoint).items()}


class TrainingSession(EngineBase):
    """Owns one model's parameters, optimizer state and the ORT sessions of its current variant
    (the :class:`~accelc.runtime.engine.Engine` protocol on ONNX Runtime)."""

    # what :meth:`_build` sets: read before the first build of a lazy session, they build it
    _BUILT = frozenset(
        {"runner", "train_sess", "eval_sess", "desc", "train_inputs", "eval_inputs", "eval_outputs", "trained",
         "grads", "_grad_param", "bn_buf", "bn_inv_std", "bn_spatial"}
    )  # fmt: skip

    def __init__(
        self,
        artifacts: str | Path | Artifacts,
        config: ExecConfig | None = None,
        lr: float | None = None,
        lazy: bool = False,
    ):
        """``lazy``: build the ONNX Runtime sessions when first needed (a step, an evaluation,
        :meth:`ready`), so a variant an algorithm swaps in before training starts is the only
        one built."""
        if isinstance(artifacts, Artifacts):
            art, report = artifacts, {"options": artifacts.config}
        else:
            art, report = load_artifacts(artifacts)
        self.exec = config or ExecConfig()
        self.exec.check()
        if self.exec.threads:  # accelc's own kernels (oneDNN through torch) share the bound with ORT
            torch.set_num_threads(self.exec.threads)
        self.device = self._check_device(self.exec.device)
        self._check_cuda_kernels(art)  # before anything is put on the GPU
        self.info = art.info
        self.config = dict(report.get("options", {}))
        self.lr = float(lr if lr is not None else self.config.get("lr", 1e-3))
        values = read_checkpoint_params(art.checkpoint)
        self.params: dict[str, torch.Tensor] = {
            k: torch.from_numpy(v).to(self.device).contiguous() for k, v in values.items()
        }
        self.trainable_all = [p for p in art.info.params if p in self.params]
        self.hyper = optimizer_hyperparameters(art.optimizer)
        self.optimizer = make_optimizer([self.params[p] for p in self.trainable_all], self.hyper, self.lr)
        self.variant_name = "base"
        self.steps = 0
        self.reducer = None  # data-parallel training: the gradient all-reduce (runtime.distributed)
        self.world_size = 1
        self._stats_of = None  # (variant, its BatchNorm-statistics forward): recalibrate_batchnorm
        self._pending = None
        self._run_opts = {}  # (variant's info, batch) -> ORT run options
        self._stats_lowered = None  # (variant, its lowered training graph and description)
        self.layouts = Layouts(self.exec.layout)  # the activations' layout (runtime.layout)
        if lazy:
            self.artifacts, self._pending = art, art
        else:
            self._build(art)

    def __getattr__(self, name):
        # only reached for attributes not set: those of the sessions of a lazy, unbuilt variant
        pending = self.__dict__.get("_pending")
        if pending is not None and name in TrainingSession._BUILT and not self.__dict__.get("_building"):
            self._build(pending)
            return getattr(self, name)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def ready(self) -> None:
        """Build the current variant's sessions now (a lazy session builds them when first used)."""
        if self.__dict__.get("_pending") is not None:
            self._build(self._pending)

    @property
    def optimizer_kind(self) -> str:
        return str((self.hyper or {}).get("kind", "adamw"))

    @property
    def collective(self):
        """The data-parallel process group (None when training alone)."""
        return None if self.reducer is None else self.reducer.group

    def allreduce_report(self) -> dict | None:
        if self.reducer is None:
            return None
        return {**self.reducer.stats(), "allreduce_alone_ms": self.reducer.measure()}

    def attach_reducer(self, reducer) -> None:
        """Train data-parallel: gradients live in ``reducer``'s buckets and are averaged across
        ranks after every backward, before the optimizer step (see :mod:`.distributed`)."""
        self.reducer = reducer
        self.world_size = reducer.group.world
        if self.__dict__.get("_pending") is None:  # a lazy session allocates them when it builds
            self._alloc_grads()

    @staticmethod
    def _check_device(device: str) -> str:
        if device == "cuda" and not torch.cuda.is_available():
            raise AccelcError("--device cuda needs a CUDA GPU that torch can use (torch.cuda.is_available() is False)")
        return device

    def _check_cuda_kernels(self, art: Artifacts) -> None:
        """On CUDA the whole step runs on accelc's kernels (torch's: cuDNN, cuBLAS), with no ORT
        Training CUDA build to run the rest: refuse, by op, artifacts whose training or evaluation
        graph has nodes no kernel runs on CUDA."""
        if self.device != "cuda":
            return
        lowered, _ = lower_training_model(art.training, art.info.output_name)
        fell = fell_back((lowered, art.eval), self.exec)
        if fell:
            ops = ", ".join(f"{show(op)}×{n}" for op, n in sorted(fell.items()))
            raise AccelcError(
                f"--device cuda: no CUDA kernel for {ops} (a CUDA step runs on accelc's kernels only; ORT "
                "Training has no CUDA build to run the rest): train these artifacts with --device cpu"
            )

    # ------------------------------------------------------------------ variants
    def _providers(self):
        if self.device == "cuda":
            return [("CUDAExecutionProvider", {"device_id": torch.cuda.current_device()}), "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def _build(self, art: Artifacts) -> None:
        self._building = True  # what is read while building is never built on demand
        try:
            self._build_sessions(art)
        finally:
            self._building = False

    def _build_sessions(self, art: Artifacts) -> None:
        import onnxruntime as ort  # heavy

        lowered, desc = lower_training_model(art.training, art.info.output_name)
        missing = [
            i.name
            for i in lowered.graph.input
            if i.name not in self.params and i.name not in (art.data_input, "labels")
        ]
        if missing:
            raise AccelcError(
                f"variant needs parameters this session does not hold: {', '.join(show(n) for n in missing[:5])}"
            )
        for i in lowered.graph.input:  # shape changes replace the parameter tensor (swap's update)
            tt = i.type.tensor_type
            # a 0-d parameter (a learnt scale) has a shape with no dimensions: compared too
            if i.name in self.params and tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
                want = tuple(d.dim_value for d in tt.shape.dim)
                if tuple(self.params[i.name].shape) != want:
                    raise AccelcError(
                        f"variant expects '{show(i.name)}' of shape {want}, session holds "
                        f"{tuple(self.params[i.name].shape)}; swap it with a ParamUpdate"
                    )
        so = session_options(self.exec.threads)
        lowered, owners = self._claim(lowered)
        try:
            if owners:
                self.runner = SegmentedRunner(lowered, so, self._providers(), self.exec, owners)
                self.train_sess = None
            else:
                self.runner = None
                self.train_sess = ort.InferenceSession(lowered.SerializeToString(), so, providers=self._providers())
            self.eval_sess = self._eval_engine(art.eval, so)
        except AccelcError:
            raise
        except Exception as e:  # ORT refusing a damaged or edited graph: its reason, in one line
            raise AccelcError(f"ONNX Runtime cannot load the artifacts' graphs: {ort_message(e)}") from None
        self.desc = desc
        self.train_inputs = [i.name for i in lowered.graph.input]
        if isinstance(self.eval_sess, SegmentedRunner):
            self.eval_inputs = list(self.eval_sess.inputs)
            self.eval_outputs = list(self.eval_sess.graph_outputs)
        else:
            self.eval_inputs = [i.name for i in self.eval_sess.get_inputs()]
            self.eval_outputs = [o.name for o in self.eval_sess.get_outputs()]
        self.trained = [p for p in self.trainable_all if p in desc["grads"]]
        self._alloc_grads()
        self.bn_buf = {o: torch.empty_like(self.params[p]) for o, p in desc["bn_stats"].items()}
        self.bn_inv_std = {b["inv_std"]: torch.empty_like(self.bn_buf[b["var_out"]]) for b in desc["bn"]}
        shapes = art.info.shapes(1)
        self.bn_spatial = {
            b["inv_std"]: int(np.prod(shapes[b["x"]][2:])) if b["x"] in shapes else None for b in desc["bn"]
        }
        for p in self.trainable_all:
            self.params[p].grad = None
        self.artifacts = art
        self._pending = None  # built: a failed build leaves it pending (the next use says why again)

    def engine_report(self) -> dict:
        """Where the current variant's training step runs (see ``SegmentedRunner.report``)."""
        if self.__dict__.get("_pending") is not None:
            return {"built": False}
        if self.runner is None:
            return {"kernel_nodes": 0, "ort_segments": 1, "fell_back": {"(whole graph)": 1}, "ort_ms_per_step": None}
        rep = self.runner.report()
        rep["layout"] = dict(self.layouts.report)
        rep["eval"] = "accelc" if isinstance(self.eval_sess, SegmentedRunner) else "ort"
        return rep

    def _claim(self, model):
        """``model`` after the providers' rewrites, and the nodes they claim (CUDA: every one)."""
        model = prepared(model, self.exec)
        return model, claimed(model, self.exec)

    def _eval_engine(self, graph, so):
        """The engine of an inference graph of this model (the evaluation graph or a part of it):
        accelc's kernels when they claim every node (parameters read in place), else ORT."""
        import onnxruntime as ort  # heavy

        model, owners = self._claim(graph)
        if owners and len(owners) == len(model.graph.node):
            return SegmentedRunner(model, so, self._providers(), self.exec, owners)
        return ort.InferenceSession(graph.SerializeToString(), so, providers=self._providers())

    def _alloc_grads(self) -> None:
        """Gradient buffers of the parameters this variant trains (ORT writes them in place)."""
        if self.reducer is not None:  # views into the all-reduce buckets
            self.grads = self.reducer.layout(
                {p: tuple(self.params[p].shape) for p in self.trained}, torch.float32, self.params_device()
            )
        else:
            self.grads = {p: torch.empty_like(self.params[p]) for p in self.trained}
        self._grad_param = {out: p for p, out in self.desc["grads"].items() if p in self.grads}

    def swap(self, variant: str | Path | Artifacts, name: str | None = None, update: ParamUpdate | None = None) -> None:
        """Switch to another compiled variant of this model, keeping parameters and optimizer state.

        ``update.params`` replaces parameter values (for variants with other shapes); the optimizer
        state of ``update.reset_optimizer_for`` parameters is dropped (moments do not carry across a
        shape change).
        """
        art = variant if isinstance(variant, Artifacts) else load_artifacts(variant)[0]
        self._check_cuda_kernels(art)
        update = update or ParamUpdate()
        for k, v in update.params.items():
            t = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).to(self.device)
            if k in self.params and self.params[k].shape == t.shape:
                self.params[k].copy_(t)
            else:
                old = self.params.get(k)
                self.params[k] = t
                if old is not None:
                    self._replace_in_optimizer(old, t)
        for k in update.reset_optimizer_for:
            self.optimizer.state.pop(self.params[k], None)
        self.variant_name = name or str(variant)
        self._param_key = None
        if self.__dict__.get("_pending") is not None:  # nothing built yet: build this one when needed
            self.artifacts = self._pending = art
            return
        self._build(art)

    def _replace_in_optimizer(self, old: torch.Tensor, new: torch.Tensor) -> None:
        for group in self.optimizer.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        self.optimizer.state.pop(old, None)
        scales = self.optimizer.lr_scales
        if old in scales:
            scales[new] = scales.pop(old)

    def _named_params(self) -> dict:
        return self.params

    # ------------------------------------------------------------------ steps
    def _bind(self, x: torch.Tensor, y: torch.Tensor):
        io = self.train_sess.io_binding()
        dev = "cuda" if self.device == "cuda" else "cpu"
        idx = torch.cuda.current_device() if self.device == "cuda" else 0

        def bind_in(name, t):
            io.bind_input(name, dev, idx, _np_dtype(t), tuple(t.shape), t.data_ptr())

        bind_in(self.artifacts.data_input, x)
        bind_in("labels", y)
        for n in self.train_inputs:
            if n in self.params:
                bind_in(n, self.params[n])
        io.bind_output(self.desc["loss"], dev, idx)
        if self.desc["logits"]:
            io.bind_output(self.desc["logits"], dev, idx)
        for name in self.desc["probes"]:  # scalar outputs added by passes
            io.bind_output(name, "cpu", 0)
        for p, out in self.desc["grads"].items():
            if p in self.grads:
                g = self.grads[p]
                io.bind_output(out, dev, idx, np.float32, tuple(g.shape), g.data_ptr())
        for o, buf in list(self.bn_buf.items()) + list(self.bn_inv_std.items()):
            io.bind_output(o, dev, idx, np.float32, tuple(buf.shape), buf.data_ptr())
        return io

    def _forward_backward(self, x, y, env_out: dict | None = None) -> StepResult:
        """Run the training graph once: gradients land in self.grads, BN statistics in their
        buffers. ``env_out`` (segmented runs only) receives every tensor of the step."""
        xt = torch.as_tensor(x).to(self.device, torch.float32).contiguous()
        yt = torch.as_tensor(y).to(self.device, torch.int64).contiguous()
        if self.runner is not None:
            return self._forward_backward_segmented(xt, yt, env_out)
        # Inputs are re-bound each step (the data buffer changes); params and grads stay put.
        self._params_layout(NCHW)  # ORT reads the buffers as NCHW
        io = self._bind(xt, yt)
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.train_sess.run_with_iobinding(io, self._run_options(len(xt)))
        outs = [o.numpy() for o in io.get_outputs()] if self.device == "cpu" else io.copy_outputs_to_cpu()
        loss = float(np.asarray(outs[0]).reshape(-1)[0])
        logits = outs[1] if self.desc["logits"] else None
        first = 2 if self.desc["logits"] else 1
        probes = {n: float(outs[first + k]) for k, n in enumerate(self.desc["probes"])}
        return StepResult(loss, logits, probes)

    def _feeds_bound(self, xt, yt) -> tuple[dict, dict]:
        feeds = {self.artifacts.data_input: xt, "labels": yt}
        feeds.update({n: self.params[n] for n in self.train_inputs if n in self.params})
        grads = {out: self.grads[p] for p, out in self.desc["grads"].items() if p in self.grads}
        bound = Bound(grads, adopt=grads if self.reducer is None else ())  # all-reduce: the buckets
        bound.update(self.bn_buf)
        bound.update(self.bn_inv_std)
        return feeds, bound

    def _layout(self, xt, yt) -> str:
        """The layout this step's activations run in (chosen at the first step of a batch shape
        under ``--layout auto``, by timing the step's forward and backward in both)."""
        # a variant with the same parameters (e.g. a pruned backward) keeps the layout measured for
        # an earlier one: the convolutions, which decide it, are the same
        if self.__dict__.get("_param_key") is None:  # after a swap or a load: shapes may differ
            self._param_key = tuple((n, tuple(p.shape)) for n, p in self.params.items())
        key = (self._param_key, tuple(xt.shape), str(xt.device), torch.get_num_threads())  # resumed elsewhere: new
        known = self.layouts.known(key)
        if known is not None:  # every step after a shape's first
            return known

        def run(layout):  # the forward and backward alone: what the real step then overwrites
            feeds, bound = self._feeds_bound(in_layout(xt, layout), yt)
            self.runner.run(feeds, bound, None, None, self._run_options(len(xt)))

        def act_bytes():
            try:
                return activation_bytes(self.artifacts.info, len(xt))
            except Exception:  # shapes unknown to inference: measured
                return None

        agree = None if self.reducer is None else self.reducer.group.broadcast_json
        kernels, prepare = self.runner.kernels.values(), self._params_layout  # params moved untimed
        return self.layouts.for_step(key, xt.dim(), act_bytes, kernels, run, agree, prepare)

    def _params_layout(self, layout: str) -> None:  # data-parallel: NCHW (grads are bucket views)
        if self.reducer is None:
            grads = self.__dict__.get("grads", {}).values()
            params_in_layout([*self.params.values(), *grads], self.optimizer.state, layout)

    def _forward_backward_segmented(self, xt, yt, env_out):
        layout = self._layout(xt, yt)
        self._params_layout(layout)
        feeds, bound = self._feeds_bound(in_layout(xt, layout), yt)
        on_ready = None
        if self.reducer is not None:  # start each bucket's all-reduce as soon as its gradients exist

            def on_ready(names):
                self.reducer.ready([self._grad_param[n] for n in names if n in self._grad_param])

        outs, stats = self.runner.run(feeds, bound, env_out, on_ready, self._run_options(len(xt)))
        self.grads.update({p: bound[o] for p, o in self.desc["grads"].items() if o in bound.adopted})
        loss = float(outs[self.desc["loss"]].reshape(-1)[0])
        logits = outs[self.desc["logits"]].cpu().numpy() if self.desc["logits"] else None
        probes = {n: float(outs[n].reshape(-1)[0]) for n in self.desc["probes"]}
        return StepResult(loss, logits, probes, stats)

    def train_step(self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> StepResult:
        """One forward+backward on ORT and one optimizer step."""
        result = self._forward_backward(x, y)
        skip = any(st.get(SKIP_UPDATE) for st in result.kernels.values())  # a kernel may veto the update
        if self.reducer is not None:  # averaged across ranks: every rank takes the same step
            names = list(result.probes)
            vals = self.reducer.finish([result.loss] + [result.probes[n] for n in names] + [float(skip)])
            result.loss, result.probes = vals[0], dict(zip(names, vals[1 : 1 + len(names)]))
            skip = vals[-1] > 0  # one rank's veto (e.g. an overflow under loss scaling) holds for all
        if not skip:
            for p in self.trained:
                self.params[p].grad = self.grads[p]
            self.optimizer.step()
        self._update_bn_stats(len(y))
        self.steps += 1
        return result

    def _update_bn_stats(self, batch: int) -> None:
        self._write_bn_stats(batch, self.desc, self.bn_buf, self.bn_inv_std, self.bn_spatial)

    def _write_bn_stats(self, batch: int, desc: dict, bn_buf: dict, inv_std: dict, spatial_of: dict) -> None:
        """Write BatchNorm running statistics back, with torch's unbiased running variance:
        rv = m·rv + (1-m)·var·n/(n-1), where ORT computed it with var (biased)."""
        for b in desc["bn"]:
            spatial = spatial_of.get(b["inv_std"])
            if spatial:
                n = batch * spatial
                var = inv_std[b["inv_std"]].pow(-2).sub_(b["epsilon"])
                bn_buf[b["var_out"]].add_(var, alpha=(1.0 - b["momentum"]) / max(n - 1, 1))
        for o, buf in bn_buf.items():
            self.params[desc["bn_stats"][o]].copy_(buf)

    def evaluate_batch(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        if isinstance(self.eval_sess, SegmentedRunner):
            feeds = {
                self.info.input_name: in_layout(
                    torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32)).to(self.device), self.layouts.last
                ),
                "labels": torch.as_tensor(np.ascontiguousarray(y, dtype=np.int64)).to(self.device),
            }
            feeds.update({n: self.params[n] for n in self.eval_inputs if n in self.params})
            with torch.no_grad():
                outs, _ = self.eval_sess.run(feeds)
            loss = float(outs[self.eval_outputs[0]].reshape(-1)[0])
            logits = outs.get(self.info.output_name)
            return loss, (logits.cpu().numpy().copy() if logits is not None else None)
        feeds = {
            self.info.input_name: np.ascontiguousarray(x, dtype=np.float32),
            "labels": np.ascontiguousarray(y, dtype=np.int64),
        }
        self._params_layout(NCHW)
        for n in self.eval_inputs:
            if n in self.params:
                feeds[n] = self.params[n].detach().cpu().numpy()
        out = self.eval_sess.run(None, feeds, self._run_options(len(x)))
        loss = float(np.asarray(out[0]).reshape(-1)[0])
        logits = (
            out[self.eval_outputs.index(self.info.output_name)] if self.info.output_name in self.eval_outputs else None
        )
        return loss, logits

    def _run_options(self, batch: int):
        """:func:`run_options` for a run at ``batch`` of the current variant (estimated once)."""
        info = self.artifacts.info
        key = (id(info), batch)
        if key not in self._run_opts:
            try:
                nbytes = activation_bytes(info, batch)
            except Exception:  # shapes unknown to inference: the memory is what matters then
                nbytes = None
            self._run_opts[key] = (info, run_options(self.device, nbytes))  # info held: its id stays its own
        return self._run_opts[key][1]

    def params_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.device == "cuda" else torch.device("cpu")

    def gradient_norm(self, param: str) -> float | None:
        """L2 norm of ``param``'s last gradient (all-reduced); None when this variant does not train it."""
        g = self.grads.get(param)
        return None if g is None else float(torch.linalg.vector_norm(g))

    def buffers(self) -> list[torch.Tensor]:
        """BatchNorm running statistics: what else a step changes (rank 0's go to every rank)."""
        return [self.params[p] for p in dict.fromkeys(self.desc["bn_stats"].values())]

    def gradients(self) -> dict[str, np.ndarray]:
        """Gradients of the last step (before the optimizer update), as numpy."""
        return {p: np.array(g.detach().cpu().numpy(), order="C") for p, g in self.grads.items()}

    def batchnorm_step(self, x, y) -> float:
        """Forward+backward, no update: only BatchNorm running statistics move. Returns the loss."""
        r = self._forward_backward(x, y)
        self._update_bn_stats(len(y))
        return r.loss

    def recalibrate_batchnorm(self, artifacts: Artifacts, batches) -> int | None:
        """BatchNorm running statistics gathered again over ``batches`` ((x, y) pairs) by the
        forward of ``artifacts``' training graph, cut down to the nodes its BatchNorm statistics
        need (no backward: about a third of a step's work). ``artifacts``: this model or another
        variant of it with the same parameters (e.g. one whose layers compute what the eval graph
        computes). Each batch moves the statistics as a training step (and :meth:`batchnorm_step`
        on that variant) moves them: momentum, torch's unbiased variance. Parameters, gradients,
        optimizer state and the current variant do not change. Returns the batches run, or None
        when the graph has no BatchNorm running statistics. With no batches (a data-parallel rank
        that receives rank 0's statistics) nothing is built."""
        if not self._has_bn_stats(artifacts):
            return None
        batches = iter(batches)
        first = next(batches, None)
        if first is None:
            return 0
        st = self._stats_runner(artifacts)
        if st is None:
            return None
        n = 0
        for x, _ in itertools.chain([first], batches):
            xt = torch.as_tensor(x).to(self.device, torch.float32).contiguous()
            feeds = {artifacts.data_input: xt, **{p: self.params[p] for p in st["inputs"]}}
            if st["runner"] is not None:
                st["runner"].run(feeds, {**st["bn_buf"], **st["inv_std"]}, run_options=self._run_options(len(xt)))
            else:
                self._params_layout(NCHW)  # ORT reads the buffers as NCHW
                io = st["sess"].io_binding()
                dev = "cuda" if self.device == "cuda" else "cpu"
                idx = torch.cuda.current_device() if self.device == "cuda" else 0
                for name, t in feeds.items():
                    io.bind_input(name, dev, idx, _np_dtype(t), tuple(t.shape), t.data_ptr())
                for o, buf in list(st["bn_buf"].items()) + list(st["inv_std"].items()):
                    io.bind_output(o, dev, idx, np.float32, tuple(buf.shape), buf.data_ptr())
                if self.device == "cuda":
                    torch.cuda.synchronize()
                st["sess"].run_with_iobinding(io, self._run_options(len(xt)))
            self._write_bn_stats(len(xt), st["desc"], st["bn_buf"], st["inv_std"], st["spatial"])
            n += 1
        return n

    def _has_bn_stats(self, art: Artifacts) -> bool:
        """Whether ``art``'s training graph moves BatchNorm running statistics (nothing built)."""
        if self._stats_of is not None and self._stats_of[0] is art:
            return self._stats_of[1] is not None
        return bool(self._lowered_for_stats(art)[1]["bn_stats"])

    def _lowered_for_stats(self, art: Artifacts) -> tuple:
        """``art``'s lowered training graph and its description (lowered once for both questions)."""
        if self._stats_lowered is None or self._stats_lowered[0] is not art:
            self._stats_lowered = (art, *lower_training_model(art.training, art.info.output_name))
        return self._stats_lowered[1:]

    def _stats_runner(self, art: Artifacts) -> dict | None:
        """The forward that computes ``art``'s BatchNorm statistics (built once per variant)."""
        if self._stats_of is not None and self._stats_of[0] is art:
            return self._stats_of[1]
        import onnxruntime as ort  # heavy

        lowered, desc = self._lowered_for_stats(art)
        outs = list(desc["bn_stats"]) + [b["inv_std"] for b in desc["bn"]]
        st = None
        if desc["bn_stats"]:
            model = pruned(lowered, outs)
            inputs = [i.name for i in model.graph.input if i.name != art.data_input]
            missing = [n for n in inputs if n not in self.params]
            if missing:
                raise AccelcError(
                    "the BatchNorm statistics of this variant need inputs this session does not hold: "
                    f"{', '.join(show(n) for n in missing[:5])}"
                )
            so = session_options(self.exec.threads)
            model, owners = self._claim(model)
            try:
                runner = SegmentedRunner(model, so, self._providers(), self.exec, owners) if owners else None
                sess = (
                    None if owners else ort.InferenceSession(model.SerializeToString(), so, providers=self._providers())
                )
            except AccelcError:
                raise
            except Exception as e:
                raise AccelcError(
                    f"ONNX Runtime cannot load the BatchNorm statistics graph: {ort_message(e)}"
                ) from None
            bn_buf = {o: torch.empty_like(self.params[p]) for o, p in desc["bn_stats"].items()}
            shapes = art.info.shapes(1)
            st = {
                "desc": desc,
                "runner": runner,
                "sess": sess,
                "inputs": inputs,
                "bn_buf": bn_buf,
                "inv_std": {b["inv_std"]: torch.empty_like(bn_buf[b["var_out"]]) for b in desc["bn"]},
                "spatial": {
                    b["inv_std"]: int(np.prod(shapes[b["x"]][2:])) if b["x"] in shapes else None for b in desc["bn"]
                },
            }
        self._stats_of, self._stats_lowered = (art, st), None
        return st

    def compute_gradients(self, x, y, env_out: dict | None = None) -> tuple[float, dict[str, np.ndarray], np.ndarray]:
        """Forward+backward only (no update): loss, gradients, logits. For numeric checks."""
        r = self._forward_backward(x, y, env_out)
        return r.loss, self.gradients(), r.logits

    # ------------------------------------------------------------------ state
    def state_arrays(self) -> dict[str, np.ndarray]:
        """Parameters and optimizer state as named numpy arrays (for checkpoints)."""
        out = {f"param/{k}": np.asarray(v.detach().cpu().numpy(), order="C") for k, v in self.params.items()}
        names = {id(t): k for k, t in self.params.items()}
        out.update({f"optim/{k}": v for k, v in optimizer_state_arrays(self.optimizer, names).items()})
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        for k, v in arrays.items():
            if k.startswith("param/"):
                n = k[len("param/") :]
                t = torch.from_numpy(np.array(v, dtype=np.float32)).to(self.device)
                if n in self.params and self.params[n].shape == t.shape:
                    self.params[n].copy_(t)
                else:
                    old = self.params.get(n)
                    self.params[n] = t
                    if old is not None:
                        self._replace_in_optimizer(old, t)
        self._param_key = None
        self.optimizer.state.clear()
        load_optimizer_state_arrays(
            self.optimizer, self.params, {k[len("optim/") :]: v for k, v in arrays.items() if k.startswith("optim/")}
        )
        self._build(self.artifacts)

    def param_arrays(self) -> dict[str, np.ndarray]:
        return {k: np.array(v.detach().cpu().numpy(), order="C") for k, v in self.params.items()}

    def infer(self, model, x: np.ndarray, output: str, chunk: int = 256) -> np.ndarray:
        from .infer import run_forward  # the engine's kernels on an inference graph of this model

        return run_forward(self, model, x, output, chunk)


def _np_dtype(t: torch.Tensor):
    return {torch.float32: np.float32, torch.int64: np.int64}[t.dtype]
