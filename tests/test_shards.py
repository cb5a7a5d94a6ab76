"""The one shard writer and `_meta.json` convention of the data stages."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayapp.data import shards
from rayapp.errors import DataError


def test_shard_names():
    assert shards.shard_name(7) == "part-00007.parquet"
    assert shards.shard_name(3, 12) == "part-00003-00012.parquet"


def test_write_table_leaves_only_the_whole_file(tmp_path):
    table = pa.table({"x": list(range(100)), "y": ["a"] * 100})
    shards.write_table(str(tmp_path / "deep" / "part-00000.parquet"), table)
    assert pq.read_table(tmp_path / "deep" / "part-00000.parquet").equals(table)
    assert [p.name for p in (tmp_path / "deep").iterdir()] == ["part-00000.parquet"]  # no temp file left


def test_meta_is_required_by_consumers_and_lists_the_shards(tmp_path):
    folder = tmp_path / "examples"
    folder.mkdir()
    pq.write_table(pa.table({"x": [1]}), folder / "part-00000.parquet")
    assert shards.read_meta(str(folder)) is None
    with pytest.raises(DataError, match=rf"{folder} has no _meta.json: it is not a finished rayapp data "
                                        r"folder; re-run the stage that builds it"):
        shards.shard_uris(str(folder))
    with pytest.raises(ValueError, match="must list the folder's shards under 'files'"):
        shards.write_meta(str(folder), {"examples": 1})
    pq.write_table(pa.table({"x": [2, 3]}), folder / "part-00001.parquet")
    shards.write_meta(str(folder), {"files": ["part-00001.parquet", "part-00000.parquet"], "examples": 1})
    meta = json.loads((folder / "_meta.json").read_text())
    assert meta["examples"] == 1 and [e["rows"] for e in meta["shards"].values()] == [2, 1]
    assert shards.shard_uris(str(folder)) == [str(folder / "part-00001.parquet"), str(folder / "part-00000.parquet")]


def test_begin_resumes_the_same_plan_and_refuses_another(tmp_path):
    out = str(tmp_path / "out")
    assert shards.begin(out, {"k": 1, "inputs": ("a", 2)}, "test build") == set()
    assert json.loads((tmp_path / "out" / "_plan.json").read_text()) == {"k": 1, "inputs": ["a", 2]}
    # a plan with nothing written yet may change (a failed first try fixed in place)
    assert shards.begin(out, {"k": 2, "inputs": ("a", 2)}, "test build") == set()

    shards.write_table(f"{out}/part-00000.parquet", pa.table({"x": [1]}))
    (tmp_path / "out" / "part-00001.parquet.tmp").write_bytes(b"half")  # a crashed write
    (tmp_path / "out" / "sub").mkdir()
    pq.write_table(pa.table({"x": [1]}), tmp_path / "out" / "sub" / "part-00009.parquet")
    assert shards.begin(out, {"k": 2, "inputs": ["a", 2]}, "test build") == {"part-00000.parquet"}
    with pytest.raises(DataError, match=r"holds a test build built with other settings \(k differ\).*new folder"):
        shards.begin(out, {"k": 3, "inputs": ["a", 2]}, "test build")

    shards.remove(out, ["part-00000.parquet"])
    assert shards.finished(out) == set()


def test_begin_refuses_a_folder_of_other_files(tmp_path):
    pq.write_table(pa.table({"x": [1]}), tmp_path / "mine.parquet")
    with pytest.raises(DataError, match=r"already holds parquet files or _meta.json but no _plan.json"):
        shards.begin(str(tmp_path), {"k": 1}, "teacher cache")


def test_write_table_and_meta_on_s3(s3_server):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="shards")
    table = pa.table({"x": [1, 2, 3]})
    shards.write_table("s3://shards/out/part-00000.parquet", table)
    shards.write_meta("s3://shards/out", {"files": ["part-00000.parquet"]})
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="shards")["Contents"])
    assert keys == ["out/_meta.json", "out/part-00000.parquet"]
    assert shards.shard_uris("s3://shards/out") == ["s3://shards/out/part-00000.parquet"]
    assert shards.finished("s3://shards/out") == {"part-00000.parquet"}
