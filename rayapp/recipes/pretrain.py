"""Recipe: further masked-LM pre-training, and a student cut from a teacher's layers.

ASSETS.md has no pretrained MLM with its head, so rayapp makes its real teacher/student
pair itself: the MiniLM-L6 encoder (real weights, fresh MLM head) is further pre-trained
with the MLM objective on Wikipedia text (the intermediate examples' sentences), and the
student is initialised from every other teacher layer, as DistilBERT/DistilRoBERTa were.
Both are ordinary Ray Train runs on the shared engine; the report includes the
masked-token accuracy on held-out text.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field

import torch

from rayapp import storage
from rayapp.config import to_dict
from rayapp.recipes.distill import mlm_batch
from rayapp.train.engine import Engine, EngineConfig, Progress, checkpoint_uri, launch, report, restore, split_batch
from rayapp.errors import ConfigError


@dataclass
class PretrainConfig:
    model: str = "distilroberta-base"
    data: str = ""                  # parquet with text_a[, text_b] (e.g. `rayapp intermediate pairs` output)
    max_length: int = 128
    mlm_probability: float = 0.15
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_steps: int = 1000
    checkpoint_every: int = 500
    eval_examples: int = 256        # held out from `data` for masked-token accuracy
    seed: int = 0
    output_dir: str = "runs"
    name: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if not self.data:
            raise ConfigError("data is required: parquet files with a text_a column (e.g. built by "
                              "`rayapp intermediate pairs`)")


def mlm_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """Cross-entropy on the masked tokens; `model` is a `LogitsAt`, so the vocabulary
    projection runs on those ~15% of positions only."""
    masked = batch["mlm_labels"] != -100
    logits, _ = model(batch["input_ids"], batch["attention_mask"], positions=masked)
    return torch.nn.functional.cross_entropy(logits.float(), batch["mlm_labels"][masked]), {}


@torch.no_grad()
def masked_accuracy(model, batches: list[dict], device) -> float:
    """Share of masked positions whose original token is the model's top prediction."""
    model.eval()
    hit = total = 0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        masked = b["mlm_labels"] != -100
        logits, _ = model(b["input_ids"], b["attention_mask"], positions=masked)
        hit += int((logits.argmax(-1) == b["mlm_labels"][masked]).sum())
        total += int(masked.sum())
    return hit / max(1, total)


def train_loop(loop_cfg: dict) -> None:
    import ray.train

    from rayapp.modeling.models import LogitsAt, load_mlm, load_tokenizer, local_model_dir

    cfg: PretrainConfig = loop_cfg["cfg"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    model_dir = local_model_dir(loop_cfg["model"])
    tokenizer = load_tokenizer(model_dir)
    micro, accum = split_batch(cfg.batch_size, world, cfg.engine.max_device_batch)
    engine = Engine(LogitsAt(load_mlm(model_dir)), cfg.engine, lr=cfg.lr, weight_decay=cfg.weight_decay,
                    warmup_steps=int(cfg.warmup_ratio * cfg.max_steps), total_steps=cfg.max_steps,
                    micro_batch=micro, grad_accum=accum)
    gen = torch.Generator().manual_seed(cfg.seed)  # fixed masking of the held-out text
    held_out = loop_cfg["held_out"]
    eval_batches = [mlm_batch({k: v[i:i + 32] for k, v in held_out.items()}, tokenizer, cfg.max_length,
                              cfg.mlm_probability, gen) for i in range(0, len(held_out["text_a"]), 32)]
    state = restore(engine) or {"step": 0, "loss_curve": [], "accuracy": [[0, None]]}
    if state["step"] == 0:
        state["accuracy"] = [[0, masked_accuracy(engine.module, eval_batches, engine.device)]]
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank + state["step"])

    def stream():
        shard = ray.train.get_dataset_shard("train")
        while True:
            for rows in shard.iter_batches(batch_size=micro, batch_format="numpy", drop_last=True):
                yield mlm_batch(rows, tokenizer, cfg.max_length, cfg.mlm_probability, gen)

    batches = stream()
    bar = Progress("mlm pretrain", cfg.max_steps, state["step"])
    for step in range(state["step"] + 1, cfg.max_steps + 1):
        logs = engine.train_step([next(batches) for _ in range(accum)], mlm_loss)
        state["loss_curve"].append([step, logs["loss"]])
        bar.update(loss=f"{logs['loss']:.3f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            state["step"] = step
            state["accuracy"].append([step, masked_accuracy(engine.module, eval_batches, engine.device)])
            report({"step": step, "accuracy": state["accuracy"], "loss_curve": state["loss_curve"][-50:]},
                   engine, dict(state), tokenizer)
    bar.close()


def _held_out(text: str) -> bool:
    return zlib.crc32(text.encode()) % 50 == 0


def run(cfg: PretrainConfig) -> dict:
    import ray

    from rayapp.modeling.models import portable_model

    split_batch(cfg.batch_size, cfg.engine.num_workers, cfg.engine.max_device_batch)
    if not ray.is_initialized():
        ray.init()
    fs, path = storage.filesystem(cfg.data)
    data = ray.data.read_parquet(path, filesystem=fs, file_extensions=["parquet"], columns=["text_a", "text_b"])
    # a stable 2% of the rows (by a hash of the text) is held out for masked-token accuracy
    held = data.filter(lambda r: _held_out(r["text_a"])).limit(cfg.eval_examples).to_pandas()
    held_out = {"text_a": held["text_a"].tolist(), "text_b": held["text_b"].tolist()}
    train = data.filter(lambda r: not _held_out(r["text_a"]))
    name = cfg.name or f"pretrain-{time.strftime('%Y%m%d-%H%M%S')}"
    result = launch(train_loop, {"cfg": cfg, "model": portable_model(cfg.model), "held_out": held_out},
                    cfg.engine, storage=cfg.output_dir, name=name, datasets={"train": train})
    model_uri = storage.join(cfg.output_dir, name, "model")
    storage.copy_dir(checkpoint_uri(cfg.output_dir, result.checkpoint, "model"), model_uri)
    record = {"recipe": "pretrain", "name": name, "config": to_dict(cfg), "steps": result.metrics["step"],
              "masked_accuracy": result.metrics["accuracy"], "model": model_uri}
    record["results"] = storage.join(cfg.output_dir, "results.jsonl")
    storage.append_jsonl(record["results"], record)
    return record


def make_student(teacher_dir: str, out_dir: str, layers: list[int] | None = None) -> str:
    """A smaller student initialised from the teacher: embeddings, MLM head and the chosen
    encoder layers (default every other one, DistilBERT's recipe)."""
    from transformers import AutoModelForMaskedLM

    from rayapp.modeling.models import load_mlm, load_tokenizer

    teacher = load_mlm(teacher_dir)
    n = teacher.config.num_hidden_layers
    layers = layers if layers is not None else list(range(0, n, 2))
    if not layers or any(not 0 <= i < n for i in layers):
        raise ConfigError(f"student layers {layers} must be indices of the teacher's {n} layers")
    config = teacher.config.__class__.from_dict({**teacher.config.to_dict(), "num_hidden_layers": len(layers)})
    student = AutoModelForMaskedLM.from_config(config)
    state = {}
    for key, value in teacher.state_dict().items():
        parts = key.split(".")
        if "layer" in parts:  # encoder.layer.<i>.* -> encoder.layer.<j>.* for the kept layers
            at = parts.index("layer") + 1
            i = int(parts[at])
            if i not in layers:
                continue
            parts[at] = str(layers.index(i))
        state[".".join(parts)] = value
    missing, unexpected = student.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "decoder" not in m]:
        raise ConfigError(f"cannot cut a student from {teacher_dir}: missing {missing}, unexpected {unexpected}")
    student.tie_weights()
    student.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(teacher_dir).save_pretrained(out_dir)
    return out_dir
