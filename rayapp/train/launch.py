"""Ray Train plumbing: run a per-worker loop as a `TorchTrainer`, report metrics and
checkpoints from it, restore after a restart.

A run lives in `<storage>/<name>`. Ray Train V2 resumes a run whose directory already holds
a checkpoint, so a stable `name` (recipes derive it from their config) makes re-submitting a
job after a lost head node continue from its last checkpoint.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from rayapp import storage as st
from rayapp.errors import find_user_error
from rayapp.train.engine import Engine, EngineConfig


def report(metrics: dict, engine: Engine | None = None, state: dict | None = None, tokenizer=None,
           weights: bool = True) -> None:
    """`ray.train.report` from every rank, with a checkpoint of `engine` when given (of its
    trainer state only with `weights=False`: Train V2's result carries the metrics of the
    last checkpoint, so a final report always has one)."""
    import ray.train

    if engine is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        engine.save(tmp, state or {}, tokenizer, weights)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def restore(engine: Engine) -> dict | None:
    """The trainer state of the latest checkpoint after a restart (None on a fresh run)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return engine.load(d)


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


def launch(loop: Callable[[dict], None], loop_config: dict, cfg: EngineConfig, *, storage: str, name: str,
           keep_checkpoints: int = 2, callbacks: Sequence = ()):
    """Run `loop` on `cfg.num_workers` Ray Train workers; returns the `ray.train.Result`.
    `storage` is a local dir or `s3://` URI (RunConfig storage); the run lives in
    storage/name. `callbacks` go to the RunConfig (a Tune trial passes its report callback)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init()  # the embedded default: a local cluster on this machine
    fs, path = st.filesystem(storage)
    if not st.is_remote(storage):  # workers run in other directories: absolute paths only
        path = str(Path(path).resolve())
        Path(path).mkdir(parents=True, exist_ok=True)
        fs = None
    # workers on any node read the config's inputs and write to the storage
    st.require_shared({**local_paths(loop_config.get("cfg")), "output_dir": storage})
    trainer = TorchTrainer(
        loop,
        # a live bar only when someone watches a terminal; log files get plain lines
        train_loop_config={"live_progress": sys.stderr.isatty(), **loop_config},
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
    try:
        return trainer.fit()
    except Exception as exc:  # a user mistake seen by a worker is reported as that mistake
        err = find_user_error(exc)
        if err is None:
            raise
        raise err from None


def checkpoint_uri(storage_uri: str, checkpoint, *parts: str) -> str | None:
    """URI of a Ray Train checkpoint (Ray drops the `s3://` scheme from its paths)."""
    if checkpoint is None:
        return None
    path = checkpoint.path
    if st.is_remote(storage_uri) and "://" not in path:
        path = storage_uri.split("://", 1)[0] + "://" + path
    return st.join(path, *parts)
