"""A sweep axis: one recipe-config key swept outside the grid (SMASH Figures 3 and 4,
Prompt-Distiller Figure 2).

The grid's points are candidates: per (method, task, split) the best on dev is chosen. An
axis's values are not: each is a result of its own, so a cell of the report is (method, task,
axis point), with the grid still selected by dev inside each, and the report prints a table
per point and a line figure over the points (mean test metric, std shaded, a line per
method), as the papers plot K and the prompt variants.

    axis:
      key: k                       # any recipe-config key: k, template, verbalizer, ...
      values: [16, 32, 64, 128, 256]
      overrides:                   # optional, one mapping per value: recipe overrides that go
        - {max_steps: 1000}        # with it (SMASH App. A.1: steps per K)
        - ...
      title: K                     # the figure's x label (default: the key)

`values` is one list for every task or `{TASK: [...]}` (lists of one length: point i of every
task is one table). A value may be `{by_seed: {SEED: value}}`, one per split: LM-BFF searched
its automatic templates and label words per split (`auto_template/TASK/16-SEED.sort.txt`) and
says to use each split's own. `names` name the points (tables, run names, ticks); default
`<key><value>` for numbers (`k16`), else `<key><i>` from 1 (`template2`).

Without a `key`, a value sets nothing by itself: the methods read it as `{axis}` in their
overrides (`sweep.methods`). SMASH Figure 2 plots prompt-based FT from each distillation
setting's student over distillation steps: `init: "{distilled:s1@{axis}}"` with the axis's
values the steps (`SweepConfig.distilled`). A method with no `{axis}` runs once per point
with the same config, so its line is flat up to noise (its cost repeated per point).

With `key: k`, the sweep's own `k` is the K of the data root's splits (LM-BFF: 16); a K the
root lacks is drawn from the task's original data (`OriginalData`, `SweepConfig.original_data`)
with LM-BFF's procedure (`fewshot.draw_lmbff_split`) before any trial, once, under
`<experiment>/splits/`, where every node's trials read it (`SweepConfig.made_splits`).

An axis value is set over the method's overrides and beside the grid point, so a method, a
method's grid or the sweep's grid that sets the key or one of its overrides is an error: the
figure would not show what its x axis says.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from rayapp.config import InputPath, RecipeOverrides
from rayapp.errors import ConfigError
from rayapp.sweep.methods import SWEPT, check_swept

BY_SEED = "by_seed"
SPLITS = "splits"  # <experiment>/splits/TASK/K-SEED/: the splits a K axis drew


@dataclass
class OriginalData:
    """A task's original labelled data (LM-BFF's data/original), which the splits of a K the
    data root lacks are drawn from; unset, the labelled pool beside the root (a part of it)."""
    train: InputPath                 # the original train set (TSV/CSV in LM-BFF's per-task format, or JSONL...)
    test: InputPath | None = None    # the original dev set; None: the test set of the root's own splits


def _by_seed(value: Any) -> dict[int, Any] | None:
    """The per-split values of `{by_seed: {SEED: value}}` (seed keys are strings in JSON), else None."""
    if not (isinstance(value, dict) and set(value) == {BY_SEED}):
        return None
    if not isinstance(value[BY_SEED], dict):
        raise ConfigError(f"axis value {value!r}: by_seed must map each split seed to a value")
    return {int(seed): v for seed, v in value[BY_SEED].items()}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class AxisSpec:
    values: list | dict[str, list]            # [v, ...] for every task, or {TASK: [v, ...]}
    key: str | None = None                    # the recipe-config key each value sets; None: `{axis}` only
    overrides: list[dict] = field(default_factory=list)  # [] or one mapping of recipe overrides per value
    names: list[str] = field(default_factory=list)  # one per value (module docstring)
    title: str = ""                           # the figure's x label; default the key

    def __post_init__(self) -> None:
        if self.key is not None and self.key in SWEPT and self.key != "k":
            raise ConfigError(f"axis.key {self.key!r} is set by the sweep for every trial; an axis sweeps a "
                              "recipe-config key (k, template, verbalizer, ...)")
        lists = list(self.values.values()) if isinstance(self.values, dict) else [self.values]
        if not lists or not all(isinstance(v, list) and v for v in lists):
            raise ConfigError(f"axis.values must be a non-empty list, or map each task to one, got {self.values!r}")
        if len({len(v) for v in lists}) > 1:
            raise ConfigError(f"axis.values: every task needs as many values (point i of each is one table), got "
                              f"{ {t: len(v) for t, v in self.values.items()} }")
        n = len(lists[0])
        for where, given in (("overrides", self.overrides), ("names", self.names)):
            if given and len(given) != n:
                raise ConfigError(f"axis.{where} has {len(given)} entries for {n} values; give one per value or none")
        for i, extra in enumerate(self.overrides):
            if not isinstance(extra, dict):
                raise ConfigError(f"axis.overrides[{i}] must be a mapping of recipe overrides, got {extra!r}")
            check_swept(extra, f"axis.overrides[{i}]")
            if self.key in extra:
                raise ConfigError(f"axis.overrides[{i}] sets {self.key!r}, the axis key; its values set it")
        # locations in them resolved as in `base` (a list is no mapping the config loader walks)
        self.overrides = [RecipeOverrides.resolve(extra) for extra in self.overrides]
        for value in (v for values in lists for v in values):
            per_seed = _by_seed(value)
            if self.key == "k" and not (per_seed is None and isinstance(value, int) and value > 0):
                raise ConfigError(f"axis k: values must be positive integers (examples per label), got {value!r}")
        prefix = self.key or "axis"
        names = self.names or [f"{prefix}{v}" if all(_number(x[i]) for x in lists) else f"{prefix}{i + 1}"
                               for i, v in enumerate(lists[0])]
        bad = [name for name in names if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", str(name))]
        if bad or len(set(names)) != len(names):
            raise ConfigError(f"axis.names {names}: distinct names of letters, digits and _ . + - (they name "
                              "tables and runs)")
        self._names = [str(name) for name in names]

    @property
    def point_names(self) -> list[str]:
        return list(self._names)

    @property
    def label(self) -> str:
        return self.title or self.key or "axis"

    def check(self, tasks: list[str], seeds: list[int], check_task) -> None:
        """Against the sweep: a task list for each task it runs (`check_task` checks the other
        keys), a by_seed value for each of its splits."""
        if isinstance(self.values, dict):
            for task in self.values:
                check_task(task, f"axis.values.{task}")
            missing = [t for t in tasks if t not in self.values]
            if missing:
                raise ConfigError(f"axis.values has no values for task {missing[0]}; give every task of the sweep "
                                  f"a list, or one list for all")
        for task in tasks:
            for value in self._list(task):
                per_seed = _by_seed(value)
                if per_seed is not None and not set(seeds) <= set(per_seed):
                    raise ConfigError(f"axis value {value!r} of task {task}: by_seed has no value for split "
                                      f"{sorted(set(seeds) - set(per_seed))[0]}")

    def _list(self, task: str) -> list:
        return self.values[task] if isinstance(self.values, dict) else self.values

    def index(self, name: str) -> int:
        return self._names.index(name)

    def value(self, task: str, name: str, seed: int) -> Any:
        """What point `name` sets the key to for `task` on split `seed`."""
        value = self._list(task)[self.index(name)]
        per_seed = _by_seed(value)
        return value if per_seed is None else per_seed[seed]

    def recipe_overrides(self, task: str, name: str, seed: int) -> dict:
        """The point's recipe overrides: its value and what goes with it."""
        extra = self.overrides[self.index(name)] if self.overrides else {}
        return {**extra, self.key: self.value(task, name, seed)} if self.key else dict(extra)

    def x(self, task: str) -> list[float] | None:
        """The points' positions on a numeric axis (K), or None: categorical (prompt variants)."""
        values = self._list(task)
        return [float(v) for v in values] if all(_number(v) for v in values) else None

    def describe(self, task: str, name: str) -> str:
        """A point's value for `task` as a caption shows it."""
        value = self._list(task)[self.index(name)]
        return "one per split (sweep.json)" if _by_seed(value) is not None else str(value)
