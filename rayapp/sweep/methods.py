"""Methods are configs: a named recipe plus overrides of its config.

    methods:
      prompt-ft: {method: prompt}                       # recipe: finetune (the default)
      fine-tune: {method: classifier}
      zero-shot: {method: zero-shot, grid: {}}          # nothing to tune: one grid point
      teacher:   {method: prompt, model: roberta-large, label: RoBERTa-large PT}
      distill:   {method: prompt, teacher: "{best:teacher}"}
      smash:     {method: prompt, init: s3://bucket/smash-student/model}

Reserved keys: `recipe` (a name in `rayapp.recipes.RECIPES`, default finetune), `label` (the
table's row label), `grid` (this method's own grid instead of the sweep's), `seeds` (a subset
of the sweep's splits for this method: zero-shot trains nothing and LM-BFF's test file is the
same for every split, so one split gives all five test numbers; not on a task whose test sets
are pool fallbacks, which differ per split: there it runs every split, see
`SweepConfig.pool_test_tasks`), `tasks` (a subset of the sweep's tasks: SMASH Figure 2 runs
settings 2-4 and 6 on MNLI only, 7 on SST-2 only; its cells elsewhere stay empty),
`per_task` (task -> overrides for that task only). Everything else overrides the recipe's config, on
top of the sweep's `base` and `per_task`; each trial's config is checked against the
recipe's config class before anything runs.

String values may hold placeholders, filled per trial: `{task}`, `{seed}`, `{k}` (the
trial's: a K axis point's, `sweep.axis`), `{experiment}` (the sweep's directory),
`{student:NAME}` (a student cut from a teacher before the sweep, see `SweepConfig.students`),
`{distilled:NAME}` / `{distilled:NAME@STEP}` (the student of a distillation the sweep runs
first, at its end or as kept at STEP: `SweepConfig.distilled`), `{axis}` (the trial's axis
value, for an axis without a key: `{distilled:s1@{axis}}` over distillation steps)
and `{best:METHOD}`: the checkpoint of METHOD's best-dev run on the same task and split (and
axis point). That last one is how SMASH's "distill" gets a task-tuned teacher (the paper
distils from RoBERTa-large prompt-tuned on the same few-shot split); methods that use it run
in a later phase, after METHOD's trials.

A recipe plugs in with its one entry in `rayapp.recipes.RECIPES` (config class and
`run(cfg, callbacks=()) -> record`); a sweep can use it when its config has `task`, `seed`
and `k` fields (`output_dir` and `name` come with `TrainConfig`) and its record the
few-shot keys (`metric`, `best_dev`, `test`, `dev_curve`).
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, fields
from typing import Any, Callable

from rayapp.config import _merge, build
from rayapp.errors import ConfigError
from rayapp.recipes import RECIPES, get_recipe


SWEPT = ("task", "seed", "k", "output_dir", "name")  # set by the sweep for every trial
_PLACEHOLDER = re.compile(r"\{(task|seed|k|experiment|axis|(?:best|ipet|soft|student|distilled):[^{}]+)\}")
_DISTILLED = re.compile(r"\{distilled:([^@{}]+)")  # also around an unfilled {axis}: {distilled:NAME@{axis}}
READS_RUNS = ("best", "ipet", "soft")  # placeholders that read another method's runs: a later phase


@dataclass(frozen=True)
class Method:
    name: str
    recipe: str
    overrides: dict                # the method's own recipe overrides (placeholders unfilled)
    per_task: dict[str, dict]      # task -> overrides on top (e.g. SMASH's pairs vs sentiment student)
    grid: dict[str, list]          # key -> values; {} = one fixed point
    label: str
    seeds: list[int] | None = None  # None: the sweep's splits
    tasks: list[str] | None = None  # None: the sweep's tasks

    def points(self) -> list[dict]:
        """The grid's points in order (the last key varies fastest)."""
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]

    def _placeholders(self) -> list[str]:
        return _placeholders(self.overrides) + _placeholders(self.per_task)

    def needs(self) -> set[str]:
        """Methods whose runs this one reads (`{best:METHOD}`, iPET's `{ipet:METHOD}`, `{soft:METHOD}`)."""
        return {p.split(":", 1)[1] for p in self._placeholders() if p.split(":", 1)[0] in READS_RUNS}

    def students(self) -> set[str]:
        return {p.split(":", 1)[1] for p in self._placeholders() if p.startswith("student:")}

    def distilled(self) -> set[str]:
        """The `distilled:` runs this method starts from (`{distilled:NAME}`, `{distilled:NAME@STEP}`)."""
        return {name for text in _strings([self.overrides, self.per_task]) for name in _DISTILLED.findall(text)}

    def uses_axis(self) -> bool:
        return "axis" in self._placeholders()

    def config(self, base: dict, values: dict, fill: Callable[[str], str] | None = None):
        """The recipe config of one trial: `base` (the sweep's, for this task) < the method's
        overrides < its overrides for the task < `values` (grid point, task, split, names);
        placeholders filled by `fill`."""
        cls, _ = get_recipe(self.recipe)
        data = _merge(_merge(_merge(base, self.overrides), self.per_task.get(values["task"], {})), values)
        if fill is not None:
            data = fill_placeholders(data, fill)
        return build(cls, data)


def check_swept(overrides: dict, where: str) -> None:
    for key in SWEPT:
        if key in overrides:
            raise ConfigError(f"{where} sets {key!r}, which the sweep sets for every trial "
                              "(use the sweep's tasks/seeds/k/storage/name)")


def _placeholders(value: Any) -> list[str]:
    if isinstance(value, str):
        return _PLACEHOLDER.findall(value)
    if isinstance(value, dict):
        return [p for v in value.values() for p in _placeholders(v)]
    if isinstance(value, list):
        return [p for v in value for p in _placeholders(v)]
    return []


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def fill_placeholders(value: Any, fill: Callable[[str], str]) -> Any:
    """`value` (a string, or lists and mappings of them) with its placeholders filled by `fill`."""
    if isinstance(value, str):
        # innermost first: {distilled:NAME@{axis}} becomes {distilled:NAME@STEP}, then a path
        while (filled := _PLACEHOLDER.sub(lambda m: str(fill(m.group(1))), value)) != value:
            value = filled
        return value
    if isinstance(value, dict):
        return {k: fill_placeholders(v, fill) for k, v in value.items()}
    if isinstance(value, list):
        return [fill_placeholders(v, fill) for v in value]
    return value


def check_grid(grid: Any, where: str) -> dict[str, list]:
    if not isinstance(grid, dict):
        raise ConfigError(f"{where} must be a mapping of config key -> list of values, got {grid!r}")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.{key} must be a non-empty list of values, got {values!r}; "
                              "drop the key (or use grid: {}) for a fixed value")
    return grid


def check_seeds(seeds: Any, where: str, allowed: list[int] | None = None) -> list[int]:
    """A non-empty list of distinct split seeds (all of them in `allowed` when given)."""
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or (allowed is not None and not set(seeds) <= set(allowed))):
        among = "split seeds" if allowed is None else f"seeds from the sweep's seeds {allowed}"
        raise ConfigError(f"{where} must be a non-empty list of distinct {among}, got {seeds!r}")
    return seeds


def parse_methods(raw: dict, grid: dict[str, list], seeds: list[int]) -> dict[str, Method]:
    """`Method`s from the sweep YAML's `methods` mapping (order kept: it is the table's row order)."""
    if not raw:
        raise ConfigError("the sweep has no methods; add at least one under `methods:` (e.g. prompt: {method: prompt})")
    methods = {}
    for name, spec in raw.items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", str(name)):
            raise ConfigError(f"method name {name!r}: use letters, digits and _ . + - (it names files)")
        if not isinstance(spec, (dict, type(None))):
            raise ConfigError(f"method {name!r} must be a mapping of recipe overrides, got {spec!r}")
        spec = dict(spec or {})
        recipe = spec.pop("recipe", "finetune")
        if recipe not in RECIPES:
            raise ConfigError(f"method {name!r}: unknown recipe {recipe!r}; recipes: {', '.join(RECIPES)}")
        missing = [f for f in SWEPT if f not in {x.name for x in fields(get_recipe(recipe)[0])}]
        if missing:
            raise ConfigError(f"method {name!r}: recipe {recipe!r} has no {missing} config fields, so it cannot "
                              "run per few-shot task and split")
        label = str(spec.pop("label", name))
        own_grid = check_grid(spec.pop("grid"), f"methods.{name}.grid") if "grid" in spec else grid
        own_seeds = check_seeds(spec.pop("seeds"), f"methods.{name}.seeds", seeds) if "seeds" in spec else None
        own_tasks = spec.pop("tasks", None)
        if own_tasks is not None and (not isinstance(own_tasks, list) or not own_tasks
                                      or not all(isinstance(t, str) for t in own_tasks)):
            raise ConfigError(f"methods.{name}.tasks must be a non-empty list of the sweep's tasks, got {own_tasks!r}")
        per_task = spec.pop("per_task", {}) or {}
        if not isinstance(per_task, dict) or not all(isinstance(v, dict) for v in per_task.values()):
            raise ConfigError(f"methods.{name}.per_task must map task -> overrides, got {per_task!r}")
        check_swept(spec, f"method {name!r}")
        for task, extra in per_task.items():
            check_swept(extra, f"methods.{name}.per_task.{task}")
        clash = sorted(set(own_grid) & (set(spec) | {k for extra in per_task.values() for k in extra}))
        if clash:
            raise ConfigError(f"method {name!r} sets {clash}, which its grid varies; "
                              f"give the method its own grid (methods.{name}.grid)")
        methods[name] = Method(name, recipe, spec, per_task, own_grid, label, own_seeds, own_tasks)
    for m in methods.values():
        unknown = sorted(m.needs() - set(methods))
        if unknown:
            raise ConfigError(f"method {m.name!r} reads the runs of {unknown[0]!r} but there is no such method; "
                              f"methods: {', '.join(methods)}")
    return methods


def phases(methods: dict[str, Method]) -> list[list[str]]:
    """Methods grouped so that each runs after the methods it reads `{best:...}` from."""
    left, done, out = dict(methods), set(), []
    while left:
        ready = [n for n, m in left.items() if m.needs() <= done]
        if not ready:
            raise ConfigError(f"methods {sorted(left)} read each other's best runs in a cycle ({{best:...}})")
        out.append(ready)
        done.update(ready)
        for n in ready:
            del left[n]
    return out
