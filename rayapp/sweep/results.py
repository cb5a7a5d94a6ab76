"""Run records as typed values, and the few-shot protocol's selection over them.

A record is the JSON file one run writes (`<output_dir>/records/<name>.json`, see
`rayapp.train.records`). `parse_run` turns it into a `Run`, checking every field it uses
(JSON only, never `eval`), so a damaged file is an error naming the file and the field.

Selection (LM-BFF / SMASH App. A.1): for each (method, task, split) the grid point with the
best dev metric is chosen and its test metric is the split's result; a cell of the table is
mean (std) over the splits. Ties on dev go to the earlier grid point (the sweep's grid
order), so the choice never depends on which trial finished first. std is numpy's
population std (ddof=0), as LM-BFF's result gathering computes it. A sweep with an axis
(`sweep.axis`: K, templates) selects inside each axis point: its runs carry the point
(`Run.axis`) and the report computes cells per point (`report.cell_sets`).

A cell is only a number when every split of it has every grid point finished: a failed or
missing run leaves a gap with its reason, never a mean over whatever happened to finish
(the choice could change once the missing run exists). Early-stopped runs (ASHA) are
finished runs that are not candidates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from rayapp.errors import DataError
from rayapp.train.records import read_records

STATUSES = ("done", "failed", "stopped")
Point = tuple[tuple[str, Any], ...]  # a grid point as sorted (key, value) pairs: hashable


def point_key(point: dict) -> Point:
    return tuple(sorted(point.items()))


def point_text(point: Point) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point) or "(fixed)"


@dataclass(frozen=True)
class Run:
    """What the report and the selection need from one run record."""
    source: str                      # the record file
    name: str
    method: str                      # the table row: the sweep's method name (else the recipe's method)
    task: str
    seed: int
    status: str                      # done | failed | stopped
    point: Point                     # the grid point (sweep) or the run's lr/batch_size
    metric: str | None = None
    best_dev: float | None = None
    test: float | None = None
    dev_curve: tuple[tuple[int, float], ...] = ()
    checkpoint: str | None = None
    seconds: float | None = None
    error: str | None = None
    swept: bool = False              # written (or annotated) by a sweep trial
    pool_test: bool = False          # its test set was drawn from the pool (`split.test_fallback`)
    axis: str | None = None          # the sweep's axis point (`sweep.axis`): its runs are cells of their own


# --- typed reading ----------------------------------------------------------------------------

def _field(rec: dict, key: str, kinds: tuple[type, ...], source: str, required: bool = True):
    value = rec.get(key)
    if value is None:
        if required:
            raise DataError(f"run record {source} has no {key!r}; re-run that run or remove the file")
        return None
    if isinstance(value, bool) or not isinstance(value, kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise DataError(f"run record {source}: {key!r} must be {names}, got {value!r}")
    return value


def _number(rec: dict, key: str, source: str, required: bool) -> float | None:
    value = _field(rec, key, (int, float), source, required)
    return None if value is None else float(value)


def _curve(value: Any, source: str) -> tuple[tuple[int, float], ...]:
    try:
        return tuple((int(step), float(metric)) for step, metric in value or ())
    except (TypeError, ValueError):
        raise DataError(f"run record {source}: 'dev_curve' must be [[step, dev], ...], got {value!r}") from None


def parse_run(rec: Any, source: str) -> Run:
    """A `Run` from one decoded record; `DataError` naming `source` and the field if it is not one."""
    if not isinstance(rec, dict):
        raise DataError(f"run record {source} is not a JSON object")
    sweep = _field(rec, "sweep", (dict,), source, required=False)
    status = _field(rec, "status", (str,), source, required=False) or "done"
    if status not in STATUSES:
        raise DataError(f"run record {source}: status must be one of {STATUSES}, got {status!r}")
    if sweep is not None:  # a sweep trial: the sweep says which row, split and grid point it is
        method = _field(sweep, "method", (str,), source)
        task = _field(sweep, "task", (str,), source)
        seed = _field(sweep, "seed", (int,), source)
        point = _field(sweep, "point", (dict,), source)
        axis = _field(sweep, "axis", (str,), source, required=False)
    else:  # a run started on its own (`rayapp finetune`): its config says
        method = _field(rec, "method", (str,), source, required=False) or _field(rec, "recipe", (str,), source)
        task = _field(rec, "task", (str,), source)
        seed = _field(rec, "seed", (int,), source)
        config = _field(rec, "config", (dict,), source, required=False) or {}
        point = {k: config[k] for k in ("lr", "batch_size") if k in config}
        axis = None
    done = status == "done"
    split = _field(rec, "split", (dict,), source, required=False) or {}
    return Run(
        source=source, name=_field(rec, "name", (str,), source), method=method, task=task, seed=seed,
        status=status, point=point_key(point),
        metric=_field(rec, "metric", (str,), source, required=done),
        best_dev=_number(rec, "best_dev", source, required=done),
        test=_number(rec, "test", source, required=False),  # a split without a test set has none
        dev_curve=_curve(rec.get("dev_curve"), source),
        checkpoint=_field(rec, "checkpoint", (str,), source, required=False),
        seconds=_number(rec, "seconds", source, required=False),
        error=_field(rec, "error", (str,), source, required=False),
        swept=sweep is not None,
        pool_test=split.get("test_fallback") is True,
        axis=axis,
    )


def read_runs(uris: Iterable[str]) -> list[Run]:
    """Every run record below the given output dirs / sweep dirs / records folders."""
    return [parse_run(rec, f) for uri in uris for f, rec in read_records(uri).items()]


# --- selection -------------------------------------------------------------------------------

@dataclass
class Split:
    """One (method, task, split): the chosen run, or why there is none."""
    seed: int
    chosen: Run | None = None
    runs: list[Run] = field(default_factory=list)
    gaps: list[str] = field(default_factory=list)   # failed or missing grid points


def select_split(seed: int, runs: list[Run], points: list[Point]) -> Split:
    """Best-dev run of one split over the expected grid `points` (in grid order)."""
    split = Split(seed, runs=runs)
    by_point: dict[Point, Run] = {}
    for run in runs:
        other = by_point.get(run.point)
        if other is not None and other.status == "done" and run.status == "done":
            raise DataError(f"two finished runs of {run.method} / {run.task} / seed {seed} at "
                            f"{point_text(run.point)}: {other.source} and {run.source}; remove one")
        if other is None or run.status == "done":
            by_point[run.point] = run
    for point in points:
        run = by_point.get(point)
        if run is None:
            split.gaps.append(f"{point_text(point)} missing")
        elif run.status == "failed":
            split.gaps.append(f"{point_text(point)} failed: {run.error or 'no error recorded'}")
        elif run.status == "done" and (run.best_dev is None or math.isnan(run.best_dev)):
            split.gaps.append(f"{point_text(point)} has no dev metric")
    candidates = [by_point[p] for p in points if p in by_point and by_point[p].status == "done"]
    if not split.gaps:
        if not candidates:
            split.gaps.append("every grid point was stopped early")
        else:  # max keeps the first of equal values: ties go to the earlier grid point
            split.chosen = max(candidates, key=lambda r: r.best_dev)
            if split.chosen.test is None:
                split.gaps.append(f"the chosen run {split.chosen.name} has no test metric (no test set)")
                split.chosen = None
    return split


@dataclass
class Cell:
    """One table cell: a method on a task, over its splits."""
    method: str
    task: str
    metric: str | None
    splits: list[Split]

    @property
    def values(self) -> list[float]:
        """Test metric x100 of each split's chosen run."""
        return [100.0 * s.chosen.test for s in self.splits if s.chosen is not None]

    @property
    def complete(self) -> bool:
        return bool(self.splits) and all(s.chosen is not None for s in self.splits)

    @property
    def pool_test(self) -> bool:
        """Whether a split's test set was drawn from the pool, not the task's test set."""
        return any(s.chosen.pool_test for s in self.splits if s.chosen is not None)

    @property
    def mean(self) -> float | None:
        v = self.values
        return sum(v) / len(v) if self.complete else None

    @property
    def std(self) -> float | None:
        if not self.complete:
            return None
        m, v = self.mean, self.values
        return math.sqrt(sum((x - m) ** 2 for x in v) / len(v))

    @property
    def gap(self) -> str | None:
        """Why the cell is not a number (None when it is)."""
        if self.complete:
            return None
        if not self.splits:
            return "no runs"
        done = sum(s.chosen is not None for s in self.splits)
        reasons = [f"seed {s.seed}: {'; '.join(s.gaps)}" for s in self.splits if s.chosen is None]
        return f"{done}/{len(self.splits)} splits; " + " | ".join(reasons)

    def text(self) -> str:
        """`mean (std)`; over one split there is no spread to show, so not a std of 0.0."""
        if not self.complete:
            return "—"
        return f"{self.mean:.1f} ({self.std:.1f})" if len(self.splits) > 1 else f"{self.mean:.1f} (1 split)"


@dataclass(frozen=True)
class Expected:
    """What a sweep planned: per (method, task) its seeds and grid points, in order."""
    methods: list[str]
    tasks: list[str]
    seeds: dict[tuple[str, str], list[int]]
    points: dict[tuple[str, str], list[Point]]


def expected_from_runs(runs: list[Run]) -> Expected:
    """Without a sweep plan: the seeds present for a task (over all methods) and the grid
    points present for a (method, task) are what every split should have."""
    methods = list(dict.fromkeys(r.method for r in runs))
    tasks = list(dict.fromkeys(r.task for r in runs))
    task_seeds = {t: sorted({r.seed for r in runs if r.task == t}) for t in tasks}
    seeds, points = {}, {}
    for m in methods:
        for t in tasks:
            mine = [r for r in runs if r.method == m and r.task == t]
            if mine:
                seeds[m, t] = task_seeds[t]
                points[m, t] = sorted({r.point for r in mine}, key=repr)
    return Expected(methods, tasks, seeds, points)


def cells(runs: list[Run], expected: Expected) -> dict[tuple[str, str], Cell]:
    """Every (method, task) cell the plan has, from the runs."""
    groups: dict[tuple[str, str, int], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.method, run.task, run.seed), []).append(run)
    out = {}
    for (m, t), seeds in expected.seeds.items():
        splits = [select_split(s, groups.get((m, t, s), []), expected.points[m, t]) for s in seeds]
        metric = next((r.metric for s in splits for r in s.runs if r.metric), None)
        out[m, t] = Cell(m, t, metric, splits)
    return out
