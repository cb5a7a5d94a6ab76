"""Each loss against numbers worked out by hand (math module scalars, not torch)."""
import math

import pytest
import torch

from rayapp.errors import ConfigError, DataError, PromptError
from rayapp.losses import (attention_mse, distilbert_loss, hidden_mse, layer_map, regression_kl, soft_ce,
                           soft_ce_topk, verbalizer_ce)

ln = math.log


def close(x, expected, tol=1e-6):
    assert x.dtype == torch.float32 and x.dim() == 0
    assert x.item() == pytest.approx(expected, abs=tol)


# --- SMASH eq. 1 -------------------------------------------------------------------------

def test_soft_ce_hand_computed():
    # Row 0: s = [1, 2, 3] / 6, t = [.5, .5, 0]; row 1: s uniform over 3, t = [0, 0, 1].
    student = torch.tensor([[0.0, ln(2), ln(3)], [0.0, 0.0, 0.0]])
    teacher = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    row0 = -(0.5 * ln(1 / 6) + 0.5 * ln(2 / 6))
    row1 = ln(3)
    close(soft_ce(student, teacher.log()), (row0 + row1) / 2)  # teacher log-probs (any logits)


def test_soft_ce_temperature_softens_both_and_scales_by_t_squared():
    # T = 2: t = [.64, .36] -> sqrt -> [.8, .6] / 1.4; student [0, 2 ln 2] / 2 -> s = [1/3, 2/3].
    student = torch.tensor([[0.0, 2 * ln(2)]])
    teacher = torch.tensor([[0.64, 0.36]])
    expected = -(4 / 7 * ln(1 / 3) + 3 / 7 * ln(2 / 3)) * 4
    close(soft_ce(student, teacher.log(), temperature=2.0), expected)


def test_soft_ce_half_inputs_computed_in_float32():
    student = torch.tensor([[0.0, ln(2), ln(3)]])
    teacher = torch.tensor([[0.5, 0.5, 0.0]])
    close(soft_ce(student.half(), teacher.log().half()), -(0.5 * ln(1 / 6) + 0.5 * ln(2 / 6)), 1e-3)


def test_soft_ce_vocab_mismatch_is_config_error():
    with pytest.raises(ConfigError, match="same vocabulary.*tokenizer"):
        soft_ce(torch.zeros(2, 3), torch.full((2, 4), 0.25))


def test_soft_ce_topk_with_k_equal_v_matches_dense():
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 7), torch.randn(4, 7)
    values, indices = teacher.topk(7, dim=-1)
    dense = soft_ce(student, teacher)
    for mode in ("tail", "renormalize"):
        cached = soft_ce_topk(student, values, indices, teacher.logsumexp(-1), mode)
        assert cached.item() == pytest.approx(dense.item(), abs=1e-6)


def test_soft_ce_topk_hand_computed():
    # Teacher logits [0, ln 3, ln 4]: probs [1, 3, 4] / 8, lse = ln 8. Keep k = 2: ids 2, 1.
    # Student logits [0, ln 2, ln 3]: s = [1, 2, 3] / 6.
    student = torch.tensor([[0.0, ln(2), ln(3)]])
    values = torch.tensor([[ln(4), ln(3)]])
    indices = torch.tensor([[2, 1]])
    lse = torch.tensor([ln(8)])
    renormalized = -(4 / 7 * ln(3 / 6) + 3 / 7 * ln(2 / 6))
    # tail: the missing id 0 is its own bucket on both sides, t = 1/8, s = 1/6
    tail = -(4 / 8 * ln(3 / 6) + 3 / 8 * ln(2 / 6) + 1 / 8 * ln(1 / 6))
    close(soft_ce_topk(student, values, indices, lse, mode="renormalize"), renormalized)
    close(soft_ce_topk(student, values, indices, lse), tail)  # the default
    # The cache stores fp16 values.
    close(soft_ce_topk(student, values.half(), indices, lse), tail, 1e-3)
    # T = 2 (renormalize only): kept teacher [4, 3] -> [2, sqrt 3]; student [1, 2, 3] -> sqrt, x T^2
    z = math.sqrt(1) + math.sqrt(2) + math.sqrt(3)
    t2 = [2 / (2 + math.sqrt(3)), math.sqrt(3) / (2 + math.sqrt(3))]
    expected = -(t2[0] * ln(math.sqrt(3) / z) + t2[1] * ln(math.sqrt(2) / z)) * 4
    close(soft_ce_topk(student, values, indices, lse, mode="renormalize", temperature=2.0), expected, 1e-5)
    with pytest.raises(ConfigError, match="topk_mode=renormalize"):
        soft_ce_topk(student, values, indices, lse, temperature=2.0)


def test_soft_ce_topk_tail_gradient_follows_eq_1():
    """On a 50k vocabulary with a top-64 cache that covers well under all the teacher's mass,
    the tail bucket's gradient points where eq. 1's does; renormalising does not."""
    torch.manual_seed(0)
    vocab, k = 50_000, 64
    teacher = torch.randn(8, vocab) * 3.0  # top-64 covers ~half the mass (the tiny demo teacher: 37%)
    student = (teacher + torch.randn(8, vocab)).requires_grad_(True)
    values, indices = teacher.topk(k, dim=-1)
    lse = teacher.logsumexp(-1)
    covered = (values.logsumexp(-1) - lse).exp().mean().item()
    assert 0.3 < covered < 0.7

    def grad(loss):
        (g,) = torch.autograd.grad(loss, student)
        return g.flatten()

    full = grad(soft_ce(student, teacher))
    cos = {mode: torch.nn.functional.cosine_similarity(full, grad(soft_ce_topk(student, values, indices, lse, mode)),
                                                       dim=0).item() for mode in ("tail", "renormalize")}
    assert cos["tail"] > 0.98 and cos["renormalize"] < 0.9, cos  # measured: 0.989 vs 0.725


def test_soft_ce_topk_id_outside_student_vocab_is_config_error():
    with pytest.raises(ConfigError, match="token id 5.*3 tokens.*rebuild"):
        soft_ce_topk(torch.zeros(1, 3), torch.zeros(1, 2), torch.tensor([[5, 0]]), torch.zeros(1))


# --- SMASH eq. 2-3 -----------------------------------------------------------------------

def test_layer_map_uniform():
    assert layer_map(3, 12) == [0, 4, 8, 12]
    assert layer_map(6, 6) == list(range(7))
    with pytest.raises(ConfigError, match="multiple.*M_stu=2, M_tea=3"):
        layer_map(2, 3)


def _hidden_pair():
    # Student M=1, teacher M=2: g = [0, 2], teacher layer 1 is never used.
    student = [torch.zeros(1, 2, 2), torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])]
    teacher = [torch.ones(1, 2, 2), torch.full((1, 2, 2), 99.0),
               torch.tensor([[[1.0, 0.0], [3.0, 0.0]]])]
    return student, teacher


def test_hidden_mse_hand_computed():
    student, teacher = _hidden_pair()
    # Layer 0: all diffs 1 -> 1. Layer 1: diffs (0, 2, 0, 4) -> (0 + 4 + 0 + 16) / 4 = 5.
    close(hidden_mse(student, teacher), 6.0)


def test_hidden_mse_ignores_padding():
    student, teacher = _hidden_pair()
    # Only position 0: layer 0 -> 1, layer 1 diffs (0, 2) -> 2.
    close(hidden_mse(student, teacher, torch.tensor([[1, 0]])), 3.0)


def test_hidden_mse_config_errors():
    student, teacher = _hidden_pair()
    with pytest.raises(ConfigError, match="same hidden size.*student 2 vs teacher 3"):
        hidden_mse(student, [torch.zeros(1, 2, 3)] * 3)
    with pytest.raises(ConfigError, match="multiple.*M_stu=2, M_tea=3"):
        hidden_mse([student[0]] * 3, [teacher[0]] * 4)
    with pytest.raises(ConfigError, match="sequence length.*same input_ids"):
        hidden_mse(student, [torch.zeros(1, 5, 2)] * 3)


def test_attention_mse_hand_computed():
    # Student M=1, teacher M=2: student layer 1 learns from teacher layer 2 (index 1).
    student = [torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.5], [0.5, 0.5]]]])]
    teacher = [torch.full((1, 2, 2, 2), 9.0),
               torch.tensor([[[[0.5, 0.5], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]]])]
    # Head 0: diffs^2 (.25, .25, 0, 0) -> .125; head 1: all .25 -> .25. Sum over heads.
    close(attention_mse(student, teacher), 0.375)
    # Mask [1, 0]: only the (0, 0) pair: head 0 -> .25, head 1 -> .25.
    close(attention_mse(student, teacher, torch.tensor([[1, 0]])), 0.5)


def test_attention_mse_head_mismatch_is_config_error():
    with pytest.raises(ConfigError, match="same number of attention heads.*student 2 vs teacher 4"):
        attention_mse([torch.zeros(1, 2, 3, 3)], [torch.zeros(1, 4, 3, 3)] * 2)


# --- DistilBERT objective (SMASH §4.4 setting 5) -----------------------------------------

def test_distilbert_loss_hand_computed():
    # Three positions: 0 masked (label 1), 1 not masked, 2 padding; V = H = 2, temperature 2.
    student_logits = torch.tensor([[[0.0, 0.0], [5.0, -5.0], [7.0, 1.0]]], requires_grad=True)
    teacher_logits = torch.tensor([[[0.0, 2 * ln(2)], [-5.0, 5.0], [1.0, 7.0]]])
    labels = torch.tensor([[1, -100, -100]])
    s_hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
    t_hidden = torch.tensor([[[1.0, 1.0], [0.0, 2.0], [0.0, 1.0]]])
    mask = torch.tensor([[1, 1, 0]])
    masked = labels != -100  # the recipe projects to the vocabulary at masked positions only
    total, parts = distilbert_loss(student_logits[masked], teacher_logits[masked], labels[masked], s_hidden,
                                   t_hidden, mask)
    # ce: at T=2, t = softmax([0, ln 2]) = [1/3, 2/3], s = [1/2, 1/2] -> ln 2, times T^2 = 4.
    ce = 4 * ln(2)
    mlm = ln(2)
    cos = ((1 - 1 / math.sqrt(2)) + 0.0) / 2
    close(parts["ce"], ce)
    close(parts["mlm"], mlm)
    close(parts["cos"], cos)
    close(total, 5 * ce + 2 * mlm + cos)
    assert total.requires_grad and not parts["ce"].requires_grad  # parts are for logging


def test_distilbert_loss_on_every_non_pad_token_hand_computed():
    """DistilBERT's default (its code's `restrict_ce_to_mask` off): L_ce on both real positions,
    L_mlm still on the masked one only (the other carries label -100)."""
    student_logits = torch.tensor([[0.0, 0.0], [5.0, -5.0]])  # positions 0 (masked, label 1) and 1
    teacher_logits = torch.tensor([[0.0, 2 * ln(2)], [-5.0, 5.0]])
    s_hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
    t_hidden = torch.tensor([[[1.0, 1.0], [0.0, 2.0], [0.0, 1.0]]])
    total, parts = distilbert_loss(student_logits, teacher_logits, torch.tensor([1, -100]), s_hidden, t_hidden,
                                   torch.tensor([[1, 1, 0]]))
    # position 0 as above: ln 2. Position 1 at T=2: t = softmax([-2.5, 2.5]) = [1, e^5] / (1 + e^5),
    # log s = log softmax([2.5, -2.5]) = [-ln(1 + e^-5), -ln(1 + e^5)]
    t0, t1 = 1 / (1 + math.exp(5)), math.exp(5) / (1 + math.exp(5))
    ce1 = t0 * ln(1 + math.exp(-5)) + t1 * ln(1 + math.exp(5))
    ce = 4 * (ln(2) + ce1) / 2
    close(parts["ce"], ce)
    close(parts["mlm"], ln(2))
    close(total, 5 * ce + 2 * ln(2) + (1 - 1 / math.sqrt(2)) / 2, tol=1e-5)  # ~58: float32 rounding


def test_distilbert_loss_without_masked_tokens_is_finite():
    x = torch.randn(0, 4, requires_grad=True)  # no masked position in the batch
    total, parts = distilbert_loss(x, torch.randn(0, 4), torch.zeros(0, dtype=torch.long),
                                   torch.randn(1, 2, 3), torch.randn(1, 2, 3), torch.ones(1, 2))
    assert parts["ce"].item() == 0 and parts["mlm"].item() == 0 and torch.isfinite(total)
    # every token scored, none masked: L_mlm is 0, not NaN
    total, parts = distilbert_loss(torch.randn(2, 4), torch.randn(2, 4), torch.tensor([-100, -100]),
                                   torch.randn(1, 2, 3), torch.randn(1, 2, 3), torch.ones(1, 2))
    assert parts["mlm"].item() == 0 and parts["ce"].item() > 0 and torch.isfinite(total)


def test_distilbert_loss_hidden_mismatch_is_config_error():
    with pytest.raises(ConfigError, match="same hidden size.*student 3 vs teacher 5"):
        distilbert_loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long),
                        torch.zeros(1, 2, 3), torch.zeros(1, 2, 5), torch.ones(1, 2))


# --- verbalizer CE (settings 6/7, PD eq. 1-2) --------------------------------------------

def test_verbalizer_ce_hand_computed():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    # Class 0 = word 0 (score 1); class 1 = mean of words 1 and 3 (score 3). Label 1.
    close(verbalizer_ce(logits, [[0], [1, 3]], torch.tensor([1])), ln(1 + math.exp(-2)))


def test_verbalizer_ce_errors():
    logits = torch.zeros(2, 5)
    with pytest.raises(PromptError, match=r"class 1 .*\[7\].*5 tokens"):
        verbalizer_ce(logits, [[0], [7]], torch.tensor([0, 1]))
    with pytest.raises(PromptError, match="class 0"):
        verbalizer_ce(logits, [[], [1]], torch.tensor([0, 1]))
    with pytest.raises(DataError, match="0..3.*2 classes"):
        verbalizer_ce(logits, [[0], [1]], torch.tensor([0, 3]))


# --- STS-B regression (SMASH §3.1) -------------------------------------------------------

def test_regression_kl_hand_computed_and_finite_at_bounds():
    # Row 0: p_gold = [1, 0] (y = l), p_pred = [1/4, 3/4] -> KL = ln 4. Row 1: equal -> 0.
    logits = torch.tensor([[0.0, ln(3)], [0.0, 0.0]])
    gold = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    close(regression_kl(logits, gold), ln(4) / 2)


def test_regression_kl_needs_two_words():
    with pytest.raises(ConfigError, match="exactly two words"):
        regression_kl(torch.zeros(2, 3), torch.zeros(2, 3))

