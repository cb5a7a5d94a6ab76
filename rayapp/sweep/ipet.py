"""iPET as phases of a sweep (SMASH §4.3, Table 3; the data steps: `rayapp.data.ipet`).

A generation is a method whose grid names its models, e.g. `grid: {pattern: [0, 1, 2, 3],
train_seed: [1, 2, 3]}` (4 patterns x 3 repetitions, SMASH's iPET): its trials run in
parallel like any method's, and every one of them is a model of the ensemble (the report's
best-dev row for it is only a diagnostic). Two placeholders link the phases:

- `extra_train: "{ipet:G}"` on the next generation: the trial of grid point P trains on T plus
  the examples the other models of generation G labelled for model P
  (`data.ipet.next_train_set`; model P of G is G's run with the same grid point);
- `soft_labels: "{soft:G}"` on a final classifier: the merged logits of all of G's models
  over the unlabelled set (`data.ipet.soft_label_set`).

Before a phase whose methods hold either placeholder, `prepare` (on the sweep's driver) labels
the unlabelled set with every model of G, per task and split, in one Ray Data job for all of
them, and writes the files the placeholders name: trials only read them. A generation's index
(its exponent in |T| d^g) is how many `{ipet:}` links lead to it.
"""
from __future__ import annotations

from typing import Callable

from rayapp import storage
from rayapp.data import ipet
from rayapp.data.fewshot import load_lmbff
from rayapp.errors import DataError
from rayapp.modeling.models import portable_model
from rayapp.recipes.finetune import find_task
from rayapp.tasks.prompts import Task
from rayapp.sweep.methods import _placeholders
from rayapp.sweep.spec import SweepConfig

KINDS = ("ipet", "soft")


def model_id(point: dict) -> str:
    """A model's name across generations: its grid point."""
    return "-".join(f"{k}{v}" for k, v in sorted(point.items())) or "model"


def labels_dir(cfg: SweepConfig, generation: str, task: str, seed: int) -> str:
    return storage.join(cfg.experiment, "ipet", generation, task, f"{cfg.k}-{seed}")


def fill(cfg: SweepConfig, kind: str, generation: str, trial: dict) -> str:
    """The file `{ipet:G}` / `{soft:G}` names for `trial` (written by `prepare`)."""
    folder = labels_dir(cfg, generation, trial["task"], trial["seed"])
    if kind == "soft":
        return storage.join(folder, ipet.SOFT_LABELS)
    return storage.join(folder, "next", f"{model_id(trial['point'])}.jsonl")


def _links(cfg: SweepConfig, method: str) -> list[tuple[str, str]]:
    """(kind, generation) of the iPET placeholders of `method`."""
    m = cfg.method(method)
    found = _placeholders(m.overrides) + _placeholders(m.per_task)
    return sorted({tuple(p.split(":", 1)) for p in found if p.split(":", 1)[0] in KINDS})


def generation_index(cfg: SweepConfig, method: str) -> int:
    """0 for a first generation; 1 + that of the generation its `{ipet:}` reads."""
    up = [g for kind, g in _links(cfg, method) if kind == "ipet"]
    return 1 + generation_index(cfg, up[0]) if up else 0


def prepare(cfg: SweepConfig, phase: int, read_records: Callable[[], dict[str, dict]]) -> None:
    """Write what the phase's `{ipet:}` / `{soft:}` placeholders name (module docstring): every
    generation they read is labelled on every (task, split) in one Ray Data job.
    `read_records()` gives the sweep's run records ({uri: record}), read only when needed."""
    wanted = [(kind, generation, method, task, seed) for method in cfg.phases[phase]
              for kind, generation in _links(cfg, method) for task in cfg.tasks
              for seed in cfg.method_seeds(method, task)]
    if not wanted:
        return
    records = read_records()
    jobs = {(g, task, seed): _labelling(cfg, g, task, seed, records) for _, g, _, task, seed in wanted}
    ipet.label_pools([job for job, _ in jobs.values()], cfg.ipet)
    for kind, generation, method, task, seed in wanted:
        job, base = jobs[generation, task, seed]
        if kind == "soft":
            ipet.write_examples(fill(cfg, kind, generation, {"task": task, "seed": seed}),
                                ipet.soft_label_set(job.out, cfg.ipet))
            continue
        index = generation_index(cfg, generation)
        for trial in _trials(cfg, method, task, seed):
            examples = ipet.next_train_set(job.out, model_id(trial["point"]), job.train, base, index, cfg.ipet)
            ipet.write_examples(fill(cfg, kind, generation, trial), examples)


def _trials(cfg: SweepConfig, method: str, task: str, seed: int) -> list[dict]:
    """The trials of `method` on (task, split): one per model (grid point)."""
    return [t for t in cfg.trials() if (t["method"], t["task"], t["seed"]) == (method, task, seed)]


def _labelling(cfg: SweepConfig, generation: str, task: str, seed: int,
               records: dict[str, dict]) -> tuple[ipet.Labelling, Task]:
    """What labelling `generation`'s models on (task, split) takes, and the task."""
    trials = {model_id(t["point"]): t for t in _trials(cfg, generation, task, seed)}
    runs = {model_id(rec["sweep"]["point"]): rec for rec in records.values()
            if rec.get("status") == "done" and isinstance(rec.get("sweep"), dict)
            and (rec["sweep"]["method"], rec["sweep"]["task"], rec["sweep"]["seed"]) == (generation, task, seed)}
    missing = sorted(set(trials) - set(runs))
    if missing:
        raise DataError(f"iPET generation {generation} on {task} split {seed}: models {missing} did not finish, "
                        "so the next phase cannot be labelled from it; fix them and `rayapp sweep --resume`")
    models = []
    for mid, trial in trials.items():
        rc = cfg.recipe_config(trial, "labels", lambda p: f"<{p}>")
        models.append(ipet.PetModel(mid, runs[mid]["checkpoint"], portable_model(rc.init or rc.model),
                                    rc.resolve_task()))
    base = find_task(rc.task, rc.tasks_file, rc.lmbff_exact)
    split = load_lmbff(rc.data_dir, base, k=rc.k, seed=seed)
    pool = ipet.draw_pool(split, base, cfg.ipet.unlabelled_per_label, cfg.ipet.seed)
    return ipet.Labelling(labels_dir(cfg, generation, task, seed), models, pool, split.train, rc.max_length), base
