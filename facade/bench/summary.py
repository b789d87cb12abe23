"""The time-to-accuracy analysis of ``accelc bench``: ``--seeds`` and ``--target``, where each run
first reached the target, the operation and bandwidth reductions of a run, and the per-configuration
summary (medians and min–max over seeds and repeats, ratios against the baselines)."""

from __future__ import annotations

import statistics

from ..compiler import checks
from ..compiler.errors import InvalidValue, show


def _acc_key(history: list[dict]) -> str:
    """The accuracy that decides: validation when the run has a validation split, else test."""
    return "val_acc" if history and "val_acc" in history[0] else "test_acc"


def _full_size(m: dict, full_hw) -> bool:
    """An epoch of the model at its full input size (a low-resolution stage is another network on
    other images: its accuracy does not count towards the target)."""
    return full_hw is None or m.get("input_hw") is None or list(m["input_hw"]) == list(full_hw)


def _at_target(history: list[dict], target: float | None, full_hw=None) -> dict | None:
    """Where a run first reached ``target`` on its deciding split at full size: the epoch, its
    training time, the evaluation time spent up to then, and the *test* accuracy there (what the
    protocol reports)."""
    if target is None:
        return None
    key = _acc_key(history)
    eval_s = 0.0
    for m in history:
        eval_s += m.get("eval_seconds", 0.0) + m.get("val_seconds", 0.0)
        if m[key] >= target - 1e-9 and _full_size(m, full_hw):
            return {"epoch": m["epoch"], "train_time": m["train_time"], "eval_time": eval_s, "test_acc": m["test_acc"]}
    return None


def parse_seeds(seeds, seed: int = 0) -> list[int]:
    """``--seeds 0,1,2`` (a string or a list of integers); default: the one ``--seed``."""
    if seeds is None:
        return [checks.seed("--seed", seed)]
    items = seeds.split(",") if isinstance(seeds, str) else seeds
    if not isinstance(items, (list, tuple)) or not items or len(items) > 100:
        raise InvalidValue(f"--seeds must be a comma list of 1 to 100 seeds, got '{show(seeds)}'")
    out = []
    for v in items:
        try:
            v = int(v.strip()) if isinstance(v, str) else v
        except ValueError:
            raise InvalidValue(f"--seeds must be integers, got '{show(seeds)}'") from None
        out.append(checks.seed("--seeds", v))
    if len(set(out)) != len(out):
        raise InvalidValue(f"--seeds has a seed twice: '{show(seeds)}'")
    return out


def parse_target(spec, configs) -> float | None:
    """Validate ``--target``: ort-best (needs the ort configuration), torch-best-0.2 (needs torch)
    or an accuracy in (0, 1]; returns the number or None for the relative rules."""
    if spec == "ort-best":
        if "ort" not in configs:
            raise InvalidValue("--target ort-best needs the 'ort' configuration in --configs")
        return None
    if spec == "torch-best-0.2":
        if "torch" not in configs:
            raise InvalidValue("--target torch-best-0.2 needs the 'torch' configuration in --configs")
        return None
    try:
        v = float(spec)
    except (TypeError, ValueError):
        v = float("nan")
    if not (0.0 < v <= 1.0):
        raise InvalidValue(f"--target must be ort-best, torch-best-0.2 or an accuracy in (0, 1], got '{show(spec)}'")
    return v


def _reductions(history: list[dict], base: dict) -> dict:
    """Operation and bandwidth reduction of a run against the plain artifacts, over the steps run."""
    if not history or "flops_per_step" not in history[0]:
        return {}
    steps = sum(m["steps"] for m in history)
    ops = sum(m["steps"] * (m["flops_per_step"] - m.get("reuse_flops_saved_per_step", 0.0)) for m in history)
    by = sum(m["steps"] * m["bytes_per_step"] for m in history)
    return {"op_reduction": 1 - ops / (steps * base["flops"]), "bandwidth_reduction": 1 - by / (steps * base["bytes"])}


BASES = ("torch", "torch-amp", "ort")  # the ratios every row carries


def summarise(results: dict, target_spec: str, ds, batch_size: int, full_hw=None) -> dict:
    """Per configuration over its runs (seeds × repeats): time to the target as median and
    min–max over the runs that reached it, how many did, the test accuracy where they did, the
    evaluation time spent until then, final test accuracy, epoch time and ratios against the
    baselines (ratios of the medians)."""
    med = statistics.median
    rows = {}
    for c, runs in results.items():
        h0 = runs[0]["history"]
        per_epoch = [m["train_seconds"] for s in runs for m in s["history"]]
        steps = h0[0]["steps"] if h0 else 1
        key = _acc_key(h0)
        finals = [s["final_test_acc"] for s in runs]
        rows[c] = {
            "runs": len(runs),
            "seeds": [s.get("seed") for s in runs],
            "epoch_seconds": med(per_epoch),
            "ms_per_step": 1000 * med(per_epoch) / steps,
            "final_test_acc": med(finals),
            "final_test_acc_range": [min(finals), max(finals)],
            "best_test_acc": med([s["best_test_acc"] for s in runs]),
            "best_deciding_acc": med([max(m[key] for m in s["history"]) for s in runs]),
            "train_time": med([s["train_time"] for s in runs]),
            # what the algorithms spent before the first step (counted in the training time)
            "setup_seconds": med([s.get("setup_seconds", 0.0) for s in runs]),
            "decisions": runs[0]["decisions"],
            "histories": [s["history"] for s in runs],
            "controllers": runs[0].get("controllers", {}),
            "peak_rss_mb": med([s.get("peak_rss_mb", 0.0) for s in runs]),
            # per run, every layout the engine's --layout auto chose by measuring (None: forced)
            "layouts": [((s.get("engine") or {}).get("layout") or {}).get("choices") for s in runs],
        }
        if "op_reduction" in runs[0]:
            rows[c]["op_reduction"] = med([s["op_reduction"] for s in runs])
            rows[c]["bandwidth_reduction"] = med([s["bandwidth_reduction"] for s in runs])
    target = None
    if target_spec == "ort-best" and "ort" in rows:
        target = rows["ort"]["best_deciding_acc"]
    elif target_spec == "torch-best-0.2" and "torch" in rows:  # 0.2 points of accuracy
        target = rows["torch"]["best_deciding_acc"] - 0.002
    else:
        try:
            target = float(target_spec)
        except ValueError:
            target = None
    for r in rows.values():
        hits = [_at_target(h, target, full_hw) for h in r["histories"]]
        got = [x for x in hits if x is not None]
        r["reached"] = len(got)
        r["at_target"] = hits
        r["time_to_target"] = med([x["train_time"] for x in got]) if got else None
        r["time_to_target_range"] = (
            [min(x["train_time"] for x in got), max(x["train_time"] for x in got)] if got else None
        )
        r["all_reached"] = len(got) == len(hits) and target is not None
        r["test_acc_at_target"] = med([x["test_acc"] for x in got]) if got else None
        r["eval_time_to_target"] = med([x["eval_time"] for x in got]) if got else None
        r["epochs_to_target"] = med([x["epoch"] for x in got]) if got else None
    for r in rows.values():
        for base in BASES:
            if base not in rows:
                continue
            r[f"epoch_ratio_vs_{base}"] = r["epoch_seconds"] / rows[base]["epoch_seconds"]
            # a ratio of medians only where both reached the target in every run: a median over the
            # seeds that got there would compare a configuration's lucky seeds with all of the baseline's
            tb = rows[base]["time_to_target"]
            both = r["all_reached"] and rows[base]["all_reached"]
            r[f"time_to_target_ratio_vs_{base}"] = r["time_to_target"] / tb if both and tb else None
    return {"target_acc": target, "target_rule": target_spec, "configs": rows}
