"""The training engine: model + optimizer + schedule on one worker (`train.worker`), DDP or
DeepSpeed behind one interface (`train_step`, `load_weights`, `save`, `load`).

DDP is the worker's `prepare` (`ray.train.torch.prepare_model` on Ray Train); DeepSpeed
runs ZeRO 0-2 with bf16/fp16. On CPU both use gloo and DeepSpeed runs with
`DS_ACCELERATOR=cpu`, so tests exercise the engine GPU clusters run.

Checkpoints may come from a bucket, so they are untrusted input: every `.pt` file (DDP's
`optimizer.pt`, DeepSpeed's shards) is read with `torch.load(weights_only=True)`, which
refuses pickled objects instead of running them.

Batch sizes are global: the config says how many examples one optimizer step sees, and
`split_batch` derives the per-worker micro-batch and gradient accumulation from the number
of workers, so a run's numbers do not depend on how many workers it had.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal

import torch

from rayapp.errors import ConfigError, DataError
from rayapp.modeling.models import load_soft_prompt, save_soft_prompt
from rayapp.train.worker import worker

SOFT_PROMPT_KEY = "<soft_prompt>"  # its entry in `export_state` (not an HF weight name)


@dataclass
class EngineConfig:
    engine: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: int = 2                 # DeepSpeed ZeRO stage 0, 1 or 2
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    num_workers: int = 1
    # None: GPUs for DeepSpeed, CPUs for DDP. Decided by the config, never by the GPUs that
    # happen to be up at submit time (an autoscaling cluster starts with none).
    use_gpu: bool | None = None
    cpus_per_worker: float = 1.0        # CPU workers; leave CPUs free for Ray Data when streaming
    max_device_batch: int = 0           # largest micro-batch on one device; 0 = no limit
    max_failures: int = 0               # worker/node failures to recover from (FailureConfig)
    grad_clip: float = 1.0
    export_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # dtype of exported HF weights
    # auto: one DDP worker runs in its Tune trial or one Ray task; train: always Ray Train
    launcher: Literal["auto", "train"] = "auto"

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
        if self.use_gpu is None:
            self.use_gpu = self.engine == "deepspeed"


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


def save_hf(model, out_dir: str | Path, dtype: str = "float32", tokenizer=None,
            state: dict[str, torch.Tensor] | None = None) -> None:
    """Save an HF model directory (safetensors) with weights in `dtype`: `state` (default the
    model's state dict; `Engine.export_state` gives DeepSpeed's fp32 master weights).

    Saved in bf16, transformers 5 loads a model as bf16 and the next fine-tuning's AdamW
    updates round away. The export is therefore cast (to fp32 by default) and `config.dtype`
    says so."""
    import copy

    target = getattr(torch, dtype)
    state = model.state_dict() if state is None else state
    state = {k: v.detach().to(target) if v.is_floating_point() else v for k, v in state.items()}
    model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    config = copy.deepcopy(model.config)  # save_pretrained wrote the module's dtype; the weights are `dtype`
    config.dtype = target
    config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def load_tensors(path: str | Path, map_location=None, allowed: Iterable[type] = ()):
    """`torch.load` of a checkpoint file that may come from anyone with write access to the
    bucket: tensors and plain containers only (and the `allowed` state classes), never code.
    A file holding anything else is refused, not unpickled."""
    import pickle

    with torch.serialization.safe_globals(list(allowed)):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            reason = str(e).split("WeightsUnpickler error: ", 1)[-1].split(". ", 1)[0]
            raise DataError(f"checkpoint file {path} holds pickled objects rayapp does not write ({reason}); "
                            "refusing to load it: resume only from checkpoints rayapp wrote") from None


def _deepspeed_state_classes() -> list:
    """The classes DeepSpeed pickles into its ZeRO optimizer shards (plain state holders)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _fp32_masters(optimizer, params: list[torch.nn.Parameter]) -> dict[int, torch.Tensor]:
    """id(param) -> the whole fp32 master weight a DeepSpeed bf16/fp16 optimizer keeps for it.
    ZeRO 1-2 partition the masters over the ranks: gathering one is an all-reduce, so every
    rank calls this for the same `params` in the same order."""
    from deepspeed.utils import safe_get_full_fp32_param

    if hasattr(optimizer, "fp32_groups"):  # ZeRO 0 (FP16_UnfusedOptimizer): whole copies on every rank
        return {id(lp): hp for lps, hps in zip(optimizer.fp16_groups, optimizer.fp32_groups)
                for lp, hp in zip(lps, hps)}
    masters = {id(p): safe_get_full_fp32_param(p) for p in params}
    return {k: v for k, v in masters.items() if v is not None}  # frozen parameters have none


def load_hf_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load an HF state dict strictly. Safetensors stores tied weights once, so the only keys
    allowed to be missing are parameters tied to one that was loaded (the MLM decoder)."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in weights if k in params}
    untied = [k for k in missing if k not in params or id(params[k]) not in loaded]
    if untied or unexpected:
        raise ConfigError(f"checkpoint does not match the model: missing {untied[:5]}, unexpected {unexpected[:5]}; "
                          "resume with the same model and recipe that wrote it")


class Engine:
    """Model + optimizer + schedule on one worker, DDP or DeepSpeed behind one interface."""

    def __init__(self, model: torch.nn.Module, cfg: EngineConfig, *, lr: float, weight_decay: float,
                 warmup_steps: int, total_steps: int, micro_batch: int, grad_accum: int):
        from transformers import get_linear_schedule_with_warmup

        self.cfg = cfg
        self.grad_accum = grad_accum
        self.device = worker().device
        decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
        # no empty group: DeepSpeed drops it, and the scheduler then has one group too many
        groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
                  if g["params"]]
        if cfg.engine == "deepspeed" and self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed picks an accelerator
        model.to(self.device)
        optimizer = torch.optim.AdamW(groups, lr=lr, fused=self.device.type == "cuda")
        # linear warmup then linear decay to 0, the schedule SMASH and LM-BFF use
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
        # DeepSpeed bf16/fp16 casts the whole module and keeps fp32 masters of the trained
        # parameters only: frozen ones (prompt tuning's model) are exported from this copy
        self._frozen_fp32 = {id(p): p.detach().float().clone() for p in model.parameters()
                             if not p.requires_grad and cfg.engine == "deepspeed" and cfg.precision != "fp32"}
        if cfg.engine == "deepspeed":
            import deepspeed
            import torch.distributed as dist

            world = dist.get_world_size() if dist.is_initialized() else 1
            ds_config = {
                "train_micro_batch_size_per_gpu": micro_batch,
                "gradient_accumulation_steps": grad_accum,
                "train_batch_size": micro_batch * grad_accum * world,
                "gradient_clipping": cfg.grad_clip,
                "zero_optimization": {"stage": cfg.zero_stage},
                "bf16": {"enabled": cfg.precision == "bf16"},
                "fp16": {"enabled": cfg.precision == "fp16"},
                # every rank writes its shard to its own local dir; Ray merges them in storage
                "checkpoint": {"use_node_local_storage": True},
                "steps_per_print": 10**9,
            }
            self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
                dist_init_required=False)
            # DeepSpeed's own loader unpickles anything (weights_only=False)
            self.model.checkpoint_engine.load = functools.partial(load_tensors, allowed=_deepspeed_state_classes())
            self.autocast = contextlib.nullcontext()  # DeepSpeed casts itself
        else:
            self.model = worker().prepare(model)
            self.optimizer, self.scheduler = optimizer, scheduler
            self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    @property
    def module(self) -> torch.nn.Module:
        """The trained module without its DDP/DeepSpeed wrapper (for eval and state dicts)."""
        return getattr(self.model, "module", self.model)

    @property
    def hf_model(self):
        """The HF model to export (recipes may train it inside `models.LogitsAt`)."""
        return getattr(self.module, "mlm", self.module)

    def train_step(self, micro_batches: Iterable[dict], loss_fn: Callable) -> dict:
        """One optimizer step over `grad_accum` micro-batches. `loss_fn(model, batch)` returns
        (loss, parts); the gradient is the mean over the whole global batch."""
        self.model.train()
        micro_batches = list(micro_batches)
        if len(micro_batches) != self.grad_accum:
            raise RuntimeError(f"expected {self.grad_accum} micro-batches, got {len(micro_batches)}")
        totals: dict[str, float] = {}
        for i, batch in enumerate(micro_batches):
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with self.autocast:
                loss, parts = loss_fn(self.model, batch)
            if self.cfg.engine == "deepspeed":
                self.model.backward(loss)  # DeepSpeed divides by grad_accum itself
                self.model.step()          # steps the optimizer only at the boundary
            else:
                # DDP all-reduces gradients only on the last micro-batch
                last = i == len(micro_batches) - 1
                with (contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()):
                    (loss / self.grad_accum).backward()
            for k, v in {"loss": loss, **parts}.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) / self.grad_accum
        if self.cfg.engine != "deepspeed":
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return _mean_over_workers(totals, self.device)

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Put `state` (a state dict of `module`) into the trained model, including
        DeepSpeed's fp32 master copy, so a later checkpoint's optimizer shard and `model/`
        agree."""
        self.module.load_state_dict(state)
        restore_master = getattr(self.optimizer, "_restore_from_bit16_weights", None)
        if self.cfg.engine == "deepspeed" and restore_master is not None:
            restore_master()

    def export_state(self) -> dict[str, torch.Tensor]:
        """The HF model's weights as `save` exports them; every rank calls it (a collective).

        A DeepSpeed bf16/fp16 module holds its weights rounded to 16 bits (bf16: up to 0.4%
        off the fp32 master weights the optimizer updates), so its export is the master copy
        gathered from the ZeRO shards; frozen parameters come from their fp32 copy, buffers from
        the module. A soft prompt (prompt tuning) is the entry `SOFT_PROMPT_KEY`."""
        state = self.hf_model.state_dict()
        params = dict(self.hf_model.named_parameters(remove_duplicate=False))  # tied weights: both names
        if self.soft_prompt is not None:  # saved beside the HF weights (`save`)
            state[SOFT_PROMPT_KEY], params[SOFT_PROMPT_KEY] = self.soft_prompt.detach(), self.soft_prompt
        if self.cfg.engine != "deepspeed" or self.cfg.precision == "fp32":
            return state
        masters = {**self._frozen_fp32, **_fp32_masters(self.optimizer, list(params.values()))}
        return {k: masters.get(id(params[k]), v) if k in params else v for k, v in state.items()}

    @property
    def soft_prompt(self) -> torch.nn.Parameter | None:
        """The trained soft prompt of a prompt-tuned model (`models.LogitsAt`), else None."""
        return getattr(self.module, "soft_prompt", None)

    # --- checkpoints: every rank calls these ---------------------------------------------
    def save(self, ckpt_dir: str | Path, state: dict, tokenizer=None, weights: bool = True) -> None:
        """Write a checkpoint: `model/` is an HF directory (safetensors, `export_dtype`, the
        weights of `export_state`) that `from_pretrained` loads, written by rank 0; DeepSpeed
        ranks each add their optimizer shard under `deepspeed/`, DDP adds `optimizer.pt`.
        `weights=False`: the trainer state only (a run that trained nothing)."""
        ckpt_dir = Path(ckpt_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if weights and self.cfg.engine == "deepspeed":
            self.model.save_checkpoint(str(ckpt_dir / "deepspeed"), tag="state", exclude_frozen_parameters=True)
        exported = self.export_state() if weights else None
        if worker().rank == 0:
            if weights:
                self._write_model(ckpt_dir / "model", exported, tokenizer)
                if self.cfg.engine != "deepspeed":
                    torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                               ckpt_dir / "optimizer.pt")
            (ckpt_dir / "trainer_state.json").write_text(json.dumps(state, indent=1))

    def save_model(self, out_dir: str | Path, tokenizer=None) -> bool:
        """Write the model alone (`model/` of `save`) to `out_dir`; every rank calls it (the
        export is a collective), rank 0 writes and gets True."""
        exported = self.export_state()
        if worker().rank != 0:
            return False
        self._write_model(Path(out_dir), exported, tokenizer)
        return True

    def _write_model(self, out_dir: Path, exported: dict, tokenizer) -> None:
        soft_prompt = exported.pop(SOFT_PROMPT_KEY, None)
        save_hf(self.hf_model, out_dir, self.cfg.export_dtype, tokenizer, exported)
        if soft_prompt is not None:
            save_soft_prompt(soft_prompt, out_dir, self.cfg.export_dtype)

    def load(self, ckpt_dir: str | Path) -> dict:
        """Restore a checkpoint of `save` and return its trainer state."""
        ckpt_dir = Path(ckpt_dir)
        state = json.loads((ckpt_dir / "trainer_state.json").read_text())
        if not (ckpt_dir / "model").exists():  # a trainer state only: the weights stay as given
            return state
        if self.cfg.engine == "deepspeed":
            self.model.load_checkpoint(str(ckpt_dir / "deepspeed"), tag="state")
        else:
            from safetensors.torch import load_file

            weights = load_file(ckpt_dir / "model" / "model.safetensors", device=str(self.device))
            params = dict(self.hf_model.named_parameters())
            load_hf_weights(self.hf_model, {k: v.to(params[k].dtype) if k in params else v for k, v in weights.items()})
            if self.soft_prompt is not None:
                with torch.no_grad():
                    self.soft_prompt.copy_(load_soft_prompt(str(ckpt_dir / "model")))
            opt = load_tensors(ckpt_dir / "optimizer.pt", map_location=self.device)
            self.optimizer.load_state_dict(opt["optimizer"])
            self.scheduler.load_state_dict(opt["scheduler"])
        return state


def _mean_over_workers(logs: dict[str, float], device: torch.device) -> dict[str, float]:
    """Logged losses are means over the global batch, not one worker's share."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return logs
    values = torch.tensor(list(logs.values()), dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(logs, (values / dist.get_world_size()).tolist()))
