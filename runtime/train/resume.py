"""How a run starts: from a verified checkpoint on a resume, and (data-parallel) every rank from
rank 0's state. A part of :class:`~accelc.runtime.train.loop.Trainer`."""

from __future__ import annotations

import numpy as np

from ...compiler.errors import AccelcError, show
from .. import checkpoint as ckpt


class TrainerStart:
    """The :class:`~accelc.runtime.train.loop.Trainer`'s start: resume and the ranks' agreement."""

    def _load_resumed(self, pending: dict) -> None:
        """The checkpoint's arrays into the engine, loaded after the algorithms restored the
        variant (which must be the checkpoint's)."""
        stored = self._resume_meta["variant"]
        variant = self._variant() if isinstance(stored, dict) else self.engine.variant_name
        if stored != variant:
            raise ckpt.CheckpointError(
                f"the checkpoint in '{show(self.run_dir)}' is of variant {show(ckpt.variant_text(stored))}, "
                f"its controllers' state gives {show(ckpt.variant_text(variant))}"
            )
        stateful = self.engine.optimizer_kind != "sgd"
        ckpt.check_against(pending, self.engine.state_arrays(), self.run_dir, stateful)
        self.engine.load_state_arrays(pending)

    def _check_same_start(self) -> None:
        """Every rank starts from rank 0's epoch, variant, parameters and optimizer state (a rank
        that cannot read rank 0's checkpoint, e.g. a run directory that is not on a file system
        every machine shares, would otherwise train something else silently)."""
        import hashlib

        arrays = self.engine.state_arrays()
        h = hashlib.sha256()
        for k in sorted(arrays):
            h.update(k.encode())
            h.update(np.ascontiguousarray(arrays[k]).tobytes())
        mine = {
            "epoch": self.start_epoch,
            "variant": self._variant(),
            "state": h.hexdigest(),
        }
        main = self.dist.broadcast_json(mine, "the start check")
        bad = int(mine != main)
        if self.dist.sum([bad], "the start check")[0]:
            where = f"'{show(self.run_dir)}'" if self.run_dir else "its run directory"
            raise AccelcError(
                f"rank {self.dist.rank}: the ranks do not start from the same state "
                f"(rank 0: epoch {main['epoch'] + 1}, this rank: epoch {mine['epoch'] + 1}); with --resume every "
                f"rank reads rank 0's checkpoint from {where}, which must be on a file system all machines share"
                if bad
                else "the ranks do not start from the same state: another rank could not read rank 0's checkpoint "
                "(with --resume the run directory must be on a file system all machines share)"
            )

    def _resume(self) -> dict:
        """The verified checkpoint: refused whole (one line) when it is damaged, belongs to other
        artifacts or was written with other settings."""
        arrays, meta = ckpt.load(self.run_dir)
        self._resume_meta = meta
        if self.artifacts_sha and meta["artifacts_sha256"] != self.artifacts_sha:
            raise ckpt.CheckpointError(
                f"the checkpoint in '{show(self.run_dir)}' was trained from other artifacts "
                "(their files differ from the ones given); resume with the same artifact directory"
            )
        ckpt.compare_fingerprint(meta["fingerprint"], self.fingerprint, self.allow_change, self.run_dir)
        if meta["epoch"] + 1 > self.epochs:
            raise ckpt.CheckpointError(
                f"the checkpoint in '{show(self.run_dir)}' is at epoch {meta['epoch'] + 1}, past --epochs {self.epochs}"
            )
        self.history = meta["history"]
        self.start_epoch = meta["epoch"] + 1
        self.train_time = float(meta["train_time"])
        self.wall_time = float(meta["wall_time"])
        controllers = meta["controllers"]
        names = sorted(a.name for a in self.algorithms)
        if sorted(controllers) != names:
            raise ckpt.CheckpointError(
                f"the checkpoint in '{show(self.run_dir)}' holds state of controllers "
                f"{show(', '.join(sorted(controllers)) or 'none')}; this run has {show(', '.join(names) or 'none')}"
            )
        for a in self.algorithms:
            try:
                a.load_state_dict(controllers[a.name])
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
                raise ckpt.CheckpointError(
                    f"controller state of {show(a.name)} in '{show(self.run_dir / ckpt.META)}' is malformed "
                    f"({type(e).__name__})"
                ) from None
        self.engine.restore_layouts(meta.get("layouts", []))
        return arrays

    # ------------------------------------------------------------------ variants
