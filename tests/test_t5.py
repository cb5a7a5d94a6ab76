"""T5 students and teachers (SMASH §4.7, Table 4, App. A.3) on tiny random T5s: the prompt with
`<extra_id_0>` in the mask slot, LogitsAt's decoder read-out against the plain HF forward and in
the teacher cache's scorer, prompt FT, SMASH distillation T5 -> T5 and prompt FT (with KD) of the
distilled student on Ray, and the paths that need a masked LM refusing a T5 on the driver."""
from __future__ import annotations

import dataclasses
import math

import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from rayapp.errors import ConfigError, PromptError
from rayapp.modeling.models import LogitsAt, load_mlm, load_tokenizer
from rayapp.modeling.scorer import TeacherScorer, topk_summary
from rayapp.recipes.distill import DistillConfig
from rayapp.recipes.distill import run as distill
from rayapp.recipes.finetune import FinetuneConfig
from rayapp.recipes.finetune import run as finetune
from rayapp.recipes.pretrain import PretrainConfig, make_student
from rayapp.recipes.pretrain import run as pretrain
from rayapp.recipes.prompt_distill import PromptDistillConfig
from rayapp.recipes.prompt_distill import run as prompt_distill
from rayapp.ship.export import ExportConfig, classify
from rayapp.ship.export import run as export
from rayapp.tasks.prompts import PromptEncoder
from rayapp.tasks.registry import INTERMEDIATE_TASKS, get_task
from rayapp.train.engine import EngineConfig
from tiny import make_tiny_t5

PAIR = ("A man is sleeping.", "He sleeps in the park.")


@pytest.fixture(scope="module")
def t5(tmp_path_factory) -> str:
    """The teacher: 2 blocks each side."""
    return str(make_tiny_t5(tmp_path_factory.mktemp("t5")))


@pytest.fixture(scope="module")
def t5_student(tmp_path_factory) -> str:
    """Another random T5 of 1 block each side, with the teacher's tokenizer."""
    return str(make_tiny_t5(tmp_path_factory.mktemp("t5-student"), layers=1, seed=1))


def test_prompt_is_smash_span_template(t5):
    """`x1? <extra_id_0>, x2</s>`: no <s>, the sentinel in the mask slot, </s> from T5's own
    post-processor, the same ids T5's tokenizer gives the whole prompt string; label words are
    SentencePiece's `▁word` tokens."""
    tok = load_tokenizer(t5)
    enc = PromptEncoder(tok, get_task("MNLI"), 64)
    out = enc.encode(*PAIR)
    assert out["input_ids"] == tok.encode("A man is sleeping? <extra_id_0>, he sleeps in the park.")
    tokens = tok.convert_ids_to_tokens(out["input_ids"])
    assert tokens[out["mask_pos"]] == "<extra_id_0>" and tokens[-1] == "</s>" and "<s>" not in tokens
    assert enc.render(*PAIR) == "A man is sleeping?<extra_id_0> , he sleeps in the park.</s>"
    assert [tok.convert_ids_to_tokens(ids) for ids in enc.label_word_ids] == [["▁No"], ["▁Yes"], ["▁Maybe"]]
    for flag in ("multi_token", "lmbff_exact"):
        with pytest.raises(PromptError, match=f"task 'MNLI' sets {flag}, which T5 tokenizers"):
            PromptEncoder(tok, dataclasses.replace(get_task("MNLI"), **{flag: True}), 64)


def test_logits_at_the_mask_are_the_second_decoder_token(t5):
    """LogitsAt == the plain seq2seq forward with decoder input [start, <extra_id_0>], position 1;
    its outputs are the encoder's hidden states (indexed by the mask position)."""
    tok, model = load_tokenizer(t5), load_mlm(t5).eval()
    batch = PromptEncoder(tok, get_task("RTE"), 64).encode_batch(["A man sleeps.", "Two dogs run in a big field."],
                                                                  ["He is awake.", "Animals move."])
    with torch.no_grad():
        logits, out = LogitsAt(model)(batch["input_ids"], batch["attention_mask"], batch["mask_pos"],
                                      output_hidden_states=True)
        sentinel = tok.convert_tokens_to_ids("<extra_id_0>")
        decoder_input_ids = torch.tensor([[model.config.decoder_start_token_id, sentinel]] * 2)
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     decoder_input_ids=decoder_input_ids).logits[:, 1]
    assert logits.shape == (2, model.config.vocab_size) and torch.equal(logits, want)
    assert len(out.hidden_states) == model.config.num_layers + 1
    assert out.hidden_states[-1].shape[:2] == batch["input_ids"].shape
    with pytest.raises(ConfigError, match="seq2seq LM, but prompt tuning"):
        LogitsAt(model, torch.zeros(4, model.config.d_model))


def test_every_prompt_objective_takes_t5_student_and_teacher(t5, t5_student):
    """The objectives table as it is (no T5 case in it): each prompt/distillation objective
    gives a finite loss whose gradient reaches the student. Hidden states and attention maps
    (eq. 2-3) are the encoders'."""
    from types import SimpleNamespace

    from rayapp.recipes.objectives import OBJECTIVES, Context

    task = INTERMEDIATE_TASKS["smash-pairs"]
    encoder = PromptEncoder(load_tokenizer(t5), task, 64)
    batch = encoder.encode_batch(["A man sleeps.", "Two dogs run in a big field."], ["He is awake.", "Animals move."])
    batch["labels"] = torch.tensor([0, 2])
    teacher = LogitsAt(load_mlm(t5, attn_implementation="eager")).eval().requires_grad_(False)
    with torch.no_grad():
        batch.update(topk_summary(teacher(batch["input_ids"], batch["attention_mask"], batch["mask_pos"])[0], 8))
    batch["topk_indices"] = batch["topk_indices"].long()
    cfg = SimpleNamespace(kd_weight=1.0, kd_temperature=1.0, temperature=1.0, aux_weight=0.01, topk_mode="tail")
    ctx = Context(cfg, task, encoder.label_word_ids)
    for name in ("prompt", "prompt+kd", "ce", "ce-cache", "ce+hidden", "ce+attn", "rule"):
        student = LogitsAt(load_mlm(t5_student, attn_implementation="eager"))
        loss, _ = OBJECTIVES[name](student, teacher, batch, ctx)
        loss.backward()
        assert torch.isfinite(loss) and student.mlm.shared.weight.grad.abs().sum() > 0, name


def _loads_whole(model_dir: str):
    """The exported HF dir loads as a seq2seq LM with every weight (tied ones included)."""
    model, info = AutoModelForSeq2SeqLM.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model


def test_prompt_ft_distill_and_ft_of_the_student_on_ray(ray_cluster, t5, t5_student, pairs, tmp_path):
    """Prompt FT of a T5 on SST-2; SMASH distillation T5 -> T5 with the teacher online (eq. 1
    at the sentinel) on the pairs; prompt FT of the distilled student on MRPC with KD from
    the teacher (SMASH's "distill" row), all through the same recipes and objectives; the
    checkpoints are whole HF T5 dirs, and the last run exports."""
    engine = EngineConfig(num_workers=1)
    ft = dict(max_steps=4, eval_every=2, log_every=1, batch_size=32, lr=1e-3, max_length=64, engine=engine,
              output_dir=str(tmp_path / "ft"))  # batch 32: SST-2's whole train set each step
    rec = finetune(FinetuneConfig(task="SST-2", model=t5, **ft))
    losses = [loss for _, loss in rec["loss_curve"]]
    assert len(losses) == 4 and losses[-1] < losses[0] and 0.0 <= rec["test"] <= 1.0
    _loads_whole(rec["checkpoint"])

    smash = distill(DistillConfig(student=t5_student, teacher=t5, data=pairs, teacher_mode="online", batch_size=8,
                                  lr=5e-3, max_steps=3, checkpoint_every=3, log_every=1, max_length=64,
                                  output_dir=str(tmp_path / "distill"), engine=engine))
    assert smash["step"] == 3 and all(math.isfinite(loss) for _, loss in smash["loss_curve"])
    assert _loads_whole(smash["model"]).config.num_layers == 1

    rec = finetune(FinetuneConfig(task="MRPC", model=t5_student, init=smash["model"], teacher=t5,
                                  **{**ft, "max_steps": 2}))
    assert rec["metric"] == "f1" and 0.0 <= rec["test"] <= 1.0
    assert all(math.isfinite(loss) for _, loss in rec["loss_curve"])

    # `rayapp export`: the ONNX graph of LogitsAt's decoder read-out is checked against PyTorch
    done = export(ExportConfig(run=rec["record"], out=str(tmp_path / "export"), check_examples=8))
    assert done["onnx_max_abs_diff"] < 1e-4
    assert "AutoModelForSeq2SeqLM.from_pretrained" in (tmp_path / "export" / "README.md").read_text()
    assert classify(str(tmp_path / "export"), [PAIR[0]], [PAIR[1]])[0]["label"] in ("0", "1")


def test_teacher_cache_scorer_reads_t5_at_the_sentinel(t5):
    """The teacher cache's scorer (`TeacherScorer`: LogitsAt, its vocabulary head in float32)
    stores T5's top-k logits at the sentinel, those of the plain LogitsAt."""
    task = INTERMEDIATE_TASKS["smash-pairs"]
    texts = ["A man sleeps.", "Two dogs run in a big field.", "It rains."], ["He is awake.", "Animals move.", "Wet."]
    cols = TeacherScorer(t5, task, 64).topk(pa.table({"text_a": texts[0], "text_b": texts[1]}), k=8, batch_size=2)
    batch = PromptEncoder(load_tokenizer(t5), task, 64).encode_batch(*texts)
    with torch.no_grad():
        want = topk_summary(LogitsAt(load_mlm(t5).eval())(batch["input_ids"], batch["attention_mask"],
                                                          batch["mask_pos"])[0], 8)
    assert cols["topk_indices"].to_pylist() == want["topk_indices"].tolist()
    assert cols["lse"].to_pylist() == pytest.approx(want["lse"].tolist(), abs=1e-5)


def test_masked_lm_only_paths_refuse_t5_on_the_driver(t5, docs_corpus, tmp_path):
    out = str(tmp_path / "runs")
    with pytest.raises(ConfigError, match=r"is a seq2seq LM \(t5\), but rayapp pretrain trains BERT's masked-LM"):
        pretrain(PretrainConfig(model=t5, data=docs_corpus, output_dir=out))
    with pytest.raises(ConfigError, match=r"seq2seq LM \(t5\), but objective=distilbert \(setting 5\) trains "
                                          r"masked-LM terms.*: give a masked LM"):
        distill(DistillConfig(setting=5, student=t5, teacher=t5, data=docs_corpus, output_dir=out))
    with pytest.raises(ConfigError, match=r"seq2seq LM \(t5\), but prompt tuning \(PPT\) puts its soft prompt"):
        finetune(FinetuneConfig(method="prompt-tuning", model=t5, output_dir=out))
    with pytest.raises(ConfigError, match=r"seq2seq LM \(t5\), but Prompt-Distiller's layer probes read"):
        prompt_distill(PromptDistillConfig(model=t5, teacher=t5, output_dir=out))
    with pytest.raises(ConfigError, match=r"cannot cut a student from .*: it is a seq2seq LM \(t5\)"):
        make_student(t5, str(tmp_path / "cut"))


def test_table4_configs_plan_smash_section_4_7():
    from pathlib import Path

    from rayapp.config import load_config
    from rayapp.sweep import tune
    from rayapp.sweep.spec import SweepConfig

    configs = Path(__file__).parent.parent / "jobs" / "configs"
    smash = load_config(DistillConfig, configs / "distill-smash-t5.yaml")
    assert (smash.teacher, smash.student, smash.objective_name, smash.max_steps) == \
           ("t5-large", "t5-small", "ce", 200_000)
    sweep = load_config(SweepConfig, configs / "sweep-smash-table4.yaml")
    assert sweep.tasks == ["MNLI", "QQP", "MRPC"]
    assert [t.rows for t in sweep.tables] == [["t5-small", "smash", "t5-base"]]
    point = {"lr": 1e-5, "batch_size": 2}
    rows = {m: sweep.recipe_config({"method": m, "task": "MRPC", "seed": 13, "point": point}, "x", tune._unfilled)
            for m in sweep.method_names}
    assert {m: (r.model, r.init) for m, r in rows.items()} == {
        "t5-small": ("t5-small", None), "smash": ("t5-small", "s3://my-bucket/rayapp/runs/smash-t5/student"),
        "t5-base": ("t5-base", None)}
    assert all(len(sweep.method(m).points()) == 6 for m in sweep.method_names)
