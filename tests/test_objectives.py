"""The objectives table: every entry gives a finite loss and a gradient on a real batch, and
temperatures are applied exactly once."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rayapp.modeling.batches import MLMBatcher, cache_batch, prompt_batch
from rayapp.modeling.models import LogitsAt, load_classifier, load_mlm, load_tokenizer
from rayapp.recipes.objectives import OBJECTIVES, Context, bind
from rayapp.tasks.prompts import PromptEncoder
from rayapp.tasks.registry import INTERMEDIATE_TASKS, get_task

ROWS = {"text_a": ["A cat sat on the mat.", "Rain fell all day.", "He won the race.", "The film was dull."],
        "text_b": ["The mat was red.", "The streets were wet.", "Nobody came.", "I left early."],
        "label": [0, 1, 2, 1]}
CFG = SimpleNamespace(temperature=1.0, aux_weight=0.01, topk_mode="tail", kd_weight=0.5, kd_temperature=2.0,
                      distilbert_ce="tokens", soft_label_temperature=2.0)
TWO_CLASS = {"prompt", "prompt+kd", "classifier", "prompt-soft", "classifier-soft"}  # objectives tested on RTE


def _batch(name, tok, task):
    if name in ("distilbert", "mlm"):
        return MLMBatcher(tok, 32, 0.5, seed=0)({"text": ROWS["text_a"]})
    enc = PromptEncoder(tok, task, 48)
    batch = prompt_batch(ROWS, enc)
    if name == "ce-cache":
        logits = torch.randn(4, len(tok))
        values, indices = logits.topk(8, dim=-1)
        rows = {"input_ids": [ids[ids != tok.pad_token_id].tolist() for ids in batch["input_ids"]],
                "mask_pos": batch["mask_pos"].numpy(), "topk_values": values.numpy(),
                "topk_indices": indices.numpy(), "lse": logits.logsumexp(-1).numpy()}
        return cache_batch(rows, tok.pad_token_id)
    if name.startswith("classifier"):
        batch = dict(tok(ROWS["text_a"], ROWS["text_b"], padding=True, return_tensors="pt"))
    if name.endswith("-soft"):  # iPET's final classifier: the ensemble's logits, no labels
        batch["soft_logits"] = torch.tensor([[2.0, -1.0], [0.5, 0.5], [-3.0, 1.0], [1.0, 0.0]])
    elif name in TWO_CLASS:
        batch["labels"] = torch.tensor([0, 1, 1, 0])
    return batch


# Prompt-Distiller's objectives read batches its recipe builds (teacher scores, probe banks, a
# second tokenisation): tests/test_prompt_distill.py checks each of them on such batches.
PD_OBJECTIVES = {"prompt-distiller", "vanilla-kd", "bert-pkd", "tinybert"}


def test_prompt_distiller_objectives_are_the_ones_tested_with_their_batches():
    import test_prompt_distill as pd

    tested = {"prompt-distiller"} | {m for m, _ in pd.FT_BASELINES}
    assert PD_OBJECTIVES == tested and PD_OBJECTIVES <= set(OBJECTIVES)


@pytest.mark.parametrize("name", sorted(set(OBJECTIVES) - PD_OBJECTIVES))
def test_every_objective_gives_a_gradient(name, tiny_roberta):
    tok = load_tokenizer(tiny_roberta)
    task = get_task("RTE") if name in TWO_CLASS else INTERMEDIATE_TASKS["smash-pairs"]
    eager = {"attn_implementation": "eager"}
    student = (load_classifier(tiny_roberta, 2) if name.startswith("classifier")
               else LogitsAt(load_mlm(tiny_roberta, **eager)))
    teacher = LogitsAt(load_mlm(tiny_roberta, **eager)).eval()
    enc = PromptEncoder(tok, task, 48)
    loss, parts = bind(name, teacher, Context(CFG, task, enc.label_word_ids))(student, _batch(name, tok, task))
    assert torch.isfinite(loss) and loss > 0 and all(torch.isfinite(torch.as_tensor(v)) for v in parts.values())
    loss.backward()
    grads = [p.grad.abs().sum() for p in student.parameters() if p.grad is not None]
    assert grads and sum(grads) > 0


def test_online_teacher_temperature_is_applied_once(tiny_roberta):
    """Eq. 1 at T=2: -sum softmax(t/2) log softmax(s/2) x 4, never softmax(t/4)."""
    tok = load_tokenizer(tiny_roberta)
    task = INTERMEDIATE_TASKS["smash-pairs"]
    batch = prompt_batch(ROWS, PromptEncoder(tok, task, 48))
    torch.manual_seed(0)
    student, teacher = LogitsAt(load_mlm(tiny_roberta)).eval(), LogitsAt(load_mlm(tiny_roberta)).eval()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
        cfg = SimpleNamespace(**{**vars(CFG), "temperature": 2.0})
        loss, _ = OBJECTIVES["ce"](student, teacher, batch, Context(cfg, task))
        s = student(batch["input_ids"], batch["attention_mask"], positions=batch["mask_pos"])[0]
        t = teacher(batch["input_ids"], batch["attention_mask"], positions=batch["mask_pos"])[0]
        expected = -(torch.softmax(t / 2, -1) * torch.log_softmax(s / 2, -1)).sum(-1).mean() * 4
        twice = -(torch.softmax(t / 4, -1) * torch.log_softmax(s / 2, -1)).sum(-1).mean() * 4
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(loss.item() - twice.item()) > 1e-4


def test_distilbert_ce_on_every_non_pad_token_by_default(tiny_roberta):
    """Setting 5's L_ce: every non-pad token (DistilBERT's default, `distilbert_ce=tokens`), or
    the masked tokens only (`distilbert_ce=masked`); L_mlm and L_cos do not change with it."""
    from rayapp.losses import soft_ce
    from rayapp.recipes.distill import DistillConfig

    assert DistillConfig(data="x", setting=5).distilbert_ce == "tokens"
    tok = load_tokenizer(tiny_roberta)
    batch = _batch("distilbert", tok, None)
    torch.manual_seed(0)
    student, teacher = LogitsAt(load_mlm(tiny_roberta)).eval(), LogitsAt(load_mlm(tiny_roberta)).eval()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
        parts = {mode: OBJECTIVES["distilbert"](student, teacher, batch, Context(
            SimpleNamespace(**{**vars(CFG), "temperature": 2.0, "distilbert_ce": mode}), None))[1]
            for mode in ("tokens", "masked")}
        real, masked = batch["attention_mask"].bool(), batch["mlm_labels"] != -100
        assert masked.sum() < real.sum()
        for mode, where in (("tokens", real), ("masked", masked)):
            s = student(batch["input_ids"], batch["attention_mask"], positions=where)[0]
            t = teacher(batch["input_ids"], batch["attention_mask"], positions=where)[0]
            assert parts[mode]["ce"].item() == pytest.approx(soft_ce(s, t, temperature=2.0).item(), rel=1e-5)
    assert parts["tokens"]["mlm"].item() == pytest.approx(parts["masked"]["mlm"].item(), rel=1e-5)
    assert parts["tokens"]["cos"].item() == pytest.approx(parts["masked"]["cos"].item(), rel=1e-5)
    assert abs(parts["tokens"]["ce"].item() - parts["masked"]["ce"].item()) > 1e-3
