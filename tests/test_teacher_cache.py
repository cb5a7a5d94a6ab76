"""Teacher top-k cache: exact probabilities from top-k + lse, resume, S3, bad input."""
from __future__ import annotations

import json
import os
import random
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rayapp.errors import ConfigError, DataError
from rayapp.modeling.models import load_mlm, load_tokenizer
from rayapp.tasks.prompts import PromptEncoder
from rayapp.data.teacher_cache import TeacherScorer, assemble_shards, build_cache, cache_meta, mask_logits, plan_shards, read_cache, read_range, topk_summary
from rayapp.tasks.registry import INTERMEDIATE_TASKS

PAIRS = INTERMEDIATE_TASKS["smash-pairs"]
WORDS = "river stone garden music winter market bridge letter window forest".split()


def pair_rows(n: int) -> list[dict]:
    rng = random.Random(n)
    sentence = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + "."
    return [{"text_a": sentence(), "text_b": sentence(), "label": i % 3, "doc_a": f"d{i}"} for i in range(n)]


def write_examples(folder, rows: list[dict], files: int = 2, row_group_size: int = 3) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    step = -(-len(rows) // files)
    for f in range(files):
        pq.write_table(pa.Table.from_pylist(rows[f * step:(f + 1) * step]), folder / f"part-{f:05d}.parquet",
                       row_group_size=row_group_size)
    return str(folder)


def teacher_view(teacher: str, rows: list[dict]):
    """What the cache must reproduce, computed the plain way: full forward pass, softmax."""
    encoder = PromptEncoder(load_tokenizer(teacher), PAIRS, 128)
    enc = encoder.encode_batch([r["text_a"] for r in rows], [r["text_b"] for r in rows])
    with torch.no_grad():
        logits = load_mlm(teacher).eval()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    return encoder, logits[torch.arange(len(rows)), enc["mask_pos"]].softmax(-1)


# --- pure pieces ------------------------------------------------------------------------------

def test_topk_summary_gives_exact_probabilities_and_covered_mass():
    logits = torch.randn(4, 50) * 5
    probs = logits.softmax(-1)
    s = topk_summary(logits, 7)
    assert torch.equal(s["topk_indices"].long(), probs.topk(7).indices)
    torch.testing.assert_close((s["topk_values"] - s["lse"][:, None]).exp(), probs.topk(7).values)
    torch.testing.assert_close(s["covered"], probs.topk(7).values.sum(-1))
    torch.testing.assert_close(topk_summary(logits, 50)["covered"], torch.ones(4))


def test_mask_logits_equal_the_full_forward_pass(tiny_bert, tiny_roberta):
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    distil = DistilBertForMaskedLM(DistilBertConfig(vocab_size=99, dim=32, n_layers=1, n_heads=2, hidden_dim=64))
    models = [load_mlm(tiny_bert), load_mlm(tiny_roberta), distil]  # head at the mask; full-pass fallback
    for model in models:
        model.eval()
        ids = torch.randint(5, 99, (3, 9))
        attention = torch.ones_like(ids)
        attention[0, 6:] = 0
        pos = torch.tensor([2, 8, 0])
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=attention).logits[torch.arange(3), pos]
        torch.testing.assert_close(mask_logits(model, ids, attention, pos), full, atol=1e-5, rtol=1e-5)


def test_plan_and_assembly_keep_every_row_in_order(tmp_path):
    shards = plan_shards([("a", 7), ("b", 0), ("c", 3)], rows_per_shard=3)
    assert [(s.name, s.path, s.start, s.stop) for s in shards] == [
        ("part-00000-00000.parquet", "a", 0, 3), ("part-00000-00001.parquet", "a", 3, 6),
        ("part-00000-00002.parquet", "a", 6, 7), ("part-00002-00000.parquet", "c", 0, 3)]

    pq.write_table(pa.table({"x": list(range(10))}), tmp_path / "t.parquet", row_group_size=3)
    fs = pa.fs.LocalFileSystem()
    assert read_range(fs, str(tmp_path / "t.parquet"), 4, 8, ["x"])["x"].to_pylist() == [4, 5, 6, 7]

    # rows of two shards arrive interleaved and out of order, in uneven batches
    rows = [{"_shard": s, "_row": r, "x": f"{s}{r}"} for s in "ab" for r in range(5)]
    random.Random(0).shuffle(rows)
    batches = [pa.Table.from_pylist(rows[i:i + 3]) for i in range(0, 10, 3)]
    out = dict(assemble_shards(batches, {"a": 5, "b": 5}))
    assert {k: v.column_names for k, v in out.items()} == {"a": ["x"], "b": ["x"]}
    assert out["a"]["x"].to_pylist() == [f"a{r}" for r in range(5)]


def test_scorer_with_the_full_vocabulary_covers_all_mass(tiny_bert):
    rows = pair_rows(3)
    vocab = load_mlm(tiny_bert).config.vocab_size
    out = TeacherScorer(tiny_bert, PAIRS, 128, top_k=vocab)(pa.Table.from_pylist(rows))
    assert out["covered"].to_pylist() == pytest.approx([1.0] * 3, abs=1e-5)
    assert out["topk_values"].type == pa.list_(pa.float16(), vocab)


# --- build_cache -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(ray_cluster, tiny_bert, tmp_path_factory):
    """One cache of 11 examples in two input files (6 + 5 rows), shards of 4 rows."""
    tmp = tmp_path_factory.mktemp("built")
    rows = pair_rows(11)
    examples = write_examples(tmp / "examples", rows)
    stats = build_cache(examples, tiny_bert, str(tmp / "cache"), top_k=16, rows_per_shard=4, batch_size=4)
    return rows, examples, tmp / "cache", stats


def test_cache_reproduces_teacher_probabilities(built, tiny_bert):
    rows, _, cache_dir, stats = built
    assert stats["examples"] == stats["computed"] == 11
    assert (stats["shards_written"], stats["shards_skipped"]) == (4, 0)
    shards = sorted(cache_dir.glob("part-*.parquet"))
    assert [p.name for p in shards] == ["part-00000-00000.parquet", "part-00000-00001.parquet",
                                        "part-00001-00000.parquet", "part-00001-00001.parquet"]
    tables = [pq.read_table(p) for p in shards]
    assert tables[0].schema.field("topk_values").type.value_type == pa.float16()
    assert tables[0].schema.field("topk_indices").type.value_type == pa.int32()
    cache = pa.concat_tables(tables).to_pandas()
    assert cache["text_a"].tolist() == [r["text_a"] for r in rows]  # input order kept
    assert cache["label"].tolist() == [r["label"] for r in rows]
    encoder, probs = teacher_view(tiny_bert, rows)
    for i, row in cache.iterrows():
        encoded = encoder.encode(rows[i]["text_a"], rows[i]["text_b"])
        assert list(row["input_ids"]) == encoded["input_ids"] and row["mask_pos"] == encoded["mask_pos"]
        top = probs[i].topk(16)
        assert list(row["topk_indices"]) == top.indices.tolist()
        kept = torch.tensor(row["topk_values"], dtype=torch.float32).sub(row["lse"]).exp()
        torch.testing.assert_close(kept, top.values, atol=1e-3, rtol=0)  # fp16 values, exact to 1e-3
        assert row["covered"] == pytest.approx(top.values.sum().item(), abs=1e-5)

    meta = cache_meta(str(cache_dir))
    assert meta["complete"] and meta["examples"] == 11 and meta["plan"]["top_k"] == 16
    assert meta["vocab_size"] == probs.shape[1] and meta["plan"]["template"] == PAIRS.template
    assert meta["mean_covered"] == pytest.approx(cache["covered"].mean(), abs=1e-6)


def test_rerun_recomputes_only_missing_shards(built, tiny_bert, tmp_path):
    _, examples, cache_dir, _ = built
    out = tmp_path / "cache"
    shutil.copytree(cache_dir, out)
    args = dict(top_k=16, rows_per_shard=4, batch_size=4)
    names = sorted(p.name for p in out.glob("part-*.parquet"))
    before = pq.read_table(out / names[1])
    os.remove(out / names[1])
    mtimes = {n: os.stat(out / n).st_mtime_ns for n in names if n != names[1]}

    stats = build_cache(examples, tiny_bert, str(out), **args)
    assert (stats["shards_written"], stats["shards_skipped"], stats["computed"]) == (1, 3, 2)
    assert stats["examples"] == 11 and cache_meta(str(out))["complete"]
    assert {n: os.stat(out / n).st_mtime_ns for n in mtimes} == mtimes
    after = pq.read_table(out / names[1])
    assert after.drop_columns(["topk_values", "lse", "covered"]).equals(
        before.drop_columns(["topk_values", "lse", "covered"]))  # floats: other batch padding
    assert after["covered"].to_pylist() == pytest.approx(before["covered"].to_pylist(), rel=1e-4)
    assert not list(out.glob("*.tmp"))

    with pytest.raises(DataError, match=r"other settings \(top_k differ\).*new out_uri"):
        build_cache(examples, tiny_bert, str(out), **{**args, "top_k": 5})


def test_cache_from_and_to_s3(ray_cluster, tiny_bert, s3_server, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="kd-cache")
    local = write_examples(tmp_path / "examples", pair_rows(5), files=1)
    s3.upload_file(f"{local}/part-00000.parquet", "kd-cache", "examples/part-00000.parquet")

    stats = build_cache("s3://kd-cache/examples", tiny_bert, "s3://kd-cache/cache", top_k=8, rows_per_shard=3)
    assert (stats["examples"], stats["shards_written"]) == (5, 2)
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="kd-cache", Prefix="cache/")["Contents"])
    assert keys == ["cache/_meta.json", "cache/part-00000-00000.parquet", "cache/part-00000-00001.parquet"]
    assert json.loads(s3.get_object(Bucket="kd-cache", Key="cache/_meta.json")["Body"].read())["complete"]
    assert read_cache("s3://kd-cache/cache").count() == 5
    again = build_cache("s3://kd-cache/examples", tiny_bert, "s3://kd-cache/cache", top_k=8, rows_per_shard=3)
    assert (again["shards_skipped"], again["computed"]) == (2, 0)


# --- bad input ------------------------------------------------------------------------------

def test_bad_input_is_refused_with_a_clear_message(tiny_bert, tmp_path):
    no_b = write_examples(tmp_path / "no_b", [{"text_a": "One.", "label": 0}], files=1)
    with pytest.raises(DataError, match=r"lacks column\(s\) \['text_b'\]"):
        build_cache(no_b, tiny_bert, str(tmp_path / "c1"))

    examples = write_examples(tmp_path / "ok", pair_rows(2), files=1)
    with pytest.raises(ConfigError, match=r"top_k=40000 must be between 1 and the teacher's vocabulary size 30522"):
        build_cache(examples, tiny_bert, str(tmp_path / "c2"), top_k=40_000)
    with pytest.raises(ConfigError, match=r"unknown intermediate task 'nli'; choose one of smash-pairs"):
        build_cache(examples, tiny_bert, str(tmp_path / "c3"), task="nli")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"no \.parquet files under .*build examples first"):
        build_cache(str(empty), tiny_bert, str(tmp_path / "c4"))
    pq.write_table(pa.table({"text_a": pa.array([], pa.string()), "text_b": pa.array([], pa.string())}),
                   empty / "part-0.parquet")
    with pytest.raises(DataError, match=r"holds no examples"):
        build_cache(str(empty), tiny_bert, str(tmp_path / "c5"))

    with pytest.raises(DataError, match=r"not a teacher cache"):
        read_cache(str(tmp_path / "ok"))
