"""iPET's data between generations (Schick & Schütze 2021, "Exploiting Cloze Questions for Few
Shot Text Classification and Natural Language Inference", §3.3; PET's pet/modeling.py).

A generation is a set of PET models: prompt-based fine-tuning of one base model with each of
a task's patterns (`registry.PET_PATTERNS`), several times each (sweep trials, `finetune
pattern=P`). Between generations this module
1. labels the unlabelled set with every model of the generation (`label_pools`: a Ray Data
   batch-inference job, an autoscaling actor pool with one model per call): each model's
   class logits over the set (its own pattern at the mask), and its PET weight, the
   accuracy its *untrained* base model reaches with its pattern on the training set T
   (PET's `train_set_before_training`; `reduction=mean` weighs all models alike);
2. draws each next-generation model's extra training set (`next_train_set`, PET's
   `generate_ipet_train_set`): a random `logits_percentage` of the *other* models of the
   generation, their weighted mean logits softmaxed, the argmax as the label; per label
   |T_label| (d^(g+1) - 1) examples (d = `scale_factor`, g the generation's index from 0),
   drawn without replacement with probability proportional to the ensemble's confidence
   (examples of a label the ensemble predicts too rarely are repeated first, as PET does; a
   label it never predicts gets none, where PET's loop would not end);
3. merges the last generation into the final classifier's targets (`soft_label_set`): the
   weighted mean of all its models' logits per unlabelled example (PET's `merge_logits`),
   on which `finetune soft_labels=` trains with PET's distillation loss.

Layout of a generation's labels, one folder per (generation, task, split):
`pool.jsonl` (the unlabelled examples, in the order of every logits file), `_plan.json`
(first), `model-<ID>.parquet` (one per model: `logits`, fixed-size lists of C float32,
written whole by the actor that scored it), `_meta.json` (last: the models, their patterns and
weights, the files). A re-run with the same plan scores only the models without a file.
Derived files beside them: `next/<ID>.jsonl` (text_a, text_b, label: the extra training set of
the next generation's model ID) and `soft_labels.jsonl` (text_a, text_b, logits).

Where this differs from PET: each draw is seeded by (seed, model id) instead of one random
stream over the models in directory order, so a model's set does not depend on which other
models exist; PET's auxiliary language-modelling loss (its `--lm_training`, off by default)
and `n_most_likely` (off by default) are not implemented.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import torch

from rayapp import env, storage
from rayapp.data import shards
from rayapp.data.fewshot import Example, FewShotSplit
from rayapp.data.unlabelled import usable_pool
from rayapp.errors import ConfigError, DataError
from rayapp.tasks.prompts import Task, class_logits

POOL = "pool.jsonl"
WEIGHT = "rayapp_pet_weight"  # parquet metadata key of a model file: its PET weight
SOFT_LABELS = "soft_labels.jsonl"


@dataclass
class IPetConfig:
    """iPET's settings (PET's defaults, its cli.py)."""
    scale_factor: float = 5.0          # d: generation g's models train on |T| d^g examples
    logits_percentage: float = 0.25    # share of the other models that label a model's next set
    reduction: Literal["wmean", "mean"] = "wmean"  # wmean: models weighted by their accuracy on T before training
    unlabelled_per_label: int = 10000  # unlabelled examples: at most this many per label (SMASH §4.3)
    seed: int = 42
    use_gpu: bool = False              # one GPU per labelling actor
    num_actors: int | None = None      # most labelling actors; None: as many as the cluster gives
    batch_size: int | None = None      # examples per forward pass; None: sized for the device

    def __post_init__(self) -> None:
        if self.scale_factor <= 1 or not 0 < self.logits_percentage <= 1 or self.unlabelled_per_label < 1:
            raise ConfigError("ipet: scale_factor must be > 1, logits_percentage in (0, 1] and "
                              f"unlabelled_per_label >= 1, got {self.scale_factor}, {self.logits_percentage}, "
                              f"{self.unlabelled_per_label}")


@dataclass(frozen=True)
class PetModel:
    """One trained model of a generation: `id` names it across generations (pattern and
    repetition), `pattern` its task pattern, `init` the weights it started from."""
    id: str
    checkpoint: str
    init: str
    pattern: Task


def draw_pool(split: FewShotSplit, task: Task, per_label: int, seed: int, pool: str | None = None) -> list[Example]:
    """The unlabelled set: the task's pool minus the split's examples (`usable_pool`), at most
    `per_label` x labels of them (a seeded sample, kept in pool order); labels removed."""
    unseen, uri, _ = usable_pool(split, task, pool)
    if not unseen:
        raise DataError(f"task {task.name}: the pool {uri} has no example outside the split; iPET needs unlabelled data")
    cap = per_label * len(task.labels)
    if len(unseen) > cap:
        keep = set(random.Random(seed).sample(range(len(unseen)), cap))
        unseen = [ex for i, ex in enumerate(unseen) if i in keep]
    return [Example(ex.text_a, ex.text_b, None) for ex in unseen]


@dataclass(frozen=True)
class Labelling:
    """One generation's labels on one split: the folder, the models, the unlabelled set and T."""
    out: str
    models: list[PetModel]
    pool: list[Example]
    train: list[Example]
    max_length: int

    def plan(self) -> dict:
        import dataclasses

        return json.loads(json.dumps({
            "stage": "ipet-labels", "max_length": self.max_length,
            "models": {m.id: [m.checkpoint, m.init, dataclasses.asdict(m.pattern)] for m in self.models},
            "pool_sha256": hashlib.sha256(json.dumps([[e.text_a, e.text_b] for e in self.pool]).encode()).hexdigest(),
            "train": [[e.text_a, e.text_b, e.label] for e in self.train]}))


class PoolLabeller:
    """Ray Data actor: scores an unlabelled set (and T, with the untrained model) with the model
    of each row and writes `model-<ID>.parquet` whole. A row names its folder, whose
    `pool.jsonl` and `_plan.json` give the texts; the untrained models (one per pattern, the
    same for every split) stay loaded across rows."""

    def __init__(self, batch_size: int):
        self.batch_size, self.inputs, self.untrained = batch_size, {}, {}

    def _inputs(self, out: str) -> tuple[pa.Table, pa.Table, list]:
        if out not in self.inputs:
            train = json.loads(storage.read_text(storage.join(out, shards.PLAN)))["train"]
            pool = _pool(out)
            self.inputs[out] = (pa.table({"text_a": [e.text_a for e in pool], "text_b": [e.text_b for e in pool]}),
                                pa.table({"text_a": [t[0] for t in train], "text_b": [t[1] for t in train]}),
                                [t[2] for t in train])
        return self.inputs[out]

    def _logits(self, scorer, table: pa.Table) -> torch.Tensor:
        words = scorer.encoder.label_word_ids
        return scorer.score(scorer.encode(table), self.batch_size, lambda l: {"s": class_logits(l, words)})["s"]

    def __call__(self, batch: pa.Table) -> pa.Table:
        from rayapp.modeling.scorer import TeacherScorer, actor_device, fixed_lists

        entries = []
        for row in batch.to_pylist():
            task = Task(**json.loads(row["pattern"]))
            pool, train, labels = self._inputs(row["out"])
            key = (row["init"], row["pattern"], row["max_length"])
            if key not in self.untrained:
                self.untrained[key] = TeacherScorer(row["init"], task, row["max_length"], actor_device())
            before = self._logits(self.untrained[key], train).argmax(-1).tolist()
            weight = float(np.mean([task.labels[i] == label for i, label in zip(before, labels)]))
            logits = self._logits(TeacherScorer(row["checkpoint"], task, row["max_length"], actor_device()), pool)
            # the weight travels in the file: a resumed folder reads it back (`_weight`)
            table = pa.table({"logits": fixed_lists(logits, pa.float32())}).replace_schema_metadata(
                {WEIGHT: json.dumps(weight)})
            entry = shards.write_table(storage.join(row["out"], model_file(row["id"])), table)
            entries.append(json.dumps({"out": row["out"], "id": row["id"], "weight": weight, "entry": entry}))
        return pa.table({"done": entries})


def model_file(model_id: str) -> str:
    return f"model-{model_id}.parquet"


def _weight(out: str, model_id: str) -> float | None:
    """The PET weight a model's file records, None for a file without one."""
    with shards.open_shard(storage.join(out, model_file(model_id))) as f:
        value = (f.schema_arrow.metadata or {}).get(WEIGHT.encode())
    return None if value is None else json.loads(value)


def label_pools(jobs: list[Labelling], cfg: IPetConfig) -> None:
    """Label every job's unlabelled set with its models (module docstring), all of them in one
    Ray Data job; resumable per folder and model (a finished folder is skipped, a model's file
    that exists is kept)."""
    import dataclasses

    import ray

    from rayapp.modeling.scorer import default_batch_size, pool_args

    pending, rows = [], []
    for job in jobs:
        meta = shards.read_meta(job.out)
        if meta is not None and meta.get("plan") == job.plan():
            continue
        done = shards.begin(job.out, job.plan(), "iPET generation's labels")
        write_examples(storage.join(job.out, POOL), job.pool)
        kept = {m.id: w for m in job.models if model_file(m.id) in done and (w := _weight(job.out, m.id)) is not None}
        pending.append((job, kept))
        rows += [{"out": job.out, "id": m.id, "checkpoint": m.checkpoint, "init": m.init,
                  "pattern": json.dumps(dataclasses.asdict(m.pattern)), "max_length": job.max_length}
                 for m in job.models if m.id not in kept]
    results = {}
    if rows:
        env.start_ray()
        found = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            PoolLabeller, fn_constructor_kwargs={"batch_size": cfg.batch_size or default_batch_size(cfg.use_gpu)},
            **pool_args(cfg.num_actors, cfg.use_gpu)).take_all()
        results = {(r["out"], r["id"]): r for r in (json.loads(row["done"]) for row in found)}
    for job, kept in pending:
        weights = {m.id: results[job.out, m.id]["weight"] if (job.out, m.id) in results else kept[m.id]
                   for m in job.models}
        shards.write_meta(job.out, {"files": [model_file(m.id) for m in job.models], "plan": job.plan(),
                                    "pool": len(job.pool),
                                    "models": [{"id": m.id, "weight": weights[m.id]} for m in job.models]},
                          {model_file(i): r["entry"] for (out, i), r in results.items() if out == job.out})


def _logits(out: str, meta: dict, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """([M, N, C] logits of models `ids`, [M] their weights) from a labels folder."""
    weights = {m["id"]: m["weight"] for m in meta["models"]}
    entries = meta["shards"]
    arrays = [np.asarray(shards.read_whole(storage.join(out, model_file(i)), entries[model_file(i)])
                         .column("logits").to_pylist(), dtype=np.float64) for i in ids]
    return np.stack(arrays), np.array([weights[i] for i in ids])


def merge(logits: np.ndarray, weights: np.ndarray, reduction: str) -> np.ndarray:
    """PET's `merge_logits_lists`: the (weighted) mean over models of [M, N, C] logits. All
    weights 0 (no model beat 0 on T before training) falls back to the plain mean."""
    if reduction == "mean" or not weights.sum() > 0:
        return logits.mean(0)
    return np.average(logits, axis=0, weights=weights)


def _pool(out: str) -> list[Example]:
    return [Example(r["text_a"], r["text_b"], None)
            for r in map(json.loads, storage.read_text(storage.join(out, POOL)).splitlines())]


def _seed(seed: int, model_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}/{model_id}".encode(), digest_size=4).digest(), "little")


def next_train_set(out: str, model_id: str, train: list[Example], task: Task, generation: int,
                   cfg: IPetConfig) -> list[Example]:
    """The extra training examples of the next generation's model `model_id` (module docstring,
    step 2) from the labels folder `out` of generation `generation` (0 = the first)."""
    meta = shards.require_meta(out)
    others = [m["id"] for m in meta["models"] if m["id"] != model_id]
    if not others:
        raise DataError(f"{out}: iPET labels a model's next training set with the other models of its generation, "
                        "and this generation has one model; give it several patterns or repetitions")
    rng, rng_np = random.Random(_seed(cfg.seed, model_id)), np.random.RandomState(_seed(cfg.seed, model_id))
    chosen = rng.sample(others, k=max(1, round(len(others) * cfg.logits_percentage)))
    logits, weights = _logits(out, meta, chosen)
    merged = merge(logits, weights, cfg.reduction)
    probs = np.exp(merged - merged.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    predicted = probs.argmax(1)
    pool = _pool(out)
    multiplier = (len(train) * cfg.scale_factor ** (generation + 1) - len(train)) / len(train)
    picked = []
    for c, label in enumerate(task.labels):
        want = int(sum(e.label == label for e in train) * multiplier)
        candidates = [i for i in range(len(pool)) if predicted[i] == c]
        if not candidates or not want:
            continue
        while len(candidates) < want:  # PET repeats a label's examples when the ensemble gives too few
            candidates += [i for i in range(len(pool)) if predicted[i] == c]
        p = probs[candidates].max(1)
        for i in rng_np.choice(candidates, size=want, replace=False, p=p / p.sum()):
            picked.append(Example(pool[i].text_a, pool[i].text_b, label))
    return picked


def soft_label_set(out: str, cfg: IPetConfig) -> list[tuple[Example, list[float]]]:
    """Every unlabelled example with the merged logits of all the generation's models (step 3)."""
    meta = shards.require_meta(out)
    logits, weights = _logits(out, meta, [m["id"] for m in meta["models"]])
    return list(zip(_pool(out), merge(logits, weights, cfg.reduction).tolist()))


def write_examples(uri: str, rows) -> str:
    """JSONL of (Example) or (Example, logits) rows: what `finetune extra_train=` and
    `soft_labels=` read."""
    def record(row) -> dict:
        ex, logits = row if isinstance(row, tuple) else (row, None)
        return {"text_a": ex.text_a, "text_b": ex.text_b,
                **({"label": ex.label} if logits is None else {"logits": logits})}

    storage.write_text(uri, "".join(json.dumps(record(r), ensure_ascii=False) + "\n" for r in rows))
    return uri


def read_soft_labels(uri: str, num_labels: int) -> tuple[list[Example], torch.Tensor]:
    """(examples, [N, C] target logits) of a `soft_labels` JSONL file."""
    if not storage.is_file(uri):
        raise DataError(f"soft_labels={uri} does not exist; give the soft_labels.jsonl of an iPET generation")
    examples, logits = [], []
    for n, line in enumerate(storage.read_text(uri).splitlines(), 1):
        try:
            row = json.loads(line)
            examples.append(Example(row["text_a"], row.get("text_b"), None))
            logits.append([float(x) for x in row["logits"]])
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{uri} line {n}: not a soft-labelled example (text_a, text_b, logits): {e}") from None
        if len(logits[-1]) != num_labels:
            raise DataError(f"{uri} line {n}: {len(logits[-1])} logits for a task of {num_labels} labels")
    if not examples:
        raise DataError(f"{uri} holds no examples")
    return examples, torch.tensor(logits)
