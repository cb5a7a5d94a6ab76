"""Raw corpus text for masked-LM training (further pre-training, SMASH §4.4 setting 5).

Documents from `corpus.read_documents` (any corpus format) are cut into chunks of at most
`max_words` whitespace words at paragraph boundaries where possible (a longer paragraph is
cut by words), so a chunk fills most of a `max_length`-token window (~0.75 words per
word-piece) without truncating away most of each document, and every training row is one
fixed-size sequence (the global batch stays a number of sequences).

`build_text_chunks` writes them once as a rayapp data folder (parquet shards + `_meta.json`
holding a stable 2% held out for evaluation), which training streams with exact resume
(`rayapp.train.stream`); a second run with the same corpus and length reuses the folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib

import ray

from rayapp import storage
from rayapp.data import shards
from rayapp.data.corpus import read_documents
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


def read_text_chunks(uri: str, max_length: int, fmt: str = "auto") -> ray.data.Dataset:
    """Rows `{"text"}` of at most ~`max_length` tokens each, streamed from the corpus."""
    max_words = words_for(max_length)
    return read_documents(uri, fmt=fmt).flat_map(
        lambda doc: [{"text": c} for c in chunk_text(doc["text"], max_words)])


def held_out(text: str, every: int = 50) -> bool:
    """A stable 1/`every` of the rows (by a hash of the text), kept out of training."""
    return zlib.crc32(text.encode()) % every == 0


def build_text_chunks(corpus: str, root: str, max_length: int, eval_examples: int) -> str:
    """Materialise the corpus's training chunks under `root/text-<hash>` (once); returns the
    folder, whose `_meta.json` lists the shards and the held-out texts."""
    plan = {"corpus": corpus, "max_length": max_length, "eval_examples": eval_examples}
    out = storage.join(root, "text-" + hashlib.sha1(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:10])
    if shards.read_meta(out) is not None:
        return out
    from ray.data.expressions import col

    # the held-out flag as a column, so both halves are expression filters (Ray Data warns on
    # every run about a Python predicate per row)
    text = read_text_chunks(corpus, max_length).map(lambda r: {"text": r["text"], "held": held_out(r["text"])})
    held = [r["text"] for r in text.filter(expr=col("held")).take(eval_examples)]
    fs, path = storage.filesystem(out)
    text.filter(expr=~col("held")).drop_columns(["held"]).write_parquet(path, filesystem=fs)
    files = sorted(os.path.basename(f) for f in storage.list_files(out, suffix=".parquet"))
    if not files:
        raise DataError(f"corpus {corpus} gave no text to train on")
    shards.write_meta(out, {**plan, "files": files, "held_out": held})
    return out
