"""Recipe: further masked-LM pre-training, and a student cut from a teacher's layers.

How rayapp's real teacher/student pair is made without the hub: an encoder (e.g. the
MiniLM-L6 sentence encoder, real weights, fresh MLM head) is further pre-trained with BERT's
MLM objective on raw corpus text (any `corpus.read_documents` format), and the student is
initialised from every other teacher layer (`make_student`), as DistilBERT/DistilRoBERTa
were. The recipe is its config, its setup and the `mlm` objective; the loop, checkpoints,
resume and the record are the shared skeleton's. Evaluation: masked-token accuracy on a
held-out 2% of the text (fixed masking).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from rayapp import env
from rayapp.config import InputPath, ModelRef
from rayapp.data.mlm_text import build_text_chunks
from rayapp.data.shards import require_meta, shard_uris
from rayapp.errors import ConfigError
from rayapp.modeling.batches import MLMBatcher
from rayapp.modeling.models import LogitsAt, check_model, load_mlm, load_tokenizer, local_model_dir, portable_model
from rayapp.recipes import objectives
from rayapp.train.config import TrainConfig
from rayapp.train.engine import split_batch
from rayapp.train.loop import Setup
from rayapp.train.stream import plan_blocks, stream_batches
from rayapp.train.worker import worker
from rayapp.train.run import export_model, run_recipe


@dataclass
class PretrainConfig(TrainConfig):
    model: ModelRef = "distilroberta-base"
    data: InputPath = ""            # corpus: text / WikiExtractor / JSONL / parquet files, s3:// or hf://
    max_length: int = 128
    mlm_probability: float = 0.15
    eval_examples: int = 256        # held out from `data` for masked-token accuracy
    on_bad_lines: Literal["error", "skip"] = "error"  # a corpus line that does not parse (rayapp.data.corpus)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    eval_every: int = 500
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_steps == 0:
            raise ConfigError("max_steps must be > 0: a pre-training of 0 steps has no model to export")
        if not self.data:
            raise ConfigError("data is required: a corpus (text, WikiExtractor, JSONL or parquet files)")


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


def setup(cfg: PretrainConfig, inputs: dict, device) -> Setup:
    model_dir = local_model_dir(inputs["model"])
    tokenizer = load_tokenizer(model_dir)
    fixed = MLMBatcher(tokenizer, cfg.max_length, cfg.mlm_probability, cfg.train_seed)  # same masks every eval
    texts = inputs["held_out"]
    eval_batches = [fixed({"text": texts[i:i + 32]}) for i in range(0, len(texts), 32)]
    to_batch = MLMBatcher(tokenizer, cfg.max_length, cfg.mlm_probability,
                          cfg.train_seed * 1000 + 1 + worker().rank)
    return Setup(model=LogitsAt(load_mlm(model_dir)),
                 objective=objectives.bind("mlm", None, objectives.Context(cfg, task=None)),
                 batches=lambda first, micro, accum: stream_batches(inputs["blocks"], to_batch, micro, accum, first,
                                                                    cfg.train_seed),
                 evaluate=lambda m: {"masked_accuracy": masked_accuracy(m, eval_batches, device)},
                 tokenizer=tokenizer, desc="mlm pretrain")


def run(cfg: PretrainConfig, callbacks=()) -> dict:
    split_batch(cfg.batch_size, cfg.engine.num_workers, cfg.engine.max_device_batch)
    check_model(cfg.model, needs_mlm="rayapp pretrain trains BERT's masked-LM objective")  # before Ray
    env.start_ray()
    text = build_text_chunks(cfg.data, cfg.output_dir, cfg.max_length, cfg.eval_examples, cfg.on_bad_lines)
    inputs = {"model": portable_model(cfg.model), "held_out": require_meta(text)["held_out"],
              "blocks": plan_blocks(shard_uris(text), cfg.engine.num_workers)}
    return run_recipe("pretrain", cfg, setup, inputs, {"text": text}, callbacks=callbacks,
                      derive=lambda record: {**export_model(cfg.output_dir, record, "model"),
                                             "masked_accuracy": [[s, m["masked_accuracy"]] for s, m in record["evals"]]})


def make_student(teacher_dir: str, out_dir: str, layers: list[int] | None = None) -> str:
    """A smaller student initialised from the teacher: embeddings, MLM head and the chosen
    encoder layers (default every other one, DistilBERT's recipe)."""
    from transformers import AutoModelForMaskedLM

    from rayapp.modeling.models import is_seq2seq, load_mlm, load_tokenizer

    teacher = load_mlm(teacher_dir)
    if is_seq2seq(teacher.config):  # its `layer` keys are sub-layers of T5 blocks, on two stacks
        raise ConfigError(f"cannot cut a student from {teacher_dir}: it is a seq2seq LM ({teacher.config.model_type}) "
                          "and students are cut from a masked LM's encoder layers; give a smaller model of its "
                          "family as the student (SMASH Table 4: t5-small)")
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
