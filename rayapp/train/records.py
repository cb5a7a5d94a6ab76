"""Run names and run records.

Every run writes one JSON record, `<output_dir>/records/<name>.json`, written whole (a local
temp file + rename, or one S3 PUT): concurrent runs (Tune trials) never share a file, so no
record is lost to a read-modify-write race. Readers gather the folder.
"""
from __future__ import annotations

import hashlib
import json

from rayapp import storage
from rayapp.config import to_dict
from rayapp.errors import DataError

RECORDS = "records"
# keys that do not change what a run computes: a re-submission that differs only in them resumes
_NOT_IDENTITY = ("name", "output_dir", "keep_steps")  # keep_steps: which models are copied out, not trained


def run_name(prefix: str, cfg) -> str:
    """`<prefix>-<hash of the config>`: the same config gives the same name, so a re-submitted
    job finds its run directory and Ray Train resumes it from its last checkpoint."""
    identity = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_IDENTITY}
    identity.get("engine", {}).pop("max_failures", None)
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{prefix}-{digest}"


def record_uri(output_dir: str, name: str) -> str:
    """Where run `name` of `output_dir` (a run's or a sweep's) keeps its record."""
    return storage.join(output_dir, RECORDS, f"{name}.json")


def write_record(output_dir: str, record: dict) -> str:
    uri = record_uri(output_dir, record["name"])
    storage.write_text(uri, json.dumps(record, indent=1, sort_keys=True, default=str))
    return uri


def read_records(uri: str) -> dict[str, dict]:
    """{file URI: record} of every record under `uri` (a run or sweep output dir, or its
    `records/` folder), in name order."""
    root = uri if uri.rstrip("/").rsplit("/", 1)[-1] == RECORDS else storage.join(uri, RECORDS)
    if not storage.exists(root):
        raise DataError(f"{uri} holds no run records ({root} does not exist); give a sweep or run output dir")
    records = {}
    for f in storage.list_files(root, suffix=".json"):
        try:
            records[f] = json.loads(storage.read_text(f))
        except json.JSONDecodeError as e:
            raise DataError(f"run record {f} is not JSON ({e}); remove it or re-run that run") from None
    if not records:
        raise DataError(f"{root} holds no run records (*.json); have any runs finished?")
    return records
