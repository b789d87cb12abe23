"""``accelc train``: train compiled artifacts on ORT Training (in a supervised worker, or ranks)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .. import api, checks
from ..compiler.artifact_dir import load_artifacts
from ..compiler.errors import AccelcError, show
from ..compiler.model import check_step_memory
from ..launch import launch_local, local_threads, supervise, torchrun_config
from ..runtime.data import check_data
from ..runtime.distributed import DEFAULT_TIMEOUT_S, MAX_WORLD, DistConfig
from ..runtime.runlock import die_with_parent
from ..runtime.train import open_run_dir, release_run_dir
from . import messages
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
    )

    def add_arguments(self, p):
        p.add_argument("artifacts", help="artifact directory made by accelc compile")
        DataArgs().add(p)
        TrainingArgs().add(p, lr=None, lr_help="learning rate (default: the one compiled in)")
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
        p.add_argument("--dist-rank", type=int, default=None, help=argparse.SUPPRESS)  # worker of --nproc
        p.add_argument("--dist-world", type=int, default=None, help=argparse.SUPPRESS)
        p.add_argument("--dist-init", default=None, help=argparse.SUPPRESS)
        p.add_argument("--error-fd", type=int, default=None, help=argparse.SUPPRESS)  # worker: its error line
        p.add_argument("--lock-fd", type=int, default=None, help=argparse.SUPPRESS)  # worker: the parent's lock
        p.add_argument("--supervised-by", type=int, default=None, help=argparse.SUPPRESS)  # worker: parent PID
        p.add_argument(
            "--in-process",
            action="store_true",
            help="train in this process (default: in a supervised worker process, so a native crash "
            "inside ONNX Runtime is reported with what was saved)",
        )

    @staticmethod
    def dist_config(a):
        """This process's rank: from --nproc's hidden worker flags, from torchrun's environment,
        or None (one process)."""
        if a.dist_rank is not None:
            return DistConfig(
                rank=a.dist_rank, world_size=a.dist_world, init_method=a.dist_init, timeout_s=a.dist_timeout
            )
        return torchrun_config(os.environ, a.dist_timeout)

    def run(self, a):
        if a.supervised_by is not None and (not a.in_process or a.supervised_by != os.getppid()):
            # the PID of the accelc process that started this worker (its parent), never a user's
            raise AccelcError(
                "--supervised-by is accelc's own flag for the training worker it starts; leave it out "
                "(to train in this process, give --in-process)"
            )
        checks.positive_int("--nproc", a.nproc, MAX_WORLD)
        checks.positive_float("--dist-timeout", a.dist_timeout, 86400)
        if a.in_process and a.nproc > 1 and a.dist_rank is None:
            raise AccelcError(
                f"--in-process trains in this one process and --nproc {a.nproc} starts {a.nproc} processes: "
                "give one or the other"
            )
        dist = self.dist_config(a)
        if dist is not None and a.nproc > 1 and a.dist_rank is None:
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
        if a.error_fd is not None:
            messages.set_error_fd(a.error_fd)
        if not a.in_process:
            # check what can be checked cheaply here, lock the run directory, then train in a
            # supervised worker that holds the same lock and dies with this process
            api.check_train_args(
                epochs=a.epochs,
                batch_size=a.batch_size,
                seed=a.seed,
                lr=a.lr,
                threads=a.threads,
                train_limit=a.train_limit,
                test_limit=a.test_limit,
                device=a.device,
                data=a.data,
                memory_limit_gb=a.memory_limit,
            )
            art, _ = load_artifacts(a.artifacts)
            check_step_memory(art.info, a.batch_size, a.memory_limit, f"training at --batch-size {a.batch_size}")
            check_data(
                a.data,
                art.info.input_shape,
                art.info.num_classes,
                a.train_limit,
                a.test_limit,
                memory_limit_gb=a.memory_limit,
            )
            ExecArgs.config(a)
            worker = a.argv + ["--in-process", "--supervised-by", str(os.getpid())]
            if dist is not None and dist.rank != 0:  # a torchrun rank that does not write the run directory
                return supervise(
                    worker + ["--threads", str(a.threads)], Path(os.path.abspath(a.output)), None, a.epochs
                )
            rd, lock = open_run_dir(a.output, a.resume, a.force, protect=[a.artifacts])
            try:
                if a.nproc > 1:
                    return launch_local(worker, a.nproc, rd, lock, a.epochs, a.threads)
                if a.threads is not None:
                    worker += ["--threads", str(a.threads)]
                return supervise(worker + ["--lock-fd", str(lock.fd)], rd, lock, a.epochs)
            finally:
                release_run_dir(rd, lock, lock.created)
        if a.supervised_by is not None:
            die_with_parent(a.supervised_by)
            messages.set_supervised()
        s = api.train(
            a.artifacts,
            a.data,
            a.epochs,
            a.batch_size,
            a.output,
            a.device,
            a.seed,
            a.resume,
            a.lr,
            a.threads,
            a.train_limit,
            a.test_limit,
            a.force,
            progress=not a.quiet,
            kernels=ExecArgs.config(a).kernels,
            allow_change=a.allow_change or (),
            memory_limit_gb=a.memory_limit,
            log=a.log,
            _lock_fd=a.lock_fd,
            _dist=dist,
        )
        if not a.quiet and (dist is None or dist.rank == 0):
            for line in training_summary(s, _read_json(Path(a.artifacts) / "plan.json").get("controllers"),
                                         _read_json(Path(a.artifacts) / "report.json")):  # fmt: skip
                print(line)
            print(
                f"final test accuracy {s['final_test_acc']:.4f} (best {s['best_test_acc']:.4f} at epoch "
                f"{s['best_epoch']}), {s['train_time']:.1f}s training; wrote {show(a.output)}/"
            )
        return 0


def _read_json(path: Path) -> dict:
    """A JSON file train has already verified (plan.json, report.json), or {} where it cannot be read."""
    try:
        v = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return v if isinstance(v, dict) else {}
