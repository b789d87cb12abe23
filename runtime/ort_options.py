"""ONNX Runtime's session and run options for the ORT sessions of a training step (the segments
accelc's kernels leave to ORT, the reference engine, the evaluation graph): one CPU arena shared by
every session of the process, the arena shrink after large steps, the thread bound."""

from __future__ import annotations

_SHARED_ARENA = []


def _shared_cpu_arena() -> None:
    """Register one CPU arena with ORT's environment, once per process. Sessions that use it
    (``session.use_env_allocators``) share their buffers: a training graph cut into segments
    (one ORT session each) then holds one arena's peak instead of every segment's own (measured,
    torchvision VGG11-BN 224x224 batch 32: peak 10.4 GB with an arena per segment, 6.9 GB shared)."""
    import onnxruntime as ort  # heavy

    if not _SHARED_ARENA:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
        _SHARED_ARENA.append(info)


_RUN_OPTIONS = []
SHRINK_FROM_BYTES = 512 << 20  # a step's estimated activations (and their gradients)


def run_options(device: str = "cpu", step_bytes: int | None = None):
    """ORT run options for a training session's runs. On the CPU, for a step whose activations
    reach :data:`SHRINK_FROM_BYTES`, the shared arena hands the chunks no tensor holds back to the
    system after each run, so ORT does not keep its high-water mark beside torch's tensors (the
    optimizer's, accelc's kernels'). With torch allocating the segments' outputs (the executor),
    torchvision VGG11-BN 224x224 batch 32 peaked at 5.1 GB instead of 7.0 as before (5.6 GB with
    the shrink alone; the checkpoint's bytes dropped in both). Below that, taking memory back each
    run buys little and costs page faults on the next (zoo ResNet 28x28 batch 64, 136 MB: 3% slower
    in one A/B, within noise in others). None where nothing is to be done."""
    import onnxruntime as ort  # heavy

    if device != "cpu" or (step_bytes is not None and step_bytes < SHRINK_FROM_BYTES):
        return None
    if not _RUN_OPTIONS:
        ro = ort.RunOptions()
        ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        _RUN_OPTIONS.append(ro)
    return _RUN_OPTIONS[0]


def session_options(threads: int | None = None):
    import onnxruntime as ort  # heavy

    _shared_cpu_arena()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.use_env_allocators", "1")
    if threads:
        so.intra_op_num_threads = threads
    return so
