"""Distillation and prompt losses of SMASH and Prompt-Distiller (PD).

Every function is pure: tensors in, a scalar tensor out (float32, on the inputs' device).
Inputs may be half precision; everything is upcast to float32 first because soft targets
over a 50k vocabulary underflow in fp16/bf16. Equation numbers refer to
`shared/papers/smash.txt` and `shared/papers/prompt-distiller.txt`.

Shape conventions: B batch, T sequence length, V vocabulary, H hidden size (or heads for
attention), C classes, M number of transformer layers.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from rayapp.errors import ConfigError, DataError
from rayapp.tasks.prompts import class_logits



def _check_vocab(student_size: int, teacher_size: int, what: str) -> None:
    if student_size != teacher_size:
        raise ConfigError(
            f"{what}: the student scores {student_size} tokens but the teacher {teacher_size}; "
            "token-level distillation needs the same vocabulary, so pick a teacher that shares "
            "the student's tokenizer (e.g. roberta-large for distilroberta-base)"
        )


def _tempered_ce_rows(student_logits: torch.Tensor, teacher_scores: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """Per-row -sum_i t_i log s_i with both distributions softened by T, times T^2.

    `teacher_scores` may be logits or log-probabilities: softmax is shift-invariant.
    The T^2 factor (Hinton et al.) keeps gradient magnitudes independent of T; at T=1 this
    is exactly SMASH eq. 1.
    """
    t = torch.softmax(teacher_scores.float() / temperature, dim=-1)
    log_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return -(t * log_s).sum(-1) * temperature**2


def soft_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """SMASH eq. 1: L_ce = -sum_{i in V} t_i log s_i, averaged over the batch.

    student_logits [..., V], teacher_logits [..., V] (logits or log-probabilities: softmax is
    shift-invariant). The temperature is applied here and only here: t = softmax(z_T / T),
    s = softmax(z_S / T), and the loss is scaled by T^2 (Hinton et al.) so gradients keep
    their size; T = 1 (default, SMASH) is eq. 1 unchanged.
    """
    _check_vocab(student_logits.shape[-1], teacher_logits.shape[-1], "soft_ce")
    return _tempered_ce_rows(student_logits, teacher_logits, temperature).mean()


TOPK_MODES = ("tail", "renormalize")


def soft_ce_topk(student_logits: torch.Tensor, topk_values: torch.Tensor,
                 topk_indices: torch.Tensor, teacher_lse: torch.Tensor,
                 mode: str = "tail", temperature: float = 1.0) -> torch.Tensor:
    """SMASH eq. 1 against a teacher distribution rebuilt from a top-k logit cache.

    student_logits [B, V]; topk_values [B, k] teacher logits (fp16 is fine, any common
    shift); topk_indices [B, k] their vocabulary ids; teacher_lse [B] log-sum-exp of the
    teacher's FULL logits (same shift). Kept entries have exact probabilities
    t_i = exp(v_i - lse); the cache does not say how the missing mass 1 - sum_k t_i is spread.
      mode="tail" (default): the missing entries form one bucket on both sides,
          L = -sum_k t_i log s_i - (1 - sum_k t_i) log(1 - sum_k s_i),
        i.e. eq. 1 over the partition {kept ids..., everything else}. It keeps the teacher's
        real confidence (a top-64 cache of a real teacher may cover only ~40% of the mass),
        and its gradient follows eq. 1's closely (tests/test_losses.py measures it).
      mode="renormalize": t_i = softmax(v)_i over the kept entries (the stored lse cancels):
        a proper but sharper distribution than the teacher's.
    `temperature` T softens teacher and student (x T^2, as `soft_ce`); the cache holds the
    lse at T = 1 only, so T != 1 needs mode="renormalize". With k = V both modes equal eq. 1.
    """
    _check_vocab_ids(topk_indices, student_logits.shape[-1])
    if mode not in TOPK_MODES:
        raise ConfigError(f"top-k cache mode must be one of {TOPK_MODES}, got {mode!r}")
    if mode == "tail" and temperature != 1.0:
        raise ConfigError("the top-k cache stores the teacher's log-sum-exp at temperature 1, so its tail "
                          "mass at another temperature is unknown: use temperature=1 or topk_mode=renormalize")
    z = student_logits.float() / temperature
    log_s = torch.log_softmax(z, dim=-1)
    kept_log_s = log_s.gather(-1, topk_indices.long())
    if mode == "renormalize":
        t = torch.softmax(topk_values.float() / temperature, dim=-1)
        return -(t * kept_log_s).sum(-1).mean() * temperature**2
    t = torch.exp(topk_values.float() - teacher_lse.float().unsqueeze(-1))
    tail_t = (1 - t.sum(-1)).clamp(min=0)
    # log(1 - sum_k s_i) = logsumexp over the other ids - logsumexp over all: exact, no
    # cancellation. Kept ids get a finite -1e4 (not -inf) so k = V stays finite in backward.
    rest = z.scatter(-1, topk_indices.long(), -1e4)
    log_tail_s = rest.logsumexp(-1) - z.logsumexp(-1)
    tail = torch.where(tail_t > 1e-6, tail_t * log_tail_s, torch.zeros_like(tail_t))
    return (-(t * kept_log_s).sum(-1) - tail).mean()


def _check_vocab_ids(indices: torch.Tensor, vocab_size: int) -> None:
    # One device sync; without it an out-of-range id is a CUDA device-side assert.
    if indices.numel() and int(indices.max()) >= vocab_size:
        raise ConfigError(
            f"soft_ce_topk: the teacher cache holds token id {int(indices.max())} but the "
            f"student vocabulary has {vocab_size} tokens; the cache was built with a teacher "
            "whose tokenizer differs from the student's: rebuild it with a matching teacher"
        )


def layer_map(m_stu: int, m_tea: int) -> list[int]:
    """Uniform layer map g(m) = m * M_tea / M_stu (SMASH eq. 2-3, TinyBERT), m = 0..M_stu.

    Index 0 maps embeddings to embeddings; entry m is the teacher layer student layer m
    learns from.
    """
    if m_stu < 1 or m_tea % m_stu:
        raise ConfigError(
            f"the uniform layer map g(m) = m*M_tea/M_stu needs the teacher's layer count to be "
            f"a multiple of the student's, got M_stu={m_stu}, M_tea={m_tea}; pick a teacher "
            "with a multiple of the student's layers or use soft_ce (eq. 1) alone"
        )
    return [m * m_tea // m_stu for m in range(m_stu + 1)]


def _masked_mse(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of (a-b)^2 over elements whose `weight` (broadcast to a's leading dims) is 1."""
    sq = (a.float() - b.float()).pow(2)
    if weight is None:
        return sq.mean()
    w = weight.float().reshape(weight.shape + (1,) * (sq.dim() - weight.dim()))
    # Count every element a weighted position contributes (e.g. all H features).
    return (sq * w).sum() / (w.expand_as(sq).sum()).clamp(min=1.0)


def _check_layers(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                  dim: int, feature: str, what: str, unit: str) -> None:
    """Per-layer tensors of student and teacher must agree in every dim but the layer count."""
    if not student or not teacher:
        raise ConfigError(f"{what}: got no student or teacher {unit}; run both models with "
                          f"output_{unit}=True")
    s, t = student[0].shape, teacher[0].shape
    if s[dim] != t[dim]:
        raise ConfigError(
            f"{what} needs the same {feature} in student and teacher, got student {s[dim]} "
            f"vs teacher {t[dim]}; use a teacher of the student's family (e.g. roberta-base "
            "for distilroberta-base) or soft_ce (eq. 1) alone"
        )
    if s != t:
        raise ConfigError(
            f"{what}: student {unit} shape {tuple(s)} and teacher {tuple(t)} differ in batch "
            "or sequence length; tokenize the batch once and feed the same input_ids to both"
        )


def hidden_mse(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """SMASH eq. 2: L_hidn = sum_{m=0..M_stu} MSE(H^stu_m, H^tea_g(m)).

    student_hidden: M_stu+1 tensors [B, T, H] (index 0 = embedding output, as HF's
    `hidden_states`), teacher_hidden: M_tea+1 tensors [B, T, H]. attention_mask [B, T]:
    padding positions are left out of each MSE's mean (they carry no text).
    Raises ConfigError if hidden sizes or sequence shapes differ or M_tea % M_stu != 0.
    """
    _check_layers(student_hidden, teacher_hidden, -1, "hidden size",
                  "hidden-state distillation (eq. 2)", "hidden_states")
    g = layer_map(len(student_hidden) - 1, len(teacher_hidden) - 1)
    return sum(_masked_mse(student_hidden[m], teacher_hidden[g[m]], attention_mask)
               for m in range(len(student_hidden)))


def attention_mse(student_attn: Sequence[torch.Tensor], teacher_attn: Sequence[torch.Tensor],
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """SMASH eq. 3: L_attn = sum_{m=1..M_stu} sum_{h=1..H} MSE(A^stu_mh, A^tea_g(m)h).

    student_attn: M_stu tensors [B, heads, T, T] (layer m at index m-1, as HF's
    `attentions`), teacher_attn: M_tea tensors. With attention_mask [B, T] only
    (query, key) pairs of two real tokens count: padded query rows hold arbitrary
    attention in HF models. Raises ConfigError if head counts or shapes differ.
    """
    _check_layers(student_attn, teacher_attn, 1, "number of attention heads",
                  "attention distillation (eq. 3)", "attentions")
    g = layer_map(len(student_attn), len(teacher_attn))
    pairs = None
    if attention_mask is not None:
        real = attention_mask.float()
        pairs = (real[:, :, None] * real[:, None, :])[:, None]  # [B, 1, T, T], for every head
    heads = student_attn[0].shape[1]
    # A sum over heads of per-head means = heads x the mean over all heads' elements.
    return heads * sum(_masked_mse(student_attn[m - 1], teacher_attn[g[m] - 1], pairs)
                       for m in range(1, len(student_attn) + 1))


def distilbert_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    mlm_labels: torch.Tensor, student_last_hidden: torch.Tensor,
                    teacher_last_hidden: torch.Tensor, attention_mask: torch.Tensor,
                    temperature: float = 2.0, weights: tuple[float, float, float] = (5.0, 2.0, 1.0),
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DistilBERT objective, SMASH §4.4 setting (5): w_ce L_ce + w_mlm L_mlm + w_cos L_cos.

    student/teacher_logits [N, V] at the N positions L_ce is computed on (the vocabulary
    projection is only computed there; the recipe picks them: `DistillConfig.distilbert_ce`),
    mlm_labels [N] the original token at each of them that was masked, -100 at the others;
    *_last_hidden [B, T, H], attention_mask [B, T].
      L_ce  = eq. 1 with temperature T, mean over the N positions, times T^2 (Sanh et al. use
              KL, which differs from CE by the teacher's entropy: same gradient);
      L_mlm = hard CE of the student on the masked tokens (label != -100; no temperature);
      L_cos = mean over non-pad positions of 1 - cos(h_stu, h_tea).
    Which N: SMASH says only "training objective same as DistilBERT". DistilBERT's released
    code (Sanh et al., transformers' examples/research_projects/distillation, `distiller.py`)
    computes L_ce on every non-pad token unless `--restrict_ce_to_mask` is given (off by
    default), so "tokens" (every non-pad token) is the recipe's default and "masked" (the
    masked tokens only) the option. No position, or no masked one, contributes 0 instead of NaN.
    Returns (total, {"ce", "mlm", "cos"}) with the parts detached for logging.
    """
    _check_vocab(student_logits.shape[-1], teacher_logits.shape[-1], "distilbert_loss")
    if student_last_hidden.shape[-1] != teacher_last_hidden.shape[-1]:
        raise ConfigError(
            f"distilbert_loss: the cosine term needs the same hidden size, got student "
            f"{student_last_hidden.shape[-1]} vs teacher {teacher_last_hidden.shape[-1]}; "
            "use a teacher of the student's family (e.g. roberta-base for distilroberta-base)"
        )
    ce = _tempered_ce_rows(student_logits, teacher_logits, temperature).sum() / max(mlm_labels.numel(), 1)
    masked = mlm_labels != -100
    mlm = F.cross_entropy(student_logits[masked].float(), mlm_labels[masked], reduction="sum") / masked.sum().clamp(min=1)
    real = attention_mask.bool()
    cos = (1 - F.cosine_similarity(student_last_hidden[real].float(),
                                   teacher_last_hidden[real].float(), dim=-1)).mean()
    w_ce, w_mlm, w_cos = weights
    total = w_ce * ce + w_mlm * mlm + w_cos * cos
    return total, {"ce": ce.detach(), "mlm": mlm.detach(), "cos": cos.detach()}


def verbalizer_ce(mask_logits: torch.Tensor, label_word_ids: Sequence[Sequence[int]],
                  labels: torch.Tensor) -> torch.Tensor:
    """Hard-label prompt CE (PD eq. 2 over PD eq. 1 scores; SMASH §4.4 settings (6)/(7)).

    mask_logits [B, V] MLM logits at the mask, label_word_ids[c] the vocabulary ids of
    class c's label word(s), labels [B] class indices in 0..C-1. Mean over the batch.
    """
    scores = class_logits(mask_logits, label_word_ids)
    n_classes = len(label_word_ids)
    # One device sync; a bad label would otherwise be a CUDA device-side assert.
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise DataError(
            f"labels range over {int(labels.min())}..{int(labels.max())} but the verbalizer "
            f"has {n_classes} classes (0..{n_classes - 1}); map the data's labels to the "
            "task's label list"
        )
    return F.cross_entropy(scores, labels.long())


def regression_kl(class_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SMASH §3.1 regression loss between p_pred = softmax(class_logits) and p_gold.

    class_logits [B, 2] scores of the words [y_l, y_u], target [B, 2] = p_gold (see
    `prompts.regression_target`). Mean over the batch.

    The paper writes L_kl = KL(p_pred || p_gold), but p_gold has exact zeros whenever
    y = l or y = u (STS-B scores 0 and 5 occur), where KL(p_pred || p_gold) is infinite. This
    computes KL(p_gold || p_pred) = sum p_gold (log p_gold - log p_pred) with 0 log 0 = 0,
    finite everywhere and minimised by the same p_pred = p_gold. It is not what LM-BFF's code
    computes: LM-BFF passes the probabilities p_gold as the target of
    `nn.KLDivLoss(log_target=True)`, which reads them as log-probabilities, i.e. it minimises
    sum exp(p_gold) (p_gold - log p_pred), not a KL divergence; we do not reproduce that.
    """
    if class_logits.shape[-1] != 2 or target.shape != class_logits.shape:
        raise ConfigError(
            f"regression_kl expects class_logits and target of shape [B, 2] (two label words, "
            f"low and high), got {tuple(class_logits.shape)} and {tuple(target.shape)}; a "
            "regression task's verbalizer must have exactly two words"
        )
    p = target.float()
    kl = torch.xlogy(p, p) - p * torch.log_softmax(class_logits.float(), dim=-1)
    return kl.sum(-1).mean()


# --- Prompt-Distiller (PD eq. 1-8) -------------------------------------------------------
# PD's losses work on distributions over the task's C labels ([B, C]), never over the
# vocabulary: each model scores its own label words with its own tokenizer
# (`PromptEncoder(tokenizer, task).label_word_ids`) and its own layer probes, so teacher and
# student may have different tokenizers (the paper distils RoBERTa-large into BERT-small).

PD_PARTS = ("mlm", "kd_x", "kd_xu", "cpd_x", "cpd_xu")  # eq. 8's terms, as logged


def _check_alpha(alpha: float) -> None:
    if not alpha > 0:
        raise ConfigError(f"the KD temperature alpha must be > 0 (PD eq. 3-4), got {alpha}; the paper uses 10")


def label_word_probs(scores: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """PD eq. 1: p(y|x) = exp(s(l(y)|x) / alpha) / sum_{y'} exp(s(l(y')|x) / alpha).

    scores [..., C]: s_Θ(l(y)|x), the MLM logit of class y's label word at the mask, all from
    ONE model (`prompts.class_logits`, or a layer probe's output). The paper's eq. 1 has Θ_T
    in the numerator but Θ_S in the denominator, a typo: the vector would not sum to 1.
    Both use the same model here. alpha is eq. 3-4's temperature; alpha = 1 is eq. 1 as printed.
    """
    _check_alpha(alpha)
    return torch.softmax(scores.float() / alpha, dim=-1)


KD_FORMS = ("paper", "hinton")


def kd_ce(student_scores: torch.Tensor, teacher_scores: torch.Tensor, alpha: float = 10.0,
          form: str = "paper") -> torch.Tensor:
    """PD eq. 3 (prompt-tuned teacher T on X) and eq. 4 (pre-trained teacher T' on X~).

    student_scores, teacher_scores [B, C]: each model's label-word logits (eq. 1 scores, each
    with its own tokenizer). The paper writes CE(p_T / alpha, p_S) with "alpha > 0 the
    temperature factor"; read literally p_T / alpha is not a distribution (it sums to 1/alpha),
    so alpha is read as the temperature of the teacher's softmax, p_T^alpha = softmax(s_T / alpha)
    (`label_word_probs(s_T, alpha)`).
      form="paper" (default): L_KD = -mean_x sum_y p_T^alpha(y|x) log p_S(y|x), the student's p_S
        untempered as eq. 3-4 write it, so no alpha^2 factor;
      form="hinton": both sides softened and the loss x alpha^2 (Hinton et al. 2015, as
        `soft_ce`): -mean_x sum_y p_T^alpha log p_S^alpha x alpha^2. Not what eq. 3-4 print: an
        option to compare (the alpha^2 keeps the gradient's size independent of alpha when both
        sides are softened; the paper form needs no such factor).
    """
    if student_scores.shape != teacher_scores.shape:
        raise ConfigError(
            f"kd_ce: student class scores {tuple(student_scores.shape)} and teacher "
            f"{tuple(teacher_scores.shape)} differ; both must be [B, C] scores of the same task's C labels"
        )
    if form not in KD_FORMS:
        raise ConfigError(f"kd_ce: form must be one of {KD_FORMS} (PD eq. 3-4 as printed, or Hinton's), got {form!r}")
    if form == "hinton":
        _check_alpha(alpha)
        return _tempered_ce_rows(student_scores, teacher_scores, alpha).mean()
    t = label_word_probs(teacher_scores, alpha)
    return -(t * torch.log_softmax(student_scores.float(), dim=-1)).sum(-1).mean()


def probe_match(teacher_probe_probs: torch.Tensor, student_probe_probs: torch.Tensor) -> torch.Tensor:
    """PD eq. 5: f_{T,S}(x) = exp( sum_{j,k} p_T^(j)(y|x) . p_S^(k)(y|x) / (N_T N_S) ).

    teacher_probe_probs [..., N_T, C], student_probe_probs [..., N_S, C]: class probabilities of
    each layer probe (`modeling.probes`). Leading dims broadcast, so the teacher's view of one
    example against the student's view of another is probe_match(t[None], s[:, None]) ->
    [B_s, B_t]. The double sum over probe pairs over N_T N_S is the dot product of the two
    models' mean probe distributions, which is how it is computed.
    """
    t = teacher_probe_probs.float().mean(-2)
    s = student_probe_probs.float().mean(-2)
    return torch.exp((t * s).sum(-1))


def contrastive_probe_loss(teacher_probe_probs: torch.Tensor, student_probe_probs: torch.Tensor,
                           labels: torch.Tensor, bank_probe_probs: torch.Tensor | None = None,
                           bank_labels: torch.Tensor | None = None) -> torch.Tensor:
    """PD eq. 6 (T, gold labels of X) and eq. 7 (T', pseudo-labels of X~):
    L_CPD = -mean_x f(x) / sum_{x' in N(x)} f(x').

    teacher_probe_probs [B, N_T, C] (frozen teacher), student_probe_probs [B, N_S, C]: the layer
    probes' class probabilities on the batch; labels [B]: gold labels (eq. 6) or the pre-trained
    teacher's zero-shot predictions (eq. 7).

    Pairs. The numerator is eq. 5 with both models on x. For a negative x' eq. 6 writes
    f_{T,S}(x'); read literally (both models on x') the loss would push teacher-student
    agreement on x' down while x' 's own term pushes it up. We follow the contrastive
    distillation eq. 6 cites ([16], CRD, Tian et al. 2020): a negative pairs the student's view
    of the anchor with the teacher's view of the negative, f(T(x'), S(x)). The student learns
    to agree with the teacher on x and to differ from the teacher on other-label examples;
    gradients reach it through S(x) only.

    Negatives. N(x) = the batch examples whose label differs from x's. At the paper's batch of 4
    an example often has none; for such an example (only) N(x) = the rows of the bank with
    another label: `bank_probe_probs` [M, N_T, C], `bank_labels` [M] are cached teacher probe
    outputs of other examples of the same set (the teachers are frozen, so these are computed
    once; the recipe draws the bank). As in eq. 6 the denominator excludes the positive and
    there is no log. An example with no negative at all is left out of the mean; if no example
    has one the loss is 0 (with a gradient path, for DDP).
    """
    b, c = teacher_probe_probs.shape[0], teacher_probe_probs.shape[-1]
    bank_ok = (bank_probe_probs is None) == (bank_labels is None) and (
        bank_probe_probs is None or (bank_probe_probs.shape[1:] == teacher_probe_probs.shape[1:]
                                     and bank_labels.shape == bank_probe_probs.shape[:1]))
    if student_probe_probs.shape[0] != b or student_probe_probs.shape[-1] != c or labels.shape != (b,) or not bank_ok:
        bank = "" if bank_probe_probs is None else f", bank {tuple(bank_probe_probs.shape)}"
        bank += "" if bank_labels is None else f", bank labels {tuple(bank_labels.shape)}"
        raise ConfigError(
            f"contrastive_probe_loss: teacher probes {tuple(teacher_probe_probs.shape)}, student probes "
            f"{tuple(student_probe_probs.shape)}, labels {tuple(labels.shape)}{bank} must be [B, N_T, C], "
            "[B, N_S, C], [B] (and a bank [M, N_T, C] with labels [M]) with the same B and C; probes of "
            "both models must predict the task's label words"
        )
    s = student_probe_probs[:, None]  # [B, 1, N_S, C]: the student's view of each anchor
    pos = probe_match(teacher_probe_probs, student_probe_probs)  # [B]
    neg = labels[:, None] != labels[None, :]  # [B, B]
    denom = (probe_match(teacher_probe_probs[None], s) * neg).sum(1)
    has_neg = neg.any(1)
    if bank_probe_probs is not None:
        bank_neg = (labels[:, None] != bank_labels[None, :]) & ~has_neg[:, None]  # [B, M]
        denom = denom + (probe_match(bank_probe_probs[None].to(s.device), s) * bank_neg).sum(1)
        has_neg = has_neg | bank_neg.any(1)
    # f >= 1, so an example with negatives has a denominator >= 1; the others get 1 to stay finite
    ratio = pos / torch.where(has_neg, denom, torch.ones_like(denom))
    return -(ratio * has_neg).sum() / has_neg.sum().clamp(min=1)


def prompt_distiller_loss(mlm: torch.Tensor, kd_x: torch.Tensor | None = None, kd_xu: torch.Tensor | None = None,
                          cpd_x: torch.Tensor | None = None, cpd_xu: torch.Tensor | None = None,
                          lambda1: float = 0.2, lambda2: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PD eq. 8: L = L_MLM(X) + lambda1 (L_KD(X) + L_KD(X~)) + lambda2 (L_CPD(X) + L_CPD(X~)).

    A term passed as None is not part of the objective: Table 2's ablations (w/o contrastive:
    no cpd_x, cpd_xu; w/o unlabelled: no kd_xu, cpd_xu) and Table 1's Prompt-KD (mlm + kd_x).
    Returns (total, parts): every key of `PD_PARTS`, detached for logging, an absent term as
    exactly 0.
    """
    if lambda1 < 0 or lambda2 < 0:
        raise ConfigError(f"PD eq. 8 weights must be >= 0, got lambda1={lambda1}, lambda2={lambda2}; the paper uses 0.2")
    terms = {"mlm": mlm, "kd_x": kd_x, "kd_xu": kd_xu, "cpd_x": cpd_x, "cpd_xu": cpd_xu}
    weights = {"mlm": 1.0, "kd_x": lambda1, "kd_xu": lambda1, "cpd_x": lambda2, "cpd_xu": lambda2}
    total = sum(weights[k] * v.float() for k, v in terms.items() if v is not None)
    zero = torch.zeros((), device=mlm.device)
    return total, {k: zero if v is None else v.detach().float() for k, v in terms.items()}
