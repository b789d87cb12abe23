"""The one import of ONNX Runtime Training (heavy: it imports torch, so never at module level)."""

from __future__ import annotations

import sys
import threading


def import_ort_training() -> None:
    """Import ``onnxruntime.training`` on a thread of its own. Call before any
    ``from onnxruntime.training import ...``.

    ORT Training 1.19.2's ``ortmodule`` (ORTModule, which accelc does not use) stores the
    exception of its missing C++ extensions, traceback included, in module dictionaries that
    outlive the import. The traceback keeps every frame that was on the importing stack alive, with
    all their locals, for the rest of the process: imported from accelc's checkpoint reader, a
    checkpoint's bytes and ORT's CheckpointState (1.0 GB held for torchvision VGG11-BN). A new
    thread's stack holds nothing."""
    if "onnxruntime.training" in sys.modules:
        return
    failed: list[BaseException] = []

    def target():
        try:
            import onnxruntime.training  # noqa: F401
        except BaseException as e:  # re-raised in the caller
            failed.append(e)

    t = threading.Thread(target=target, name="accelc-import-ort-training", daemon=True)
    t.start()
    t.join()
    if failed:
        raise failed[0]
