"""One shard writer and one `_meta.json` convention for every data stage.

A rayapp data folder (intermediate examples, a sentence table, a teacher cache) is

    OUT/part-00000.parquet ...   shards, each written whole: serialised in memory, then a
                                 local temp file + rename or one S3 PUT, so a shard that
                                 exists is complete (a crash never leaves one that looks so)
    OUT/_plan.json               (resumable stages) the settings of the build, written first
    OUT/_meta.json               written last: provenance and counts, and `files`, the
                                 shard names in read order. Its presence marks a finished
                                 folder; every consumer reads the shard list from it
                                 (`shard_uris`) and refuses a folder without it.

Resumable stages (`begin`): a shard's name is a pure function of its input, so a re-run
into the same folder with the same plan skips the shards that exist and computes only the
missing ones; a re-run with another plan is refused instead of mixing two builds.

Integrity. `_meta.json` also holds `shards`: per shard its `rows`, `bytes` and `sha256`
(of the file). `write_table` returns that entry (it has the bytes in memory: no second
read); the stage passes the entries its tasks returned to `write_meta`, which describes any
other listed shard (one a resumed run wrote earlier) by reading it. Every shard is written
with parquet's per-page CRC32s. Readers check what each place can afford:
- `shard_uris`, on the driver before any work: every listed shard exists, has the size
  `_meta.json` records, its footer parses and its footer row count is the one recorded
  (a stat and a footer read per shard; nothing else is read). A half shard, a truncated
  or garbage file, a missing one: one DataError naming the file and how to rebuild it.
- `open_shard`, wherever a worker reads the rows: parquet verifies each page's CRC32 as it
  decodes it (the bytes are read anyway, so a flipped bit costs nothing to catch), and any
  read failure is the same one-line DataError.
- the sha256, where a reader takes the whole file anyway (`read_whole`: the sentiment
  scorer reading a sentence-table shard); elsewhere it would mean reading every shard once
  more, so it stays in `_meta.json` for `sha256sum`.
How to rebuild (`rebuild_hint`): in a resumable folder (it has `_plan.json`) delete the
shard and re-run the same command into the same --out, which rebuilds only that shard;
otherwise delete the folder and re-run. Folders written before the entries existed
(no `shards` in `_meta.json`) still load, with the footer check and a warning that their
counts cannot be verified: a cache costs GPU hours, so refusing them would cost more than
the check is worth.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayapp import storage
from rayapp.errors import DataError

log = logging.getLogger(__name__)

META = "_meta.json"
PLAN = "_plan.json"


def shard_name(i: int, sub: int | None = None) -> str:
    """`part-00007.parquet`; with `sub`, the sub-shard `part-00007-00002.parquet` (chunk
    `sub` of input `i`)."""
    return f"part-{i:05d}.parquet" if sub is None else f"part-{i:05d}-{sub:05d}.parquet"


def _entry(data: bytes, rows: int) -> dict:
    return {"rows": rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_table(uri: str, table: pa.Table) -> dict:
    """Write one shard whole (see module docstring), so a file that exists is complete;
    returns its `_meta.json` entry (`rows`, `bytes`, `sha256`)."""
    sink = io.BytesIO()
    pq.write_table(table, sink, write_page_checksum=True)
    data = sink.getvalue()
    storage.write_bytes(uri, data)
    return _entry(data, table.num_rows)


def describe(uri: str) -> dict:
    """The `_meta.json` entry of a shard that exists, read whole (a shard an earlier run of a
    resumed stage wrote)."""
    data = storage.read_bytes(uri)
    with _damage(uri):
        rows = pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
    return _entry(data, rows)


def write_meta(out_uri: str, meta: dict, written: dict[str, dict] | None = None) -> dict:
    """Write `_meta.json`, last: after it the folder is finished. `meta["files"]` lists
    the shard names in read order; `written` maps names to the entries `write_table`
    returned, and a listed shard without one is described by reading it. Returns what it
    wrote (`meta` with `shards`)."""
    if not isinstance(meta.get("files"), list):
        raise ValueError("_meta.json must list the folder's shards under 'files'")
    written = written or {}
    entries = {name: written.get(name) or describe(storage.join(out_uri, name)) for name in meta["files"]}
    meta = {**meta, "shards": entries}
    storage.write_text(storage.join(out_uri, META), json.dumps(meta, indent=2, default=str))
    return meta


def read_meta(out_uri: str) -> dict | None:
    """The folder's `_meta.json`, or None when it has none (not finished, or not ours)."""
    uri = storage.join(out_uri, META)
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else None


def require_meta(out_uri: str) -> dict:
    """`_meta.json` of a finished data folder; DataError naming the folder otherwise."""
    meta = read_meta(out_uri)
    if meta is None:
        raise DataError(f"{out_uri} has no {META}: it is not a finished rayapp data folder; "
                        "re-run the stage that builds it")
    return meta


def shard_uris(out_uri: str) -> list[str]:
    """The URIs of a finished folder's shards, in read order (from its `_meta.json`), each
    checked against its entry there (module docstring, "Integrity")."""
    meta = require_meta(out_uri)
    files = meta.get("files")
    if not files:
        raise DataError(f"{storage.join(out_uri, META)} lists no shard files ('files'); "
                        "re-run the stage that builds the folder")
    entries = meta.get("shards")
    if entries is None:
        log.warning("%s was written before %s recorded each shard's rows and checksum: its shards are "
                    "checked for readability only; rebuild it to have them verified", out_uri, META)
    uris = [storage.join(out_uri, name) for name in files]
    for name, uri in zip(files, uris):
        if entries is not None and name not in entries:
            raise DataError(f"{storage.join(out_uri, META)} lists {name} under 'files' but not under 'shards'; "
                            f"{rebuild_hint(uri)}")
        _check_shard(uri, None if entries is None else entries[name])
    return uris


def _check_shard(uri: str, entry: dict | None) -> None:
    """A listed shard exists, has the recorded size and its footer the recorded row count."""
    fs, path = storage.filesystem(uri)
    with _damage(uri), fs.open_input_file(path) as f:
        size, rows = f.size(), pq.ParquetFile(f).metadata.num_rows
    for what, found in (("rows", rows), ("bytes", size)):
        if entry is not None and found != entry[what]:
            raise DataError(f"{uri} holds {found} {what} but {META} lists {entry[what]}: the shard is damaged "
                            f"or from another build; {rebuild_hint(uri)}")


def rebuild_hint(uri: str) -> str:
    """How to rebuild the shard `uri` (module docstring, "Integrity")."""
    folder = uri.rsplit("/", 1)[0]
    if storage.exists(storage.join(folder, PLAN)):
        return (f"delete {uri} and re-run the command that built {folder} with the same --out "
                "(it rebuilds only the missing shards)")
    return f"delete {folder} and re-run the command that built it"


@contextmanager
def _damage(uri: str) -> Iterator[None]:
    """A pyarrow failure reading shard `uri` inside the block -> one DataError naming it."""
    try:
        yield
    except (pa.ArrowException, OSError) as e:  # OSError: a missing file, a page CRC mismatch
        raise DataError(f"cannot read {uri} ({str(e).splitlines()[0]}): the shard is missing, "
                        f"damaged or unreadable; {rebuild_hint(uri)}") from None


@contextmanager
def open_shard(uri: str) -> Iterator[pq.ParquetFile]:
    """A shard to read rows from: parquet verifies every page's CRC32 as it decodes it, and
    any failure reading it inside the block is one DataError naming the shard."""
    fs, path = storage.filesystem(uri)
    with _damage(uri), fs.open_input_file(path) as f:
        yield pq.ParquetFile(f, page_checksum_verification=True)


def read_whole(uri: str, entry: dict | None, columns: list[str] | None = None) -> pa.Table:
    """A whole shard, its bytes checked against the sha256 of its `_meta.json` entry
    (None: a folder from before the entries; pages are still CRC-checked)."""
    data = storage.read_bytes(uri)
    if entry is not None and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise DataError(f"{uri} does not match the sha256 {META} records for it: the shard is damaged "
                        f"or from another build; {rebuild_hint(uri)}")
    with _damage(uri):
        return pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=True).read(columns)


def begin(out_uri: str, plan: dict, what: str, done: Callable[[str], set[str]] | None = None,
          outputs: tuple[str, ...] = (".parquet",)) -> set[str]:
    """Start or resume a resumable stage in `out_uri`; returns the names of the shards that
    already exist. Refuses to add shards to a folder whose shards were built with another
    plan, or to a folder of files that are not such a build. (A plan with no shard written
    yet is replaced: nothing would mix, and a failed first try can be fixed in place.)

    A stage whose unit of work is not a parquet shard in `out_uri` (a split folder of
    `rayapp.data.backtranslate`) passes `done`, which names the units that exist (default
    `finished`), and `outputs`, the suffixes of the files it writes."""
    done = done or finished
    storage.require_writable(out_uri, "--out")  # before any work: one line naming the flag, not a failure in a task
    uri = storage.join(out_uri, PLAN)
    plan = json.loads(json.dumps(plan, default=str))  # compared as it reads back
    if storage.exists(uri):
        old = json.loads(storage.read_text(uri))
        changed = sorted(k for k in set(plan) | set(old) if old.get(k) != plan.get(k))
        if changed and done(out_uri):
            raise DataError(f"{out_uri} holds a {what} built with other settings ({', '.join(changed)} "
                            "differ); resume with the same settings, or write to a new folder")
    elif storage.exists(out_uri) and any(f.endswith((*outputs, META)) for f in storage.list_files(out_uri)):
        raise DataError(f"{out_uri} already holds {' or '.join(s.lstrip('.') for s in outputs)} files or {META} "
                        f"but no {PLAN}, so it is not a resumable {what}; write to an empty or new folder")
    storage.makedirs(out_uri)
    storage.write_text(uri, json.dumps(plan, indent=2))
    return done(out_uri)


def remove(out_uri: str, names) -> None:
    """Delete the named files of a folder (shards a stage found worthless)."""
    fs, root = storage.filesystem(out_uri)
    for name in names:
        fs.delete_file(f"{root}/{name}")


def finished(out_uri: str) -> set[str]:
    """Names of the shards (parquet files) directly in `out_uri` (not in sub-folders)."""
    fs, root = storage.filesystem(out_uri)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return {os.path.basename(i.path) for i in infos
            if i.type == pafs.FileType.File and i.path.endswith(".parquet")}
