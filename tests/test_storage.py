"""rayapp.storage on local paths, file:// URIs and a moto S3 server."""
import os
import uuid

import boto3
import pyarrow.parquet as pq
import pytest

from rayapp import storage
from rayapp.errors import DataError


@pytest.fixture
def bucket(s3_server):
    name = f"st-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(params=["local", "file", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    if request.param == "file":
        return f"file://{tmp_path}"
    return request.getfixturevalue("bucket") + "/prefix"


def test_write_read_exists_list(root):
    storage.write_text(storage.join(root, "b", "two.txt"), "zwei")
    storage.write_text(storage.join(root, "a.json"), "{}")
    storage.write_bytes(storage.join(root, "b", "c", "three.bin"), b"\x00\xff")
    assert storage.read_text(storage.join(root, "b", "two.txt")) == "zwei"
    assert storage.read_bytes(storage.join(root, "b", "c", "three.bin")) == b"\x00\xff"
    assert storage.exists(storage.join(root, "b")) and not storage.exists(storage.join(root, "nope"))
    assert storage.list_files(root) == [storage.join(root, p) for p in ("a.json", "b/c/three.bin", "b/two.txt")]
    assert storage.list_files(root, suffix=".txt") == [storage.join(root, "b", "two.txt")]
    # a file lists as itself
    assert storage.list_files(storage.join(root, "a.json")) == [storage.join(root, "a.json")]
    storage.write_text(storage.join(root, "a.json"), "[]")  # overwrite replaces
    assert storage.read_text(storage.join(root, "a.json")) == "[]"


def test_missing_paths_are_data_errors(root):
    with pytest.raises(DataError, match=r"nope.txt does not exist"):
        storage.read_text(storage.join(root, "nope.txt"))
    with pytest.raises(DataError, match=r"nodir does not exist"):
        storage.list_files(storage.join(root, "nodir"))


def test_missing_bucket_is_named(s3_server):
    for action in (lambda: storage.read_text("s3://no-such-bucket/x.txt"),
                   lambda: storage.write_text("s3://no-such-bucket/x.txt", "x"),
                   lambda: storage.list_files("s3://no-such-bucket/data")):
        with pytest.raises(DataError, match=r"S3 bucket 'no-such-bucket' .* does not exist; create it first"):
            action()


def test_upload_download_roundtrip(bucket, tmp_path):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"layers": 2}')
    (src / "sub" / "weights.bin").write_bytes(bytes(range(256)))
    storage.copy_dir(str(src), bucket + "/ckpt/model")
    assert storage.list_files(bucket + "/ckpt") == [bucket + "/ckpt/model/config.json",
                                                   bucket + "/ckpt/model/sub/weights.bin"]
    storage.copy_dir(bucket + "/ckpt/model", str(tmp_path / "back"))
    assert (tmp_path / "back" / "config.json").read_text() == '{"layers": 2}'
    assert (tmp_path / "back" / "sub" / "weights.bin").read_bytes() == bytes(range(256))
    storage.copy_dir(bucket + "/ckpt/model", bucket + "/final")  # remote to remote
    assert storage.read_bytes(bucket + "/final/sub/weights.bin") == bytes(range(256))
    with pytest.raises(DataError, match=r"is a file; give the directory"):
        storage.copy_dir(bucket + "/ckpt/model/config.json", str(tmp_path / "x"))


def test_filesystem_feeds_pyarrow(bucket):
    import pyarrow as pa

    fs, path = storage.filesystem(bucket + "/t/x.parquet")
    pq.write_table(pa.table({"a": [1, 2]}), path, filesystem=fs)
    assert path == bucket[len("s3://"):] + "/t/x.parquet"
    assert pq.read_table(path, filesystem=fs).column("a").to_pylist() == [1, 2]


def test_join_and_unknown_scheme(tmp_path):
    assert storage.join("s3://b/p/", "x", "/y.txt") == "s3://b/p/x/y.txt"
    assert storage.join(str(tmp_path), "x", "y.txt") == str(tmp_path / "x" / "y.txt")
    with pytest.raises(DataError, match=r"cannot open 'nosuch://x'"):
        storage.filesystem("nosuch://x")


def test_s3_filesystem_pickles_without_credentials(bucket, monkeypatch):
    """A pickled filesystem (what Ray ships to every task and Train worker) carries the
    endpoint, region and retry policy, never keys: each process asks the default AWS
    credential chain itself, so temporary credentials are refreshed where they are used."""
    import pickle
    import subprocess
    import sys

    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-of-the-driver")
    storage._s3.cache_clear()
    storage.write_text(bucket + "/p/a.txt", "ok")
    fs, path = storage.filesystem(bucket + "/p/a.txt")
    blob = pickle.dumps(fs)
    for secret in (b"testing", b"session-token-of-the-driver"):
        assert secret not in blob
    copy = pickle.loads(blob)
    assert type(copy) is storage.S3FileSystem and copy.options == fs.options
    assert copy.region == "us-east-1"
    # a process with its own (different) keys reads through the unpickled filesystem
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "worker-key", "AWS_SECRET_ACCESS_KEY": "worker-secret"}
    env.pop("AWS_SESSION_TOKEN")
    code = ("import pickle, sys; fs = pickle.loads(sys.stdin.buffer.read()); "
            f"print(fs.open_input_stream({path!r}).read().decode())")
    out = subprocess.run([sys.executable, "-c", code], input=blob, env=env, capture_output=True, check=True)
    assert out.stdout.decode().strip() == "ok"
    storage._s3.cache_clear()


def test_local_copy_downloads_once_per_node(bucket, tmp_path, monkeypatch):
    """Four workers on one node ask for the same s3:// model at once: one download, and
    nobody sees a half-copied folder."""
    import threading

    monkeypatch.setenv("RAYAPP_CACHE", str(tmp_path / "cache"))
    for i in range(20):
        storage.write_bytes(f"{bucket}/model/shard-{i}.bin", bytes([i]) * 10_000)
    downloads, copy_dir = [], storage.copy_dir

    def counted(src, dst):
        downloads.append(dst)
        copy_dir(src, dst)

    monkeypatch.setattr(storage, "copy_dir", counted)
    start, results = threading.Barrier(4), []

    def worker():
        start.wait()
        local = storage.local_copy(bucket + "/model")
        results.append(sorted(os.listdir(local)))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(downloads) == 1
    assert results == [sorted(f"shard-{i}.bin" for i in range(20))] * 4
    assert not [p for p in os.listdir(tmp_path / "cache" / "remote") if ".tmp-" in p]
    assert storage.local_copy(str(tmp_path)) == str(tmp_path)  # local paths are already local
