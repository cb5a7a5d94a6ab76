"""LM-BFF's automatic prompts (Gao et al. 2021 §5): label words and templates searched per
few-shot split, written as tasks YAML files that `finetune tasks_file=` reads (Ray Data).

    (task, split seed) items ──► autoscaling actor pool, one split per call:
    (driver)                     label words (the MLM) ─► templates (T5, ranked by the MLM)
                                 ─► OUT/ranking/TASK/K-SEED.json
    then the driver writes       OUT/auto-template/K-SEED.yaml, OUT/auto-label/K-SEED.yaml, OUT/_meta.json

Label words (§5.1; tools/generate_labels.py, src/label_search.py, tools/run_generate_labels.sh).
The masked LM (`model`; LM-BFF: the model it then fine-tunes, roberta-large) reads the task's
manual template zero-shot on the split's train set. Per class, its `k_likely` (100) most
likely words: the vocabulary tokens by the sum over the class's train examples of their
log-probability at the mask, keeping only tokens that are one whole word (`" " + word`
tokenises to exactly that token: LM-BFF's "Ġ" words). Every assignment of one candidate per
class, words distinct, is scored by zero-shot accuracy on train (Pearson of the high word's
probability for regression, whose classes are the two sides of the range: `Task.class_of`);
the `n_pairs` (100) best are re-ranked by the task's metric on the dev set.

Templates (§5.2; tools/generate_template.py). T5 (`t5`; LM-BFF: t5-3b, SMASH's scale t5-large)
fills two spans around each train example and its label word (the manual verbalizer's):
single sentences in two forms, `x <X> word <Y>` (mask after the sentence) and `. <X> word <Y> x`
(mask before it), pairs as `x0 <X> word <Y> x1`. Beam search (`beam`, 100) over the decoder,
one beam for all examples at once: a continuation's score is the log-softmax of the decoder's
logits averaged over the examples, as LM-BFF's `generate` scores it; a beam is done when it
has closed both spans (`<extra_id_1>`, then `<extra_id_2>` or `</s>`), at most
`decode_length` - 2 steps. Each result becomes a rayapp template (`<X>` -> the sentence slot
and span 1, `<Y>` -> `{mask}` and span 2, `T5_FORMATS`); single-sentence tasks keep the best
beam/2 of each form, pairs all `beam`. The templates that parse and encode are ranked by the
MLM's zero-shot metric on dev with the manual label words.

Output. `ranking/TASK/K-SEED.json`: the manual prompt's zero-shot dev score, the templates and
the label-word assignments in rank order with their scores. `auto-template/K-SEED.yaml`: per
task of the run, its best template with the manual words (LM-BFF's "auto T", what SMASH's
LM-BFF row uses: `tasks_file=OUT/auto-template/{k}-{seed}.yaml` in a sweep); a task whose
generated templates all failed to parse keeps its manual one, with a warning.
`auto-label/K-SEED.yaml`: the manual template with the best words ("auto L"). Both are
`registry.load_tasks` files, their task names the tasks' own (the split and metric stay).

Resume. `_plan.json` (the settings that shape a result) is written first (`shards.begin`), a
split's ranking file whole when it is done; a re-run into the same folder with the same plan
searches only the splits without one. The YAML files and `_meta.json` come last.

Where this differs from LM-BFF, and why:
- Ranking. LM-BFF fine-tunes every candidate template and assignment (1000 steps, batch 8,
  lr 1e-5) and ranks them by fine-tuned dev accuracy; here they are ranked by zero-shot dev
  (one forward pass over dev per template): a search of 100 fine-tunes per split and task is
  600 times the Table 2 row it feeds. To rank the top ones by fine-tuned dev as LM-BFF does,
  sweep them: an `axis` over `template` (or `verbalizer`) with `by_seed` values taken from the
  ranking files (`rayapp.sweep.axis`).
- Candidate words are ranked by summed log-probability (the paper's §5.1); LM-BFF's code ranks
  by the mean raw logit, which a per-example shift of all logits moves. LM-BFF re-ranks TREC's
  candidates by their nearest neighbours of the manual words (`use_seed_labels`): not here.
- Brute force over k^C assignments is LM-BFF's; where k^C exceeds `max_assignments` (SST-5's
  100^5) each class keeps its floor(max_assignments^(1/C)) best candidates instead.
- Regression classes split at the midpoint of the bounds (LM-BFF: the train labels' median).
- T5's input is tokenised part by part as LM-BFF's `get_text` does (sentinels by id, the one-
  character literal "." looked up as a token). Banned while decoding: the lone word start "▁"
  and a piece of dots right after another (LM-BFF bans "▁", "." after "." and two ids of
  T5's vocabulary its comments call runs of dots).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import torch
import yaml

from rayapp import env, storage
from rayapp.assets import fewshot_dir
from rayapp.config import InputPath, ModelRef, OutputPath, require_counts
from rayapp.data import shards
from rayapp.data.fewshot import SEEDS, Example, FewShotSplit, load_lmbff
from rayapp.errors import ConfigError, PromptError
from rayapp.modeling.models import (check_model, is_seq2seq, load_mlm, load_model_config, load_tokenizer,
                                    local_model_dir, portable_model)
from rayapp.modeling.scorer import TeacherScorer, actor_device, default_batch_size, pool_args
from rayapp.recipes.finetune import find_task, gold_labels
from rayapp.tasks.metrics import compute_metric, pearson
from rayapp.tasks.prompts import (MODIFIERS, SENTINEL, WORD_START, PromptEncoder, Task, class_logits, mask_slot_token,
                                  pad_ids, parse_template, predicted)
from rayapp.tasks.registry import task_to_dict, with_prompt

log = logging.getLogger(__name__)

STAGE = "lmbff-search"
RANKING, AUTO_TEMPLATE, AUTO_LABEL = "ranking", "auto-template", "auto-label"
T5_INPUT_TOKENS = 256  # LM-BFF cuts a long single-sentence T5 input to this many tokens


@dataclass
class SearchConfig:
    """`rayapp lmbff-search --config FILE key=value ...`"""

    out: OutputPath                     # the search folder (module docstring), local or s3://
    tasks: list[str]                    # task names (built in, or in tasks_file)
    model: ModelRef = "roberta-large"   # the masked LM that scores label words and templates
    t5: ModelRef | None = "t5-large"    # generates templates; null: no template search
    label_words: bool = True            # search label words
    tasks_file: InputPath | None = None  # the users' tasks (their manual prompts seed the search)
    data_dir: InputPath | None = None   # LM-BFF k-shot root; None: the mirror's or the local assets
    k: int = 16
    seeds: list[int] = field(default_factory=lambda: list(SEEDS))
    k_likely: int = 100                 # candidate words per class (LM-BFF's k)
    n_pairs: int = 100                  # assignments kept by train accuracy, then ranked on dev (LM-BFF's n)
    max_assignments: int = 1_000_000    # most assignments scored (module docstring)
    beam: int = 100                     # T5 beam width (LM-BFF's)
    decode_length: int = 20             # decoder positions, its start token included (LM-BFF's max_length)
    max_length: int = 256               # MLM prompt tokens (LM-BFF's search: max_seq_len 256)
    batch_size: int | None = None       # MLM sequences per forward pass; None: sized for the device
    rows_per_pass: int = 1024           # T5 decoder rows per forward pass (beams x train examples)
    num_actors: int | None = None       # most searching actors; None: as many as the cluster gives
    use_gpu: bool = False               # one GPU per actor
    cpus_per_actor: int = 1

    def __post_init__(self) -> None:
        require_counts(self, "k", "k_likely", "n_pairs", "max_assignments", "beam", "max_length", "rows_per_pass", "cpus_per_actor", "batch_size", "num_actors")
        if self.decode_length < 3:
            raise ConfigError(f"decode_length={self.decode_length} must be >= 3: the decoder's start token and "
                              "two spans")
        if not self.tasks or not self.seeds:
            raise ConfigError("give at least one task and one seed (tasks=[SST-2] seeds=[13])")
        if self.t5 is None and not self.label_words:
            raise ConfigError("nothing to search: set t5= (templates) or label_words=true")


# --- label words (§5.1) ---------------------------------------------------------------------

def _word(tokenizer, token: int) -> str | None:
    """The word `token` is as a label word (`" " + word` tokenises to it alone), else None."""
    word = tokenizer.decode([token]).strip()
    if not word or token in tokenizer.all_special_ids:
        return None
    return word if tokenizer.encode(" " + word, add_special_tokens=False) == [token] else None


def likely_words(tokenizer, scores: torch.Tensor, k: int) -> dict[int, str]:
    """The `k` best-scoring tokens that are label words, best first: token -> word."""
    found = {}
    for token in torch.argsort(scores, descending=True, stable=True).tolist():
        word = _word(tokenizer, token)
        if word is not None:
            found[token] = word
            if len(found) == k:
                break
    return found


def _mask_scores(scorer, encoder: PromptEncoder, examples: list[Example], batch_size: int,
                 reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`reduce(logits at the mask)` of `examples` in `encoder`'s prompt, zero-shot, in order."""
    encoded = [encoder.encode(e.text_a, e.text_b) for e in examples]
    return scorer.score(encoded, batch_size, lambda logits: {"x": reduce(logits)})["x"]


def _metric(task: Task, scores: torch.Tensor, examples: list[Example]) -> float:
    return compute_metric(task.metric, predicted(scores, task).numpy(), gold_labels(task, examples).numpy())


def _dev_score(scorer, encoder: PromptEncoder, split: FewShotSplit, batch_size: int) -> float:
    """The task's metric on the split's dev set, zero-shot, in `encoder`'s prompt."""
    scores = _mask_scores(scorer, encoder, split.dev, batch_size,
                          lambda logits: class_logits(logits, encoder.label_word_ids))
    return _metric(encoder.task, scores, split.dev)


def search_label_words(scorer, split: FewShotSplit, k_likely: int, n_pairs: int, max_assignments: int,
                       batch_size: int) -> list[dict]:
    """Label-word assignments for `scorer`'s task (its manual template) on `split`, best first:
    `{"verbalizer", "train", "dev"}` (module docstring)."""
    encoder = scorer.encoder
    task, tokenizer = encoder.task, encoder.tokenizer
    train, dev = (_mask_scores(scorer, encoder, examples, batch_size, lambda logits: logits.log_softmax(-1))
                  for examples in (split.train, split.dev))
    classes = torch.tensor([task.class_of(e.label) for e in split.train])
    per_class = min(k_likely, int(max_assignments ** (1 / len(task.labels)) + 1e-6))
    candidates = [likely_words(tokenizer, train[classes == c].sum(0), per_class) for c in range(len(task.labels))]
    words = {t: w for found in candidates for t, w in found.items()}
    grid = np.stack(np.meshgrid(*[list(found) for found in candidates], indexing="ij"), -1).reshape(-1, len(candidates))
    ordered = np.sort(grid, 1)
    grid = torch.as_tensor(grid[(ordered[:, 1:] != ordered[:, :-1]).all(1)])  # one word per class
    if not len(grid):
        raise PromptError(f"task {task.name}: no assignment of distinct one-token words per class among the "
                          f"{per_class} candidates of each; raise k_likely")
    # train score of every assignment: accuracy (Pearson for regression), in chunks of assignments
    gold = gold_labels(task, split.train).numpy()
    score = []
    for chunk in grid.split(max(1, 2 ** 22 // (len(split.train) * grid.shape[1]))):
        preds = predicted(train[:, chunk].transpose(0, 1), task).numpy()  # [assignments, examples]
        score += [pearson(p, gold) for p in preds] if task.is_regression else list((preds == gold).mean(1))
    best = np.argsort(-np.asarray(score), kind="stable")[:n_pairs]
    found = []
    for i in best.tolist():
        ids = grid[i]
        found.append({"verbalizer": {label: words[int(t)] for label, t in zip(task.labels, ids)},
                      "train": float(score[i]), "dev": _metric(task, dev[:, ids], split.dev)})
    return sorted(found, key=lambda f: -f["dev"])  # stable: ties keep the train order


# --- templates (§5.2) -----------------------------------------------------------------------

def _upper_first(s: str) -> str:
    return s[:1].upper() + s[1:]  # LM-BFF's *sentu_0*, in T5's input only


def _lower_first(s: str) -> str:
    return MODIFIERS["lowerfirst"](s)


def _no_punct(s: str) -> str:
    return MODIFIERS["nopunct"](s)  # rayapp's nopunct (tasks.prompts), as the template that comes of it


@dataclass(frozen=True)
class T5Format:
    """One of LM-BFF's T5 inputs for template generation and how T5's output becomes a
    rayapp template: `marks` replace the sentinels and `</s>` in the generated text."""

    inputs: int                                      # sentences of the tasks it serves
    parts: Callable[[list[str], str], list[str]]     # (sentences, label word) -> T5 input parts
    marks: dict[str, str]
    keep: str | None                                 # "start"/"end": what a long input keeps


_X, _Y, _Z, _EOS = SENTINEL, "<extra_id_1>", "<extra_id_2>", "</s>"
_TOKENS = {_X, _Y, _Z, _EOS, "."}  # looked up as one token (module docstring), the rest tokenised

# LM-BFF's templates for T5 (its *cls* dropped: T5 has none; its *sep+* is T5's </s>)
T5_FORMATS = {
    # *cls**sentu_0**<extra_id_0>**label**<extra_id_1>**sep+*
    "mask-after": T5Format(1, lambda x, w: [_upper_first(x[0]), _X, " " + w, _Y, _EOS],
                           {_X: "{x0}", _Y: " {mask}", _Z: "", _EOS: ""}, keep="end"),
    # *cls*.*<extra_id_0>**label**<extra_id_1>**+sentu_0**sep+*
    "mask-before": T5Format(1, lambda x, w: [".", _X, " " + w, _Y, " " + _upper_first(x[0]), _EOS],
                            {_X: "", _Y: " {mask}", _Z: " {x0}", _EOS: " {x0}"}, keep="start"),
    # *cls**sent-_0**<extra_id_0>**label**<extra_id_1>**+sentl_1**sep+*
    "pair": T5Format(2, lambda x, w: [_no_punct(x[0]), _X, " " + w, _Y, " " + _lower_first(x[1]), _EOS],
                     {_X: "{x0|nopunct}", _Y: " {mask}", _Z: " {x1|lowerfirst}", _EOS: " {x1|lowerfirst}"}, keep=None),
}


def t5_input(tokenizer, fmt: T5Format, example: Example, word: str) -> list[int]:
    """T5's input ids for `example` and its label word in format `fmt` (LM-BFF's `get_text`)."""
    sentences = [example.text_a] if example.text_b is None else [example.text_a, example.text_b]
    ids = []
    for part in fmt.parts([s.strip() for s in sentences], word):
        ids += ([tokenizer.convert_tokens_to_ids(part)] if part in _TOKENS
                else tokenizer.encode(part, add_special_tokens=False))
    if fmt.keep is not None and len(ids) > T5_INPUT_TOKENS:
        ids = ids[-T5_INPUT_TOKENS:] if fmt.keep == "end" else ids[:T5_INPUT_TOKENS]
    return ids


@torch.inference_mode()
def beam_search(model, tokenizer, inputs: list[list[int]], beam: int, decode_length: int,
                rows_per_pass: int = 1024) -> list[tuple[list[int], float]]:
    """LM-BFF's `generate`: the two spans T5 writes for all `inputs` at once (module
    docstring), as (generated ids, log-likelihood), best first."""
    from transformers.modeling_outputs import BaseModelOutput

    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in pad_ids(inputs, tokenizer.pad_token_id))
    hidden = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    n, ends, eos = len(inputs), [None, *tokenizer.convert_tokens_to_ids([_Y, _Z])], tokenizer.eos_token_id
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    banned = torch.tensor([p == WORD_START for p in pieces], device=device)
    dots = {i for i, p in enumerate(pieces) if p and p.strip(WORD_START) and not p.strip(WORD_START).strip(".")}
    beams = [([], 0.0, 1)]  # (generated ids, log-likelihood, the span being written: 1, 2; 3 = done)
    for _ in range(decode_length - 2):
        live = [b for b in beams if b[2] <= 2]
        if not live:
            break
        means = []
        per = max(1, rows_per_pass // n)
        for start in range(0, len(live), per):
            chunk = live[start:start + per]
            decoder = torch.tensor([[model.config.decoder_start_token_id, *b[0]] for b in chunk], device=device)
            out = model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden.repeat(len(chunk), 1, 1)),
                        attention_mask=mask.repeat(len(chunk), 1), decoder_input_ids=decoder.repeat_interleave(n, 0))
            means.append(out.logits[:, -1, :len(tokenizer)].float().view(len(chunk), n, -1).mean(1))
        scores = torch.cat(means).log_softmax(-1).masked_fill(banned, float("-inf"))
        top = scores.topk(min(beam + 3, scores.shape[-1]), -1)  # LM-BFF's candidates per beam
        grown = [b for b in beams if b[2] > 2]
        for (tokens, ll, span), values, indices in zip(live, top.values.tolist(), top.indices.tolist()):
            for lp, t in zip(values, indices):
                if lp == float("-inf") or (tokens and tokens[-1] in dots and t in dots):
                    continue
                grown.append(([*tokens, t], ll + lp, span + (t in (ends[span], eos))))
        beams = sorted(grown, key=lambda b: -b[1])[:beam]
    return [(tokens, ll) for tokens, ll, _ in beams]


def to_template(tokenizer, fmt: T5Format, generated: list[int], num_inputs: int) -> str | None:
    """T5's two spans as a rayapp template (`T5Format.marks`); None where the result is no
    template of the task's inputs (a span left open, a stray sentinel, a brace)."""
    text = "".join(tokenizer.convert_ids_to_tokens(generated)).replace(WORD_START, " ")
    for mark, slot in fmt.marks.items():
        text = text.replace(mark, slot)
    if any(special in text for special in tokenizer.all_special_tokens):
        return None
    try:
        segments = parse_template(text.strip())
    except PromptError:
        return None
    slots = sorted(s.slot for s in segments if s.kind == "sent")
    return text.strip() if slots == list(range(num_inputs)) else None


def generate_templates(model, tokenizer, task: Task, examples: list[Example], beam: int, decode_length: int,
                       rows_per_pass: int = 1024) -> list[dict]:
    """Candidate templates for `task` from T5 over `examples` (each with its manual label word),
    `{"template", "format", "log_likelihood"}`, each template once, in LM-BFF's order."""
    words = [entry if isinstance(entry, str) else entry[0] for entry in task.verbalizer.values()]
    formats = [(name, f) for name, f in T5_FORMATS.items() if f.inputs == task.num_inputs]
    found: dict[str, dict] = {}
    for name, fmt in formats:
        inputs = [t5_input(tokenizer, fmt, e, words[task.class_of(e.label)]) for e in examples]
        for generated, ll in beam_search(model, tokenizer, inputs, beam, decode_length, rows_per_pass)[
                :beam // len(formats)]:
            template = to_template(tokenizer, fmt, generated, task.num_inputs)
            if template is not None and template not in found:
                found[template] = {"template": template, "format": name, "log_likelihood": ll}
    return list(found.values())


def rank_templates(scorer, split: FewShotSplit, candidates: list[dict], max_length: int,
                   batch_size: int) -> list[dict]:
    """`candidates` that encode with the scoring MLM, with its zero-shot dev score (`dev`) with
    the manual label words, best first."""
    task, tokenizer = scorer.encoder.task, scorer.encoder.tokenizer
    ranked = []
    for c in candidates:
        try:
            encoder = PromptEncoder(tokenizer, with_prompt(task, c["template"]), max_length)
        except PromptError:  # longer than max_length with this tokenizer
            continue
        ranked.append({**c, "dev": _dev_score(scorer, encoder, split, batch_size)})
    return sorted(ranked, key=lambda c: (-c["dev"], -c["log_likelihood"]))


# --- one split, an actor, the run -------------------------------------------------------------

def search_split(scorer, t5, split: FewShotSplit, cfg: SearchConfig, batch_size: int) -> dict:
    """The ranking file of one split: `scorer` holds the MLM and the task's manual prompt, `t5`
    is (model, tokenizer) or None."""
    task = scorer.encoder.task
    manual = {**task_to_dict(task), "dev": _dev_score(scorer, scorer.encoder, split, batch_size)}
    found = {"task": task.name, "k": split.k, "seed": split.seed, "split": split.source, "model": cfg.model,
             "t5": cfg.t5, "manual": manual}
    if cfg.label_words:
        found["label_words"] = search_label_words(scorer, split, cfg.k_likely, cfg.n_pairs, cfg.max_assignments,
                                                  batch_size)
    if t5 is not None:
        model, tokenizer = t5
        candidates = generate_templates(model, tokenizer, task, split.train, cfg.beam, cfg.decode_length,
                                        cfg.rows_per_pass)
        found["templates"] = rank_templates(scorer, split, candidates, cfg.max_length, batch_size)
    return found


def ranking_uri(out: str, task: str, k: int, seed: int) -> str:
    return storage.join(out, RANKING, task, f"{k}-{seed}.json")


class SplitSearcher:
    """Ray Data actor: searches whole splits and writes each one's ranking file.

    Input rows `{task, seed}`; output one row per split: `split` (`TASK/K-SEED`). The MLM is
    loaded with a task's prompt (`TeacherScorer`) and reloaded when the task changes (rows come
    task by task); T5 is loaded once."""

    def __init__(self, cfg: SearchConfig, tasks: dict[str, Task], model: str, t5: str | None, data_dir: str | None):
        self.device = actor_device()
        self.cfg, self.tasks, self.model, self.data_dir = cfg, tasks, model, data_dir
        self.batch_size = cfg.batch_size or default_batch_size(cfg.use_gpu)
        self.t5 = None
        if t5 is not None:
            self.t5 = (load_mlm(local_model_dir(t5)).to(self.device).eval(), load_tokenizer(local_model_dir(t5)))
        self.scorer = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        names = []
        for row in batch.to_pylist():
            task = self.tasks[row["task"]]
            if self.scorer is None or self.scorer.encoder.task != task:
                self.scorer = None  # one MLM in memory at a time
                self.scorer = TeacherScorer(self.model, task, self.cfg.max_length, self.device)
            split = load_lmbff(self.data_dir, task, self.cfg.k, row["seed"])
            found = search_split(self.scorer, self.t5, split, self.cfg, self.batch_size)
            storage.write_text(ranking_uri(self.cfg.out, task.name, split.k, split.seed), json.dumps(found, indent=1))
            names.append(f"{task.name}/{split.k}-{split.seed}")
        return pa.table({"split": names})


def finished_searches(out: str) -> set[str]:
    """`TASK/K-SEED` of the splits whose ranking file exists."""
    root = storage.join(out, RANKING, "")
    names = (uri[len(root):] for uri in storage.list_files(out) if uri.startswith(root))
    return {name[:-len(".json")] for name in names if name.count("/") == 1 and name.endswith(".json")}


def _check_models(cfg: SearchConfig, tasks: list[Task]) -> None:
    """The MLM reads every task's manual prompt and T5 has its sentinels: one line, before Ray."""
    for task in tasks:
        if cfg.label_words and task.multi_token:
            raise ConfigError(f"task {task.name} has multi_token: true, but the label-word search finds one-token "
                              "words; drop label_words or the task")
        try:
            check_model(cfg.model, prompt=(task, cfg.max_length),
                        needs_mlm="the search reads the vocabulary at a masked LM's mask")
        except (ConfigError, PromptError) as e:
            raise ConfigError(f"model: {e}") from None
    if cfg.t5 is not None:
        try:
            check_model(cfg.t5)
        except ConfigError as e:
            raise ConfigError(f"t5: {e}") from None
        if not is_seq2seq(load_model_config(cfg.t5)) or mask_slot_token(load_tokenizer(cfg.t5)) != SENTINEL:
            raise ConfigError(f"t5={cfg.t5!r} is not a T5 model (a seq2seq LM whose tokenizer has {SENTINEL}); "
                              "templates are generated by T5's span filling (t5-large)")


def run(cfg: SearchConfig) -> dict:
    """Search every task x seed of `cfg` (module docstring); returns what was written."""
    import ray

    tasks = {}
    for name in cfg.tasks:
        task = find_task(name, cfg.tasks_file, False)
        tasks[task.name] = task
    _check_models(cfg, list(tasks.values()))
    data_dir = cfg.data_dir or fewshot_dir("k-shot")
    wanted = [(task, seed) for task in tasks for seed in cfg.seeds]
    for task, seed in wanted:  # every split read on the driver: a missing one is one line, before Ray
        load_lmbff(data_dir, tasks[task], cfg.k, seed)
    storage.require_shared({"data_dir": data_dir, "model": cfg.model, "t5": cfg.t5, "out": cfg.out})
    env.start_ray()
    plan = {"stage": STAGE, **{key: getattr(cfg, key) for key in (
        "model", "t5", "label_words", "tasks_file", "k", "k_likely", "n_pairs", "max_assignments", "beam",
        "decode_length", "max_length")}, "data_dir": data_dir}
    done = shards.begin(cfg.out, plan, "LM-BFF prompt search", done=finished_searches, outputs=(".json", ".yaml"))
    todo = [{"task": task, "seed": seed} for task, seed in wanted if f"{task}/{cfg.k}-{seed}" not in done]
    log.info("LM-BFF search %s: %d splits to search, %d already searched", cfg.out, len(todo), len(wanted) - len(todo))
    start = time.perf_counter()
    if todo:
        ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            SplitSearcher,
            fn_constructor_kwargs={"cfg": cfg, "tasks": tasks, "model": portable_model(cfg.model),
                                   "t5": portable_model(cfg.t5) if cfg.t5 else None, "data_dir": data_dir},
            **pool_args(cfg.num_actors, cfg.use_gpu, cfg.cpus_per_actor),
        ).take_all()
    written = write_tasks_files(cfg, tasks)
    storage.write_text(storage.join(cfg.out, shards.META), json.dumps(
        {"stage": STAGE, "plan": plan, "splits": [f"{t}/{cfg.k}-{s}" for t, s in wanted], "files": written}, indent=1))
    return {"splits": len(wanted), "searched": len(todo), "skipped": len(wanted) - len(todo), "files": written,
            "seconds": round(time.perf_counter() - start, 1)}


def write_tasks_files(cfg: SearchConfig, tasks: dict[str, Task]) -> list[str]:
    """Per seed, the tasks YAML of the best templates (manual words) and of the best label
    words (manual template), from the ranking files (module docstring)."""
    written = []
    for seed in cfg.seeds:
        found = {name: json.loads(storage.read_text(ranking_uri(cfg.out, name, cfg.k, seed))) for name in tasks}
        best = {}
        if cfg.t5 is not None:
            best[AUTO_TEMPLATE] = {}
            for name, f in found.items():
                if not f["templates"]:
                    log.warning("%s %d-%d: no generated template parsed as a template of the task; its manual one "
                                "stands in %s", name, cfg.k, seed, AUTO_TEMPLATE)
                best[AUTO_TEMPLATE][name] = with_prompt(tasks[name], f["templates"][0]["template"] if f["templates"]
                                                        else None)
        if cfg.label_words:
            best[AUTO_LABEL] = {name: with_prompt(tasks[name], verbalizer=f["label_words"][0]["verbalizer"])
                                for name, f in found.items()}
        for folder, chosen in best.items():
            uri = storage.join(cfg.out, folder, f"{cfg.k}-{seed}.yaml")
            storage.write_text(uri, yaml.safe_dump({"tasks": [task_to_dict(t) for t in chosen.values()]},
                                                   sort_keys=False, allow_unicode=True))
            written.append(uri)
    return written
