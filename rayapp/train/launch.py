"""Ray Train plumbing: run a per-worker loop as a `TorchTrainer`, report metrics and
checkpoints from it, restore after a restart.

A run lives in `<storage>/<name>`. Ray Train V2 resumes a run whose directory already holds
a checkpoint, so a stable `name` (recipes derive it from their config) makes re-submitting a
job after a lost head node continue from its last checkpoint.
"""
from __future__ import annotations

import ipaddress
import logging
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from rayapp import storage as st
from rayapp.errors import ConfigError, find_user_error
from rayapp.train.engine import Engine, EngineConfig

log = logging.getLogger(__name__)


def report(metrics: dict, engine: Engine | None = None, state: dict | None = None, tokenizer=None) -> None:
    """`ray.train.report` from every rank, with a checkpoint of `engine` when given."""
    import ray.train

    if engine is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        engine.save(tmp, state or {}, tokenizer)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def restore(engine: Engine) -> dict | None:
    """The trainer state of the latest checkpoint after a restart (None on a fresh run)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return engine.load(d)


def _is_local_cluster(nodes: list[dict]) -> bool:
    """A cluster whose nodes all sit on loopback is one machine: it cannot grow."""
    try:
        return all(ipaddress.ip_address(n["NodeManagerAddress"]).is_loopback for n in nodes if n.get("Alive"))
    except (KeyError, ValueError):
        return False


def check_room_for_data(cfg: EngineConfig) -> None:
    """Ray Data's read tasks need a CPU beside the CPU workers, or the workers wait for data
    forever. On a one-machine cluster that is an error now; a real cluster may autoscale, so
    there it is only a warning."""
    import ray

    if cfg.use_gpu:
        return
    nodes = ray.nodes()
    total = sum(n.get("Resources", {}).get("CPU", 0) for n in nodes if n.get("Alive"))
    if total - cfg.num_workers * cfg.cpus_per_worker >= 1:
        return
    msg = (f"{cfg.num_workers} workers x {cfg.cpus_per_worker} CPUs take all {total:g} CPUs of the cluster, "
           "leaving none for Ray Data to stream the training data; lower engine.cpus_per_worker (e.g. 0.5) "
           "or engine.num_workers, or add nodes")
    if _is_local_cluster(nodes):
        raise ConfigError(msg)
    log.warning("%s (waiting for the autoscaler to add CPUs)", msg)


def scaling_config(cfg: EngineConfig):
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                         resources_per_worker=None if cfg.use_gpu else {"CPU": cfg.cpus_per_worker})


def launch(loop: Callable[[dict], None], loop_config: dict, cfg: EngineConfig, *, storage: str, name: str,
           datasets: dict | None = None, keep_checkpoints: int = 2, callbacks: Sequence = ()):
    """Run `loop` on `cfg.num_workers` Ray Train workers; returns the `ray.train.Result`.
    `storage` is a local dir or `s3://` URI (RunConfig storage); the run lives in
    storage/name. `callbacks` go to the RunConfig (a Tune trial passes its report callback)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init()  # the embedded default: a local cluster on this machine
    if datasets:
        check_room_for_data(cfg)
    fs, path = st.filesystem(storage)
    if not st.is_remote(storage):  # workers run in other directories: absolute paths only
        path = str(Path(path).resolve())
        Path(path).mkdir(parents=True, exist_ok=True)
        fs = None
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(
            name=name, storage_path=path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            callbacks=list(callbacks),
        ),
        datasets=datasets,
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
