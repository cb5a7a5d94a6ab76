"""`rayapp predict`: an exported model labels tables of every supported shape on Ray Data,
with the labels and probabilities `classify` gives, ids that name the row, and per-shard
resume."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayapp import cli, storage
from rayapp.data.fewshot import load_lmbff
from rayapp.data.shards import META


def _cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = cli.main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def exported(fewshot_runs, tmp_path_factory) -> dict:
    """The prompt and classifier runs, exported (no ONNX: test_export checks it)."""
    found = {}
    for method in ("prompt", "classifier"):
        folder = str(tmp_path_factory.mktemp("predict-model") / method)
        code, _, err = _cli("export", fewshot_runs[method]["record"], "--out", folder, "onnx=false")
        assert code == 0, err
        found[method] = folder
    return found


def _read(out: str) -> pa.Table:
    meta = json.loads(storage.read_text(storage.join(out, META)))
    return pa.concat_tables([pq.read_table(pa.BufferReader(storage.read_bytes(storage.join(out, f))))
                             for f in meta["files"]])


@pytest.mark.parametrize("method", ["prompt", "classifier"])
def test_every_format_in_one_folder_gets_classify_s_labels_and_probabilities(exported, method, tmp_path):
    """TSV, CSV (a quoted field holding a newline, a comma and a quote), JSONL and parquet
    files in one folder, cut into shards of 7 rows: every row once, in order, its id
    FILE#ROW, and the label and probabilities `classify` gives the same texts."""
    from rayapp.ship.export import classify

    texts = [e.text_a for e in load_lmbff(None, "SST-2", k=16, seed=13).test[:40]]
    texts[3] = 'a "quoted" film,\nwith a line break in it .'  # crosses lines inside one CSV field
    root = tmp_path / "in"
    root.mkdir()
    (root / "a.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t1\n" for t in texts[10:20] if "\n" not in t))
    with open(root / "b.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "text"])
        w.writerows([["0", t] for t in texts[:10]])
    (root / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n\n" for t in texts[20:30]))
    pq.write_table(pa.table({"text": texts[30:40]}), root / "d.parquet", row_group_size=4)
    files = {"a.tsv": texts[10:20], "b.csv": texts[:10], "c.jsonl": texts[20:30], "d.parquet": texts[30:40]}

    out = tmp_path / "out"
    code, stdout, err = _cli("predict", exported[method], "--input", str(root), "--out", str(out),
                             "rows_per_shard=7", "tokens_per_batch=200", "num_actors=1")
    assert code == 0, err
    stats = json.loads(stdout[:stdout.rindex("}") + 1])
    assert stats["rows"] == stats["computed"] == 40 and stats["shards_written"] == 8  # 2 shards per file

    got = _read(str(out))
    want_ids = [f"{name}#{i}" for name, rows in files.items() for i in range(len(rows))]
    assert got["id"].to_pylist() == want_ids
    want = classify(exported[method], [t for rows in files.values() for t in rows])
    assert got["label"].to_pylist() == [w["label"] for w in want]
    probs = np.array(got["probs"].to_pylist())
    assert np.abs(probs - np.array([list(w["probs"].values()) for w in want])).max() < 1e-5
    meta = json.loads((out / META).read_text())
    assert meta["labels"] == ["0", "1"] and meta["rows"] == 40


def test_a_headerless_csv_by_position_an_id_column_and_a_resumed_shard(exported, s3_server, tmp_path, monkeypatch):
    """LM-BFF's own MR test file (headerless `label,sentence` CSV) read by position; an
    `hf://` dataset served from an s3:// asset mirror (a `save_to_disk` folder) with an id
    column, predicted into s3://; a deleted shard is the only one a re-run computes, and it
    comes back identical."""
    import uuid

    import boto3
    import datasets

    from rayapp.data import shards

    from rayapp.assets import fewshot_dir

    mr = os.path.join(fewshot_dir("k-shot"), "mr", "16-13", "test.csv")
    out = tmp_path / "mr"
    code, stdout, err = _cli("predict", exported["prompt"], "--input", mr, "--out", str(out), "--text-column", "1",
                             "header=false", "rows_per_shard=500", "num_actors=1")
    assert code == 0, err
    with open(mr, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    got = _read(str(out))
    assert got.num_rows == len(rows) and got["id"].to_pylist()[-1] == f"test.csv#{len(rows) - 1}"

    bucket = f"predict-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    saved = tmp_path / "saved"
    sentences = [r[1] for r in rows[:30]]
    datasets.Dataset.from_dict({"sentence": sentences, "uid": [f"u{i}" for i in range(30)]}).save_to_disk(str(saved))
    storage.copy_dir(str(saved), f"s3://{bucket}/mirror/datasets/user/reviews/train")
    monkeypatch.setenv("RAYAPP_ASSETS", f"s3://{bucket}/mirror")
    out = f"s3://{bucket}/out"
    args = ("predict", exported["prompt"], "--input", "hf://user/reviews?split=train", "--out", out,
            "--text-column", "sentence", "--id-column", "uid", "rows_per_shard=8", "num_actors=1")
    code, _, err = _cli(*args)
    assert code == 0, err
    first = _read(out)
    assert first["id"].to_pylist() == [f"u{i}" for i in range(30)]
    assert first["label"].to_pylist() == got["label"].to_pylist()[:30]

    shards.remove(out, ["part-00000-00002.parquet"])
    code, stdout, err = _cli(*args)
    assert code == 0, err
    stats = json.loads(stdout[:stdout.rindex("}") + 1])
    assert stats["shards_written"] == 1 and stats["shards_skipped"] == 3 and stats["computed"] == 8
    assert _read(out).equals(first)


def test_bad_input_is_one_line_before_ray_starts(exported, tmp_path):
    table = tmp_path / "t.tsv"
    table.write_text("sentence\tlabel\nfine film .\t1\n")
    (tmp_path / "x.txt").write_text("x")
    cases = [
        (["--input", str(table), "--out", str(tmp_path / "o1")], "has no column 'text' (text_column)"),
        (["--input", str(table), "--out", str(tmp_path / "o2"), "--text-column", "sentence", "header=false"],
         "must be a 0-based column position"),
        (["--input", str(table), "--out", str(tmp_path / "o3"), "--text-column", "sentence",
          "--text-b-column", "label"], "takes one sentence"),
        (["--input", str(tmp_path / "x.txt"), "--out", str(tmp_path / "o4")], "cannot tell the format"),
        (["--input", str(tmp_path / "none.tsv"), "--out", str(tmp_path / "o5")], "does not exist"),
    ]
    for extra, message in cases:
        code, _, err = _cli("predict", exported["prompt"], *extra)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and lines and message in lines[0], err
        assert "Traceback" not in err
    code, _, err = _cli("predict", str(tmp_path), "--input", str(table), "--out", str(tmp_path / "o6"))
    assert code == 2 and "rayapp export" in err and "Traceback" not in err
    # the model from a config file (as `python -m jobs.predict --config ...` passes it), overrides after it
    (tmp_path / "predict.yaml").write_text(f"model: {exported['prompt']}\ninput: {table}\nout: {tmp_path / 'o7'}\n")
    code, _, err = _cli("predict", "--config", str(tmp_path / "predict.yaml"), "text_column=nope")
    assert code == 2 and "has no column 'nope' (text_column)" in err, err


def test_a_two_sentence_regression_task_writes_scores(tiny_bert, ray_cluster, tmp_path):
    """An STS-B prompt run, exported, scores LM-BFF's own STS-B test file (GLUE TSV, two
    sentence columns): a `score` per row, the expected value `classify` gives, no label."""
    from rayapp.assets import fewshot_dir
    from rayapp.recipes.finetune import FinetuneConfig, run
    from rayapp.ship.export import classify
    from rayapp.train.engine import EngineConfig

    record = run(FinetuneConfig(task="STS-B", model=tiny_bert, max_steps=2, eval_every=2, batch_size=8, max_length=48,
                                output_dir=str(tmp_path / "runs"), engine=EngineConfig(num_workers=1)))
    model = str(tmp_path / "model")
    assert _cli("export", record["record"], "--out", model, "onnx=false")[0] == 0
    table = os.path.join(fewshot_dir("k-shot"), "STS-B", "16-13", "test.tsv")
    out = tmp_path / "out"
    code, _, err = _cli("predict", model, "--input", table, "--out", str(out), "--text-column", "sentence1",
                        "--text-b-column", "sentence2", "--id-column", "index", "rows_per_shard=400", "num_actors=1")
    assert code == 0, err
    got = _read(str(out))
    assert got.column_names == ["id", "score"]
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert got["id"].to_pylist() == [r["index"] for r in rows]
    want = classify(model, [r["sentence1"] for r in rows[:50]], [r["sentence2"] for r in rows[:50]])
    assert np.abs(np.array(got["score"].to_pylist()[:50]) - [w["score"] for w in want]).max() < 1e-4
    assert json.loads((out / META).read_text())["labels"] is None
