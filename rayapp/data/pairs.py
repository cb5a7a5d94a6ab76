"""SMASH sentence-pair intermediate task (SMASH §3.2), built from an unlabelled corpus on Ray.

Labels (SMASH §3.2, after Gu et al. 2021): 0 = x1 and x2 come from different documents,
1 = same document, not adjacent, 2 = adjacent (x2 directly follows x1 in the document).
The template is MNLI's (`INTERMEDIATE_TASKS["smash-pairs"]`, max 128 tokens; `_meta.json`
records it); examples keep raw sentences and the encoder truncates. Output:
`OUT/part-NNNNN.parquet` with columns `text_a, text_b, label, doc_a, doc_b, sent_a, sent_b`
(sent_* = the sentence's position among all sentences of its document, see
`rayapp.data.corpus`), so every label can be checked against the source, then
`OUT/_meta.json` (`rayapp.data.shards`: written last, it marks a finished folder and holds
each shard's rows and checksum; consumers refuse a folder without it). Corpus lines that do
not parse stop the build, naming the line, or with `on_bad_lines=skip` are skipped and
counted (`corpus_counts.bad_lines`).

Candidates. From a document with kept sentences at positions p_0 < ... < p_{k-1}:
- label 2: the pairs (i, i+1) with p_{i+1} = p_i + 1 (a dropped sentence in between breaks
  adjacency, so the source really has x1 immediately followed by x2);
- label 1: every other ordered pair of distinct kept sentences, minus the reversed
  adjacent ones (x2 right before x1 is adjacent too, just not label 2), so
  k(k-1) - 2*adjacent pairs: |sent_b - sent_a| > 1 for all of them;
- label 0: x1 any kept sentence, x2 a kept sentence of another document.
A one-sentence document gives only label 0. Exactly N rows come out, N//3 per label plus
one for labels 0.. N%3-1, each label a uniform sample without replacement of its
candidates; if the corpus has fewer, the DataError says how many balanced pairs it can give.

Design: split once into a sentence table, then index arithmetic. The corpus is cut into
sources of ~16 MB (`rayapp.data.corpus.plan_sources`); three rounds of Ray tasks and one
step on the driver follow:
1. Split (one task per source, the only pass over the corpus): documents -> kept
   sentences, written as one Arrow file per source in the scratch folder `OUT/_work`
   (`text`, `doc` (dictionary-encoded doc id), `pos`); the task returns its counts (number
   of documents and of adjacent / non-adjacent pairs, kept sentences per document).
2. Sample (driver, numbers only, O(N + documents)): label-1/2 candidates are numbered
   across the sources (each source's index space after the previous one's), and N_l
   distinct numbers are drawn uniformly; label-0 pairs are drawn as ordered pairs of
   global sentence numbers, redrawn when both ends fall in one document or the pair
   repeats. A random permutation of 0..N-1 gives every pair its output row, so shards
   interleave the labels at random.
3. Gather (one task per source): decode its candidate numbers into sentence pairs (label
   1 from an index space, without enumerating a document's k^2 pairs), take the texts of
   those and of the label-0 ends it holds from its sentence table, and write them to one
   Arrow file with a record batch per output shard.
4. Write (one task per output shard): read that shard's batch of every source, sort by
   row, write `part-NNNNN.parquet` through `shards.write_table` (temporary name + rename,
   or one S3 PUT), so a shard that exists is complete. Then the scratch folder is removed
   and `_meta.json` written.
Memory: each task holds one source's sentences or one shard (tens of MB), the driver
O(N + documents) numbers; nothing grows with the corpus except the driver's per-document
counts (8 bytes a document) and the scratch folder on disk (~ the kept text). Time: the
split is the cost (regex sentence splitting in Python) and runs on every core; the other
rounds move each selected sentence a fixed number of times through Arrow, without Ray
Data's shuffles or the object store.

Determinism: every random draw is the driver's, from the seed, and numbers candidates and
sentences in corpus order (files sorted, documents in file order), which no cut into
sources changes; the tasks only compute. So the same corpus, seed and sentence settings
give the same pairs in the same rows whatever `chunk_bytes` or the cluster, and
byte-identical shards for the same `rows_per_shard` (the rows read in shard-name order
are one sequence whatever it is).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import ray

from rayapp import env, storage
from rayapp.config import InputPath, OutputPath
from rayapp.data.corpus import (CHUNK_BYTES, DROP_REASONS, Source, check_words, document_sentences,
                                plan_sources)
from rayapp.data.formats import CORPUS_FORMATS, warn_skipped
from rayapp.data.shards import META, shard_name, write_meta, write_table
from rayapp.errors import ConfigError, DataError

log = logging.getLogger(__name__)

TASK = "smash-pairs"  # rayapp.tasks.registry.INTERMEDIATE_TASKS: MNLI's template, labels No/Maybe/Yes
PAIR_LABELS = {0: "different documents", 1: "same document, not adjacent",
               2: "adjacent: x2 directly follows x1"}
PAIRS_SCHEMA = pa.schema([
    ("text_a", pa.string()), ("text_b", pa.string()), ("label", pa.int64()),
    ("doc_a", pa.string()), ("doc_b", pa.string()), ("sent_a", pa.int64()), ("sent_b", pa.int64()),
])
WORK = "_work"  # scratch sub-folder of the output: sentence tables and gathered pieces
_ENUMERATE = 1 << 22  # label-0 populations up to this size are enumerated, not rejection-sampled


@dataclass
class PairsConfig:
    """`rayapp intermediate pairs --config FILE key=value ...`"""

    corpus: InputPath  # text / WikiExtractor / JSONL / parquet files, s3:// prefix or hf://
    out: OutputPath  # output folder, local or s3://
    num_examples: int  # exactly this many pairs, balanced over the three labels
    seed: int = 0
    fmt: str = "auto"  # the corpus reader's settings (rayapp.data.corpus)
    text_column: str = "text"
    id_column: str | None = None
    min_words: int = 4
    max_words: int = 80
    chunk_bytes: int = CHUNK_BYTES  # corpus bytes per split task
    rows_per_shard: int = 100_000
    on_bad_lines: Literal["error", "skip"] = "error"  # a JSONL line that does not parse (rayapp.data.corpus)

    def __post_init__(self) -> None:
        if self.num_examples < 1:
            raise ConfigError(f"num_examples must be at least 1, got {self.num_examples}")
        if self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed}")
        if self.fmt not in ("auto", *CORPUS_FORMATS):
            raise ConfigError(f"unknown corpus format fmt={self.fmt!r}; use one of auto, {', '.join(CORPUS_FORMATS)}")
        for key in ("chunk_bytes", "rows_per_shard"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        check_words(self.min_words, self.max_words)


def label_counts(num_examples: int) -> list[int]:
    """Rows per label for `num_examples`: N//3 each, one more for labels below N%3."""
    return [num_examples // 3 + (label < num_examples % 3) for label in range(3)]


def max_balanced(capacity: list[int]) -> int:
    """Largest N with label_counts(N)[l] <= capacity[l] for every label l."""
    # label_counts(N)[l] = ceil((N - l) / 3) <= c  <=>  N <= 3c + l
    return min(3 * c + label for label, c in enumerate(capacity))


@dataclass(frozen=True)
class PairCounts:
    """Corpus totals from the split round (sentences = kept sentences)."""

    documents: int
    empty: int  # documents without a kept sentence
    single: int  # one kept sentence: label 0 only
    sentences: int
    square: int  # sum over documents of k^2
    adjacent: int
    nonadjacent: int
    fragments: int
    headings: int
    long: int
    undecodable: int
    bad_lines: int  # corpus lines skipped as unparseable (on_bad_lines="skip"); not documents

    @property
    def capacity(self) -> list[int]:
        """Candidates per label: cross-document ordered pairs, then labels 1 and 2."""
        return [self.sentences ** 2 - self.square, self.nonadjacent, self.adjacent]


# --- sampling helpers ----------------------------------------------------------------------

def _distinct(rng: np.random.Generator, population: int, n: int, valid=None) -> np.ndarray:
    """`n` distinct uniform draws from [0, population) that `valid` (a vectorised
    predicate, None: all) accepts: a uniform sample without replacement, in O(n) memory
    unless `valid` is given and the population is small enough to enumerate."""
    if valid is None and 2 * n >= population:
        return rng.permutation(population)[:n]
    if valid is not None and population <= _ENUMERATE:
        candidates = np.arange(population)
        candidates = candidates[valid(candidates)]
        return candidates[rng.permutation(len(candidates))[:n]]
    picked = np.zeros(0, dtype=np.int64)
    while len(picked) < n:  # keep first occurrences in draw order: sequential sampling
        draw = rng.integers(population, size=2 * (n - len(picked)) + 64)
        both = np.concatenate([picked, draw if valid is None else draw[valid(draw)]])
        _, first = np.unique(both, return_index=True)
        picked = both[np.sort(first)]
    return picked[:n]


def _far_pair(f: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The f-th pair (i, j), j >= i + 2, of k sentences in row-major order (row i holds
    k-2-i pairs, so row i starts at i(2k-3-i)/2); vectorised over f and k."""
    start = lambda i: i * (2 * k - 3 - i) // 2  # noqa: E731
    i = np.floor(((2 * k - 3) - np.sqrt(np.maximum((2 * k - 3) ** 2 - 8 * f, 0))) / 2).astype(np.int64)
    i = np.maximum(i, 0)
    for _ in range(2):  # float rounding: settle on the largest i with start(i) <= f
        i = np.where(start(i + 1) <= f, i + 1, i)
        i = np.where(start(i) > f, i - 1, i)
    return i, i + 2 + f - start(i)


# --- round 1: split ------------------------------------------------------------------------

def _table_path(root: str, kind: str, index: int) -> str:
    return f"{root}/{kind}-{index:05d}.arrow"


def _write_arrow(fs, path: str, table: pa.Table, batch_bounds: list[int] | None = None) -> None:
    """An Arrow IPC file; with `batch_bounds`, record batch s = rows [b_s, b_{s+1})."""
    with fs.open_output_stream(path) as sink, pa.ipc.new_file(sink, table.schema) as writer:
        if batch_bounds is None:
            writer.write_table(table)
            return
        batch = table.combine_chunks().to_batches()
        batch = batch[0] if batch else pa.RecordBatch.from_pylist([], schema=table.schema)
        for lo, hi in zip(batch_bounds, batch_bounds[1:]):
            writer.write_batch(batch.slice(lo, hi - lo))


def _split_source(source: Source, index: int, fs, work: str, min_words: int, max_words: int) -> dict:
    """Round 1: one source's kept sentences -> `sent-INDEX.arrow`; returns its counts."""
    texts, docs, positions, ids, sizes = [], [], [], [], []
    counts = dict.fromkeys(("documents", "bad_lines", *DROP_REASONS), 0)
    for doc_id, text in source.docs():
        if text is None:  # a line skipped under on_bad_lines="skip"
            counts["bad_lines"] += 1
            continue
        doc = document_sentences(text, min_words=min_words, max_words=max_words)
        counts["documents"] += 1
        for reason in DROP_REASONS:
            counts[reason] += getattr(doc, reason)
        if doc.sentences:
            docs += [len(ids)] * len(doc.sentences)
            ids.append(doc_id)
            sizes.append(len(doc.sentences))
            texts += doc.sentences
            positions += doc.positions
    doc, pos, k = np.asarray(docs, np.int32), np.asarray(positions, np.int32), np.asarray(sizes, np.int64)
    adjacent = int(np.sum((doc[1:] == doc[:-1]) & (np.diff(pos) == 1)))
    table = pa.table({"text": pa.array(texts, pa.string()),
                      "doc": pa.DictionaryArray.from_arrays(pa.array(doc), pa.array(ids, pa.string())),
                      "pos": pa.array(pos)})
    _write_arrow(fs, _table_path(work, "sent", index), table)
    return {**counts, "k": k, "adjacent": adjacent, "nonadjacent": int(np.sum(k * (k - 1))) - 2 * adjacent}


def _corpus_counts(splits: list[dict]) -> PairCounts:
    k = np.concatenate([s["k"] for s in splits])
    total = {key: sum(s[key] for s in splits)
             for key in ("documents", "bad_lines", "adjacent", "nonadjacent", *DROP_REASONS)}
    return PairCounts(empty=total["documents"] - len(k), single=int(np.sum(k == 1)), sentences=int(k.sum()),
                      square=int(np.sum(k * k)), **total)


# --- round 2: sample (driver) --------------------------------------------------------------

@dataclass
class _Requests:
    """What one gather task takes from its source, each with its output row: label-1/2
    candidates (numbers in the source's index space of that label, see `_source_pairs`)
    and label-0 ends (sentence numbers; side 0 = x1, 1 = x2)."""

    candidates: dict[int, tuple[np.ndarray, np.ndarray]]  # label -> (numbers, rows)
    ends: tuple[np.ndarray, np.ndarray, np.ndarray]  # (numbers, rows, sides)


def _by_source(index: np.ndarray, sizes: np.ndarray, *columns: np.ndarray) -> list[list[np.ndarray]]:
    """Numbers over the sources' concatenated ranges (`sizes` each) -> per source: the
    local numbers and the matching entries of `columns`."""
    end = np.cumsum(sizes)
    source = np.searchsorted(end, index, side="right")
    order = np.argsort(source, kind="stable")
    local, *columns = (a[order] for a in (index - (end - sizes)[source], *columns))
    bounds = np.searchsorted(source[order], np.arange(len(sizes) + 1))
    return [[a[lo:hi] for a in (local, *columns)] for lo, hi in zip(bounds, bounds[1:])]


def _plan(splits: list[dict], needed: list[int], seed: int) -> list[_Requests]:
    """Every random draw of the build: which candidates and which output rows."""
    rng = np.random.default_rng(seed)
    rows = np.split(rng.permutation(sum(needed)), np.cumsum(needed)[:-1])  # of label 0, 1, 2 pairs
    candidates = {}
    for label, key in ((1, "nonadjacent"), (2, "adjacent")):
        sizes = np.array([s[key] for s in splits], np.int64)
        candidates[label] = _by_source(_distinct(rng, int(sizes.sum()), needed[label]), sizes, rows[label])
    # Label 0: ordered pairs of global sentence numbers, redrawn when in one document.
    sentences = np.array([int(s["k"].sum()) for s in splits], np.int64)
    doc_end = np.cumsum(np.concatenate([s["k"] for s in splits]))
    total = int(sentences.sum())
    doc_of = lambda g: np.searchsorted(doc_end, g, side="right")  # noqa: E731
    pairs = _distinct(rng, total * total, needed[0], valid=lambda g: doc_of(g // total) != doc_of(g % total))
    ends = _by_source(np.concatenate([pairs // total, pairs % total]), sentences,
                      np.concatenate([rows[0], rows[0]]), np.repeat(np.int8([0, 1]), needed[0]))
    return [_Requests({1: candidates[1][c], 2: candidates[2][c]}, tuple(ends[c])) for c in range(len(splits))]


# --- round 3: gather -----------------------------------------------------------------------

def _source_pairs(doc: np.ndarray, pos: np.ndarray, label: int, index: np.ndarray):
    """Candidates of `label` (1 or 2) of one source, by number -> their sentence numbers
    (a, b). Label 2: the adjacent pairs in order. Label 1: each document's index space
    holds 2 * (its gapped neighbours (i, i+1), a dropped sentence between them, then its
    pairs i < j - 1 in row-major order); bit 0 of a number picks the orientation."""
    same = doc[1:] == doc[:-1]
    step = np.diff(pos)
    if label == 2:
        a = np.flatnonzero(same & (step == 1))[index]
        return a, a + 1
    k = np.bincount(doc)
    first = np.cumsum(k) - k
    gapped = np.flatnonzero(same & (step > 1))
    gaps = np.bincount(doc[gapped], minlength=len(k))
    size = 2 * (gaps + (k - 1) * np.maximum(k - 2, 0) // 2)
    size_end = np.cumsum(size)
    d = np.searchsorted(size_end, index, side="right")
    u, flip = (index - (size_end - size)[d]) // 2, index % 2 == 1  # sizes are even: parity survives
    near = u < gaps[d]
    a = np.empty_like(u)
    a[near] = gapped[(np.cumsum(gaps) - gaps)[d[near]] + u[near]]
    b = a + 1
    i, j = _far_pair(u[~near] - gaps[d[~near]], k[d[~near]])
    a[~near], b[~near] = first[d[~near]] + i, first[d[~near]] + j
    return np.where(flip, b, a), np.where(flip, a, b)


def _gather_source(index: int, requests: _Requests, fs, work: str, rows_per_shard: int, shards: int) -> None:
    """Round 3: the sentences of one source that the pairs use -> `piece-INDEX.arrow`,
    sorted by (row, side), record batch s = output shard s."""
    with fs.open_input_file(_table_path(work, "sent", index)) as f:
        table = pa.ipc.open_file(f).read_all().combine_chunks()
    doc = table.column("doc").chunk(0).indices.to_numpy() if table.num_rows else np.zeros(0, np.int32)
    pos = table.column("pos").to_numpy()
    sentences, rows, sides = requests.ends
    sentences, rows, sides, labels = [sentences], [rows], [sides], [np.zeros(len(rows), np.int8)]
    for label in (1, 2):
        numbers, label_rows = requests.candidates[label]
        a, b = _source_pairs(doc, pos, label, numbers)
        sentences += [a, b]
        rows += [label_rows, label_rows]
        sides += [np.zeros(len(a), np.int8), np.ones(len(b), np.int8)]
        labels.append(np.full(2 * len(a), label, np.int8))
    rows, sides, sentences = np.concatenate(rows), np.concatenate(sides), np.concatenate(sentences)
    order = np.argsort(2 * rows + sides)
    rows, sentences = rows[order], sentences[order]
    picked = pa.table({
        "row": rows, "side": sides[order], "label": np.concatenate(labels)[order],
        "text": table.column("text").take(sentences),
        "doc": table.column("doc").take(sentences).combine_chunks().dictionary_decode(),
        "pos": table.column("pos").take(sentences),
    })
    bounds = np.searchsorted(rows, np.arange(shards + 1) * rows_per_shard).tolist()
    _write_arrow(fs, _table_path(work, "piece", index), picked, bounds)


# --- round 4: write ------------------------------------------------------------------------

def _write_shard(shard: int, sources: int, fs, work: str, out: str) -> tuple[list[int], dict]:
    """Round 4: one output shard from every source's piece; returns its label counts and
    its `_meta.json` entry."""
    batches = []
    for index in range(sources):
        with fs.open_input_file(_table_path(work, "piece", index)) as f:
            batches.append(pa.ipc.open_file(f).get_batch(shard))
    picked = pa.Table.from_batches(batches).combine_chunks()  # one copy; `take` on chunks copies per column
    del batches
    row, side = picked["row"].to_numpy(), picked["side"].to_numpy()
    order = np.argsort(2 * row + side)
    first, second = order[0::2], order[1::2]
    assert np.array_equal(row[first], row[second]) and not side[first].any(), "every pair has both ends"
    columns = [("text", first), ("text", second), ("label", first), ("doc", first), ("doc", second),
               ("pos", first), ("pos", second)]
    table = pa.table([picked[name].take(index) for name, index in columns], names=PAIRS_SCHEMA.names)
    del picked  # the text is in `table` now: hold one copy while writing
    release_memory()  # before the parquet writer's buffers: the take's temporaries are free
    table = table.cast(PAIRS_SCHEMA)
    entry = write_table(storage.join(out, shard_name(shard)), table)
    return np.bincount(table["label"].to_numpy(), minlength=3).tolist(), entry


# --- build ---------------------------------------------------------------------------------

def _task(fn):
    """`fn` as a one-CPU Ray task that hands its freed memory back when it returns.

    A worker that finished a task keeps what the task freed (Python's allocator, malloc and
    Arrow's mimalloc pool hold on to it), and the next round's tasks often run in other
    workers, so the build's whole process tree peaked near the sum of every worker's
    largest task: 1.22-1.36 GB for the 1 GB corpus (`benchmarks/intermediate.py`), 1.08 GB
    with this."""
    @functools.wraps(fn)
    def released(*args):
        try:
            return fn(*args)
        finally:
            release_memory()

    return ray.remote(num_cpus=1)(released)


def release_memory() -> None:
    """Hand this process's freed memory back to the system (Python, Arrow's pool, malloc)."""
    gc.collect()
    pa.default_memory_pool().release_unused()
    trim = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)


def check_out_dir(out: str) -> None:
    """Refuse an output URI that already holds a build (parquet shards or `_meta.json`)."""
    if storage.exists(out) and any(f.endswith((META, ".parquet")) for f in storage.list_files(out)):
        raise DataError(f"{out} already holds parquet files or {META}; pass a new --out, or delete "
                        "it to rebuild (shards of an older run would mix with the new ones)")


def _no_pairs_error(corpus: str, counts: PairCounts) -> DataError | None:
    if counts.documents == 0:
        skipped = f" ({counts.bad_lines} lines skipped as unparseable)" if counts.bad_lines else ""
        return DataError(f"corpus {corpus} holds no documents{skipped}; check that its files are in the "
                         "format given (fmt=...) and not empty")
    if counts.sentences == 0:
        return DataError(
            f"corpus {corpus} has {counts.documents} documents but no usable sentence: dropped "
            f"{counts.fragments} fragments (too few words or no final . ! ?), {counts.headings} "
            f"headings, {counts.long} too long, {counts.undecodable} with undecodable bytes; lower "
            "min_words / raise max_words or check the corpus encoding")
    return None


def _capacity_error(corpus: str, num_examples: int, counts: PairCounts) -> DataError:
    capacity = counts.capacity
    return DataError(
        f"corpus {corpus} can supply at most {max_balanced(capacity)} balanced pairs, "
        f"{num_examples} were asked: {capacity[2]} adjacent pairs (label 2), {capacity[1]} "
        f"same-document non-adjacent pairs (label 1), {capacity[0]} cross-document pairs "
        f"(label 0) from {counts.sentences} usable sentences in {counts.documents} documents "
        f"({counts.single} documents with one usable sentence give label 0 only). Ask for at "
        f"most {max_balanced(capacity)} pairs or use a bigger corpus")


def run(cfg: PairsConfig) -> dict[str, Any]:
    """Write `cfg.num_examples` balanced SMASH sentence pairs from `cfg.corpus` to `cfg.out`
    (local or s3://); returns the stats also saved in `_meta.json` (module docstring)."""
    start = time.perf_counter()
    check_out_dir(cfg.out)
    storage.makedirs(cfg.out)
    storage.require_shared({"corpus": cfg.corpus, "out": cfg.out})  # Ray tasks on any node read and write them
    # on the driver: an empty or unreadable corpus fails before Ray starts
    sources = plan_sources(cfg.corpus, fmt=cfg.fmt, text_column=cfg.text_column, id_column=cfg.id_column,
                           chunk_bytes=cfg.chunk_bytes, on_bad_lines=cfg.on_bad_lines)
    env.start_ray()
    work = storage.join(cfg.out, WORK)
    fs, work_root = storage.filesystem(work)
    if storage.exists(work):  # a crashed run's scratch
        fs.delete_dir(work_root)
    storage.makedirs(work)
    split, gather, write = (_task(f) for f in (_split_source, _gather_source, _write_shard))

    log.info("pairs: splitting %d corpus sources into sentences", len(sources))
    splits = ray.get([split.remote(s, i, fs, work_root, cfg.min_words, cfg.max_words)
                      for i, s in enumerate(sources)])
    counts = _corpus_counts(splits)
    warn_skipped(cfg.corpus, counts.bad_lines)
    needed = label_counts(cfg.num_examples)
    error = _no_pairs_error(cfg.corpus, counts)
    if error is None and any(n > c for n, c in zip(needed, counts.capacity)):
        error = _capacity_error(cfg.corpus, cfg.num_examples, counts)
    if error is not None:
        fs.delete_dir(work_root)
        raise error

    shards = math.ceil(cfg.num_examples / cfg.rows_per_shard)
    log.info("pairs: sampling %d pairs from %d sentences", cfg.num_examples, counts.sentences)
    requests = _plan(splits, needed, cfg.seed)
    ray.get([gather.remote(i, r, fs, work_root, cfg.rows_per_shard, shards)
             for i, r in enumerate(requests)])
    del requests
    log.info("pairs: writing %d shards", shards)
    written = ray.get([write.remote(s, len(sources), fs, work_root, cfg.out)
                       for s in range(shards)])
    fs.delete_dir(work_root)

    # here, not at the top: the registry imports torch, which Ray workers running this
    # module's tasks need not load (~180 MB each)
    from rayapp.tasks.registry import INTERMEDIATE_TASKS

    task = INTERMEDIATE_TASKS[TASK]
    stats = {
        "task": task.name, "template": task.template, "verbalizer": task.verbalizer,
        "labels": {str(label): text for label, text in PAIR_LABELS.items()},
        "corpus": cfg.corpus, "seed": cfg.seed, "num_examples": cfg.num_examples,
        "counts": {str(label): int(sum(labels[label] for labels, _ in written)) for label in range(3)},
        "files": [shard_name(s) for s in range(shards)],
        "corpus_counts": asdict(counts),
        "capacity": {str(label): c for label, c in enumerate(counts.capacity)},
        "config": asdict(cfg), "sources": len(sources), "seconds": time.perf_counter() - start,
    }
    write_meta(cfg.out, stats, {shard_name(s): entry for s, (_, entry) in enumerate(written)})
    return stats


def build_pairs(corpus: str, out: str, num_examples: int, seed: int = 0, **settings: Any) -> dict[str, Any]:
    """`run(PairsConfig(corpus, out, num_examples, seed, **settings))`: the Python API."""
    return run(PairsConfig(corpus, out, num_examples, seed, **settings))
