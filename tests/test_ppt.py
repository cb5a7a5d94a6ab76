"""PPT (Gu et al. 2021) as SMASH's "Vanilla PPT": soft prompts in `LogitsAt`, their
pre-training on SMASH's intermediate data with the model frozen (DeepSpeed ZeRO-2, bf16, 2
workers), prompt tuning from them, resume, export."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM

from rayapp.errors import ConfigError
from rayapp.modeling.models import (SOFT_PROMPT_FILE, LogitsAt, initial_soft_prompt, load_mlm, load_soft_prompt,
                                    load_tokenizer, prompt_tuned)
from rayapp.recipes.finetune import FinetuneConfig
from rayapp.recipes.finetune import run as finetune
from rayapp.recipes.ppt import PPTConfig
from rayapp.recipes.ppt import run as ppt
from rayapp.train.engine import Engine, EngineConfig
from rayapp.train.worker import LocalWorker, running_on


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_roberta"])
def test_a_soft_prompt_reads_like_tokens_inserted_after_the_first(model, request):
    """A soft prompt equal to the input embeddings of tokens t1..tn gives, at the mask, the
    logits of the plain model reading those tokens after <s>/[CLS]: same place, attention mask
    and shifted positions (one per row, and a boolean [B, T] selection), padded rows too."""
    path = request.getfixturevalue(model)
    tok, mlm = load_tokenizer(path), load_mlm(path).eval()
    rows = [tok(f"a short line {tok.mask_token} .")["input_ids"],
            tok(f"a much longer line of text with its {tok.mask_token} near the end .")["input_ids"]]
    inserted = tok("some inserted words", add_special_tokens=False)["input_ids"]
    n, width = len(inserted), max(len(r) for r in rows)

    def padded(seqs):
        ids = torch.tensor([s + [tok.pad_token_id] * (width + n - len(s)) for s in seqs])
        return ids, (torch.arange(ids.shape[1]) < torch.tensor([len(s) for s in seqs])[:, None]).long()

    ids, mask = padded(rows)
    ids_in, mask_in = padded([r[:1] + inserted + r[1:] for r in rows])
    pos = torch.tensor([r.index(tok.mask_token_id) for r in rows])
    soft = LogitsAt(mlm, mlm.get_input_embeddings().weight[inserted])
    with torch.no_grad():
        got, out = soft(ids, mask, pos)
        want, _ = LogitsAt(mlm)(ids_in, mask_in, pos + n)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
        assert out.last_hidden_state.shape[1] == ids.shape[1] + n
        chosen = ids == tok.mask_token_id
        got_b, _ = soft(ids, mask, chosen)
        assert torch.allclose(got_b, want, atol=1e-5)


def test_a_resumed_prompt_tuning_engine_continues_exactly(tiny_bert, tmp_path):
    """Only the soft prompt trains (the model's weights stay as loaded); a checkpoint holds it
    beside the HF weights, and an engine restored from it steps on as the saved one does."""
    tok = load_tokenizer(tiny_bert)
    ids = torch.tensor([tok(f"good movie , it was {tok.mask_token} .")["input_ids"]] * 2)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mask_pos": (ids == tok.mask_token_id).long().argmax(-1)}
    loss = lambda m, b: (m(b["input_ids"], b["attention_mask"], b["mask_pos"])[0][:, 7].mean(), {})  # noqa: E731

    def engine():
        model = prompt_tuned(load_mlm(tiny_bert), tok, 3, tiny_bert)
        return Engine(model, EngineConfig(), lr=0.1, weight_decay=0.01, warmup_steps=0, total_steps=10,
                      micro_batch=2, grad_accum=1)

    with running_on(LocalWorker(str(tmp_path / "run"), keep=1, use_gpu=False)):
        first = engine()
        before = {k: v.clone() for k, v in first.hf_model.state_dict().items()}
        start = first.soft_prompt.detach().clone()
        for _ in range(2):
            first.train_step([batch], loss)
        assert not torch.equal(first.soft_prompt, start)
        assert all(torch.equal(v, before[k]) for k, v in first.hf_model.state_dict().items())
        first.save(tmp_path / "ckpt", {"step": 2}, tokenizer=tok)
        saved = load_file(tmp_path / "ckpt" / "model" / SOFT_PROMPT_FILE)["soft_prompt"]
        assert torch.equal(saved, first.soft_prompt.detach())
        second = engine()
        assert second.load(tmp_path / "ckpt") == {"step": 2}
        assert torch.equal(second.soft_prompt, first.soft_prompt)
        a, b = first.train_step([batch], loss), second.train_step([batch], loss)
        assert a == b and torch.equal(first.soft_prompt, second.soft_prompt)


def test_ppt_pretrains_a_prompt_on_pairs_then_prompt_tuning_starts_from_it(ppt_run, tiny_roberta, tmp_path):
    """PPT pre-training on the SMASH pairs (No/Maybe/Yes) with DeepSpeed ZeRO-2 in bf16 on 2
    workers (`ppt_run`) trains the soft prompt only and exports the frozen model's weights
    exactly (fp32, not the bf16 module cast up); `finetune method=prompt-tuning init=` starts
    from that prompt, trains it alone, and its export classifies through it (ONNX checked
    against PyTorch)."""
    from rayapp.ship.export import ExportConfig, classify
    from rayapp.ship.export import run as export

    rec = ppt_run
    assert rec["recipe"] == "ppt" and rec["objective"] == "rule" and rec["step"] == 3
    assert rec["name"].startswith("ppt-rule")
    original = AutoModelForMaskedLM.from_pretrained(tiny_roberta).state_dict()
    exported = AutoModelForMaskedLM.from_pretrained(rec["model"]).state_dict()
    assert all(torch.equal(exported[k], v) for k, v in original.items())
    prompt = load_soft_prompt(rec["model"])
    fresh = initial_soft_prompt(load_mlm(tiny_roberta), load_tokenizer(tiny_roberta), 4)
    assert prompt.shape == fresh.shape and not torch.allclose(prompt, fresh)
    # `keep_steps`: the 2 ranks' export of step 1 kept beside the rotating checkpoints, with its prompt
    kept_at_1 = str(Path(rec["model"]).parent / "models" / "step-1")
    assert all(torch.equal(AutoModelForMaskedLM.from_pretrained(kept_at_1).state_dict()[k], v)
               for k, v in original.items())
    at_1 = load_soft_prompt(kept_at_1)
    assert not torch.allclose(at_1, prompt) and not torch.allclose(at_1, fresh)
    # the pre-trained prompt sets the length (4), whatever prompt_tokens says
    assert torch.equal(prompt_tuned(load_mlm(rec["model"]), load_tokenizer(tiny_roberta), 100,
                                    rec["model"]).soft_prompt.detach(), prompt)

    ft = finetune(FinetuneConfig(task="SST-2", model=tiny_roberta, init=rec["model"], method="prompt-tuning",
                                 max_steps=4, eval_every=2, batch_size=8, lr=0.05, max_length=48,
                                 output_dir=str(tmp_path / "ft"), engine=EngineConfig(num_workers=1)))
    assert ft["method"] == "prompt-tuning" and ft["best_step"] in (2, 4) and 0.0 <= ft["test"] <= 1.0
    tuned = load_soft_prompt(ft["checkpoint"])
    assert tuned.shape == prompt.shape and not torch.allclose(tuned, prompt)
    kept = AutoModelForMaskedLM.from_pretrained(ft["checkpoint"]).state_dict()
    assert all(torch.equal(kept[k], v) for k, v in original.items())

    out = str(tmp_path / "export")
    export(ExportConfig(run=ft["record"], out=out, check_examples=16))
    texts = ["a gripping , beautiful film .", "dull and far too long ."]
    probs = lambda: torch.tensor([list(r["probs"].values()) for r in classify(out, texts)])  # noqa: E731
    with_prompt = probs()
    (tmp_path / "export" / SOFT_PROMPT_FILE).unlink()
    assert not torch.allclose(with_prompt, probs())


def test_ppt_config_errors(pairs, tiny_roberta, tmp_path):
    with pytest.raises(ConfigError, match="PPT has none"):
        PPTConfig(student=tiny_roberta, data=pairs, setting=6)
    with pytest.raises(ConfigError, match="prompt_tokens must be > 0"):
        PPTConfig(student=tiny_roberta, data=pairs, prompt_tokens=0)
    assert PPTConfig(student=tiny_roberta, data=pairs, task="smash-sentiment").objective == "hard-label"
    # the prompt's tokens count against the model's positions (512 here), before Ray starts
    with pytest.raises(ConfigError, match=r"max_length=500 plus 100 soft prompt tokens does not fit model"):
        finetune(FinetuneConfig(task="SST-2", model=tiny_roberta, method="prompt-tuning", max_length=500,
                                output_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"max_length=480 plus 40 soft prompt tokens"):
        ppt(PPTConfig(student=tiny_roberta, data=pairs, prompt_tokens=40, max_length=480, output_dir=str(tmp_path)))
