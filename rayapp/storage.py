"""URIs everywhere: one small API over local paths and `s3://bucket/prefix`.

Every stage reads and writes URIs so it can run alone, on a laptop or on a cluster whose
workers share only object storage. Everything goes through `pyarrow.fs`, the same
filesystem layer Ray Data uses, so a stage hands `filesystem(uri)` straight to
`ray.data.read_*`/`write_*` and one code path serves local disks, AWS S3 and
S3-compatible servers (MinIO, the moto server in the tests).

S3 honours `AWS_ENDPOINT_URL_S3`/`AWS_ENDPOINT_URL` (S3-compatible servers) and
`AWS_REGION`/`AWS_DEFAULT_REGION` (else the bucket's own region is looked up once).
Buckets are never created implicitly: a typo in a bucket name should fail loudly, not
litter the account.

An endpoint that does not answer fails fast: the first use of a bucket in a process asks it
once with short timeouts and two attempts (`_check_reachable`), so an unreachable or silent
endpoint is one DataError naming the URI and the endpoint within seconds, instead of ten
attempts with backoff (90 s) and a traceback. The filesystem handed to the work keeps its
ten attempts: past that first answer a failure is a fault of a long run (throttling, a
reset) that retrying survives.

Output locations are checked before any work starts (`require_writable`): the folder is
created and a probe file written and removed in it, so a path under a file, a read-only
folder or a bucket that refuses writes is one error naming the config key, not a failure
after training.

Credentials are never captured: the S3 filesystem handed to Ray pickles with its endpoint,
region and retry policy only, and every process that unpickles it (a Ray Data task, a Ray
Train worker on another node, hours later) asks the default AWS credential chain itself
(environment, ~/.aws, the node's instance profile), so temporary credentials are refreshed
where they are used instead of expiring inside a pickled copy of the driver's.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import tempfile
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from rayapp import env
from rayapp.errors import DataError


def is_remote(uri: str) -> bool:
    """True for URIs with a scheme other than `file://` (s3://, gs://, ...)."""
    return "://" in uri and not uri.startswith("file://")


S3_ATTEMPTS = 10  # AWS "standard" retries with backoff: throttling (503 SlowDown) and resets over a long run
# the first request to a bucket: a silent endpoint costs PROBE_ATTEMPTS x PROBE_REQUEST_S (+ <1 s backoff)
PROBE_CONNECT_S, PROBE_REQUEST_S, PROBE_ATTEMPTS = 2.0, 4.0, 2


def _s3_from_options(options: dict[str, Any]) -> "S3FileSystem":
    return S3FileSystem(**options)


class S3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem with rayapp's retry policy, pickled by its `options` only.

    pyarrow pickles neither the retry strategy (an unpickled copy would fall back to 3
    attempts) nor anything but what it was built with, so it is built without keys and
    rebuilt from the same `options` wherever it is unpickled."""

    def __init__(self, **options: Any):
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS), **options)
        self.options = options

    def __reduce__(self):
        return _s3_from_options, (self.options,)


def _s3_options(endpoint: str | None, region: str | None) -> dict[str, Any]:
    options: dict[str, Any] = {"region": region}
    if endpoint:
        parsed = urlparse(endpoint)
        options.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
    return options


@lru_cache(maxsize=None)
def _s3(endpoint: str | None, region: str | None) -> S3FileSystem:
    # cached per settings: building an S3 client is not free
    return S3FileSystem(**_s3_options(endpoint, region))


_REACHED: set[tuple[str, str | None, str | None]] = set()  # (bucket, endpoint, region) that answered


def _check_reachable(uri: str, bucket: str, endpoint: str | None, region: str | None) -> None:
    """Raise a DataError naming `uri` and the endpoint when the endpoint does not answer
    (module docstring); asked once per bucket and settings in a process, again after a
    failure. Only network failures count: what the endpoint answers (no such bucket, access
    denied) is left to the request that needs it, which says it better."""
    if (bucket, endpoint, region) in _REACHED:
        return
    probe = pafs.S3FileSystem(**_s3_options(endpoint, region), connect_timeout=PROBE_CONNECT_S,
                              request_timeout=PROBE_REQUEST_S,
                              retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=PROBE_ATTEMPTS))
    try:
        probe.get_file_info(bucket)
    except OSError as e:
        if "NETWORK_CONNECTION" in str(e):
            where = endpoint or f"AWS S3 in {region or 'us-east-1'} (no AWS_ENDPOINT_URL set)"
            raise DataError(f"cannot reach {uri}: the S3 endpoint {where} does not answer ({_one_line(e)}); "
                            "check the endpoint (AWS_ENDPOINT_URL), the network and the bucket name") from None
    _REACHED.add((bucket, endpoint, region))


def _one_line(e: Exception) -> str:
    """pyarrow's S3 error on one line: its curl details where it has them ("Failed to connect
    to HOST:PORT"), else what follows its context prefix."""
    text = " ".join(str(e).split())
    return text.split("Details: ", 1)[1] if "Details: " in text else text.split("AWS Error ", 1)[-1]


@lru_cache(maxsize=None)
def _bucket_region(bucket: str) -> str | None:
    """The bucket's region, so workers on any node talk to it directly (no redirect)."""
    try:
        return pafs.resolve_s3_region(bucket)
    except (OSError, ValueError):  # no such bucket, no network: the first real request says so
        return None


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """`(pyarrow filesystem, path inside it)` for a local path, `file://` or `s3://` URI."""
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        path = uri[len("s3://"):].rstrip("/")
        if not path:
            raise DataError(f"{uri!r} names no bucket; use s3://BUCKET/PREFIX")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        bucket = path.split("/", 1)[0]
        if region is None and endpoint is None:
            region = _bucket_region(bucket)
        _check_reachable(uri, bucket, endpoint, region)
        return _s3(endpoint, region), path
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


def check_bucket(uri: str) -> None:
    """Raise a DataError naming the bucket when an s3:// URI's bucket does not exist."""
    if uri.startswith("s3://"):
        bucket = uri[len("s3://"):].split("/", 1)[0]
        if _info(f"s3://{bucket}").type == pafs.FileType.NotFound:
            raise DataError(f"S3 bucket {bucket!r} of {uri} does not exist; "
                            f"create it first (aws s3 mb s3://{bucket}) or fix the URI")


def _missing(uri: str) -> DataError:
    check_bucket(uri)
    return DataError(f"{uri} does not exist; check the path")


def exists(uri: str) -> bool:
    return _info(uri).type != pafs.FileType.NotFound


def is_file(uri: str) -> bool:
    return _info(uri).type == pafs.FileType.File


def makedirs(uri: str) -> None:
    """Create a directory and its parents (S3: only checks the bucket; prefixes need no creation)."""
    check_bucket(uri)
    if not is_remote(uri):
        fs, path = filesystem(uri)
        try:
            fs.create_dir(path, recursive=True)
        except OSError as e:
            raise DataError(f"cannot create the folder {uri}: {_local_fault(path, e)}") from None


def _local_fault(path: str, err: OSError) -> str:
    """Why the local folder `path` cannot be created or written, and what to do, in words."""
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder; move it away or choose another location"
    if err.errno == errno.EROFS:
        return f"{existing} is on a read-only file system; choose another location"
    if isinstance(err, PermissionError):  # also an immutable folder (chattr +i), which root cannot write either
        return (f"{existing} is not writable by this user ({err.strerror or 'permission denied'}); "
                "make it writable or choose another location")
    return f"{' '.join(str(err).split())}; choose another location"


def require_writable(uri: str, key: str, subdirs: tuple[str, ...] = ()) -> None:
    """Refuse an output location that cannot be written, before any work starts: create the
    folder `uri` and each of its `subdirs`, and write and remove a probe file in each (S3: PUT
    and DELETE a probe object). The DataError names the config key (`output_dir`) or flag
    (`--out`) and the fix."""
    given = f"{key} {uri}" if key.startswith("-") else f"{key}={uri}"
    for folder in (uri, *(join(uri, sub) for sub in subdirs)):
        try:
            makedirs(folder)  # S3: the endpoint answers and the bucket exists
            fs, path = filesystem(folder)
            probe = f"{path.rstrip('/')}/.rayapp-write-probe-{uuid.uuid4().hex}"
            with fs.open_output_stream(probe):
                pass
            fs.delete_file(probe)
        except DataError as e:
            raise DataError(f"{given}: {e}") from None
        except OSError as e:
            why = (f"{_one_line(e)}; check that the credentials may write there (s3:PutObject, "
                   "s3:DeleteObject) or choose another location") if is_remote(folder) else _local_fault(path, e)
            raise DataError(f"{given} is not writable: {why}") from None


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
        check_bucket(uri)
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


def remove(uri: str) -> None:
    """Delete the directory or file at `uri`, if there is one."""
    kind = _info(uri).type
    fs, path = filesystem(uri)
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


def local_copy(uri: str) -> str:
    """A node-local copy of the remote directory `uri` (an `s3://` model, a mirrored
    dataset) under `$RAYAPP_CACHE` (default `~/.cache/rayapp`), downloaded once per node.

    Several Ray workers on one node ask at the same moment: under a file lock the first
    copies into a temporary sibling and renames it into place, the others wait on the lock
    and find it there. A download killed halfway leaves a temp dir, never half a model at
    the final path. The copy is keyed by URI: write new weights to a new URI."""
    if not is_remote(uri):
        return filesystem(uri)[1]
    root = Path(os.environ.get("RAYAPP_CACHE") or Path.home() / ".cache" / "rayapp") / "remote"
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    local = root / f"{name}-{hashlib.sha1(uri.encode()).hexdigest()[:12]}"
    if local.is_dir():
        return str(local)
    root.mkdir(parents=True, exist_ok=True)
    with open(f"{local}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not local.is_dir():
            tmp = tempfile.mkdtemp(dir=root, prefix=f"{local.name}.tmp-")
            try:
                copy_dir(uri, tmp)
                os.rename(tmp, local)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return str(local)


def _fingerprint(path: str, marker: str | None = None) -> list | None:
    """What a node sees at a local path: None if nothing; a folder's probe marker (a file
    the driver just wrote into it) or, where it could not write one, its entry names; a
    file's size and mtime. Equal on every node that shares the path."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    if os.path.isdir(path):
        if marker is not None:
            return ["dir", os.path.exists(os.path.join(path, marker))]
        return ["dir", sorted(os.listdir(path))[:1000]]
    return ["file", info.st_size, info.st_mtime_ns]


def _fingerprints(paths: list[tuple[str, str | None]]) -> list:
    return [_fingerprint(path, marker) for path, marker in paths]


def _place_marker(path: str, marker: str) -> str | None:
    """Write the probe marker into a local folder; None where the folder is read-only."""
    if not os.path.isdir(path):
        return None
    try:
        with open(os.path.join(path, marker), "w"):
            return marker
    except OSError:
        return None


def _shared_fix(key: str) -> str:
    return (f"put it on storage every node reads (s3://BUCKET/PREFIX, or a filesystem mounted on every "
            f"node) and pass {key}=<that URI>")


_SEEN_SHARED: set[tuple[str, str]] = set()  # (node, path) pairs found shared: a sweep's trials ask once


def require_shared(paths: dict[str, str | None], timeout: float = 120.0) -> None:
    """Refuse local paths that the other nodes of the Ray cluster would not see.

    `paths` maps a config key to its value (None and `s3://` URIs pass). On one node (or
    with no cluster to join: the embedded one is this machine) every local path is fine. On a
    cluster each alive node is asked, by a zero-CPU task pinned to it, what it sees at each
    local path; a node that sees nothing, or other content (its own disk, not a shared
    filesystem), makes this a DataError naming the key, the path and the fix, raised on the
    driver before any work starts. A driver node without CPUs and no other node yet (a cluster
    scaling up from zero) cannot ask anyone, so its local paths are refused: the work will run
    on nodes that do not exist yet. Outputs are checked once the driver has created them."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    local = {key: filesystem(uri)[1] for key, uri in paths.items() if uri and not is_remote(uri)}
    if not local:
        return
    if not ray.is_initialized():
        if not os.environ.get("RAY_ADDRESS"):  # no cluster named: Ray will start one on this machine
            return
        env.start_ray()  # a job's driver (`ray job submit` sets RAY_ADDRESS): connect now to ask its nodes
    here = ray.get_runtime_context().get_node_id()
    alive = [n for n in ray.nodes() if n["Alive"]]
    others = [n["NodeID"] for n in alive if n["NodeID"] != here]
    if not others:
        if any(n["NodeID"] == here and (n["Resources"].get("CPU") or n["Resources"].get("GPU")) for n in alive):
            return
        key = next(iter(local))
        raise DataError(f"{key}={paths[key]} is a local path, but this Ray driver's node runs no tasks and no "
                        f"other node has joined yet: the work will run on nodes that cannot see it; {_shared_fix(key)}")
    others = [node for node in others if any((node, path) not in _SEEN_SHARED for path in local.values())]
    if not others:  # every node was asked about these paths before, by this process
        return
    name = f".rayapp-probe-{uuid.uuid4().hex}"
    probes = [(path, _place_marker(path, name)) for path in local.values()]
    try:
        mine = _fingerprints(probes)
        task = ray.remote(num_cpus=0, max_retries=0)(_fingerprints)
        refs = {node: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(probes)
                for node in others}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
        for node, ref in refs.items():
            if ref not in ready:  # a node that does not answer (dying, still starting) is not judged
                ray.cancel(ref, force=True)
                continue
            for (key, path), seen, want in zip(local.items(), ray.get(ref), mine):
                if seen != want:
                    raise DataError(f"{key}={paths[key]} is a path only the driver's node has: Ray node "
                                    f"{node[:12]} sees {'nothing' if seen is None else 'other content'} at "
                                    f"{path}; {_shared_fix(key)}")
            _SEEN_SHARED.update((node, path) for path in local.values())
    finally:
        for path, marker in probes:
            if marker is not None:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(path, marker))


def parse_hf_uri(uri: str) -> tuple[str, str | None, str]:
    """`hf://NAME/CONFIG?split=S` or `hf://ORG/NAME?config=C&split=S` -> (name, config, split).

    Two path parts mean NAME/CONFIG (`hf://glue/sst2`); with `config=` in the
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
