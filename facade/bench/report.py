"""``bench.md``: the report of ``accelc bench`` in markdown."""

from __future__ import annotations


def _f(x, fmt="{:.3f}"):
    return "—" if x is None else fmt.format(x)


def _range(r, fmt="{:.1f}"):
    return "—" if not r else f"{fmt.format(r[0])}–{fmt.format(r[1])}"


def markdown(rep: dict) -> str:
    split = rep.get("decided_on", "test")
    seeds = rep.get("seeds") or [rep["seed"]]
    lines = [
        f"# accelc bench — {rep['model']} on {rep['data']}",
        "",
        f"Up to {rep['epochs']} epochs, batch {rep['batch_size']}, lr {rep['lr']}, seeds "
        f"{', '.join(str(s) for s in seeds)} (configurations interleaved per seed), repeats {rep['repeats']}; "
        f"{rep['train_images']} training / {rep.get('val_images', 0)} validation / {rep['test_images']} test "
        f"images. Machine: {rep['machine']['platform']}, {rep['machine']['cpus']} CPUs, "
        f"ORT {rep['machine']['onnxruntime']}, torch {rep['machine']['torch']}. Date {rep['date']}.",
        "",
        f"Target accuracy: {_f(rep['target_acc'], '{:.4f}')} ({rep['target_rule']}), judged on the {split} "
        "split; the test split only reports. Time to target is training seconds to the end of the first "
        "epoch that reached it at full input size (a low-resolution stage does not count; evaluation "
        "excluded, shown apart; the algorithms' setup before the first step, such as reuse's layer "
        "measurement, included): median and min–max over the runs that reached it. Ratios are ratios of "
        "those medians, given only where both reached the target on every seed."
        + (" Each configuration stopped at the target." if rep.get("stop_at_target") else ""),
        "",
        "| config | reached | time to target (s) | min–max | eval (s) | test acc at target | final test acc "
        "| min–max | ×torch | ×torch-amp | ×ort |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c, r in rep["configs"].items():
        lines.append(
            f"| {c} | {r.get('reached', 0)}/{r.get('runs', 1)} | {_f(r['time_to_target'], '{:.1f}')} "
            f"| {_range(r.get('time_to_target_range'))} | {_f(r.get('eval_time_to_target'), '{:.1f}')} "
            f"| {_f(r.get('test_acc_at_target'), '{:.4f}')} | {r['final_test_acc']:.4f} "
            f"| {_range(r.get('final_test_acc_range'), '{:.4f}')} "
            f"| {_f(r.get('time_to_target_ratio_vs_torch'), '{:.2f}')} "
            f"| {_f(r.get('time_to_target_ratio_vs_torch-amp'), '{:.2f}')} "
            f"| {_f(r.get('time_to_target_ratio_vs_ort'), '{:.2f}')} |"
        )
    for c, why in (rep.get("not_run") or {}).items():
        lines.append(f"| {c} | not run: {why} | | | | | | | | | |")
    lines += [
        "",
        "| config | s/epoch (median) | ms/step | setup (s) | training time (s) | ×torch (epoch) | ×ort (epoch) "
        "| best test acc | ops −% | bytes −% | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c, r in rep["configs"].items():
        lines.append(
            f"| {c} | {r['epoch_seconds']:.2f} | {r['ms_per_step']:.1f} | {r.get('setup_seconds', 0.0):.1f} "
            f"| {r['train_time']:.1f} "
            f"| {_f(r.get('epoch_ratio_vs_torch'), '{:.2f}')} | {_f(r.get('epoch_ratio_vs_ort'), '{:.2f}')} "
            f"| {r['best_test_acc']:.4f} "
            f"| {_f(r.get('op_reduction'), '{:.1%}')} | {_f(r.get('bandwidth_reduction'), '{:.1%}')} "
            f"| {r.get('peak_rss_mb', 0):.0f} |"
        )
    dec = [(c, d) for c, r in rep["configs"].items() for d in r.get("decisions", [])]
    if dec:
        lines += ["", "Controller decisions (first run):", ""]
        lines += [f"- {c}, epoch {d['epoch']}: {d['action']}: {d['why']}" for c, d in dec]
    return "\n".join(lines) + "\n"
