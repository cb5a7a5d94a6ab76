"""The unlabelled set X~ of Prompt-Distiller (PD §2.1, §3.1).

"We also assume that there is a larger, unlabeled dataset X~ with |X~| = n |X| ... The
unlabeled datasets are randomly sampled from the original training sets ... (without overlaps
with our few-shot training/development sets). The classification labels of these instances
are removed."

`draw_unlabelled` samples n |X| examples (n = 10) from the task's original train pool (LM-BFF
layout, `POOL/TASK/train.json` beside the k-shot root, or any table `read_table` reads),
leaving out every example whose text is in the split's train, dev or test set. The paper says
"with replacement"; we sample without, so X~ holds no duplicates (a duplicate would only weigh
an example twice in eq. 4 and 7), and a pool with fewer than n |X| usable examples is an
error giving both sizes. The gold labels are removed from the examples the recipe trains on
and kept aside, so the run can report how many of the pre-trained teacher's zero-shot
pseudo-labels (eq. 7's negatives) agree with them.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from rayapp import storage
from rayapp.assets import fewshot_dir
from rayapp.data.fewshot import Columns, Example, FewShotSplit, LMBFF_FORMATS, read_original, read_table, sibling
from rayapp.errors import ConfigError, DataError
from rayapp.tasks.prompts import Task


@dataclass
class UnlabelledSet:
    examples: list[Example]  # label None: what training sees
    hidden_labels: list      # the pool's gold labels, same order: diagnostics only
    source: dict = field(default_factory=dict)


def default_pool(task: Task, root: str | None = None) -> str:
    """`task`'s LM-BFF train pool (MNLI-mm shares MNLI's): beside the k-shot folder `root` the
    split was read from (`ROOT/../pool/TASK/train.json`, local or `s3://`) when that holds it,
    else under `assets.fewshot_dir("pool")` (the mirror's, else the local assets)."""
    fmt = LMBFF_FORMATS.get(task.name)
    folder = fmt.folder if fmt is not None and fmt.folder else task.name
    beside = storage.join(sibling(str(root), "pool"), folder, "train.json") if root is not None else None
    if beside is not None and storage.is_file(beside):
        return beside
    try:
        return storage.join(fewshot_dir("pool"), folder, "train.json")
    except DataError as e:
        if beside is None:
            raise
        raise DataError(f"no unlabelled pool for task {task.name}: {beside} does not exist; {e}") from None


def draw_unlabelled(split: FewShotSplit, task: Task, n: int = 10, *, pool: str | Path | None = None,
                    columns: Columns | None = None, seed: int | None = None) -> UnlabelledSet:
    """X~: n * |X| pool examples, disjoint (by text) from the split's train, dev and test sets,
    drawn with `random.Random(seed)` (default: the split's seed, so each split has its own X~).
    `pool` is any table `read_table` reads (default: `default_pool` beside the split's k-shot
    root, so a split read from s3:// draws from the pool there); `columns` as there
    (None: `fewshot.read_original`'s, so LM-BFF's original train file works as the pool too)."""
    if n < 1:
        raise ConfigError(f"n (|X~| = n |X|) must be >= 1, got {n}; the paper uses 10")
    unseen, uri, rows = usable_pool(split, task, pool, columns)
    want = n * len(split.train)
    if len(unseen) < want:
        raise DataError(
            f"task {task.name}: the unlabelled pool {uri} has {len(unseen)} usable examples outside the split's "
            f"train/dev/test ({rows} rows in all), but X~ needs n*|X| = {n}*{len(split.train)} = {want}; "
            "lower n or give a bigger pool (unlabelled_pool=...)"
        )
    picked = random.Random(split.seed if seed is None else seed).sample(unseen, want)
    return UnlabelledSet(
        examples=[Example(ex.text_a, ex.text_b, None) for ex in picked],
        hidden_labels=[ex.label for ex in picked],
        source={"pool": uri, "pool_rows": rows, "usable": len(unseen), "n": n, "size": want,
                "seed": split.seed if seed is None else seed},
    )


def usable_pool(split: FewShotSplit, task: Task, pool: str | Path | None = None,
                columns: Columns | None = None) -> tuple[list[Example], str, int]:
    """(the pool's examples outside the split's train, dev and test sets by text, without
    duplicates or empty texts, in pool order; the pool's URI; its rows). `pool`/`columns` as
    in `draw_unlabelled`."""
    uri = str(pool) if pool is not None else default_pool(task, split.source.get("root"))
    table = read_table(uri, columns, task) if columns is not None else read_original(uri, task)
    seen = {(ex.text_a, ex.text_b) for ex in split.train + split.dev + split.test}
    unseen, taken = [], set()
    for ex in table:
        key = (ex.text_a, ex.text_b)
        if key not in seen and key not in taken and ex.text_a.strip():
            unseen.append(ex)
            taken.add(key)
    return unseen, uri, len(table)


def pseudo_label_agreement(pseudo: list[int], hidden_labels: list, task: Task) -> dict:
    """How many zero-shot pseudo-labels (class indices) equal the hidden gold labels, with the
    pseudo-label distribution (a teacher that predicts one class leaves eq. 7 few negatives)."""
    gold = [task.label_index(label) for label in hidden_labels]
    agree = sum(p == g for p, g in zip(pseudo, gold))
    return {"agree": agree, "total": len(gold), "rate": round(agree / max(len(gold), 1), 4),
            "pseudo_counts": {label: pseudo.count(i) for i, label in enumerate(task.labels)},
            "gold_counts": {label: gold.count(i) for i, label in enumerate(task.labels)}}
