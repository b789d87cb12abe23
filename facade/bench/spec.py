"""What one ``accelc bench`` run is asked to do: :class:`BenchSpec`, built once by
:func:`accelc.bench.run_bench` from its keywords (:class:`BenchSettings`) and read by everything
after it."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from typing import Any, TypedDict

from ..compiler.artifacts import DEFAULT_LR


class BenchSettings(TypedDict, total=False):
    """The keywords :func:`accelc.bench.run_bench` takes besides the model, data, epochs,
    configurations and output folder (their meaning: :class:`BenchSpec`)."""

    batch_size: int
    seed: int
    lr: float
    lr_schedule: str
    repeats: int
    train_limit: int | None
    test_limit: int | None
    target: str
    progress: bool
    threads: int | None
    input_shape: tuple | None
    force: bool
    pass_options: dict | None
    seeds: Any
    val_split: Any
    stop_at_target: bool


@dataclass(frozen=True)
class BenchSpec:
    """One benchmark: the model (a zoo name or an ONNX path), the data (a source string or arrays
    held in memory), up to ``epochs`` epochs of every configuration in ``configs`` (parsed: name ->
    {"engine", "passes", "options", "opt"}) once per seed in ``seeds`` and per repeat, written to
    ``out_dir``. ``target``: ort-best, torch-best-0.2 or an accuracy, judged on the validation split
    ``val_split``; ``stop_at_target``: stop a configuration at the epoch that reached a fixed target.
    ``lr_schedule``: the learning rate over the ``epochs`` (``--lr-schedule``; every configuration,
    torch's included, follows it step by step);
    ``seed``: the one seed when ``seeds`` is not given; ``pass_options``: the pass flags as given
    (already applied to ``configs``)."""

    model: str
    data: Any
    epochs: int
    configs: Any
    out_dir: Any
    batch_size: int = 64
    seed: int = 0
    lr: float = DEFAULT_LR
    lr_schedule: str = "constant"
    repeats: int = 1
    train_limit: int | None = None
    test_limit: int | None = None
    target: str = "ort-best"
    progress: bool = True
    threads: int | None = None
    input_shape: tuple | None = None
    force: bool = False
    pass_options: dict | None = None
    seeds: Any = None
    val_split: Any = "auto"
    stop_at_target: bool = False

    @property
    def first_seed(self) -> int:
        """The seed of the first run (its weights give the reference artifacts and the baseline check)."""
        return self.seeds[0]


def check_keywords(function: str, settings: dict, keywords) -> None:
    """A keyword in ``settings`` that ``keywords`` (a TypedDict) lacks is the TypeError Python
    raises for it."""
    for k in settings:
        if k not in keywords.__annotations__:
            raise TypeError(f"{function}() got an unexpected keyword argument '{k}'")


def keyword_signature(fn, spec, keywords) -> None:
    """``fn``'s signature with its ``**settings`` spelt out (``keywords``, a TypedDict: keyword-only,
    with the defaults of the dataclass ``spec``), for help() and editors."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    field = {f.name: f for f in fields(spec)}
    params += [
        inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=field[k].default, annotation=field[k].type)
        for k in keywords.__annotations__
    ]
    fn.__signature__ = sig.replace(parameters=params)
