"""rayapp.storage on local paths, file:// URIs and a moto S3 server."""
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


def test_jsonl_append_and_read(root):
    log = storage.join(root, "logs", "metrics.jsonl")
    for step in range(3):
        storage.append_jsonl(log, {"step": step, "loss": 1.0 / (step + 1)})
    assert storage.read_jsonl(log) == [{"loss": 1.0, "step": 0}, {"loss": 0.5, "step": 1},
                                       {"loss": 1 / 3, "step": 2}]


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"a": 1}\nnot json\n')
    with pytest.raises(DataError, match=r"m.jsonl line 2 is not JSON"):
        storage.read_jsonl(str(tmp_path / "m.jsonl"))


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
