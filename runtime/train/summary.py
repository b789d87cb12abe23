"""What a run's summary says besides its history: where a step ran (:func:`engine_line`) and the
machine (:func:`machine_info`)."""

from __future__ import annotations

import os
import platform


def engine_line(rep: dict) -> str:
    """One line on where a step ran: accelc's kernels, and what fell back to ORT at what cost."""
    if "engine" in rep:
        return str(rep["engine"])
    if not rep.get("kernel_nodes"):
        return "the whole step on ORT (one session)"
    line = f"{rep['kernel_nodes']} nodes on accelc's kernels"
    if rep.get("ort_segments"):
        ops = ", ".join(f"{k}×{v}" for k, v in sorted(rep.get("fell_back", {}).items()))
        ms = rep.get("ort_ms_per_step")
        line += f"; {rep['ort_segments']} ORT segment(s) for {ops}" + (f" ({ms:.1f} ms/step)" if ms is not None else "")
    else:
        line += ", no ORT in the step"
    if rep.get("in_place_per_step"):
        line += f"; {rep['in_place_per_step']:g} outputs per step written over a dead input"
    lay = rep.get("layout") or {}
    if lay.get("layout"):
        line += f"; activations {lay['layout'].upper()}"
        ms = lay.get("measured_ms")
        if ms:
            line += f" (measured: NCHW {ms['nchw']:.1f} ms, NHWC {ms['nhwc']:.1f} ms)"
        elif lay.get("not_measured"):
            line += f" (not measured: {lay['not_measured']})"
    return line


def machine_info() -> dict:
    import onnxruntime  # heavy
    import torch  # heavy

    return {
        "platform": platform.platform(),
        "cpu": cpu_line(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
    }


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # what decides the fast kernels and precisions


def cpu_line() -> str:
    """The CPU's model name and the instruction sets that decide its kernels, e.g. ``AMD EPYC
    9554 (avx2, avx512f, avx512_bf16)``: every benchmark compares only runs on the same one."""
    model, flags = cpu_model_and_flags()
    have = [f for f in CPU_FLAGS if f in flags]
    return f"{model} ({', '.join(have) if have else 'none of ' + ', '.join(CPU_FLAGS)})"


def cpu_model_and_flags() -> tuple[str, set]:
    """The CPU's model name and its instruction-set flags, from /proc/cpuinfo (Linux; elsewhere
    the platform's processor name and no flags)."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                elif line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return model, flags
