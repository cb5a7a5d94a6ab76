"""The task registry: LM-BFF's built-in tasks (SMASH Table 6), SMASH's intermediate tasks,
and users' own tasks from YAML. A task is a template + verbalizer + metric (`prompts.Task`)."""
from __future__ import annotations

from pathlib import Path

import yaml

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


def load_tasks(path: str | Path) -> dict[str, Task]:
    """Tasks from a YAML file holding a list of task mappings or ``{"tasks": [...]}``."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"cannot read tasks file {path}: {e.strerror}") from None
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
