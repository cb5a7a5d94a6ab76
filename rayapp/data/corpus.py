"""Unlabelled corpora as streaming Ray Data datasets of documents and sentences.

`read_documents(uri)` gives rows `{doc_id, text}` from (fmt: input -> doc_id):
- `wikiextractor`: `<doc id=.. url=.. title=..>` ... `</doc>` files -> the `id` attribute;
- `text`: plain text, a document per blank-line-separated block -> `FILE#BLOCK`
  (`per_file=True`: a document per file -> `FILE`);
- `jsonl`: a JSON object per line, text in `text_column` -> `id_column`, else `FILE#LINE`;
- `parquet`: a table with `text_column` -> `id_column`, else `FILE#ROWHASH`;
- `hf`: `hf://NAME/CONFIG[?split=..]`, `hf://ORG/NAME?config=..[&split=..]` (streamed
  from the hub) or a local `save_to_disk` folder -> `id_column`, else `SHARD#ROW`.
`fmt="auto"` picks `hf` for `hf://` URIs and `save_to_disk` folders, `jsonl`/`parquet` by
file suffix, else sniffs the first file for `<doc `. Every file format is read by Ray Data's
file-based readers (`read_binary_files` + `flat_map`, `read_parquet`), one task per file,
so reading parallelises across the cluster and streams: nothing here materialises the
corpus. `s3://` URIs go through `storage.filesystem`. Files whose names start with `.` or
`_` (`_SUCCESS`, `_meta.json`) are not corpus files. Doc ids must be unique: samplers key
their per-document random streams on them.

Sentences. `split_sentences` is a dependency-free regex splitter: a sentence ends at
`.`, `!` or `?` (plus closing quotes/brackets) followed by whitespace and an upper-case
letter, digit or opening quote/bracket, except after a known abbreviation ("Mr.",
"Dr.", "No.", "Jan.", "e.g.", "i.e.", "cf."), a dotted acronym ("U.S.", "a.m.") or a
single-letter initial ("J. R. R. Tolkien"). Decimals ("3.5") never split, since no
whitespace follows the dot. It is wrong in both directions on rare cases ("... in the
U.S. The next year" stays one sentence); that noise is fine for SMASH's intermediate task.
Sentences never span lines: a line is a paragraph in every supported format.

`document_sentences` then keeps a sentence only if it
- ends with terminal punctuation: drops title lines, section headings of HF Wikipedia
  (which have no period), list items and table debris;
- has at least `min_words` words (default 4): drops WikiExtractor's section headings,
  to which it adds a period ("Etymology and terminology."), and stray fragments;
- has at most `max_words` words (default 80): the pair template `x1 ? <mask> , x2` is cut
  at 128 tokens, and an 80-word x1 still leaves the mask inside that budget;
- has no U+FFFD. Bytes that are not UTF-8 are decoded with `errors="replace"`, and the
  sentences they touch are dropped, not the document: one bad byte in a 1 MB dump file
  costs one sentence, and no pair ever contains mojibake.
Dropped sentences are counted per reason (`fragments`, `long`, `undecodable`), and they
keep their place: each kept sentence carries its `position` among all sentences of the
document, so "x2 directly follows x1" stays true to the source text.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import partial
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from rayapp import storage
from rayapp.errors import DataError

FORMATS = ("text", "wikiextractor", "jsonl", "parquet", "hf")

# --- sentences -----------------------------------------------------------------------------

_BOUNDARY = re.compile(r"""[.!?]+["'”’)\]]*\s+(?=["'“‘(\[]?[A-Z0-9])""")
_LAST_TOKEN = re.compile(r"""["'“‘(\[]*(\S+)\.$""")
_ACRONYM = re.compile(r"(?:[A-Za-z]\.)+[A-Za-z]")  # "U.S", "e.g", "a.m" (final dot excluded)
_TERMINAL = re.compile(r"""[.!?]["'”’)\]]*$""")
# Case-sensitive on purpose: "No. 5" is an abbreviation, "the answer was no. Then" is not.
_ABBREVIATIONS = frozenset("""
    Mr Mrs Ms Dr Prof Sr Jr St Mt Ft Gen Col Lt Sgt Capt Cmdr Adm Gov Sen Rep Rev Hon Pres
    No Nos Vol Vols Fig Figs Ch Pt Op Ed Eds Inc Ltd Co Corp Bros Dept Univ Ave Blvd
    Jan Feb Mar Apr Jun Jul Aug Sep Sept Oct Nov Dec vs cf ca approx al ibid viz pp
""".split())


def _is_abbreviation(before: str) -> bool:
    """Whether the text up to and including a `.` ends in an abbreviation."""
    m = _LAST_TOKEN.search(before)
    if m is None:
        return False
    token = m.group(1)
    return (token in _ABBREVIATIONS or (len(token) == 1 and token.isalpha())
            or _ACRONYM.fullmatch(token) is not None)


def split_sentences(text: str) -> list[str]:
    """Split one paragraph into sentences (rules in the module docstring)."""
    sentences, start = [], 0
    for m in _BOUNDARY.finditer(text):
        if m.group().rstrip() == "." and _is_abbreviation(text[start:m.start() + 1]):
            continue
        sentences.append(text[start:m.end()].strip())
        start = m.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


@dataclass(frozen=True)
class DocSentences:
    """The kept sentences of one document and why the others were dropped."""

    sentences: list[str]
    positions: list[int]  # index of each kept sentence among all sentences of the document
    fragments: int = 0
    long: int = 0
    undecodable: int = 0


def document_sentences(text: str, *, min_words: int = 4, max_words: int = 80) -> DocSentences:
    """Split a document into sentences and filter them (rules in the module docstring)."""
    kept, positions, dropped = [], [], {"fragments": 0, "long": 0, "undecodable": 0}
    position = 0
    for line in text.splitlines():
        for sentence in split_sentences(line):
            words = len(sentence.split())
            if "\ufffd" in sentence:
                dropped["undecodable"] += 1
            elif words < min_words or not _TERMINAL.search(sentence):
                dropped["fragments"] += 1
            elif words > max_words:
                dropped["long"] += 1
            else:
                kept.append(sentence)
                positions.append(position)
            position += 1
    return DocSentences(kept, positions, **dropped)


SENTENCES_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("sentences", pa.list_(pa.string())),
    ("positions", pa.list_(pa.int64())), ("fragments", pa.int64()), ("long", pa.int64()),
    ("undecodable", pa.int64()),
])


def _sentence_batch(batch: pa.Table, min_words: int, max_words: int) -> pa.Table:
    docs = [document_sentences(t, min_words=min_words, max_words=max_words)
            for t in batch.column("text").to_pylist()]
    return pa.table({
        "doc_id": batch.column("doc_id"),
        "sentences": [d.sentences for d in docs], "positions": [d.positions for d in docs],
        "fragments": [d.fragments for d in docs], "long": [d.long for d in docs],
        "undecodable": [d.undecodable for d in docs],
    }, schema=SENTENCES_SCHEMA)


def read_sentences(uri: str, *, min_words: int = 4, max_words: int = 80,
                   **read_kwargs: Any) -> ray.data.Dataset:
    """One row per document: `doc_id`, kept `sentences` with their `positions`, and the
    number of sentences dropped as `fragments`, `long` and `undecodable`.
    `read_kwargs` go to `read_documents`."""
    if not 1 <= min_words <= max_words:
        raise DataError(f"need 1 <= min_words <= max_words, got {min_words} and {max_words}")
    return read_documents(uri, **read_kwargs).map_batches(
        _sentence_batch, batch_format="pyarrow",
        fn_kwargs={"min_words": min_words, "max_words": max_words})


# --- documents -----------------------------------------------------------------------------

DOCUMENTS_SCHEMA = pa.schema([("doc_id", pa.string()), ("text", pa.string())])
_SNIFF_BYTES = 1 << 16


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _relative(path: str, root: str) -> str:
    """A file's name relative to the corpus root: stable ids for local and s3:// copies."""
    return path[len(root):].lstrip("/") if path.startswith(root + "/") else path.rsplit("/", 1)[-1]


def _wikiextractor_docs(row: dict, root: str) -> list[dict]:
    docs = []
    for k, m in enumerate(re.finditer(rb"<doc\s([^>]*)>(.*?)</doc>", row["bytes"], re.S)):
        attrs = dict(re.findall(rb'(\w+)="([^"]*)"', m.group(1)))
        doc_id = _decode(attrs[b"id"]) if b"id" in attrs else f"{_relative(row['path'], root)}#{k}"
        docs.append({"doc_id": doc_id, "text": _decode(m.group(2))})
    return docs


def _text_docs(row: dict, root: str, per_file: bool) -> list[dict]:
    name = _relative(row["path"], root)
    if per_file:
        return [{"doc_id": name, "text": _decode(row["bytes"])}]
    blocks = re.split(rb"\n(?:[ \t\r]*\n)+", row["bytes"])
    return [{"doc_id": f"{name}#{k}", "text": _decode(b)} for k, b in enumerate(blocks) if b.strip()]


def _json_object(line: bytes) -> dict | None:
    try:
        record = json.loads(_decode(line))
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _jsonl_docs(row: dict, root: str, text_column: str, id_column: str | None) -> list[dict]:
    """A document per non-blank line. A line that is not a JSON object or has no string
    `text_column` becomes an empty document (counted downstream with the documents that
    have no usable sentence) rather than failing a long job inside a Ray task; a wrong
    format or column name is caught on the driver, from the first line."""
    name, docs = _relative(row["path"], root), []
    for n, line in enumerate(row["bytes"].split(b"\n"), 1):
        if line.strip():
            record = _json_object(line) or {}
            ident, text = record.get(id_column) if id_column else None, record.get(text_column)
            docs.append({"doc_id": f"{name}#{n}" if ident is None else str(ident),
                         "text": text if isinstance(text, str) else ""})
    return docs


def _table_docs(batch: pa.Table, text_column: str, id_column: str | None, root: str) -> pa.Table:
    if id_column:
        ids = [str(v) for v in batch.column(id_column).to_pylist()]
    else:
        ids = [f"{_relative(p, root)}#{h:016x}" for p, h in
               zip(batch.column("path").to_pylist(), batch.column("row_hash").to_pylist())]
    texts = [t or "" for t in batch.column(text_column).to_pylist()]
    return pa.table({"doc_id": ids, "text": texts}, schema=DOCUMENTS_SCHEMA)


def _check_columns(columns: list[str], text_column: str, id_column: str | None, where: str) -> None:
    for role, name in (("text_column", text_column), ("id_column", id_column)):
        if name is not None and name not in columns:
            raise DataError(f"{where} has no column {name!r} ({role}); available columns: "
                            f"{', '.join(columns)}. Pass {role}=<one of them>")


def _head(uri: str) -> bytes:
    fs, path = storage.filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read(_SNIFF_BYTES)


def _corpus_files(uri: str) -> list[str]:
    files = [f for f in storage.list_files(uri)
             if not f.rsplit("/", 1)[-1].startswith((".", "_"))]
    if not files:
        raise DataError(f"corpus {uri} holds no files; point --corpus at a file or a folder of "
                        "text / WikiExtractor / JSONL / parquet files")
    return files


def _detect_format(files: list[str]) -> str:
    kinds = {"jsonl" if f.endswith((".jsonl", ".json")) else "parquet" if f.endswith(".parquet")
             else "plain" for f in files}
    if len(kinds) > 1:
        raise DataError(f"corpus mixes file kinds ({', '.join(sorted(kinds))}): "
                        f"{files[0]} ... {files[-1]}; pass fmt= or point at one kind of file")
    kind = kinds.pop()
    if kind != "plain":
        return kind
    return "wikiextractor" if _head(files[0]).lstrip().startswith(b"<doc ") else "text"


def _is_saved_hf_dataset(uri: str) -> bool:
    return not storage.is_remote(uri) and storage.exists(storage.join(uri, "state.json")) \
        and storage.exists(storage.join(uri, "dataset_info.json"))


def read_documents(uri: str, *, fmt: str = "auto", text_column: str = "text",
                   id_column: str | None = None, per_file: bool = False) -> ray.data.Dataset:
    """A lazy, streaming dataset of `{doc_id, text}` rows (formats in the module docstring).

    Raises DataError at once for a missing path, an empty folder, mixed file kinds, an
    unknown `fmt` or a missing `text_column`/`id_column`; a corpus whose files hold no
    document is reported by whoever consumes the stream (it cannot be known sooner)."""
    if fmt not in ("auto", *FORMATS):
        raise DataError(f"unknown corpus format {fmt!r}; use one of auto, {', '.join(FORMATS)}")
    if fmt == "hf" or (fmt == "auto" and (uri.startswith("hf://") or _is_saved_hf_dataset(uri))):
        return _read_hf(uri, text_column, id_column)
    files = _corpus_files(uri)
    fmt = _detect_format(files) if fmt == "auto" else fmt
    if per_file and fmt != "text":
        raise DataError(f"per_file=True splits plain text files only, but {uri} is read as {fmt}")
    fs, root = storage.filesystem(uri)
    paths = [storage.filesystem(f)[1] for f in files]
    if fmt == "parquet":
        columns = pq.read_schema(paths[0], filesystem=fs).names
        _check_columns(columns, text_column, id_column, files[0])
        ds = ray.data.read_parquet(paths, filesystem=fs, include_paths=True,
                                   include_row_hash=id_column is None)
        return ds.map_batches(_table_docs, batch_format="pyarrow", fn_kwargs={
            "text_column": text_column, "id_column": id_column, "root": root})
    if fmt == "jsonl":
        record = _json_object(_head(files[0]).lstrip().split(b"\n", 1)[0])
        if record is None:
            raise DataError(f"{files[0]} line 1 is not a JSON object; JSONL needs one object per line")
        _check_columns(list(record), text_column, id_column, files[0])
        parse = partial(_jsonl_docs, root=root, text_column=text_column, id_column=id_column)
    elif fmt == "wikiextractor":
        parse = partial(_wikiextractor_docs, root=root)
    else:
        parse = partial(_text_docs, root=root, per_file=per_file)
    return ray.data.read_binary_files(paths, filesystem=fs, include_paths=True).flat_map(parse)


# --- Hugging Face datasets -----------------------------------------------------------------

def _load_hf(uri: str):
    """The corpus as a `datasets.IterableDataset`: streamed from the hub, or from a local
    `save_to_disk` folder (memory-mapped, cut into shards so tasks can share the work)."""
    import datasets

    if uri.startswith("hf://"):
        name, config, split = storage.parse_hf_uri(uri)
        try:
            return datasets.load_dataset(name, config, split=split, streaming=True)
        except (datasets.exceptions.DatasetNotFoundError, FileNotFoundError, ValueError) as e:
            # ValueError: unknown config or split
            raise DataError(f"cannot load {uri} ({e}); check the dataset name, config and split") from e
    if not _is_saved_hf_dataset(uri):
        raise DataError(f"{uri} is not a folder written by datasets' save_to_disk "
                        "(no state.json / dataset_info.json); use hf://NAME for hub datasets")
    local = datasets.load_from_disk(storage.filesystem(uri)[1])
    if isinstance(local, datasets.DatasetDict):
        raise DataError(f"{uri} holds splits {list(local)}; point at one split's folder")
    return local.to_iterable_dataset(num_shards=max(1, min(64, len(local) // 10_000)))


def _hf_shard_docs(row: dict, dataset, text_column: str, id_column: str | None) -> list[dict]:
    shard = int(row["shard"])
    return [{"doc_id": str(r[id_column]) if id_column else f"{shard}#{n}",
             "text": r.get(text_column) or ""}
            for n, r in enumerate(dataset.shard(dataset.num_shards, shard))]


def _read_hf(uri: str, text_column: str, id_column: str | None) -> ray.data.Dataset:
    """Each shard (a data file of a hub dataset) is read by its own task, streaming.

    Not `ray.data.from_huggingface`: it probes the hub over HTTP first and reads an
    IterableDataset in a single task, and loads an in-memory Dataset onto the driver."""
    dataset = _load_hf(uri)
    if dataset.column_names is not None:  # None when a streamed dataset declares no features
        _check_columns(dataset.column_names, text_column, id_column, uri)
    shards = ray.data.from_items([{"shard": i} for i in range(dataset.num_shards)],
                                 override_num_blocks=dataset.num_shards)
    return shards.flat_map(partial(_hf_shard_docs, dataset=dataset, text_column=text_column,
                                   id_column=id_column))

