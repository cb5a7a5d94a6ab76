"""What format a data file is in, how to read it line by line, and the Hugging Face datasets
behind `hf://` URIs: one place for `fewshot` (labelled tables) and `corpus` (documents).

- `TABLE_FORMATS` / `CORPUS_FORMATS`: the formats each reader accepts. `suffix_format`
  names a file's format from its suffix (`hf` for `hf://` URIs); `detect_format` does the
  same or raises a DataError listing what is supported.
- `iter_lines` reads a pyarrow stream in fixed blocks and yields whole lines with their
  byte offsets: memory is one block plus the longest line, whatever the file's size.
  `first_line` is the first non-blank line, complete however long (a sniff of a fixed
  number of bytes cuts a long first JSONL document in half).
- `load_hf`: `hf://NAME/CONFIG?split=S` or `hf://ORG/NAME?config=C&split=S` (see
  `storage.parse_hf_uri`) through `datasets.load_dataset`, streamed or not; a wrong name,
  config or split is a DataError.
- Lines that do not parse (`on_bad_lines`, one of `ON_BAD_LINES`): "error" (the default)
  makes the first one a DataError naming the file and line (`bad_line_error`); "skip" skips
  them, and the reader counts them and warns once (`warn_skipped`). Never silent: a
  corpus with 2 broken lines in 40 is 38 documents, and says so.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import PurePosixPath

from rayapp import storage
from rayapp.errors import DataError

TABLE_FORMATS = ("tsv", "csv", "jsonl", "json", "parquet", "hf")
CORPUS_FORMATS = ("text", "wikiextractor", "jsonl", "parquet", "hf")
BLOCK_BYTES = 1 << 16
ON_BAD_LINES = ("error", "skip")

log = logging.getLogger(__name__)


def suffix_format(uri: str) -> str | None:
    """`hf` for an `hf://` URI, else the table format its suffix names, else None."""
    if uri.startswith("hf://"):
        return "hf"
    suffix = PurePosixPath(uri).suffix.lower().lstrip(".")
    return suffix if suffix in TABLE_FORMATS else None


def detect_format(uri: str, formats: tuple[str, ...]) -> str:
    """The format of `uri` from its suffix, if it is one of `formats`."""
    fmt = suffix_format(uri)
    if fmt not in formats:
        suffix = PurePosixPath(uri).suffix.lower().lstrip(".")
        listed = " ".join(f".{f}" for f in formats if f != "hf")
        raise DataError(f"cannot tell the format of {uri} from its extension {suffix!r}; supported: "
                        f"{listed} and hf://NAME[/CONFIG]?split=SPLIT, or pass fmt=")
    return fmt


def check_on_bad_lines(value: str) -> None:
    if value not in ON_BAD_LINES:
        raise DataError(f"on_bad_lines={value!r}: use 'error' (a line that does not parse stops the read, "
                        "naming it) or 'skip' (such lines are skipped and counted)")


def bad_line_error(where: str, problem: str) -> DataError:
    """The error for one line that does not parse; `where` names the file and the line."""
    return DataError(f"{where} {problem}; fix or delete that line, or pass on_bad_lines=skip to skip "
                     "such lines (they are counted)")


def warn_skipped(uri: str, count: int, detail: str = "") -> None:
    """The one warning of a read with on_bad_lines=skip that skipped `count` lines."""
    if count:
        log.warning("%s: skipped %d line(s) that do not parse (on_bad_lines=skip)%s", uri, count, detail)


def iter_lines(stream, offset: int = 0, block: int = BLOCK_BYTES) -> Iterator[tuple[int, bytes]]:
    """`(offset, line)` for each line of a pyarrow input stream positioned at `offset`; a
    line keeps its `\\n` (the last one may lack it)."""
    pending: list[bytes] = []  # pieces of a line longer than a block: joined once, not per block
    start = offset
    while data := stream.read(block):
        lo = 0
        while (end := data.find(b"\n", lo) + 1) > 0:
            line = b"".join([*pending, data[lo:end]])
            pending = []
            yield start, line
            start, lo = start + len(line), end
        if lo < len(data):
            pending.append(data[lo:])
    if pending:
        yield start, b"".join(pending)


def first_line(uri: str) -> bytes:
    """The first non-blank line of a file, whole, without its line break (b"" if none)."""
    fs, path = storage.filesystem(uri)
    with fs.open_input_stream(path) as f:
        for _, line in iter_lines(f):
            if line.strip():
                return line.rstrip(b"\r\n")
    return b""


def load_hf(uri: str, *, streaming: bool = False):
    """The `datasets` split an `hf://` URI names (an IterableDataset when `streaming`): its
    copy in the asset mirror `$RAYAPP_ASSETS` when there is one (`rayapp.assets`), else the hub."""
    import datasets

    from rayapp import assets

    mirrored = assets.resolve(uri)
    if mirrored != uri:  # a `save_to_disk` folder; an s3:// one is copied to this node once
        local = datasets.load_from_disk(storage.local_copy(mirrored))
        return local.to_iterable_dataset() if streaming else local
    name, config, split = storage.parse_hf_uri(uri)
    try:
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except ConnectionError as e:  # offline or no network: name every place looked
        raise DataError(assets.not_found(uri, str(e).splitlines()[0])) from None
    except (datasets.exceptions.DatasetNotFoundError, FileNotFoundError, ValueError) as e:
        # ValueError: unknown config or split
        raise DataError(f"cannot load {uri} ({e}); check the dataset name, config and split") from e
