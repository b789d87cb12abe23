"""What a run writes after every epoch: its step rows, its checkpoint, metrics.jsonl and
metrics.csv (in the order that lets a resume restore what a kill lost), the cost of a step, and
the run's summary. A part of :class:`~accelc.runtime.train.loop.Trainer`."""

from __future__ import annotations

import json
import os
import stat

import numpy as np

from ...compiler.cost import graph_costs
from ...compiler.errors import AccelcError, show
from ...compiler.fileio import atomic_write_text
from ...compiler.graph import training_graph
from .. import checkpoint as ckpt
from .logs import _write_error


class TrainerRecords:
    """The :class:`~accelc.runtime.train.loop.Trainer`'s records of the run."""

    def _write_epoch(self, epoch: int) -> None:
        # the epoch's step rows first (a resume cuts rows past its checkpoint), then the
        # checkpoint, then the records of the history it holds: metrics.jsonl never names an epoch
        # whose checkpoint is not on disk, and a resume restores what a kill after it lost
        if self.logs is not None:
            self.logs.steps_done()
        if self.checkpoints:
            meta = {
                "epoch": epoch,
                "history": self.history,
                "train_time": self.train_time,
                "wall_time": self.wall_time,
                "fingerprint": self.fingerprint,
                "artifacts_sha256": self.artifacts_sha,
                "artifacts_dir": self.artifacts_dir,
                "variant": self._variant(),
                "controllers": {a.name: a.state_dict() for a in self.algorithms},
                "layouts": self.engine.layout_state(),  # a resume reuses them (runtime.layout)
                "data_position": {"next_epoch": epoch + 1, "next_step": 0},
            }
            try:
                ckpt.save(self.run_dir, self.engine.state_arrays(), meta)
            except OSError as e:
                raise AccelcError(
                    f"cannot write the checkpoint of epoch {epoch + 1} in '{show(self.run_dir)}': {e.strerror or e}"
                    + (f" (the one of epoch {epoch} is kept)" if epoch and ckpt.exists(self.run_dir) else "")
                ) from None
        self._write_records(self.history[-1:])

    def _write_records(self, tb_epochs: list[dict]) -> None:
        """What the history gives: TensorBoard's epoch records of ``tb_epochs``, metrics.jsonl and
        metrics.csv (in this order: an epoch in metrics.jsonl is in TensorBoard)."""
        if self.logs is not None:
            self.logs.epoch_records(tb_epochs)
        path = self.run_dir / "metrics.jsonl"
        try:
            atomic_write_text(path, "".join(json.dumps(h) + "\n" for h in self.history))
        except OSError as e:
            raise _write_error(path, e) from None
        if self.logs is not None:
            self.logs.metrics_csv(self.history)

    def _restore_records(self) -> None:
        """On a resume: metrics.jsonl and metrics.csv as the checkpoint's history gives them, and
        TensorBoard's records of the epochs metrics.jsonl lacked (a kill between the checkpoint
        and these records loses nothing)."""
        lines = [(json.dumps(h) + "\n").encode() for h in self.history]
        have = b""
        try:
            fd = os.open(self.run_dir / "metrics.jsonl", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            fd = None
        if fd is not None:
            with os.fdopen(fd, "rb") as fh:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    have = fh.read(sum(map(len, lines)))  # at most what the history gives
        logged = 0
        for line in lines:
            if not have.startswith(line):
                break
            have, logged = have[len(line) :], logged + 1
        self._write_records(self.history if self.logs is not None and self.logs.tb_new else self.history[logged:])

    def _step_cost(self, ran: list) -> dict:
        """Cost-model FLOPs and bytes of one training step of the variants that ran this epoch
        (``ran``: [(artifacts, steps)], their average weighted by steps), custom nodes at their
        expected values."""
        ran = [(a, k) for a, k in ran if a is not None and k > 0]
        costs = [(self._variant_cost(a), k) for a, k in ran]
        if not costs or any(not c for c, _ in costs):
            return {}
        n = sum(k for _, k in costs)
        return {key: sum(c[key] * k for c, k in costs) / n for key in ("flops_per_step", "bytes_per_step")}

    def _variant_cost(self, art) -> dict:
        """One variant's cost-model FLOPs and bytes per step, computed once per variant (held by
        id with the artifacts, so the id stays theirs)."""
        got = self._cost_of.get(id(art))
        if got is None:
            cost = {}
            try:
                c = graph_costs(training_graph(art), art.config.get("optimizer", "adamw"))["total"]
                cost = {"flops_per_step": c["flops"], "bytes_per_step": c["bytes"]}
            except Exception:  # accounting must never stop training
                pass
            got = self._cost_of[id(art)] = (art, cost)
        return got[1]

    def summary(self) -> dict:
        h = self.history
        best = max(h, key=lambda m: m["test_acc"]) if h else None
        return {
            "config": self.name,
            "epochs": len(h),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "final_test_acc": h[-1]["test_acc"] if h else None,
            "best_test_acc": best["test_acc"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "final_val_acc": h[-1].get("val_acc") if h else None,
            "best_val_acc": max((m["val_acc"] for m in h if "val_acc" in m), default=None),
            "train_time": self.train_time,
            "wall_time": self.wall_time,
            "setup_seconds": self.setup_seconds,
            "mean_images_per_second": float(np.mean([m["images_per_second"] for m in h])) if h else None,
            "decisions": [d for m in h for d in m.get("decisions", [])],
            "controllers": {a.name: a.report() for a in self.algorithms},
            "engine": self.engine.engine_report(),
            "history": h,
        }
