"""``accelc bench``: run several configurations side by side on the same model, weights and data."""

from __future__ import annotations

from .. import checks
from ..bench import markdown, parse_configs, run_bench
from ..compiler.errors import AccelcError, show
from ..scaling import markdown as scaling_markdown
from ..scaling import run_scaling
from .args import DataArgs, OutputArgs, PassArgs, Tool, TrainingArgs

DEFAULT_CONFIGS = "torch,ort"


class Bench(Tool):
    """Run configurations (torch eager, ORT, ORT + passes) side by side; write bench.json/.md and plots."""

    name = "bench"
    examples = (
        "accelc bench --model vgg --data fashion-mnist --configs torch,ort,ort+skip -o bench-out",
        "accelc bench --model cnn3-small --configs ort,ort+skip --skip-rule lars --skip-policy suffix --skip-tau 1.5 --epochs 2",
        "accelc bench --model vgg --config-file benchmarks/bench-vgg32.json --input-shape 1,32,32 -o bench-out",
        "accelc bench --model vgg --data fashion-mnist --train-limit 4096 --nproc 2 -o scaling-out",
        "accelc bench --model vgg --data fashion-mnist --input-shape 1,32,32 --target 0.88 --seeds 0,1,2 "
        "--epochs 8 --configs torch,ort,ort+skip -o tta-out",
    )

    def add_arguments(self, p):
        p.add_argument("--model", default="vgg", help="zoo model name or ONNX path (default vgg)")
        DataArgs().add(p)
        TrainingArgs().add(p, schedule=True)
        p.add_argument(
            "--configs",
            default=None,
            metavar="CONFIG[,CONFIG...]",
            help="comma list of torch (eager), torch-amp (eager, bf16 autocast), torch-cl (eager, channels_last), "
            "ort, ort-noopt, "
            f"ort+PASS[+PASS...], ort+all (every pass) (default {DEFAULT_CONFIGS}, or none with --config-file); "
            "pass options: the same flags as compile (below), for every configuration that runs the pass",
        )
        p.add_argument(
            "--config-file",
            default=None,
            metavar="FILE.json",
            help='named configurations with options of their own, e.g. {"configs": ["torch", "ort", '
            '{"name": "reuse-off", "passes": ["reuse"], "options": {"reuse": {"strategy": "off"}}}]}',
        )
        p.add_argument("--repeats", type=int, default=1, help="run every configuration R times, report medians")
        p.add_argument(
            "--seeds",
            default=None,
            metavar="S[,S...]",
            help="run every configuration once per seed (initial weights of a zoo model and data order), "
            "configurations interleaved per seed; reports median and min–max time to target and how many "
            "seeds reached it, e.g. --seeds 0,1,2 (default: --seed)",
        )
        p.add_argument(
            "--target",
            default="ort-best",
            help="target accuracy, judged on the validation split: a number such as 0.88 (a fixed target, "
            "as MLPerf), ort-best (default: ort's best) or torch-best-0.2 (torch eager's best minus 0.2 points)",
        )
        p.add_argument(
            "--val-split",
            default="auto",
            metavar="N|FRACTION|auto",
            help="hold out the last N (or FRACTION of the) training images as the validation split that "
            "decides the target and the controllers; the test split only reports. auto (default): "
            "min(5000, 10%%), none under 1000 training images; 0: none (decided on test, flagged)",
        )
        p.add_argument(
            "--stop-at-target",
            action="store_true",
            help="stop each configuration after the epoch that reached the (fixed) target; final accuracy "
            "is then the accuracy at the target",
        )
        p.add_argument("--threads", type=int, default=None, help="threads for ORT and torch (default: all cores)")
        p.add_argument(
            "--input-shape",
            default=None,
            help="C,H,W of a zoo model's input (default: the model's own; "
            "rescale needs a final feature map divisible by its factor)",
        )
        p.add_argument(
            "--nproc",
            type=int,
            default=None,
            metavar="N",
            help="measure data-parallel scaling instead of comparing configurations: the same training "
            "with 1..N processes of one thread each (and 1 process with every core), interleaved; "
            "writes scaling.json/.md/.png with the all-reduce cost per step, e.g. --nproc 2",
        )
        PassArgs().add(p, selection=False)
        OutputArgs().add(p, output="bench-out", what="output directory")

    def run(self, a):
        if a.epochs <= 0 or a.repeats <= 0:
            raise AccelcError("--epochs and --repeats must be positive")
        if a.nproc is not None:
            if a.threads is not None:
                raise AccelcError("--nproc sets the threads itself (1 per process, and all cores for one process)")
            given = [
                flag
                for flag, changed in (
                    ("--seeds", a.seeds is not None),
                    ("--stop-at-target", a.stop_at_target),
                    ("--val-split", a.val_split != "auto"),
                    ("--target", a.target != "ort-best"),
                )
                if changed
            ]
            if given:
                raise AccelcError(
                    f"--nproc measures throughput only; {', '.join(given)} apply to the configuration comparison"
                )
            rep = run_scaling(
                a.model,
                a.data,
                a.epochs,
                a.output,
                a.nproc,
                batch_size=a.batch_size,
                seed=a.seed,
                lr=a.lr,
                repeats=a.repeats,
                train_limit=a.train_limit,
                test_limit=a.test_limit,
                input_shape=checks.input_shape("--input-shape", a.input_shape) if a.input_shape else None,
                force=a.force,
                progress=not a.quiet,
            )
            if not a.quiet:
                print(scaling_markdown(rep))
                print(f"wrote {show(a.output)}/scaling.json, scaling.md, scaling.png")
            return 0
        text = a.configs if a.configs is not None or a.config_file is not None else DEFAULT_CONFIGS
        configs = parse_configs(text, PassArgs.options(a, None), a.config_file)
        rep = run_bench(
            a.model,
            a.data,
            a.epochs,
            configs,
            a.output,
            batch_size=a.batch_size,
            seed=a.seed,
            lr=a.lr,
            lr_schedule=a.lr_schedule,
            repeats=a.repeats,
            train_limit=a.train_limit,
            test_limit=a.test_limit,
            target=a.target,
            progress=not a.quiet,
            threads=a.threads,
            input_shape=checks.input_shape("--input-shape", a.input_shape) if a.input_shape else None,
            force=a.force,
            seeds=a.seeds,
            val_split=a.val_split,
            stop_at_target=a.stop_at_target,
        )
        if not a.quiet:
            print(markdown(rep))
            print(
                f"wrote {show(a.output)}/bench.json, bench.md, accuracy_vs_time.png, time_to_target.png, "
                "controllers.png"
            )
        return 0
