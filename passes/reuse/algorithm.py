"""The run-time algorithm of adaptive deep reuse: the paper's three strategies, and the reuse report.

Strategies (``plan.json`` → ``"type": "reuse"``, ``"strategy"``):

* ``fixed`` (a): one (L, H) for the whole run;
* ``lh`` (b): start at the first ``schedule`` setting (coarse: long sub-vectors, few hyperplanes)
  and step to the next, finer one whenever the training loss plateaus;
* ``off`` (c): reuse on, then off (the exact ORT Conv/ConvGrad graph) at the first plateau.

A plateau: the epoch's mean training loss fell by less than ``plateau`` (a fraction) against the
previous epoch, at least ``min_epochs`` epochs after the last switch. Every switch is logged
with its reason.

Report, per layer and per epoch: the mean remain ratio (clusters / rows), the multiply-adds of the
layer (forward + weight gradient + input gradient) with reuse against the exact conv, the
measured milliseconds per step of the reused layer (the native nodes, forward and backward), and
the measured milliseconds of ORT's own Conv + ConvGrad for the same layer shape (timed once, on
the first epoch's end, in a side session).
"""

from __future__ import annotations

import time

import numpy as np
from onnx import TensorProto as T
from onnx import helper as h

from ...runtime.algorithm import Algorithm, register_algorithm
from .cost import modelled_macs
from .rewrite import PASS, ReusePass, reuse_variant, reused_layers
from .spec import KERNEL_KEY, geom_from_config, layer_macs


def conv_layer_model(pads, kernel, strides, dilations):
    """A model running one layer's Conv (X, W, B -> Y) and ORT Training's ConvGrad (dY, X, W -> dX,
    dW, dB): the original layer, for side-by-side timings."""

    attrs = dict(pads=list(pads), kernel_shape=list(kernel), strides=list(strides), dilations=list(dilations))
    graph = h.make_graph(
        [
            h.make_node("Conv", ["X", "W", "B"], ["Y"], **attrs),
            h.make_node("ConvGrad", ["dY", "X", "W"], ["dX", "dW", "dB"], domain="com.microsoft", group=1, **attrs),
        ],
        "conv_layer",
        [h.make_tensor_value_info(n, T.FLOAT, None) for n in ("X", "W", "B", "dY")],
        [h.make_tensor_value_info(n, T.FLOAT, None) for n in ("Y", "dX", "dW", "dB")],
    )
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    return m


def time_ort_conv_layer(cfg: dict, batch: int, repeats: int = 3) -> float:
    """Median ms of ORT's Conv + ConvGrad for one layer shape (random data, side session)."""
    import onnxruntime as ort  # heavy: loaded for the side measurement

    g = cfg["geom"]
    m = conv_layer_model(g["pads"], (g["kh"], g["kw"]), g["stride"], g["dilation"])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    hh, ww = cfg["in_hw"]
    x = rng.standard_normal((batch, g["C"], hh, ww), dtype=np.float32)
    w = rng.standard_normal((g["Co"], g["C"], g["kh"], g["kw"]), dtype=np.float32)
    ho, wo = geom_from_config(cfg).out_hw(hh, ww)
    feeds = {
        "X": x,
        "W": w,
        "B": np.zeros(g["Co"], np.float32),
        "dY": rng.standard_normal((batch, g["Co"], ho, wo), dtype=np.float32),
    }
    s.run(None, feeds)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        s.run(None, feeds)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts) * 1e3)


@register_algorithm
class Reuse(Algorithm):
    name = PASS
    rank = ReusePass.rank

    def __init__(self, root, spec: dict, measure_original: bool = True):
        super().__init__(root, spec)
        self.strategy = self.spec.get("strategy", "fixed")
        self.schedule = [tuple(s) for s in self.spec.get("schedule", [])] or [(self.spec["L"], self.spec["H"])]
        self.configs = reused_layers(root.training)  # layer -> config at compile time
        self.index = 0  # position in the schedule (lh)
        self.on = True
        self.last_switch = 0
        self.prev_loss = None
        self.measure_original = measure_original
        self.original_ms: dict = {}
        self.epochs: list[dict] = []
        self._stats: dict = {}

    # ------------------------------------------------------------------ what it contributes
    def settings(self, art=None) -> dict:
        """Per-layer settings now, for ``art`` (e.g. a rescale stage: that stage's layer shapes)."""
        if not self.on:
            return {}
        L, H = self.current()
        configs = self.configs if art is None or art is self.root else reused_layers(art.training)
        out = {}
        for layer, c in configs.items():
            K = c["geom"]["C"] * c["geom"]["kh"] * c["geom"]["kw"]
            out[layer] = {
                "L": int(min(L, K)),
                "H": int(H),
                "scope": c["scope"],
                "input_grad": c["input_grad"],
                "seed": c["seed"],
            }
        return out

    def current(self) -> tuple:
        return tuple(self.schedule[self.index]) if self.strategy == "lh" else (self.spec["L"], self.spec["H"])

    def decision(self):
        return (self.on, self.current())

    def transform(self, art):
        want = self.settings(art)
        have = {
            k: {f: c[f] for f in ("L", "H", "scope", "input_grad", "seed")}
            for k, c in reused_layers(art.training).items()
        }
        return art if want == have else reuse_variant(art, want)

    def describe(self) -> str:
        return "reuse:off" if not self.on else "reuse:L{}H{}".format(*self.current())

    # ------------------------------------------------------------------ events
    def on_step(self, state, step, result):
        for key, st in result.kernels.items():  # the reuse node kernels' statistics (node.py)
            if key.startswith(KERNEL_KEY):
                acc = self._stats.setdefault(key[len(KERNEL_KEY) :], {"ms": 0.0, "calls": 0, "remain": 0.0})
                acc["ms"] += st.get("ms", 0.0)
                acc["calls"] += 1
                acc["remain"] += st.get("remain", 0.0)

    def on_epoch_end(self, state, epoch, metrics):
        stats, self._stats = self._stats, {}
        batch = int(state.batch_size)
        steps = max(int(metrics.get("steps", 1)), 1)
        layers = {}
        settings = self.settings()
        # the variant that ran (a rescale stage has other shapes): its own layer geometry
        art = state.engine.artifacts
        ran = reused_layers(art.training) if art is not None else {}
        for layer, c0 in self.configs.items():
            c = ran.get(layer, c0)
            f = stats.get(f"{layer}|forward", {})
            b = stats.get(f"{layer}|backward", {})
            remain = f["remain"] / f["calls"] if f.get("calls") else None
            cfg = dict(c, **{k: v for k, v in settings.get(layer, {}).items() if k in ("L", "H", "input_grad")})
            exact = layer_macs(c, batch, None)["total"]
            used = layer_macs(cfg, batch, remain)["total"] if (remain is not None and layer in settings) else exact
            shape_key = f"{layer}@{c['in_hw'][0]}x{c['in_hw'][1]}"  # a rescale stage is another shape
            if self.measure_original and shape_key not in self.original_ms:
                try:
                    self.original_ms[shape_key] = time_ort_conv_layer(c, batch)
                except Exception:  # a side measurement must never stop training
                    self.original_ms[shape_key] = None
            layers[layer] = {
                "reused": layer in settings,
                "L": settings.get(layer, {}).get("L"),
                "H": settings.get(layer, {}).get("H"),
                "remain_ratio": remain,
                "macs_exact": exact,
                "macs_reuse": used,
                "macs_saved": 1 - used / exact,
                "reuse_ms_per_step": ((f.get("ms", 0) + b.get("ms", 0)) / max(f.get("calls", 0), 1))
                if f.get("calls")
                else None,
                "ort_conv_ms": self.original_ms.get(shape_key),
                "input_hw": list(c["in_hw"]),
            }
        rec = {
            "epoch": epoch,
            "on": self.on,
            "setting": self.schedule[self.index] if self.strategy == "lh" else (self.spec["L"], self.spec["H"]),
            "train_loss": metrics.get("train_loss"),
            "layers": layers,
            "steps": steps,
        }
        self.epochs.append(rec)
        # the cost model counts a reuse node at its expected remain ratio (reuse/cost.py); what the
        # measured one saves on top of that, in FLOPs per step (2 per multiply-add)
        self.logger.log_metrics(
            {
                "reuse": {
                    k: {"remain_ratio": v["remain_ratio"], "macs_saved": v["macs_saved"]} for k, v in layers.items()
                },
                "reuse_flops_saved_per_step": sum(
                    2.0 * (modelled_macs(ran.get(k, self.configs[k]), batch) - v["macs_reuse"])
                    for k, v in layers.items()
                    if v["reused"] and v["remain_ratio"] is not None
                ),
            }
        )
        loss = metrics.get("train_loss")
        prev, self.prev_loss = self.prev_loss, loss
        if prev is None or loss is None or self.strategy == "fixed" or not self.on:
            return
        drop = (prev - loss) / max(abs(prev), 1e-12)
        if drop >= float(self.spec.get("plateau", 0.05)) or epoch - self.last_switch < int(
            self.spec.get("min_epochs", 1)
        ):
            return
        if self.strategy == "lh":
            if self.index + 1 >= len(self.schedule):
                return
            self.index += 1
            L, H = self.schedule[self.index]
            self.decide(
                epoch,
                "refine",
                f"training loss plateaued (fell {drop:.1%} < {self.spec.get('plateau')}); "
                f"reuse L={L}, H={H} from epoch {epoch + 1}",
                L=L,
                H=H,
                drop=drop,
            )
        else:
            self.on = False
            self.decide(
                epoch,
                "off",
                f"training loss plateaued (fell {drop:.1%} < {self.spec.get('plateau')}); "
                f"reuse off (exact conv) from epoch {epoch + 1}",
                drop=drop,
            )
        self.last_switch = epoch

    # ------------------------------------------------------------------ report and state
    def report(self) -> dict:
        if not self.epochs:
            return {}
        tot_exact = sum(lay["macs_exact"] * e["steps"] for e in self.epochs for lay in e["layers"].values())
        tot_used = sum(lay["macs_reuse"] * e["steps"] for e in self.epochs for lay in e["layers"].values())
        return {
            "strategy": self.strategy,
            "epochs": self.epochs,
            "reused_layer_macs_saved": 1 - tot_used / tot_exact if tot_exact else 0.0,
            "switches": [d for d in self.log if d["action"] in ("refine", "off")],
        }

    def state_dict(self) -> dict:
        return {
            "log": self.log,
            "index": self.index,
            "on": self.on,
            "last_switch": self.last_switch,
            "prev_loss": self.prev_loss,
            "epochs": self.epochs,
            "original_ms": self.original_ms,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.index = int(state.get("index", 0))
        self.on = bool(state.get("on", True))
        self.last_switch = int(state.get("last_switch", 0))
        self.prev_loss = state.get("prev_loss")
        self.epochs = list(state.get("epochs", []))
        self.original_ms = dict(state.get("original_ms", {}))
