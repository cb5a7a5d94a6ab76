"""Prompt-Distiller against its paper: the KD form of eq. 3-4 (as printed, or Hinton's as an
option), LM-BFF's prompt rules as a config field, and the contrastive term (eq. 6-7) reaching
the student's gradient and the run record."""
import pytest
import torch

from rayapp.errors import ConfigError
from rayapp.tasks.registry import get_task
from test_prompt_distill import _pd_batch

SST2 = get_task("SST-2")


def _objective(tiny_roberta, **cfg):
    """(student, its encoder, a 2+2 batch, loss_fn(student) -> (loss, parts)) of the PD objective."""
    from rayapp.modeling.models import LogitsAt, load_mlm, load_tokenizer
    from rayapp.modeling.probes import LayerProbes
    from rayapp.recipes.objectives import OBJECTIVES, PDContext
    from rayapp.recipes.prompt_distill import PromptDistillConfig
    from rayapp.tasks.prompts import PromptEncoder

    encoder = PromptEncoder(load_tokenizer(tiny_roberta), SST2)
    torch.manual_seed(0)
    student = LogitsAt(load_mlm(tiny_roberta))
    probes = LayerProbes.from_mlm(student.mlm, encoder.label_word_ids).requires_grad_(False)
    ctx = PDContext(PromptDistillConfig(**cfg), SST2, encoder.label_word_ids, probes)
    batch = _pd_batch(encoder)
    return student, encoder, batch, lambda model: OBJECTIVES["prompt-distiller"](model, None, batch, ctx)


# --- eq. 3-4: kd_form ------------------------------------------------------------------------

def test_kd_form_is_a_config_field_and_reaches_the_kd_terms(tiny_roberta):
    from rayapp.config import load_config
    from rayapp.losses import kd_ce
    from rayapp.recipes.objectives import at_mask
    from rayapp.recipes.prompt_distill import PromptDistillConfig
    from rayapp.tasks.prompts import class_logits

    assert PromptDistillConfig().kd_form == "paper"  # eq. 3-4 as printed: alpha on the teacher only
    with pytest.raises(ConfigError, match=r"kd_form' must be one of \['paper', 'hinton'\]"):
        load_config(PromptDistillConfig, None, ["kd_form=both"])
    kd = {}
    for form in ("paper", "hinton"):
        student, encoder, batch, loss_fn = _objective(tiny_roberta, kd_form=form)
        student.eval()
        with torch.no_grad():
            parts = loss_fn(student)[1]
            scores = class_logits(at_mask(student, batch)[0], encoder.label_word_ids)
        kd[form] = parts["kd_x"].item()
        # eq. 3 on X's rows (T's scores) and eq. 4 on X~'s (T''s), both in the chosen form
        assert kd[form] == pytest.approx(kd_ce(scores[:2], batch["t_scores"], 10.0, form).item(), rel=1e-5)
        assert parts["kd_xu"].item() == pytest.approx(kd_ce(scores[2:], batch["u_t_scores"], 10.0, form).item(),
                                                      rel=1e-5)
    assert abs(kd["paper"] - kd["hinton"]) > 1e-3


# --- §3.1 prompts: lmbff_exact -----------------------------------------------------------------

def test_lmbff_exact_is_a_config_field_for_the_student_and_the_tuned_teacher(monkeypatch, tmp_path):
    from rayapp.config import load_config
    from rayapp.data.fewshot import load_lmbff
    from rayapp.recipes import finetune
    from rayapp.recipes.prompt_distill import PromptDistillConfig, tuned_teacher

    assert not PromptDistillConfig().resolve_task().lmbff_exact
    cfg = load_config(PromptDistillConfig, None, ["lmbff_exact=true", f"output_dir={tmp_path}"])
    assert cfg.resolve_task().lmbff_exact  # the task the recipe encodes X, X~, dev and test with
    seen = {}
    monkeypatch.setattr(finetune, "run", lambda fcfg, split, callbacks: seen.setdefault("cfg", fcfg) and {"checkpoint": "T"})
    assert tuned_teacher(cfg, load_lmbff(None, SST2, k=16, seed=13)) == "T"
    assert seen["cfg"].lmbff_exact and seen["cfg"].resolve_task().lmbff_exact  # T is tuned on the same prompts


# --- eq. 6-7: the contrastive term reaches the gradient and the record --------------------------

def test_one_step_with_lambda2_changes_the_student(tiny_roberta):
    """One SGD step of eq. 8 with lambda2 = 0.2 vs 0 (everything else equal) moves the
    student's encoder differently: L_CPD reaches the gradient through the frozen probes."""
    after = {}
    for lambda2 in (0.0, 0.2):
        student, _, _, loss_fn = _objective(tiny_roberta, lambda2=lambda2)
        student.eval()  # no dropout: the two runs differ by L_CPD only
        loss, parts = loss_fn(student)
        assert parts["cpd_x"].item() != 0 and parts["cpd_xu"].item() != 0  # logged whatever lambda2
        loss.backward()
        with torch.no_grad():
            for p in student.parameters():
                if p.grad is not None:
                    p.sub_(1.0 * p.grad)
        after[lambda2] = student.mlm.roberta.encoder.layer[0].output.dense.weight.detach().clone()
    assert (after[0.2] - after[0.0]).abs().max() > 1e-6


def test_pd_record_holds_each_terms_size():
    from rayapp.recipes.prompt_distill import _summary

    terms = lambda cpd: {"mlm": 0.7, "kd_x": 0.8, "kd_xu": 0.75, "cpd_x": cpd, "cpd_xu": -0.9}  # noqa: E731
    record = {"metrics": {"test": 0.6}, "evals": [[0, {"dev": 0.5}], [10, {"dev": 0.6}]], "best": 0.6,
              "parts_curve": [[10, terms(-0.6)], [20, terms(-1.0)]]}
    summary = _summary(record)
    assert summary["loss_terms"] == {"mlm": 0.7, "kd_x": 0.8, "kd_xu": 0.75, "cpd_x": -0.8, "cpd_xu": -0.9}
