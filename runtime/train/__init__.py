"""``accelc train``: the training loop, metrics, checkpoints and resume.

Per epoch it records train loss, train and test accuracy, training and evaluation seconds and
images per second, one JSON object a line in ``RUN_DIR/metrics.jsonl`` (and, with the ``csv``
logger, the same as a table in ``metrics.csv``; per step, the loss and images per second in
``steps.csv``, at most :data:`MAX_STEP_ROWS` rows a run); the ``tensorboard`` logger writes both
to ``RUN_DIR/tensorboard/``. ``summary.json`` holds the run as a whole and ``curves.png`` plots
loss and accuracy against training time, with the variant switches marked. A checkpoint is
written atomically after every epoch (parameters, optimizer state, controller state, data-order
position; data order is a pure function of (seed, epoch), so it needs no RNG snapshot) as
``checkpoint-NNNN.npz``, NNNN the epoch it holds (1-based, as everywhere a user sees epochs).
``--resume`` continues from it and reaches the same final metrics as an uninterrupted run.

Progress bars (training with images per second, the loss of every step and the variant in the
label; evaluation) are drawn only on a terminal; elsewhere one plain line per epoch.

The package by responsibility: :mod:`.loop` (the :class:`Trainer`; its start in :mod:`.resume`,
what it writes in :mod:`.records`), :mod:`.rundir` (the run directory and its lock), :mod:`.logs`
(metrics.csv, steps.csv, TensorBoard), :mod:`.plots` (curves.png), :mod:`.summary` (engine line,
machine) and :mod:`.run` (:func:`train`: one :class:`~accelc.runtime.spec.TrainSpec`).
"""

from __future__ import annotations

from ..spec import LOGGERS, TrainSpec
from .logs import (
    LOG_FILES,
    MAX_STEP_ROW_BYTES,
    MAX_STEP_ROWS,
    STEP_COLUMNS,
    STEPS_CSV,
    TB_DIR,
    RunLogs,
    check_loggers,
    check_resumed_logs,
    tensorboard_writer,
)
from .loop import NonFiniteLoss, RunSetup, Trainer
from .plots import _switches, plot_run
from .run import train
from .rundir import RUN_FILES, open_run_dir, recover_run_dir, release_run_dir
from .summary import engine_line, machine_info

__all__ = [
    "RunSetup",
    "LOGGERS",
    "LOG_FILES",
    "MAX_STEP_ROWS",
    "MAX_STEP_ROW_BYTES",
    "RUN_FILES",
    "STEPS_CSV",
    "STEP_COLUMNS",
    "TB_DIR",
    "NonFiniteLoss",
    "RunLogs",
    "TrainSpec",
    "Trainer",
    "_switches",
    "check_loggers",
    "check_resumed_logs",
    "engine_line",
    "machine_info",
    "open_run_dir",
    "plot_run",
    "recover_run_dir",
    "release_run_dir",
    "tensorboard_writer",
    "train",
]
