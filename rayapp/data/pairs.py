"""SMASH intermediate tasks (SMASH §3.2), built from an unlabelled corpus with Ray Data.

Sentence pairs (`build_pairs`)
==============================
Labels (SMASH §3.2, after Gu et al. 2021): 0 = x1 and x2 come from different documents,
1 = same document, not adjacent, 2 = adjacent (x2 directly follows x1 in the document).
The template is `x1 ? <mask> , x2` (max 128 tokens); examples keep raw sentences and the
encoder truncates. Output: `OUT/part-NNNNN.parquet` with columns `text_a, text_b, label,
doc_a, doc_b, sent_a, sent_b` (sent_* = the sentence's position among all sentences of its
document, see `rayapp.data.corpus`), so every label can be checked against the source, and
`OUT/_meta.json` with the provenance and counts (written last: it marks a finished run).

Candidates. From a document with kept sentences at positions p_0 < ... < p_{k-1}:
- label 2: the pairs (i, i+1) with p_{i+1} = p_i + 1 (a dropped sentence in between breaks
  adjacency, so the source really has x1 immediately followed by x2);
- label 1: every other ordered pair of distinct kept sentences, minus the reversed
  adjacent ones (x2 right before x1 is adjacent too, just not label 2), so
  k(k-1) - 2*adjacent pairs: |sent_b - sent_a| > 1 for all of them;
- label 0: x1 any kept sentence, x2 a kept sentence of another document.
A one-sentence document gives only label 0. Exactly N rows come out, N//3 per label plus
one for labels 0.. N%3-1; if the corpus has fewer candidates, the DataError says how many
balanced pairs it can give.

Sampling, streaming, determinism. Nothing holds the corpus: the corpus is streamed twice
and every later step works on O(N) rows.
1. Count pass: per-document counts summed by a Ray aggregate give each label's number
   of candidates C_l (and the skip counts). Memory: a few integers.
2. Candidate pass: every candidate is kept independently with probability
   r_l = (N_l + 6 sqrt(N_l) + 10) / C_l and gets a uniform key in [0, r_l): per document
   that is a Binomial count, then that many distinct candidates decoded from an index
   space without enumerating the k^2 pairs. The random stream is keyed on (seed,
   doc_id), so what a document contributes does not depend on how Ray batched or
   scheduled it. Label 0 needs a partner from elsewhere: each of the S kept sentences is
   an "endpoint" with probability r_0 = (N_0 + 6 sqrt(N_0) + 10) / S, with a first-key,
   a second-key and a random group; a shuffle (`groupby(group)`, ~50k candidates a
   group, label-1/2 rows ride along) brings each group together, and `_match_group`
   pairs its endpoints as a random bijection (firsts by first-key, seconds by
   second-key, skipping a partner from the same document), so each sampled sentence is
   x1 of one label-0 pair and x2 of another. These O(N) candidates are materialised
   (Ray spills them to disk if the object store is small).
3. Selection: the driver collects each label's keys (8 bytes per candidate) and keeps the
   N_l smallest: exactly N_l, a uniform sample of the candidates. The 6-sigma margin makes
   a shortfall astronomically unlikely; if it happens anyway, step 2 re-runs with r = 1
   for that label, which is deterministic too. (Only label 0 can fall short at r = 1,
   when matching leaves endpoints unpaired: that is a DataError with the pairs it got.)
4. Shards: a selected row goes to shard floor(key / t_l * shards) (t_l = the label's
   largest kept key, so the labels spread evenly over shards), a second shuffle gathers
   each shard, and its task writes it sorted by that normalised key, which
   interleaves the labels at random. Shard contents and file names depend only on (corpus,
   N, seed, settings), not on the cluster: the same seed rewrites byte-identical files,
   and the shards read in name order are one sequence whatever `rows_per_shard` is.

Sentiment
=========
The sentiment intermediate task (teacher-filtered single sentences, `x It was <mask> .`)
goes in the section at the end of this module.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data.context import ShuffleStrategy

from rayapp import storage
from rayapp.data.corpus import read_sentences
from rayapp.errors import DataError

log = logging.getLogger(__name__)

META = "_meta.json"


def doc_rng(seed: int, doc_id: str) -> np.random.Generator:
    """A random stream that depends only on (seed, document), never on which Ray task or
    batch sees the document; `hash()` is salted per process, blake2b is not."""
    digest = int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little")
    return np.random.default_rng([seed, digest])


# --- sentence pairs ------------------------------------------------------------------------

PAIR_TASK = "smash-pairs"
PAIR_TEMPLATE = "x1 ? <mask> , x2"
PAIR_LABELS = {0: "different documents", 1: "same document, not adjacent",
               2: "adjacent: x2 directly follows x1"}
PAIRS_SCHEMA = pa.schema([
    ("text_a", pa.string()), ("text_b", pa.string()), ("label", pa.int64()),
    ("doc_a", pa.string()), ("doc_b", pa.string()), ("sent_a", pa.int64()), ("sent_b", pa.int64()),
])
# Candidates carry a sampling key; label-0 endpoints (label -1, the sentence in *_a, *_b
# empty) also a second key and a matching group.
_ENDPOINT = -1
_CANDIDATES_SCHEMA = PAIRS_SCHEMA.append(pa.field("key", pa.float64())) \
    .append(pa.field("key2", pa.float64())).append(pa.field("group", pa.int64()))
_GROUP_ROWS = 50_000  # candidates per shuffle group (one map_groups call): one task's worth
_COUNT_COLUMNS = ("documents", "empty", "single", "sentences", "square", "adjacent",
                  "nonadjacent", "fragments", "long", "undecodable")


def label_counts(num_examples: int) -> list[int]:
    """Rows per label for `num_examples`: N//3 each, one more for labels below N%3."""
    return [num_examples // 3 + (label < num_examples % 3) for label in range(3)]


def max_balanced(capacity: list[int]) -> int:
    """Largest N with label_counts(N)[l] <= capacity[l] for every label l."""
    # label_counts(N)[l] = ceil((N - l) / 3) <= c  <=>  N <= 3c + l
    return min(3 * c + label for label, c in enumerate(capacity))


@dataclass(frozen=True)
class PairCounts:
    """Corpus totals from the count pass (sentences = kept sentences)."""

    documents: int
    empty: int  # documents without a kept sentence
    single: int  # one kept sentence: label 0 only
    sentences: int
    square: int  # sum over documents of k^2
    adjacent: int
    nonadjacent: int
    fragments: int
    long: int
    undecodable: int

    @property
    def capacity(self) -> list[int]:
        """Candidates per label: cross-document ordered pairs, then labels 1 and 2."""
        return [self.sentences ** 2 - self.square, self.nonadjacent, self.adjacent]


def _count_batch(batch: pa.Table) -> pa.Table:
    positions = batch.column("positions").to_pylist()
    k = np.array([len(p) for p in positions], dtype=np.int64)
    adjacent = np.array([int(np.sum(np.diff(p) == 1)) for p in positions], dtype=np.int64)
    return pa.table({
        "documents": np.ones_like(k), "empty": (k == 0).astype(np.int64),
        "single": (k == 1).astype(np.int64), "sentences": k, "square": k * k,
        "adjacent": adjacent, "nonadjacent": k * (k - 1) - 2 * adjacent,
        "fragments": batch.column("fragments"), "long": batch.column("long"),
        "undecodable": batch.column("undecodable"),
    })


def count_pairs(sentences: ray.data.Dataset) -> PairCounts:
    """One streaming pass over `rayapp.data.corpus.read_sentences` rows: corpus totals."""
    sums = sentences.map_batches(_count_batch, batch_format="pyarrow").sum(list(_COUNT_COLUMNS))
    return PairCounts(**{c: int(sums[f"sum({c})"] or 0) for c in _COUNT_COLUMNS})


def _sample(rng: np.random.Generator, population: int, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices and keys of the candidates whose uniform key falls below `rate`.

    Same distribution as drawing a key per candidate, at O(kept) cost: the number kept is
    Binomial(population, rate), the kept set is uniform, and their keys are uniform in
    [0, rate)."""
    count = rng.binomial(population, rate)
    return rng.choice(population, count, replace=False), rate * rng.random(count)


def _decode_nonadjacent(index: np.ndarray, k: int, gapped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map indices in [0, 2M) to the ordered label-1 pairs (i, j) of kept sentences.

    Unordered pairs u < M are first the `gapped` neighbours (i, i+1), a dropped sentence
    between them, then the (k-1)(k-2)/2 pairs i < j - 1 in row-major order; bit 0 of the
    index picks the orientation."""
    u, flip = index // 2, index % 2 == 1
    near = u < len(gapped)
    i = np.empty_like(u)
    i[near] = gapped[u[near]]
    far = u[~near] - len(gapped)
    row_sizes = np.arange(k - 2, 0, -1)  # partners j >= i + 2 of each i = 0 .. k-3
    starts = np.concatenate([[0], np.cumsum(row_sizes)])
    i[~near] = np.searchsorted(starts, far, side="right") - 1
    j = i + 1
    j[~near] = i[~near] + 2 + far - starts[i[~near]]
    return np.where(flip, j, i), np.where(flip, i, j)


def _append(cols: dict[str, list], label: int, doc_id: str, sentences: list[str], pos: np.ndarray,
            a: np.ndarray, b: np.ndarray | None, key: np.ndarray, group: np.ndarray,
            key2: np.ndarray | None = None) -> None:
    """Append candidate rows (kept-sentence indices a, b of one document) to column lists;
    `b` is None for label-0 endpoints."""
    n = len(a)
    cols["label"] += [label] * n
    cols["text_a"] += [sentences[i] for i in a]
    cols["doc_a"] += [doc_id] * n
    cols["sent_a"] += pos[a].tolist()
    cols["text_b"] += [""] * n if b is None else [sentences[j] for j in b]
    cols["doc_b"] += [""] * n if b is None else [doc_id] * n
    cols["sent_b"] += [-1] * n if b is None else pos[b].tolist()
    cols["key"] += key.tolist()
    cols["key2"] += [0.0] * n if key2 is None else key2.tolist()
    cols["group"] += group.tolist()


def _add_doc_candidates(cols: dict[str, list], doc_id: str, sentences: list[str], positions: list[int],
                        seed: int, rates: list[float], groups: int) -> None:
    """One document's sampled label-2 and label-1 pairs and its label-0 endpoints."""
    rng = doc_rng(seed, doc_id)
    k, pos = len(sentences), np.asarray(positions, dtype=np.int64)
    step = np.diff(pos)
    adjacent, gapped = np.flatnonzero(step == 1), np.flatnonzero(step > 1)
    pick, key = _sample(rng, len(adjacent), rates[2])
    _append(cols, 2, doc_id, sentences, pos, adjacent[pick], adjacent[pick] + 1, key,
            rng.integers(groups, size=len(pick)))
    far = max(k - 1, 0) * max(k - 2, 0) // 2
    pick, key = _sample(rng, 2 * (len(gapped) + far), rates[1])
    _append(cols, 1, doc_id, sentences, pos, *_decode_nonadjacent(pick, k, gapped), key,
            rng.integers(groups, size=len(pick)))
    u = rng.random(k)
    ends = np.flatnonzero(u < rates[0])
    _append(cols, _ENDPOINT, doc_id, sentences, pos, ends, None, u[ends],
            rng.integers(groups, size=len(ends)), key2=rng.random(len(ends)))


def _candidates_batch(batch: pa.Table, seed: int, rates: list[float], groups: int) -> pa.Table:
    cols: dict[str, list] = {name: [] for name in _CANDIDATES_SCHEMA.names}
    for doc_id, sentences, positions in zip(batch.column("doc_id").to_pylist(),
                                            batch.column("sentences").to_pylist(),
                                            batch.column("positions").to_pylist()):
        _add_doc_candidates(cols, doc_id, sentences, positions, seed, rates, groups)
    return pa.table(cols, schema=_CANDIDATES_SCHEMA)


def _match_group(batch: pa.Table) -> pa.Table:
    """One group's label-1/2 candidates, plus label-0 pairs from its endpoints: a random
    bijection firsts -> seconds.

    Firsts in first-key order each take the earliest waiting second (second-key order)
    from another document; a same-document second is moved to the back of the queue, so
    only a group dominated by one document leaves endpoints unmatched."""
    is_endpoint = pc.equal(batch.column("label"), _ENDPOINT)
    endpoints = batch.filter(is_endpoint).to_pylist()
    firsts = sorted(endpoints, key=lambda r: (r["key"], r["doc_a"], r["sent_a"]))
    waiting = deque(sorted(endpoints, key=lambda r: (r["key2"], r["doc_a"], r["sent_a"])))
    pairs = []
    for first in firsts:
        for _ in range(len(waiting)):
            second = waiting.popleft()
            if second["doc_a"] != first["doc_a"]:
                pairs.append({**first, "label": 0, "text_b": second["text_a"], "doc_b": second["doc_a"],
                              "sent_b": second["sent_a"]})
                break
            waiting.append(second)
    return pa.concat_tables([batch.filter(pc.invert(is_endpoint)),
                             pa.Table.from_pylist(pairs, schema=_CANDIDATES_SCHEMA)])


def _candidate_pool(sentences: ray.data.Dataset, seed: int, rates: list[float],
                    groups: int) -> ray.data.Dataset:
    """Sampled candidates of all three labels (corpus pass 2 + label-0 matching), materialised.

    Label-1/2 candidates take the same shuffle as the endpoints (to a random group) so one
    Ray Data job builds the whole pool."""
    return (sentences.map_batches(_candidates_batch, batch_format="pyarrow", fn_kwargs={
                "seed": seed, "rates": rates, "groups": groups})
            .groupby("group", num_partitions=groups)
            .map_groups(_match_group, batch_format="pyarrow")
            .materialize())


def _pool_keys(pool: ray.data.Dataset) -> list[np.ndarray]:
    """Each label's candidate keys, on the driver: 8 bytes per candidate, O(N)."""
    keys: list[list[np.ndarray]] = [[], [], []]
    for batch in pool.select_columns(["label", "key"]).iter_batches(batch_format="numpy"):
        for label in range(3):
            keys[label].append(batch["key"][batch["label"] == label])
    return [np.concatenate(k) if k else np.zeros(0) for k in keys]


def _select_batch(batch: pa.Table, thresholds: list[float], shards: int) -> pa.Table:
    """Keep candidates with key <= their label's threshold; add the normalised key and shard."""
    label = batch.column("label").to_numpy()
    key = batch.column("key").to_numpy()
    limit = np.asarray(thresholds)[label]
    keep = key <= limit
    rank = key[keep] / limit[keep]
    return batch.filter(pa.array(keep)).select(PAIRS_SCHEMA.names).append_column(
        "rank", pa.array(rank)).append_column(
        "shard", pa.array(np.minimum((rank * shards).astype(np.int64), shards - 1)))


def shard_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def _write_shard(batch: pa.Table, fs: pafs.FileSystem, root: str) -> pa.Table:
    """Write one shard, sorted by normalised key (ties by source position): the same rows
    always give the same bytes. Returns its label counts for the stats.

    `fs` comes from the driver: a worker's environment may lack the driver's S3 endpoint."""
    shard = batch.column("shard")[0].as_py()
    order = pc.sort_indices(batch, [(c, "ascending") for c in
                                    ("rank", "label", "doc_a", "sent_a", "doc_b", "sent_b")])
    table = batch.take(order).select(PAIRS_SCHEMA.names)
    pq.write_table(table, f"{root}/{shard_name(shard)}", filesystem=fs)
    labels = table.column("label").to_numpy()
    return pa.table({"shard": [shard], **{f"label{l}": [int(np.sum(labels == l))] for l in range(3)}})


def check_out_dir(out: str) -> None:
    """Refuse an output URI that already holds a build (parquet shards or `_meta.json`)."""
    if storage.exists(out) and any(f.endswith((META, ".parquet")) for f in storage.list_files(out)):
        raise DataError(f"{out} already holds parquet files or {META}; pass a new --out, or delete "
                        "it to rebuild (shards of an older run would mix with the new ones)")


def _no_pairs_error(corpus: str, counts: PairCounts) -> DataError | None:
    if counts.documents == 0:
        return DataError(f"corpus {corpus} holds no documents; check that its files are in the "
                         "format given (fmt=...) and not empty")
    if counts.sentences == 0:
        return DataError(
            f"corpus {corpus} has {counts.documents} documents but no usable sentence: dropped "
            f"{counts.fragments} fragments (too few words or no final . ! ?), {counts.long} too long, "
            f"{counts.undecodable} with undecodable bytes; lower min_words / raise max_words or "
            "check the corpus encoding")
    return None


def _capacity_error(corpus: str, num_examples: int, capacity: list[int], counts: PairCounts) -> DataError:
    return DataError(
        f"corpus {corpus} can supply at most {max_balanced(capacity)} balanced pairs, "
        f"{num_examples} were asked: {capacity[2]} adjacent pairs (label 2), {capacity[1]} "
        f"same-document non-adjacent pairs (label 1), {capacity[0]} cross-document pairs "
        f"(label 0) from {counts.sentences} usable sentences in {counts.documents} documents "
        f"({counts.single} documents with one usable sentence give label 0 only). Ask for at "
        f"most {max_balanced(capacity)} pairs or use a bigger corpus")


def build_pairs(corpus: str, out: str, num_examples: int, seed: int = 0, *, fmt: str = "auto",
                text_column: str = "text", id_column: str | None = None, min_words: int = 4,
                max_words: int = 80, rows_per_shard: int = 100_000) -> dict[str, Any]:
    """Write `num_examples` balanced SMASH sentence pairs from `corpus` to `out` (local or
    s3://) and return the stats also saved in `out/_meta.json` (see module docstring).

    `fmt`, `text_column`, `id_column` choose how the corpus is read and `min_words`,
    `max_words` which sentences are kept (`rayapp.data.corpus`)."""
    if num_examples < 1:
        raise DataError(f"num_examples must be at least 1, got {num_examples}")
    if seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed}")
    check_out_dir(out)
    sentences = read_sentences(corpus, fmt=fmt, text_column=text_column, id_column=id_column,
                               min_words=min_words, max_words=max_words)
    # This pipeline's aggregate and two shuffles move O(N) rows. The pull-based sort
    # shuffle runs them as plain tasks; Ray's default hash shuffle starts a pool of
    # aggregator actors for each, seconds of overhead at any size. Set on this dataset's
    # own DataContext copy, which every dataset derived from it shares, not globally.
    sentences.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    counts = count_pairs(sentences)
    error = _no_pairs_error(corpus, counts)
    needed = label_counts(num_examples)
    if error is None and any(n > c for n, c in zip(needed, counts.capacity)):
        error = _capacity_error(corpus, num_examples, counts.capacity, counts)
    if error is not None:
        raise error

    # Label 0 samples endpoints per sentence, the others candidates per candidate pair.
    population = [counts.sentences, *counts.capacity[1:]]
    rates = [min(1.0, (n + 6 * math.sqrt(n) + 10) / p) for n, p in zip(needed, population)]
    while True:
        expected = sum(rate * p for rate, p in zip(rates, population))
        groups = max(1, math.ceil(expected / _GROUP_ROWS))
        pool = _candidate_pool(sentences, seed, rates, groups)
        keys = _pool_keys(pool)
        short = [label for label in range(3) if len(keys[label]) < needed[label]]
        if not short:
            break
        if all(rates[label] == 1.0 for label in short):
            # Only label 0 can get here: matching leaves some endpoints without a partner.
            capacity = [len(keys[0]), *counts.capacity[1:]]
            raise _capacity_error(corpus, num_examples, capacity, counts)
        log.warning("sampled too few candidates for labels %s; resampling them exhaustively", short)
        rates = [1.0 if label in short else rate for label, rate in enumerate(rates)]

    thresholds = [float(np.partition(k, n - 1)[n - 1]) if n else -1.0 for k, n in zip(keys, needed)]
    shards = math.ceil(num_examples / rows_per_shard)
    storage.makedirs(out)
    fs, root = storage.filesystem(out)
    written = (pool.map_batches(_select_batch, batch_format="pyarrow",
                                fn_kwargs={"thresholds": thresholds, "shards": shards})
               .groupby("shard", num_partitions=shards)
               .map_groups(_write_shard, batch_format="pyarrow", fn_kwargs={"fs": fs, "root": root})
               .take_all())
    stats = {
        "task": PAIR_TASK, "template": PAIR_TEMPLATE,
        "labels": {str(label): text for label, text in PAIR_LABELS.items()},
        "corpus": corpus, "seed": seed, "num_examples": num_examples,
        "counts": {str(label): sum(r[f"label{label}"] for r in written) for label in range(3)},
        "files": [shard_name(r["shard"]) for r in sorted(written, key=lambda r: r["shard"])],
        "corpus_counts": asdict(counts),
        "capacity": {str(label): c for label, c in enumerate(counts.capacity)},
        "settings": {"fmt": fmt, "text_column": text_column, "id_column": id_column,
                     "min_words": min_words, "max_words": max_words,
                     "rows_per_shard": rows_per_shard, "sampling_rates": rates},
    }
    storage.write_text(storage.join(out, META), json.dumps(stats, indent=2))
    return stats


# --- sentiment -----------------------------------------------------------------------------
# (teacher-filtered single sentences, SMASH §3.2 "Sentiment Classification Tasks")
