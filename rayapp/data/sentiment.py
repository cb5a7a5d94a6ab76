"""SMASH sentiment intermediate task: corpus sentences the teacher labels confidently.

SMASH §3.2: the teacher scores every corpus sentence x with `x It was <mask>.` over the
verbalizer [terrible, bad, okay, good, great]; sentences whose top class probability
(softmax over those five label words) is below a threshold are dropped, and the student
is then distilled on the rest with the same template (`teacher_cache.build_cache(...,
task="smash-sentiment")`). The 5-class argmax is kept as a hard label for SMASH's
hard-label baseline (§4.4, setting 7).

Pipeline (Ray Data, streaming):

    corpus ─► sentences ─► TeacherScorer actor pool ─► label + threshold ─► driver writes
              (rayapp.data.corpus)  (probs over the 5 words,  (Ray tasks)          part-NNNNN.parquet
                                GPU when present)

- Counting: like `build_pairs`, a first cheap pass (read and split, no teacher) counts the
  documents and usable sentences, so an empty corpus fails before any teacher loads and
  `_meta.json` can report kept / scored.
- Threshold in [0, 1]: 0 keeps every sentence. If no sentence reaches it, DataError and no
  `_meta.json`: an empty intermediate task cannot be distilled on.
- Cap: every sentence has a seeded key, blake2b(seed, doc_id, position). With
  `num_examples` the output is the kept sentences with the smallest keys, a uniform seeded
  sample that does not depend on how Ray batched or scheduled the work; the driver keeps a
  running bottom-n (memory O(num_examples), not O(corpus)) and writes it in key order,
  i.e. shuffled. Scoring can only tell afterwards how many sentences pass, so a corpus that
  yields fewer than `num_examples` writes what it has, with a warning, rather than throwing
  the teacher's work away. Without a cap kept sentences are written as they arrive (the
  set is deterministic, the order across shards is not).
- Output: `part-NNNNN.parquet` with `text_a, label, prob, probs, doc_id, sent` (`sent` = the
  sentence's position in its document, see `rayapp.data.corpus`), then `_meta.json` (written
  last: it marks a finished run) with counts per label and kept / scored.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayapp import storage
from rayapp.data.corpus import read_sentences
from rayapp.errors import ConfigError, DataError
from rayapp.data.pairs import META, check_out_dir, count_pairs
from rayapp.modeling.models import portable_model
from rayapp.data.teacher_cache import TeacherScorer, scorer_pool, write_table
from rayapp.tasks.registry import INTERMEDIATE_TASKS

log = logging.getLogger(__name__)

TASK = INTERMEDIATE_TASKS["smash-sentiment"]
COLUMNS = ["text_a", "label", "prob", "probs", "doc_id", "sent"]


def _explode(batch: pa.Table) -> pa.Table:
    """`read_sentences` rows (one per document) -> one row per usable sentence."""
    sentences = batch["sentences"].combine_chunks()
    return pa.table({
        "text_a": pc.list_flatten(sentences),
        "doc_id": pc.take(batch["doc_id"], pc.list_parent_indices(sentences)),
        "sent": pc.list_flatten(batch["positions"].combine_chunks()),
    })


def sentence_key(seed: int, doc_id: str, sent: int) -> int:
    """The seeded 64-bit sampling key of one sentence; blake2b, unlike `hash()`, is the same
    in every process."""
    digest = hashlib.blake2b(f"{seed}/{doc_id}/{sent}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def label_confident(batch: pa.Table, threshold: float, seed: int) -> pa.Table:
    """Add `label` (argmax of `probs`), `prob` (its probability) and the seeded sampling
    `key`; keep the rows with prob >= threshold."""
    classes = batch.schema.field("probs").type.list_size
    probs = np.asarray(batch["probs"].combine_chunks().flatten()).reshape(batch.num_rows, classes)
    prob = probs.max(-1)
    keep = prob >= threshold
    kept = batch.filter(pa.array(keep))
    keys = [sentence_key(seed, doc, sent)
            for doc, sent in zip(kept["doc_id"].to_pylist(), kept["sent"].to_pylist())]
    return (kept.append_column("label", pa.array(probs.argmax(-1)[keep], pa.int64()))
            .append_column("prob", pa.array(prob[keep], pa.float32()))
            .append_column("key", pa.array(keys, pa.uint64())))


class BottomN:
    """The n rows with the smallest `key` of all rows added; holds at most ~2n rows."""

    def __init__(self, n: int):
        self.n, self.tables, self.rows = n, [], 0

    def add(self, table: pa.Table) -> None:
        self.tables.append(table)
        self.rows += table.num_rows
        if self.rows >= 2 * self.n:
            self._trim()

    def _trim(self) -> None:
        table = pa.concat_tables(self.tables).sort_by("key").slice(0, self.n)
        self.tables, self.rows = [table], table.num_rows

    def result(self) -> pa.Table:
        self._trim()
        return self.tables[0]


class ShardWriter:
    """Writes the rows added, in order, as `part-NNNNN.parquet` files of `rows` rows."""

    def __init__(self, out: str, rows: int):
        self.out, self.rows = out, rows
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.files: list[str] = []
        self.counts = np.zeros(len(TASK.labels), dtype=np.int64)

    def add(self, table: pa.Table) -> None:
        self.buffer.append(table.select(COLUMNS))
        self.buffered += table.num_rows
        while self.buffered >= self.rows:
            self._flush(self.rows)

    def close(self) -> None:
        if self.buffered:
            self._flush(self.buffered)

    def _flush(self, n: int) -> None:
        table = pa.concat_tables(self.buffer)
        shard, rest = table.slice(0, n), table.slice(n)
        name = f"part-{len(self.files):05d}.parquet"
        write_table(storage.join(self.out, name), shard)
        self.files.append(name)
        self.counts += np.bincount(shard["label"].to_numpy(), minlength=len(self.counts))
        self.buffer, self.buffered = [rest], rest.num_rows


def build_sentiment(
    corpus: str,
    teacher: str,
    out: str,
    *,
    num_examples: int | None = None,
    threshold: float = 0.5,
    seed: int = 0,
    max_length: int = 64,
    fmt: str = "auto",
    text_column: str = "text",
    id_column: str | None = None,
    min_words: int = 4,
    max_words: int = 40,
    batch_size: int = 64,
    num_actors: int | None = None,
    use_gpu: bool | None = None,
    rows_per_shard: int = 100_000,
) -> dict[str, Any]:
    """Score `corpus` sentences with `teacher` and write the confident ones to `out` (local
    or s3://); returns the stats also saved in `out/_meta.json` (see module docstring).

    `max_words` defaults to 40 so a sentence plus ` It was <mask>.` fits SMASH's 64 tokens;
    `fmt`, `text_column`, `id_column`, `min_words` go to `rayapp.data.corpus.read_sentences`.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"threshold={threshold} must be a probability in [0, 1] (0 keeps every sentence)")
    if num_examples is not None and num_examples < 1:
        raise ConfigError(f"num_examples must be at least 1 (or None for no cap), got {num_examples}")
    if rows_per_shard < 1:
        raise ConfigError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    check_out_dir(out)
    sentences = read_sentences(corpus, fmt=fmt, text_column=text_column, id_column=id_column,
                               min_words=min_words, max_words=max_words)
    counts = count_pairs(sentences)
    if counts.sentences == 0:
        raise DataError(
            f"corpus {corpus} has no usable sentence to score ({counts.documents} documents; dropped "
            f"{counts.fragments} fragments, {counts.long} longer than max_words={max_words}, "
            f"{counts.undecodable} undecodable); check the corpus format or lower min_words / raise max_words")

    start = time.perf_counter()
    confident = sentences.map_batches(_explode, batch_format="pyarrow").map_batches(
        TeacherScorer,
        fn_constructor_kwargs={"teacher": portable_model(teacher), "task": TASK, "max_length": max_length,
                               "label_probs": True},
        batch_size=batch_size, batch_format="pyarrow", udf_modifying_row_count=False,
        **scorer_pool(num_actors, use_gpu),
    ).map_batches(label_confident, batch_format="pyarrow", fn_kwargs={"threshold": threshold, "seed": seed})

    writer = ShardWriter(out, rows_per_shard)
    sample = BottomN(num_examples) if num_examples else None
    target = writer if sample is None else sample
    kept = 0
    for batch in confident.iter_batches(batch_size=None, batch_format="pyarrow"):
        kept += batch.num_rows
        target.add(batch)
    if kept == 0:
        raise DataError(f"none of the {counts.sentences} sentences of {corpus} reached threshold={threshold} "
                        f"(top class probability under teacher {teacher}); lower the threshold")
    if sample is not None:
        if kept < num_examples:
            log.warning("only %d of %d sentences passed threshold %s; writing all %d", kept,
                        counts.sentences, threshold, kept)
        writer.add(sample.result())
    writer.close()
    seconds = time.perf_counter() - start

    stats = {
        "task": TASK.name, "template": TASK.template, "verbalizer": TASK.verbalizer,
        "teacher": teacher, "corpus": corpus, "threshold": threshold, "seed": seed,
        "num_examples": num_examples, "examples": int(writer.counts.sum()),
        "scored": counts.sentences, "kept": kept, "keep_rate": kept / counts.sentences,
        "counts": {label: int(n) for label, n in zip(TASK.labels, writer.counts)},
        "files": writer.files,
        "corpus_counts": {k: getattr(counts, k)
                          for k in ("documents", "sentences", "fragments", "long", "undecodable")},
        "settings": {"fmt": fmt, "text_column": text_column, "id_column": id_column, "min_words": min_words,
                     "max_words": max_words, "max_length": max_length, "rows_per_shard": rows_per_shard},
        "seconds": seconds, "sentences_per_s": counts.sentences / seconds,
    }
    storage.write_text(storage.join(out, META), json.dumps(stats, indent=2))
    return stats
