"""Prompt-Distiller losses (PD eq. 1-8) against numbers worked out by hand: the arithmetic is
written out below with math-module scalars, never by re-running the formula in torch."""
import math

import pytest
import torch

from rayapp.errors import ConfigError
from rayapp.losses import (PD_PARTS, contrastive_probe_loss, kd_ce, label_word_probs, probe_match,
                           prompt_distiller_loss, verbalizer_ce)

ln, e = math.log, math.exp


def close(x, expected, tol=1e-6):
    assert x.dtype == torch.float32 and x.dim() == 0
    assert x.item() == pytest.approx(expected, abs=tol)


# --- eq. 1-4 ---------------------------------------------------------------------------------

def test_eq1_softmax_over_one_models_label_words():
    # scores [0, ln 3]: exp -> [1, 3], sum 4 -> [1/4, 3/4]; alpha = 2 on [0, 2 ln 3] gives the same
    p = label_word_probs(torch.tensor([[0.0, ln(3)], [0.0, 2 * ln(3)]]))
    assert p[0].tolist() == pytest.approx([0.25, 0.75])
    assert label_word_probs(torch.tensor([0.0, 2 * ln(3)]), alpha=2.0).tolist() == pytest.approx([0.25, 0.75])
    # eq. 1 with the typo fixed: numerator and denominator from one model, so every row sums to 1
    assert p.sum(-1).tolist() == pytest.approx([1.0, 1.0])


def test_eq2_mlm_ce_on_label_words():
    # vocabulary of 4, label words: class 0 -> id 1, class 1 -> id 3; other ids are ignored
    mask_logits = torch.tensor([[5.0, 0.0, 7.0, ln(3)],   # scores [0, ln 3] -> p = [1/4, 3/4], gold 1
                                [0.0, ln(2), 9.0, 0.0]])  # scores [ln 2, 0] -> p = [2/3, 1/3], gold 0
    loss = verbalizer_ce(mask_logits, [[1], [3]], torch.tensor([1, 0]))
    close(loss, (-ln(3 / 4) - ln(2 / 3)) / 2)


def test_eq3_4_alpha_softens_the_teacher_only():
    # alpha = 10: teacher [0, 10 ln 3] / 10 -> [1/4, 3/4]; student untempered [0, ln 2] -> [1/3, 2/3]
    student = torch.tensor([[0.0, ln(2)]])
    teacher = torch.tensor([[0.0, 10 * ln(3)]])
    close(kd_ce(student, teacher, alpha=10.0), -(0.25 * ln(1 / 3) + 0.75 * ln(2 / 3)))


def test_eq3_4_hinton_form_softens_both_and_scales_by_alpha_squared():
    # the option kd_form=hinton: teacher as above [1/4, 3/4]; student [0, ln 2] / 10 ->
    # [1, 2^0.1] / (1 + 2^0.1); the CE times alpha^2 = 100
    student = torch.tensor([[0.0, ln(2)]])
    teacher = torch.tensor([[0.0, 10 * ln(3)]])
    s0, s1 = 1 / (1 + 2 ** 0.1), 2 ** 0.1 / (1 + 2 ** 0.1)
    hinton = kd_ce(student, teacher, alpha=10.0, form="hinton")
    close(hinton, -100 * (0.25 * ln(s0) + 0.75 * ln(s1)), tol=1e-4)
    # the paper form is the default; at alpha = 1 the two forms are one and the same CE
    assert kd_ce(student, teacher, alpha=10.0).item() == pytest.approx(-(0.25 * ln(1 / 3) + 0.75 * ln(2 / 3)))
    assert kd_ce(student, teacher, 1.0, "hinton").item() == pytest.approx(kd_ce(student, teacher, 1.0).item())
    with pytest.raises(ConfigError, match=r"form must be one of \('paper', 'hinton'\)"):
        kd_ce(student, teacher, form="both")
    with pytest.raises(ConfigError, match="alpha must be > 0"):
        kd_ce(student, teacher, alpha=0.0, form="hinton")


def test_kd_needs_positive_alpha_and_same_classes():
    with pytest.raises(ConfigError, match="alpha must be > 0"):
        kd_ce(torch.zeros(1, 2), torch.zeros(1, 2), alpha=0.0)
    with pytest.raises(ConfigError, match="same task's C labels"):
        kd_ce(torch.zeros(1, 2), torch.zeros(1, 3))


# --- eq. 5-8: 2 teacher probes x 2 student probes, a batch of 3 with one negative -------------
# Labels [0, 0, 1]: x2 is the only example of label 1, the negative of x0 and of x1.
T = torch.tensor([[[1.0, 0.0], [1.0, 0.0]],   # teacher probes j = 1, 2 on x0
                  [[1.0, 0.0], [0.0, 1.0]],   # on x1
                  [[0.0, 1.0], [0.0, 1.0]]])  # on x2
S = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],   # student probes k = 1, 2 on x0
                  [[1.0, 0.0], [1.0, 0.0]],   # on x1
                  [[0.0, 1.0], [0.5, 0.5]]])  # on x2
LABELS = torch.tensor([0, 0, 1])
# f(T(a), S(b)) = exp((sum of the 4 dot products p_T^(j)(a) . p_S^(k)(b)) / (2 * 2)):
F00 = e((1 + 0 + 1 + 0) / 4)    # T0 x S0: [1,0].[1,0], [1,0].[0,1], twice -> e^0.5
F11 = e((1 + 1 + 0 + 0) / 4)    # T1 x S1 -> e^0.5
F22 = e((1 + .5 + 1 + .5) / 4)  # T2 x S2 -> e^0.75
F2_0 = e((0 + 1 + 0 + 1) / 4)   # teacher on x2, student on x0 -> e^0.5
F2_1 = e((0 + 0 + 0 + 0) / 4)   # teacher on x2, student on x1 -> e^0
F0_2 = e((0 + .5 + 0 + .5) / 4)  # teacher on x0, student on x2 -> e^0.25
F1_2 = e((0 + .5 + 1 + .5) / 4)  # teacher on x1, student on x2 -> e^0.5
CPD = -(F00 / F2_0 + F11 / F2_1 + F22 / (F0_2 + F1_2)) / 3


def test_eq5_matching_score():
    close(probe_match(T[0], S[0]), F00)
    close(probe_match(T[2], S[1]), F2_1)
    pairs = probe_match(T[None], S[:, None])  # [student example, teacher example]
    assert pairs[0, 2].item() == pytest.approx(F2_0) and pairs[2, 1].item() == pytest.approx(F1_2)


def test_eq6_contrastive_loss_hand_computed():
    close(contrastive_probe_loss(T, S, LABELS), CPD)


def test_eq7_bank_supplies_negatives_only_when_the_batch_has_none():
    # Pseudo-labels [0, 0]: no negative in the batch; the bank holds the teacher's probes of x2
    # (label 1, a negative) and of x1 (label 0, not a negative).
    loss = contrastive_probe_loss(T[:2], S[:2], torch.tensor([0, 0]), T[[2, 1]], torch.tensor([1, 0]))
    close(loss, -(F00 / F2_0 + F11 / F2_1) / 2)
    # with a negative in the batch the bank is not used: a label-0 bank row would add F0_2 to x2's
    # denominator and a label-1 one to x0's, so the value stays eq. 6's
    close(contrastive_probe_loss(T, S, LABELS, T[[0, 2]], torch.tensor([0, 1])), CPD)


def test_cpd_without_any_negative_is_zero_with_grad():
    s = torch.full((2, 2, 2), 0.5, requires_grad=True)
    loss = contrastive_probe_loss(torch.full((2, 3, 2), 0.5), s, torch.tensor([1, 1]))
    assert loss.item() == 0
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_cpd_gradient_reaches_the_student_probes_only_through_its_view():
    s = S.clone().requires_grad_(True)
    t = T.clone().requires_grad_(True)
    contrastive_probe_loss(t, s, LABELS).backward()
    assert s.grad.abs().sum() > 0


def test_cpd_shape_errors():
    with pytest.raises(ConfigError, match="same B and C"):
        contrastive_probe_loss(torch.zeros(2, 3, 2), torch.zeros(2, 1, 3), torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="bank"):
        contrastive_probe_loss(T, S, LABELS, T[:1], None)


def test_eq8_total_on_the_batch_of_three():
    # X: the batch of 3 above. Student label-word scores [0, ln 2] for every example -> p_S = [1/3, 2/3];
    # T's scores [0, 10 ln 3] -> p_T at alpha=10 = [1/4, 3/4]; T' on X~ (same 3 texts, pseudo-labels
    # [0, 1, 1]) scores [10 ln 3, 0] -> [3/4, 1/4].
    student = torch.tensor([[0.0, ln(2)]] * 3)
    mlm = verbalizer_ce(torch.tensor([[0.0, ln(2)]] * 3), [[0], [1]], LABELS)
    l_mlm = -(ln(1 / 3) + ln(1 / 3) + ln(2 / 3)) / 3
    kd_x = kd_ce(student, torch.tensor([[0.0, 10 * ln(3)]] * 3), alpha=10.0)
    l_kd_x = -(0.25 * ln(1 / 3) + 0.75 * ln(2 / 3))
    kd_xu = kd_ce(student, torch.tensor([[10 * ln(3), 0.0]] * 3), alpha=10.0)
    l_kd_xu = -(0.75 * ln(1 / 3) + 0.25 * ln(2 / 3))
    cpd_xu = contrastive_probe_loss(T, S, torch.tensor([0, 1, 1]))
    # pseudo-labels [0, 1, 1]: N(x0) = {x1, x2}, N(x1) = N(x2) = {x0}
    F1_0 = e((1 + 0 + 0 + 1) / 4)    # teacher on x1, student on x0 -> e^0.5
    F0_1 = e((1 + 1 + 1 + 1) / 4)    # teacher on x0, student on x1 -> e^1
    l_cpd_xu = -(F00 / (F1_0 + F2_0) + F11 / F0_1 + F22 / F0_2) / 3
    close(cpd_xu, l_cpd_xu)
    total, parts = prompt_distiller_loss(mlm, kd_x, kd_xu, contrastive_probe_loss(T, S, LABELS), cpd_xu)
    close(total, l_mlm + 0.2 * (l_kd_x + l_kd_xu) + 0.2 * (CPD + l_cpd_xu), tol=1e-5)
    assert set(parts) == set(PD_PARTS)
    assert parts["cpd_x"].item() == pytest.approx(CPD) and parts["mlm"].item() == pytest.approx(l_mlm)


def test_eq8_absent_terms_are_exactly_zero_and_not_in_the_total():
    one, two = torch.tensor(1.0), torch.tensor(2.0)
    total, parts = prompt_distiller_loss(one, kd_x=two, lambda1=0.5)  # Prompt-KD: mlm + lambda1 kd_x
    close(total, 1 + 0.5 * 2)
    assert [parts[k].item() for k in PD_PARTS] == [1.0, 2.0, 0.0, 0.0, 0.0]


def test_eq8_lambdas_must_be_non_negative():
    with pytest.raises(ConfigError, match="lambda1=-0.1"):
        prompt_distiller_loss(torch.tensor(1.0), lambda1=-0.1)
