"""accelc.runtime: run compiled artifacts on ORT Training — the training session, per-epoch
controllers, data, checkpoints, metrics, benchmarks."""
import os as _os

_os.environ.setdefault("ORT_LOGGING_LEVEL", "3")
