"""Prompt-Distiller recipe: the unlabelled set X~, the recipe, its methods and bad input."""
import json

import pytest

from conftest import ONE_TRIAL
from rayapp.data.fewshot import load_lmbff
from rayapp.data.unlabelled import default_pool, draw_unlabelled, pseudo_label_agreement
from rayapp.errors import ConfigError, DataError
from rayapp.tasks.registry import get_task

SST2 = get_task("SST-2")


def texts(examples):
    return {(e.text_a, e.text_b) for e in examples}


def test_unlabelled_set_is_n_times_x_disjoint_and_unlabelled():
    split = load_lmbff(None, SST2, k=16, seed=13)
    xu = draw_unlabelled(split, SST2, n=10)
    assert len(xu.examples) == len(xu.hidden_labels) == 10 * len(split.train) == 320
    assert all(e.label is None for e in xu.examples)
    assert len(texts(xu.examples)) == 320  # no duplicates
    assert not texts(xu.examples) & texts(split.train + split.dev + split.test)
    assert set(xu.hidden_labels) == {"0", "1"}
    assert xu.source["pool"] == str(default_pool(SST2))
    # a function of the split's seed: the same split gives the same X~, another split another
    assert draw_unlabelled(split, SST2, n=10).examples == xu.examples
    other = draw_unlabelled(load_lmbff(None, SST2, k=16, seed=21), SST2, n=10)
    assert other.examples != xu.examples
    # MNLI-mm draws from MNLI's pool
    assert default_pool(get_task("MNLI-mm")) == default_pool(get_task("MNLI"))


def test_pool_smaller_than_n_x_is_a_clear_error_with_the_sizes(tmp_path):
    split = load_lmbff(None, SST2, k=16, seed=13)
    pool = tmp_path / "pool.json"
    rows = {str(i): {"text_a": f"sentence number {i}", "text_b": None, "label": str(i % 2)} for i in range(50)}
    rows["50"] = {"text_a": split.train[0].text_a, "text_b": None, "label": split.train[0].label}  # in X: not usable
    pool.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"has 50 usable examples .* \(51 rows in all\), but X~ needs n\*\|X\| = 10\*32 = 320"):
        draw_unlabelled(split, SST2, n=10, pool=pool)
    assert len(draw_unlabelled(split, SST2, n=1, pool=pool).examples) == 32
    with pytest.raises(ConfigError, match="n .* must be >= 1"):
        draw_unlabelled(split, SST2, n=0, pool=pool)


def test_pseudo_label_agreement_counts():
    stats = pseudo_label_agreement([0, 1, 1, 1], ["0", "0", "1", "1"], SST2)
    assert stats["agree"] == 3 and stats["total"] == 4 and stats["rate"] == 0.75
    assert stats["pseudo_counts"] == {"0": 1, "1": 3} and stats["gold_counts"] == {"0": 2, "1": 2}


# --- the objective: each ablation switch zeroes exactly its terms --------------------------

def _pd_batch(encoder, n_labelled: int = 2, n_unlabelled: int = 2, n_probes_t: int = 3):
    """A PD batch for the student's `encoder`: 2 rows of X, 2 of X~, with made-up teacher outputs."""
    import torch

    texts = ["a fine day", "a bad night", "an ok film", "the worst film"][:n_labelled + n_unlabelled]
    b = encoder.encode_batch(texts)
    g = torch.Generator().manual_seed(0)
    probs = lambda n: torch.rand(n, n_probes_t, 2, generator=g).softmax(-1)  # noqa: E731
    b.update(labels=torch.tensor([0, 1]), t_scores=torch.randn(2, 2, generator=g),
             u_t_scores=torch.randn(2, 2, generator=g), u_pseudo=torch.tensor([1, 1]),
             t_probes=probs(2), bank_probes=probs(2), bank_labels=torch.tensor([0, 1]),
             u_t_probes=probs(2), u_bank_probes=probs(2), u_bank_labels=torch.tensor([0, 1]))
    return b


@pytest.mark.parametrize("contrastive,unlabelled,zero", [
    (True, True, set()),
    (False, True, {"cpd_x", "cpd_xu"}),                  # w/o contrastive learning
    (True, False, {"kd_xu", "cpd_xu"}),                  # w/o unlabelled data
    (False, False, {"kd_xu", "cpd_x", "cpd_xu"}),        # w/o both = Prompt-KD
])
def test_ablation_switches_zero_exactly_their_terms(tiny_roberta, contrastive, unlabelled, zero):
    from rayapp.losses import PD_PARTS
    from rayapp.modeling.models import LogitsAt, load_mlm, load_tokenizer
    from rayapp.modeling.probes import LayerProbes
    from rayapp.recipes.objectives import OBJECTIVES, PDContext
    from rayapp.recipes.prompt_distill import PromptDistillConfig
    from rayapp.tasks.prompts import PromptEncoder

    cfg = PromptDistillConfig(contrastive=contrastive, unlabelled=unlabelled)
    encoder = PromptEncoder(load_tokenizer(tiny_roberta), SST2)
    student = LogitsAt(load_mlm(tiny_roberta))
    probes = LayerProbes.from_mlm(student.mlm, encoder.label_word_ids).requires_grad_(False)
    batch = _pd_batch(encoder, n_unlabelled=2 if unlabelled else 0)
    if not unlabelled:
        batch = {k: v for k, v in batch.items() if not k.startswith("u_")}
    loss, parts = OBJECTIVES["prompt-distiller"](student, None, batch, PDContext(cfg, SST2, encoder.label_word_ids, probes))
    assert set(parts) == set(PD_PARTS)
    assert {k for k in PD_PARTS if parts[k].item() == 0.0} == zero
    expected = parts["mlm"] + 0.2 * (parts["kd_x"] + parts["kd_xu"]) + 0.2 * (parts["cpd_x"] + parts["cpd_xu"])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert student.mlm.roberta.encoder.layer[0].output.dense.weight.grad.abs().sum() > 0


def test_prompt_kd_is_pd_without_both_terms():
    from rayapp.recipes.prompt_distill import PromptDistillConfig

    cfg = PromptDistillConfig(method="prompt-kd")
    assert (cfg.contrastive, cfg.unlabelled, cfg.variant) == (False, False, "prompt-kd")
    assert PromptDistillConfig(contrastive=False).variant == "prompt-distiller-no-contrastive"
    assert PromptDistillConfig(contrastive=False, unlabelled=False).variant == "prompt-kd"


# --- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("override,match", [
    ("lambda1=-0.1", r"lambda1 and lambda2 \(PD eq. 8\) must be >= 0, got lambda1=-0.1"),
    ("lambda2=-1", "lambda2=-1"),
    ("alpha=0", r"alpha \(the KD temperature of PD eq. 3-4\) must be > 0, got 0"),
    ("alpha=-2", "must be > 0, got -2"),
    ("n=0", "n .* must be >= 1"),
])
def test_bad_hyperparameters_are_config_errors(override, match):
    from rayapp.config import load_config
    from rayapp.recipes.prompt_distill import PromptDistillConfig

    with pytest.raises(ConfigError, match=match):
        load_config(PromptDistillConfig, None, [override])


def test_teacher_without_mlm_head_is_refused_before_training(tiny_bert, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from rayapp.recipes.prompt_distill import PromptDistillConfig, run

    headless = tmp_path / "encoder-only"
    AutoModel.from_pretrained(tiny_bert).save_pretrained(headless)  # BertModel: no cls.* weights
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(headless)
    cfg = PromptDistillConfig(model=tiny_bert, teacher=str(headless), output_dir=str(tmp_path / "runs"))
    with pytest.raises(ConfigError, match="has no trained MLM head .* lacks cls.predictions"):
        run(cfg)


def test_pool_smaller_than_n_x_fails_the_run_before_training(tiny_bert, tmp_path):
    from rayapp.recipes.prompt_distill import PromptDistillConfig, run

    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps({str(i): {"text_a": f"s {i}", "text_b": None, "label": "1"} for i in range(40)}))
    cfg = PromptDistillConfig(model=tiny_bert, teacher=tiny_bert, unlabelled_pool=str(pool), output_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"has 40 usable .* needs n\*\|X\| = 10\*32 = 320"):
        run(cfg)
    assert not (tmp_path / "teachers").exists()  # nothing was trained


# --- the recipe on Ray Train -----------------------------------------------------------------

def test_prompt_distiller_run_bert_teacher_roberta_student(ray_cluster, tiny_bert, tiny_roberta, tmp_path):
    """T' = a WordPiece MLM, S = a byte-level BPE MLM: T is tuned first (cached), PD runs and
    records probes and pseudo-labels; a second student method of the same split reuses T."""
    from rayapp import storage
    from rayapp.recipes.prompt_distill import PromptDistillConfig, run, tuned_teacher

    common = dict(model=tiny_roberta, teacher=tiny_bert, output_dir=str(tmp_path), n=2, max_steps=2, eval_every=2,
                  probe_steps=5, eval_batch_size=64, teacher_config={"max_steps": 2, "eval_every": 2})
    rec = run(PromptDistillConfig(**common))
    assert rec["method"] == "prompt-distiller" and rec["task"] == "SST-2" and rec["seed"] == 13
    assert [step for step, _ in rec["dev_curve"]] == [0, 2] and 0 <= rec["test"] <= 1
    assert set(rec["probe_dev_acc"]) == {"teacher", "pretrained_teacher", "student"}
    assert all(len(acc) == 1 for acc in rec["probe_dev_acc"].values())  # 2-layer models: 1 probe each
    agreement = rec["pseudo_label_agreement"]
    assert agreement["total"] == 64 and 0 <= agreement["agree"] <= 64
    assert sum(agreement["pseudo_counts"].values()) == 64
    for key in ("teacher", "pretrained_teacher", "student"):
        assert storage.exists(str(tmp_path / rec["name"] / "probes" / f"{key}.pt"))
    teachers = storage.list_files(str(tmp_path / "teachers" / "records"), suffix=".json")
    assert len(teachers) == 1 and rec["tuned_teacher"].startswith(str(tmp_path / "teachers"))

    # another student method of the same split finds T in the cache: nothing is tuned again
    split = load_lmbff(None, SST2, k=16, seed=13)
    assert tuned_teacher(PromptDistillConfig(method="prompt-kd", **common), split) == rec["tuned_teacher"]
    assert storage.list_files(str(tmp_path / "teachers" / "records"), suffix=".json") == teachers


# --- FT-paradigm baselines (classification head) ------------------------------------------

FT_BASELINES = [("vanilla-kd", set()), ("bert-pkd", {"patient"}), ("tinybert", {"hidden", "attn"})]


@pytest.mark.parametrize("method,hints", FT_BASELINES)
def test_ft_baseline_objectives_same_tokenizer(tiny_bert, method, hints):
    import torch

    from rayapp.data.fewshot import Example
    from rayapp.modeling.models import load_tokenizer
    from rayapp.recipes.finetune import make_batch
    from rayapp.recipes.objectives import OBJECTIVES, PDContext
    from rayapp.recipes.prompt_distill import HintStudent, PromptDistillConfig, ft_classifier

    tok = load_tokenizer(tiny_bert)
    teacher = ft_classifier(tiny_bert, SST2, method).eval().requires_grad_(False)
    student = HintStudent(ft_classifier(tiny_bert, SST2, method), teacher.config.hidden_size)
    student.mlm.load_state_dict(teacher.state_dict())  # the same classifier: hints must vanish
    assert isinstance(student.proj, torch.nn.Identity)  # same width: no projection
    examples = [Example("a fine day", None, "1"), Example("a bad night out", None, "0")]
    batch = make_batch(examples, SST2, tok, None, 64)
    batch["t_input_ids"], batch["t_attention_mask"] = batch["input_ids"], batch["attention_mask"]
    cfg = PromptDistillConfig(method=method)
    loss, parts = OBJECTIVES[method](student, teacher, batch, PDContext(cfg, SST2))
    assert set(parts) == {"ce", "kd"} | hints
    assert loss.item() == pytest.approx(0.5 * parts["ce"].item() + 0.5 * parts["kd"].item()
                                        + sum(parts[h].item() for h in hints), rel=1e-5)
    if method != "vanilla-kd":  # a student identical to its teacher matches its hints exactly
        assert all(parts[h].item() == pytest.approx(0.0, abs=1e-10) for h in hints)


def test_tinybert_across_tokenizers_matches_first_tokens_through_a_projection(tiny_bert, tiny_roberta, tmp_path):
    from rayapp.data.fewshot import Example
    from rayapp.modeling.models import load_tokenizer
    from rayapp.recipes.finetune import make_batch
    from rayapp.recipes.objectives import OBJECTIVES, PDContext
    from rayapp.recipes.prompt_distill import HintStudent, PromptDistillConfig, ft_classifier
    from tiny import make_tiny_random_model

    wide = str(make_tiny_random_model("wordpiece", tmp_path / "wide", hidden=96, layers=4))
    teacher = ft_classifier(wide, SST2, "tinybert").eval().requires_grad_(False)
    student = HintStudent(ft_classifier(tiny_roberta, SST2, "tinybert"), teacher.config.hidden_size)
    assert student.proj.weight.shape == (96, 64)
    examples = [Example("a fine day", None, "1"), Example("a bad night out", None, "0")]
    batch = make_batch(examples, SST2, load_tokenizer(tiny_roberta), None, 64)
    t = make_batch(examples, SST2, load_tokenizer(wide), None, 64)
    batch["t_input_ids"], batch["t_attention_mask"] = t["input_ids"], t["attention_mask"]
    cfg = PromptDistillConfig(method="tinybert")
    loss, parts = OBJECTIVES["tinybert"](student, teacher, batch, PDContext(cfg, SST2, same_tokenizer=False))
    assert set(parts) == {"ce", "kd", "hidden"} and parts["hidden"].item() > 0
    loss.backward()
    assert student.proj.weight.grad.abs().sum() > 0


# --- as sweep methods ------------------------------------------------------------------------

def test_shipped_pd_sweep_configs_plan_table1_and_table2():
    from pathlib import Path

    from rayapp.config import load_config
    from rayapp.sweep.spec import SweepConfig

    configs = Path(__file__).parent.parent / "jobs" / "configs"
    paper = load_config(SweepConfig, configs / "sweep-pd-table1.yaml")
    assert paper.tasks == ["MNLI", "MNLI-mm", "mpqa", "mr", "RTE", "SNLI", "SST-2", "trec"] and len(paper.seeds) == 5
    assert set(paper.phases[0]) == {"teacher-ft", "student-ft", "teacher-pt", "student-pt"}  # T first
    trial = {"method": "pd-no-unlabelled", "task": "mpqa", "seed": 13, "point": {"alpha": 10.0}}
    rc = paper.recipe_config(trial, "x", lambda p: f"<{p}>")
    assert (rc.teacher, rc.tuned_teacher, rc.unlabelled, rc.variant) == \
           ("roberta-large", "<best:teacher-pt>", False, "prompt-distiller-no-unlabelled")
    assert (rc.batch_size, rc.lr, rc.lambda1, rc.lambda2, rc.n, rc.k) == (4, 1e-5, 0.2, 0.2, 10, 16)
    assert [t.name for t in paper.tables] == ["table1", "table2"]
    local = load_config(SweepConfig, configs / "sweep-pd-table1_local.yaml")
    assert local.tasks == ["SST-2", "mr"] and len(local.seeds) == 5 and local.method_names == paper.method_names
    assert local.student_specs["minilm-l3"].teacher.endswith("minilm-l6-mlm-wiki")


def test_sweep_with_pd_prompt_kd_and_an_ablation(ray_cluster, tiny_bert, tiny_roberta, tmp_path, capsys):
    """Three PD methods through Ray Tune (one split: averaging over splits is the tiny sweep's
    test); the report has a row for each."""
    import yaml

    from rayapp.cli import main

    cfg_file = tmp_path / "sweep.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "name": "pd", **ONE_TRIAL, "storage": str(tmp_path / "sweeps"), "tasks": ["SST-2"], "seeds": [13], "grid": {},
        "base": {"model": tiny_roberta, "teacher": tiny_bert, "tuned_teacher": tiny_bert, "max_steps": 2,
                 "eval_every": 2, "n": 1, "probe_steps": 5, "eval_batch_size": 128},
        "methods": {"pd": {"recipe": "prompt-distill", "label": "Prompt-Distiller"},
                    "prompt-kd": {"recipe": "prompt-distill", "method": "prompt-kd", "label": "Prompt-KD"},
                    "pd-no-cl": {"recipe": "prompt-distill", "contrastive": False, "label": "PD w/o contrastive"}},
        "tables": [{"name": "table2", "rows": ["pd", "pd-no-cl", "prompt-kd"]}]}))
    assert main(["sweep", "--config", str(cfg_file)]) == 0
    exp = tmp_path / "sweeps" / "pd"
    records = [json.loads(f.read_text()) for f in sorted((exp / "records").glob("*.json"))]
    assert len(records) == 3 and all(r["status"] == "done" for r in records)
    assert {(r["sweep"]["method"], r["method"]) for r in records} == {
        ("pd", "prompt-distiller"), ("prompt-kd", "prompt-kd"), ("pd-no-cl", "prompt-distiller-no-contrastive")}
    assert all(r["pseudo_label_agreement"]["total"] == 32 for r in records if r["sweep"]["method"] != "prompt-kd")
    capsys.readouterr()
    assert main(["report", str(exp), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "table2.md").read_text()
    rows = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ") and "method" not in line]
    assert rows == ["Prompt-Distiller", "PD w/o contrastive", "Prompt-KD"]


def test_a_sweep_trial_tunes_its_own_teacher_in_its_process(ray_cluster, tiny_bert, tmp_path):
    """A PD trial with no `tuned_teacher` tunes T itself: in the trial's actor, which holds the
    worker's CPU (as a Ray task it was refused: "No trial resources are available"), and T's
    metrics are not reported as the trial's."""
    import yaml

    from rayapp.cli import main

    cfg_file = tmp_path / "sweep.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "name": "pd-own-t", "storage": str(tmp_path / "sweeps"), "tasks": ["SST-2"], "seeds": [13, 21], "grid": {},
        **ONE_TRIAL,
        "base": {"model": tiny_bert, "teacher": tiny_bert, "max_steps": 2, "eval_every": 2, "n": 1, "probe_steps": 5,
                 "eval_batch_size": 128, "teacher_config": {"max_steps": 2, "eval_every": 2}},
        "methods": {"pd": {"recipe": "prompt-distill"}}}))
    assert main(["sweep", "--config", str(cfg_file)]) == 0
    exp = tmp_path / "sweeps" / "pd-own-t"
    records = [json.loads(f.read_text()) for f in sorted((exp / "records").glob("*.json"))]
    assert len(records) == 2 and all(r["status"] == "done" for r in records), [r.get("error") for r in records]
    teachers = {r["seed"]: r["tuned_teacher"] for r in records}
    assert all(t.startswith(str(exp / "teachers")) for t in teachers.values()) and len(set(teachers.values())) == 2
    # Tune saw the student's reports only: each trial's last result is its record's test number
    results = [json.loads(line) for f in exp.glob("tune-0/*/result.json") for line in f.read_text().splitlines()]
    assert sorted(r["test"] for r in results if r.get("final")) == sorted(r["test"] for r in records)
