"""The shared training engine: one Ray Train launcher and one step loop for every recipe.

A recipe (finetune, distill, ...) writes a per-worker loop that builds its model, wraps it
in an `Engine` and calls `engine.train_step(micro_batches, loss_fn)`; `launch` runs that
loop as a Ray Train `TorchTrainer` on 1..n workers. The engine is either plain DDP
(`ray.train.torch.prepare_model`) or DeepSpeed (ZeRO 0-2, bf16/fp16); on CPU both use gloo,
and DeepSpeed runs with `DS_ACCELERATOR=cpu`, so tests exercise the same code as GPU
clusters.

Batch sizes are global: the config says how many examples one optimizer step sees, and
`split_batch` derives the per-worker micro-batch and gradient accumulation from the number
of workers, so a run's numbers do not depend on how many workers it had.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal

import torch

from rayapp.errors import ConfigError, find_user_error


@dataclass
class EngineConfig:
    engine: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: int = 2                 # DeepSpeed ZeRO stage 0, 1 or 2
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    num_workers: int = 1
    use_gpu: bool | None = None         # None: use GPUs when the cluster has them
    cpus_per_worker: float = 1.0        # CPU workers; leave CPUs free for Ray Data when streaming
    max_device_batch: int = 0           # largest micro-batch on one device; 0 = no limit
    max_failures: int = 0               # worker/node failures to recover from (FailureConfig)
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"engine.num_workers must be >= 1, got {self.num_workers}")
        if self.engine == "deepspeed" and self.zero_stage not in (0, 1, 2):
            raise ConfigError(
                f"engine.zero_stage={self.zero_stage}: stages 0-2 are supported (stage 3 shards "
                "the parameters, which the HF export here does not gather)"
            )
        if self.engine == "ddp" and self.precision == "fp16":
            raise ConfigError("engine.precision=fp16 needs engine=deepspeed (loss scaling); use bf16 or fp32 with ddp")


def split_batch(global_batch: int, world_size: int, max_device_batch: int = 0) -> tuple[int, int]:
    """(micro_batch, grad_accum) per worker so that micro * accum * world == global_batch."""
    if global_batch < world_size or global_batch % world_size:
        raise ConfigError(
            f"batch_size={global_batch} (global) cannot be split evenly over {world_size} workers; "
            f"use a multiple of {world_size} or change engine.num_workers"
        )
    per_worker = global_batch // world_size
    if max_device_batch <= 0 or per_worker <= max_device_batch:
        return per_worker, 1
    accum = math.ceil(per_worker / max_device_batch)
    while per_worker % accum:
        accum += 1
    return per_worker // accum, accum


def global_batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The example indices of optimizer step `step`: epochs are seeded permutations of
    range(n), so every worker computes the same global batch without communication."""
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return perm[pos * batch_size:(pos + 1) * batch_size]


def shard(items: list, rank: int, world_size: int) -> list:
    """Contiguous slice of `items` for `rank` (the global batch is split, not strided)."""
    per = len(items) // world_size
    return items[rank * per:(rank + 1) * per]


def linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup then linear decay to 0 (the schedule SMASH and LM-BFF use)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Engine:
    """Model + optimizer + schedule on one worker, DDP or DeepSpeed behind one interface."""

    def __init__(self, model: torch.nn.Module, cfg: EngineConfig, *, lr: float, weight_decay: float,
                 warmup_steps: int, total_steps: int, micro_batch: int, grad_accum: int):
        import ray.train.torch

        self.cfg = cfg
        self.grad_accum = grad_accum
        self.device = ray.train.torch.get_device()
        decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if cfg.engine == "deepspeed":
            self._init_deepspeed(model, groups, lr, warmup_steps, total_steps, micro_batch, grad_accum)
        else:
            self.model = ray.train.torch.prepare_model(model)
            self.optimizer = torch.optim.AdamW(groups, lr=lr, fused=self.device.type == "cuda")
            self.scheduler = linear_schedule(self.optimizer, warmup_steps, total_steps)
            self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    def _init_deepspeed(self, model, groups, lr, warmup_steps, total_steps, micro_batch, grad_accum):
        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed picks an accelerator
        import deepspeed
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_initialized() else 1
        ds_config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": grad_accum,
            "train_batch_size": micro_batch * grad_accum * world,
            "gradient_clipping": self.cfg.grad_clip,
            "zero_optimization": {"stage": self.cfg.zero_stage},
            "bf16": {"enabled": self.cfg.precision == "bf16"},
            "fp16": {"enabled": self.cfg.precision == "fp16"},
            # every rank writes its shard to its own local dir; Ray merges them in storage
            "checkpoint": {"use_node_local_storage": True},
            "steps_per_print": 10**9,
        }
        model.to(self.device)
        optimizer = torch.optim.AdamW(groups, lr=lr, fused=self.device.type == "cuda")
        scheduler = linear_schedule(optimizer, warmup_steps, total_steps)
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            dist_init_required=False,
        )
        self.autocast = torch.autocast(self.device.type, enabled=False)  # DeepSpeed casts itself

    @property
    def module(self) -> torch.nn.Module:
        """The trained module without its DDP/DeepSpeed wrapper (for eval and state dicts)."""
        return getattr(self.model, "module", self.model)

    @property
    def hf_model(self):
        """The HF model to export (recipes may train it inside `models.LogitsAt`)."""
        return getattr(self.module, "mlm", self.module)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train_step(self, micro_batches: Iterable[dict], loss_fn: Callable) -> dict:
        """One optimizer step over `grad_accum` micro-batches. `loss_fn(model, batch)` returns
        (loss, logs); the gradient is the mean over the whole global batch."""
        self.model.train()
        micro_batches = list(micro_batches)
        if len(micro_batches) != self.grad_accum:
            raise RuntimeError(f"expected {self.grad_accum} micro-batches, got {len(micro_batches)}")
        totals: dict[str, float] = {}
        for i, batch in enumerate(micro_batches):
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with self.autocast:
                loss, logs = loss_fn(self.model, batch)
            if self.cfg.engine == "deepspeed":
                self.model.backward(loss)  # DeepSpeed divides by grad_accum itself
                self.model.step()          # steps the optimizer only at the boundary
            else:
                # DDP all-reduces gradients only on the last micro-batch
                last = i == len(micro_batches) - 1
                with (contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()):
                    (loss / self.grad_accum).backward()
            for k, v in {"loss": loss, **logs}.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) / self.grad_accum
        if self.cfg.engine != "deepspeed":
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return _mean_over_workers(totals, self.device)

    # --- checkpoints: every rank calls these ---------------------------------------------
    def save(self, ckpt_dir: str | Path, state: dict, tokenizer=None) -> None:
        """Write a checkpoint: `model/` is an HF directory (safetensors) that `from_pretrained`
        loads, written by rank 0 (ZeRO <= 2 keeps full parameters on every rank); DeepSpeed
        ranks each add their optimizer shard under `deepspeed/`, DDP adds `optimizer.pt`."""
        import ray.train

        ckpt_dir = Path(ckpt_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        rank = ray.train.get_context().get_world_rank()
        if self.cfg.engine == "deepspeed":
            self.model.save_checkpoint(str(ckpt_dir / "deepspeed"), tag="state", exclude_frozen_parameters=True)
        if rank == 0:
            self.hf_model.save_pretrained(ckpt_dir / "model", safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(ckpt_dir / "model")
            if self.cfg.engine != "deepspeed":
                torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                           ckpt_dir / "optimizer.pt")
            (ckpt_dir / "trainer_state.json").write_text(json.dumps(state, indent=1))

    def load(self, ckpt_dir: str | Path) -> dict:
        ckpt_dir = Path(ckpt_dir)
        if self.cfg.engine == "deepspeed":
            self.model.load_checkpoint(str(ckpt_dir / "deepspeed"), tag="state")
        else:
            from safetensors.torch import load_file

            weights = load_file(ckpt_dir / "model" / "model.safetensors", device=str(self.device))
            self.hf_model.load_state_dict(weights, strict=False)  # tied weights are stored once
            opt = torch.load(ckpt_dir / "optimizer.pt", map_location=self.device, weights_only=False)
            self.optimizer.load_state_dict(opt["optimizer"])
            self.scheduler.load_state_dict(opt["scheduler"])
        return json.loads((ckpt_dir / "trainer_state.json").read_text())


class Progress:
    """Rank 0's progress bar, rendered by the driver (`ray.experimental.tqdm_ray`) so a run
    started with `ray job submit` shows one live bar instead of a log line per update."""

    def __init__(self, desc: str, total: int, initial: int = 0):
        import ray.train
        from ray.experimental.tqdm_ray import tqdm

        self.desc = desc
        self.bar = tqdm(desc=desc, total=total) if ray.train.get_context().get_world_rank() == 0 else None
        if self.bar is not None and initial:
            self.bar.update(initial)

    def update(self, **postfix) -> None:
        if self.bar is None:
            return
        if postfix:
            self.bar.set_description(" ".join([self.desc, *(f"{k}={v}" for k, v in postfix.items())]))
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _mean_over_workers(logs: dict[str, float], device: torch.device) -> dict[str, float]:
    """Logged losses are means over the global batch, not one worker's share."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return logs
    values = torch.tensor(list(logs.values()), dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(logs, (values / dist.get_world_size()).tolist()))


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


def launch(loop: Callable[[dict], None], loop_config: dict, cfg: EngineConfig, *, storage: str, name: str,
           datasets: dict | None = None, keep_checkpoints: int = 2):
    """Run `loop` on `cfg.num_workers` Ray Train workers; returns the `ray.train.Result`.
    `storage` is a local dir or `s3://` URI (RunConfig storage); the run lives in storage/name."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rayapp import storage as st

    if not ray.is_initialized():
        ray.init()  # the embedded default: a local cluster on this machine
    resources = ray.cluster_resources()
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else resources.get("GPU", 0) >= cfg.num_workers
    reserved = 0 if use_gpu else cfg.num_workers * cfg.cpus_per_worker
    if datasets and resources.get("CPU", 0) - reserved < 1:
        # Ray Data's read tasks need a CPU too: without one the workers wait for data forever
        raise ConfigError(
            f"{cfg.num_workers} workers x {cfg.cpus_per_worker} CPUs take all {resources.get('CPU', 0):g} CPUs of "
            "the cluster, leaving none for Ray Data to stream the training data; lower "
            "engine.cpus_per_worker (e.g. 0.5) or engine.num_workers, or add nodes")
    fs, path = st.filesystem(storage)
    if not st.is_remote(storage):  # workers run in other directories: absolute paths only
        path = str(Path(path).resolve())
        Path(path).mkdir(parents=True, exist_ok=True)
        fs = None
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=use_gpu,
            resources_per_worker=None if use_gpu else {"CPU": cfg.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=name, storage_path=path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
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
    from rayapp import storage as st

    if checkpoint is None:
        return None
    path = checkpoint.path
    if st.is_remote(storage_uri) and "://" not in path:
        path = storage_uri.split("://", 1)[0] + "://" + path
    return st.join(path, *parts)
