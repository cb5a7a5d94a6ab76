"""Recipe: SMASH distillation (SMASH §3.2, §4.4) on Ray Train.

The student (any HF masked LM) learns the teacher's distribution at the `<mask>` of the
intermediate task's prompt. The seven settings of SMASH §4.4 are presets of `objective`
(and of the teacher/data you point them at):

| setting | objective    | teacher | data                         | loss                         |
|---------|--------------|---------|------------------------------|------------------------------|
| (1)/(2) | `ce`         | large / base | teacher cache or examples | eq. 1 soft CE                |
| (3)     | `ce+hidden`  | online  | examples                     | eq. 1 + 0.01 eq. 2           |
| (4)     | `ce+attn`    | online  | examples                     | eq. 1 + 0.01 eq. 3           |
| (5)     | `distilbert` | online  | examples' raw text           | 5 L_ce + 2 L_mlm + 1 L_cos   |
| (6)     | `rule`       | none    | pair examples (labels 0/1/2) | CE over No/Maybe/Yes         |
| (7)     | `hard-label` | none    | sentiment examples (5-class) | CE over terrible..great      |

`data` is a teacher cache (`rayapp teacher-cache`, read with `read_cache`) for `ce` with
`teacher_mode=cache`, else intermediate examples (parquet with text_a[, text_b], label). It
streams from Ray Data into each worker with `get_dataset_shard`; the batch size is global
(default 128, lr 1e-4, linear schedule, as SMASH App. A.1). Checkpoints go to the run's
storage (local or `s3://`) every `checkpoint_every` steps; DeepSpeed ranks each save their
shard. After a worker failure Ray Train restarts the group (`engine.max_failures`) and the
loop resumes from `ray.train.get_checkpoint()`, skipping the batches it already trained
on. The final student is exported as an HF directory (`<run>/student`) that
`rayapp finetune model=<dir>` or `init=<dir>` loads with `from_pretrained`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from rayapp import storage
from rayapp.config import to_dict
from rayapp.train.engine import Engine, EngineConfig, Progress, checkpoint_uri, launch, report, restore, split_batch
from rayapp.errors import ConfigError
from rayapp.losses import attention_mse, distilbert_loss, hidden_mse, soft_ce, soft_ce_topk, verbalizer_ce
from rayapp.tasks.prompts import pad_ids

Objective = Literal["ce", "ce+hidden", "ce+attn", "distilbert", "rule", "hard-label"]

# SMASH §4.4 settings as config presets (the teacher model is the user's choice: (1) large, (2)-(5) base)
SETTINGS: dict[int, dict] = {
    1: {"objective": "ce"}, 2: {"objective": "ce"},
    3: {"objective": "ce+hidden", "teacher_mode": "online", "aux_weight": 0.01},
    4: {"objective": "ce+attn", "teacher_mode": "online", "aux_weight": 0.01},
    5: {"objective": "distilbert", "teacher_mode": "online", "lr": 1e-5},
    6: {"objective": "rule", "task": "smash-pairs", "lr": 1e-5},
    7: {"objective": "hard-label", "task": "smash-sentiment", "lr": 1e-5},
}
NEEDS_TEACHER = {"ce", "ce+hidden", "ce+attn", "distilbert"}


@dataclass
class DistillConfig:
    student: str = "distilroberta-base"
    teacher: str | None = "roberta-large"
    data: str = ""                      # teacher cache (teacher_mode=cache) or intermediate examples URI
    setting: int | None = None          # SMASH §4.4 preset (1)-(7); explicit keys still win
    objective: Objective = "ce"
    teacher_mode: Literal["cache", "online"] = "cache"
    task: str = "smash-pairs"           # prompt of the intermediate task (smash-pairs / smash-sentiment)
    max_length: int | None = None       # default: 128 for pairs, 64 for sentiment (SMASH App. A.1)
    aux_weight: float = 0.01            # weight of eq. 2 / eq. 3 next to eq. 1
    temperature: float = 1.0
    renormalize_topk: bool = True       # renormalise the cached top-k probabilities to sum 1
    mlm_probability: float = 0.15       # (distilbert) tokens masked in raw text
    batch_size: int = 128               # global
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.0
    max_steps: int = 200_000
    checkpoint_every: int = 1000
    log_every: int = 50
    seed: int = 0
    output_dir: str = "runs"
    name: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if self.setting is not None:
            if self.setting not in SETTINGS:
                raise ConfigError(f"setting must be one of {sorted(SETTINGS)} (SMASH §4.4), got {self.setting}")
            defaults = DistillConfig.__dataclass_fields__
            for key, value in SETTINGS[self.setting].items():
                if getattr(self, key) == defaults[key].default:  # a preset never overrides an explicit key
                    setattr(self, key, value)
        if not self.data:
            raise ConfigError("data is required: a teacher cache (rayapp teacher-cache) or intermediate examples URI")
        if self.objective in NEEDS_TEACHER and not self.teacher:
            raise ConfigError(f"objective={self.objective} needs a teacher model (teacher=...)")
        if self.objective != "ce" and self.teacher_mode == "cache" and self.objective in NEEDS_TEACHER:
            raise ConfigError(f"objective={self.objective} needs the teacher's hidden states/logits over all "
                              "tokens, which the top-k cache does not hold: set teacher_mode=online")
        for key in ("max_steps", "checkpoint_every", "batch_size", "log_every"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)}")


def uses_cache(cfg: DistillConfig) -> bool:
    return cfg.objective == "ce" and cfg.teacher_mode == "cache"


# --- batches ----------------------------------------------------------------------------

def cache_batch(rows: dict, pad_id: int) -> dict:
    """Teacher-cache rows -> tensors: the student reuses the teacher's tokenisation."""
    ids, mask = pad_ids(rows["input_ids"], pad_id)
    return {"input_ids": ids, "attention_mask": mask,
            "mask_pos": torch.as_tensor(np.asarray(rows["mask_pos"], dtype=np.int64)),
            "topk_values": torch.as_tensor(np.stack(rows["topk_values"]).astype(np.float32)),
            "topk_indices": torch.as_tensor(np.stack(rows["topk_indices"]).astype(np.int64)),
            "lse": torch.as_tensor(np.asarray(rows["lse"], dtype=np.float32))}


def prompt_batch(rows: dict, encoder) -> dict:
    texts_b = list(rows["text_b"]) if encoder.task.num_inputs == 2 else None
    batch = encoder.encode_batch(list(rows["text_a"]), texts_b)
    if "label" in rows:
        batch["labels"] = torch.as_tensor(np.asarray(rows["label"], dtype=np.int64))
    return batch


def mlm_batch(rows: dict, tokenizer, max_length: int, probability: float, generator: torch.Generator) -> dict:
    """Raw text with BERT-style masking (80% mask, 10% random, 10% kept) for setting (5)."""
    texts = [a if b is None else f"{a} {b}" for a, b in zip(rows["text_a"], rows.get("text_b", [None] * len(rows["text_a"])))]
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt",
                    return_special_tokens_mask=True)
    ids, special = enc["input_ids"], enc.pop("special_tokens_mask").bool() | (enc["attention_mask"] == 0)
    chosen = (torch.rand(ids.shape, generator=generator) < probability) & ~special
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, generator=generator)
    ids = torch.where(chosen & (roll < 0.8), torch.full_like(ids, tokenizer.mask_token_id), ids)
    random_ids = torch.randint(len(tokenizer), ids.shape, generator=generator)
    ids = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, ids)
    return {"input_ids": ids, "attention_mask": enc["attention_mask"], "mlm_labels": labels}


def make_loss_fn(cfg: DistillConfig, teacher, label_word_ids):
    """`loss_fn(student, batch)` of the configured objective. `student` and `teacher` are
    `models.LogitsAt` (engine-wrapped for the student): logits come at the mask only, or at
    the masked tokens for the DistilBERT objective."""

    def at(model, batch, positions, **kw):
        return model(batch["input_ids"], batch["attention_mask"], positions=positions, **kw)

    def loss_fn(model, batch):
        obj = cfg.objective
        if obj == "distilbert":
            masked = batch["mlm_labels"] != -100
            kw = {"output_hidden_states": True}
            s, s_out = at(model, batch, masked, **kw)
            with torch.no_grad():
                t, t_out = at(teacher, batch, masked, **kw)
            return distilbert_loss(s, t, batch["mlm_labels"][masked], s_out.hidden_states[-1],
                                   t_out.hidden_states[-1], batch["attention_mask"], temperature=2.0)
        kw = {"output_hidden_states": obj == "ce+hidden", "output_attentions": obj == "ce+attn"}
        s, s_out = at(model, batch, batch["mask_pos"], **kw)
        if "topk_values" in batch:  # the teacher's top-k cache
            return soft_ce_topk(s, batch["topk_values"], batch["topk_indices"], batch["lse"],
                                renormalize=cfg.renormalize_topk), {}
        if obj in ("rule", "hard-label"):
            return verbalizer_ce(s, label_word_ids, batch["labels"]), {}
        with torch.no_grad():
            t, t_out = at(teacher, batch, batch["mask_pos"], **kw)
        ce = soft_ce(s, torch.softmax(t.float() / cfg.temperature, -1), temperature=cfg.temperature)
        if obj == "ce":
            return ce, {}
        if obj == "ce+hidden":
            aux = hidden_mse(s_out.hidden_states, t_out.hidden_states, batch["attention_mask"])
        else:
            aux = attention_mse(s_out.attentions, t_out.attentions, batch["attention_mask"])
        return ce + cfg.aux_weight * aux, {"ce": ce.detach(), "aux": aux.detach()}

    return loss_fn


# --- the per-worker loop ----------------------------------------------------------------

def train_loop(loop_cfg: dict) -> None:
    import ray.train

    from rayapp.modeling.models import LogitsAt, load_mlm, load_tokenizer, local_model_dir
    from rayapp.tasks.prompts import PromptEncoder

    cfg: DistillConfig = loop_cfg["cfg"]
    task, max_length = loop_cfg["task"], loop_cfg["max_length"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    attn = {"attn_implementation": "eager"} if cfg.objective == "ce+attn" else {}  # sdpa returns no attentions

    student_dir = local_model_dir(loop_cfg["student"])
    tokenizer = load_tokenizer(student_dir)
    student = LogitsAt(load_mlm(student_dir, **attn))
    teacher = None
    if cfg.objective in NEEDS_TEACHER and not uses_cache(cfg):
        teacher = LogitsAt(load_mlm(local_model_dir(loop_cfg["teacher"]), **attn))
        teacher.to(ray.train.torch.get_device()).eval().requires_grad_(False)
    encoder = PromptEncoder(tokenizer, task, max_length) if cfg.objective != "distilbert" else None
    micro, accum = split_batch(cfg.batch_size, world, cfg.engine.max_device_batch)
    engine = Engine(student, cfg.engine, lr=cfg.lr, weight_decay=cfg.weight_decay,
                    warmup_steps=int(cfg.warmup_ratio * cfg.max_steps), total_steps=cfg.max_steps,
                    micro_batch=micro, grad_accum=accum)
    loss_fn = make_loss_fn(cfg, teacher, encoder.label_word_ids if encoder else None)
    state = restore(engine) or {"step": 0, "loss_curve": [], "throughput": [], "restarts": []}
    if state["step"]:
        state["restarts"].append(state["step"])  # resumed here after a failure
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)

    def to_batch(rows: dict) -> dict:
        if uses_cache(cfg):
            return cache_batch(rows, tokenizer.pad_token_id)
        if encoder is None:
            return mlm_batch(rows, tokenizer, max_length, cfg.mlm_probability, generator)
        return prompt_batch(rows, encoder)

    def micro_batches():
        """Endless stream of this worker's micro-batches; epochs re-read the shard."""
        shard = ray.train.get_dataset_shard("train")
        while True:
            empty = True
            for rows in shard.iter_batches(batch_size=micro, batch_format="numpy", drop_last=True):
                empty = False
                yield to_batch(rows)
            if empty:
                raise ConfigError(f"data {cfg.data} gives no full batch of {micro} per worker; "
                                  "lower batch_size or build more examples")

    stream = micro_batches()
    for _ in range(state["step"] * accum):  # skip what the checkpointed steps consumed
        next(stream)
    bar = Progress(f"distill {cfg.objective}", cfg.max_steps, state["step"])
    window: list[float] = []
    tokens, started = 0, time.perf_counter()
    for step in range(state["step"] + 1, cfg.max_steps + 1):
        batches = [next(stream) for _ in range(accum)]
        logs = engine.train_step(batches, loss_fn)
        tokens += sum(int(b["attention_mask"].sum()) for b in batches) * world  # ranks see equal shares
        window.append(logs["loss"])
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            # throughput includes data loading: it is what a user's run gets
            state["throughput"].append([step, tokens / (time.perf_counter() - started)])
            state["loss_curve"].append([step, float(np.mean(window))])
            window, tokens, started = [], 0, time.perf_counter()
        bar.update(loss=f"{state['loss_curve'][-1][1]:.4f}" if state["loss_curve"] else "-")
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            state["step"] = step
            report({"step": step, "loss": state["loss_curve"][-1][1] if state["loss_curve"] else None,
                    "loss_curve": state["loss_curve"], "throughput": state["throughput"],
                    "restarts": state["restarts"]},
                   engine, dict(state), tokenizer)
    bar.close()


def run(cfg: DistillConfig) -> dict:
    """Distil on Ray Train; returns the record also appended to `<output_dir>/results.jsonl`."""
    import ray

    from rayapp.modeling.models import portable_model
    from rayapp.data.teacher_cache import cache_meta, read_cache
    from rayapp.tasks.registry import INTERMEDIATE_TASKS, MAX_LENGTH

    if cfg.task not in INTERMEDIATE_TASKS:
        raise ConfigError(f"task={cfg.task!r} is not an intermediate task; choose one of {sorted(INTERMEDIATE_TASKS)}")
    split_batch(cfg.batch_size, cfg.engine.num_workers, cfg.engine.max_device_batch)
    if not ray.is_initialized():
        ray.init()
    if uses_cache(cfg):
        meta = cache_meta(cfg.data)
        task_name = meta["plan"]["task"]
        _check_vocab(cfg.student, meta)
        dataset = read_cache(cfg.data)
    else:
        task_name = cfg.task
        fs, path = storage.filesystem(cfg.data)
        dataset = ray.data.read_parquet(path, filesystem=fs, file_extensions=["parquet"])
    task = INTERMEDIATE_TASKS[task_name]
    name = cfg.name or f"distill-{cfg.objective}-{time.strftime('%Y%m%d-%H%M%S')}"
    loop_cfg = {"cfg": cfg, "task": task, "max_length": cfg.max_length or MAX_LENGTH[task_name],
                "student": portable_model(cfg.student),
                "teacher": portable_model(cfg.teacher) if cfg.objective in NEEDS_TEACHER else None}
    t0 = time.time()
    result = launch(train_loop, loop_cfg, cfg.engine, storage=cfg.output_dir, name=name,
                    datasets={"train": dataset})
    student_uri = storage.join(cfg.output_dir, name, "student")
    storage.copy_dir(checkpoint_uri(cfg.output_dir, result.checkpoint, "model"), student_uri)
    curve = result.metrics["loss_curve"]
    record = {"recipe": "distill", "name": name, "setting": cfg.setting, "objective": cfg.objective,
              "config": to_dict(cfg), "steps": result.metrics["step"], "loss_curve": curve,
              "first_loss": curve[0][1], "last_loss": curve[-1][1], "restarts": result.metrics["restarts"],
              "throughput": result.metrics["throughput"],
              "model": student_uri, "checkpoint": checkpoint_uri(cfg.output_dir, result.checkpoint),
              "seconds": round(time.time() - t0, 1)}
    record["results"] = storage.join(cfg.output_dir, "results.jsonl")
    storage.append_jsonl(record["results"], record)
    return record


def _check_vocab(student: str, meta: dict) -> None:
    """Eq. 1 sums over one vocabulary: the student must share the teacher's tokenizer."""
    from rayapp.modeling.models import load_model_config, local_model_dir

    size = load_model_config(local_model_dir(student)).vocab_size
    if size != meta["vocab_size"]:
        raise ConfigError(f"student {student} has a vocabulary of {size} tokens but the teacher cache was "
                          f"built with {meta['vocab_size']}: soft CE over the vocabulary (SMASH eq. 1) needs the "
                          "same tokenizer (e.g. roberta-large -> distilroberta-base)")
