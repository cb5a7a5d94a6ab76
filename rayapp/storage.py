"""URIs everywhere: one small API over local paths and `s3://bucket/prefix`.

Every stage reads and writes URIs so it can run alone, on a laptop or on a cluster whose
workers share only object storage. Everything goes through `pyarrow.fs`, the same
filesystem layer Ray Data uses, so a stage hands `filesystem(uri)` straight to
`ray.data.read_*`/`write_*` and one code path serves local disks, AWS S3 and
S3-compatible servers (MinIO, the moto server in the tests).

S3 honours `AWS_ENDPOINT_URL_S3`/`AWS_ENDPOINT_URL` (pyarrow does not read them itself)
plus the usual AWS credential and region variables. Buckets are never created
implicitly: a typo in a bucket name should fail loudly, not litter the account.

Inside Ray tasks, use a filesystem resolved on the driver: `filesystem(uri)` reads the
environment of the process that calls it, and a worker's environment need not have the
driver's AWS_* variables (a cluster started before they were set, another node). The
returned S3 filesystem pickles with the driver's endpoint and keys.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qs, urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from rayapp.errors import DataError


def is_remote(uri: str) -> bool:
    """True for URIs with a scheme other than `file://` (s3://, gs://, ...)."""
    return "://" in uri and not uri.startswith("file://")


@lru_cache(maxsize=None)
def _s3(endpoint: str | None, region: str | None, keys: tuple[str | None, ...]) -> pafs.S3FileSystem:
    # Cached per settings: building an S3 client is not free. The instance pickles with
    # its settings, so Ray workers (whose environment may predate the driver's AWS_*
    # variables) reach the same endpoint with the same keys; with no keys in the
    # environment each worker resolves its own (instance profile, ~/.aws).
    access_key, secret_key, session_token = keys
    kwargs: dict[str, Any] = {"region": region}
    if access_key and secret_key:
        kwargs.update(access_key=access_key, secret_key=secret_key, session_token=session_token)
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """`(pyarrow filesystem, path inside it)` for a local path, `file://` or `s3://` URI."""
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        path = uri[len("s3://"):].rstrip("/")
        if not path:
            raise DataError(f"{uri!r} names no bucket; use s3://BUCKET/PREFIX")
        keys = tuple(os.environ.get(k) for k in
                     ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"))
        return _s3(endpoint, region, keys), path
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    elif is_remote(uri):
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, OSError) as e:  # ArrowInvalid: unknown scheme
            raise DataError(f"cannot open {uri!r}: {e}; use a local path or s3://BUCKET/PREFIX") from e
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    """`uri/part/part`, with `/` for remote URIs and the OS separator for local paths."""
    if is_remote(uri):
        return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(uri, *parts)


def _info(uri: str) -> pafs.FileInfo:
    fs, path = filesystem(uri)
    try:
        return fs.get_file_info(path)
    except OSError as e:  # S3: bad credentials, unreachable endpoint, no such bucket
        raise DataError(f"cannot reach {uri}: {e}") from e


def _check_bucket(uri: str) -> None:
    """Raise a DataError naming the bucket when an s3:// URI's bucket does not exist."""
    if uri.startswith("s3://"):
        bucket = uri[len("s3://"):].split("/", 1)[0]
        if _info(f"s3://{bucket}").type == pafs.FileType.NotFound:
            raise DataError(f"S3 bucket {bucket!r} of {uri} does not exist; "
                            f"create it first (aws s3 mb s3://{bucket}) or fix the URI")


def _missing(uri: str) -> DataError:
    _check_bucket(uri)
    return DataError(f"{uri} does not exist; check the path")


def exists(uri: str) -> bool:
    return _info(uri).type != pafs.FileType.NotFound


def makedirs(uri: str) -> None:
    """Create a directory and its parents (S3: only checks the bucket; prefixes need no creation)."""
    _check_bucket(uri)
    if not is_remote(uri):
        fs, path = filesystem(uri)
        fs.create_dir(path, recursive=True)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise _missing(uri) from None


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file. Locally via a temporary file and rename, so readers never see
    half a file; an S3 PUT is atomic already."""
    if is_remote(uri):
        _check_bucket(uri)
    else:
        makedirs(_parent(uri))
    fs, path = filesystem(uri)
    target = path if is_remote(uri) else path + ".tmp"
    with fs.open_output_stream(target) as f:
        f.write(data)
    if target != path:
        fs.move(target, path)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def _parent(local_uri: str) -> str:
    return os.path.dirname(filesystem(local_uri)[1])


def append_jsonl(uri: str, record: dict) -> None:
    """Append one JSON line. Locally a single `write` in append mode (atomic for lines
    shorter than the pipe buffer, so concurrent writers interleave whole lines). S3 has no
    append: read, add the line, write back; one writer per file, as for metric logs."""
    line = json.dumps(record, sort_keys=True) + "\n"
    if is_remote(uri):
        old = read_bytes(uri) if exists(uri) else b""
        write_bytes(uri, old + line.encode("utf-8"))
        return
    makedirs(_parent(uri))
    with open(filesystem(uri)[1], "a", encoding="utf-8") as f:
        f.write(line)


def read_jsonl(uri: str) -> list[dict]:
    records = []
    for n, line in enumerate(read_text(uri).splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{uri} line {n} is not JSON ({e}); fix or remove that line") from e
    return records


def list_files(uri: str, suffix: str | None = None) -> list[str]:
    """Files below `uri` (recursively; `uri` itself if it is a file) as URIs of the same
    kind, sorted so every reader sees the corpus in one fixed order."""
    info = _info(uri)
    if info.type == pafs.FileType.NotFound:
        raise _missing(uri)
    if info.type == pafs.FileType.File:
        files = [uri]
    else:
        fs, root = filesystem(uri)
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        files = [join(uri, os.path.relpath(i.path, root).replace(os.sep, "/"))
                 for i in infos if i.type == pafs.FileType.File]
    return sorted(f for f in files if suffix is None or f.endswith(suffix))


def copy_dir(src_uri: str, dst_uri: str) -> None:
    """Copy the tree below `src_uri` into `dst_uri` (either local or remote; an HF model
    dir, a checkpoint), creating local destinations as needed."""
    kind = _info(src_uri).type
    if kind == pafs.FileType.NotFound:
        raise _missing(src_uri)
    if kind != pafs.FileType.Directory:
        raise DataError(f"{src_uri} is a file; give the directory that holds it")
    makedirs(dst_uri)
    src_fs, src = filesystem(src_uri)
    dst_fs, dst = filesystem(dst_uri)
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)


def parse_hf_uri(uri: str) -> tuple[str, str | None, str]:
    """`hf://NAME/CONFIG?split=S` or `hf://ORG/NAME?config=C&split=S` -> (name, config, split).

    Two path parts mean NAME/CONFIG (`hf://wikipedia/20220301.en`); with `config=` in the
    query the whole path is the name, for org-scoped datasets."""
    parsed = urlparse(uri)
    query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    parts = [p for p in (parsed.netloc + parsed.path).split("/") if p]
    if not parts or len(parts) > (2 if "config" not in query else 3):
        raise DataError(f"cannot parse {uri!r}; use hf://NAME, hf://NAME/CONFIG or "
                        "hf://ORG/NAME?config=CONFIG, optionally with &split=SPLIT")
    if "config" in query:
        return "/".join(parts), query["config"], query.get("split", "train")
    return parts[0], parts[1] if len(parts) == 2 else None, query.get("split", "train")
