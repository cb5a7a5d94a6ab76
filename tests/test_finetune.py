"""Prompt-based fine-tuning through Ray Train on tiny models (2 CPU workers)."""
from __future__ import annotations

import math

import pytest
from transformers import AutoModelForMaskedLM

from rayapp.train.records import read_records
from rayapp.train.engine import EngineConfig
from rayapp.errors import ConfigError
from rayapp.recipes.finetune import FinetuneConfig, run


def _cfg(model, tmp_path, **kw) -> FinetuneConfig:
    engine = kw.pop("engine", EngineConfig(num_workers=2))
    base = dict(task="SST-2", model=model, max_steps=4, eval_every=2, log_every=1, batch_size=32, lr=2e-3,
                output_dir=str(tmp_path / "runs"), engine=engine)
    return FinetuneConfig(**{**base, **kw})


def test_prompt_finetune_on_two_workers(ray_cluster, tiny_bert, tmp_path):
    """Global batch 8: 2 workers x 4 learn, and give the loss curve of 1 worker x 8 (dropout is
    0); the run leaves one record and a loadable checkpoint."""
    recs = [run(_cfg(tiny_bert, tmp_path / str(n), batch_size=8, engine=EngineConfig(num_workers=n))) for n in (1, 2)]
    curves = [[loss for _, loss in r["loss_curve"]] for r in recs]
    assert curves[0] == pytest.approx(curves[1], abs=1e-4)
    rec = recs[1]
    losses = curves[1]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert [s for s, _ in rec["dev_curve"]] == [0, 2, 4]
    assert rec["best_step"] in (2, 4) and 0.0 <= rec["test"] <= 1.0
    # one record file per run, with config and split provenance
    (line,) = read_records(str(tmp_path / "2" / "runs")).values()
    assert line["name"] == rec["name"] and rec["record"].endswith(f"records/{rec['name']}.json")
    assert line["config"]["engine"]["num_workers"] == 2 and line["split"]["train"].endswith("train.tsv")
    # the kept checkpoint is an HF dir in safetensors that from_pretrained loads
    assert (tmp_path / "2" / "runs").joinpath(rec["checkpoint"]).joinpath("model.safetensors").exists()
    AutoModelForMaskedLM.from_pretrained(rec["checkpoint"])


def test_regression_stsb_then_zero_shot_from_its_checkpoint(ray_cluster, tiny_bert, tmp_path):
    first = run(_cfg(tiny_bert, tmp_path, task="STS-B", max_steps=4, lr=3e-4, engine=EngineConfig(num_workers=1)))
    assert first["metric"] == "pearson" and math.isfinite(first["test"])
    assert first["loss_curve"][-1][1] < first["loss_curve"][0][1]
    # a later run starts from that checkpoint (the run dir or its model/ both work): zero-shot
    # evaluation trains nothing and reproduces the selected dev metric
    ckpt_dir = first["checkpoint"].removesuffix("/model")
    second = run(_cfg(tiny_bert, tmp_path, task="STS-B", init=ckpt_dir, method="zero-shot",
                      engine=EngineConfig(num_workers=1)))
    assert second["dev_curve"][0][1] == pytest.approx(first["best_dev"], abs=1e-6)
    assert second["loss_curve"] == [] and [s for s, _ in second["dev_curve"]] == [0]
    assert second["split"]["test"].endswith("test.tsv") and math.isfinite(second["test"])
    # no copy of the untouched weights: the record points at the model it evaluated
    assert second["checkpoint"] == ckpt_dir
    kept = (tmp_path / "runs" / second["name"]).glob("checkpoint_*/*")
    assert [p.name for p in kept] == ["trainer_state.json"]


def test_classifier_baseline(ray_cluster, tiny_bert, tmp_path):
    rec = run(_cfg(tiny_bert, tmp_path, task="MRPC", method="classifier", max_steps=4, lr=3e-4,
                   engine=EngineConfig(num_workers=1)))
    assert rec["metric"] == "f1" and rec["loss_curve"][-1][1] < rec["loss_curve"][0][1]


def test_batch_that_does_not_split_over_workers(ray_cluster, tiny_bert, tmp_path):
    with pytest.raises(ConfigError, match=r"batch_size=3 \(global\) cannot be split evenly over 2 workers"):
        run(_cfg(tiny_bert, tmp_path, batch_size=3))


def test_init_that_is_not_a_model(tmp_path):
    with pytest.raises(ConfigError, match="is not an HF model directory: no config.json.*a rayapp run checkpoint"):
        run(_cfg("unused", tmp_path, init=str(tmp_path)))


@pytest.fixture(scope="module")
def untrained(ray_cluster, tiny_bert, tmp_path_factory):
    """(config, record) of a run whose lr is too small to change the dev metric (two tests use it)."""
    cfg = _cfg(tiny_bert, tmp_path_factory.mktemp("lr-tiny"), lr=1e-12, max_steps=4, eval_every=2,
               engine=EngineConfig(num_workers=1))
    return cfg, run(cfg)


def test_step_zero_never_wins_the_selection(untrained):
    """LM-BFF selects among evaluations during training: with an lr too small to change the
    dev metric, every evaluation ties and the first one after step 0 is kept, not the
    untrained weights (which a strict `>` against the step-0 evaluation used to keep)."""
    _, rec = untrained
    dev = [d for _, d in rec["dev_curve"]]
    assert dev[0] == dev[1] == dev[2]  # the weights did not move
    assert rec["best_step"] == 2


def test_same_config_resumes_the_finished_run(untrained):
    """Run names derive from the config: running it again finds the run and trains nothing."""
    cfg, first = untrained
    again = run(cfg)
    assert first["name"] == again["name"] and first["name"].startswith("prompt-SST-2-16-13-")
    assert again["test"] == first["test"] and again["loss_curve"] == first["loss_curve"]


def test_kd_from_teacher_during_prompt_ft(ray_cluster, tiny_roberta, tmp_path):
    rec = run(_cfg(tiny_roberta, tmp_path, teacher=tiny_roberta, kd_weight=0.5, max_steps=2, eval_every=2,
                   engine=EngineConfig(num_workers=1)))
    assert rec["config"]["teacher"] == tiny_roberta and 0.0 <= rec["test"] <= 1.0


def test_kd_teacher_with_another_vocabulary(tiny_bert, tiny_roberta, tmp_path):
    with pytest.raises(ConfigError, match="different vocabularies"):
        run(_cfg(tiny_roberta, tmp_path, teacher=tiny_bert))


def test_a_verbalizer_of_several_tokens_trains_and_evaluates(ray_cluster, tiny_roberta, tmp_path):
    """SST-2 with label words of two BPE pieces (' aw'+'ful', ' super'+'b'), `multi_token: true`:
    prompt FT trains on PET's score, selects on dev and evaluates on test; the same task
    without the opt-in is refused before Ray starts, naming the word and the tokenizer."""
    import yaml

    from rayapp.errors import PromptError

    # the user's own SST-2 (a tasks file entry wins over the built-in task of its name)
    task = {"name": "SST-2", "template": "{x0} It was {mask}.", "verbalizer": {"0": "awful", "1": "superb"},
            "multi_token": True}
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump([task]))
    base = dict(model=tiny_roberta, max_steps=4, eval_every=2, log_every=1, batch_size=8, lr=2e-3,
                output_dir=str(tmp_path / "runs"), engine=EngineConfig(num_workers=1),
                tasks_file=str(tmp_path / "tasks.yaml"), task="SST-2")
    rec = run(FinetuneConfig(**base))
    assert rec["step"] == 4 and 0.0 <= rec["test"] <= 1.0 and len(rec["dev_curve"]) >= 2
    losses = [loss for _, loss in rec["loss_curve"]]
    assert all(math.isfinite(x) for x in losses) and losses[0] != losses[-1]

    (tmp_path / "off.yaml").write_text(yaml.safe_dump([{**task, "multi_token": False}]))
    with pytest.raises(PromptError, match=r"label word 'awful' of task 'SST-2' is not a single token for "
                                          r"tokenizer RobertaTokenizer.*multi_token: true"):
        run(FinetuneConfig(**{**base, "tasks_file": str(tmp_path / "off.yaml")}))
