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

from rayapp.losses import (attention_mse, contrastive_probe_loss, distilbert_loss, hidden_mse, kd_ce, layer_map,
                           prompt_distiller_loss, regression_kl, soft_ce, soft_ce_topk, verbalizer_ce)
from rayapp.modeling.probes import mask_states
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

def _prompt_scores(student, batch, ctx: Context):
    return class_logits(at_mask(student, batch)[0], ctx.label_word_ids)


def _head_scores(student, batch, ctx: Context):
    return student(**{k: v for k, v in batch.items() if k not in ("labels", "mask_pos", "soft_logits")}).logits


def prompt_loss(student, teacher, batch, ctx: Context):
    """CE over the label words' scores (PD eq. 1-2); STS-B: SMASH §3.1 KL to the gold mix."""
    logits = _prompt_scores(student, batch, ctx)
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


def _soft_labels(scores: Callable):
    """iPET's final classifier: PET's distillation loss, KL(softmax(t / T) || softmax(s / T)) T^2
    to the ensemble's class logits `soft_logits` (T = `soft_label_temperature`, PET's 2), as
    soft CE (`losses.soft_ce`), which differs from the KL by the targets' entropy only."""
    def loss(student, teacher, batch, ctx: Context):
        return soft_ce(scores(student, batch, ctx), batch["soft_logits"], temperature=ctx.cfg.soft_label_temperature), {}
    return loss


def classifier_loss(student, teacher, batch, ctx: Context):
    """Standard fine-tuning with a classification head (CE; MSE for regression)."""
    logits = _head_scores(student, batch, ctx)
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
    """Setting 5: DistilBERT further pre-training, 5 L_ce + 2 L_mlm + 1 L_cos on raw text;
    L_ce on every non-pad token or on the masked ones (`cfg.distilbert_ce`, see
    `losses.distilbert_loss`)."""
    masked = batch["mlm_labels"] != -100
    scored = masked if ctx.cfg.distilbert_ce == "masked" else batch["attention_mask"].bool()
    kw = {"output_hidden_states": True}
    s, s_out = student(batch["input_ids"], batch["attention_mask"], positions=scored, **kw)
    t, t_out = _teacher(teacher, batch, scored, **kw)
    return distilbert_loss(s, t, batch["mlm_labels"][scored], s_out.hidden_states[-1], t_out.hidden_states[-1],
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


# --- Prompt-Distiller and its baselines (PD Table 1-2; rayapp.recipes.prompt_distill) ----

@dataclass
class PDContext(Context):
    probes: Any = None  # the student's frozen `modeling.probes.LayerProbes` (eq. 5-7)
    same_tokenizer: bool = True  # teacher and student tokenise alike (token-level hints align)


def prompt_distiller_objective(student, teacher, batch, ctx: PDContext):
    """PD eq. 8 over one batch: the labelled rows of X first (`labels`), then the rows of X~
    (pseudo-labels `u_pseudo`), in one forward. The frozen teachers' label-word scores
    (`t_scores` of T on X, `u_t_scores` of T' on X~) and probe outputs (`t_probes`,
    `u_t_probes`, banks) come with the batch: they were computed once before training.
    `cfg.unlabelled`/`cfg.contrastive` off leave their terms out (Table 2); both off is
    Prompt-KD (Table 1). Student probes are frozen; gradients pass through them."""
    cfg, n = ctx.cfg, batch["labels"].shape[0]
    logits, out = at_mask(student, batch, output_hidden_states=cfg.contrastive)
    scores = class_logits(logits, ctx.label_word_ids)
    mlm = F.cross_entropy(scores[:n], batch["labels"])  # eq. 2
    kd_x = kd_ce(scores[:n], batch["t_scores"], cfg.alpha, cfg.kd_form)  # eq. 3
    kd_xu = kd_ce(scores[n:], batch["u_t_scores"], cfg.alpha, cfg.kd_form) if cfg.unlabelled else None  # eq. 4
    cpd_x = cpd_xu = None
    if cfg.contrastive:
        s_probs = ctx.probes.probs(mask_states(out.hidden_states, batch["mask_pos"], ctx.probes.layers))
        cpd_x = contrastive_probe_loss(batch["t_probes"], s_probs[:n], batch["labels"],  # eq. 6
                                       batch["bank_probes"], batch["bank_labels"])
        if cfg.unlabelled:  # eq. 7
            cpd_xu = contrastive_probe_loss(batch["u_t_probes"], s_probs[n:], batch["u_pseudo"],
                                            batch["u_bank_probes"], batch["u_bank_labels"])
    return prompt_distiller_loss(mlm, kd_x, kd_xu, cpd_x, cpd_xu, cfg.lambda1, cfg.lambda2)


def _ft_kd(hints: Callable | None):
    """FT-paradigm KD on a classification head: (1 - w) CE + w T^2 soft CE to the teacher's
    class logits (Hinton et al., "vanilla KD"), plus `hints(s_out, t_out, batch, ctx)` when
    given. The student is a `prompt_distill.HintStudent` (hidden states projected to the
    teacher's width); the teacher, a fine-tuned classifier, reads its own tokenisation
    (`t_input_ids`, `t_attention_mask`: the two tokenizers may differ)."""
    def loss(student, teacher, batch, ctx: Context):
        cfg = ctx.cfg
        kw = {"output_hidden_states": hints is not None, "output_attentions": cfg.method == "tinybert"}
        inputs = {k: v for k, v in batch.items() if k != "labels" and not k.startswith("t_")}
        s_out = student(**inputs, **kw)
        with torch.no_grad():
            t_out = teacher(input_ids=batch["t_input_ids"], attention_mask=batch["t_attention_mask"], **kw)
        ce = F.cross_entropy(s_out.logits.float(), batch["labels"])
        kd = soft_ce(s_out.logits, t_out.logits, temperature=cfg.kd_temperature)
        total = (1 - cfg.kd_weight) * ce + cfg.kd_weight * kd
        parts = {"ce": ce.detach(), "kd": kd.detach()}
        if hints is not None:
            extra = hints(s_out, t_out, batch, ctx)
            total = total + sum(extra.values())
            parts.update({k: v.detach() for k, v in extra.items()})
        return total, parts
    return loss


def _pkd_hints(s_out, t_out, batch, ctx: PDContext):
    """BERT-PKD (Sun et al. 2019, PKD-Skip) eq. 5: beta sum_m || h_s/|h_s| - h_t/|h_t| ||^2 on
    the first token ([CLS]/<s>) of student layers 1..M_s-1 and teacher layers g(m) (the
    last layer is covered by KD); mean over the batch."""
    s, t = s_out.hidden_states, t_out.hidden_states
    g = layer_map(len(s) - 1, len(t) - 1)
    pt = sum((F.normalize(s[m][:, 0].float(), dim=-1) - F.normalize(t[g[m]][:, 0].float(), dim=-1)).pow(2).sum(-1).mean()
             for m in range(1, len(s) - 1))
    return {"patient": ctx.cfg.pkd_beta * pt}


def _tinybert_hints(s_out, t_out, batch, ctx: PDContext):
    """TinyBERT's task-specific distillation (Jiao et al. 2020) in one stage: hidden-state MSE
    of embeddings and every student layer to teacher layer g(m) (through the student's
    projection W_h) plus attention MSE (SMASH eq. 2-3 are the same losses). With one tokenizer
    both are over every real token; with two (a RoBERTa teacher, a BERT student) positions do
    not align, so only the first token's hidden states are matched and attention is left out."""
    if ctx.same_tokenizer:
        hid = hidden_mse(s_out.hidden_states, t_out.hidden_states, batch["attention_mask"])
        return {"hidden": hid, "attn": attention_mse(s_out.attentions, t_out.attentions, batch["attention_mask"])}
    first = lambda states: [h[:, :1] for h in states]  # noqa: E731
    return {"hidden": hidden_mse(first(s_out.hidden_states), first(t_out.hidden_states))}


OBJECTIVES: dict[str, Callable] = {
    "prompt": prompt_loss,
    "prompt+kd": prompt_kd_loss,
    "classifier": classifier_loss,
    "prompt-soft": _soft_labels(_prompt_scores),
    "classifier-soft": _soft_labels(_head_scores),
    "ce-cache": soft_ce_cache,
    "ce": soft_ce_online,
    "ce+hidden": ce_hidden,
    "ce+attn": ce_attn,
    "distilbert": distilbert_objective,
    "rule": verbalizer_objective,
    "hard-label": verbalizer_objective,
    "mlm": mlm_objective,
    "prompt-distiller": prompt_distiller_objective,
    "vanilla-kd": _ft_kd(None),
    "bert-pkd": _ft_kd(_pkd_hints),
    "tinybert": _ft_kd(_tinybert_hints),
}


def bind(name: str, teacher, ctx: Context) -> Callable:
    """The engine's `loss_fn(model, batch)` for objective `name`."""
    fn = OBJECTIVES[name]
    return lambda model, batch: fn(model, teacher, batch, ctx)
