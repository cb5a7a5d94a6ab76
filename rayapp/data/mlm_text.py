"""Raw corpus text for masked-LM training (further pre-training, SMASH §4.4 setting 5).

Documents from `corpus.read_documents` (any corpus format) are cut into chunks of at most
`max_words` whitespace words at paragraph boundaries where possible (a longer paragraph is
cut by words), so a chunk fills most of a `max_length`-token window (~0.75 words per
word-piece) without truncating away most of each document, and every training row is one
fixed-size sequence (the global batch stays a number of sequences).

`build_text_chunks` writes them once as a rayapp data folder (parquet shards + `_meta.json`
holding a stable 2% held out for evaluation), which training streams with exact resume
(`rayapp.train.stream`); a second run with the same corpus and length reuses the folder.
Its shards go through the one shard writer (`shards.write_table`, a shard per Ray Data
block, named by a digest of its text), so `_meta.json` records each one's rows and
checksum. `on_bad_lines` is the corpus reader's (`rayapp.data.corpus`); skipped lines are
counted in `_meta.json` (`bad_lines`). It is not part of the folder's name: a build that
succeeds holds the same chunks either way (with "error" it cannot have met a bad line).
"""
from __future__ import annotations

import hashlib
import json
import zlib

import pyarrow as pa
import ray

from rayapp import storage
from rayapp.data import shards
from rayapp.data.corpus import read_documents
from rayapp.data.formats import warn_skipped
from rayapp.errors import DataError


def chunk_text(text: str, max_words: int) -> list[str]:
    chunks, current = [], []
    for paragraph in text.split("\n"):
        words = paragraph.split()
        while words:
            room = max_words - len(current)
            if room <= 0 or (current and len(words) > room and len(words) <= max_words):
                chunks.append(" ".join(current))
                current = []
                continue
            current += words[:room]
            words = words[room:]
    if current:
        chunks.append(" ".join(current))
    return chunks


def words_for(max_length: int) -> int:
    """Words that fill about `max_length` sub-word tokens (~1.3 tokens per English word)."""
    return max(8, int(max_length / 1.3))


def read_text_chunks(uri: str, max_length: int, fmt: str = "auto", on_bad_lines: str = "error") -> ray.data.Dataset:
    """Rows `{"text"}` of at most ~`max_length` tokens each, streamed from the corpus."""
    max_words = words_for(max_length)
    return read_documents(uri, fmt=fmt, on_bad_lines=on_bad_lines).flat_map(
        lambda doc: [{"text": c} for c in chunk_text(doc["text"], max_words)])


def held_out(text: str, every: int = 50) -> bool:
    """A stable 1/`every` of the rows (by a hash of the text), kept out of training."""
    return zlib.crc32(text.encode()) % every == 0


def _write_chunks(batch: pa.Table, out: str, max_words: int) -> pa.Table:
    """Ray Data fn: a block of documents -> one shard of its training chunks (held-out ones
    excluded); returns its name and `_meta.json` entry (none for a block without text) and
    the block's skipped bad lines."""
    chunks = [c for text in batch["text"].to_pylist() for c in chunk_text(text, max_words) if not held_out(c)]
    names, entries = [], []
    if chunks:
        digest = hashlib.blake2b("\n".join(chunks).encode("utf-8"), digest_size=8).hexdigest()
        names.append(f"c-{digest}.parquet")
        entries.append(shards.write_table(storage.join(out, names[0]), pa.table({"text": chunks})))
    return pa.table({"names": [names], "entries": [entries],
                     "bad_lines": [sum(batch["bad_line"].to_pylist())]})


def build_text_chunks(corpus: str, root: str, max_length: int, eval_examples: int,
                      on_bad_lines: str = "error") -> str:
    """Materialise the corpus's training chunks under `root/text-<hash>` (once); returns the
    folder, whose `_meta.json` lists the shards and the held-out texts."""
    plan = {"corpus": corpus, "max_length": max_length, "eval_examples": eval_examples}
    out = storage.join(root, "text-" + hashlib.sha1(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:10])
    if shards.read_meta(out) is not None:
        return out
    from ray.data.expressions import col

    # the held-out flag as a column, so the filter is an expression (Ray Data warns on every
    # run about a Python predicate per row)
    text = read_text_chunks(corpus, max_length, on_bad_lines=on_bad_lines).map(
        lambda r: {"text": r["text"], "held": held_out(r["text"])})
    held = [r["text"] for r in text.filter(expr=col("held")).take(eval_examples)]
    blocks = read_documents(corpus, on_bad_lines=on_bad_lines).map_batches(
        _write_chunks, batch_format="pyarrow",
        fn_kwargs={"out": out, "max_words": words_for(max_length)}).take_all()
    written = {name: entry for b in blocks for name, entry in zip(b["names"], b["entries"])}
    bad_lines = sum(int(b["bad_lines"]) for b in blocks)
    warn_skipped(corpus, bad_lines)
    if not written:
        raise DataError(f"corpus {corpus} gave no text to train on")
    shards.write_meta(out, {**plan, "files": sorted(written), "held_out": held, "bad_lines": bad_lines}, written)
    return out
