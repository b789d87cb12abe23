"""``accelc train``: train compiled artifacts on ORT Training (in a supervised worker, or ranks)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .. import api, checks
from ..compiler.artifact_dir import load_artifacts
from ..compiler.errors import AccelcError, show
from ..compiler.model import check_step_memory
from ..launch import local_threads, torchrun_config, train_supervised
from ..runtime.config import parse_kernel_choices
from ..runtime.data import check_data
from ..runtime.distributed import DEFAULT_TIMEOUT_S, MAX_WORLD
from ..runtime.spec import TrainSpec
from ..runtime.train import train
from .args import DataArgs, ExecArgs, MemoryArgs, OutputArgs, Tool, TrainingArgs
from .summary import training_summary


class Train(Tool):
    """Train compiled artifacts on ORT Training: metrics.jsonl, summary.json, plot, checkpoints."""

    name = "train"
    examples = (
        "accelc train art --data fashion-mnist --epochs 3 -o run",
        "accelc train art --data synthetic:2000 --epochs 5 -o run --resume",
        "accelc train art --data synthetic:2000 --epochs 8 -o run --resume --allow-change epochs",
        "accelc train art --kernel conv=ort -o run-ort-convs",
        "accelc train art --layout nhwc -o run-nhwc",
        "accelc train art --data fashion-mnist --epochs 16 --lr-schedule linear -o run-budget16",
    )

    def add_arguments(self, p):
        p.add_argument("artifacts", help="artifact directory made by accelc compile")
        DataArgs().add(p)
        TrainingArgs().add(p, lr=None, lr_help="learning rate (default: the one compiled in)", schedule=True)
        ExecArgs().add(p)
        MemoryArgs().add(p)
        OutputArgs().add(p, output="run", what="run directory", force_help="replace a non-empty run directory")
        p.add_argument(
            "--resume",
            action="store_true",
            help="continue from the run directory's last checkpoint (verified: same artifacts, data and settings)",
        )
        p.add_argument(
            "--allow-change",
            metavar="SETTINGS",
            default=None,
            help="with --resume: settings that may differ from the checkpoint's, comma-separated: "
            "batch-size, epochs (e.g. --resume --epochs 10 --allow-change epochs)",
        )
        g = p.add_argument_group("data-parallel training (torch.distributed: gloo on CPU, NCCL on CUDA)")
        g.add_argument(
            "--nproc",
            type=int,
            default=1,
            metavar="N",
            help="train on N processes of this machine, data-parallel: each trains 1/N of every "
            "--batch-size batch (the global batch, a multiple of N) with the cores shared among them; "
            "gradients are averaged before every step, so the result is the one-process run's. "
            "Several machines: start 'torchrun --nnodes M --nproc-per-node N ... -m accelc train ...' "
            "on each instead (default 1), e.g. --nproc 2",
        )
        g.add_argument(
            "--dist-timeout",
            type=float,
            default=DEFAULT_TIMEOUT_S,
            metavar="SECONDS",
            help=f"end the job when a rank waits this long for the others (default {DEFAULT_TIMEOUT_S:g})",
        )
        p.add_argument(
            "--log",
            metavar="{csv,tensorboard,none}[,...]",
            default="csv",
            help="logs besides metrics.jsonl, comma-separated: csv (metrics.csv, steps.csv), tensorboard "
            "(RUN_DIR/tensorboard/, needs the tensorboard package), none (default: csv), e.g. --log csv,tensorboard",
        )
        p.add_argument(
            "--in-process",
            action="store_true",
            help="train in this process (default: in a supervised worker process, so a native crash "
            "inside ONNX Runtime is reported with what was saved)",
        )

    @staticmethod
    def spec(a) -> TrainSpec:
        """The run the arguments describe, checked as :func:`accelc.train` checks its own."""
        return api.train_spec(
            a.artifacts,
            a.data,
            epochs=a.epochs,
            batch_size=a.batch_size,
            run_dir=a.output,
            device=a.device,
            seed=a.seed,
            resume=a.resume,
            lr=a.lr,
            lr_schedule=a.lr_schedule,
            threads=a.threads,
            train_limit=a.train_limit,
            test_limit=a.test_limit,
            force=a.force,
            progress=not a.quiet,
            kernels=parse_kernel_choices(a.kernel),
            layout=a.layout,
            memory_limit_gb=a.memory_limit,
            allow_change=a.allow_change or (),
            nproc=a.nproc,
            dist_timeout=a.dist_timeout,
            log=a.log,
        )

    def run(self, a):
        checks.positive_int("--nproc", a.nproc, MAX_WORLD)
        checks.positive_float("--dist-timeout", a.dist_timeout, 86400)
        if a.in_process and a.nproc > 1:
            raise AccelcError(
                f"--in-process trains in this one process and --nproc {a.nproc} starts {a.nproc} processes: "
                "give one or the other"
            )
        dist = torchrun_config(os.environ, a.dist_timeout)  # this process's rank under torchrun, or None
        if dist is not None and a.nproc > 1:
            raise AccelcError(
                "--nproc starts its own processes: under torchrun, leave it out (torchrun sets the ranks)"
            )
        world = dist.world_size if dist else a.nproc
        if a.batch_size % world:
            raise AccelcError(
                f"--batch-size {a.batch_size} (the global batch) must be a multiple of the number of processes ({world})"
            )
        if a.threads is None and world > 1:  # the cores shared among this machine's ranks
            a.threads = local_threads(os.environ, a.nproc if dist is None else world)
        spec = self.spec(a)
        if a.in_process:
            summary = train(spec, dist=dist)
        else:
            # check what can be checked cheaply here, then train in supervised workers that hold
            # this process's lock on the run directory and die with it
            self.check_inputs(spec)
            rc = train_supervised(spec, dist, verbose=a.verbose)
            if rc or (dist is not None and dist.rank != 0):
                return rc
            summary = _read_json(Path(a.output) / "summary.json")
        if not a.quiet and (dist is None or dist.rank == 0) and summary:
            self.print_summary(a, summary)
        return 0

    @staticmethod
    def check_inputs(spec: TrainSpec) -> None:
        """The artifacts, the step's memory and the data, refused here in one line before a worker starts."""
        art, _ = load_artifacts(spec.artifacts)
        where = f"training at --batch-size {spec.batch_size}"
        check_step_memory(art.info, spec.batch_size, spec.memory_limit_gb, where)
        check_data(
            spec.data,
            art.info.input_shape,
            art.info.num_classes,
            spec.train_limit,
            spec.test_limit,
            memory_limit_gb=spec.memory_limit_gb,
        )

    @staticmethod
    def print_summary(a, s: dict) -> None:
        for line in training_summary(s, _read_json(Path(a.artifacts) / "plan.json").get("controllers"),
                                     _read_json(Path(a.artifacts) / "report.json")):  # fmt: skip
            print(line)
        print(
            f"final test accuracy {s['final_test_acc']:.4f} (best {s['best_test_acc']:.4f} at epoch "
            f"{s['best_epoch']}), {s['train_time']:.1f}s training; wrote {show(a.output)}/"
        )


def _read_json(path: Path) -> dict:
    """A JSON file train has already verified (plan.json, report.json), or {} where it cannot be read."""
    try:
        v = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return v if isinstance(v, dict) else {}
