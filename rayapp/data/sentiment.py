"""SMASH sentiment intermediate task: corpus sentences the teacher labels confidently.

SMASH §3.2: the teacher scores every corpus sentence x with `x It was <mask>.` over the
verbalizer [terrible, bad, okay, good, great]; sentences whose top class probability
(softmax over those five label words) is below a threshold are dropped, and the student
is then distilled on the rest with the same template (`rayapp teacher-cache
task=smash-sentiment`). The 5-class argmax is kept as a hard label for SMASH's hard-label
baseline (§4.4, setting 7).

Pipeline (two Ray Data jobs; nothing but counts reaches the driver):

    corpus ─► sentences ─► OUT/_sentences/  ─► autoscaling actor pool, one table shard per call:
    (rayapp.data.corpus)   sentence table      read ─► teacher ─► label + threshold ─► write
                           (Ray tasks)         OUT/part-NNNNN.parquet (shard NNNNN of the table)

1. Sentence table: the corpus is read and split once, by Ray tasks, into shards of at most
   `rows_per_shard` sentences (`text_a, doc_id, sent`), each named by a digest of its
   content; its `_meta.json` lists them (in name order, with their rows and checksums) and
   holds the corpus counts, so an empty corpus fails before any teacher loads (an empty
   or unreadable one before Ray starts). Corpus lines that do not parse stop the build,
   naming the line, or with `on_bad_lines=skip` are skipped and counted
   (`corpus_counts.bad_lines`). The table is the stage's record of what each output shard
   was scored from: it is kept, and rebuilt only if the reading settings change before any
   output shard exists. A reused table is checked shard by shard (`shards.shard_uris`),
   and the scorer checks each shard's sha256 as it reads it whole.
2. Scoring: output shard `part-NNNNN.parquet` holds the confident sentences of table shard
   NNNNN, written whole by the actor that scored it, with the shard's scored / kept counts
   in its parquet metadata. The names depend only on the table, so a re-run into the same
   folder with the same settings skips the shards that exist (a crash after hours of GPU
   scoring loses at most the shards in flight); other settings are refused.
3. Cap: every sentence has a seeded key, blake2b(seed, doc_id, position). With
   `num_examples` the output is the kept sentences with the smallest keys, a uniform seeded
   sample that does not depend on how Ray scheduled the work: the driver gathers the keys
   (8 bytes a sentence) and Ray tasks rewrite the shards holding larger ones. Keeping the n
   smallest keys of what is left is idempotent, so a crash during the cap resumes too. A
   corpus that yields fewer than `num_examples` writes what it has, with a warning, rather
   than throwing the teacher's work away.
4. `_meta.json` last: threshold, scored / kept and the kept fraction, counts per label.

- Threshold in [0, 1]: 0 keeps every sentence. If no sentence reaches it, DataError and no
  `_meta.json` (the empty shards are removed, so the same folder takes a lower threshold).
- Output columns `text_a, label, prob, probs, doc_id, sent, key` (`sent` = the sentence's
  position in its document, see `rayapp.data.corpus`; `key` the sampling key). Rows are in
  document order within a shard; the distill stream shuffles.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayapp import env, storage
from rayapp.data import shards
from rayapp.data.corpus import plan_sources, read_sentences
from rayapp.data.formats import warn_skipped
from rayapp.config import InputPath, ModelRef, OutputPath, require_counts
from rayapp.errors import ConfigError, DataError
from rayapp.modeling.models import check_model, load_tokenizer, local_model_dir, portable_model
from rayapp.modeling.scorer import TeacherScorer, actor_device, default_batch_size, pool_args
from rayapp.tasks.prompts import PromptEncoder
from rayapp.tasks.registry import INTERMEDIATE_TASKS

log = logging.getLogger(__name__)

STAGE = "sentiment"
TASK = INTERMEDIATE_TASKS["smash-sentiment"]
COLUMNS = ["text_a", "label", "prob", "probs", "doc_id", "sent", "key"]
TABLE = "_sentences"  # sub-folder of the output: the sentence table
_COUNTS = ("documents", "sentences", "fragments", "long", "undecodable", "bad_lines")


@dataclass
class SentimentConfig:
    """`rayapp intermediate sentiment --config FILE key=value ...`"""

    corpus: InputPath  # text / WikiExtractor / JSONL / parquet files, s3:// prefix or hf://
    teacher: ModelRef  # teacher MLM that scores the sentences
    out: OutputPath  # output folder, local or s3://
    num_examples: int | None = None  # cap on the sentences kept; None: every confident one
    threshold: float = 0.5  # keep sentences whose top class probability is >= this
    seed: int = 0
    max_length: int = 64  # SMASH App. A.1
    fmt: str = "auto"  # the corpus reader's settings (rayapp.data.corpus)
    text_column: str = "text"
    id_column: str | None = None
    min_words: int = 4
    max_words: int = 40  # a sentence plus ` It was <mask>.` fits SMASH's 64 tokens
    batch_size: int | None = None  # sentences per forward pass; None: sized for the device
    num_actors: int | None = None  # most scoring actors; None: as many as the cluster gives
    use_gpu: bool = False  # one GPU per actor
    cpus_per_actor: int = 1
    rows_per_shard: int = 10_000  # sentences per table shard: the unit of scoring and resume
    on_bad_lines: Literal["error", "skip"] = "error"  # a JSONL line that does not parse (rayapp.data.corpus)

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold={self.threshold} must be a probability in [0, 1] (0 keeps every sentence)")
        if self.num_examples is not None and self.num_examples < 1:
            raise ConfigError(f"num_examples must be at least 1 (or None for no cap), got {self.num_examples}")
        require_counts(self, "rows_per_shard", "cpus_per_actor", "batch_size", "num_actors")


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


# --- 1. the sentence table ------------------------------------------------------------------

def _explode(batch: pa.Table) -> pa.Table:
    """`read_sentences` rows (one per document) -> one row per usable sentence."""
    sentences = batch["sentences"].combine_chunks()
    return pa.table({
        "text_a": pc.list_flatten(sentences),
        "doc_id": pc.take(batch["doc_id"], pc.list_parent_indices(sentences)),
        "sent": pc.list_flatten(batch["positions"].combine_chunks()),
    })


def _write_sentences(batch: pa.Table, table: str, rows_per_shard: int) -> pa.Table:
    """Ray Data fn: a block of documents -> table shards named by their content; returns
    one row with the names, their `_meta.json` entries and the block's corpus counts."""
    sentences, names, entries = _explode(batch), [], []
    for start in range(0, sentences.num_rows, rows_per_shard):
        part = sentences.slice(start, rows_per_shard)
        ends = [f"{part['doc_id'][i]}/{part['sent'][i]}" for i in (0, part.num_rows - 1)]
        digest = hashlib.blake2b("|".join([*ends, str(part.num_rows)]).encode("utf-8"), digest_size=8).hexdigest()
        names.append(f"s-{digest}.parquet")
        entries.append(shards.write_table(storage.join(table, names[-1]), part))
    counts = {c: [int(pc.sum(batch[c]).as_py() or 0)] for c in ("fragments", "long", "undecodable", "bad_line")}
    bad = counts.pop("bad_line")
    return pa.table({"names": [names], "entries": [entries], "documents": [batch.num_rows - bad[0]],
                     "sentences": [sentences.num_rows], "bad_lines": bad, **counts})


def sentence_table(cfg: SentimentConfig, settings: dict, scored: set[str]) -> dict:
    """Build (or reuse, if built with the same `settings`) the sentence table; its meta.
    `scored`: the output shards that exist, which name shards of the table."""
    table = storage.join(cfg.out, TABLE)
    meta = shards.read_meta(table)
    if meta is not None and meta["settings"] == settings:
        shards.shard_uris(table)  # every shard there, whole, before any teacher loads
        return meta
    if scored:
        raise DataError(f"{cfg.out} holds scored shards but its sentence table {table} is gone, so "
                        "they cannot be matched to their sentences; write to a new folder")
    if storage.exists(table):  # another try's or other settings' shards must not be listed
        shards.remove(table, [f.rsplit("/", 1)[-1] for f in storage.list_files(table)])
    sentences = read_sentences(cfg.corpus, fmt=cfg.fmt, text_column=cfg.text_column, id_column=cfg.id_column,
                               min_words=cfg.min_words, max_words=cfg.max_words, on_bad_lines=cfg.on_bad_lines)
    blocks = sentences.map_batches(_write_sentences, batch_format="pyarrow",
                                   fn_kwargs={"table": table, "rows_per_shard": cfg.rows_per_shard}).take_all()
    written = {name: entry for b in blocks for name, entry in zip(b["names"], b["entries"])}
    meta = {"stage": "sentence-table", "settings": settings, "files": sorted(written),
            "counts": {c: sum(int(b[c]) for b in blocks) for c in _COUNTS}}
    warn_skipped(cfg.corpus, meta["counts"]["bad_lines"])
    return shards.write_meta(table, meta, written)


# --- 2. scoring -----------------------------------------------------------------------------

class SentimentWriter:
    """Ray Data actor: scores whole table shards and writes each one's confident sentences.

    Input rows: `{"name": output shard, "source": table shard URI, "entry": its
    `_meta.json` entry}`; output one row per shard: `name`, `scored`, `kept`, `entry` (the
    written shard's)."""

    def __init__(self, teacher: str, max_length: int, batch_size: int, threshold: float, seed: int, out: str):
        self.scorer = TeacherScorer(teacher, TASK, max_length, actor_device())
        self.batch_size, self.threshold, self.seed, self.out = batch_size, threshold, seed, out

    def __call__(self, batch: pa.Table) -> pa.Table:
        done = {"name": [], "scored": [], "kept": [], "entry": []}
        for unit in batch.to_pylist():
            sentences = shards.read_whole(unit["source"], unit["entry"])  # read whole anyway: sha256 too
            scored = sentences.append_column("probs", self.scorer.label_probs(sentences, self.batch_size))
            kept = label_confident(scored, self.threshold, self.seed).select(COLUMNS)
            kept = kept.replace_schema_metadata({"scored": str(sentences.num_rows), "kept": str(kept.num_rows)})
            done["entry"].append(shards.write_table(storage.join(self.out, unit["name"]), kept))
            done["name"].append(unit["name"])
            done["scored"].append(sentences.num_rows)
            done["kept"].append(kept.num_rows)
        return pa.table(done)


# --- 3. cap -----------------------------------------------------------------------------------

def _column(uri: str, name: str) -> np.ndarray:
    with shards.open_shard(uri) as f:
        return f.read(columns=[name])[name].to_numpy()


def _cap_shards(batch: pa.Table, out: str, limit: int) -> pa.Table:
    """Ray Data fn: rewrite shards keeping the rows with key <= limit (schema metadata,
    i.e. the shard's scored / kept counts, rides along); returns their new entries."""
    entries = []
    for name in batch["name"].to_pylist():
        uri = storage.join(out, name)
        with shards.open_shard(uri) as f:
            table = f.read()
        kept = table.filter(pc.less_equal(table["key"], pa.scalar(limit, pa.uint64())))
        entries.append(shards.write_table(uri, kept))
    return pa.table({"name": batch["name"], "entry": entries})


def _cap(out: str, names: list[str], num_examples: int) -> dict[str, dict]:
    """Keep the `num_examples` smallest keys over all shards (module docstring, step 3);
    returns the `_meta.json` entries of the shards it rewrote."""
    import ray

    keys = {name: _column(storage.join(out, name), "key") for name in names}
    every = np.concatenate(list(keys.values()))
    if len(every) <= num_examples:
        return {}
    limit = int(np.partition(every, num_examples - 1)[num_examples - 1])
    over = [n for n, k in keys.items() if len(k) and k.max() > limit]
    rewritten = ray.data.from_items([{"name": n} for n in over], override_num_blocks=len(over)).map_batches(
        _cap_shards, fn_kwargs={"out": out, "limit": limit}, batch_format="pyarrow").take_all()
    return {r["name"]: r["entry"] for r in rewritten}


# --- the stage --------------------------------------------------------------------------------

def run(cfg: SentimentConfig) -> dict[str, Any]:
    """Score `cfg.corpus` sentences with `cfg.teacher` and write the confident ones to
    `cfg.out` (local or s3://); returns the stats also saved in `_meta.json` (module doc)."""
    import ray

    check_model(cfg.teacher)  # a path that is not a model: one line, before Ray starts
    PromptEncoder(load_tokenizer(local_model_dir(cfg.teacher)), TASK, cfg.max_length)  # fail before any work
    settings = {"corpus": cfg.corpus, "fmt": cfg.fmt, "text_column": cfg.text_column, "id_column": cfg.id_column,
                "min_words": cfg.min_words, "max_words": cfg.max_words, "rows_per_shard": cfg.rows_per_shard}
    plan = {"stage": STAGE, "teacher": cfg.teacher, "template": TASK.template, "verbalizer": TASK.verbalizer,
            "threshold": cfg.threshold, "seed": cfg.seed, "num_examples": cfg.num_examples,
            "max_length": cfg.max_length, **settings}
    done = shards.begin(cfg.out, plan, "sentiment build")
    # Ray tasks and actors on any node read the corpus and teacher and write the shards
    storage.require_shared({"corpus": cfg.corpus, "teacher": cfg.teacher, "out": cfg.out})
    # a missing, empty or unreadable corpus fails here, before Ray starts (the sentence table's
    # Ray Data job plans the corpus again: a listing and a first-line sniff)
    plan_sources(cfg.corpus, fmt=cfg.fmt, text_column=cfg.text_column, id_column=cfg.id_column)
    env.start_ray()
    start = time.perf_counter()
    table = sentence_table(cfg, settings, done)
    counts = table["counts"]
    if counts["sentences"] == 0:
        raise DataError(
            f"corpus {cfg.corpus} has no usable sentence to score ({counts['documents']} documents; dropped "
            f"{counts['fragments']} fragments, {counts['long']} longer than max_words={cfg.max_words}, "
            f"{counts['undecodable']} undecodable, {counts.get('bad_lines', 0)} lines skipped as unparseable); "
            "check the corpus format or lower min_words / raise max_words")

    names = [shards.shard_name(i) for i in range(len(table["files"]))]
    entries = table.get("shards", {})  # none in a table from before the entries (rayapp.data.shards)
    todo = [{"name": n, "source": storage.join(cfg.out, TABLE, f), "entry": entries.get(f)}
            for n, f in zip(names, table["files"]) if n not in done]
    log.info("sentiment %s: %d shards to score, %d already written", cfg.out, len(todo), len(names) - len(todo))
    written = []
    if todo:
        written = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            SentimentWriter,
            fn_constructor_kwargs={"teacher": portable_model(cfg.teacher), "max_length": cfg.max_length,
                                   "batch_size": cfg.batch_size or default_batch_size(cfg.use_gpu),
                                   "threshold": cfg.threshold, "seed": cfg.seed, "out": cfg.out},
            **pool_args(cfg.num_actors, cfg.use_gpu, cfg.cpus_per_actor),
        ).take_all()
    scoring_seconds = time.perf_counter() - start

    uris = [storage.join(cfg.out, n) for n in names]
    written_entries = {r["name"]: r["entry"] for r in written}
    kept = 0
    for uri in uris:  # a shard an earlier run wrote is read here first: a damaged one fails by name
        with shards.open_shard(uri) as f:
            kept += int(f.schema_arrow.metadata[b"kept"])
    if kept == 0:
        shards.remove(cfg.out, names)
        raise DataError(f"none of the {counts['sentences']} sentences of {cfg.corpus} reached threshold="
                        f"{cfg.threshold} (top class probability under teacher {cfg.teacher}); lower the threshold")
    if cfg.num_examples:
        if kept < cfg.num_examples:
            log.warning("only %d of %d sentences passed threshold %s; writing all %d", kept,
                        counts["sentences"], cfg.threshold, kept)
        written_entries.update(_cap(cfg.out, names, cfg.num_examples))
    labels = np.concatenate([_column(uri, "label") for uri in uris])
    by_label = np.bincount(labels, minlength=len(TASK.labels))
    stats = {
        "stage": STAGE, "task": TASK.name, "template": TASK.template, "verbalizer": TASK.verbalizer,
        "teacher": cfg.teacher, "corpus": cfg.corpus, "threshold": cfg.threshold, "seed": cfg.seed,
        "num_examples": cfg.num_examples, "examples": int(by_label.sum()),
        "scored": counts["sentences"], "kept": kept, "kept_fraction": kept / counts["sentences"],
        "counts": {label: int(n) for label, n in zip(TASK.labels, by_label)},
        "files": names, "corpus_counts": counts, "settings": settings,
        "shards_written": len(todo), "shards_skipped": len(names) - len(todo),
        "scored_this_run": sum(r["scored"] for r in written), "seconds": scoring_seconds,
    }
    shards.write_meta(cfg.out, stats, written_entries)
    return stats


def build_sentiment(corpus: str, teacher: str, out: str, **settings) -> dict[str, Any]:
    """`run(SentimentConfig(corpus, teacher, out, **settings))`, for Python callers."""
    return run(SentimentConfig(corpus=corpus, teacher=teacher, out=out, **settings))
