"""Every recipe's objectives, as one table: name -> fn(student, teacher, batch, ctx) -> (loss, parts).

Recipes pick an entry by config only (`objective_name(cfg)` in the recipe); nothing here
looks at which keys a batch happens to carry. `student` and `teacher` are
`modeling.models.LogitsAt` (the student maybe DDP/DeepSpeed-wrapped, the teacher frozen or
None); logits come at the mask only, or at the masked tokens for MLM objectives. `ctx` is
the worker's `Context`: the recipe config plus what the worker built from it (the
verbalizer's label-word ids). Temperatures are applied inside the loss functions, once.
New methods are new entries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from rayapp.losses import (attention_mse, distilbert_loss, hidden_mse, regression_kl, soft_ce, soft_ce_topk,
                           verbalizer_ce)
from rayapp.tasks.prompts import Task, class_logits, regression_target


@dataclass
class Context:
    cfg: Any                                   # the recipe config (fields named in each entry)
    task: Task
    label_word_ids: list[list[int]] | None = None


def at_mask(model, batch, **kw):
    """(logits [B, V] at the mask, encoder outputs)."""
    return model(batch["input_ids"], batch["attention_mask"], positions=batch["mask_pos"], **kw)


def _teacher(teacher, batch, positions, **kw):
    with torch.no_grad():
        return teacher(batch["input_ids"], batch["attention_mask"], positions=positions, **kw)


# --- prompt-based fine-tuning and its baselines (SMASH §4.1) ----------------------------

def prompt_loss(student, teacher, batch, ctx: Context):
    """CE over the label words' scores (PD eq. 1-2); STS-B: SMASH §3.1 KL to the gold mix."""
    logits = class_logits(at_mask(student, batch)[0], ctx.label_word_ids)
    if ctx.task.is_regression:
        return regression_kl(logits, regression_target(batch["labels"], ctx.task.bounds)), {}
    return F.cross_entropy(logits, batch["labels"]), {}


def prompt_kd_loss(student, teacher, batch, ctx: Context):
    """SMASH's "distill" baseline: prompt FT plus the soft-label loss (eq. 1 at the mask)
    between the teacher's and the student's vocabulary logits, weighted by `kd_weight`."""
    s = at_mask(student, batch)[0]
    logits = class_logits(s, ctx.label_word_ids)
    if ctx.task.is_regression:
        task_loss = regression_kl(logits, regression_target(batch["labels"], ctx.task.bounds))
    else:
        task_loss = F.cross_entropy(logits, batch["labels"])
    t = _teacher(teacher, batch, batch["mask_pos"])[0]
    kd = soft_ce(s, t, temperature=ctx.cfg.kd_temperature)
    return task_loss + ctx.cfg.kd_weight * kd, {"task": task_loss.detach(), "kd": kd.detach()}


def classifier_loss(student, teacher, batch, ctx: Context):
    """Standard fine-tuning with a classification head (CE; MSE for regression)."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "mask_pos")}
    logits = student(**inputs).logits
    if ctx.task.is_regression:
        return F.mse_loss(logits.squeeze(-1), batch["labels"].float()), {}
    return F.cross_entropy(logits, batch["labels"]), {}


# --- SMASH distillation (§3.2, §4.4) ---------------------------------------------------

def soft_ce_cache(student, teacher, batch, ctx: Context):
    """Eq. 1 against the teacher's top-k cache (settings 1-2)."""
    s = at_mask(student, batch)[0]
    return soft_ce_topk(s, batch["topk_values"], batch["topk_indices"], batch["lse"],
                        mode=ctx.cfg.topk_mode, temperature=ctx.cfg.temperature), {}


def soft_ce_online(student, teacher, batch, ctx: Context):
    """Eq. 1 against the teacher computed in the step (settings 1-2, online)."""
    s = at_mask(student, batch)[0]
    return soft_ce(s, _teacher(teacher, batch, batch["mask_pos"])[0], temperature=ctx.cfg.temperature), {}


def _ce_plus(aux_fn: Callable, **kw):
    def loss(student, teacher, batch, ctx: Context):
        s, s_out = at_mask(student, batch, **kw)
        t, t_out = _teacher(teacher, batch, batch["mask_pos"], **kw)
        ce = soft_ce(s, t, temperature=ctx.cfg.temperature)
        aux = aux_fn(s_out, t_out, batch["attention_mask"])
        return ce + ctx.cfg.aux_weight * aux, {"ce": ce.detach(), "aux": aux.detach()}
    return loss


# eq. 1 + eq. 2 (hidden states, setting 3) / + eq. 3 (attention maps, setting 4)
ce_hidden = _ce_plus(lambda s, t, m: hidden_mse(s.hidden_states, t.hidden_states, m), output_hidden_states=True)
ce_attn = _ce_plus(lambda s, t, m: attention_mse(s.attentions, t.attentions, m), output_attentions=True)


def distilbert_objective(student, teacher, batch, ctx: Context):
    """Setting 5: DistilBERT further pre-training, 5 L_ce + 2 L_mlm + 1 L_cos on raw text."""
    masked = batch["mlm_labels"] != -100
    kw = {"output_hidden_states": True}
    s, s_out = student(batch["input_ids"], batch["attention_mask"], positions=masked, **kw)
    t, t_out = _teacher(teacher, batch, masked, **kw)
    return distilbert_loss(s, t, batch["mlm_labels"][masked], s_out.hidden_states[-1], t_out.hidden_states[-1],
                           batch["attention_mask"], temperature=ctx.cfg.temperature)


def verbalizer_objective(student, teacher, batch, ctx: Context):
    """Settings 6-7: hard labels (rule labels No/Maybe/Yes, or the filter's 5 classes)."""
    return verbalizer_ce(at_mask(student, batch)[0], ctx.label_word_ids, batch["labels"]), {}


# --- masked-LM pre-training ----------------------------------------------------------

def mlm_objective(student, teacher, batch, ctx: Context):
    """Cross-entropy on the masked tokens; the vocabulary projection runs on those only."""
    masked = batch["mlm_labels"] != -100
    logits, _ = student(batch["input_ids"], batch["attention_mask"], positions=masked)
    return F.cross_entropy(logits.float(), batch["mlm_labels"][masked]), {}


OBJECTIVES: dict[str, Callable] = {
    "prompt": prompt_loss,
    "prompt+kd": prompt_kd_loss,
    "classifier": classifier_loss,
    "ce-cache": soft_ce_cache,
    "ce": soft_ce_online,
    "ce+hidden": ce_hidden,
    "ce+attn": ce_attn,
    "distilbert": distilbert_objective,
    "rule": verbalizer_objective,
    "hard-label": verbalizer_objective,
    "mlm": mlm_objective,
}


def bind(name: str, teacher, ctx: Context) -> Callable:
    """The engine's `loss_fn(model, batch)` for objective `name`."""
    fn = OBJECTIVES[name]
    return lambda model, batch: fn(model, teacher, batch, ctx)
