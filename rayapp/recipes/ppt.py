"""Recipe: PPT's prompt pre-training (Gu et al. 2021), SMASH's "Vanilla PPT" baseline.

SMASH (§4.1, App. A.1) pre-trains soft prompts "on the same data as SMASH" for sentence-pair
tasks and on corpus sentences a sentiment model labelled for sentiment tasks, then prompt-tunes
on each few-shot split from them. Here that is: a soft prompt of `prompt_tokens` vectors
(`models.LogitsAt`) in the intermediate task's prompt, trained with the model frozen on
- `task=smash-pairs`: `rayapp intermediate pairs` (labels different document / same document /
  adjacent as No / Maybe / Yes: PPT's 3-class next-sentence task, which SMASH's pairs copy);
- `task=smash-sentiment`: `rayapp intermediate sentiment` (the teacher's 5 classes,
  terrible..great, over the sentences it labels confidently: PPT's 5-class sentence task);
cross-entropy over the label words (the objective of SMASH settings 6-7, `rule` / `hard-label`).
The run exports `<run>/student`: the frozen model with `soft_prompt.safetensors` beside it;
the downstream stage is `rayapp finetune method=prompt-tuning init=<run>/student`.

PPT's own recipe (thu-coai/PPT: configs/prompt/pretrain.json, scripts/pretrain/*.sh), kept:
100 prompt tokens initialised from the mask token's embedding, every model weight frozen,
Adam with decoupled weight decay 0.01, gradient clipping 1.0, lr 0.1, batch 64, no warm-up,
200k steps. Where this differs, and why:
- the model is a masked LM scored at `<mask>` (SMASH's DistilRoBERTa; PPT's T5 decodes a
  span), so the prompt goes after `<s>` instead of first;
- the learning rate decays linearly to 0 (rayapp's one schedule; PPT's "noam" decay falls as
  the inverse square root of the step);
- the sentiment labels come from the teacher (the sentiment stage) rather than from a
  RoBERTa-base fine-tuned on Yelp-full, which SMASH used and which no local asset provides;
  give another labelled folder as `data` to use another labeller.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from rayapp.config import ModelRef
from rayapp.errors import ConfigError
from rayapp.modeling.models import check_model, local_model_dir, prompt_tuned
from rayapp.recipes import distill
from rayapp.recipes.distill import DistillConfig, Objective
from rayapp.tasks.registry import INTERMEDIATE_TASKS, MAX_LENGTH
from rayapp.train.loop import Setup

OBJECTIVES = {"smash-pairs": "rule", "smash-sentiment": "hard-label"}  # hard labels of each intermediate task


@dataclass
class PPTConfig(DistillConfig):
    teacher: ModelRef | None = None     # none: the labels are the data's
    objective: Objective = "rule"       # set from `task` (OBJECTIVES)
    prompt_tokens: int = 100
    lr: float = 0.1
    batch_size: int = 64
    weight_decay: float = 0.01

    def __post_init__(self) -> None:
        if self.setting is not None:
            raise ConfigError("setting= picks a SMASH distillation preset; PPT has none (leave it out)")
        if self.task in OBJECTIVES:
            self.objective = OBJECTIVES[self.task]
        super().__post_init__()
        self.require_positive("prompt_tokens")


def setup(cfg: PPTConfig, inputs: dict, device) -> Setup:
    plain = distill.setup(cfg, inputs, device)
    model = prompt_tuned(plain.model.mlm, plain.tokenizer, cfg.prompt_tokens, local_model_dir(inputs["student"]))
    return dataclasses.replace(plain, model=model, desc=f"ppt {cfg.task}")


def run(cfg: PPTConfig, callbacks=()) -> dict:
    """Pre-train the soft prompt; returns the run's record (`<run>/student` holds the prompt)."""
    max_length = cfg.max_length or MAX_LENGTH[cfg.task]
    check_model(cfg.student, prompt=(INTERMEDIATE_TASKS[cfg.task], max_length), soft_prompt=cfg.prompt_tokens)
    return distill.run(cfg, callbacks, recipe="ppt", setup=setup)
