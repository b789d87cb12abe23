"""Torch eager training of the same model: the baseline users would otherwise run.

It uses the same optimizer arithmetic as the artifact (runtime.optim), so a comparison with the
ORT runtime differs only in how forward and backward are executed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..compiler.errors import AccelcError
from .engine import ParamUpdate, StepResult
from .optim import load_optimizer_state_arrays, make_optimizer, optimizer_state_arrays


class TorchSession:
    """The :class:`~accelc.runtime.engine.Engine` protocol on torch eager (it runs no artifacts)."""

    variant_name = "torch"
    artifacts = None

    def __init__(self, module: torch.nn.Module, hyper: dict, lr: float, device: str = "cpu"):
        self.device = device
        self.module = module.to(device)
        self.named = dict(self.module.named_parameters())
        self.optimizer = make_optimizer(list(self.named.values()), hyper, lr)
        self.steps = 0

    def train_step(self, x, y):
        self.module.train()
        xt = torch.as_tensor(x).to(self.device)
        yt = torch.as_tensor(y).to(self.device)
        for p in self.named.values():
            p.grad = None
        logits = self.module(xt)
        loss = F.cross_entropy(logits, yt)
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        return StepResult(float(loss.detach()), logits.detach().cpu().numpy())

    @torch.no_grad()
    def evaluate_batch(self, x, y):
        self.module.eval()
        logits = self.module(torch.as_tensor(x).to(self.device))
        loss = F.cross_entropy(logits, torch.as_tensor(y).to(self.device))
        return float(loss), logits.cpu().numpy()

    def compute_gradients(self, x, y):
        self.module.train()
        for p in self.named.values():
            p.grad = None
        logits = self.module(torch.as_tensor(x).to(self.device))
        loss = F.cross_entropy(logits, torch.as_tensor(y).to(self.device))
        loss.backward()
        return (
            float(loss),
            {k: p.grad.cpu().numpy().copy() for k, p in self.named.items()},
            logits.detach().cpu().numpy(),
        )

    def param_arrays(self):
        return {k: v.detach().cpu().numpy().copy() for k, v in self.module.state_dict().items()}

    def swap(self, artifacts, name: str, update: ParamUpdate | None = None) -> None:
        raise AccelcError("torch eager runs no compiled variants")

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
