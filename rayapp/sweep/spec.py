"""The sweep's config: methods x tasks x splits x grid, and what it plans to run.

`jobs/configs/sweep-*.yaml` are `SweepConfig`s. The config a sweep runs with is saved as
`<experiment>/sweep.json`; `--resume` and `rayapp report` read it back, so they know every
trial the sweep planned (a run that never wrote a record is a gap, not an absence).

`axis:` sweeps one recipe-config key outside the grid, each value a result of its own (K,
templates, verbalizers: `rayapp.sweep.axis`); without one the trials are as before it existed.

`distilled:` names distillations (`rayapp.recipes.distill` configs) the sweep runs before its
trials, all at once, as `<experiment>/distilled/NAME`; methods start from their students with
`{distilled:NAME}` (the end) or `{distilled:NAME@STEP}` (kept at STEP: the sweep adds every
step its trials read to the run's `keep_steps`); a distillation may start from a student the
sweep cuts (`student: "{student:NAME}"`). SMASH Figure 2 is such a sweep: the seven
settings distilled, each prompt-tuned from its student over an axis of steps
(`jobs/configs/sweep-smash-fig2.yaml`).

`tasks=` narrows a config written for more tasks (`rayapp sweep --config ... tasks=[RTE]`):
`per_task` entries and table columns of known tasks the sweep does not run are ignored; a
name that is no task at all is an error (a typo would otherwise be ignored silently).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Annotated

from rayapp import storage
from rayapp.config import ModelRef, OutputPath, Overrides, RecipeOverrides, build, to_dict
from rayapp.data.ipet import IPetConfig
from rayapp.errors import ConfigError, DataError
from rayapp.config import _merge
from rayapp.sweep.axis import SPLITS, AxisSpec, OriginalData
from rayapp.sweep.methods import (READS_RUNS, Method, check_grid, check_seeds, check_swept, fill_placeholders,
                                  parse_methods, phases)
from rayapp.recipes import get_recipe
from rayapp.sweep.results import Expected, point_key
from rayapp.tasks.registry import BUILTIN_TASKS, load_tasks

SEEDS = [13, 21, 42, 87, 100]  # LM-BFF's five few-shot splits
SPEC_FILE = "sweep.json"
DISTILLED = "distilled"  # <experiment>/distilled/NAME: the `distilled:` runs


@dataclass
class AshaConfig:
    """ASHA early stopping among the grid points of one (method, task, split)."""
    grace_period: int = 100          # steps every trial runs before it may be stopped
    reduction_factor: float = 3.0

    def __post_init__(self) -> None:
        if self.grace_period < 1 or self.reduction_factor <= 1:
            raise ConfigError("asha.grace_period must be >= 1 and asha.reduction_factor > 1")


@dataclass
class StudentSpec:
    """A student cut from a teacher before the trials (`rayapp.recipes.pretrain.make_student`)."""
    teacher: ModelRef
    layers: list[int] | None = None  # None: every other layer


@dataclass
class TableSpec:
    """One table of the report: rows = methods, columns = tasks, both in the given order."""
    name: str = "table"
    title: str = ""
    rows: list[str] = field(default_factory=list)      # [] = every method
    columns: list[str] = field(default_factory=list)   # [] = every task


@dataclass
class SweepConfig:
    name: str = "sweep"                  # the experiment: <storage>/<name>
    storage: OutputPath = "runs/sweeps"  # local dir or s3:// URI
    tasks: list[str] = field(default_factory=lambda: ["SST-2"])
    seeds: list[int] = field(default_factory=lambda: list(SEEDS))
    k: int = 16                          # the K of the data root's splits; a K axis draws others (`sweep.axis`)
    # SMASH App. A.1 / LM-BFF: lr {1e-5, 2e-5, 5e-5} x batch {2, 4}; {} = one fixed point
    grid: Annotated[dict[str, list], RecipeOverrides] = field(default_factory=lambda: {"lr": [1e-5, 2e-5, 5e-5], "batch_size": [2, 4]})
    base: Annotated[dict, RecipeOverrides] = field(default_factory=dict)  # recipe overrides shared by every method
    per_task: Annotated[dict[str, dict], RecipeOverrides] = field(default_factory=dict)  # task -> overrides (e.g. max_length)
    methods: Annotated[dict[str, dict], RecipeOverrides] = field(default_factory=dict)
    students: Annotated[dict[str, dict], Overrides(StudentSpec)] = field(default_factory=dict)  # name -> StudentSpec fields
    distilled: Annotated[dict[str, dict], RecipeOverrides] = field(default_factory=dict)  # name -> DistillConfig fields
    max_concurrent_trials: int = 0       # 0: as many as the cluster's CPUs/GPUs fit, followed as it scales
    max_failures: int = 0                # Tune retries of a trial whose driver died
    asha: AshaConfig | None = None
    ipet: IPetConfig = field(default_factory=IPetConfig)  # iPET's labelling between generations (`sweep.ipet`)
    axis: AxisSpec | None = None         # a key swept outside the grid: a result per value (`sweep.axis`)
    # task -> OriginalData: what a K axis draws the splits the data root lacks from
    original_data: Annotated[dict[str, dict], Overrides(OriginalData)] = field(default_factory=dict)
    tables: list[TableSpec] = field(default_factory=list)
    # filled by the sweep's check from the data (not by hand): tasks whose test sets are drawn
    # from the pool (`fewshot._fallback_test`). Those differ per split, so a method's `seeds:`
    # (one split standing for all, as zero-shot's does) does not narrow these tasks.
    pool_test_tasks: list[str] = field(default_factory=list)
    # filled by the sweep's check too: the TASK/K-SEED splits of a K axis the data root lacks,
    # drawn under <experiment>/splits (`fewshot.draw_lmbff_split`); every trial of one reads it there
    made_splits: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ConfigError(f"sweep name {self.name!r}: use letters, digits and _ . - (it names a directory)")
        if not self.tasks:
            raise ConfigError("the sweep has no tasks; set tasks: [SST-2, ...]")
        check_seeds(self.seeds, "seeds")
        if self.k <= 0 or self.max_concurrent_trials < 0 or self.max_failures < 0:
            raise ConfigError("k must be > 0, max_concurrent_trials and max_failures >= 0")
        check_grid(self.grid, "grid")
        check_swept(self.base, "base")
        for task, extra in self.per_task.items():
            self._check_task_name(task, f"per_task.{task}")
            if not isinstance(extra, dict):
                raise ConfigError(f"per_task.{task} must be a mapping of overrides, got {extra!r}")
            check_swept(extra, f"per_task.{task}")
        self._methods = parse_methods(self.methods, self.grid, self.seeds)
        self._phases = phases(self._methods)
        self._students = {}
        for name, spec in self.students.items():
            if not isinstance(spec, dict):
                raise ConfigError(f"students.{name} must be a mapping (teacher: DIR, layers: [...]), got {spec!r}")
            self._students[name] = build(StudentSpec, spec)
        for m in self._methods.values():
            for kind, section, used, have in (("student", "students", m.students(), self._students),
                                              ("distilled", "distilled", m.distilled(), self.distilled)):
                missing = sorted(used - set(have))
                if missing:
                    raise ConfigError(f"method {m.name!r} uses {{{kind}:{missing[0]}}} but {section} has no "
                                      f"{missing[0]!r}; {section}: {', '.join(have) or 'none'}")
            for task in m.tasks or []:
                self._check_task_name(task, f"methods.{m.name}.tasks")
            if m.uses_axis() and self.axis is None:
                raise ConfigError(f"method {m.name!r} reads {{axis}} but the sweep has no axis: add one (axis: "
                                  "{values: [...]}) or drop the placeholder")
        for name, extra in self.distilled.items():
            self._distill_config(name, extra)
        self._original = {}
        for task, data in self.original_data.items():
            self._check_task_name(task, f"original_data.{task}")
            if not isinstance(data, dict):
                raise ConfigError(f"original_data.{task} must be a mapping (train: TABLE, test: TABLE), got {data!r}")
            self._original[task] = build(OriginalData, data)
        if self.axis is not None:
            self.axis.check(self.tasks, self.seeds, self._check_task_name)
            self._check_axis()
        for t in self.tables:
            unknown = [r for r in t.rows if r not in self._methods]
            if unknown:
                raise ConfigError(f"table {t.name!r}: unknown method {unknown[0]!r}; methods: {', '.join(self._methods)}")
            for column in t.columns:
                self._check_task_name(column, f"table {t.name!r}")

    def _distill_config(self, name: str, extra: dict, keep_steps: list[int] = ()):
        """The DistillConfig of `distilled.NAME` (built here, so a bad one fails before anything runs)."""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", str(name)) or not isinstance(extra, dict):
            raise ConfigError(f"distilled.{name}: a name of letters, digits and _ . - mapped to distill config "
                              f"keys (student, teacher, data, setting, max_steps, ...), got {extra!r}")
        clash = sorted({"name", "output_dir"} & set(extra))
        if clash:
            raise ConfigError(f"distilled.{name} sets {clash}: the sweep names its distillations after their keys "
                              f"and keeps them under <experiment>/{DISTILLED}")

        def student(placeholder: str) -> str:  # a distillation may start from a student cut before it
            kind, _, arg = placeholder.partition(":")
            if kind != "student" or arg not in self._students:
                raise ConfigError(f"distilled.{name}: {{{placeholder}}} is not one of the students "
                                  f"({', '.join(f'{{student:{s}}}' for s in self._students) or 'none'}), the only "
                                  "placeholders a distillation takes")
            return self.student_dir(arg)

        extra = fill_placeholders(extra, student)
        keep = sorted(set(extra.get("keep_steps", [])) | set(keep_steps))
        try:
            return build(get_recipe("distill")[0], {**extra, "keep_steps": keep, "name": name,
                                                    "output_dir": storage.join(self.experiment, DISTILLED)})
        except ConfigError as e:
            raise ConfigError(f"distilled.{name}: {e}") from None

    def distill_configs(self, keep_steps: dict[str, set[int]]) -> dict:
        """NAME -> the DistillConfig the sweep runs, keeping the steps `keep_steps[NAME]` its trials read."""
        return {name: self._distill_config(name, extra, sorted(keep_steps.get(name, ())))
                for name, extra in self.distilled.items()}

    def _check_axis(self) -> None:
        """The axis key is a config key of every method's recipe, and nothing else varies or sets
        it or what goes with it (`sweep.axis`). An axis without a key is read by `{axis}`."""
        if self.axis.key is None:
            if not any(m.uses_axis() for m in self._methods.values()):
                raise ConfigError("the axis has no key and no method reads {axis}: give axis.key (a recipe-config "
                                  "key) or use {axis} in a method's overrides")
        key, owned = self.axis.key, {self.axis.key} | {k for extra in self.axis.overrides for k in extra}
        owned.discard(None)
        if owned & set(self.grid):
            raise ConfigError(f"the grid varies {sorted(owned & set(self.grid))}, which the axis sets; an axis value "
                              "is a result of its own, a grid point a candidate: drop it from one of them")
        for m in self._methods.values():
            cls = get_recipe(m.recipe)[0]
            if key is not None and key not in {f.name for f in dataclasses.fields(cls)}:
                raise ConfigError(f"axis.key {key!r} is no config key of recipe {m.recipe!r} (method {m.name!r}); "
                                  f"use one of its keys, e.g. k, or drop the method")
            sets = set(m.grid) | set(m.overrides) | {k for extra in m.per_task.values() for k in extra}
            clash = sorted(owned & sets)
            if clash:
                raise ConfigError(f"method {m.name!r} sets or varies {clash}, which the axis sets per value; drop them "
                                  "from the method")
            # {best:} is read per axis point (`tune.best_checkpoint`); iPET's labels are kept per split only
            if {p.split(":", 1)[0] for p in m._placeholders()} & (set(READS_RUNS) - {"best"}):
                raise ConfigError(f"method {m.name!r} reads an iPET generation ({{ipet:}}/{{soft:}}), whose labels are "
                                  "kept per split, not per axis value: run iPET in a sweep without an axis")

    def _check_task_name(self, name: str, where: str) -> None:
        """A `per_task` key or table column names one of the sweep's tasks, or a known task it
        does not run (ignored: `tasks=` narrowed the config); not a name that is no task
        (built-in or in `base.tasks_file`), nor one spelled unlike the sweep's task."""
        if name in self.tasks:
            return
        respelled = [t for t in self.tasks if t.lower() == name.lower()]
        if respelled:
            raise ConfigError(f"{where}: {name!r} is spelled {respelled[0]!r} in the sweep's tasks; use that spelling")
        known = list(BUILTIN_TASKS)
        if name.lower() not in {k.lower() for k in known} and self.base.get("tasks_file"):
            known += list(load_tasks(self.base["tasks_file"]))
        if name.lower() not in {k.lower() for k in known}:
            raise ConfigError(f"{where}: unknown task {name!r}; the sweep's tasks: {', '.join(self.tasks)}; "
                              f"known tasks: {', '.join(known)}")

    @property
    def experiment(self) -> str:
        """`<storage>/<name>`; absolute when local (trials run in other processes)."""
        root = self.storage if storage.is_remote(self.storage) else os.path.abspath(self.storage)
        return storage.join(root, self.name)

    def method(self, name: str) -> Method:
        if name not in self._methods:
            raise ConfigError(f"unknown method {name!r}; methods: {', '.join(self._methods)}")
        return self._methods[name]

    @property
    def method_names(self) -> list[str]:
        return list(self._methods)

    @property
    def phases(self) -> list[list[str]]:
        return self._phases

    @property
    def student_specs(self) -> dict[str, StudentSpec]:
        return self._students

    def student_dir(self, name: str) -> str:
        """Where student `name` is cut (`students:`, `{student:NAME}`)."""
        return storage.join(self.experiment, "students", name)

    def trials(self, phase: int | None = None) -> list[dict]:
        """The trials (one Ray Train run each) in order: task, axis point, split, method, grid
        point. Split-major, so a sweep stopped part-way has every method on the splits it
        reached and its partial table compares methods on the same splits; an axis point is
        the trial's `axis` (its name), absent without an axis."""
        names = self.method_names if phase is None else self._phases[phase]
        at = [{}] if self.axis is None else [{"axis": name} for name in self.axis.point_names]
        return [{"method": m, "task": t, "seed": s, "point": p, **a}
                for t in self.tasks for a in at for s in self.seeds for m in names if s in self.method_seeds(m, t)
                for p in self._methods[m].points()]

    def runs_on(self, name: str, task: str) -> bool:
        """Whether method `name` runs `task` (its `tasks:`, else every task)."""
        own = self.method(name).tasks
        return own is None or task in own

    def axis_overrides(self, trial: dict) -> dict:
        """The recipe overrides of the trial's axis point ({} without an axis)."""
        return {} if "axis" not in trial else self.axis.recipe_overrides(trial["task"], trial["axis"], trial["seed"])

    def trial_k(self, trial: dict) -> int:
        return self.axis_overrides(trial).get("k", self.k)

    def made_split(self, trial: dict) -> bool:
        """Whether the trial's split is one a K axis drew (`made_splits`)."""
        return f"{trial['task']}/{self.trial_k(trial)}-{trial['seed']}" in self.made_splits

    def original(self, task: str) -> OriginalData | None:
        return self._original.get(task)

    def method_seeds(self, name: str, task: str) -> list[int]:
        """The splits `name` runs on `task`: its own `seeds` (in the sweep's order), else the
        sweep's; every split of a task whose test sets are pool fallbacks (`pool_test_tasks`)."""
        if not self.runs_on(name, task):
            return []
        own = None if task in self.pool_test_tasks else self.method(name).seeds
        return [s for s in self.seeds if own is None or s in own]

    def recipe_config(self, trial: dict, name: str, fill=None):
        """The recipe config of one trial: base < per_task < method < axis point and grid point
        (disjoint keys) < task, split, k, output dir and run name, and the experiment's splits
        folder for a split the axis drew; placeholders filled by `fill` (see `methods`)."""
        base = _merge(self.base, self.per_task.get(trial["task"], {}))
        values = {**self.axis_overrides(trial), **trial["point"], "task": trial["task"], "seed": trial["seed"],
                  "k": self.trial_k(trial), "output_dir": self.experiment, "name": name}
        if self.made_split(trial):
            values["data_dir"] = storage.join(self.experiment, SPLITS)
        return self.method(trial["method"]).config(base, values, fill)

    def expected(self) -> Expected:
        """The plan as the report checks runs against it."""
        cells = [(m, t) for m in self._methods for t in self.tasks if self.runs_on(m, t)]
        return Expected(
            methods=self.method_names, tasks=list(self.tasks),
            seeds={(m, t): self.method_seeds(m, t) for m, t in cells},
            points={(m, t): [point_key(p) for p in self._methods[m].points()] for m, t in cells},
        )

    def label(self, method: str) -> str:
        return self._methods[method].label if method in self._methods else method

    def table_specs(self) -> list[TableSpec]:
        """The config's tables over the tasks the sweep runs; a table none of whose columns it
        runs is left out (its columns would otherwise fall back to every task)."""
        out = []
        for t in self.tables:
            columns = [c for c in t.columns if c in self.tasks]
            if columns or not t.columns:
                out.append(TableSpec(t.name, t.title, list(t.rows), columns))
        return out


def save(cfg: SweepConfig) -> str:
    uri = storage.join(cfg.experiment, SPEC_FILE)
    storage.write_text(uri, json.dumps(to_dict(cfg), indent=1))
    return uri


def load(experiment: str) -> SweepConfig:
    """The config a sweep in `experiment` was started with."""
    uri = storage.join(experiment, SPEC_FILE)
    if not storage.exists(uri):
        raise DataError(f"{experiment} is not a sweep directory (no {SPEC_FILE}); give the directory "
                        "`rayapp sweep` printed (<storage>/<name>)")
    try:
        data = json.loads(storage.read_text(uri))
    except json.JSONDecodeError as e:
        raise DataError(f"{uri} is not JSON ({e})") from None
    cfg = build(SweepConfig, data)
    # the sweep lives where it was found (a moved or synced directory keeps working)
    parent, _, name = experiment.rstrip("/").rstrip("\\").replace("\\", "/").rpartition("/")
    cfg.storage, cfg.name = parent or ".", name
    return cfg
