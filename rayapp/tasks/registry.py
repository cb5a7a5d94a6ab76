"""The task registry: LM-BFF's built-in tasks (SMASH Table 6), SMASH's intermediate tasks,
and users' own tasks from YAML. A task is a template + verbalizer + metric (`prompts.Task`)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from rayapp import storage
from rayapp.errors import ConfigError, DataError, PromptError
from rayapp.tasks.prompts import Task

_SENTIMENT = "{x0} It was {mask}."
_NLI = "{x0|nopunct}? {mask}, {x1|lowerfirst}"
_PARAPHRASE = "{x0} {mask}, {x1|lowerfirst}"
_POLARITY = {"0": "terrible", "1": "great"}
_NO_YES = {"0": "No", "1": "Yes"}
_NLI3 = {"contradiction": "No", "entailment": "Yes", "neutral": "Maybe"}
_NLI2 = {"not_entailment": "No", "entailment": "Yes"}

# LM-BFF folder names -> manual templates and verbalizers (LM-BFF / SMASH Table 6).
BUILTIN_TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("SST-2", _SENTIMENT, _POLARITY),
        Task("sst-5", _SENTIMENT, {"0": "terrible", "1": "bad", "2": "okay", "3": "good", "4": "great"}),
        Task("mr", _SENTIMENT, _POLARITY),
        Task("cr", _SENTIMENT, _POLARITY),
        Task("mpqa", _SENTIMENT, _POLARITY),
        Task("subj", "{x0} This is {mask}.", {"0": "subjective", "1": "objective"}),
        Task(
            "trec",
            "{mask}: {x0}",
            {
                "0": "Description", "1": "Entity", "2": "Expression",
                "3": "Human", "4": "Location", "5": "Number",
            },
        ),
        Task("CoLA", "{x0} This is {mask}.", {"0": "incorrect", "1": "correct"}, metric="mcc"),
        Task("MNLI", _NLI, _NLI3),
        Task("MNLI-mm", _NLI, _NLI3),  # MNLI evaluated on the mismatched test set
        Task("SNLI", _NLI, _NLI3),
        Task("QNLI", _NLI, _NLI2),
        Task("RTE", _NLI, _NLI2),
        Task("MRPC", _PARAPHRASE, _NO_YES, metric="f1"),
        Task("QQP", _PARAPHRASE, _NO_YES, metric="f1"),
        Task("STS-B", _PARAPHRASE, _NO_YES, metric="pearson", bounds=(0.0, 5.0)),
    ]
}


def get_task(name: str) -> Task:
    """A built-in task by name, case-insensitively ("sst-2" finds "SST-2")."""
    by_lower = {key.lower(): task for key, task in BUILTIN_TASKS.items()}
    try:
        return by_lower[str(name).strip().lower()]
    except KeyError:
        raise PromptError(
            f"unknown task {name!r}; built-in tasks: {', '.join(BUILTIN_TASKS)}; "
            "define your own in a tasks YAML file (rayapp.tasks.prompts.load_tasks)"
        ) from None


_REQUIRED_KEYS = ("name", "template", "verbalizer")
_OPTIONAL_KEYS = ("metric", "bounds", "lmbff_exact", "multi_token")


def task_from_dict(d: dict) -> Task:
    """A Task from a config mapping: name, template, verbalizer, optional metric, bounds,
    lmbff_exact (LM-BFF's own tokenisation rules) and multi_token (label words of several
    tokens), see rayapp.tasks.prompts."""
    keys = ", ".join(_REQUIRED_KEYS) + " (optional: " + ", ".join(_OPTIONAL_KEYS) + ")"
    if not isinstance(d, dict):
        raise PromptError(f"a task must be a mapping with keys {keys}, got {d!r}")
    where = f"task {d.get('name', '<unnamed>')!r}"
    unknown = sorted(set(d) - set(_REQUIRED_KEYS) - set(_OPTIONAL_KEYS))
    missing = [k for k in _REQUIRED_KEYS if k not in d]
    if unknown or missing:
        problem = f"unknown keys {unknown}" if unknown else f"missing keys {missing}"
        raise PromptError(f"{where} has {problem}; a task has keys {keys}")
    if not isinstance(d["verbalizer"], dict):
        raise PromptError(f"{where}: verbalizer must map labels to words, got {d['verbalizer']!r}")
    bounds = d.get("bounds")
    if bounds is not None:
        if not isinstance(bounds, (list, tuple)) or not all(isinstance(b, (int, float)) for b in bounds):
            raise PromptError(f"{where}: bounds must be [low, high] numbers, got {bounds!r}")
        bounds = tuple(float(b) for b in bounds)
    return Task(
        name=str(d["name"]),
        template=d["template"],
        # YAML reads `0: terrible` with an int key; labels are compared as strings
        verbalizer={str(label).strip(): words for label, words in d["verbalizer"].items()},
        metric=d.get("metric", "acc"),
        bounds=bounds,
        lmbff_exact=d.get("lmbff_exact", False),
        multi_token=d.get("multi_token", False),
    )


def with_prompt(task: Task, template: str | None = None, verbalizer: dict | None = None) -> Task:
    """`task` with another template and/or verbalizer (SMASH Fig. 3 swaps in LM-BFF's automatic
    ones); its labels, metric and data stay the task's, so the words must cover its labels."""
    if verbalizer is not None:
        words = {str(label).strip(): word for label, word in verbalizer.items()}  # YAML reads `0:` as an int
        if set(words) != set(task.labels):
            raise PromptError(f"verbalizer {verbalizer} for task {task.name}: give one word for each of its labels "
                              f"{task.labels}")
        verbalizer = {label: words[label] for label in task.labels}  # the task's class order
    return dataclasses.replace(task, template=template or task.template, verbalizer=verbalizer or task.verbalizer)


def task_to_dict(task: Task) -> dict:
    """The mapping `task_from_dict` reads back: its required keys and the optional ones that
    differ from their defaults."""
    d = {"name": task.name, "template": task.template, "verbalizer": dict(task.verbalizer)}
    defaults = {f.name: f.default for f in dataclasses.fields(Task)}
    for key in _OPTIONAL_KEYS:
        value = getattr(task, key)
        if value != defaults[key]:
            d[key] = list(value) if key == "bounds" else value
    return d


def load_tasks(path: str | Path) -> dict[str, Task]:
    """Tasks from a YAML file (local or `s3://`) holding a list of task mappings or ``{"tasks": [...]}``."""
    path = str(path)
    try:
        raw = yaml.safe_load(storage.read_text(path))
    except (OSError, DataError) as e:
        raise DataError(f"cannot read tasks file {path}: {getattr(e, 'strerror', None) or e}") from None
    except yaml.YAMLError as e:
        raise DataError(f"tasks file {path} is not valid YAML: {e}") from None
    entries = raw.get("tasks") if isinstance(raw, dict) else raw
    if not isinstance(entries, list) or not entries:
        raise DataError(
            f"tasks file {path} must hold a non-empty list of tasks, or a mapping with a 'tasks' list"
        )
    tasks: dict[str, Task] = {}
    for entry in entries:
        try:
            task = task_from_dict(entry)
        except PromptError as e:
            raise PromptError(f"{path}: {e}") from None
        if task.name in tasks:
            raise PromptError(f"{path}: task {task.name!r} is defined twice")
        tasks[task.name] = task
    return tasks


# SMASH's intermediate tasks use the downstream group's own template (that is the point of
# SMASH): the pair task is MNLI's template with the rule labels of §4.4 setting 6 (different
# documents / same document / adjacent), the sentiment task is SST-5's template and words.
INTERMEDIATE_TASKS: dict[str, Task] = {
    "smash-pairs": Task("smash-pairs", BUILTIN_TASKS["MNLI"].template, {"0": "No", "1": "Maybe", "2": "Yes"}),
    "smash-sentiment": Task("smash-sentiment", BUILTIN_TASKS["sst-5"].template, BUILTIN_TASKS["sst-5"].verbalizer),
}
MAX_LENGTH = {"smash-pairs": 128, "smash-sentiment": 64}  # SMASH App. A.1
DEFAULT_MAX_LENGTH = 128  # user-defined tasks


def resolve_intermediate(task: str | Task) -> tuple[Task, int]:
    """`(Task, default max_length)` for an intermediate-task name or a user's own Task."""
    if isinstance(task, Task):
        return task, MAX_LENGTH.get(task.name, DEFAULT_MAX_LENGTH)
    if task not in INTERMEDIATE_TASKS:
        raise ConfigError(
            f"unknown intermediate task {task!r}; choose one of {', '.join(INTERMEDIATE_TASKS)} "
            "or pass a rayapp.tasks.prompts.Task"
        )
    return INTERMEDIATE_TASKS[task], MAX_LENGTH[task]


# PET's patterns (Schick & Schütze 2021, "Exploiting Cloze Questions ...", pet/pvp.py), 4 per
# task, for iPET (SMASH §4.3 / Table 3: "minor modifications on the provided prompts" for the
# tasks PET did not run). Sentiment tasks take PET's Yelp patterns with the review's subject
# (PET: "the restaurant") and Yelp's words (polarity bad/good; 5 classes terrible..great);
# sentence-pair tasks take PET's MNLI patterns (patterns 0-1 say Wrong/Right/Maybe, 2-3
# No/Yes/Maybe; two-class tasks drop Maybe). Where PET splits a pattern into two segments (a
# [SEP] between), rayapp's template is one sequence: the segments are joined by a space.
def _yelp(subject: str) -> list[str]:
    return ["It was {mask}. {x0}", "{x0|nopunct}. All in all, it was {mask}.", "Just {mask}! {x0}",
            f"{{x0}} In summary, the {subject} is {{mask}}."]


_MNLI_PATTERNS = ['"{x0|nopunct}" ? {mask}, "{x1}"', "{x0|nopunct}? {mask}, {x1}"]


def _pair_words(labels: dict[str, str]) -> list[dict[str, str]]:
    """Verbalizers A (Wrong/Right/Maybe) and B (No/Yes/Maybe) for `labels` -> PET's roles."""
    a = {"contradiction": "Wrong", "entailment": "Right", "neutral": "Maybe"}
    b = {"contradiction": "No", "entailment": "Yes", "neutral": "Maybe"}
    return [{label: words[role] for label, role in labels.items()} for words in (a, b)]


_NLI3_ROLES = {"contradiction": "contradiction", "entailment": "entailment", "neutral": "neutral"}
_NLI2_ROLES = {"not_entailment": "contradiction", "entailment": "entailment"}
_PARA_ROLES = {"0": "contradiction", "1": "entailment"}
_POLARITY_PET = {"0": "bad", "1": "good"}


def _patterns(name: str, templates: list[str], verbalizers: list[dict[str, str]]) -> list[Task]:
    """PET's pattern ids in order: every template with the first verbalizer, then with the next."""
    base = BUILTIN_TASKS[name]
    return [Task(name, t, v, metric=base.metric) for v in verbalizers for t in templates]


PET_PATTERNS: dict[str, list[Task]] = {
    **{name: _patterns(name, _yelp(subject), [_POLARITY_PET])
       for name, subject in (("SST-2", "movie"), ("mr", "movie"), ("cr", "product"))},
    "sst-5": _patterns("sst-5", _yelp("movie"), [BUILTIN_TASKS["sst-5"].verbalizer]),
    **{name: _patterns(name, _MNLI_PATTERNS, _pair_words(roles))
       for name, roles in (("MNLI", _NLI3_ROLES), ("MNLI-mm", _NLI3_ROLES), ("SNLI", _NLI3_ROLES),
                           ("QNLI", _NLI2_ROLES), ("RTE", _NLI2_ROLES), ("MRPC", _PARA_ROLES),
                           ("QQP", _PARA_ROLES))},
}


def pet_pattern(task: Task, index: int, extra: dict[str, Task] | None = None) -> Task:
    """PET pattern `index` of `task`: a user's `TASK-pet<index>` task (a tasks file) first, else
    `PET_PATTERNS`; its name stays the task's (the split, metric and labels are the task's)."""
    import dataclasses

    own = (extra or {}).get(f"{task.name}-pet{index}")
    if own is not None:
        return dataclasses.replace(own, name=task.name)
    patterns = PET_PATTERNS.get(task.name)
    if patterns is None:
        raise ConfigError(f"task {task.name} has no PET patterns; define them in a tasks file as tasks named "
                          f"{task.name}-pet0, {task.name}-pet1, ... (tasks_file=...)")
    if not 0 <= index < len(patterns):
        raise ConfigError(f"pattern={index}: task {task.name} has PET patterns 0..{len(patterns) - 1}")
    return dataclasses.replace(patterns[index], lmbff_exact=task.lmbff_exact)
