"""Tasks, templates, verbalizers and prompt encoding with a WordPiece and a byte-level BPE tokenizer."""
import copy
import csv
import dataclasses
import re

import pytest
import torch

from rayapp.assets import asset
from rayapp.errors import DataError, PromptError
from rayapp.tasks.prompts import PromptEncoder, Task, class_logits, regression_prediction, regression_target
from rayapp.tasks.registry import BUILTIN_TASKS, get_task, load_tasks, task_from_dict

TOKENIZERS = ["wordpiece_tokenizer", "bpe_tokenizer"]
A, B = "The movie was fun.", "It rained all day."

# What each built-in template renders to for (A, B): literal words in order, the mask in place,
# x0|nopunct without its period, x1|lowerfirst lowercased, special tokens at both ends.
RENDERED = {
    "{x0} It was {mask}.": {
        "wordpiece_tokenizer": "[CLS] the movie was fun. it was [MASK]. [SEP]",
        "bpe_tokenizer": "<s>The movie was fun. It was<mask>.</s>",
    },
    "{x0} This is {mask}.": {
        "wordpiece_tokenizer": "[CLS] the movie was fun. this is [MASK]. [SEP]",
        "bpe_tokenizer": "<s>The movie was fun. This is<mask>.</s>",
    },
    "{mask}: {x0}": {
        "wordpiece_tokenizer": "[CLS] [MASK] : the movie was fun. [SEP]",
        "bpe_tokenizer": "<s><mask>: The movie was fun.</s>",
    },
    "{x0|nopunct}? {mask}, {x1|lowerfirst}": {
        "wordpiece_tokenizer": "[CLS] the movie was fun? [MASK], it rained all day. [SEP]",
        "bpe_tokenizer": "<s>The movie was fun?<mask>, it rained all day.</s>",
    },
    "{x0} {mask}, {x1|lowerfirst}": {
        "wordpiece_tokenizer": "[CLS] the movie was fun. [MASK], it rained all day. [SEP]",
        "bpe_tokenizer": "<s>The movie was fun.<mask>, it rained all day.</s>",
    },
}


def test_builtin_task_names():
    assert list(BUILTIN_TASKS) == [
        "SST-2", "sst-5", "mr", "cr", "mpqa", "subj", "trec", "CoLA",
        "MNLI", "MNLI-mm", "SNLI", "QNLI", "RTE", "MRPC", "QQP", "STS-B",
    ]
    assert get_task("sst-2") is BUILTIN_TASKS["SST-2"]
    assert get_task(" mnli-MM ").name == "MNLI-mm"
    metrics = [get_task(n).metric for n in ("CoLA", "MRPC", "QQP", "STS-B", "RTE")]
    assert metrics == ["mcc", "f1", "f1", "pearson", "acc"]
    assert get_task("STS-B").is_regression and not get_task("MRPC").is_regression


@pytest.mark.parametrize("tok_name", TOKENIZERS)
@pytest.mark.parametrize("task_name", list(BUILTIN_TASKS))
def test_builtin_templates_render(task_name, tok_name, request):
    tok = request.getfixturevalue(tok_name)
    task = BUILTIN_TASKS[task_name]
    enc = PromptEncoder(tok, task)
    text_b = B if task.num_inputs == 2 else None
    out = enc.encode(A, text_b)
    ids = out["input_ids"]
    assert ids.count(tok.mask_token_id) == 1 and ids[out["mask_pos"]] == tok.mask_token_id
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert out["attention_mask"] == [1] * len(ids)
    assert enc.render(A, text_b) == RENDERED[task.template][tok_name]
    assert [len(w) for w in enc.label_word_ids] == [1] * len(task.labels)


@pytest.mark.parametrize("task_name", list(BUILTIN_TASKS))
def test_bpe_label_words_are_leading_space_tokens(task_name, bpe_tokenizer):
    task = BUILTIN_TASKS[task_name]
    enc = PromptEncoder(bpe_tokenizer, task)
    tokens = [bpe_tokenizer.convert_ids_to_tokens(ids) for ids in enc.label_word_ids]
    assert tokens == [["Ġ" + word] for word in task.verbalizer.values()]


def test_bpe_mask_follows_it_was(bpe_tokenizer):
    out = PromptEncoder(bpe_tokenizer, get_task("SST-2")).encode(A)
    tokens = bpe_tokenizer.convert_ids_to_tokens(out["input_ids"])
    assert tokens[out["mask_pos"] - 2 :] == ["ĠIt", "Ġwas", "<mask>", ".", "</s>"]
    assert tokens[1] == "The"  # the first sentence at the start gets no leading space


def test_builtin_labels_match_the_kshot_files():
    """Every label in LM-BFF's train files maps to a class (STS-B is regression: scores)."""
    label_column = {"CoLA": 1, "MRPC": 0}
    for name, task in BUILTIN_TASKS.items():
        if task.is_regression or name == "MNLI-mm":
            continue
        folder = asset("fewshot", "k-shot", name, "16-13")
        if (folder / "train.csv").exists():
            with open(folder / "train.csv", encoding="utf-8") as f:
                labels = {row[0] for row in csv.reader(f)}
        else:
            with open(folder / "train.tsv", encoding="utf-8-sig") as f:
                rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
            rows = rows if name == "CoLA" else rows[1:]  # CoLA has no header
            labels = {row[label_column.get(name, -1)] for row in rows}
        assert sorted(task.label_index(label) for label in labels) == list(range(len(task.labels))), name


def test_nopunct_keeps_unpunctuated_sentence(bpe_tokenizer):
    enc = PromptEncoder(bpe_tokenizer, get_task("MNLI"))
    assert enc.render("so i played again", "We Won!") == "<s>so i played again?<mask>, we Won!</s>"


@pytest.mark.parametrize("tok_name", TOKENIZERS)
def test_truncation_keeps_template_mask_and_both_sentences(tok_name, request):
    tok = request.getfixturevalue(tok_name)
    enc = PromptEncoder(tok, get_task("MNLI"), max_length=32)
    long_a, long_b = " ".join(["alpha"] * 100), " ".join(["Beta"] * 100)
    out = enc.encode(long_a, long_b)
    ids, pos = out["input_ids"], out["mask_pos"]
    assert len(ids) == 32 and ids.count(tok.mask_token_id) == 1
    question, comma = tok.encode("?", add_special_tokens=False), tok.encode(",", add_special_tokens=False)
    assert ids[pos - 1 : pos] == question and ids[pos + 1 : pos + 2] == comma
    first, second = ids[1 : pos - 1], ids[pos + 2 : -1]
    assert abs(len(first) - len(second)) <= 1  # longest first
    # cut from the end of each sentence
    assert first == tok.encode(long_a, add_special_tokens=False)[: len(first)]
    assert second == tok.encode(" b" + long_b[1:], add_special_tokens=False)[: len(second)]  # lowerfirst

    out = enc.encode(long_a, "Short one.")
    assert len(out["input_ids"]) == 32
    assert tok.decode(out["input_ids"][out["mask_pos"] + 2 : -1]).strip() == tok.decode(
        tok.encode(" short one.", add_special_tokens=False)
    ).strip()


@pytest.mark.parametrize("tok_name", TOKENIZERS)
def test_truncation_single_sentence(tok_name, request):
    tok = request.getfixturevalue(tok_name)
    enc = PromptEncoder(tok, get_task("SST-2"), max_length=32)
    out = enc.encode("word " * 300)
    ids = out["input_ids"]
    assert len(ids) == 32 and out["mask_pos"] == 29
    assert ids[-5:] == enc.encode("x")["input_ids"][-5:]  # " It was <mask> ." + end token intact


def test_template_longer_than_max_length(wordpiece_tokenizer):
    task = Task("long", "{x0} " + "very " * 40 + "long {mask}.", {"0": "No", "1": "Yes"})
    msg = r"task 'long': template .* takes 45 tokens .* more than max_length=32"
    with pytest.raises(PromptError, match=msg):
        PromptEncoder(wordpiece_tokenizer, task, max_length=32)


def test_encode_batch_pads(bpe_tokenizer):
    enc = PromptEncoder(bpe_tokenizer, get_task("RTE"))
    batch = enc.encode_batch(["Short.", "A much longer first sentence here."], ["Yes.", "No it is not."])
    singles = [
        enc.encode("Short.", "Yes."),
        enc.encode("A much longer first sentence here.", "No it is not."),
    ]
    width = max(len(s["input_ids"]) for s in singles)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, width)
    assert batch["mask_pos"].tolist() == [s["mask_pos"] for s in singles]
    n = len(singles[0]["input_ids"])
    assert batch["input_ids"][0, :n].tolist() == singles[0]["input_ids"]
    assert batch["input_ids"][0, n:].eq(bpe_tokenizer.pad_token_id).all()
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (width - n)
    assert batch["input_ids"].dtype == batch["mask_pos"].dtype == torch.long


def test_mask_text_in_input_is_not_a_second_mask(wordpiece_tokenizer):
    out = PromptEncoder(wordpiece_tokenizer, get_task("SST-2")).encode("I wrote [MASK] here.")
    assert out["input_ids"].count(wordpiece_tokenizer.mask_token_id) == 1


def test_multiple_label_words_are_averaged(wordpiece_tokenizer):
    task = Task("multi", "{x0} It was {mask}.", {"0": ["terrible", "bad"], "1": "great"})
    enc = PromptEncoder(wordpiece_tokenizer, task)
    assert enc.label_word_ids == [wordpiece_tokenizer.convert_tokens_to_ids(["terrible", "bad"]), [2307]]
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [0.0, 10.0, 20.0, 30.0, 40.0]])
    expected = torch.tensor([[2.0, 5.0, 3.0], [10.0, 40.0, 20.0]])
    assert torch.equal(class_logits(logits, [[0, 2], [4], [1, 2, 3]]), expected)


def test_label_word_not_single_token(wordpiece_tokenizer, bpe_tokenizer):
    task = Task("MNLI", "{x0|nopunct}? {mask}, {x1}", {"0": "No", "1": "Maybee"})
    msg = (
        "label word 'Maybee' of task 'MNLI' is not a single token for tokenizer BertTokenizer: "
        "it tokenizes to ['maybe', '##e']; choose a word that is one token"
    )
    with pytest.raises(PromptError, match=re.escape(msg)):
        PromptEncoder(wordpiece_tokenizer, task)
    with pytest.raises(PromptError, match=re.escape("tokenizes to ['ĠMaybe', 'e']")):
        PromptEncoder(bpe_tokenizer, task)


def test_a_word_of_several_tokens_takes_one_mask_per_piece_when_asked(bpe_tokenizer):
    """multi_token off (the default): a word of two pieces is the single-token error, which now
    names the opt-in. On: {mask} becomes as many masks as the longest word has pieces, side
    by side, and mask_pos lists them."""
    verbalizer = {"0": "awful", "1": "great"}  # ' awful' is 2 pieces in the tiny BPE vocabulary
    with pytest.raises(PromptError, match=r"label word 'awful' of task 't' is not a single token for tokenizer "
                                          r"RobertaTokenizer: it tokenizes to \['Ġaw', 'ful'\].*multi_token: true"):
        PromptEncoder(bpe_tokenizer, Task("t", "{x0} It was {mask}.", verbalizer))
    enc = PromptEncoder(bpe_tokenizer, Task("t", "{x0} It was {mask}.", verbalizer, multi_token=True))
    aw, ful = bpe_tokenizer.convert_tokens_to_ids(["Ġaw", "ful"])
    assert enc.num_masks == 2 and enc.label_word_ids == [[(aw, ful)], [(bpe_tokenizer.convert_tokens_to_ids("Ġgreat"),)]]
    e = enc.encode("A fine film")
    ids = e["input_ids"]
    assert [i for i, t in enumerate(ids) if t == bpe_tokenizer.mask_token_id] == e["mask_pos"] == [e["mask_pos"][0],
                                                                                                   e["mask_pos"][0] + 1]
    assert bpe_tokenizer.decode(ids[e["mask_pos"][1] + 1:]).startswith(".")
    batch = enc.encode_batch(["A fine film", "Dull"])
    assert batch["mask_pos"].shape == (2, 2)


def test_multi_token_scores_are_the_mean_log_probability_of_the_pieces():
    """PET's multi-token score by hand: V = 3, M = 2 masks; mask 0 logits (0, 0, 0) -> log p =
    -ln 3 each; mask 1 logits (ln 2, 0, 0) -> p = (1/2, 1/4, 1/4). Class 0: the word (0, 1)
    -> (-ln 3 + ln 1/4) / 2; class 1: the words (2,) and (1, 0) -> mean of -ln 3 and
    (-ln 3 + ln 1/2) / 2."""
    import math

    logits = torch.tensor([[[0.0, 0.0, 0.0], [math.log(2), 0.0, 0.0]]])  # [B=1, M=2, V=3]
    got = class_logits(logits, [[(0, 1)], [(2,), (1, 0)]])
    want = [(-math.log(3) + math.log(0.25)) / 2, (-math.log(3) + (-math.log(3) + math.log(0.5)) / 2) / 2]
    assert got.shape == (1, 2) and torch.allclose(got[0], torch.tensor(want), atol=1e-6)


def test_label_word_unknown_or_shared(wordpiece_tokenizer):
    msg = r"label word '☃' of task 't' is unknown to tokenizer BertTokenizer \(maps to \[UNK\]\)"
    with pytest.raises(PromptError, match=msg):
        PromptEncoder(wordpiece_tokenizer, Task("t", "{x0} {mask}", {"0": "☃", "1": "great"}))
    with pytest.raises(PromptError, match="two labels share a label word"):  # uncased: Yes == yes
        PromptEncoder(wordpiece_tokenizer, Task("t", "{x0} {mask}", {"0": "yes", "1": "Yes"}))


def test_tokenizer_without_mask_token(bpe_tokenizer):
    tok = copy.deepcopy(bpe_tokenizer)
    tok.mask_token = None
    msg = r"tokenizer RobertaTokenizer has no mask token; task 'SST-2' needs a masked-LM"
    with pytest.raises(PromptError, match=msg):
        PromptEncoder(tok, get_task("SST-2"))


def test_template_spelling_the_mask_token(bpe_tokenizer):
    with pytest.raises(PromptError, match=r"spells the mask token; write \{mask\}"):
        PromptEncoder(bpe_tokenizer, Task("t", "{x0} It was <mask> {mask}", {"0": "No", "1": "Yes"}))


def test_encode_bad_inputs(wordpiece_tokenizer):
    enc = PromptEncoder(wordpiece_tokenizer, get_task("RTE"))
    with pytest.raises(DataError, match=r"input sentence x1 for task 'RTE' must be a string, got 3"):
        enc.encode("A premise.", 3)
    with pytest.raises(DataError, match=r"task 'RTE' takes 2 input sentence\(s\) .* but got 1"):
        enc.encode("A premise.")
    with pytest.raises(DataError, match="got 2 first sentences but 1 second"):
        enc.encode_batch(["a", "b"], ["c"])


def test_regression_target_and_prediction():
    y = torch.tensor([0.0, 2.0, 5.0, 3.75])
    target = regression_target(y, (0, 5))
    assert torch.allclose(target, torch.tensor([[1.0, 0.0], [0.6, 0.4], [0.0, 1.0], [0.25, 0.75]]))
    assert torch.allclose(regression_prediction(target, (0, 5)), y)
    probs = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    assert torch.allclose(regression_prediction(probs, (1, 3)), torch.tensor([2.0, 1.2]))
    with pytest.raises(DataError, match=r"regression labels \[5.5\] lie outside bounds \(0, 5\)"):
        regression_target(torch.tensor([1.0, 5.5]), (0, 5))


def test_label_index():
    rte = get_task("RTE")
    assert [rte.label_index(l) for l in ("not_entailment", " entailment\n")] == [0, 1]
    assert get_task("trec").label_index(5) == get_task("trec").label_index("5") == 5
    msg = "unknown label 'maybe' for task 'RTE'; known labels: ['not_entailment', 'entailment']"
    with pytest.raises(DataError, match=re.escape(msg)):
        rte.label_index("maybe")
    with pytest.raises(DataError, match="task 'STS-B' is a regression task"):
        get_task("STS-B").label_index("3.2")


YAML = """
tasks:
  - name: review
    template: "Review: {x0} Verdict: {mask}!"
    verbalizer: {0: bad, 1: [good, great]}
    metric: f1
  - name: similarity
    template: "{x0} {mask} {x1}"
    verbalizer: {low: "No", high: "Yes"}
    metric: pearson
    bounds: [1, 3]
"""


def test_yaml_custom_tasks(tmp_path, bpe_tokenizer):
    path = tmp_path / "tasks.yaml"
    path.write_text(YAML)
    tasks = load_tasks(path)
    review, similarity = tasks["review"], tasks["similarity"]
    assert review.labels == ["0", "1"] and review.label_index(1) == 1 and review.metric == "f1"
    assert similarity.bounds == (1.0, 3.0) and similarity.is_regression and similarity.num_inputs == 2
    enc = PromptEncoder(bpe_tokenizer, review)
    assert enc.render("Loved it.") == "<s>Review: Loved it. Verdict:<mask>!</s>"
    assert [len(ids) for ids in enc.label_word_ids] == [1, 2]
    # a bare list works too
    path.write_text("- {name: s, template: '{x0} It was {mask}.', verbalizer: {0: terrible, 1: great}}\n")
    assert load_tasks(path)["s"].template == "{x0} It was {mask}."


def test_load_tasks_bad_files(tmp_path):
    with pytest.raises(DataError, match="cannot read tasks file .*missing.yaml"):
        load_tasks(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [\n")
    with pytest.raises(DataError, match="is not valid YAML"):
        load_tasks(bad)
    bad.write_text("tasks: {name: x}\n")
    with pytest.raises(DataError, match="must hold a non-empty list of tasks"):
        load_tasks(bad)
    bad.write_text("- {name: x, template: '{x0} {mask}', verbalizer: {0: bad, 1: good}}\n" * 2)
    with pytest.raises(PromptError, match=r"bad.yaml: task 'x' is defined twice"):
        load_tasks(bad)
    bad.write_text("- {name: x, template: '{x0}', verbalizer: {0: bad, 1: good}}\n")
    with pytest.raises(PromptError, match=r"bad.yaml: task 'x': template '\{x0\}' has no \{mask\} slot"):
        load_tasks(bad)


GOOD = {"name": "t", "template": "{x0} It was {mask}.", "verbalizer": {"0": "bad", "1": "good"}}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"template": "{x0} It was good."}, r"task 't': template '\{x0\} It was good.' has no \{mask\} slot"),
        ({"template": "{x0} {mask} or {mask}."}, r"has 2 \{mask\} slots"),
        ({"template": "{x0} {mask} {x2}"}, r"unknown slot \{x2\}; slots are \{x0\}, \{x1\}"),
        ({"template": "{x0|upper} {mask}"}, r"unknown modifier \|upper in \{x0\|upper\}"),
        ({"template": "{x1} {mask}"}, r"must use \{x0\} .* it uses \['x1'\]"),
        ({"template": "{x0 {mask}"}, "unbalanced brace"),
        ({"metric": "bleu"}, "task 't': unknown metric 'bleu'; choose one of acc, f1, pearson, mcc"),
        ({"metric": "pearson"}, "task 't': metric pearson makes it a regression task, which needs bounds"),
        ({"bounds": [5, 0]}, r"bounds must be \[low, high\] with low < high"),
        ({"bounds": [0, 5], "verbalizer": {"0": "a", "1": "b", "2": "c"}}, "regression task needs exactly 2"),
        ({"verbalizer": {"0": "only"}}, "verbalizer must map at least 2 labels"),
        ({"verbalizer": {"0": "bad", "1": []}}, "label '1' must map to a word or a list of words"),
        ({"verbalizer": ["bad", "good"]}, "verbalizer must map labels to words"),
        ({"verbalizer": {"0": False, "1": True}}, r"label '0' must map .* got False: YAML reads unquoted"),
        ({"labels": ["0"]}, r"task 't' has unknown keys \['labels'\]"),
        ({"lmbff_exact": "yes"}, "task 't': lmbff_exact must be true or false, got 'yes'"),
    ],
)
def test_task_from_dict_rejects(change, message):
    with pytest.raises(PromptError, match=message):
        task_from_dict({**GOOD, **change})


def test_task_from_dict_missing_key_and_unknown_task():
    with pytest.raises(PromptError, match=r"task 't' has missing keys \['verbalizer'\]"):
        task_from_dict({"name": "t", "template": "{x0} {mask}"})
    with pytest.raises(PromptError, match="unknown task 'nope'; built-in tasks: SST-2, sst-5, mr"):
        get_task("nope")


def test_empty_sentence_renders_template_only(wordpiece_tokenizer):
    """LM-BFF's cr test set has a row with no text; it is scored on the bare prompt."""
    enc = PromptEncoder(wordpiece_tokenizer, get_task("cr"))
    assert enc.render(" ") == "[CLS] it was [MASK]. [SEP]"


# --- lmbff_exact: LM-BFF's own tokenisation (src/dataset.py tokenize_multipart_input) -------

_LMBFF_NLI = "*cls**sent-_0*?*mask*,*+sentl_1**sep+*"
# task -> (LM-BFF's template from run_experiment.sh, text_a and text_b columns of its processor)
LMBFF = {
    "RTE": (_LMBFF_NLI, 1, 2),
    "QNLI": (_LMBFF_NLI, 1, 2),
    "SNLI": (_LMBFF_NLI, 7, 8),
    "MNLI": (_LMBFF_NLI, 8, 9),
    "MRPC": ("*cls**sent_0**mask*,*+sentl_1**sep+*", 3, 4),
}
# LM-BFF's sentence parts: name -> (space before, lowercase first letter, drop last character)
LMBFF_SENTENCE = {
    "sent": (False, False, False), "+sent": (True, False, False), "sent-": (False, False, True),
    "sentl": (False, True, False), "+sentl": (True, True, False), "sentl-": (False, True, True),
}
# Measured on seed 13 train+dev at max_length 128: (examples whose default and exact ids differ,
# examples where LM-BFF's tail cut loses the mask, i.e. LM-BFF fails; its RTE runs use 256)
MEASURED = {
    "wordpiece_tokenizer": {"RTE": (3, 8), "QNLI": (0, 0), "SNLI": (3, 0), "MNLI": (19, 0), "MRPC": (0, 0)},
    "bpe_tokenizer": {"RTE": (3, 15), "QNLI": (2, 0), "SNLI": (3, 0), "MNLI": (26, 0), "MRPC": (0, 0)},
}


def lmbff_tokenize(template: str, texts: list[str], tok, max_length: int) -> list[int] | None:
    """LM-BFF's prompt tokenisation without demonstrations, written from its code: parts
    between '*', '_' in literals is a space, one-character literals are vocabulary lookups,
    the whole sequence's tail is cut. None where LM-BFF fails (the cut loses the mask)."""
    enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    special = {"cls": tok.cls_token_id, "mask": tok.mask_token_id, "sep": tok.sep_token_id, "sep+": tok.sep_token_id}
    ids = []
    for part in template.split("*"):
        name, _, index = part.partition("_")
        if part in special:
            ids.append(special[part])
        elif name in LMBFF_SENTENCE and index.isdigit():
            space, lower, drop = LMBFF_SENTENCE[name]
            text = texts[int(index)]
            text = text[:1].lower() + text[1:] if lower else text
            text = text[:-1] if drop else text
            ids += enc(" " + text if space else text)
        else:
            part = part.replace("_", " ")
            ids += [tok.convert_tokens_to_ids(part)] if len(part) == 1 else enc(part)
    ids = ids[:max_length]
    return ids if tok.mask_token_id in ids else None


def lmbff_rows(task: str, split: str) -> list[list[str]]:
    """A k-shot TSV read as LM-BFF's processors read it (transformers' DataProcessor._read_tsv)."""
    with open(asset("fewshot", "k-shot", task, "16-13", f"{split}.tsv"), encoding="utf-8-sig") as f:
        return list(csv.reader(f, delimiter="\t", quotechar=None))[1:]


@pytest.mark.parametrize("tok_name", TOKENIZERS)
@pytest.mark.parametrize("task_name", list(LMBFF))
def test_lmbff_exact_gives_lmbff_token_ids(task_name, tok_name, request):
    """Every seed-13 train/dev example, at max_length 128 (long RTE pairs: the tail cut)."""
    tok = request.getfixturevalue(tok_name)
    template, a, b = LMBFF[task_name]
    default = PromptEncoder(tok, get_task(task_name))
    exact = PromptEncoder(tok, dataclasses.replace(get_task(task_name), lmbff_exact=True))
    dev = "dev_matched" if task_name == "MNLI" else "dev"
    rows = lmbff_rows(task_name, "train") + lmbff_rows(task_name, dev)
    differ = cut = lmbff_fails = 0
    for row in rows:
        texts = [row[a], row[b]]
        want, got = lmbff_tokenize(template, texts, tok, 128), exact.encode(*texts)["input_ids"]
        if want is None:  # LM-BFF's cut loses the mask; rayapp cuts the sentences (encode keeps the mask)
            lmbff_fails += 1
        else:
            assert got == want, (texts, tok.convert_ids_to_tokens(got), tok.convert_ids_to_tokens(want))
        differ += got != default.encode(*texts)["input_ids"]
        cut += len(got) == 128 and got[-1] != tok.sep_token_id
    assert (differ, lmbff_fails) == MEASURED[tok_name][task_name]
    assert cut > 0 or task_name != "RTE"  # RTE exercises LM-BFF's tail cut


def test_lmbff_exact_rules(wordpiece_tokenizer, bpe_tokenizer):
    mnli, mrpc = get_task("MNLI"), get_task("MRPC")
    exact = PromptEncoder(wordpiece_tokenizer, dataclasses.replace(mnli, lmbff_exact=True))
    assert exact.render("a girl wears black", "We Won!") == "[CLS] a girl wears blac? [MASK], we won! [SEP]"
    default = PromptEncoder(wordpiece_tokenizer, mnli)
    assert default.render("a girl wears black", "We Won!") == "[CLS] a girl wears black? [MASK], we won! [SEP]"
    # no stripping: byte-level BPE keeps the data's trailing space as its own token
    for task, expected in [(mrpc, ["<s>", "It", "Ġended", ".", "<mask>"]),
                           (dataclasses.replace(mrpc, lmbff_exact=True), ["<s>", "It", "Ġended", ".", "Ġ"])]:
        ids = PromptEncoder(bpe_tokenizer, task).encode("It ended. ", "Yes.")["input_ids"]
        assert bpe_tokenizer.convert_ids_to_tokens(ids)[:5] == expected


def test_lmbff_exact_truncation(wordpiece_tokenizer):
    tok = wordpiece_tokenizer
    exact = PromptEncoder(tok, dataclasses.replace(get_task("RTE"), lmbff_exact=True), max_length=16)
    full = PromptEncoder(tok, dataclasses.replace(get_task("RTE"), lmbff_exact=True), max_length=512)
    long_b = " ".join(["beta"] * 40)
    assert exact.encode("A short one.", long_b)["input_ids"] == full.encode("A short one.", long_b)["input_ids"][:16]
    # LM-BFF's cut would lose the mask here (it fails): exact mode cuts the sentences instead
    out = exact.encode(" ".join(["alpha"] * 40) + ".", "Yes.")
    assert out["input_ids"][-1] == tok.sep_token_id and len(out["input_ids"]) == 16
    assert out["input_ids"][out["mask_pos"]] == tok.mask_token_id


def test_lmbff_exact_from_yaml():
    task = task_from_dict({**GOOD, "lmbff_exact": True})
    assert task.lmbff_exact and not task_from_dict(GOOD).lmbff_exact
