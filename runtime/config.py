"""Execution choices, made explicit: one object passed from the CLI or the Python API to the
engine (never read from environment variables)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..compiler.errors import InvalidValue, show
from ..compiler.resources import check_threads
from .kernels import ALL, ORT, providers

DEVICES = ("cpu", "cuda")
# the activations' memory layout: NCHW (ONNX's), NHWC (torch's channels_last), or measured per model
LAYOUTS = ("auto", "nchw", "nhwc")


@dataclass(frozen=True)
class ExecConfig:
    """How an engine runs a training graph.

    ``kernels`` maps a registered node-kernel provider (``accelc train --kernel NAME=IMPL``; see
    :mod:`accelc.runtime.kernels`) to one of its implementations or ``"ort"``; providers not named
    take their first implementation on CPU and ``"ort"`` on CUDA."""

    device: str = "cpu"
    threads: int | None = None  # ORT intra-op threads (None: ORT's default, all cores)
    kernels: dict = field(default_factory=dict)
    layout: str = "auto"  # see LAYOUTS and accelc.runtime.layout

    def __post_init__(self):
        if self.device not in DEVICES:
            raise InvalidValue(f"--device must be one of {', '.join(DEVICES)}, got '{show(self.device)}'")
        if self.layout not in LAYOUTS:
            raise InvalidValue(f"--layout must be one of {', '.join(LAYOUTS)}, got '{show(self.layout)}'")
        # bounded by the machine (1..4 x the cores this process may use): --threads 100000 would
        # have ORT start 100000 threads
        check_threads(self.threads)

    def impl(self, provider_name: str) -> str:
        """The implementation chosen for a kernel provider."""
        prov = providers().get(provider_name)
        if prov is None:
            return ORT
        choice = self.kernels.get(provider_name, self.kernels.get(ALL))
        if choice is None:
            return ORT if (self.device != "cpu" and prov.cpu_only) else prov.implementations[0]
        return choice

    def check(self) -> None:
        """Every named kernel exists and offers the chosen implementation (called by the engine,
        after the passes have registered their kernels)."""
        reg = providers()
        for name, choice in self.kernels.items():
            if name == ALL:
                if choice != ORT:
                    raise InvalidValue(
                        f"--kernel {ALL}={show(choice)}: only {ALL}={ORT} (the whole step on ORT) is offered"
                    )
                continue
            if name not in reg:
                raise InvalidValue(f"--kernel {show(name)}=...: no such kernel; kernels: {', '.join(reg) or 'none'}")
            allowed = tuple(reg[name].implementations) + (ORT,)
            if choice not in allowed:
                raise InvalidValue(f"--kernel {show(name)}={show(choice)}: choose from {', '.join(allowed)}")


def parse_kernel_choices(items) -> dict:
    """``["conv=ort"]`` -> ``{"conv": "ort"}`` (the CLI form)."""
    out = {}
    for item in items or []:
        name, sep, impl = str(item).partition("=")
        if not sep or not name.strip() or not impl.strip():
            raise InvalidValue(f"--kernel takes NAME=IMPL (e.g. conv=ort), got '{show(item)}'")
        out[name.strip()] = impl.strip()
    return out
