"""Run checkpoints: numpy ``.npz`` arrays (loaded with allow_pickle=False) plus a JSON file.

Both are written to temporary files and renamed, arrays first; ``checkpoint.json`` names the
array file it belongs to, so a crash between the two renames leaves the previous pair valid.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from ..compiler.errors import AccelcError
from ..compiler.fileio import atomic_write_bytes, atomic_write_text

META = "checkpoint.json"


def save(run_dir: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    run_dir = Path(run_dir)
    epoch = meta["epoch"]
    name = f"checkpoint-{epoch:04d}.npz"
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    atomic_write_bytes(run_dir / name, buf.getvalue())
    meta = dict(meta, arrays=name)
    atomic_write_text(run_dir / META, json.dumps(meta, indent=1))
    for old in run_dir.glob("checkpoint-*.npz"):  # keep the current file only
        if old.name != name:
            try:
                old.unlink()
            except OSError:
                pass


def load(run_dir: Path) -> tuple[dict[str, np.ndarray], dict] | None:
    run_dir = Path(run_dir)
    if not (run_dir / META).exists():
        return None
    try:
        meta = json.loads((run_dir / META).read_text())
        with np.load(run_dir / meta["arrays"], allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError) as e:
        raise AccelcError(f"checkpoint in '{run_dir}' is unreadable: {e}") from None
    return arrays, meta


def exists(run_dir) -> bool:
    return os.path.exists(os.path.join(run_dir, META))
