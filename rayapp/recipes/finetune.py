"""Recipe: few-shot fine-tuning on Ray Train (SMASH §4, LM-BFF protocol).

Methods (`method=`):
- `prompt`: prompt-based fine-tuning with the MLM head; the class score is the MLM logit of
  the class's label word at the mask; CE over classes, or for regression tasks (STS-B) the
  SMASH §3.1 KL objective between interpolated label-word probabilities and the gold score.
- `classifier`: standard fine-tuning with a fresh classification head (baseline); MSE for
  regression.
- `zero-shot`: no training; prompt-based evaluation of the model as it is.

Every `eval_every` steps the model is evaluated on the few-shot dev set; whenever dev
improves, a checkpoint (HF `model/` dir in safetensors + optimizer state) is reported to Ray
Train, so the run's storage keeps the best model and a restarted worker group resumes from
it. At the end the best weights are evaluated on test and one JSON record (config, split,
dev curve, best step, test metrics) is appended to `<output_dir>/results.jsonl`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from rayapp import storage
from rayapp.config import to_dict
from rayapp.train.engine import (Engine, EngineConfig, Progress, checkpoint_uri, global_batch_indices, launch, report, restore,
                           shard, split_batch)
from rayapp.errors import ConfigError
from rayapp.data.fewshot import Example, FewShotSplit, load_lmbff
from rayapp.losses import regression_kl
from rayapp.tasks.metrics import compute_metric
from rayapp.modeling.models import local_model_dir, portable_model
from rayapp.tasks.prompts import PromptEncoder, Task, class_logits, regression_prediction, regression_target
from rayapp.tasks.registry import get_task, load_tasks


@dataclass
class FinetuneConfig:
    task: str = "SST-2"
    model: str = "distilroberta-base"   # HF id or local dir of a masked LM
    init: str | None = None             # start from this checkpoint (rayapp run checkpoint or HF dir)
    method: Literal["prompt", "classifier", "zero-shot"] = "prompt"
    tasks_file: str | None = None       # YAML with extra (user-defined) tasks
    data_dir: str | None = None         # LM-BFF k-shot root (TASK/K-SEED/...); default: local assets
    k: int = 16
    seed: int = 13                      # few-shot split seed (13 21 42 87 100)
    max_length: int = 128
    batch_size: int = 2                 # global: examples per optimizer step over all workers
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    max_steps: int = 1000
    eval_every: int = 100
    eval_batch_size: int = 32
    train_seed: int = 42                # data order; independent of the number of workers
    output_dir: str = "runs"            # local dir or s3:// URI
    name: str | None = None             # run name; default <method>-<task>-<k>-<seed>-<time>
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        for key in ("k", "batch_size", "eval_every", "eval_batch_size", "max_length"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)}")
        if self.max_steps < 0:
            raise ConfigError(f"max_steps must be >= 0, got {self.max_steps}")

    def resolve_task(self) -> Task:
        if self.tasks_file:
            extra = load_tasks(self.tasks_file)
            if self.task in extra:
                return extra[self.task]
        return get_task(self.task)


def model_source(ref: str, is_init: bool) -> str:
    """Local directory (or hub id) of the weights to start from, on this worker's node. A
    rayapp checkpoint holds the HF model under `model/`; `s3://` ones are downloaded."""
    src = local_model_dir(ref)
    if storage.exists(storage.join(src, "model", "config.json")):
        return storage.join(src, "model")
    if is_init and not storage.exists(storage.join(src, "config.json")):
        raise ConfigError(f"init={ref!r} is neither an HF model directory nor a rayapp checkpoint (no config.json)")
    return src


# --- batches ----------------------------------------------------------------------------

def _labels(task: Task, examples: list[Example]) -> torch.Tensor:
    if task.is_regression:
        return torch.tensor([float(e.label) for e in examples])
    return torch.tensor([task.label_index(e.label) for e in examples])


def make_batch(examples: list[Example], task: Task, tokenizer, encoder: PromptEncoder | None,
               max_length: int) -> dict:
    texts_a = [e.text_a for e in examples]
    texts_b = [e.text_b for e in examples] if task.num_inputs == 2 else None
    if encoder is not None:
        batch = encoder.encode_batch(texts_a, texts_b)
    else:  # classifier: the tokenizer's own sentence-pair encoding
        batch = dict(tokenizer(texts_a, texts_b, truncation=True, max_length=max_length, padding=True,
                               return_tensors="pt"))
    batch["labels"] = _labels(task, examples)
    return batch


def _mask_logits(model, batch) -> torch.Tensor:
    """[B, V] logits at the mask; `model` is a `LogitsAt` (maybe DDP/DeepSpeed-wrapped)."""
    return model(batch["input_ids"], batch["attention_mask"], positions=batch["mask_pos"])[0]


def make_loss_fn(task: Task, encoder: PromptEncoder | None):
    def prompt_loss(model, batch):
        logits = class_logits(_mask_logits(model, batch), encoder.label_word_ids)
        if task.is_regression:
            return regression_kl(logits, regression_target(batch["labels"], task.bounds)), {}
        return torch.nn.functional.cross_entropy(logits, batch["labels"]), {}

    def classifier_loss(model, batch):
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "mask_pos")}
        logits = model(**inputs).logits
        if task.is_regression:
            return torch.nn.functional.mse_loss(logits.squeeze(-1), batch["labels"].float()), {}
        return torch.nn.functional.cross_entropy(logits, batch["labels"]), {}

    return prompt_loss if encoder is not None else classifier_loss


@torch.no_grad()
def predict(model, batch, task: Task, encoder: PromptEncoder | None) -> torch.Tensor:
    """Predicted class index, or score for regression tasks."""
    if encoder is not None:
        logits = class_logits(_mask_logits(model, batch), encoder.label_word_ids)
        if task.is_regression:
            return regression_prediction(logits.softmax(-1), task.bounds)
        return logits.argmax(-1)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "mask_pos")}
    logits = model(**inputs).logits
    return logits.squeeze(-1) if task.is_regression else logits.argmax(-1)


def evaluate(model, examples: list[Example], task: Task, tokenizer, encoder, cfg: FinetuneConfig, device) -> float:
    """Metric over `examples`; each worker predicts a strided share and the shares are
    gathered, so evaluation also scales with the number of workers."""
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = list(range(rank, len(examples), world))
    model.eval()
    preds, idx = [], []
    for i in range(0, len(mine), cfg.eval_batch_size):
        chunk = mine[i:i + cfg.eval_batch_size]
        batch = make_batch([examples[j] for j in chunk], task, tokenizer, encoder, cfg.max_length)
        batch = {k: v.to(device) for k, v in batch.items()}
        preds += predict(model, batch, task, encoder).float().cpu().tolist()
        idx += chunk
    gathered = [(idx, preds)]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, (idx, preds))
    order, values = zip(*sorted((i, p) for ids, ps in gathered for i, p in zip(ids, ps)))
    labels = _labels(task, [examples[i] for i in order]).tolist()
    return compute_metric(task.metric, list(values), labels)


def _snapshot(module: torch.nn.Module) -> dict:
    """A copy of the weights that later optimizer steps do not change."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --- the per-worker loop ----------------------------------------------------------------

def train_loop(loop_cfg: dict) -> None:
    import ray.train

    from rayapp.modeling.models import LogitsAt, load_classifier, load_mlm, load_tokenizer

    cfg: FinetuneConfig = loop_cfg["cfg"]
    split: FewShotSplit = loop_cfg["split"]
    task: Task = loop_cfg["task"]
    src = model_source(loop_cfg["model_ref"], cfg.init is not None)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train_seed)

    tokenizer = load_tokenizer(src)
    if cfg.method == "classifier":
        model, encoder = load_classifier(src, 1 if task.is_regression else len(task.labels)), None
    else:
        model, encoder = LogitsAt(load_mlm(src)), PromptEncoder(tokenizer, task, cfg.max_length)
    micro, accum = split_batch(cfg.batch_size, world, cfg.engine.max_device_batch)
    steps = cfg.max_steps if cfg.method != "zero-shot" else 0
    engine = Engine(model, cfg.engine, lr=cfg.lr, weight_decay=cfg.weight_decay,
                    warmup_steps=int(cfg.warmup_ratio * steps), total_steps=max(1, steps),
                    micro_batch=micro, grad_accum=accum)
    loss_fn = make_loss_fn(task, encoder)
    state = restore(engine) or {"step": 0, "best_step": 0, "best_dev": None, "dev_curve": [], "loss_curve": []}
    best_weights = _snapshot(engine.module) if state["best_dev"] is not None else None

    def eval_and_report(step: int, loss: float | None) -> None:
        nonlocal best_weights
        dev = evaluate(engine.model, split.dev, task, tokenizer, encoder, cfg, engine.device)
        state["dev_curve"].append([step, dev])
        improved = state["best_dev"] is None or dev > state["best_dev"]
        if improved:
            state.update(best_step=step, best_dev=dev)
            best_weights = _snapshot(engine.module)
        metrics = {"step": step, "dev": dev, "best_dev": state["best_dev"], "loss": loss}
        state["step"] = step
        # a checkpoint only when dev improved: storage keeps the best model, resume starts there
        report(metrics, engine if improved and steps > 0 else None, dict(state), tokenizer)

    if state["step"] == 0:
        eval_and_report(0, None)
    bar = Progress(f"{cfg.method} {task.name}", steps, state["step"])
    for step in range(state["step"] + 1, steps + 1):
        ids = shard(global_batch_indices(len(split.train), cfg.batch_size, step - 1, cfg.train_seed), rank, world)
        micro_batches = [make_batch([split.train[i] for i in ids[j:j + micro]], task, tokenizer, encoder,
                                    cfg.max_length) for j in range(0, len(ids), micro)]
        logs = engine.train_step(micro_batches, loss_fn)
        state["loss_curve"].append([step, logs["loss"]])
        bar.update(loss=f"{logs['loss']:.4f}")
        if step % cfg.eval_every == 0 or step == steps:
            eval_and_report(step, logs["loss"])
    bar.close()

    # the final checkpoint holds the best model; its metrics are the run's result
    engine.module.load_state_dict(best_weights or engine.module.state_dict())
    test = evaluate(engine.model, split.test, task, tokenizer, encoder, cfg, engine.device) if split.test else None
    final = {"final": True, "step": state["step"], "best_step": state["best_step"], "best_dev": state["best_dev"],
             "test": test, "dev_curve": state["dev_curve"], "loss_curve": state["loss_curve"]}
    report(final, engine, dict(state), tokenizer)


def run(cfg: FinetuneConfig, split: FewShotSplit | None = None) -> dict:
    """Fine-tune (or evaluate) one task/split on Ray Train; returns the results.jsonl record."""
    task = cfg.resolve_task()
    split_batch(cfg.batch_size, cfg.engine.num_workers, cfg.engine.max_device_batch)  # fail before launching
    split = split or load_lmbff(cfg.data_dir, task, k=cfg.k, seed=cfg.seed)
    name = cfg.name or f"{cfg.method}-{task.name}-{cfg.k}-{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.time()
    result = launch(train_loop, {"cfg": cfg, "task": task, "split": split,
                                        "model_ref": portable_model(cfg.init or cfg.model)}, cfg.engine,
                    storage=cfg.output_dir, name=name, keep_checkpoints=1)
    final = result.metrics
    record = {
        "recipe": "finetune", "name": name, "task": task.name, "method": cfg.method, "metric": task.metric,
        "k": cfg.k, "seed": cfg.seed, "split": split.source, "config": to_dict(cfg),
        "num_workers": cfg.engine.num_workers, "best_step": final["best_step"], "best_dev": final["best_dev"],
        "test": final["test"], "dev_curve": final["dev_curve"], "loss_curve": final["loss_curve"],
        "checkpoint": checkpoint_uri(cfg.output_dir, result.checkpoint, "model"),
        "seconds": round(time.time() - t0, 1),
    }
    record["results"] = storage.join(cfg.output_dir, "results.jsonl")
    storage.append_jsonl(record["results"], record)
    return record
