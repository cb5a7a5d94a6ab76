"""The sweep's config: methods x tasks x splits x grid, and what it plans to run.

`jobs/configs/sweep-*.yaml` are `SweepConfig`s. The config a sweep runs with is saved as
`<experiment>/sweep.json`; `--resume` and `rayapp report` read it back, so they know every
trial the sweep planned (a run that never wrote a record is a gap, not an absence).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from rayapp import storage
from rayapp.config import build, to_dict
from rayapp.errors import ConfigError, DataError
from rayapp.config import _merge
from rayapp.sweep.methods import Method, check_grid, check_seeds, check_swept, parse_methods, phases
from rayapp.sweep.results import Expected, point_key

SEEDS = [13, 21, 42, 87, 100]  # LM-BFF's five few-shot splits
SPEC_FILE = "sweep.json"


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
    teacher: str
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
    storage: str = "runs/sweeps"         # local dir or s3:// URI
    tasks: list[str] = field(default_factory=lambda: ["SST-2"])
    seeds: list[int] = field(default_factory=lambda: list(SEEDS))
    k: int = 16
    # SMASH App. A.1 / LM-BFF: lr {1e-5, 2e-5, 5e-5} x batch {2, 4}; {} = one fixed point
    grid: dict[str, list] = field(default_factory=lambda: {"lr": [1e-5, 2e-5, 5e-5], "batch_size": [2, 4]})
    base: dict = field(default_factory=dict)        # recipe overrides shared by every method
    per_task: dict[str, dict] = field(default_factory=dict)   # task -> overrides (e.g. max_length)
    methods: dict[str, dict] = field(default_factory=dict)
    students: dict[str, dict] = field(default_factory=dict)   # name -> StudentSpec fields
    max_concurrent_trials: int = 0       # 0: as many as the cluster's CPUs/GPUs fit, followed as it scales
    max_failures: int = 0                # Tune retries of a trial whose driver died
    asha: AshaConfig | None = None
    tables: list[TableSpec] = field(default_factory=list)

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
            if task not in self.tasks:
                raise ConfigError(f"per_task.{task}: {task!r} is not one of the sweep's tasks {self.tasks}")
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
            missing = sorted(m.students() - set(self._students))
            if missing:
                raise ConfigError(f"method {m.name!r} uses {{student:{missing[0]}}} but students has no "
                                  f"{missing[0]!r}; students: {', '.join(self._students) or 'none'}")
        for t in self.tables:
            unknown = [r for r in t.rows if r not in self._methods]
            if unknown:
                raise ConfigError(f"table {t.name!r}: unknown method {unknown[0]!r}; methods: {', '.join(self._methods)}")
            unknown = [c for c in t.columns if c not in self.tasks]
            if unknown:
                raise ConfigError(f"table {t.name!r}: unknown task {unknown[0]!r}; the sweep's tasks: {', '.join(self.tasks)}")

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

    def trials(self, phase: int | None = None) -> list[dict]:
        """The trials (one Ray Train run each) in order: task, split, method, grid point. Split-
        major, so a sweep stopped part-way has every method on the splits it reached and its
        partial table compares methods on the same splits."""
        names = self.method_names if phase is None else self._phases[phase]
        return [{"method": m, "task": t, "seed": s, "point": p}
                for t in self.tasks for s in self.seeds for m in names if s in self.method_seeds(m)
                for p in self._methods[m].points()]

    def method_seeds(self, name: str) -> list[int]:
        """The splits `name` runs on: its own `seeds` (in the sweep's order), else the sweep's."""
        own = self.method(name).seeds
        return [s for s in self.seeds if own is None or s in own]

    def recipe_config(self, trial: dict, name: str, fill=None):
        """The recipe config of one trial: base < per_task < method < grid point < task, split,
        k, output dir and run name; placeholders filled by `fill` (see `methods`)."""
        base = _merge(self.base, self.per_task.get(trial["task"], {}))
        values = {**trial["point"], "task": trial["task"], "seed": trial["seed"], "k": self.k,
                  "output_dir": self.experiment, "name": name}
        return self.method(trial["method"]).config(base, values, fill)

    def expected(self) -> Expected:
        """The plan as the report checks runs against it."""
        return Expected(
            methods=self.method_names, tasks=list(self.tasks),
            seeds={(m, t): self.method_seeds(m) for m in self._methods for t in self.tasks},
            points={(m, t): [point_key(p) for p in self._methods[m].points()] for m in self._methods for t in self.tasks},
        )

    def label(self, method: str) -> str:
        return self._methods[method].label if method in self._methods else method

    def table_specs(self) -> list[TableSpec]:
        return self.tables or [TableSpec()]


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
