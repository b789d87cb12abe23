"""``accelc bench``: configurations side by side on one model, initial weights, data order and
hyper-parameters, in one process, one after the other.

Configurations: ``torch`` (torch eager, the baseline users would otherwise run), ``ort`` (the
artifacts without passes) and ``ort+PASS[+PASS...]`` (artifacts compiled with those passes and
their controllers; ``ort+all`` = ``ort+rescale+reuse+skip``). ``--repeats R`` runs the whole set R
times, interleaved, and reports medians.

Per configuration: time per epoch and step, time to the target accuracy, final and best accuracy,
ratios against torch and ort, operation and bandwidth reduction (cost-model FLOPs and bytes of
every step actually run — the variant of each epoch, reuse at its measured remain ratio — against
the plain ``ort`` artifacts), and peak resident memory while the configuration trained.
Writes bench.json, bench.md, accuracy_vs_time.png and controllers.png (skip timeline, remain
ratio per reused layer, resolution stage).

The modules: :mod:`.configs` (which configurations, ``--config-file``), :mod:`.spec` (what a run
is asked to do: :class:`BenchSpec`), :mod:`.run` (:func:`run_bench`, the memory sampler),
:mod:`.summary` (seeds, target, time to target, the per-configuration summary), :mod:`.report`
(bench.md) and :mod:`.plots` (the figures).
"""

from __future__ import annotations

from .configs import BASELINES, CONFIG_FILE_SCHEMA, MAX_CONFIG_FILE, config_passes, parse_configs
from .plots import plot_bench, plot_controllers, plot_time_to_target
from .report import markdown
from .run import PeakRSS, bf16_capable, run_bench
from .spec import BenchSettings, BenchSpec
from .summary import BASES, _at_target, _reductions, parse_seeds, parse_target, summarise

__all__ = [
    "BASELINES",
    "BASES",
    "CONFIG_FILE_SCHEMA",
    "MAX_CONFIG_FILE",
    "BenchSettings",
    "BenchSpec",
    "PeakRSS",
    "_at_target",
    "_reductions",
    "bf16_capable",
    "config_passes",
    "markdown",
    "parse_configs",
    "parse_seeds",
    "parse_target",
    "plot_bench",
    "plot_controllers",
    "plot_time_to_target",
    "run_bench",
    "summarise",
]
