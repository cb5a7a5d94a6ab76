"""Layer probes (PD §2.3): built from the model's own MLM head, trained on a frozen model,
and comparable across tokenizers (distributions over the task's labels)."""
import random

import pytest
import torch

from rayapp.data.fewshot import Example
from rayapp.errors import ConfigError
from rayapp.losses import contrastive_probe_loss, kd_ce
from rayapp.modeling.models import LogitsAt, load_mlm, load_tokenizer
from rayapp.modeling.probes import LayerProbes, fit_probes, frozen_outputs, load_probes, mask_states, save_probes
from rayapp.tasks.prompts import PromptEncoder, class_logits
from rayapp.tasks.registry import get_task
from tiny import make_tiny_random_model

SST2 = get_task("SST-2")
WORDS = (["apple", "river", "stone", "table", "window", "garden"], ["music", "dance", "light", "summer", "ocean", "forest"])


def toy(n_per_class: int, seed: int) -> list[Example]:
    """Separable by vocabulary: label 0 sentences use one word set, label 1 the other."""
    rng = random.Random(seed)
    return [Example(" ".join(rng.choices(WORDS[label], k=6)), None, str(label))
            for label in (0, 1) for _ in range(n_per_class)]


def batches(encoder, examples, size=16):
    for i in range(0, len(examples), size):
        yield encoder.encode_batch([e.text_a for e in examples[i:i + size]])


def labels(examples):
    return torch.tensor([int(e.label) for e in examples])


@pytest.fixture(scope="module")
def bert3(tmp_path_factory) -> str:
    return str(make_tiny_random_model("wordpiece", tmp_path_factory.mktemp("bert3"), layers=3, dropout=0.0))


def test_probe_before_training_on_the_last_layer_is_the_models_own_eq1(bert3):
    mlm = load_mlm(bert3).eval()
    enc = PromptEncoder(load_tokenizer(bert3), SST2)
    probes = LayerProbes.from_mlm(mlm, enc.label_word_ids)
    assert probes.layers == [1, 2]  # 3 layers: every layer but the last
    batch = enc.encode_batch(["a fine day", "a bad night"])
    logits, out = LogitsAt(mlm)(batch["input_ids"], batch["attention_mask"], positions=batch["mask_pos"],
                                output_hidden_states=True)
    last = mask_states(out.hidden_states, batch["mask_pos"], [3])[:, 0]
    # the probe's head applied to the last layer gives the MLM's label-word logits exactly
    assert torch.allclose(probes.heads[0](last), class_logits(logits, enc.label_word_ids), atol=1e-5)
    # the vocabulary decoder is not copied: a probe holds H*H + H*(C+2) + C parameters
    h = mlm.config.hidden_size
    assert sum(p.numel() for p in probes.heads[0].parameters()) == h * h + h + 2 * h + h * 2 + 2


def test_probes_on_a_frozen_model_beat_chance_and_round_trip(bert3, tmp_path):
    mlm = load_mlm(bert3)
    model = LogitsAt(mlm).eval()
    enc = PromptEncoder(load_tokenizer(bert3), SST2)
    train, dev = toy(16, 0), toy(16, 1)
    before = {k: v.clone() for k, v in mlm.state_dict().items()}
    _, train_states = frozen_outputs(model, batches(enc, train), enc.label_word_ids, [1, 2])
    _, dev_states = frozen_outputs(model, batches(enc, dev), enc.label_word_ids, [1, 2])
    probes = LayerProbes.from_mlm(mlm, enc.label_word_ids)
    acc = fit_probes(probes, train_states, labels(train), dev_states, labels(dev))  # 200 steps, lr 1e-3
    print("toy dev accuracy per layer", acc)
    assert len(acc) == 2 and min(acc) >= 0.8  # chance is 0.5
    assert all(torch.equal(before[k], v) for k, v in mlm.state_dict().items())  # the model stayed frozen
    assert not any(p.requires_grad for p in probes.parameters())
    uri = save_probes(probes, str(tmp_path / "probes.pt"), {"dev_acc": acc})
    loaded, meta = load_probes(load_mlm(bert3), enc.label_word_ids, uri)
    assert meta["dev_acc"] == acc
    assert torch.equal(loaded(dev_states), probes(dev_states))


def test_cross_tokenizer_kd_and_probes_bert_teacher_roberta_student(tiny_bert, tiny_roberta):
    """The label-word KD and the probe losses compare distributions over the task's 2 labels, so a
    WordPiece teacher and a byte-level BPE student work together; gradients reach the student
    through its frozen probes."""
    t_tok, s_tok = load_tokenizer(tiny_bert), load_tokenizer(tiny_roberta)
    assert t_tok.get_vocab() != s_tok.get_vocab()
    t_enc, s_enc = PromptEncoder(t_tok, SST2), PromptEncoder(s_tok, SST2)
    teacher, student = LogitsAt(load_mlm(tiny_bert)).eval(), LogitsAt(load_mlm(tiny_roberta))
    texts = ["a fine day", "a bad night", "an ok film"]
    t_batch, s_batch = t_enc.encode_batch(texts), s_enc.encode_batch(texts)
    assert not torch.equal(t_batch["input_ids"][:, :4], s_batch["input_ids"][:, :4])
    t_scores, t_states = frozen_outputs(teacher, [t_batch], t_enc.label_word_ids, [1])
    t_probes = LayerProbes.from_mlm(teacher.mlm, t_enc.label_word_ids).eval().requires_grad_(False)
    s_probes = LayerProbes.from_mlm(student.mlm, s_enc.label_word_ids).eval().requires_grad_(False)

    logits, out = student(s_batch["input_ids"], s_batch["attention_mask"], positions=s_batch["mask_pos"],
                          output_hidden_states=True)
    s_scores = class_logits(logits, s_enc.label_word_ids)
    s_probs = s_probes.probs(mask_states(out.hidden_states, s_batch["mask_pos"], s_probes.layers))
    loss = kd_ce(s_scores, t_scores, alpha=10.0) + contrastive_probe_loss(
        t_probes.probs(t_states), s_probs, torch.tensor([0, 1, 1]))
    loss.backward()
    assert student.mlm.roberta.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in s_probes.parameters())


def test_model_without_mlm_head_or_with_one_layer_is_a_clear_error(tiny_bert, tmp_path):
    from transformers import AutoModel

    encoder_only = AutoModel.from_pretrained(tiny_bert)
    with pytest.raises(ConfigError, match="no BERT/RoBERTa-style MLM head"):
        LayerProbes.from_mlm(encoder_only, [[1], [2]], name="teacher")
    one_layer = make_tiny_random_model("wordpiece", tmp_path / "one", layers=1)
    with pytest.raises(ConfigError, match="needs at least 2"):
        LayerProbes.from_mlm(load_mlm(str(one_layer)), [[1], [2]])
