"""Raw corpus text for masked-LM training (further pre-training, SMASH §4.4 setting 5).

Documents from `corpus.read_documents` (any corpus format) are cut into chunks of at most
`max_words` whitespace words at paragraph boundaries where possible (a longer paragraph is
cut by words), so a chunk fills most of a `max_length`-token window (~0.75 words per
word-piece) without truncating away most of each document, and every training row is one
fixed-size sequence (the global batch stays a number of sequences).
"""
from __future__ import annotations

import zlib

import ray

from rayapp.data.corpus import read_documents


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
