"""Launching the one training loop (`train.loop.train_loop`): on Ray Train, or as one
local worker (`train.worker`).

A run lives in `<storage>/<name>`; a stable `name` (recipes derive it from their config)
makes re-submitting a job after a lost head node continue from its last checkpoint, on
either launcher.

Which launcher (`engine.launcher`):
- `auto` (default): a run of one DDP worker is one `LocalWorker`: in this process when it is
  a Tune trial (a sweep's trial actor holds the CPU/GPU, so the loop runs there and the
  actor, reused by the next trial, keeps torch, transformers and the tokenizers imported),
  else in one Ray task with that worker's resources (`rayapp finetune`, `evaluate`). Runs
  of several workers, and DeepSpeed (it needs a process group), run on Ray Train.
- `train`: Ray Train always (a `TorchTrainer` with a TrainController and a worker group).

A Tune trial says so by passing `TUNE_TRIAL` in `callbacks`. A local run then reports with
`tune.report`; a Ray Train run gets Tune's `TuneReportCallback` (`_report_callback`),
created only then: creating one starts a queue actor that the trial's Tune session polls a
few times a second for the rest of the trial, and that polling slowed two concurrent local
trials' loops by about a quarter on 2 cores (`benchmarks/sweep.py`).

A run a trial starts itself (a Prompt-Distiller trial tuning its teacher T) gets
`nested(callbacks)`: `IN_TRIAL`, one local run in this process, reporting nothing to the
trial (its metrics are not the trial's). It cannot be a Ray task: the trial's actor holds
the worker's resources in Tune's placement group, and a task asking for them there is
refused ("No trial resources are available").
"""
from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from rayapp import env
from rayapp import storage as st
from rayapp.errors import find_user_error
from rayapp.train.engine import Engine, EngineConfig
from rayapp.train.worker import LocalWorker, TrainWorker, running_on, scalar_metrics, worker


def report(metrics: dict, engine: Engine | None = None, state: dict | None = None, tokenizer=None,
           weights: bool = True) -> None:
    """Report from every rank, with a checkpoint of `engine` when given (of its trainer state
    only with `weights=False`: a run's outcome is its last checkpoint's metrics, so a final
    report always has one)."""
    if engine is None:
        worker().report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        engine.save(tmp, state or {}, tokenizer, weights)
        worker().report(metrics, tmp)


def restore(engine: Engine) -> dict | None:
    """The trainer state of the latest checkpoint after a restart (None on a fresh run)."""
    with worker().latest() as d:
        return None if d is None else engine.load(d)


def is_local(cfg: EngineConfig) -> bool:
    """Whether a run takes the local launcher (module docstring)."""
    return cfg.launcher == "auto" and cfg.num_workers == 1 and cfg.engine == "ddp"


def local_resources(cfg: EngineConfig) -> dict[str, float]:
    """What a local run's one worker holds: the resources of one Ray Train worker."""
    return {"CPU": 1.0, "GPU": 1.0} if cfg.use_gpu else {"CPU": cfg.cpus_per_worker}


def scaling_config(cfg: EngineConfig):
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                         resources_per_worker=None if cfg.use_gpu else {"CPU": cfg.cpus_per_worker})


def local_paths(cfg, prefix: str = "") -> dict[str, str]:
    """The config's values that name an existing local file or folder, by dotted key (a
    model dir, a data folder, an init checkpoint): what Ray workers on other nodes must see."""
    if cfg is None or not dataclasses.is_dataclass(cfg):
        return {}
    found = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            found.update(local_paths(value, f"{prefix}{f.name}."))
        elif isinstance(value, str) and os.sep in value and not st.is_remote(value) \
                and os.path.exists(os.path.expanduser(value)):
            found[prefix + f.name] = value
    return found


@dataclass
class Outcome:
    """What a finished run hands its driver: the loop's final report and its checkpoint."""
    metrics: dict
    checkpoint: str | None  # URI of the final checkpoint


def _train_worker(loop_cfg: dict) -> None:
    """Ray Train's per-worker function."""
    with running_on(TrainWorker()):
        loop_cfg["loop"](loop_cfg)


def _local_run(loop: Callable[[dict], None], loop_cfg: dict, run_uri: str, keep: int, use_gpu: bool,
               on_report: Callable[[dict], None] | None = None) -> Outcome:
    w = LocalWorker(run_uri, keep, use_gpu, on_report)
    with running_on(w):
        loop(loop_cfg)
    if w.committed is None:  # a loop that reported no checkpoint: as `_train` returns it
        return Outcome({}, None)
    return Outcome(w.committed["metrics"], st.join(run_uri, w.committed["checkpoint"]))


TUNE_TRIAL = "tune-trial"  # in `callbacks`: this run is a Tune trial (module docstring)
IN_TRIAL = "in-trial"      # in `callbacks`: a run a trial started, run in its process (module docstring)


def nested(callbacks: Sequence) -> list:
    """The callbacks of a run started from inside the run whose callbacks are `callbacks`."""
    return [IN_TRIAL] if TUNE_TRIAL in callbacks or IN_TRIAL in callbacks else []


def _report_callback():
    """Tune's report callback for a Ray Train run in a trial, passing on the scalar metrics
    only (as a local run reports them): curves and eval lists stay in the run record."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ScalarReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            super().after_report(run_context, [scalar_metrics(m) for m in metrics], checkpoint)

    return ScalarReport()


def _tune_report(metrics: dict) -> None:
    from ray import tune

    tune.report(scalar_metrics(metrics))


def launch(loop: Callable[[dict], None], loop_config: dict, cfg: EngineConfig, *, storage: str, name: str,
           keep_checkpoints: int = 2, callbacks: Sequence = ()) -> Outcome:
    """Run `loop` as `storage/name` (a local dir or `s3://` URI) on the launcher `cfg` picks
    (module docstring). `callbacks` go to a Ray Train run's RunConfig; `TUNE_TRIAL` among
    them means "this is a Tune trial" (module docstring)."""
    import ray

    env.start_ray()
    # workers on any node read the config's inputs and write to the storage
    st.require_shared({**local_paths(loop_config.get("cfg")), "output_dir": storage})
    # a live bar only when someone watches a terminal; log files get plain lines
    loop_config = {"live_progress": sys.stderr.isatty(), "loop": loop, **loop_config}
    try:
        if is_local(cfg):
            run_uri = st.join(storage if st.is_remote(storage) else str(Path(storage).resolve()), name)
            if TUNE_TRIAL in callbacks or IN_TRIAL in callbacks:  # in the trial's actor; only a trial reports
                return _local_run(loop, loop_config, run_uri, keep_checkpoints, cfg.use_gpu,
                                  _tune_report if TUNE_TRIAL in callbacks else None)
            need = local_resources(cfg)
            task = ray.remote(_local_run).options(num_cpus=need["CPU"], num_gpus=need.get("GPU", 0),
                                                  max_retries=cfg.max_failures, name=f"rayapp:{name}")
            return ray.get(task.remote(loop, loop_config, run_uri, keep_checkpoints, cfg.use_gpu))
        callbacks = [_report_callback() if c == TUNE_TRIAL else c for c in callbacks if c != IN_TRIAL]
        return _train(loop_config, cfg, storage, name, keep_checkpoints, callbacks)
    except Exception as exc:  # a user mistake seen by a worker is reported as that mistake
        err = find_user_error(exc)
        if err is None:
            raise
        raise err from None


def _train(loop_config: dict, cfg: EngineConfig, storage: str, name: str, keep_checkpoints: int,
           callbacks: Sequence) -> Outcome:
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    fs, path = st.filesystem(storage)
    if not st.is_remote(storage):  # workers run in other directories: absolute paths only
        path = str(Path(path).resolve())
        Path(path).mkdir(parents=True, exist_ok=True)
        fs = None
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(
            name=name, storage_path=path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            callbacks=list(callbacks),
            # Ray Train's own INFO lines (worker group start, process group, result reports) go
            # to its session log files only; the console gets rayapp's progress and warnings
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    result = trainer.fit()
    return Outcome(dict(result.metrics or {}), checkpoint_uri(storage, result.checkpoint))


def checkpoint_uri(storage_uri: str, checkpoint) -> str | None:
    """URI of a Ray Train checkpoint (Ray drops the `s3://` scheme from its paths)."""
    if checkpoint is None:
        return None
    path = checkpoint.path
    if st.is_remote(storage_uri) and "://" not in path:
        path = storage_uri.split("://", 1)[0] + "://" + path
    return path
