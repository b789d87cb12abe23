"""The optimizer ops of ORT's optimizer_model.onnx, executed with torch tensor ops.

The arithmetic follows ORT 1.19's CPU kernels (com.microsoft::AdamWOptimizer modes 0 and 1,
SGDOptimizerV2) step for step, reading alpha/beta/epsilon/weight_decay/adam_mode/correct_bias
from the artifact's optimizer model, so training under accelc's runtime matches ORT's own
Optimizer. It runs in place on the parameter tensors that ORT reads through IOBinding.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..compiler.artifacts import ADAMW_DEFAULTS


class OrtAdamW(torch.optim.Optimizer):
    def __init__(self, params, **hyper):
        """``hyper``: any of :data:`ADAMW_DEFAULTS` (the rest take those defaults)."""
        unknown = sorted(set(hyper) - set(ADAMW_DEFAULTS))
        if unknown:
            raise TypeError(f"OrtAdamW has no hyperparameter {', '.join(unknown)}")
        super().__init__(params, {**ADAMW_DEFAULTS, **hyper})
        # parameter tensor -> multiple of its group's rate (``Engine.set_lr_scales``); absent: 1
        self.lr_scales: dict = {}

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient, as multi-tensor (``torch._foreach_*``)
        operations over all parameters at the same step count: the per-element arithmetic of the
        kernel (and of :meth:`step_reference`), a handful of calls instead of eight per tensor."""
        for group in self.param_groups:
            lr, a, b, eps, wd = group["lr"], group["alpha"], group["beta"], group["epsilon"], group["weight_decay"]
            by_step: dict[int, list] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                by_step.setdefault(self._advance(p)["step"], []).append(p)
            for t, ps in by_step.items():
                gs = [p.grad for p in ps]
                ms = [self.state[p]["exp_avg"] for p in ps]
                vs = [self.state[p]["exp_avg_sq"] for p in ps]
                ac, bc, lr_c = _corrections(group, lr, a, b, t)
                torch._foreach_mul_(ms, a)
                torch._foreach_add_(ms, gs, alpha=1.0 - a)
                torch._foreach_mul_(vs, b)
                torch._foreach_addcmul_(vs, gs, gs, value=1.0 - b)
                s = self._scales(ps)
                if group["adam_mode"] == 0:
                    if wd:
                        _mul(ps, 1.0 - lr * wd, s, lambda k: 1.0 - lr * k * wd)
                    denom = torch._foreach_div(vs, bc)
                    torch._foreach_sqrt_(denom)
                    torch._foreach_add_(denom, eps)
                    _addcdiv(ps, ms, denom, -lr / ac, s, lambda k: -lr * k / ac)
                else:
                    denom = torch._foreach_sqrt(vs)
                    torch._foreach_add_(denom, eps)
                    # the scaled rate goes through the kernel's float32 rounding like the rate itself
                    _addcdiv(ps, ms, denom, -lr_c, s, lambda k: -_corrections(group, lr * k, a, b, t)[2])
                    if wd:
                        _mul(ps, 1.0 - lr * wd, s, lambda k: 1.0 - lr * k * wd)
        return None

    def _scales(self, ps: list) -> list | None:
        """Each parameter's multiple of the rate, or None when every one is 1 (the kernel's own
        arithmetic, one scalar for all)."""
        if not self.lr_scales:
            return None
        s = [self.lr_scales.get(p, 1.0) for p in ps]
        return None if all(k == 1.0 for k in s) else s

    def _advance(self, p) -> dict:
        """``p``'s state with its step count moved on (moments created at the first step)."""
        st = self.state[p]
        if not st:
            st["step"] = 0
            st["exp_avg"] = torch.zeros_like(p)
            st["exp_avg_sq"] = torch.zeros_like(p)
        st["step"] += 1
        return st

    @torch.no_grad()
    def step_reference(self):
        """The same update one tensor at a time (the kernel's loop, kept as the reference)."""
        for group in self.param_groups:
            lr, a, b, eps, wd = group["lr"], group["alpha"], group["beta"], group["epsilon"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self._advance(p)
                t = st["step"]
                g, m, v = p.grad, st["exp_avg"], st["exp_avg_sq"]
                ac, bc, lr_c = _corrections(group, lr, a, b, t)
                if group["adam_mode"] == 0:
                    if wd:
                        p.mul_(1.0 - lr * wd)
                    m.mul_(a).add_(g, alpha=1.0 - a)
                    v.mul_(b).addcmul_(g, g, value=1.0 - b)
                    denom = (v / bc).sqrt_().add_(eps)
                    p.addcdiv_(m, denom, value=-lr / ac)
                else:
                    m.mul_(a).add_(g, alpha=1.0 - a)
                    v.mul_(b).addcmul_(g, g, value=1.0 - b)
                    denom = v.sqrt().add_(eps)
                    p.addcdiv_(m, denom, value=-lr_c)
                    if wd:
                        p.mul_(1.0 - lr * wd)
        return None


def _corrections(group: dict, lr: float, a: float, b: float, t: int) -> tuple[float, float, float]:
    """Bias corrections at step ``t``: float32 like the kernel (pow in double, cast to float, then
    float arithmetic)."""
    ac = bc = 1.0
    lr_c = lr
    if group["correct_bias"]:
        ac = float(np.float32(1.0) - np.float32(a**t))
        bc = float(np.float32(1.0) - np.float32(b**t))
        lr_c = float(np.float32(lr) * np.float32(math.sqrt(bc)) / np.float32(ac))
    return ac, bc, lr_c


class OrtSGD(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3):
        super().__init__(params, dict(lr=lr))
        self.lr_scales: dict = {}  # as OrtAdamW's

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"] * self.lr_scales.get(p, 1.0))
        return None


def _mul(ps: list, value: float, scales: list | None, scaled) -> None:
    """``ps *= value``, or per parameter ``scaled(its scale)``."""
    if scales is None:
        torch._foreach_mul_(ps, value)
    else:
        torch._foreach_mul_(ps, [scaled(k) for k in scales])


def _addcdiv(ps: list, ms: list, denom: list, value: float, scales: list | None, scaled) -> None:
    """``ps += value * ms / denom``, or per parameter with ``scaled(its scale)``."""
    if scales is None:
        torch._foreach_addcdiv_(ps, ms, denom, value=value)
    else:
        torch._foreach_addcdiv_(ps, ms, denom, [scaled(k) for k in scales])


def make_optimizer(params, hyper: dict, lr: float) -> torch.optim.Optimizer:
    """Build the optimizer an artifact's optimizer_model.onnx describes."""
    if hyper["kind"] == "sgd":
        return OrtSGD(params, lr=lr)
    return OrtAdamW(params, **{k: v for k, v in hyper.items() if k in ADAMW_DEFAULTS and k != "lr"}, lr=lr)


def optimizer_state_arrays(opt: torch.optim.Optimizer, names: dict) -> dict:
    """Flatten optimizer state to {"<param>/<key>": numpy} (no pickles). ``names``: tensor id -> name."""
    out = {}
    for p, st in opt.state.items():
        n = names[id(p)]
        for k, v in st.items():
            out[f"{n}/{k}"] = v.detach().cpu().numpy().copy() if torch.is_tensor(v) else torch.tensor(v).numpy()
    return out


def load_optimizer_state_arrays(opt: torch.optim.Optimizer, params: dict, arrays: dict) -> None:
    for key, val in arrays.items():
        n, k = key.rsplit("/", 1)
        p = params[n]
        st = opt.state.setdefault(p, {})
        if k == "step":
            st[k] = int(val)
        else:
            st[k] = torch.from_numpy(val.copy()).to(p.device)
