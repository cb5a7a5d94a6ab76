"""Unlabelled corpora: documents and their sentences, read in bounded pieces.

Documents (`read_documents`: rows `{doc_id, text}`, and `bad_line`: "Bad lines" below), by
`fmt` (input -> doc_id):
- `wikiextractor`: `<doc id=.. url=.. title=..>` ... `</doc>` -> the `id` attribute, else `FILE#BYTE`;
- `text`: plain text, a document per blank-line-separated block -> `FILE#BYTE`
  (`per_file=True`: a document per file -> `FILE`);
- `jsonl`: a JSON object per line, text in `text_column` -> `id_column`, else `FILE#BYTE`
  (a missing or null text is an empty document);
- `parquet`: a table with `text_column` -> `id_column`, else `FILE#ROW`;
- `hf`: a `save_to_disk` folder (local or s3://) -> `id_column`, else `FILE#ROW`; or
  `hf://NAME/CONFIG[?split=..]`, `hf://ORG/NAME?config=..[&split=..]`: its mirror copy
  under `$RAYAPP_ASSETS` (a `save_to_disk` folder, as above) when there is one, else
  streamed from the hub -> `id_column`, else `SHARD#ROW`.
FILE is the file's name relative to the corpus root (the same for local and s3:// copies),
BYTE the offset where the document starts in it, ROW its row in the file or shard: an id
depends on the file alone, never on how the file was cut into pieces. Doc ids must be
unique: samplers key on them. `fmt="auto"` picks `hf` for `hf://` URIs and `save_to_disk`
folders, `jsonl`/`parquet` by file suffix (`rayapp.data.formats`), else sniffs the first
complete line of the first file for `<doc `. Files whose names start with `.` or `_`
(`_SUCCESS`, `_meta.json`) are not corpus files. `s3://` goes through `storage.filesystem`.

Bad lines (`on_bad_lines`, `rayapp.data.formats`). A JSONL line that is not a JSON object,
or whose `text_column` is neither a string nor null, is an error naming the file, the line
and its byte offset, raised in the Ray task that reads it (the CLI shows it as one line:
`rayapp.errors.find_user_error`). A task reads a byte range, so the line number is counted
from the file's start when the error is raised (the error path only; past
`LINE_COUNT_BYTES` the byte offset alone names the line). With `on_bad_lines="skip"`
such a line is a row with `bad_line` true and no text: never a document, but counted by
the stages, which warn once and record the count. An empty corpus (every file empty, or a
parquet corpus of no rows) is refused by `plan_sources`, before any Ray work.

Pieces (`plan_sources`). Nothing holds a file: the corpus is cut into sources of about
`chunk_bytes` (16 MB), each read by one task, so one 20 GB file streams in constant memory
and its pieces are read in parallel.
- Text, WikiExtractor and JSONL files are cut into byte ranges (small files packed into one
  source). A range [s, e) reads from boundary(s) to boundary(e), where boundary(x) is the
  first record start found reading forward from x: the next line start (JSONL), the next
  line starting `<doc` (WikiExtractor), the line after the next blank line (text). Both
  neighbours compute the same boundary, so every record is read once and whole, however
  long; a task holds its range plus one record.
- Parquet files are cut into runs of row groups, read batch by batch; a `save_to_disk`
  folder gives one source per Arrow data file (the IPC stream format cannot seek, and
  `save_to_disk` writes files of at most 500 MB), a hub dataset one per shard, streamed.
`read_documents` is a Ray Data dataset over the sources; `rayapp.data.pairs` runs its own
tasks over the same sources.

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
- has at least `min_words` words (default 4): drops short fragments;
- is not a heading (`is_heading`): a paragraph that is one sentence of at most 10 words
  with no sign of a finite verb. WikiExtractor ends its section headings with a period
  ("Early life and career.", "History of atomic theory."), which the rules above let
  through and which then became adjacency partners. A finite verb is guessed without a
  tagger: an auxiliary, modal or common irregular past form, a lower-case `-ed` word, a
  first word that is a pronoun, or a lower-case `-s` word followed by a word other than
  `and`/`of`/a preposition ("The company operates mines", not "Types of ... effects").
  On the local Wikipedia sample this drops 1.6% of the sentences kept before; a sample
  of 90 of them read by hand held 89 headings;
- has at most `max_words` words (default 80): the pair template `x1 ? <mask> , x2` is cut
  at 128 tokens, and an 80-word x1 still leaves the mask inside that budget;
- has no U+FFFD. Bytes that are not UTF-8 are decoded with `errors="replace"`, and the
  sentences they touch are dropped, not the document: one bad byte in a 1 MB dump file
  costs one sentence, and no pair ever contains mojibake.
Dropped sentences are counted per reason (`fragments`, `headings`, `long`, `undecodable`),
and they keep their place: each kept sentence carries its `position` among all sentences
of the document, so "x2 directly follows x1" stays true to the source text.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from rayapp import storage
from rayapp.data.formats import (BLOCK_BYTES, CORPUS_FORMATS, bad_line_error, check_on_bad_lines, first_line,
                                 iter_lines, load_hf, suffix_format)
from rayapp.errors import DataError

CHUNK_BYTES = 16 << 20
LINE_COUNT_BYTES = 1 << 30  # an error past this offset names the byte only: counting lines would read it all

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
    # Only the last whitespace-free run can match: searching the whole paragraph made
    # splitting quadratic in the paragraph's length.
    m = _LAST_TOKEN.search(before.rsplit(None, 1)[-1])
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


HEADING_MAX_WORDS = 10
_FINITE = frozenset("""
    is are was were am be been isn't aren't wasn't weren't has have had hasn't haven't hadn't
    does do did doesn't don't didn't can could will would shall should may might must cannot
    can't won't couldn't wouldn't shouldn't became began came went made took gave found held led
    left met ran saw said told thought brought built bought caught drew drove fell felt fought
    flew grew heard hid kept knew lay laid lost meant paid rose sat sent shot sang sank slept
    spoke spent stood struck swam taught threw understood won wore wrote
""".split())
_PRONOUNS = frozenset("i you he she it we they there this these those".split())
# after a plural noun in a heading, not after a verb: "Types of ...", "Methods in ..."
_NOT_OBJECT = frozenset("""and or nor of in on for with under from at to among by as during
    after before since between into within over through""".split())
_WORD = re.compile(r"[A-Za-z][A-Za-z'’]*|[^\sA-Za-z]")


def is_heading(sentence: str) -> bool:
    """Whether a one-sentence paragraph looks like a section heading: at most
    HEADING_MAX_WORDS words and no finite-verb cue (module docstring)."""
    if len(sentence.split()) > HEADING_MAX_WORDS:
        return False
    words = _WORD.findall(sentence)
    if words and words[0].lower() in _PRONOUNS:
        return False
    for i, word in enumerate(words):
        lower = word.lower()
        if lower in _FINITE:
            return False
        if i == 0 or not word.islower() or len(word) < 4:
            continue
        if word.endswith("ed"):
            return False
        if (word.endswith("s") and not word.endswith(("ss", "us", "is")) and i + 1 < len(words)
                and words[i + 1][0].isalnum() and words[i + 1].lower() not in _NOT_OBJECT):
            return False
    return True


@dataclass(frozen=True)
class DocSentences:
    """The kept sentences of one document and why the others were dropped."""

    sentences: list[str]
    positions: list[int]  # index of each kept sentence among all sentences of the document
    fragments: int = 0
    headings: int = 0
    long: int = 0
    undecodable: int = 0


DROP_REASONS = ("fragments", "headings", "long", "undecodable")


def document_sentences(text: str, *, min_words: int = 4, max_words: int = 80) -> DocSentences:
    """Split a document into sentences and filter them (rules in the module docstring)."""
    kept, positions, dropped = [], [], dict.fromkeys(DROP_REASONS, 0)
    position = 0
    for line in text.splitlines():
        sentences = split_sentences(line)
        for sentence in sentences:
            words = len(sentence.split())
            if "\ufffd" in sentence:
                dropped["undecodable"] += 1
            elif words < min_words or not _TERMINAL.search(sentence):
                dropped["fragments"] += 1
            elif words > max_words:
                dropped["long"] += 1
            elif len(sentences) == 1 and is_heading(sentence):
                dropped["headings"] += 1
            else:
                kept.append(sentence)
                positions.append(position)
            position += 1
    return DocSentences(kept, positions, **dropped)


SENTENCES_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("sentences", pa.list_(pa.string())),
    ("positions", pa.list_(pa.int64())), *((reason, pa.int64()) for reason in DROP_REASONS),
    ("bad_line", pa.bool_()),
])


def _sentence_batch(batch: pa.Table, min_words: int, max_words: int) -> pa.Table:
    docs = [document_sentences(t, min_words=min_words, max_words=max_words)
            for t in batch.column("text").to_pylist()]
    return pa.table({
        "doc_id": batch.column("doc_id"),
        "sentences": [d.sentences for d in docs], "positions": [d.positions for d in docs],
        **{reason: [getattr(d, reason) for d in docs] for reason in DROP_REASONS},
        "bad_line": batch.column("bad_line"),
    }, schema=SENTENCES_SCHEMA)


def check_words(min_words: int, max_words: int) -> None:
    if not 1 <= min_words <= max_words:
        raise DataError(f"need 1 <= min_words <= max_words, got {min_words} and {max_words}")


def read_sentences(uri: str, *, min_words: int = 4, max_words: int = 80,
                   **read_kwargs: Any) -> ray.data.Dataset:
    """One row per document: `doc_id`, kept `sentences` with their `positions`, the
    number of sentences dropped per reason (`DROP_REASONS`) and `bad_line` (a skipped line,
    not a document: module docstring). `read_kwargs` go to `read_documents`."""
    check_words(min_words, max_words)
    return read_documents(uri, **read_kwargs).map_batches(
        _sentence_batch, batch_format="pyarrow",
        fn_kwargs={"min_words": min_words, "max_words": max_words})


# --- sources: a corpus cut into pieces ------------------------------------------------------

DOCUMENTS_SCHEMA = pa.schema([("doc_id", pa.string()), ("text", pa.string()), ("bad_line", pa.bool_())])
_ATTRIBUTE = re.compile(rb'(\w+)="([^"]*)"')
_BLANK_LINES = re.compile(rb"\n(?:[ \t\r]*\n)+")  # separates text documents
_LEADING_BLANK_LINES = re.compile(rb"(?:[ \t\r]*\n)+")
_BLANK_LINE = re.compile(rb"[ \t\r]*\n?")


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _boundary(f, offset: int, size: int, fmt: str) -> int:
    """The first record start found reading forward from byte `offset` (module docstring):
    neighbouring ranges agree on it, so each record is read by exactly one of them."""
    if offset <= 0 or offset >= size:
        return min(max(offset, 0), size)
    f.seek(offset - 1)
    lines = iter_lines(f, offset - 1)
    next(lines)  # the rest of the line that holds byte offset-1: it started before `offset`
    for start, line in lines:
        if fmt == "jsonl" or (fmt == "wikiextractor" and line.startswith(b"<doc ")):
            return start
        if fmt == "text" and _BLANK_LINE.fullmatch(line):
            return start + len(line)
    return size


def _json_object(line: bytes) -> dict | None:
    try:
        record = json.loads(_decode(line))
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


@dataclass(frozen=True)
class FileRange:
    path: str  # inside the source's filesystem
    name: str  # relative to the corpus root: the doc-id prefix
    start: int
    end: int
    uri: str  # what an error names


def _line_at(fs, r: FileRange, offset: int) -> str:
    """Where byte `offset` of a file is, for an error: `URI line N (byte B)`, the line
    counted from the file's start (module docstring, "Bad lines")."""
    if offset > LINE_COUNT_BYTES:
        return f"{r.uri} at byte {offset}"
    newlines, left = 0, offset
    with fs.open_input_stream(r.path) as f:
        while left and (data := f.read(min(BLOCK_BYTES, left))):
            newlines += data.count(b"\n")
            left -= len(data)
    return f"{r.uri} line {newlines + 1} (byte {offset})"


@dataclass(frozen=True, eq=False)
class TextSource:
    """Byte ranges of text, WikiExtractor or JSONL files (module docstring, "Pieces")."""

    fs: pafs.FileSystem  # resolved on the driver: a worker's environment may lack its S3 endpoint
    ranges: tuple[FileRange, ...]
    fmt: str
    text_column: str = "text"
    id_column: str | None = None
    per_file: bool = False
    on_bad_lines: str = "error"

    def docs(self) -> Iterator[tuple[str, str | None]]:
        """`(doc_id, text)` of every document in the ranges, in file order; text None for a
        line skipped under on_bad_lines="skip"."""
        for r in self.ranges:
            with self.fs.open_input_file(r.path) as f:
                if self.per_file:
                    yield r.name, _decode(f.read())
                    continue
                size = f.size()
                begin, stop = _boundary(f, r.start, size, self.fmt), _boundary(f, r.end, size, self.fmt)
                f.seek(begin)
                data = f.read(stop - begin)
            yield from getattr(self, f"_{self.fmt}")(data, begin, r)

    def _wikiextractor(self, data: bytes, base: int, r: FileRange) -> Iterator[tuple[str, str]]:
        """`<doc ATTRS>TEXT</doc>` elements, found with `bytes.find` (a lazy `.*?` regex
        costs as much as splitting the sentences)."""
        start = data.find(b"<doc")
        while start >= 0:
            open_end = data.find(b">", start)
            close = data.find(b"</doc>", open_end)
            if open_end < 0 or close < 0:
                return
            if not data[start + 4:start + 5].isspace():  # "<document", not a doc element
                start = data.find(b"<doc", start + 4)
                continue
            attrs = dict(_ATTRIBUTE.findall(data, start, open_end))
            yield (_decode(attrs[b"id"]) if b"id" in attrs else f"{r.name}#{base + start}",
                   _decode(data[open_end + 1:close]))
            start = data.find(b"<doc", close)

    def _text(self, data: bytes, base: int, r: FileRange) -> Iterator[tuple[str, str]]:
        start = 0
        for end, after in [*((m.start(), m.end()) for m in _BLANK_LINES.finditer(data)),
                           (len(data), len(data))]:
            lead = _LEADING_BLANK_LINES.match(data, start, end)  # a range may open on blank lines
            start = lead.end() if lead else start
            if data[start:end].strip():
                yield f"{r.name}#{base + start}", _decode(data[start:end])
            start = after

    def _jsonl(self, data: bytes, base: int, r: FileRange) -> Iterator[tuple[str, str | None]]:
        """A document per non-blank line; a bad line (module docstring) raises a DataError
        naming it, or under on_bad_lines="skip" is yielded with text None."""
        start = 0
        while start < len(data):  # not data.split(): that would copy the whole range at once
            end = data.find(b"\n", start)
            end = len(data) if end < 0 else end
            line = data[start:end]
            if line.strip():
                record = _json_object(line)
                text = None if record is None else record.get(self.text_column)
                ident = record.get(self.id_column) if record is not None and self.id_column else None
                doc_id = f"{r.name}#{base + start}" if ident is None else str(ident)
                if record is None or not isinstance(text, (str, type(None))):
                    if self.on_bad_lines != "skip":
                        problem = ("is not a JSON object" if record is None else
                                   f"has a {type(text).__name__} as {self.text_column!r}, not a string")
                        raise bad_line_error(_line_at(self.fs, r, base + start), problem)
                    yield doc_id, None
                else:
                    yield doc_id, text or ""
            start = end + 1


@dataclass(frozen=True)
class RowGroups:
    path: str
    name: str
    groups: tuple[int, ...]
    first_row: int  # row number (in the file) of the first row of groups[0]


@dataclass(frozen=True, eq=False)
class ParquetSource:
    """Runs of row groups of parquet files, read batch by batch."""

    fs: pafs.FileSystem
    parts: tuple[RowGroups, ...]
    text_column: str = "text"
    id_column: str | None = None

    def docs(self) -> Iterator[tuple[str, str]]:
        columns = list(dict.fromkeys([self.text_column, *([self.id_column] if self.id_column else [])]))
        for part in self.parts:
            row = part.first_row
            with self.fs.open_input_file(part.path) as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=1024, row_groups=list(part.groups),
                                                            columns=columns):
                    texts = batch.column(self.text_column).to_pylist()
                    ids = ([str(v) for v in batch.column(self.id_column).to_pylist()] if self.id_column
                           else [f"{part.name}#{row + n}" for n in range(len(texts))])
                    yield from zip(ids, (t or "" for t in texts))
                    row += len(texts)


@dataclass(frozen=True, eq=False)
class ArrowSource:
    """One data file of a `save_to_disk` folder (an Arrow IPC stream), read batch by batch
    straight from its filesystem: every node reads its own files from s3://, none copies
    the dataset first."""

    fs: pafs.FileSystem
    path: str
    name: str
    text_column: str = "text"
    id_column: str | None = None

    def docs(self) -> Iterator[tuple[str, str]]:
        row = 0
        with self.fs.open_input_stream(self.path) as f:
            for batch in pa.ipc.open_stream(f):
                texts = batch.column(self.text_column).to_pylist()
                ids = ([str(v) for v in batch.column(self.id_column).to_pylist()] if self.id_column
                       else [f"{self.name}#{row + n}" for n in range(len(texts))])
                yield from zip(ids, (t or "" for t in texts))
                row += len(texts)


@dataclass(frozen=True, eq=False)
class HfShard:
    """One shard (data file) of a `datasets.IterableDataset`, streamed row by row."""

    dataset: Any
    shard: int
    text_column: str = "text"
    id_column: str | None = None

    def docs(self) -> Iterator[tuple[str, str]]:
        rows = self.dataset.shard(self.dataset.num_shards, self.shard)
        for n, r in enumerate(rows):
            yield (str(r[self.id_column]) if self.id_column else f"{self.shard}#{n}",
                   r.get(self.text_column) or "")


Source = TextSource | ParquetSource | ArrowSource | HfShard


def _pack(pieces: list[tuple[Any, int]], limit: int) -> list[list[Any]]:
    """Consecutive pieces grouped so a group holds about `limit` bytes (a bigger piece alone)."""
    groups, current, filled = [], [], 0
    for piece, size in pieces:
        if current and filled + size > limit:
            groups.append(current)
            current, filled = [], 0
        current.append(piece)
        filled += size
    return groups + [current] if current else groups


def relative_name(path: str, root: str) -> str:
    """A file's name relative to the input root (its base name when not under it): stable ids
    for local and s3:// copies; `rayapp predict` names rows by it too."""
    root = root.rstrip("/")
    return path[len(root):].lstrip("/") if path.startswith(root + "/") else path.rsplit("/", 1)[-1]


def _corpus_files(uri: str) -> list[str]:
    files = [f for f in storage.list_files(uri)
             if not f.rsplit("/", 1)[-1].startswith((".", "_"))]
    if not files:
        raise DataError(f"corpus {uri} holds no files; point --corpus at a file or a folder of "
                        "text / WikiExtractor / JSONL / parquet files")
    return files


def _detect_format(files: list[str]) -> str:
    kinds = {"jsonl" if suffix_format(f) in ("jsonl", "json") else
             "parquet" if suffix_format(f) == "parquet" else "plain" for f in files}
    if len(kinds) > 1:
        raise DataError(f"corpus mixes file kinds ({', '.join(sorted(kinds))}): "
                        f"{files[0]} ... {files[-1]}; pass fmt= or point at one kind of file")
    kind = kinds.pop()
    if kind != "plain":
        return kind
    return "wikiextractor" if first_line(files[0]).lstrip().startswith(b"<doc ") else "text"


def _check_columns(columns: list[str], text_column: str, id_column: str | None, where: str) -> None:
    for role, name in (("text_column", text_column), ("id_column", id_column)):
        if name is not None and name not in columns:
            raise DataError(f"{where} has no column {name!r} ({role}); available columns: "
                            f"{', '.join(columns)}. Pass {role}=<one of them>")


def _is_saved_hf_dataset(uri: str) -> bool:
    return storage.exists(storage.join(uri, "state.json")) and storage.exists(storage.join(uri, "dataset_info.json"))


def _saved_sources(uri: str, text_column: str, id_column: str | None) -> list[ArrowSource]:
    """A source per data file of a `save_to_disk` folder (local or s3://), listed in its
    `state.json`. Not `datasets.load_from_disk`: it needs the whole folder on local disk."""
    if not _is_saved_hf_dataset(uri):
        splits = storage.join(uri, "dataset_dict.json")
        if storage.exists(splits):
            raise DataError(f"{uri} holds splits {json.loads(storage.read_text(splits)).get('splits')}; "
                            "point at one split's folder (e.g. .../train)")
        raise DataError(f"{uri} is not a folder written by datasets' save_to_disk "
                        "(no state.json / dataset_info.json); use hf://NAME for hub datasets")
    files = [f["filename"] for f in json.loads(storage.read_text(storage.join(uri, "state.json")))["_data_files"]]
    if not files:
        raise DataError(f"{uri}/state.json lists no data files; save the dataset again")
    fs, root = storage.filesystem(uri)
    sources = [ArrowSource(fs, f"{root}/{name}", name, text_column, id_column) for name in files]
    with fs.open_input_stream(sources[0].path) as f:
        _check_columns(pa.ipc.open_stream(f).schema.names, text_column, id_column, f"{uri}/{files[0]}")
    return sources


def _hf_sources(uri: str, text_column: str, id_column: str | None) -> list[ArrowSource] | list[HfShard]:
    """An `hf://` dataset from its mirror copy (`rayapp.assets.resolve`; a `save_to_disk`
    folder) when there is one, else streamed from the hub a source per shard. Not
    `ray.data.from_huggingface`: it probes the hub over HTTP first and reads an
    IterableDataset in a single task."""
    from rayapp import assets

    mirrored = assets.resolve(uri)
    if mirrored != uri:
        return _saved_sources(mirrored, text_column, id_column)
    dataset = load_hf(uri, streaming=True)
    if dataset.column_names is not None:  # None when a streamed dataset declares no features
        _check_columns(dataset.column_names, text_column, id_column, uri)
    return [HfShard(dataset, shard, text_column, id_column) for shard in range(dataset.num_shards)]


def _parquet_metadata(fs, path: str, uri: str):
    try:
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata
    except pa.ArrowException as e:
        raise DataError(f"corpus file {uri} is not a readable parquet file ({e}); replace or remove it") from None


def _parquet_sources(fs, paths: list[str], uris: list[str], root: str, text_column: str, id_column: str | None,
                     chunk_bytes: int) -> list[ParquetSource]:
    pieces = []
    for path, uri in zip(paths, uris):
        meta = _parquet_metadata(fs, path, uri)
        if path == paths[0]:
            _check_columns(meta.schema.to_arrow_schema().names, text_column, id_column, path)
        groups = [(g, meta.row_group(g).total_byte_size, meta.row_group(g).num_rows)
                  for g in range(meta.num_row_groups) if meta.row_group(g).num_rows]
        first = 0
        for run in _pack([(g, size) for g, size, _ in groups], chunk_bytes):
            pieces.append((RowGroups(path, relative_name(path, root), tuple(run), first),
                           sum(groups[g][1] for g in run)))
            first += sum(groups[g][2] for g in run)
    return [ParquetSource(fs, tuple(parts), text_column, id_column) for parts in _pack(pieces, chunk_bytes)]


def _no_documents(uri: str, files: list[str], what: str) -> DataError:
    return DataError(f"corpus {uri} holds no documents: {what} ({len(files)} file(s): {files[0]}"
                     f"{' ...' if len(files) > 1 else ''}); point it at a corpus with text in it")


def plan_sources(uri: str, *, fmt: str = "auto", text_column: str = "text", id_column: str | None = None,
                 per_file: bool = False, chunk_bytes: int = CHUNK_BYTES, on_bad_lines: str = "error") -> list[Source]:
    """The corpus cut into sources of about `chunk_bytes` (module docstring); each has a
    `docs()` iterator of `(doc_id, text)`, in a fixed order (text None: a skipped bad line).

    Raises DataError at once for a missing path, an empty folder, files that are all empty
    (a parquet corpus: of no rows), mixed file kinds, an unknown `fmt`, a first JSONL line
    that is not an object, or a missing `text_column`/`id_column`; files of blank lines
    only, or whose documents hold no usable sentence, are reported by whoever reads the
    documents (it cannot be known sooner)."""
    check_on_bad_lines(on_bad_lines)
    if fmt not in ("auto", *CORPUS_FORMATS):
        raise DataError(f"unknown corpus format {fmt!r}; use one of auto, {', '.join(CORPUS_FORMATS)}")
    if chunk_bytes < 1:
        raise DataError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    if uri.startswith("hf://"):
        return _hf_sources(uri, text_column, id_column)
    if fmt == "hf" or (fmt == "auto" and _is_saved_hf_dataset(uri)):
        return _saved_sources(uri, text_column, id_column)
    files = _corpus_files(uri)
    fmt = _detect_format(files) if fmt == "auto" else fmt
    if per_file and fmt != "text":
        raise DataError(f"per_file=True splits plain text files only, but {uri} is read as {fmt}")
    fs, root = storage.filesystem(uri)
    paths = [storage.filesystem(f)[1] for f in files]
    if fmt == "parquet":
        sources = _parquet_sources(fs, paths, files, root, text_column, id_column, chunk_bytes)
        if not sources:
            raise _no_documents(uri, files, "its parquet files have no rows")
        return sources
    infos = fs.get_file_info(paths)
    if not any(info.size for info in infos):
        raise _no_documents(uri, files, "its files are empty")
    if fmt == "jsonl":
        first, line = next(((f, line) for f, info in zip(files, infos) if info.size and (line := first_line(f))),
                           (files[0], b""))
        if not line:
            raise _no_documents(uri, files, "its files hold blank lines only")
        record = _json_object(line)
        if record is None:
            raise DataError(f"{first} line 1 is not a JSON object; JSONL needs one object per line")
        _check_columns(list(record), text_column, id_column, first)
    pieces = []
    for info, file in zip(infos, files):
        name = relative_name(info.path, root)
        cuts = [0, info.size] if per_file else [*range(0, info.size, chunk_bytes), info.size]
        pieces += [(FileRange(info.path, name, s, e, file), e - s) for s, e in zip(cuts, cuts[1:])]
    return [TextSource(fs, tuple(ranges), fmt, text_column, id_column, per_file, on_bad_lines)
            for ranges in _pack(pieces, chunk_bytes)]


# --- documents as a Ray Data dataset --------------------------------------------------------

DOCS_PER_BATCH = 512


def _document_batches(batch: pa.Table, sources: list[Source]) -> Iterator[pa.Table]:
    for i in batch.column("source").to_pylist():
        docs = sources[i].docs()
        while chunk := list(islice(docs, DOCS_PER_BATCH)):
            ids, texts = zip(*chunk)
            yield pa.table({"doc_id": list(ids), "text": [t or "" for t in texts],
                            "bad_line": [t is None for t in texts]}, schema=DOCUMENTS_SCHEMA)


def read_documents(uri: str, *, fmt: str = "auto", text_column: str = "text", id_column: str | None = None,
                   per_file: bool = False, chunk_bytes: int = CHUNK_BYTES,
                   on_bad_lines: str = "error") -> ray.data.Dataset:
    """A lazy, streaming dataset of `{doc_id, text, bad_line}` rows (formats and errors:
    module docstring and `plan_sources`), one read task per source."""
    sources = plan_sources(uri, fmt=fmt, text_column=text_column, id_column=id_column,
                           per_file=per_file, chunk_bytes=chunk_bytes, on_bad_lines=on_bad_lines)
    items = ray.data.from_items([{"source": i} for i in range(len(sources))],
                                override_num_blocks=max(1, len(sources)))
    return items.map_batches(_document_batches, batch_size=1, batch_format="pyarrow",
                             fn_kwargs={"sources": sources})
