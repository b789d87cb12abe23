"""Torch eager training of the same model: the baseline users would otherwise run.

It uses the same optimizer arithmetic as the artifact (runtime.optim), so a comparison with the
ORT runtime differs only in how forward and backward are executed. With ``autocast_dtype``
(``torch.bfloat16`` or ``torch.float16``) forward and loss run under ``torch.autocast`` — the
mixed precision torch users pick (``accelc bench`` configuration ``torch-amp``); float16 adds
torch's dynamic loss scaling (``torch.amp.GradScaler``).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from ..compiler.errors import AccelcError
from .config import ExecConfig
from .engine import EngineBase, ParamUpdate, StepResult
from .optim import load_optimizer_state_arrays, make_optimizer, optimizer_state_arrays


class TorchSession(EngineBase):
    """The :class:`~accelc.runtime.engine.Engine` protocol on torch eager (it runs no artifacts)."""

    variant_name = "torch"
    artifacts = None

    def __init__(
        self,
        module: torch.nn.Module,
        hyper: dict,
        lr: float,
        device: str = "cpu",
        autocast_dtype=None,
        channels_last: bool = False,
    ):
        """``channels_last``: the module's 4-D parameters and every 4-D input in torch's
        channels_last memory format (``Module.to(memory_format=...)``), what a torch user tunes a
        CNN with on a CPU (oneDNN runs NHWC convolutions without reordering)."""
        if autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise AccelcError(f"autocast_dtype must be torch.bfloat16, torch.float16 or None, got {autocast_dtype!r}")
        self.device = device
        self.exec = ExecConfig(device="cuda" if str(device).startswith("cuda") else "cpu")
        self.optimizer_kind = str((hyper or {}).get("kind", "adamw"))
        self.channels_last = bool(channels_last)  # otherwise the module and inputs stay as given
        self.module = module.to(device)
        if self.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.named = dict(self.module.named_parameters())
        self.lr = float(lr)
        self.optimizer = make_optimizer(list(self.named.values()), hyper, lr)
        self.steps = 0
        self.autocast_dtype = autocast_dtype
        self.scaler = torch.amp.GradScaler(device) if autocast_dtype == torch.float16 else None
        if autocast_dtype is not None:
            self.variant_name = "torch-amp"
        elif channels_last:
            self.variant_name = "torch-cl"

    def _input(self, x) -> torch.Tensor:
        t = torch.as_tensor(x).to(self.device)
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last and t.dim() == 4 else t

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=self.autocast_dtype)

    def train_step(self, x, y):
        self.module.train()
        xt = self._input(x)
        yt = torch.as_tensor(y).to(self.device)
        for p in self.named.values():
            p.grad = None
        with self._autocast():
            logits = self.module(xt)
            loss = F.cross_entropy(logits, yt)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.steps += 1
        return StepResult(float(loss.detach()), logits.detach().float().cpu().numpy())

    @torch.no_grad()
    def evaluate_batch(self, x, y):
        self.module.eval()
        with self._autocast():
            logits = self.module(self._input(x))
            loss = F.cross_entropy(logits, torch.as_tensor(y).to(self.device))
        return float(loss), logits.float().cpu().numpy()

    def compute_gradients(self, x, y):
        self.module.train()
        for p in self.named.values():
            p.grad = None
        with self._autocast():
            logits = self.module(self._input(x))
            loss = F.cross_entropy(logits, torch.as_tensor(y).to(self.device))
        loss.backward()
        return (
            float(loss.detach()),
            {k: p.grad.cpu().numpy().copy() for k, p in self.named.items()},
            logits.detach().float().cpu().numpy(),
        )

    def engine_report(self) -> dict:
        return {"engine": "torch eager"}

    def param_arrays(self):
        return {k: v.detach().cpu().numpy().copy() for k, v in self.module.state_dict().items()}

    def swap(self, artifacts, name: str, update: ParamUpdate | None = None) -> None:
        raise AccelcError("torch eager runs no compiled variants")

    def _named_params(self) -> dict:
        return self.named

    def state_arrays(self):
        out = {f"param/{k}": v.detach().cpu().numpy() for k, v in self.module.state_dict().items()}
        names = {id(p): k for k, p in self.named.items()}
        out.update({f"optim/{k}": v for k, v in optimizer_state_arrays(self.optimizer, names).items()})
        return out

    def load_state_arrays(self, arrays):
        sd = {k[len("param/") :]: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k.startswith("param/")}
        self.module.load_state_dict(sd)
        self.optimizer.state.clear()
        load_optimizer_state_arrays(
            self.optimizer, self.named, {k[len("optim/") :]: v for k, v in arrays.items() if k.startswith("optim/")}
        )
