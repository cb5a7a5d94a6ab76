"""The LM-BFF row (Gao et al. 2021 as SMASH ran it): demonstrations picked by SBERT similarity
(`rayapp.data.demonstrations`, `PromptEncoder(demonstrations=True)`), their ensemble at
evaluation, and the automatic label-word and template search (`rayapp.tasks.search`)."""
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ONE_ACTOR
from rayapp.assets import asset
from rayapp.data.demonstrations import Demonstrations, top_similar
from rayapp.data.fewshot import Example, load_lmbff
from rayapp.errors import ConfigError
from rayapp.recipes.finetune import FinetuneConfig, predict
from rayapp.tasks.prompts import PromptEncoder, parse_template
from rayapp.tasks.registry import get_task, load_tasks, with_prompt
from test_driver_checks import RUNNER, assert_one_line_error
from test_prompts import lmbff_rows, lmbff_tokenize

SBERT = str(asset("models", "all-MiniLM-L6-v2"))


# --- which demonstrations ---------------------------------------------------------------------

# six unit vectors, three per class, and the input (1, 0): cosines 1, 0, .8 (class 0), -1, .6, .6
SUPPORT = np.array([[1, 0], [0, 1], [0.8, 0.6], [-1, 0], [0.6, 0.8], [0.6, -0.8]])
CLASSES = np.array([0, 0, 0, 1, 1, 1])


def test_demonstrations_come_from_the_most_similar_share_of_each_class():
    query = np.array([1.0, 0.0])
    # dev/test: 6 candidates, LM-BFF's limit int(6 // 2 * 0.5) = 1 per class: the most similar of each
    assert [p.tolist() for p in top_similar(query, SUPPORT, CLASSES, 2, 0.5)] == [[0], [4]]
    # rate 1: every example of a class, most similar first (the .6 tie in file order)
    assert [p.tolist() for p in top_similar(query, SUPPORT, CLASSES, 2, 1.0)] == [[0, 2, 1], [4, 5, 3]]
    # training: the input (row 0) is never its own demonstration; int(5 // 2 * 0.5) = 1
    assert [p.tolist() for p in top_similar(query, SUPPORT, CLASSES, 2, 0.5, exclude=0)] == [[2], [4]]


def test_sbert_picks_the_example_that_says_the_same():
    """The local MiniLM SBERT on a tiny corpus where the nearest example of each class is plain."""
    task = get_task("SST-2")
    train = [Example(t, None, y) for t, y in [
        ("A wonderful, moving film.", "1"), ("The stock market fell sharply today.", "1"),
        ("The soup was cold and bland.", "0"), ("A dull and tedious movie.", "0")]]
    query = Example("What a wonderful and moving movie!", None, "1")
    split = dataclasses.replace(load_lmbff(None, task, 16, 13), train=train, dev=[query], test=[])
    demos = Demonstrations.build(task, split, SBERT, 0.5, 3, 0, "cpu")
    # int(4 // 2 * 0.5) = 1: each class's most similar example, in every set
    assert demos.for_evaluation(query, 0) == [[(("A dull and tedious movie.",), 0),
                                               (("A wonderful, moving film.",), 1)]] * 3


def test_demonstrations_are_redrawn_every_step_and_seeded():
    task = get_task("SST-2")
    train = [Example(f"sentence {i}", None, str(c)) for i, c in enumerate(CLASSES)]
    vectors = {(e.text_a, None): v for e, v in zip(train, SUPPORT)}
    demos = Demonstrations(task, train, vectors, rate=1.0, samples=4, seed=7)
    steps = [demos.for_training(0, step) for step in range(8)]
    assert len({str(s) for s in steps}) > 1  # redrawn
    assert all(s[0][0][0] != "sentence 0" for s in steps)  # never the input itself
    assert [Demonstrations(task, train, vectors, 1.0, 4, 7).for_training(0, step) for step in range(8)] == steps
    assert [Demonstrations(task, train, vectors, 1.0, 4, 8).for_training(0, step) for step in range(8)] != steps
    sets = demos.for_evaluation(train[1], 1)
    assert len(sets) == 4 and sets == demos.for_evaluation(train[1], 1)  # fixed for the run


# --- how they are written ---------------------------------------------------------------------

def lmbff_demo_template(template: str, words: list[str]) -> str:
    """LM-BFF's run.py `auto_demo`: the template, then per label a copy without *cls* whose
    sentences are renumbered and whose mask is the label word (here a literal, as LM-BFF's
    label_i is the word's one token)."""
    one = template.replace("*cls*", "")
    n = 2 if "_1" in one else 1
    out = template
    for label, word in enumerate(words):
        sub = one
        for i in range(n):
            sub = sub.replace(f"_{i}", f"_{n + n * label + i}")
        out += sub.replace("*mask*", f"*_{word}*")
    return out


@pytest.mark.parametrize("tok_name", ["wordpiece_tokenizer", "bpe_tokenizer"])
def test_demonstrations_are_written_as_lmbff_writes_them(tok_name, request):
    tok = request.getfixturevalue(tok_name)
    enc = PromptEncoder(tok, get_task("SST-2"), 64, demonstrations=True)
    ids = enc.encode("A fine film.", None, [(("Dull stuff.",), 0), (("A joy.",), 1)])["input_ids"]
    want = {"bpe_tokenizer": "<s>A fine film. It was<mask>.</s>Dull stuff. It was terrible.</s>A joy. It was "
                             "great.</s>",
            "wordpiece_tokenizer": "[CLS] a fine film. it was [MASK]. [SEP] dull stuff. it was terrible. [SEP] a joy. "
                                   "it was great. [SEP]"}[tok_name]
    assert tok.decode(ids) == want
    # token for token LM-BFF's, on RTE's seed-13 train rows (its NLI template, exact mode)
    rte = dataclasses.replace(get_task("RTE"), lmbff_exact=True)
    template = lmbff_demo_template("*cls**sent-_0*?*mask*,*+sentl_1**sep+*", ["No", "Yes"])
    exact = PromptEncoder(tok, rte, 512, demonstrations=True)
    rows = [(r[1], r[2]) for r in lmbff_rows("RTE", "train")[:6]]
    for i in range(0, 6, 3):
        query, no, yes = rows[i:i + 3]
        got = exact.encode(*query, [(no, 0), (yes, 1)])["input_ids"]
        assert got == lmbff_tokenize(template, [*query, *no, *yes], tok, 512)


def test_truncation_cuts_demonstrations_first_and_keeps_the_mask(bpe_tokenizer):
    enc = PromptEncoder(bpe_tokenizer, get_task("SST-2"), 40, demonstrations=True)
    long = " ".join(["The plot wanders from one scene to another without purpose."] * 4)
    out = enc.encode("A fine film.", None, [((long,), 0), ((long,), 1)])
    text = bpe_tokenizer.decode(out["input_ids"])
    assert len(out["input_ids"]) == 40 and out["input_ids"][out["mask_pos"]] == bpe_tokenizer.mask_token_id
    assert text.startswith("<s>A fine film. It was<mask>.</s>")  # the input whole
    # each demonstration keeps its frame and label word
    assert text.count(" It was terrible.</s>") == 1 and text.endswith(" It was great.</s>")
    # an input too long for its demonstrations too: they keep a token per sentence, the input gives the rest
    out = enc.encode(long, None, [((long,), 0), ((long,), 1)])
    assert len(out["input_ids"]) == 40 and bpe_tokenizer.mask_token_id in out["input_ids"]
    assert bpe_tokenizer.decode(out["input_ids"]).endswith("</s>The It was terrible.</s>The It was great.</s>")


class FixedLogits(torch.nn.Module):
    """A stand-in model whose logits at the mask are given, row by row."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, input_ids, attention_mask, positions):
        return self.logits, None


def test_the_ensemble_averages_the_sets_log_probabilities(wordpiece_tokenizer):
    task = get_task("SST-2")
    enc = PromptEncoder(wordpiece_tokenizer, task, 64)
    terrible, great = (ids[0] for ids in enc.label_word_ids)
    vocab = len(wordpiece_tokenizer)

    def row(t: float, g: float) -> list[float]:
        logits = [0.0] * vocab
        logits[terrible], logits[great] = t, g
        return logits

    # example 1: two sets lean to class 0 a little, one to class 1 a lot: the mean log-probability says 1
    # (a vote would say 0); example 2: three sets for class 0
    model = FixedLogits([row(2, 0), row(2, 0), row(0, 9), row(5, 0), row(4, 1), row(3, 0)])
    batch = {"input_ids": None, "attention_mask": None, "mask_pos": None}
    assert predict(model, batch, task, enc, samples=3).tolist() == [1, 0]
    assert predict(model, batch, task, enc).tolist() == [0, 0, 1, 0, 0, 0]
    # regression (STS-B): the mean of the sets' scores, LM-BFF's
    stsb = get_task("STS-B")
    enc = PromptEncoder(wordpiece_tokenizer, stsb, 64)
    no, yes = (ids[0] for ids in enc.label_word_ids)
    logits = torch.zeros(2, vocab)
    logits[0, yes], logits[1, no] = 3.0, 1.0
    scores = predict(FixedLogits(logits.tolist()), batch, stsb, enc, samples=2)
    p = torch.tensor([3.0, -1.0]).sigmoid()  # each set's probability of the high word
    assert scores.tolist() == pytest.approx([(5 * p).mean().item()])


# --- fine-tuning with demonstrations ---------------------------------------------------------

def test_prompt_fine_tuning_with_demonstrations_trains_and_evaluates(ray_cluster, tiny_bert, tmp_path):
    from rayapp.recipes.finetune import run
    from rayapp.train.engine import EngineConfig

    split = load_lmbff(None, "SST-2", 16, 13)
    split = dataclasses.replace(split, test=split.test[:48])
    record = run(FinetuneConfig(task="SST-2", model=tiny_bert, demonstrations=True, demo_model=SBERT, demo_samples=2,
                                max_steps=2, eval_every=2, batch_size=4, lr=1e-3, max_length=96,
                                output_dir=str(tmp_path), engine=EngineConfig(num_workers=1)), split=split)
    assert record["best_step"] == 2 and 0 <= record["test"] <= 1 and len(record["dev_curve"]) == 2
    assert record["config"]["demonstrations"] and record["config"]["demo_samples"] == 2
    # its classifier reads train examples in every prompt: not something an export carries
    from rayapp.ship.export import ExportConfig, run as export

    with pytest.raises(ConfigError, match="selected with LM-BFF's demonstrations"):
        export(ExportConfig(run=record["record"], out=str(tmp_path / "export")))


@pytest.fixture(scope="module")
def bad_lmbff(tmp_path_factory):
    from tiny import make_tiny_t5

    return str(make_tiny_t5(tmp_path_factory.mktemp("t5-student") / "t5"))


def test_bad_demonstration_configs_are_one_line_before_ray(tiny_bert, bad_lmbff, tmp_path):
    ft = ["finetune", f"output_dir={tmp_path}", "max_steps=1", "demonstrations=true", f"demo_model={SBERT}"]
    cases = {
        "t5 student": ([*ft, f"model={bad_lmbff}"], r"seq2seq LM \(t5\), but demonstrations=true closes each "
                                                    r"demonstration with a separator token"),
        "rate 0": ([*ft, f"model={tiny_bert}", "demo_filter_rate=0"], r"demo_filter_rate=0(\.0)? must be in \(0, 1\]"),
        "rate above 1": ([*ft, f"model={tiny_bert}", "demo_filter_rate=1.5"], r"demo_filter_rate=1.5 must be in"),
        "no sbert": ([*ft, f"model={tiny_bert}", f"demo_model={tmp_path}/no-sbert"],
                     r"demo_model \(the SBERT that picks demonstrations\): .*no-sbert"),
        "classifier": ([*ft, f"model={tiny_bert}", "method=classifier"], r"it needs a prompt method"),
    }
    done = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps({k: v[0] for k, v in cases.items()}),
                          capture_output=True, text=True, check=True)
    results = json.loads(done.stdout.splitlines()[-1])
    for name, (_, pattern) in cases.items():
        assert_one_line_error(results[name], pattern)


# --- the automatic prompt search ------------------------------------------------------------

@pytest.mark.parametrize("task_name", ["SST-2", "MNLI"])
def test_label_word_search_finds_one_token_words_ranked_by_dev(tiny_bert, task_name):
    from rayapp.modeling.scorer import TeacherScorer
    from rayapp.tasks.search import search_label_words

    task = get_task(task_name)
    scorer = TeacherScorer(tiny_bert, task, 128)
    found = search_label_words(scorer, load_lmbff(None, task, 16, 13), k_likely=6, n_pairs=5,
                               max_assignments=10 ** 6, batch_size=32)
    assert len(found) == 5
    assert [f["dev"] for f in found] == sorted((f["dev"] for f in found), reverse=True)
    for f in found:
        assert list(f["verbalizer"]) == task.labels and len(set(f["verbalizer"].values())) == len(task.labels)
        PromptEncoder(scorer.encoder.tokenizer, with_prompt(task, verbalizer=f["verbalizer"]))  # one token each


@pytest.fixture(scope="module")
def span_t5(tmp_path_factory):
    """A tiny random T5 that closes its spans: its decoder's last hidden state is one large
    constant dimension (every embedding holds 100 there; the final norm keeps only it), and the
    output weights of that dimension favour the sentinels <extra_id_0..2>, so beams close both
    spans within a few steps as a trained T5's do, in input-independent ways (mechanics only)."""
    from transformers import T5ForConditionalGeneration

    from rayapp.modeling.models import load_tokenizer
    from tiny import make_tiny_t5

    root = tmp_path_factory.mktemp("span-t5")
    src, out = make_tiny_t5(root / "random"), root / "spans"
    model, tok = T5ForConditionalGeneration.from_pretrained(src), load_tokenizer(str(src))
    with torch.no_grad():
        model.shared.weight[:, 0] = 100.0
        model.decoder.final_layer_norm.weight.zero_()
        model.decoder.final_layer_norm.weight[0] = 1.0
        head = torch.nn.Linear(model.config.d_model, model.config.vocab_size, bias=False)
        head.weight.zero_()
        head.weight[:, 0] = 0.1 * torch.randn(model.config.vocab_size, generator=torch.Generator().manual_seed(0))
        for sentinel, weight in (("<extra_id_0>", 5.0), ("<extra_id_1>", 4.5), ("<extra_id_2>", 4.5)):
            head.weight[tok.convert_tokens_to_ids(sentinel), 0] = weight
        model.lm_head = head
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("task_name", ["SST-2", "RTE"])
def test_template_search_gives_parsable_templates(tiny_bert, span_t5, task_name):
    from rayapp.modeling.models import load_mlm, load_tokenizer
    from rayapp.modeling.scorer import TeacherScorer
    from rayapp.tasks.search import generate_templates, rank_templates

    task, split = get_task(task_name), load_lmbff(None, task_name, 16, 13)
    t5 = load_mlm(span_t5).eval()
    found = generate_templates(t5, load_tokenizer(span_t5), task, split.train[:4], beam=32, decode_length=8)
    assert found
    for f in found:
        slots = sorted(s.slot for s in parse_template(f["template"]) if s.kind == "sent")
        assert slots == list(range(task.num_inputs)) and "{mask}" in f["template"]
    ranked = rank_templates(TeacherScorer(tiny_bert, task, 128), split, found, 128, 32)
    assert [r["dev"] for r in ranked] == sorted((r["dev"] for r in ranked), reverse=True)
    # a pair's T5 input is LM-BFF's: x0 (no final punctuation) <X> word <Y> x1 (lower first) </s>
    assert {f["format"] for f in found} <= ({"pair"} if task.num_inputs == 2 else {"mask-after", "mask-before"})


def test_search_writes_reusable_tasks_files_and_resumes(ray_cluster, tiny_bert, span_t5, tmp_path):
    from rayapp.tasks.search import SearchConfig, run

    cfg = SearchConfig(out=str(tmp_path / "search"), tasks=["RTE"], seeds=[13], model=tiny_bert, t5=span_t5,
                       k_likely=4, n_pairs=3, beam=32, decode_length=6, max_length=128, **ONE_ACTOR)
    stats = run(cfg)
    assert (stats["searched"], stats["skipped"]) == (1, 0)
    templates = load_tasks(tmp_path / "search" / "auto-template" / "16-13.yaml")
    labels = load_tasks(tmp_path / "search" / "auto-label" / "16-13.yaml")
    ranking = json.loads((tmp_path / "search" / "ranking" / "RTE" / "16-13.json").read_text())
    assert templates["RTE"].template == ranking["templates"][0]["template"]
    assert templates["RTE"].verbalizer == get_task("RTE").verbalizer  # auto T: the manual words
    assert labels["RTE"].template == get_task("RTE").template  # auto L: the manual template
    assert labels["RTE"].verbalizer == ranking["label_words"][0]["verbalizer"]
    # finetune reads it back: the task by its own name, its split and metric unchanged
    rcfg = FinetuneConfig(task="RTE", tasks_file=str(tmp_path / "search" / "auto-template" / "16-13.yaml"))
    assert rcfg.resolve_task().template == ranking["templates"][0]["template"]
    assert run(cfg)["searched"] == 0  # resumed: nothing left to search
    assert json.loads((tmp_path / "search" / "_meta.json").read_text())["splits"] == ["RTE/16-13"]


def test_search_refuses_a_generator_that_is_not_t5(tiny_bert, tmp_path):
    from rayapp.tasks.search import SearchConfig, run

    with pytest.raises(ConfigError, match="is not a T5 model"):
        run(SearchConfig(out=str(tmp_path), tasks=["SST-2"], seeds=[13], model=tiny_bert, t5=tiny_bert))
    with pytest.raises(ConfigError, match="nothing to search"):
        SearchConfig(out=str(tmp_path), tasks=["SST-2"], t5=None, label_words=False)
