"""SMASH sentiment intermediate task: teacher-scored, thresholded, seeded cap, resumable."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import ONE_ACTOR
from rayapp.cli import _stage_config, build_parser
from rayapp.data.sentiment import TASK, SentimentConfig, build_sentiment, label_confident, sentence_key
from rayapp.errors import ConfigError, DataError
from rayapp.modeling.models import load_mlm, load_tokenizer
from rayapp.tasks.prompts import PromptEncoder, class_logits

DOCS = [
    "The film was a delight from start to finish. The actors clearly loved their roles. "
    "Critics praised the warm and witty script.",
    "The river flooded the old town in spring. Many houses were lost to the water. "
    "The council rebuilt the bridge two years later. Trade slowly returned to the market.",
    "He wrote three novels about the sea. None of them sold well during his life.",
]
COLUMNS = ["text_a", "label", "prob", "probs", "doc_id", "sent", "key"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(DOCS) + "\n")
    return str(path)


def read_output(out) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))])


def teacher_probs(teacher: str, texts: list[str]) -> torch.Tensor:
    encoder = PromptEncoder(load_tokenizer(teacher), TASK, 64)
    enc = encoder.encode_batch(texts)
    with torch.no_grad():
        logits = load_mlm(teacher).eval()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    return class_logits(logits[torch.arange(len(texts)), enc["mask_pos"]], encoder.label_word_ids).softmax(-1)


# --- pure pieces ------------------------------------------------------------------------------

def test_label_confident_labels_by_argmax_and_filters_by_threshold():
    probs = [[0.1, 0.6, 0.1, 0.1, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2], [0.0, 0.0, 0.0, 0.5, 0.5], [0, 0, 0, 0, 1.0]]
    batch = pa.table({
        "text_a": ["a", "b", "c", "d"], "doc_id": ["x", "x", "y", "z"], "sent": [0, 1, 0, 3],
        "probs": pa.FixedSizeListArray.from_arrays(pa.array(np.ravel(probs), pa.float32()), 5),
    })
    out = label_confident(batch, threshold=0.5, seed=7)
    assert out["text_a"].to_pylist() == ["a", "c", "d"]
    assert out["label"].to_pylist() == [1, 3, 4]  # ties go to the first class
    assert out["prob"].to_pylist() == pytest.approx([0.6, 0.5, 1.0])
    assert out["key"].to_pylist() == [sentence_key(7, "x", 0), sentence_key(7, "y", 0), sentence_key(7, "z", 3)]
    assert label_confident(batch, threshold=0.0, seed=7).num_rows == 4
    assert label_confident(batch.slice(0, 0), threshold=0.0, seed=7).num_rows == 0


def test_sentiment_does_not_reach_into_later_or_sibling_stages():
    """It imported teacher_cache (backwards in the pipeline) and counted with pairs' count_pairs."""
    code = ("import sys, rayapp.data.sentiment; "
            "print(sorted(m for m in sys.modules if m in ('rayapp.data.teacher_cache', 'rayapp.data.pairs')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_config_from_flags_and_overrides():
    args = build_parser().parse_args(["intermediate", "sentiment", "--corpus", "c", "--teacher", "t", "--out", "o",
                                      "--use-gpu", "--batch-size", "128", "threshold=0.7", "num_actors=3"])
    cfg = _stage_config(SentimentConfig, args, ("corpus", "teacher", "out", "num_examples", "seed", "threshold",
                                                "batch_size", "num_actors", "use_gpu"))
    # locations resolve on the driver; "t" names no local path, so it stays a hub id
    assert cfg == SentimentConfig(corpus=os.path.abspath("c"), teacher="t", out=os.path.abspath("o"), threshold=0.7,
                                  batch_size=128, num_actors=3, use_gpu=True)
    with pytest.raises(ConfigError, match=r"threshold=1.5 must be a probability in \[0, 1\]"):
        SentimentConfig(corpus="c", teacher="t", out="o", threshold=1.5)


# --- build_sentiment ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keep_all(ray_cluster, tiny_bert, corpus, tmp_path_factory):
    """9 sentences in one block: table shards of 4, 4 and 1 sentences, scored by the default
    pool (it grows to a second actor: the other stage tests run one, `ONE_ACTOR`)."""
    out = tmp_path_factory.mktemp("sentiment") / "all"
    return build_sentiment(corpus, tiny_bert, str(out), threshold=0.0, rows_per_shard=4), out


def test_threshold_zero_keeps_every_sentence_with_teacher_labels(keep_all, tiny_bert):
    stats, out = keep_all
    table = read_output(out)
    assert table.column_names == COLUMNS
    assert stats["scored"] == stats["kept"] == stats["examples"] == table.num_rows == 9
    assert stats["files"] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert sorted(pq.read_table(out / f).num_rows for f in stats["files"]) == [1, 4, 4]

    probs = np.stack(table["probs"].to_numpy(zero_copy_only=False))
    expected = teacher_probs(tiny_bert, table["text_a"].to_pylist()).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert table["label"].to_pylist() == probs.argmax(-1).tolist()
    np.testing.assert_allclose(table["prob"].to_numpy(), probs.max(-1), rtol=1e-6)

    meta = json.loads((out / "_meta.json").read_text())
    labels = table["label"].to_pylist()
    assert meta["stage"] == "sentiment" and meta["files"] == stats["files"]
    assert meta["counts"] == {str(c): labels.count(c) for c in range(5)}
    assert meta["kept"] == meta["scored"] == 9 and meta["template"] == "{x0} It was {mask}."
    assert meta["threshold"] == 0.0 and meta["kept_fraction"] == 1.0


def test_resume_skips_finished_shards(keep_all, tiny_bert, corpus, tmp_path):
    """A re-run into a folder with a missing shard scores that shard only (it used to refuse
    the folder, and a crash lost every shard scored so far)."""
    stats, done = keep_all
    out = tmp_path / "resumed"
    shutil.copytree(done, out)
    before = pq.read_table(out / "part-00001.parquet")
    os.remove(out / "part-00001.parquet")
    os.remove(out / "_meta.json")  # killed before the end
    mtimes = {n: os.stat(out / n).st_mtime_ns for n in ("part-00000.parquet", "part-00002.parquet")}

    again = build_sentiment(corpus, tiny_bert, str(out), threshold=0.0, rows_per_shard=4, **ONE_ACTOR)
    assert (again["shards_written"], again["shards_skipped"], again["scored_this_run"]) == (1, 2, 4)
    assert {n: os.stat(out / n).st_mtime_ns for n in mtimes} == mtimes
    after = pq.read_table(out / "part-00001.parquet")
    assert after.drop_columns(["probs", "prob"]).equals(before.drop_columns(["probs", "prob"]))
    assert {k: again[k] for k in ("examples", "kept", "counts", "files")} == \
        {k: stats[k] for k in ("examples", "kept", "counts", "files")}
    with pytest.raises(DataError, match=r"other settings \(threshold differ\).*new folder"):
        build_sentiment(corpus, tiny_bert, str(out), threshold=0.3, rows_per_shard=4)


def test_cap_takes_the_seeded_smallest_keys(keep_all, tiny_bert, corpus, tmp_path):
    everything = read_output(keep_all[1]).to_pylist()
    stats = build_sentiment(corpus, tiny_bert, str(tmp_path / "cap"), threshold=0.0, num_examples=4, seed=3,
                            rows_per_shard=4, **ONE_ACTOR)
    chosen = read_output(tmp_path / "cap").to_pylist()
    expected = sorted(everything, key=lambda r: sentence_key(3, r["doc_id"], r["sent"]))[:4]
    assert sorted((r["doc_id"], r["sent"]) for r in chosen) == sorted((r["doc_id"], r["sent"]) for r in expected)
    assert (stats["examples"], stats["kept"], stats["num_examples"]) == (4, 9, 4)
    again = build_sentiment(corpus, tiny_bert, str(tmp_path / "cap"), threshold=0.0, num_examples=4, seed=3,
                            rows_per_shard=4, **ONE_ACTOR)  # the cap is idempotent, and kept counts survive it
    assert (again["examples"], again["kept"], again["shards_written"]) == (4, 9, 0)


def test_threshold_one_keeps_nothing_and_says_so(ray_cluster, tiny_bert, corpus, tmp_path):
    with pytest.raises(DataError, match=r"none of the 9 sentences of .* reached threshold=1.0 .*lower the threshold"):
        build_sentiment(corpus, tiny_bert, str(tmp_path / "none"), threshold=1.0, rows_per_shard=4, **ONE_ACTOR)
    assert not (tmp_path / "none" / "_meta.json").exists()
    assert not list((tmp_path / "none").glob("part-*"))
    # the same folder takes the lower threshold, and reuses the sentence table
    table = sorted((tmp_path / "none" / "_sentences").iterdir())
    stats = build_sentiment(corpus, tiny_bert, str(tmp_path / "none"), threshold=0.0, rows_per_shard=4, **ONE_ACTOR)
    assert stats["examples"] == 9 and sorted((tmp_path / "none" / "_sentences").iterdir()) == table


def test_bad_input_is_refused_with_a_clear_message(ray_cluster, tiny_bert, corpus, tmp_path):
    fragments = tmp_path / "fragments.txt"
    fragments.write_text("Heading\n\nToo short.\n")
    with pytest.raises(DataError, match=r"has no usable sentence to score .* 2 fragments"):
        build_sentiment(str(fragments), tiny_bert, str(tmp_path / "b"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "part-00000.parquet").write_bytes(b"")
    with pytest.raises(DataError, match=r"already holds parquet files or _meta.json but no _plan.json"):
        build_sentiment(corpus, tiny_bert, str(tmp_path / "c"))
