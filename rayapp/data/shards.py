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
"""
from __future__ import annotations

import io
import json
import os

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayapp import storage
from rayapp.errors import DataError

META = "_meta.json"
PLAN = "_plan.json"


def shard_name(i: int, sub: int | None = None) -> str:
    """`part-00007.parquet`; with `sub`, the sub-shard `part-00007-00002.parquet` (chunk
    `sub` of input `i`)."""
    return f"part-{i:05d}.parquet" if sub is None else f"part-{i:05d}-{sub:05d}.parquet"


def write_table(uri: str, table: pa.Table) -> None:
    """Write one shard whole (see module docstring), so a file that exists is complete."""
    sink = io.BytesIO()
    pq.write_table(table, sink)
    storage.write_bytes(uri, sink.getvalue())


def write_meta(out_uri: str, meta: dict) -> None:
    """Write `_meta.json`, last: after it the folder is finished. `meta["files"]` lists
    the shard names in read order."""
    if not isinstance(meta.get("files"), list):
        raise ValueError("_meta.json must list the folder's shards under 'files'")
    storage.write_text(storage.join(out_uri, META), json.dumps(meta, indent=2, default=str))


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
    """The URIs of a finished folder's shards, in read order (from its `_meta.json`)."""
    files = require_meta(out_uri).get("files")
    if not files:
        raise DataError(f"{storage.join(out_uri, META)} lists no shard files ('files'); "
                        "re-run the stage that builds the folder")
    return [storage.join(out_uri, name) for name in files]


def begin(out_uri: str, plan: dict, what: str) -> set[str]:
    """Start or resume a resumable stage in `out_uri`; returns the names of the shards that
    already exist. Refuses to add shards to a folder whose shards were built with another
    plan, or to a folder of files that are not such a build. (A plan with no shard written
    yet is replaced: nothing would mix, and a failed first try can be fixed in place.)"""
    uri = storage.join(out_uri, PLAN)
    plan = json.loads(json.dumps(plan, default=str))  # compared as it reads back
    if storage.exists(uri):
        old = json.loads(storage.read_text(uri))
        changed = sorted(k for k in set(plan) | set(old) if old.get(k) != plan.get(k))
        if changed and finished(out_uri):
            raise DataError(f"{out_uri} holds a {what} built with other settings ({', '.join(changed)} "
                            "differ); resume with the same settings, or write to a new folder")
    elif storage.exists(out_uri) and any(f.endswith((".parquet", META)) for f in storage.list_files(out_uri)):
        raise DataError(f"{out_uri} already holds parquet files or {META} but no {PLAN}, so it is not "
                        f"a resumable {what}; write to an empty or new folder")
    storage.makedirs(out_uri)
    storage.write_text(uri, json.dumps(plan, indent=2))
    return finished(out_uri)


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
