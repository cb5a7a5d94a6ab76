"""Teacher top-k cache: exact probabilities from top-k + lse, the scorer, the actor pool,
resume, S3, metadata (covered mass, vocabulary fingerprint), bad input."""
from __future__ import annotations

import json
import logging
import os
import random
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import ONE_ACTOR
from rayapp.cli import _stage_config, build_parser
from rayapp.data import shards
from rayapp.data.teacher_cache import CacheConfig, build_cache, cache_meta, plan_shards, read_cache, read_range
from rayapp.errors import ConfigError, DataError
from rayapp.modeling.models import LogitsAt, load_mlm, load_tokenizer, mlm_head, vocab_fingerprint
from rayapp.modeling.scorer import TeacherScorer, actor_device, length_batches, pool_args, topk_summary
from rayapp.tasks.prompts import PromptEncoder
from rayapp.tasks.registry import INTERMEDIATE_TASKS

PAIRS = INTERMEDIATE_TASKS["smash-pairs"]
WORDS = "river stone garden music winter market bridge letter window forest".split()


def pair_rows(n: int) -> list[dict]:
    rng = random.Random(n)
    sentence = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + "."
    return [{"text_a": sentence(), "text_b": sentence(), "label": i % 3, "doc_a": f"d{i}"} for i in range(n)]


def write_examples(folder, rows: list[dict], files: int = 2, row_group_size: int = 3, meta: bool = True) -> str:
    """A finished examples folder, as the pairs stage writes one (`_meta.json` last)."""
    folder.mkdir(parents=True, exist_ok=True)
    step = -(-len(rows) // files)
    names = [shards.shard_name(f) for f in range(files)]
    for f, name in enumerate(names):
        pq.write_table(pa.Table.from_pylist(rows[f * step:(f + 1) * step]), folder / name,
                       row_group_size=row_group_size)
    if meta:
        shards.write_meta(str(folder), {"task": "smash-pairs", "files": names})
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


def test_scorer_logits_equal_the_full_forward_pass(tiny_bert, tiny_roberta, tmp_path):
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    distil = tmp_path / "distil"  # no `cls`/`lm_head`: LogitsAt's full-pass fallback
    DistilBertForMaskedLM(DistilBertConfig(vocab_size=30522, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
                          ).save_pretrained(distil)
    load_tokenizer(tiny_bert).save_pretrained(distil)
    for teacher in (tiny_bert, tiny_roberta, str(distil)):
        scorer = TeacherScorer(teacher, PAIRS, 128)
        assert isinstance(scorer.model, LogitsAt)
        model = load_mlm(teacher).eval()
        ids = torch.randint(5, 99, (3, 9))
        attention = torch.ones_like(ids)
        attention[0, 6:] = 0
        pos = torch.tensor([2, 8, 0])
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=attention).logits[torch.arange(3), pos]
        torch.testing.assert_close(scorer.logits(ids, attention, pos), full, atol=1e-5, rtol=1e-5)


def test_scorer_keeps_the_vocabulary_head_in_float32_under_autocast(tiny_bert):
    """On a GPU the encoder runs in bf16 but the logits the cache stores are not rounded to
    bf16: the head runs in float32 (checked here with CPU autocast, which behaves the same)."""
    scorer = TeacherScorer(tiny_bert, PAIRS, 128)
    scorer.half = torch.bfloat16  # what a GPU actor sets
    ids, attention, pos = torch.randint(5, 99, (4, 11)), torch.ones(4, 11, dtype=torch.long), torch.tensor([1, 3, 5, 7])
    logits = scorer.logits(ids, attention, pos)
    model = load_mlm(tiny_bert).eval()
    rows = torch.arange(4)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model.base_model(input_ids=ids, attention_mask=attention).last_hidden_state[rows, pos]
            all_half = mlm_head(model)(hidden).float()
        fp32_head = mlm_head(model)(hidden.float())
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, fp32_head, atol=1e-5, rtol=1e-5)
    assert (logits - all_half).abs().max() > 1e-3  # what a bf16 head would have stored


def test_length_batches_put_similar_lengths_together_longest_first():
    batches = length_batches([3, 9, 1, 7, 9, 2], 4)
    assert [b.tolist() for b in batches] == [[1, 4, 3, 0], [5, 2]]


def test_pool_autoscales_and_is_not_sized_from_the_cluster(monkeypatch):
    """Issue 17: the pool was sized by the GPUs up when the job started (0 on a cluster that
    scales from zero), so it ran one actor. Now it is an autoscaling pool, one GPU each."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    def no_snapshot(*args, **kwargs):
        raise AssertionError("the pool must not be sized from what the cluster has now")

    monkeypatch.setattr(ray, "cluster_resources", no_snapshot)
    monkeypatch.setattr(ray, "available_resources", no_snapshot)
    gpu = pool_args(8, use_gpu=True)
    assert isinstance(gpu["compute"], ActorPoolStrategy)
    assert (gpu["compute"].min_size, gpu["compute"].max_size, gpu["compute"].initial_size) == (1, 8, 8)
    assert (gpu["num_gpus"], gpu["num_cpus"], gpu["batch_size"]) == (1, 1, 1)
    cpu = pool_args(None, use_gpu=False, cpus_per_actor=2)
    assert (cpu["compute"].min_size, cpu["compute"].max_size, cpu["compute"].initial_size) == (1, float("inf"), 1)
    assert (cpu["num_gpus"], cpu["num_cpus"]) == (0, 2)
    # Ray Data adds actors only when calls in flight per actor reach this threshold: a pool
    # allowed fewer would never grow past its first actor
    threshold = DataContext.get_current().autoscaling_config.actor_pool_util_upscaling_threshold
    assert cpu["compute"].max_tasks_in_flight_per_actor >= threshold


def test_actor_device_follows_the_gpus_ray_assigned(monkeypatch, ray_cluster):
    import ray

    # Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone in zero-GPU workers: only get_gpu_ids tells
    assert ray.get(ray.remote(num_gpus=0)(lambda: str(actor_device())).remote()) == "cpu"
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: ["3"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # Ray's default: the actor sees its GPU only
    assert actor_device() == torch.device("cuda", 0)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")  # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES
    assert actor_device() == torch.device("cuda", 3)


def test_vocab_fingerprint_tells_vocabularies_of_one_size_apart(tiny_bert, tiny_roberta):
    class Vocab:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    assert vocab_fingerprint(Vocab({"a": 0, "b": 1})) != vocab_fingerprint(Vocab({"a": 1, "b": 0}))
    assert vocab_fingerprint(Vocab({"a": 0, "b": 1})) == vocab_fingerprint(Vocab({"b": 1, "a": 0}))
    assert vocab_fingerprint(load_tokenizer(tiny_bert)) != vocab_fingerprint(load_tokenizer(tiny_roberta))


def test_plan_shards_cuts_each_input_file_into_fixed_row_ranges():
    shards_ = plan_shards([("a", 7), ("b", 0), ("c", 3)], rows_per_shard=3)
    assert [(s.name, s.uri, s.start, s.stop) for s in shards_] == [
        ("part-00000-00000.parquet", "a", 0, 3), ("part-00000-00001.parquet", "a", 3, 6),
        ("part-00000-00002.parquet", "a", 6, 7), ("part-00002-00000.parquet", "c", 0, 3)]


def test_read_range_reads_rows_across_row_groups(tmp_path):
    pq.write_table(pa.table({"x": list(range(10))}), tmp_path / "t.parquet", row_group_size=3)
    assert read_range(str(tmp_path / "t.parquet"), 4, 8, ["x"])["x"].to_pylist() == [4, 5, 6, 7]


def test_scorer_with_the_full_vocabulary_covers_all_mass(tiny_bert):
    table = pa.Table.from_pylist(pair_rows(3))
    vocab = load_mlm(tiny_bert).config.vocab_size
    out = TeacherScorer(tiny_bert, PAIRS, 128).topk(table, vocab, batch_size=2)
    assert out["covered"].to_pylist() == pytest.approx([1.0] * 3, abs=1e-5)
    assert out["topk_values"].type == pa.list_(pa.float16(), vocab)


def test_config_from_file_flags_and_overrides(tmp_path):
    path = tmp_path / "cache.yaml"
    path.write_text("examples: s3://b/pairs\nteacher: roberta-large\nout: s3://b/cache\ntop_k: 32\n")
    args = build_parser().parse_args(["teacher-cache", "--config", str(path), "--use-gpu", "--num-actors", "4",
                                      "--out", "s3://b/other: cache", "batch_size=512"])
    cfg = _stage_config(CacheConfig, args, ("examples", "teacher", "out", "task", "top_k",
                                            "batch_size", "num_actors", "use_gpu"))
    assert cfg == CacheConfig(examples="s3://b/pairs", teacher="roberta-large", out="s3://b/other: cache",
                              top_k=32, batch_size=512, num_actors=4, use_gpu=True)
    args = build_parser().parse_args(["teacher-cache", "--config", str(path), "rows_per_shard=0"])
    with pytest.raises(ConfigError, match="rows_per_shard must be >= 1, got 0"):
        _stage_config(CacheConfig, args, ("use_gpu",))


# --- build_cache -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(ray_cluster, tiny_bert, tmp_path_factory):
    """One cache of 11 examples in two input files (6 + 5 rows), shards of 4 rows."""
    tmp = tmp_path_factory.mktemp("built")
    rows = pair_rows(11)
    examples = write_examples(tmp / "examples", rows)
    stats = build_cache(examples, tiny_bert, str(tmp / "cache"), top_k=16, rows_per_shard=4, batch_size=4, **ONE_ACTOR)
    return rows, examples, tmp / "cache", stats


def test_cache_reproduces_teacher_probabilities(built, tiny_bert):
    rows, _, cache_dir, stats = built
    assert stats["examples"] == stats["computed"] == 11
    assert (stats["shards_written"], stats["shards_skipped"]) == (4, 0)
    assert stats["tokens"] > 11 and stats["tokens_per_s"] > 0
    shards_ = sorted(cache_dir.glob("part-*.parquet"))
    assert [p.name for p in shards_] == ["part-00000-00000.parquet", "part-00000-00001.parquet",
                                         "part-00001-00000.parquet", "part-00001-00001.parquet"]
    tables = [pq.read_table(p) for p in shards_]
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
    assert meta["stage"] == "teacher-cache" and meta["examples"] == 11 and meta["plan"]["top_k"] == 16
    assert meta["files"] == [p.name for p in shards_]
    assert meta["vocab_size"] == probs.shape[1] and meta["plan"]["template"] == PAIRS.template
    assert meta["vocab_fingerprint"] == vocab_fingerprint(load_tokenizer(tiny_bert))
    assert meta["mean_covered"] == pytest.approx(cache["covered"].mean(), abs=1e-6)
    assert read_cache(str(cache_dir)).count() == 11


def test_rerun_recomputes_only_missing_shards(built, tiny_bert, tmp_path, caplog):
    _, examples, cache_dir, _ = built
    out = tmp_path / "cache"
    shutil.copytree(cache_dir, out)
    args = dict(top_k=16, rows_per_shard=4, batch_size=4, **ONE_ACTOR)
    names = sorted(p.name for p in out.glob("part-*.parquet"))
    before = pq.read_table(out / names[1])
    os.remove(out / names[1])
    mtimes = {n: os.stat(out / n).st_mtime_ns for n in names if n != names[1]}

    with caplog.at_level(logging.WARNING, logger="rayapp.data.teacher_cache"):
        stats = build_cache(examples, tiny_bert, str(out), warn_covered=0.999, **args)
    assert (stats["shards_written"], stats["shards_skipped"], stats["computed"]) == (1, 3, 2)
    assert stats["examples"] == 11 and cache_meta(str(out))["examples"] == 11
    assert {n: os.stat(out / n).st_mtime_ns for n in mtimes} == mtimes
    after = pq.read_table(out / names[1])
    assert after.drop_columns(["topk_values", "lse", "covered"]).equals(
        before.drop_columns(["topk_values", "lse", "covered"]))  # floats: other batch padding
    assert after["covered"].to_pylist() == pytest.approx(before["covered"].to_pylist(), rel=1e-4)
    assert not list(out.glob("*.tmp"))
    # a random teacher's top-16 of 30k words covers far less than 99.9%: said, not hidden
    assert any("top-16 cache" in r.getMessage() and "warn_covered=0.999" in r.getMessage() for r in caplog.records)

    with pytest.raises(DataError, match=r"other settings \(top_k differ\).*new folder"):
        build_cache(examples, tiny_bert, str(out), **{**args, "top_k": 5})


def test_consumers_refuse_a_folder_without_meta(built, tiny_bert, tmp_path):
    """A killed build leaves shards that look like data: the cache refuses examples without
    `_meta.json`, and `read_cache` (what distill reads) a cache without it, naming the folder."""
    rows, _, cache_dir, _ = built
    unfinished = write_examples(tmp_path / "unfinished", rows, meta=False)
    with pytest.raises(DataError, match=rf"{unfinished} has no _meta.json: it is not a finished rayapp data folder"):
        build_cache(unfinished, tiny_bert, str(tmp_path / "c"))
    killed = tmp_path / "killed"
    shutil.copytree(cache_dir, killed)
    os.remove(killed / "_meta.json")
    with pytest.raises(DataError, match=rf"{killed} has no _meta.json"):
        read_cache(str(killed))
    with pytest.raises(DataError, match=r"is a finished data folder but not a teacher cache"):
        read_cache(built[1])


def test_cache_from_and_to_s3(ray_cluster, tiny_bert, s3_server, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="kd-cache")
    local = write_examples(tmp_path / "examples", pair_rows(5), files=1)
    for name in ("part-00000.parquet", "_meta.json"):
        s3.upload_file(f"{local}/{name}", "kd-cache", f"examples/{name}")

    stats = build_cache("s3://kd-cache/examples", tiny_bert, "s3://kd-cache/cache", top_k=8, rows_per_shard=3, **ONE_ACTOR)
    assert (stats["examples"], stats["shards_written"]) == (5, 2)
    # "cache/" itself may be a directory marker: pyarrow leaves one where the write check's probe was deleted
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="kd-cache", Prefix="cache/")["Contents"]
                  if not o["Key"].endswith("/"))
    assert keys == ["cache/_meta.json", "cache/_plan.json", "cache/part-00000-00000.parquet",
                    "cache/part-00000-00001.parquet"]
    assert json.loads(s3.get_object(Bucket="kd-cache", Key="cache/_meta.json")["Body"].read())["examples"] == 5
    assert read_cache("s3://kd-cache/cache").count() == 5
    again = build_cache("s3://kd-cache/examples", tiny_bert, "s3://kd-cache/cache", top_k=8, rows_per_shard=3, **ONE_ACTOR)
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
    with pytest.raises(ConfigError, match=r"warn_covered=2 must be a probability mass"):
        build_cache(examples, tiny_bert, str(tmp_path / "c3"), warn_covered=2)

    empty = tmp_path / "empty"
    empty.mkdir()
    pq.write_table(pa.table({"text_a": pa.array([], pa.string()), "text_b": pa.array([], pa.string())}),
                   empty / "part-00000.parquet")
    shards.write_meta(str(empty), {"files": ["part-00000.parquet"]})
    with pytest.raises(DataError, match=r"holds no examples"):
        build_cache(str(empty), tiny_bert, str(tmp_path / "c5"))
