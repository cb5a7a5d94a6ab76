"""`rayapp sweep`: one Ray Tune experiment over methods x tasks x splits x grid (SMASH §4, App. A.1).

Each trial is one recipe run. A run of one DDP worker (every few-shot method) runs its loop
in the trial's actor itself (`train.launch`'s local launcher): the actor holds that worker's
CPU/GPU, reports each evaluation with `tune.report`, and Tune reuses it for the next trial
(`reuse_actors`), so torch, transformers and the recipe are imported once per actor, not once
per trial. A run of several workers or DeepSpeed starts its Ray Train run from the trial
(the Ray 2.60 pattern for Train V2 inside Tune), with Tune's `TuneReportCallback`
(`train.launch.TUNE_TRIAL` tells the launcher it is in a trial). Either way
every evaluation (`dev` every `eval_every` steps and in the final report) reaches Tune, its
schedulers and its TensorBoard/JSON/CSV loggers, and the run's name is derived from the trial
id, so a trial restarted by `max_failures` or `--resume` finds its own run directory and
resumes from that run's last checkpoint.

Layout of an experiment `<storage>/<name>` (local or `s3://`):
    sweep.json          the config the sweep runs with (`--resume` and `rayapp report` read it)
    tune-<phase>/       Ray Tune's experiment (trial results, TensorBoard events, state)
    <run name>/         each trial's Ray Train run (checkpoints)
    records/<run>.json  one record per run: written by the run itself, so concurrent trials
                        never share a file; failed or early-stopped trials get one from the
                        sweep's driver (status failed/stopped) so the report can mark the gap
    students/<name>/    students cut from a teacher before the trials (`students:`)
    distilled/<name>/   distillations run before the trials (`distilled:`), their kept models
                        under models/step-<N>/, their records under distilled/records/

Resources. A trial that runs its loop in its actor reserves that worker's resources for the
actor. A trial that starts a Ray Train run only waits on it, so it reserves memory but no
CPU: the Train workers are placed by Ray Train itself (its own placement group; reserving
them in Tune's group too would count them twice). Tune starts a trial only while the cluster
can hold its workers: `max_concurrent_trials`, or by default `ClusterPacedGrid`, which
follows the cluster as it grows (an autoscaler's configured maximum, nodes that join later)
instead of a snapshot taken at submit time.

Phases. Methods that read another method's best runs (`{best:teacher}`) run in a later
Tune experiment of the same sweep, once those runs exist.

ASHA (`asha:`) stops grid points early, but only compares trials of the same (method, task,
split, axis point): dev metrics of different tasks, splits or K say nothing about each other.

A K axis (`sweep.axis`) draws the splits the data root lacks in `check`, on the driver before
Ray starts: `<experiment>/splits/TASK/K-SEED/` (`made_splits`), read by the trials on any node.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import tempfile
import time

from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from rayapp import env, storage
from rayapp.config import to_dict
from rayapp.errors import ConfigError, DataError, PromptError, find_user_error
from rayapp.sweep import ipet
from rayapp.sweep import spec as sweep_spec
from rayapp.recipes import get_recipe
from rayapp.sweep.results import STATUSES, parse_run, read_runs, select_split, point_key
from rayapp.sweep.axis import SPLITS
from rayapp.sweep.spec import DISTILLED, SweepConfig
from rayapp.train.launch import TUNE_TRIAL, is_local, local_resources
from rayapp.train.loop import kept_model
from rayapp.train.records import RECORDS, record_uri


DRIVER_MEMORY = 256 * 1024 ** 2  # what a trial that waits on its Ray Train run reserves (it holds no model)


# --- names and placeholders -----------------------------------------------------------------

def run_name(trial: dict, trial_id: str) -> str:
    """The trial's Ray Train run and record name: readable, and unique by the trial id."""
    at = f"-{trial['axis']}" if "axis" in trial else ""
    raw = f"{trial['method']}-{trial['task']}-s{trial['seed']}{at}-{trial_id}"
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", raw)


def best_checkpoint(cfg: SweepConfig, method: str, task: str, seed: int, axis: str | None = None) -> str:
    """Checkpoint of `method`'s best-dev run on (task, split, axis point): what `{best:METHOD}` means."""
    runs = [parse_run(rec, uri) for uri, rec in _records(cfg).items()]
    mine = [r for r in runs if r.swept and (r.method, r.task, r.seed, r.axis) == (method, task, seed, axis)]
    split = select_split(seed, mine, [point_key(p) for p in cfg.method(method).points()])
    if split.chosen is None:
        raise DataError(f"{{best:{method}}} on {task} seed {seed}: no best run yet ({'; '.join(split.gaps)})")
    if not split.chosen.checkpoint:
        raise DataError(f"{{best:{method}}} on {task} seed {seed}: its best run {split.chosen.name} kept no checkpoint")
    return split.chosen.checkpoint


def _filler(cfg: SweepConfig, trial: dict):
    def fill(placeholder: str) -> str:
        kind, _, arg = placeholder.partition(":")
        if kind == "best":
            return best_checkpoint(cfg, arg, trial["task"], trial["seed"], trial.get("axis"))
        if kind == "student":
            return cfg.student_dir(arg)
        if kind == "distilled":
            name, at, step = arg.partition("@")
            run = storage.join(cfg.experiment, DISTILLED, name)
            return kept_model(run, _step(placeholder)) if at else storage.join(run, "student")
        if kind == "axis":
            return cfg.axis.value(trial["task"], trial["axis"], trial["seed"])
        if kind in ipet.KINDS:
            return ipet.fill(cfg, kind, arg, trial)
        return {"task": trial["task"], "seed": trial["seed"], "k": cfg.trial_k(trial),
                "experiment": cfg.experiment}[kind]
    return fill


def _step(placeholder: str) -> int:
    """STEP of `distilled:NAME@STEP`."""
    step = placeholder.partition("@")[2]
    if not step.isdigit():
        raise ConfigError(f"{{{placeholder}}}: STEP must be a whole number of distillation steps "
                          "(or {axis} over an axis of them)")
    return int(step)


def _unfilled(placeholder: str) -> str:
    """A stand-in for checks before the trials: the keys and types of a config do not depend on
    which checkpoint `{best:...}` will be."""
    return f"<{placeholder}>"


def _check_filler(cfg: SweepConfig, trial: dict):
    """`trial`'s placeholders as checks before the trials fill them: its own values ({task},
    {axis}, ...) as the trial will, runs and students that do not exist yet by type only."""
    def fill(placeholder: str) -> str:
        return _unfilled(placeholder) if ":" in placeholder else _filler(cfg, trial)(placeholder)
    return fill


def _annotation(experiment: str, k: int, trial: dict, trial_id: str) -> dict:
    return {"experiment": experiment, "trial_id": trial_id, "k": k, **trial}


# --- the trial (runs in a Tune actor) --------------------------------------------------------

def _read_record(uri: str) -> tuple[dict, str | None]:
    """A trial's record, or {} and why there is none to use: missing, or damaged (not JSON)."""
    if not storage.exists(uri):
        return {}, "is missing"
    try:
        rec = json.loads(storage.read_text(uri))
    except json.JSONDecodeError as e:
        return {}, f"is not JSON ({e})"
    return (rec, None) if isinstance(rec, dict) else ({}, "is not a JSON object")


def _record(uri: str) -> dict:
    """A trial's record; {} when missing or damaged: the trial runs (again) and rewrites it."""
    return _read_record(uri)[0]


def _records(cfg: SweepConfig) -> dict[str, dict]:
    """{uri: record} of the sweep's readable records. A damaged one is left out, not an error:
    its trial runs again on `--resume` (`_lost_records`) while the others read theirs."""
    root = storage.join(cfg.experiment, RECORDS)
    files = storage.list_files(root, suffix=".json") if storage.exists(root) else []
    return {f: rec for f in files if (rec := _record(f))}


def _finished(rec: dict) -> bool:
    """Whether a trial's record says it finished: the recipe writes its record, then the trial
    annotates it (`sweep`, `status`), so one without both is unfinished."""
    return rec.get("status") == "done" and "sweep" in rec


def _ended(rec: dict, statuses=("done", "stopped")) -> bool:
    """Whether a trial's record says the trial ended: finished, or stopped early by ASHA (the
    gap records, `GapRecords`); `statuses` adds failed where a failure counts as an end."""
    return rec.get("status") in statuses and isinstance(rec.get("sweep"), dict)


def trial_fn(config: dict) -> None:
    """Tune function trainable: one recipe run for `config["trial"]` (module docstring)."""
    cfg = sweep_spec.load(config["experiment"])
    trial, trial_id = config["trial"], tune.get_context().get_trial_id()
    name = run_name(trial, trial_id)
    uri = record_uri(cfg.experiment, name)
    done = _record(uri)
    if _ended(done):  # ended before an interruption (Tune resumes every trial when a record was
        # lost, see `_phase`): keep its record, tell Tune its result
        run = parse_run(done, uri)
        tune.report({"dev": run.best_dev, "test": run.test, "final": True,
                     "step": run.dev_curve[-1][0] if run.dev_curve else done.get("step") or 0})
        return
    try:
        recipe_cfg = cfg.recipe_config(trial, name, _filler(cfg, trial))
        _, run = get_recipe(cfg.method(trial["method"]).recipe)
        record = run(recipe_cfg, callbacks=[TUNE_TRIAL])
    except Exception as exc:
        # the trial records its own error: Tune's error file can be missing when the callback
        # runs (seen with reused actors), which left "no error recorded" in the report
        _write_gap(cfg.experiment, cfg.trial_k(trial), trial, trial_id, "failed", {}, error=_error_text(exc))
        raise
    record.update(status="done", sweep=_annotation(cfg.experiment, cfg.trial_k(trial), trial, trial_id))
    storage.write_text(uri, json.dumps(record, indent=1, sort_keys=True, default=str))


def _trial_name(trial) -> str:
    return run_name(trial.config["trial"], trial.trial_id)


# --- driver side: records for trials that did not write their own ----------------------------

def _error_text(exc: BaseException | None, fallback: str = "") -> str:
    """One line saying why a trial failed (the user error when there is one)."""
    err = find_user_error(exc)
    if err is not None:
        return str(err)
    text = (str(exc) if exc is not None else "") or fallback
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else "the trial's actor died (no error recorded)")[:500]


def _error_line(trial) -> str:
    """`_error_text` of a trial's error as Tune stored it."""
    try:
        exc = trial.get_pickled_error()
    except Exception:  # noqa: BLE001 - an unreadable error file must not stop the sweep
        exc = None
    try:
        text = str(trial.get_error() or "")
    except Exception:  # noqa: BLE001
        text = ""
    return _error_text(exc, text)


def _write_gap(experiment: str, k: int, spec: dict, trial_id: str, status: str, last: dict, **extra) -> None:
    """The record of a trial that did not finish: its last reported dev and step, and why."""
    name = run_name(spec, trial_id)
    record = {"name": name, "status": status, "task": spec["task"],
              "seed": spec["seed"], "best_dev": last.get("best", last.get("dev")), "step": last.get("step"),
              "sweep": _annotation(experiment, k, spec, trial_id), **extra}
    storage.write_text(record_uri(experiment, name), json.dumps(record, indent=1, sort_keys=True, default=str))


class GapRecords(tune.Callback):
    """Writes a record for a trial that failed or that ASHA stopped, so the report shows a
    marked gap (failed) or a finished non-candidate (stopped) instead of nothing."""

    def __init__(self, cfg: SweepConfig):
        self.cfg = cfg

    def _write(self, trial, status: str) -> None:
        spec = trial.config["trial"]
        own = _record(record_uri(self.cfg.experiment, run_name(spec, trial.trial_id)))
        if _finished(own):
            return  # the trial finished and wrote its own record
        extra = {}
        if status == "failed":  # the trial's own failed record has its error; this adds how far it got
            extra["error"] = own["error"] if own.get("status") == "failed" else _error_line(trial)
        _write_gap(self.cfg.experiment, self.cfg.trial_k(spec), spec, trial.trial_id, status, trial.last_result or {},
                   **extra)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._write(trial, "failed")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._write(trial, "stopped")


class TrialLines(tune.Callback):
    """One plain line per ended trial: the sweep's progress in a log file (`ray job submit`, a
    captured `make demo`), where Tune's per-trial boxes and status tables are noise."""

    def __init__(self, total: int):
        self.total, self.ended = total, 0

    def _line(self, trial, status: str) -> None:
        self.ended += 1
        result = trial.last_result or {}
        metrics = "".join(f" {k}={result[k]:.4f}" for k in ("dev", "test") if isinstance(result.get(k), (int, float)))
        print(f"[{self.ended}/{self.total}] {_trial_name(trial)} {status}{metrics}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trial, "failed")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._line(trial, "done")


class GroupedASHA(FIFOScheduler):
    """One ASHA per (method, task, split, axis point): only the grid points of one split compete."""

    def __init__(self, grace_period: int, reduction_factor: float, max_t: int):
        super().__init__()
        self._asha = dict(grace_period=grace_period, reduction_factor=reduction_factor,
                          # past the last step: ASHA stops a trial that reaches max_t, and stopping
                          # it at its final report would kill it before it writes its record
                          max_t=max_t + 1)
        self._groups = {}

    def set_search_properties(self, metric, mode, **spec) -> bool:
        self._metric, self._mode = metric, mode
        return True

    def _of(self, trial) -> AsyncHyperBandScheduler:
        t = trial.config["trial"]
        key = (t["method"], t["task"], t["seed"], t.get("axis"))
        if key not in self._groups:
            self._groups[key] = AsyncHyperBandScheduler(time_attr="step", metric=self._metric, mode=self._mode,
                                                        **self._asha)
        return self._groups[key]

    def on_trial_add(self, tune_controller, trial):
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result):
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"GroupedASHA over {len(self._groups)} (method, task, split, axis point) groups"


# --- before the trials ------------------------------------------------------------------------

def check(cfg: SweepConfig) -> dict:
    """Every method x task x split x grid point builds its recipe config, every task is known,
    every split loads and every named model is one, before a single trial starts. Sets
    `cfg.pool_test_tasks` from the splits loaded: the tasks whose test sets are pool fallbacks;
    draws the splits of a K axis the data root lacks and sets `cfg.made_splits` (`_split`).
    Returns the `distilled:` configs, each keeping the steps the trials read (`distilled_steps`)."""
    from rayapp.data.demonstrations import check_sbert
    from rayapp.modeling.models import check_model
    from rayapp.recipes.finetune import FinetuneConfig, check_models
    from rayapp.tasks.registry import get_task

    loaded, models, demo_models, prompts = {}, set(), set(), {}  # loaded: (data_dir, task, k, seed) -> (the sweep's task name, pool test?)
    drawn = {}  # a split the axis drew (TASK/K-SEED) -> the data root it stands in for
    while True:
        for trial in cfg.trials():
            rcfg = cfg.recipe_config(trial, "check", _check_filler(cfg, trial))
            task = rcfg.resolve_task() if hasattr(rcfg, "resolve_task") else get_task(trial["task"])
            data_dir = getattr(rcfg, "data_dir", None)
            if (data_dir, task.name, rcfg.k, trial["seed"]) not in loaded:
                try:
                    split = _split(cfg, trial, task, data_dir, drawn)
                except DataError as e:
                    raise DataError(f"task {trial['task']} split seed {trial['seed']}: {e}") from None
                loaded[data_dir, task.name, rcfg.k, trial["seed"]] = \
                    (trial["task"], bool(split.source.get("test_fallback")))
            refs = [ref for key in ("model", "init", "teacher") if (ref := getattr(rcfg, key, None))]
            if isinstance(rcfg, FinetuneConfig) and not any("<" in ref for ref in refs):
                # the prompt with this model (label words, length), as the run itself checks it
                prompts.setdefault(repr((rcfg.init or rcfg.model, rcfg.teacher, rcfg.method, rcfg.max_length,
                                         rcfg.demonstrations, rcfg.demo_model, rcfg.prompt_tokens, task)),
                                   (trial, rcfg, task))
            else:
                models.update(ref for ref in refs if "<" not in ref)
                if getattr(rcfg, "demonstrations", False):  # LM-BFF's SBERT: one line, not failed trials
                    demo_models.add(rcfg.demo_model)
        pool = sorted({name for name, fallback in loaded.values() if fallback}, key=cfg.tasks.index)
        if pool == cfg.pool_test_tasks:
            break
        cfg.pool_test_tasks = pool  # a method's `seeds:` no longer narrows these: check their other splits too
    distillations = cfg.distill_configs(distilled_steps(cfg))  # a step outside a distillation's steps fails here
    for ref in sorted(models):
        check_model(ref, mlm=False)
    for ref in sorted(demo_models):
        check_sbert(ref)
    for trial, rcfg, task in prompts.values():
        try:
            check_models(rcfg, task)
        except (ConfigError, PromptError) as e:
            raise type(e)(f"method {trial['method']} on {trial['task']}: {e}") from None
    return distillations


def _split(cfg: SweepConfig, trial: dict, task, data_dir: str | None, drawn: dict):
    """The trial's split from its data root; for a K axis value the root lacks, drawn once
    from the task's original data under the experiment (`fewshot.draw_lmbff_split`), where
    every trial of that task, K and split reads it (`SweepConfig.made_splits`)."""
    from rayapp.data import fewshot

    k, seed = cfg.trial_k(trial), trial["seed"]
    if k == cfg.k or cfg.made_split(trial) or fewshot.holds_split(data_dir, task, k, seed):
        return fewshot.load_lmbff(data_dir, task, k=k, seed=seed)
    made = f"{trial['task']}/{k}-{seed}"
    if drawn.setdefault(made, data_dir) != data_dir:
        raise ConfigError(f"methods read {trial['task']} from data roots {drawn[made]} and {data_dir}, which lack "
                          f"its {k}-shot split {seed}; the axis draws one split per task, K and seed: give them one "
                          "data_dir")
    original = cfg.original(trial["task"])
    try:
        split = fewshot.draw_lmbff_split(data_dir, task, k, seed, storage.join(cfg.experiment, SPLITS), base_k=cfg.k,
                                         train=original and original.train, test=original and original.test)
    except DataError as e:
        hint = "" if original else f" (or draw from the task's full original train set: original_data.{trial['task']})"
        raise ConfigError(f"axis {cfg.axis.key}={k}: {e}{hint}") from None
    if made not in cfg.made_splits:
        cfg.made_splits.append(made)
    return split


def make_students(cfg: SweepConfig) -> None:
    """Cut the `students:` from their teachers once (kept across resumes)."""
    from rayapp.modeling.models import local_model_dir
    from rayapp.recipes.pretrain import make_student

    for name, s in cfg.student_specs.items():
        out = cfg.student_dir(name)
        if storage.exists(storage.join(out, "config.json")):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            make_student(local_model_dir(s.teacher), tmp, s.layers)
            storage.copy_dir(tmp, out)
        print(f"student {name}: {s.teacher} layers {s.layers or 'every other'} -> {out}")


def distilled_steps(cfg: SweepConfig) -> dict[str, set[int]]:
    """NAME -> the steps of `distilled.NAME` the trials start from (`{distilled:NAME@STEP}`)."""
    steps: dict[str, set[int]] = {}
    for trial in cfg.trials():
        typed = _check_filler(cfg, trial)

        def fill(placeholder: str) -> str:
            if placeholder.startswith("distilled:") and "@" in placeholder:
                steps.setdefault(placeholder[len("distilled:"):].partition("@")[0], set()).add(_step(placeholder))
            return typed(placeholder)
        cfg.recipe_config(trial, "check", fill)
    return steps


def _distill(c) -> str:
    from rayapp.recipes.distill import run

    env.quiet_console()  # Ray is up in this task, so the run's `start_ray` leaves Ray Data's bars (setting 5) on
    return run(c)["model"]


def make_distilled(cfg: SweepConfig, distillations: dict) -> None:
    """Run the `distilled:` distillations before the trials, all at once: each is a Ray task
    that drives its run as `rayapp distill` would (its workers placed by the run's engine). A
    finished one is kept across resumes; an interrupted one continues from its checkpoint
    (the run's name is its key). Every one runs to its end before a failure is raised.
    `distillations`: the configs `check` returned."""
    import ray

    configs = {name: c for name, c in distillations.items() if not storage.exists(record_uri(c.output_dir, name))}
    if not configs:
        return
    print(f"distilling {', '.join(f'{n} (keeping steps {c.keep_steps})' for n, c in configs.items())}")
    drive = ray.remote(num_cpus=0, memory=DRIVER_MEMORY)(_distill)  # it waits on its run, as a trial does
    refs = {name: drive.remote(c) for name, c in configs.items()}
    failed = []
    for name, ref in refs.items():
        try:
            print(f"distilled {name} -> {ray.get(ref)}")
        except Exception as exc:  # noqa: BLE001 - the others finish; one error names every failure
            failed.append(f"{name}: {_error_text(exc)}")
    if failed:
        raise DataError(f"distillations of sweep {cfg.experiment} failed ({'; '.join(failed)}); fix them and "
                        f"continue with `rayapp sweep --resume {cfg.experiment}`")


def _engine(cfg: SweepConfig, trial: dict):
    return cfg.recipe_config(trial, "check", _unfilled).engine


def trial_resources(cfg: SweepConfig) -> dict[str, float]:
    """What the largest trial's workers take (the engine config of every trial)."""
    need = {"CPU": 0.0, "GPU": 0.0}
    for trial in cfg.trials():
        engine = _engine(cfg, trial)
        need["GPU"] = max(need["GPU"], engine.num_workers if engine.use_gpu else 0)
        need["CPU"] = max(need["CPU"], 0 if engine.use_gpu else engine.num_workers * engine.cpus_per_worker)
    return need


def actor_resources(cfg: SweepConfig, phase: int):
    """Tune's resource request per trial: the local worker's resources for a trial that runs
    its loop in its actor, memory only for one that waits on its Ray Train run."""
    by_trial = {}
    for trial in cfg.trials(phase):
        engine = _engine(cfg, trial)
        need = {**local_resources(engine), "memory": DRIVER_MEMORY} if is_local(engine) else {"memory": DRIVER_MEMORY}
        by_trial[json.dumps(trial, sort_keys=True)] = tune.PlacementGroupFactory([need])
    return lambda config: by_trial[json.dumps(config["trial"], sort_keys=True)]


def cluster_fits(need: dict[str, float]) -> int:
    """How many trials needing `need` the cluster holds: at its configured maximum when an
    autoscaler reports one (the limit Ray Train itself checks worker groups against), else
    with the nodes alive now (a fixed cluster, or nodes that join by hand). At least 1."""
    import ray
    from ray._private.state import state

    have, most = ray.cluster_resources(), state.get_max_resources_from_cluster_config() or {}
    fits = [int(max(have.get(r, 0), most.get(r, 0)) // n) for r, n in need.items() if n > 0]
    return max(1, min(fits)) if fits else 1


class ClusterPacedGrid(BasicVariantGenerator):
    """Tune's grid search, starting a trial only while fewer than `cluster_fits(need)` run.

    Not a number fixed at submit time: on a cluster that scales from zero that was 1, forever.
    The limit is re-read (every few seconds, at most) whenever Tune asks for a trial, so
    trials fill an autoscaler's configured maximum (their Train runs' pending placement groups
    are the demand it scales up for) and nodes that join later. Uses Tune's own
    `_live_trials` bookkeeping, which `max_concurrent` reads too."""

    REFRESH_S = 2.0

    def __init__(self, need: dict[str, float]):
        super().__init__()
        self.need, self._limit, self._read_at = need, 1, float("-inf")

    def limit(self) -> int:
        if time.monotonic() - self._read_at > self.REFRESH_S:
            self._limit, self._read_at = cluster_fits(self.need), time.monotonic()
        return self._limit

    def next_trial(self):
        if len(self._live_trials) >= self.limit():
            return None
        return super().next_trial()


# --- running ------------------------------------------------------------------------------

def _tune_storage(experiment: str):
    fs, path = storage.filesystem(experiment)
    if storage.is_remote(experiment):
        return path, fs
    storage.makedirs(experiment)
    return path, None


class SweepInterrupted(RuntimeError):
    """The sweep was stopped before a phase ended; `--resume` continues it."""


class NoTuneResumeHint(logging.Filter):
    """Drops Tune's "Resume experiment with: Tuner.restore(...)" after an interrupt: a sweep is
    continued with `rayapp sweep --resume DIR`, the hint the sweep prints itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore(" not in record.getMessage()


TUNE_LOGGER = "ray.tune.tune"  # where `tune.run` logs its resume hint when interrupted


def _ended_trials(cfg: SweepConfig, phase: int) -> int:
    """How many records of the phase's methods say their trial ended (done, failed or
    stopped); a damaged record says nothing, so its trial has not ended."""
    methods = set(cfg.phases[phase])
    return sum(_ended(r, STATUSES) and r["sweep"].get("method") in methods for r in _records(cfg).values())


def _lost_records(cfg: SweepConfig, exp_path: str, fs) -> list[str]:
    """A line per trial Tune counts as finished whose record is missing or damaged (deleted,
    overwritten): Tune would never run it again, and the phase would never end."""
    lines = []
    for trial in tune.ExperimentAnalysis(exp_path, storage_filesystem=fs).trials:
        if trial.status != "TERMINATED":
            continue  # unfinished and errored trials run again anyway
        name = run_name(trial.config["trial"], trial.trial_id)
        rec, why = _read_record(record_uri(cfg.experiment, name))
        if not _ended(rec):
            lines.append(f"re-running trial {name}: its record {record_uri(cfg.experiment, name)} "
                         f"{why or 'does not say it ended (status ' + repr(rec.get('status')) + ')'}")
    return lines


def _phase(cfg: SweepConfig, phase: int) -> None:
    path, fs = _tune_storage(cfg.experiment)
    name = f"tune-{phase}"
    trainable = tune.with_resources(trial_fn, actor_resources(cfg, phase))
    live = sys.stdout.isatty()
    if not live:  # Tune's new output prints its experiment box and paths even at verbose=0
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    exp_path = f"{path.rstrip('/')}/{name}"
    planned = cfg.trials(phase)
    if tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        # unfinished and errored trials run again (their Train runs resume from their
        # checkpoints); finished ones stay finished, unless a record of the phase is lost: Tune
        # cannot restart one finished trial, so then every finished trial runs again, and those
        # whose record says they ended only report it (`trial_fn`)
        lost = _lost_records(cfg, exp_path, fs) if _ended_trials(cfg, phase) < len(planned) else []
        for line in lost:
            print(line, flush=True)
        again = tune.ResumeConfig.ResumeType.RESUME  # RESUME keeps the trial id: its run and record names
        tuner = tune.Tuner.restore(exp_path, trainable, storage_filesystem=fs, _resume_config=tune.ResumeConfig(
            finished=again if lost else tune.ResumeConfig.ResumeType.SKIP, unfinished=again, errored=again))
    else:
        max_t = max(cfg.recipe_config(t, "check", _unfilled).max_steps for t in cfg.trials(phase))
        tuner = tune.Tuner(
            trainable,
            param_space={"experiment": cfg.experiment, "trial": tune.grid_search(cfg.trials(phase))},
            tune_config=tune.TuneConfig(
                # a trial's actor is reused by the next trial: its imports (torch,
                # transformers, the recipe) are paid once per actor, not once per trial
                metric="dev", mode="max", reuse_actors=True,
                max_concurrent_trials=cfg.max_concurrent_trials or None,
                search_alg=None if cfg.max_concurrent_trials else ClusterPacedGrid(trial_resources(cfg)),
                scheduler=GroupedASHA(cfg.asha.grace_period, cfg.asha.reduction_factor, max_t) if cfg.asha else None,
                trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            # Tune's live status tables in a terminal; one line per trial in a log file
            run_config=tune.RunConfig(
                name=name, storage_path=path, storage_filesystem=fs,
                callbacks=[GapRecords(cfg)] + ([] if live else [TrialLines(len(cfg.trials(phase)))]),
                failure_config=tune.FailureConfig(max_failures=cfg.max_failures), verbose=1 if live else 0),
        )
    hint = NoTuneResumeHint()
    logging.getLogger(TUNE_LOGGER).addFilter(hint)
    try:
        tuner.fit()
    finally:
        logging.getLogger(TUNE_LOGGER).removeFilter(hint)
    # Tune returns normally when interrupted (Ctrl-C, SIGTERM): the next phase needs this one's
    # best runs, so stop unless every trial of the phase left a record (done, failed or stopped)
    ended = _ended_trials(cfg, phase)
    if ended < len(planned):
        raise SweepInterrupted(f"sweep {cfg.experiment} stopped in phase {phase + 1} of {len(cfg.phases)} "
                               f"({ended}/{len(planned)} trials ended); "
                               f"continue it with `rayapp sweep --resume {cfg.experiment}`")


def run(cfg: SweepConfig, resume: bool = False) -> dict:
    """Run (or continue) the sweep; returns {"experiment", "trials", "done", "failed", "stopped", "seconds"}."""
    started = time.time()
    storage.require_writable(cfg.storage, "storage", (cfg.name,))  # the experiment folder, before any work
    stored = storage.join(cfg.experiment, sweep_spec.SPEC_FILE)
    distillations = check(cfg)  # first: it fills `pool_test_tasks`, part of the config compared and saved
    if storage.exists(stored) and not resume:
        if json.loads(storage.read_text(stored)) != json.loads(json.dumps(to_dict(cfg))):
            raise ConfigError(f"sweep {cfg.experiment} exists with another config; continue it with "
                              f"`rayapp sweep --resume {cfg.experiment}` or choose another name=")
    if not storage.exists(stored):
        sweep_spec.save(cfg)
    make_students(cfg)
    # trial drivers stay in the job's working directory (Tune would move them into their trial
    # dirs), so relative paths in the config mean what they mean on the command line
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    env.start_ray()
    make_distilled(cfg, distillations)
    pace = (f"up to {cfg.max_concurrent_trials}" if cfg.max_concurrent_trials else
            f"as many as the cluster holds ({cluster_fits(trial_resources(cfg))} now)")
    print(f"sweep {cfg.experiment}: {len(cfg.trials())} trials, {pace} at a time "
          f"(phases: {cfg.phases}); tensorboard --logdir {cfg.experiment}")
    for phase in range(len(cfg.phases)):
        ipet.prepare(cfg, phase, lambda: _records(cfg))  # iPET: the labels a phase's trials read
        _phase(cfg, phase)
    runs = [r for r in read_runs([cfg.experiment]) if r.swept] \
        if storage.exists(storage.join(cfg.experiment, RECORDS)) else []
    counts = {s: sum(r.status == s for r in runs) for s in ("done", "failed", "stopped")}
    return {"experiment": cfg.experiment, "trials": len(cfg.trials()), **counts,
            "seconds": round(time.time() - started, 1)}


def resume(experiment: str) -> dict:
    """Continue an interrupted sweep from its directory: finished trials are not run again."""
    return run(sweep_spec.load(experiment), resume=True)
