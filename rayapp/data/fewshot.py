"""Few-shot splits, the LM-BFF protocol (Gao et al. 2021).

A split is K examples per label for train and K per label for dev, both drawn from the
original train set, with the original dev set as test; five seeds (13 21 42 87 100) give
five splits, and results are reported as mean (std) over them.

Three ways to get splits:
- `load_lmbff(root, task, k, seed)` reads LM-BFF's published layout
  `ROOT/TASK/K-SEED/{train,dev,test}.{tsv,csv}`. The file formats differ per task (GLUE TSVs
  with headers, headerless `label,sentence` CSVs, ...); `LMBFF_FORMATS` holds that knowledge.
- `make_splits(pool, test, task, k, seeds)` samples them from any labelled table and can write
  them as `OUT/TASK/K-SEED/{train,dev,test}.jsonl` (one `{"text_a","text_b","label"}` object a
  line); `load_lmbff` reads that layout back, preferring it when both exist. A stage that
  writes a split made from another (`rayapp backtranslate`) puts a `_meta.json` beside the
  files; its `source` entries (what was done, where the test set came from) go into the
  loaded split's `source`.
- `draw_lmbff_split(root, task, k, seed, out)` draws a split of a K the root lacks (a sweep's
  K axis, `rayapp.sweep.axis`) from the task's original train set, as LM-BFF's
  tools/generate_k_shot_data.py does, test = the original dev set, and writes it with its
  provenance. From LM-BFF's own original train file that gives LM-BFF's published splits row
  for row (tests/test_fewshot.py, SST-2's five seeds). The local assets do not hold that file:
  `shared/data/glue/SST-2` is a re-split of GLUE's 67,349 phrases (LM-BFF's SST-2 has 6,920
  sentences), and `pool/` a part of the original train sets, so splits drawn here are LM-BFF's
  procedure on other rows, and their `source` says which.

Every table goes through one path: `read_table` turns TSV/CSV/JSONL/JSON/parquet/`hf://` into
header names + positional rows, `Columns` picks text_a/text_b/label by header name or by
position (negative positions count from the row's end: SNLI rows carry more annotator labels
than the header names, the gold label is always last), and labels are checked against the task.

Decisions worth knowing:
- Rows with empty text are kept by `read_table` (LM-BFF's CR splits contain such rows and a
  test set must keep its published size), but `sample_fewshot` never picks them: a fresh split
  should not spend one of its K slots on an empty input. `make_splits` records how many it
  passed over in `source["empty_text_skipped"]`.
- Regression (STS-B) has no labels to balance; like LM-BFF we bin scores at the midpoint of
  the task's range (2.5 for STS-B's 0..5) and draw K per bin, so K=16 gives 32 train and 32 dev.
- Where LM-BFF's test file is absent (MNLI, SNLI, QQP in the local assets), the test set
  falls back to the labelled pool `POOL/TASK/dev.json` with a warning, minus any example that
  is also in the split's train/dev. The pool is drawn from the original *train* set, so those
  numbers are not on the original dev set: every split's `source["test_source"]` names where
  its test set came from (`TEST_SOURCES`, a label a report prints beside such cells) and
  `source["test_fallback"]` is True for the pool. MNLI-mm has no stand-in and refuses: it is
  MNLI scored on genres MNLI's train set lacks, so a pool test set would silently make it MNLI.
- Sampling is LM-BFF's own (`sample_fewshot`: numpy's seeded shuffle of the pool in file
  order), so a split depends on the seed and the data only (not on PYTHONHASHSEED or dict
  order), and LM-BFF's original train file gives LM-BFF's splits.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from rayapp import storage
from rayapp.assets import fewshot_dir
from rayapp.data.shards import META, read_meta
from rayapp.data.formats import (TABLE_FORMATS, bad_line_error, check_on_bad_lines, detect_format, load_hf,
                                 suffix_format, warn_skipped)
from rayapp.errors import DataError
from rayapp.tasks.prompts import Task
from rayapp.tasks.registry import get_task

log = logging.getLogger(__name__)

SEEDS = (13, 21, 42, 87, 100)
SPLITS = ("train", "dev", "test")

ColumnRef = str | int  # a header name, or a 0-based position (negative: from the row's end)


@dataclass(frozen=True)
class Example:
    text_a: str
    text_b: str | None
    label: str | float  # class label string as in the data ("1", "entailment"); float for regression


@dataclass(frozen=True)
class Columns:
    """Which columns of a table hold the inputs and the label."""

    text_a: ColumnRef = "sentence"
    text_b: ColumnRef | None = None
    label: ColumnRef = "label"


@dataclass
class FewShotSplit:
    task: str
    k: int
    seed: int
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    source: dict = field(default_factory=dict)  # where each split came from; goes to results.jsonl


def example_columns(task: Task | str) -> Columns:
    """Columns of rayapp's own JSONL splits and of the pool JSON (`text_a`, `text_b`, `label`)."""
    return Columns("text_a", "text_b" if _task(task).num_inputs == 2 else None, "label")


# ---------------------------------------------------------------------------------------------
# LM-BFF's on-disk layout


@dataclass(frozen=True)
class LmbffFormat:
    """How LM-BFF stores one task: file type, header, columns and split file names."""

    columns: Columns
    ext: str  # "tsv" (GLUE style: tab-split, no quoting) or "csv" (quoted)
    header: bool
    folder: str | None = None  # folder under the root, when it is not the task's name
    dev: str = "dev"
    test: str = "test"


_SENTENCE_CSV = LmbffFormat(Columns(text_a=1, label=0), "csv", header=False)
_NLI = Columns("sentence1", "sentence2", label=-1)  # gold_label is the last field

LMBFF_FORMATS: dict[str, LmbffFormat] = {
    "SST-2": LmbffFormat(Columns("sentence", None, "label"), "tsv", header=True),
    **{name: _SENTENCE_CSV for name in ("sst-5", "mr", "cr", "mpqa", "subj", "trec")},
    "CoLA": LmbffFormat(Columns(text_a=3, label=1), "tsv", header=False),  # source, label, mark, sentence
    # LM-BFF's few-shot dev comes from train, so matched and mismatched runs share dev_matched
    "MNLI": LmbffFormat(_NLI, "tsv", True, dev="dev_matched", test="test_matched"),
    "MNLI-mm": LmbffFormat(_NLI, "tsv", True, folder="MNLI", dev="dev_matched", test="test_mismatched"),
    "SNLI": LmbffFormat(_NLI, "tsv", header=True),
    "QNLI": LmbffFormat(Columns("question", "sentence", "label"), "tsv", header=True),
    "RTE": LmbffFormat(Columns("sentence1", "sentence2", "label"), "tsv", header=True),
    "MRPC": LmbffFormat(Columns("#1 String", "#2 String", "Quality"), "tsv", header=True),
    "QQP": LmbffFormat(Columns("question1", "question2", "is_duplicate"), "tsv", header=True),
    "STS-B": LmbffFormat(Columns("sentence1", "sentence2", "score"), "tsv", header=True),
}


def lmbff_format(task: Task | str) -> LmbffFormat:
    name = _task(task).name
    if name not in LMBFF_FORMATS:
        raise DataError(
            f"task {name!r} has no LM-BFF file format (known: {', '.join(LMBFF_FORMATS)}); "
            "generate its splits with make_splits(..., out_dir=...) and load those instead"
        )
    return LMBFF_FORMATS[name]


def load_lmbff(
    root: str | Path | None,
    task: Task | str,
    k: int = 16,
    seed: int = 13,
    *,
    pool_root: str | Path | None = None,
) -> FewShotSplit:
    """One split from `root/TASK/K-SEED/`: a local folder or an `s3://` prefix (what every
    node of a cluster reads); root None: `assets.fewshot_dir("k-shot")`, the mirror's copy
    when `$RAYAPP_ASSETS` has one, else the local LM-BFF assets.

    Reads rayapp's JSONL layout when `train.jsonl` is there (with the provenance of its
    `_meta.json`, if any: module docstring), else LM-BFF's per-task files.
    A missing LM-BFF test file falls back to `pool_root/TASK/dev.json` (default: the `pool`
    folder beside root), see the module docstring.
    """
    task = _task(task)
    root = str(root) if root is not None else fewshot_dir("k-shot")
    seed_dir, files, columns, header, folder = _split_files(root, task, k, seed)
    # a split folder a stage made from another split (or drew from a pool) says so in its _meta.json
    derived = (read_meta(seed_dir) or {}).get("source", {}) if files["train"].endswith(".jsonl") else {}
    hint = f"expected LM-BFF's {k}-shot layout ROOT/TASK/{k}-SEED/ or rayapp's from make_splits"
    for split in ("train", "dev"):
        if not storage.is_file(files[split]):
            raise _missing(files[split], hint)
    train, dev = (read_table(files[s], columns, task, header=header) for s in ("train", "dev"))
    own = files["test"].endswith(".jsonl")  # rayapp's layout: make_splits wrote the test set
    source = {"root": root, **files, "test_source": TEST_SOURCES["given" if own else "lmbff"],
              "test_fallback": False}
    if storage.is_file(files["test"]):
        test = read_table(files["test"], columns, task, header=header)
    else:
        pool_file = storage.join(str(pool_root) if pool_root is not None else sibling(root, "pool"),
                                 folder, "dev.json")
        test, note = _fallback_test(files["test"], pool_file, task, train + dev)
        source.update(test=pool_file, test_source=TEST_SOURCES["pool"], test_fallback=True, test_note=note)
    source.update(derived)
    return FewShotSplit(task.name, k, seed, train, dev, test, source)


def _split_files(root: str, task: Task, k: int, seed: int) -> tuple[str, dict[str, str], Columns, bool, str]:
    """Split (k, seed) under `root`: its folder, train/dev/test files, their columns, whether
    they have a header, and the task's folder: rayapp's JSONL layout when its train.jsonl is
    there, else LM-BFF's per-task files."""
    seed_dir = storage.join(root, task.name, f"{k}-{seed}")
    if storage.is_file(storage.join(seed_dir, "train.jsonl")):
        files = {split: storage.join(seed_dir, f"{split}.jsonl") for split in SPLITS}
        return seed_dir, files, example_columns(task), True, task.name
    fmt = lmbff_format(task)
    folder = fmt.folder or task.name
    seed_dir = storage.join(root, folder, f"{k}-{seed}")
    stems = {"train": "train", "dev": fmt.dev, "test": fmt.test}
    files = {split: storage.join(seed_dir, f"{stem}.{fmt.ext}") for split, stem in stems.items()}
    return seed_dir, files, fmt.columns, fmt.header, folder


def holds_split(root: str | Path | None, task: Task | str, k: int, seed: int) -> bool:
    """Whether the k-shot `root` (None: the assets') has split (k, seed) of `task`, in either layout."""
    task = _task(task)
    try:
        _, files, *_ = _split_files(str(root) if root is not None else fewshot_dir("k-shot"), task, k, seed)
    except DataError:  # a user's task (no LM-BFF format) without rayapp's layout there
        return False
    return storage.is_file(files["train"])


def sibling(root: str, name: str) -> str:
    """The folder `name` beside `root` (a local path or URI): where LM-BFF keeps `pool`."""
    if storage.is_remote(root):
        return root.rstrip("/").rsplit("/", 1)[0] + "/" + name
    return str(Path(root).parent / name)


# `FewShotSplit.source["test_source"]`: where a split's test set came from
TEST_SOURCES = {
    "lmbff": "original (LM-BFF test file)",  # the task's original dev (GLUE) or test set
    "given": "given to make_splits",
    "pool": "pool (not the original dev set)",  # drawn from the original train set
}
# Tasks whose test set the pool cannot stand in for, and why
NO_POOL_TEST = {
    "MNLI-mm": "MNLI-mm is MNLI scored on the mismatched genres, which MNLI's train set (and so the "
    "pool) does not contain: a pool test set would make it MNLI",
}


def _fallback_test(missing: str, pool_file: str, task: Task, seen: list[Example]) -> tuple[list[Example], str]:
    """Test set from the labelled pool's dev split when LM-BFF's test file is absent."""
    if task.name in NO_POOL_TEST:
        raise DataError(
            f"{missing} does not exist and task {task.name} has no stand-in ({NO_POOL_TEST[task.name]}); "
            "put the labelled mismatched set there (GLUE MNLI dev_mismatched.tsv, LM-BFF's test_mismatched.tsv), "
            "or run task MNLI"
        )
    if not storage.is_file(pool_file):
        raise _missing(missing, f"put the task's labelled test file there (or a pool at {pool_file})")
    # the pool is drawn from the original train set, so drop what the split trains/selects on
    seen_texts = {(ex.text_a, ex.text_b) for ex in seen}
    pool = read_table(pool_file, example_columns(task), task)
    test = [ex for ex in pool if (ex.text_a, ex.text_b) not in seen_texts]
    note = (
        f"{PurePosixPath(missing).name} is missing; test = labelled pool {pool_file} ({len(test)} examples, "
        f"{len(pool) - len(test)} also in train/dev removed), drawn from the original train set, "
        "not the original dev set"
    )
    log.warning("%s: %s", task.name, note)
    return test, note


# ---------------------------------------------------------------------------------------------
# Reading any labelled table


def read_table(
    uri: str | Path,
    columns: Columns | None,
    task: Task | str,
    *,
    fmt: str | None = None,
    header: bool = True,
    on_bad_lines: str = "error",
) -> list[Example]:
    """Examples from a table: a .tsv/.csv/.jsonl/.json/.parquet file (local or `s3://`) or an
    `hf://` dataset.

    `columns` None means rayapp's own names (text_a, text_b, label), as in the pool JSON.
    `header` applies to TSV/CSV only; without one, name columns by position.
    `hf://NAME/CONFIG?split=S` or `hf://ORG/NAME?config=C&split=S` goes through
    `datasets.load_dataset` (see `storage.parse_hf_uri`).

    A line that does not parse is a DataError naming the file and line, or with
    `on_bad_lines="skip"` skipped, with one warning counting them (`rayapp.data.formats`):
    a JSONL line that is not a JSON object, a TSV/CSV row with fewer fields than the header
    (without a header: than the first row) or more. More are allowed in a TSV with a header
    only: GLUE's NLI files append annotator labels past it (the gold label is read from the
    row's end); in a CSV an extra field is an unquoted comma, which would shift the columns.
    """
    task = _task(task)
    uri = str(uri)
    check_on_bad_lines(on_bad_lines)
    fmt = fmt or detect_format(uri, TABLE_FORMATS)
    if fmt not in TABLE_FORMATS:
        raise DataError(f"unknown table format {fmt!r} for {uri}; use one of {', '.join(TABLE_FORMATS)}")
    if fmt != "hf" and not storage.is_file(uri):
        raise _missing(uri, "check the path")
    skipped: list[int] = []  # line numbers, under on_bad_lines="skip"
    names, rows = _READERS[fmt](uri, header, on_bad_lines, skipped)
    warn_skipped(uri, len(skipped), f", lines {', '.join(map(str, skipped[:5]))}{' ...' if len(skipped) > 5 else ''}")
    if not rows:
        raise DataError(f"{uri} has no data rows; give a table with at least one labelled example")
    return _examples(names, rows, columns or example_columns(task), task, uri)


Rows = list[list]


def _text_of(uri: str) -> str:
    """A whole table file (few-shot tables are small), local or `s3://`; utf-8-sig: LM-BFF's
    MRPC files start with a BOM, which would otherwise glue onto "Quality"."""
    return storage.read_bytes(uri).decode("utf-8-sig")


def _bad(path: str, line: int, problem: str, on_bad_lines: str, skipped: list[int]) -> None:
    if on_bad_lines != "skip":
        raise bad_line_error(f"{path} line {line}", problem)
    skipped.append(line)


def _read_delimited(path: str, header: bool, on_bad_lines: str, skipped: list[int], delimiter: str,
                    quoting: int) -> tuple[list[str] | None, Rows]:
    reader = csv.reader(io.StringIO(_text_of(path), newline=""), delimiter=delimiter, quoting=quoting)
    kind = "TSV" if delimiter == "\t" else "CSV"
    names, rows, width, line = None, [], None, 1
    try:
        for row in reader:
            start, line = line, reader.line_num + 1  # a quoted CSV row may span lines: name its first
            if not row:
                continue
            if width is None:
                width = len(row)
                if header:
                    names = row
                    continue
            if len(row) < width or (len(row) > width and not (header and kind == "TSV")):
                against = "the header" if header else "the first row"
                _bad(path, start, f"has {len(row)} fields but {against} has {width}", on_bad_lines, skipped)
                continue
            rows.append(row)
    except csv.Error as e:  # a NUL byte, a field over the csv module's size limit
        raise DataError(f"{path} line {reader.line_num} cannot be read as {kind} ({e}); fix that line") from None
    return names, rows


def _read_tsv(path: str, header: bool, on_bad_lines: str, skipped: list[int]):
    # GLUE TSVs hold bare quote characters; LM-BFF splits lines on tabs, so no quoting here
    return _read_delimited(path, header, on_bad_lines, skipped, "\t", csv.QUOTE_NONE)


def _read_csv(path: str, header: bool, on_bad_lines: str, skipped: list[int]):
    return _read_delimited(path, header, on_bad_lines, skipped, ",", csv.QUOTE_MINIMAL)


def _read_jsonl(path: str, header: bool, on_bad_lines: str, skipped: list[int]):
    records = []
    for n, line in enumerate(_text_of(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            _bad(path, n, f"is not valid JSON ({e})", on_bad_lines, skipped)
            continue
        if not isinstance(record, dict):
            _bad(path, n, "is not a JSON object (JSONL needs one object a line)", on_bad_lines, skipped)
            continue
        records.append(record)
    return _from_records(records, path)


def _read_json(path: str, header: bool, on_bad_lines: str, skipped: list[int]):
    """A JSON array of records, or the pool format `{"0": {record}, "1": ...}`."""
    try:
        data = json.loads(_text_of(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e})") from None
    return _from_records(list(data.values()) if isinstance(data, dict) else data, path)


def _read_parquet(path: str, header: bool, on_bad_lines: str, skipped: list[int]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(storage.read_bytes(path)))
    except pa.ArrowException as e:
        raise DataError(f"{path} is not a readable parquet file ({e}); write the table again") from None
    return _from_records(table.to_pylist(), path)


def _read_hf(uri: str, header: bool, on_bad_lines: str, skipped: list[int]):
    return _hf_table(load_hf(uri), uri)


def _hf_table(dataset, uri: str) -> tuple[list[str], Rows]:
    """Header names + rows of a `datasets.Dataset`; ClassLabel ints become their names
    (e.g. GLUE MNLI's 0 -> "entailment") so they match the task's label strings."""
    import datasets

    records = dataset.to_list()
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.ClassLabel):
            for record in records:
                if record[name] is not None and record[name] >= 0:  # -1: GLUE's unlabelled test rows
                    record[name] = feature.int2str(record[name])
    return _from_records(records, uri)


def _from_records(records: list, uri: str) -> tuple[list[str], Rows]:
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DataError(f"{uri} must hold records (objects with column names as keys)")
    names = list(dict.fromkeys(name for record in records for name in record))  # first-seen order
    return names, [[record.get(name) for name in names] for record in records]


_READERS = {
    "tsv": _read_tsv,
    "csv": _read_csv,
    "jsonl": _read_jsonl,
    "json": _read_json,
    "parquet": _read_parquet,
    "hf": _read_hf,
}


def _examples(names: list[str] | None, rows: Rows, columns: Columns, task: Task, uri: str) -> list[Example]:
    if (columns.text_b is not None) != (task.num_inputs == 2):
        need = "two inputs: set Columns.text_b" if task.num_inputs == 2 else "one input: leave Columns.text_b None"
        raise DataError(f"task {task.name} takes {need} (reading {uri} with {columns})")
    refs = {"text_a": columns.text_a, "text_b": columns.text_b, "label": columns.label}
    index = {role: _resolve(ref, names, uri) for role, ref in refs.items() if ref is not None}
    examples = []
    for n, row in enumerate(rows, start=1):
        value = {role: _field(row, i, n, refs[role], uri) for role, i in index.items()}
        examples.append(
            Example(
                text_a=_text(value["text_a"]),
                text_b=_text(value["text_b"]) if "text_b" in value else None,
                label=_label(value["label"], task, f"{uri} row {n} column {columns.label!r}"),
            )
        )
    return examples


def _resolve(ref: ColumnRef, names: list[str] | None, uri: str) -> int:
    if isinstance(ref, int):
        return ref
    if names is None:
        raise DataError(
            f"{uri} is read without a header, so column {ref!r} cannot be found by name; "
            "give 0-based positions (e.g. Columns(text_a=1, label=0)) or read it with header=True"
        )
    if ref not in names:
        raise DataError(f"{uri} has no column {ref!r}; its columns are {names}; fix the Columns mapping")
    return names.index(ref)


def _field(row: list, i: int, n: int, ref: ColumnRef, uri: str):
    try:
        return row[i]
    except IndexError:
        raise DataError(f"{uri} row {n} has {len(row)} fields, too few for column {ref!r} (position {i})") from None


def _text(value) -> str:
    return "" if value is None else str(value)


def _label(value, task: Task, where: str) -> str | float:
    if task.is_regression:
        try:
            score = float(value)
        except (TypeError, ValueError):
            score = float("nan")
        low, high = task.bounds
        if not low <= score <= high:  # also catches NaN
            raise DataError(
                f"{where}: label {value!r} is not a number in task {task.name}'s range [{low}, {high}]; "
                "check the label column mapping or the data"
            )
        return score
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # integer labels become floats in columns that also hold nulls
    label = "" if value is None else str(value).strip()
    if label not in task.labels:
        raise DataError(
            f"{where}: label {label!r} is not one of task {task.name}'s labels {task.labels}; "
            "check the label column mapping or the data"
        )
    return label


# ---------------------------------------------------------------------------------------------
# Sampling new splits


def sample_fewshot(pool: list[Example], task: Task | str, k: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, dev), K per label each, disjoint, drawn from `pool` as LM-BFF's
    tools/generate_k_shot_data.py draws them: `np.random.seed(seed)`, the pool's rows shuffled
    in file order with numpy's legacy shuffle, then per label (in the order labels first occur
    in the shuffled rows) its first K rows go to train and the next K to dev; both are grouped
    by label in that order. From LM-BFF's original train file this gives LM-BFF's published
    splits row for row (tests/test_fewshot.py). One difference: a row with empty text is
    passed over after the shuffle (module docstring), where LM-BFF would take it."""
    task = _task(task)
    if k < 1:
        raise DataError(f"k must be at least 1, got {k}")
    order = list(range(len(pool)))  # a list, as LM-BFF shuffles its list of lines
    np.random.RandomState(seed).shuffle(order)
    groups: dict[str, list[Example]] = {}
    for ex in (pool[i] for i in order):
        members = groups.setdefault(_group(ex, task), [])
        if _has_text(ex):
            members.append(ex)
    groups.update({group: [] for group in _groups(task) if group not in groups})  # a label the pool lacks
    for group, members in groups.items():
        if len(members) < 2 * k:
            raise DataError(
                f"task {task.name}: {group} has {len(members)} usable examples (non-empty text) in the "
                f"pool, but a {k}-shot split needs {2 * k} ({k} train + {k} dev); use a bigger pool or smaller k"
            )
    return (
        [ex for members in groups.values() for ex in members[:k]],
        [ex for members in groups.values() for ex in members[k : 2 * k]],
    )


def _has_text(ex: Example) -> bool:
    return bool(ex.text_a.strip()) and (ex.text_b is None or bool(ex.text_b.strip()))


def _midpoint(task: Task) -> float:
    low, high = task.bounds
    return (low + high) / 2


def _groups(task: Task) -> list[str]:
    if task.is_regression:
        return [f"scores < {_midpoint(task)}", f"scores >= {_midpoint(task)}"]
    return [f"label {label!r}" for label in task.labels]


def _group(ex: Example, task: Task) -> str:
    if task.is_regression:
        return _groups(task)[ex.label >= _midpoint(task)]
    if ex.label not in task.labels:
        raise DataError(f"pool example {ex} has label {ex.label!r}, not one of task {task.name}'s labels {task.labels}")
    return f"label {ex.label!r}"


def make_splits(
    pool: list[Example],
    test: list[Example],
    task: Task | str,
    k: int = 16,
    seeds: tuple[int, ...] = SEEDS,
    out_dir: str | Path | None = None,
) -> list[FewShotSplit]:
    """One split per seed from a labelled pool (the original train set) and a test set.

    With `out_dir`, each split is also written to `out_dir/TASK/K-SEED/{train,dev,test}.jsonl`,
    which `load_lmbff(out_dir, task, k, seed)` reads back.
    """
    task = _task(task)
    if not test:
        raise DataError(f"task {task.name}: the test set is empty; give the labelled original dev split as test")
    source = {**_pool_stats(pool), "test_source": TEST_SOURCES["given"], "test_fallback": False}
    splits = []
    for seed in seeds:
        train, dev = sample_fewshot(pool, task, k, seed)
        split = FewShotSplit(task.name, k, seed, train, dev, list(test), dict(source))
        if out_dir is not None:
            split.source["dir"] = write_split(str(out_dir), split)
        splits.append(split)
    return splits


def _pool_stats(pool: list[Example]) -> dict:
    return {"pool_size": len(pool), "empty_text_skipped": sum(not _has_text(ex) for ex in pool)}


def write_split(root: str, split: FewShotSplit) -> str:
    """Write `split` as `root/TASK/K-SEED/{train,dev,test}.jsonl` (local or `s3://`, each file
    whole: `storage.write_text`), the layout `load_lmbff` reads, and last, when the split has a
    `source`, its `_meta.json` (which `load_lmbff` adds to the loaded split's); returns that folder."""
    seed_dir = storage.join(root, split.task, f"{split.k}-{split.seed}")
    for name in SPLITS:
        records = ({"text_a": ex.text_a, "text_b": ex.text_b, "label": ex.label} for ex in getattr(split, name))
        storage.write_text(storage.join(seed_dir, f"{name}.jsonl"),
                           "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    if split.source:
        storage.write_text(storage.join(seed_dir, META), json.dumps({"source": split.source}, indent=1))
    return seed_dir


def draw_lmbff_split(root: str | Path | None, task: Task | str, k: int, seed: int, out: str, *, base_k: int = 16,
                     train: str | None = None, test: str | None = None) -> FewShotSplit:
    """Split (k, seed) of `task` for a K the k-shot `root` (None: the assets') lacks, drawn as
    LM-BFF draws its splits (`sample_fewshot`) and written to `out/TASK/K-SEED/` with its
    `_meta.json` last; a finished one there is read back, so a resumed sweep draws nothing twice.

    `train`: the task's original train set, as LM-BFF's data/original holds it (TSV/CSV in its
    per-task format; JSON/JSONL/parquet with text_a/text_b/label). None: the labelled pool
    beside `root` (`unlabelled.default_pool`), a part of the original train set: LM-BFF's
    procedure on fewer rows, so not the split LM-BFF would publish, and the source says so.
    `test`: the original dev set; None: the test set of `root`'s own `base_k`-shot split of the
    seed (LM-BFF's test file is the original dev set, the same for every K and seed); a pool
    stand-in for it (`_fallback_test`) loses the examples the new train/dev hold."""
    from rayapp.data.unlabelled import default_pool  # it imports this module

    task = _task(task)
    if storage.exists(storage.join(out, task.name, f"{k}-{seed}", META)):
        return load_lmbff(out, task, k, seed)
    root = str(root) if root is not None else fewshot_dir("k-shot")
    pool_uri = train or default_pool(task, root)
    pool = read_original(pool_uri, task)
    try:
        train_set, dev_set = sample_fewshot(pool, task, k, seed)
    except DataError as e:
        raise DataError(f"{task.name} split {k}-{seed} from {pool_uri}: {e}") from None
    source = {"drawn_by": "LM-BFF's tools/generate_k_shot_data.py procedure", "pool": pool_uri, **_pool_stats(pool),
              "pool_kind": "original train set" if train else "LM-BFF's labelled pool (part of the original train "
              "set): not the split LM-BFF would publish",
              "root": root}  # the k-shot root the split stands in for: Prompt-Distiller's X~ pool is beside it
    if test is not None:
        tests = read_original(test, task)
        source.update(test=test, test_source=TEST_SOURCES["given"], test_fallback=False)
    else:
        base = load_lmbff(root, task, base_k, seed)
        seen = {(ex.text_a, ex.text_b) for ex in train_set + dev_set} if base.source["test_fallback"] else set()
        tests = [ex for ex in base.test if (ex.text_a, ex.text_b) not in seen]
        source.update({key: value for key, value in base.source.items()
                       if key in ("test", "test_source", "test_fallback", "test_note")})
    write_split(out, FewShotSplit(task.name, k, seed, train_set, dev_set, tests, source))
    return load_lmbff(out, task, k, seed)


def read_original(uri: str, task: Task | str) -> list[Example]:
    """A task's original labelled data (LM-BFF's data/original, or the pool): TSV/CSV in
    LM-BFF's per-task format (`LMBFF_FORMATS`), other tables by rayapp's column names."""
    task = _task(task)
    if suffix_format(uri) in ("tsv", "csv"):
        fmt = lmbff_format(task)
        return read_table(uri, fmt.columns, task, header=fmt.header)
    return read_table(uri, None, task)


# ---------------------------------------------------------------------------------------------


def _task(task: Task | str) -> Task:
    return get_task(task) if isinstance(task, str) else task


def _missing(uri: str, hint: str) -> DataError:
    """A 'not found' error that lists what the nearest existing local folder does hold."""
    if storage.is_remote(uri):
        storage.check_bucket(uri)  # a placeholder or misspelt bucket is named as such
        return DataError(f"{uri} does not exist; {hint}")
    path = Path(uri)
    parent = path.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    held = sorted(p.name for p in parent.iterdir()) if parent.is_dir() else []
    return DataError(f"{path} does not exist ({parent} holds: {', '.join(held) or 'nothing'}); {hint}")
