"""MLM pre-training (how rayapp makes its real teacher) and students cut from teacher layers."""
import pytest
import torch

from rayapp.train.engine import EngineConfig
from rayapp.errors import ConfigError
from rayapp.modeling.models import load_mlm
from tiny import make_tiny_random_model
from rayapp.recipes.pretrain import PretrainConfig, make_student, run


def test_student_keeps_the_chosen_teacher_layers(tmp_path):
    teacher_dir = make_tiny_random_model("wordpiece", tmp_path / "t", layers=4, dropout=0.0)
    student = load_mlm(make_student(str(teacher_dir), str(tmp_path / "s")))  # default: every other layer
    teacher = load_mlm(str(teacher_dir))
    assert student.config.num_hidden_layers == 2
    for s_layer, t_layer in ((0, 0), (1, 2)):
        s_w = student.bert.encoder.layer[s_layer].attention.self.query.weight
        t_w = teacher.bert.encoder.layer[t_layer].attention.self.query.weight
        assert torch.equal(s_w, t_w)
    assert torch.equal(student.cls.predictions.decoder.weight, teacher.bert.embeddings.word_embeddings.weight)
    with pytest.raises(ConfigError, match=r"student layers \[0, 7\] must be indices of the teacher's 4 layers"):
        make_student(str(teacher_dir), str(tmp_path / "bad"), layers=[0, 7])


@pytest.mark.filterwarnings("error::UserWarning")  # e.g. Ray Data's about a Python filter per row
def test_mlm_pretraining_learns(ray_cluster, tiny_bert, tmp_path):
    data = tmp_path / "corpus.txt"  # a plain-text corpus: one document per blank-line-separated block
    data.write_text("\n\n".join(f"the cat sat on the mat number {i % 5} today ." for i in range(400)) + "\n")
    rec = run(PretrainConfig(model=tiny_bert, data=str(data), max_length=16, batch_size=16, lr=3e-3,
                             max_steps=30, eval_every=30, output_dir=str(tmp_path / "runs"),
                             engine=EngineConfig(num_workers=1)))
    (_, before), (_, after) = rec["masked_accuracy"]
    assert after > before + 0.2  # a tiny model learns this repetitive text's masked tokens
    assert load_mlm(rec["model"]).config.num_hidden_layers == 2


def test_pretrain_needs_data():
    with pytest.raises(ConfigError, match="data is required"):
        PretrainConfig()
