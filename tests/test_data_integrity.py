"""Data integrity as a contract (issue 27): lines that do not parse are errors naming the file
and line (or, with on_bad_lines=skip, counted); every shard's rows and checksum are in
`_meta.json` and checked by its readers; a damaged shard or an empty corpus is one DataError
naming it and what to do. The CLI cases run as the user meets them: exit 2, one `error:`
line, and (where the driver can see the mistake) no Ray started."""
import json
import logging
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayapp import storage
from rayapp.cli import main as cli
from rayapp.data import shards
from rayapp.data.corpus import plan_sources
from rayapp.data.fewshot import read_table
from rayapp.data.mlm_text import build_text_chunks
from rayapp.errors import DataError
from rayapp.train.stream import Block, _read, plan_blocks
from test_driver_checks import RUNNER, assert_one_line_error  # the CLI cases in one fresh process, and whether Ray started

SENTENCES = ["Alpha went to the market today.", "Beta bought three red apples there.",
             "Gamma paid with a shiny coin.", "Delta walked home in the rain."]


def jsonl_corpus(path, docs: int = 40, bad: tuple[int, ...] = ()) -> str:
    """`docs` lines; the (1-based) line numbers in `bad` are broken JSON instead."""
    lines = ['{"text": "broken' if n in bad else json.dumps({"text": " ".join(SENTENCES[n % 4:] + SENTENCES[:n % 4])})
             for n in range(1, docs + 1)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def one_line(capsys, ray_data: bool = False) -> str:
    """The one `error:` line the CLI printed. `ray_data`: Ray Data's own logger also prints
    its plan and the failed task's traceback (not rayapp's lines; their silencing is the
    captured-log row of issue 27), so only the `error:` line is counted."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and (ray_data or len(lines) == 1), lines
    return errors[0]


def flip_byte(path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


# --- shards: rows and checksums in _meta.json ---------------------------------------------

def folder_of(tmp_path, rows: int = 10, plan: bool = False) -> tuple[str, str]:
    out = tmp_path / "data"
    if plan:
        shards.begin(str(out), {"stage": "test"}, "test build")
    uri = str(out / "part-00000.parquet")
    entry = shards.write_table(uri, pa.table({"x": list(range(rows)), "s": ["text"] * rows}))
    shards.write_meta(str(out), {"files": ["part-00000.parquet"]}, {"part-00000.parquet": entry})
    return str(out), uri


def test_meta_records_rows_bytes_and_sha256_of_every_shard(tmp_path):
    import hashlib

    out, uri = folder_of(tmp_path)
    entry = shards.read_meta(out)["shards"]["part-00000.parquet"]
    data = storage.read_bytes(uri)
    assert entry == {"rows": 10, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert shards.describe(uri) == entry  # what write_meta records for a shard an earlier run wrote
    assert shards.shard_uris(out) == [uri]


def test_half_shard_is_refused_by_name_with_how_to_rebuild(tmp_path):
    out, uri = folder_of(tmp_path)
    pq.write_table(pa.table({"x": list(range(5)), "s": ["text"] * 5}), uri)  # parses, half the rows
    with pytest.raises(DataError, match=rf"{uri} holds 5 rows but _meta.json lists 10: the shard is damaged or "
                                        rf"from another build; delete {out} and re-run the command that built it"):
        shards.shard_uris(out)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_damaged_shard_is_one_error_naming_it(tmp_path, damage):
    out, uri = folder_of(tmp_path, plan=True)  # a resumable folder: rebuild the one shard
    path = tmp_path / "data" / "part-00000.parquet"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "garbage":
        path.write_bytes(b"not parquet at all" * 20)
    else:
        path.unlink()
    with pytest.raises(DataError) as e:
        shards.shard_uris(out)
    message = str(e.value)
    assert message.startswith(f"cannot read {uri} (") and "\n" not in message
    assert message.endswith(f"delete {uri} and re-run the command that built {out} with the same --out "
                            "(it rebuilds only the missing shards)")


def test_flipped_bit_fails_the_page_crc_where_workers_read(tmp_path):
    out, uri = folder_of(tmp_path, rows=1000)
    flip_byte(tmp_path / "data" / "part-00000.parquet", 200)  # inside the first data page
    assert pq.read_table(uri).num_rows == 1000  # plain pyarrow reads wrong values silently
    shards.shard_uris(out)  # footer and sizes are intact: the driver's cheap check passes
    with pytest.raises(DataError, match=rf"cannot read {uri} \(.*CRC checksum verification failed.*\): "
                                        rf"the shard is missing, damaged or unreadable"):
        _read(Block(uri, 0, 0, 10))  # what every training worker reads through
    with pytest.raises(DataError, match=rf"{uri} does not match the sha256 _meta.json records"):
        shards.read_whole(uri, shards.read_meta(out)["shards"]["part-00000.parquet"])


def test_folder_from_before_the_entries_still_loads_with_a_warning(tmp_path, caplog):
    out, uri = folder_of(tmp_path)
    meta = shards.read_meta(out)
    del meta["shards"]
    storage.write_text(f"{out}/_meta.json", json.dumps(meta))
    with caplog.at_level(logging.WARNING):
        assert plan_blocks(shards.shard_uris(out), world=2)
    assert "written before _meta.json recorded each shard's rows and checksum" in caplog.text
    (tmp_path / "data" / "part-00000.parquet").write_bytes(b"garbage")
    with pytest.raises(DataError, match=rf"cannot read {uri}"):  # readable is still checked
        shards.shard_uris(out)


# --- few-shot tables: lines that do not parse -----------------------------------------------

@pytest.mark.parametrize("name, text, line, problem", [
    ("t.tsv", "sentence\tlabel\ngood one\t1\ntab missing 0\nbad one\t0\n", 3, "has 1 fields but the header has 2"),
    ("t.csv", "label,sentence\n1,good one\n0,bad, unquoted comma\n0,fine\n", 3, "has 3 fields but the header has 2"),
    ("t.jsonl", '{"text_a": "good one", "label": "1"}\n{"text_a": "cut off\n{"text_a": "fine", "label": "0"}\n', 2,
     "is not valid JSON"),
    ("u.jsonl", '{"text_a": "good one", "label": "1"}\n["a", "list"]\n{"text_a": "fine", "label": "0"}\n', 2,
     "is not a JSON object"),
])
def test_table_line_that_does_not_parse(tmp_path, caplog, name, text, line, problem):
    from rayapp.data.fewshot import Columns, example_columns

    path = tmp_path / name
    path.write_text(text)
    columns = example_columns("SST-2") if name.endswith("jsonl") else Columns("sentence", None, "label")
    with pytest.raises(DataError, match=rf"{path} line {line} {problem}.*; fix or delete that line, or pass "
                                        r"on_bad_lines=skip to skip such lines \(they are counted\)"):
        read_table(path, columns, "SST-2")
    with caplog.at_level(logging.WARNING):
        examples = read_table(path, columns, "SST-2", on_bad_lines="skip")
    assert len(examples) == 2
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: skipped 1 line(s) that do not parse (on_bad_lines=skip), lines {line}"]


def test_tsv_with_header_may_carry_fields_past_it(tmp_path):
    """GLUE's NLI files append annotator labels past the header (SNLI rows of 11 and 15 fields)."""
    from rayapp.data.fewshot import Columns

    path = tmp_path / "nli.tsv"
    path.write_text("sentence1\tsentence2\tlabel1\tgold_label\n"
                    "A man.\tA person.\tentailment\tentailment\n"
                    "A dog.\tA cat.\tneutral\tcontradiction\tcontradiction\tcontradiction\n")
    examples = read_table(path, Columns("sentence1", "sentence2", -1), "SNLI")
    assert [e.label for e in examples] == ["entailment", "contradiction"]


# --- corpora: empty, and lines that do not parse --------------------------------------------

@pytest.mark.parametrize("kind", ["empty jsonl file", "folder of empty files", "blank jsonl lines", "parquet, no rows"])
def test_empty_corpus_is_refused_before_any_ray_work(tmp_path, kind):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    if kind == "empty jsonl file":
        (corpus / "a.jsonl").write_text("")
    elif kind == "folder of empty files":
        for name in ("a.txt", "b.txt"):
            (corpus / name).write_text("")
    elif kind == "blank jsonl lines":
        (corpus / "a.jsonl").write_text("\n\n  \n")
    else:
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), corpus / "a.parquet")
    with pytest.raises(DataError, match=rf"corpus {corpus} holds no documents: .*; point it at a corpus with text"):
        plan_sources(str(corpus))


def test_bad_line_is_named_by_its_line_in_the_file_whatever_the_byte_range(tmp_path):
    """A task reads a byte range from the middle of the file: the error still names the
    file's own line number (and byte)."""
    path = tmp_path / "c.jsonl"
    jsonl_corpus(path, docs=40, bad=(31,))
    offset = sum(len(line) for line in path.read_bytes().splitlines(keepends=True)[:30])
    sources = plan_sources(str(path), chunk_bytes=500)
    assert len(sources) > 3
    with pytest.raises(DataError, match=rf"{path} line 31 \(byte {offset}\) is not a JSON object; fix or delete"):
        for source in sources:
            list(source.docs())
    skipped = [doc for s in plan_sources(str(path), chunk_bytes=500, on_bad_lines="skip") for doc in s.docs()]
    assert len(skipped) == 40 and [d for d in skipped if d[1] is None] == [(f"c.jsonl#{offset}", None)]


# --- the CLI: errors raised in Ray tasks reach the user as one line -----------------------

def test_pairs_on_a_corpus_with_bad_lines(ray_cluster, tmp_path, capsys, caplog):
    """Issue 27's case: 40 lines, 2 broken, was 40 documents. Now the error names the first
    broken line (raised in a Ray task); skipping counts 38 documents and the 2 lines."""
    corpus = jsonl_corpus(tmp_path / "c.jsonl", docs=40, bad=(7, 23))
    args = ["intermediate", "pairs", "--corpus", corpus, "--num-examples", "30"]
    assert cli([*args, "--out", str(tmp_path / "strict")]) == 2
    assert f"{corpus} line 7 (byte " in one_line(capsys)
    with caplog.at_level(logging.WARNING):
        assert cli([*args, "--out", str(tmp_path / "skip"), "on_bad_lines=skip"]) == 0
    meta = shards.read_meta(str(tmp_path / "skip"))
    assert (meta["corpus_counts"]["documents"], meta["corpus_counts"]["bad_lines"]) == (38, 2)
    assert [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()] == [
        f"{corpus}: skipped 2 line(s) that do not parse (on_bad_lines=skip)"]
    assert all(type(v) is int for e in meta["shards"].values() for v in (e["rows"], e["bytes"]))


def test_sentiment_bad_line_through_ray_data(ray_cluster, tiny_bert, tmp_path, capsys):
    corpus = jsonl_corpus(tmp_path / "c.jsonl", docs=8, bad=(5,))
    args = ["intermediate", "sentiment", "--corpus", corpus, "--teacher", tiny_bert]
    assert cli([*args, "--out", str(tmp_path / "strict")]) == 2
    assert f"{corpus} line 5 (byte " in one_line(capsys, ray_data=True)
    assert cli([*args, "--out", str(tmp_path / "skip"), "--threshold", "0", "on_bad_lines=skip"]) == 0
    table = shards.read_meta(str(tmp_path / "skip" / "_sentences"))
    assert (table["counts"]["documents"], table["counts"]["bad_lines"]) == (7, 1)
    meta = shards.read_meta(str(tmp_path / "skip"))
    assert sum(e["rows"] for e in meta["shards"].values()) == meta["examples"] == 28


def test_mlm_text_chunks_go_through_the_shard_writer(ray_cluster, tmp_path):
    corpus = jsonl_corpus(tmp_path / "c.jsonl", docs=40, bad=(3, 4))
    with pytest.raises(DataError, match=r"c.jsonl line 3 \(byte"):
        build_text_chunks(corpus, str(tmp_path / "strict"), 32, 2)
    out = build_text_chunks(corpus, str(tmp_path / "out"), 32, 2, on_bad_lines="skip")
    meta = shards.read_meta(out)
    assert meta["bad_lines"] == 2 and sum(e["rows"] for e in meta["shards"].values()) > 0
    assert shards.shard_uris(out)


@pytest.fixture(scope="module")
def damaged(tiny_bert, tmp_path_factory):
    """A pairs folder and a teacher cache as their stages write them (one shard writer,
    `_meta.json`), then one shard of each replaced by half its rows, and a pairs folder
    with a garbage shard."""
    from rayapp.modeling.models import load_tokenizer, vocab_fingerprint

    root = tmp_path_factory.mktemp("damaged")
    rows = [{"text_a": s, "text_b": SENTENCES[(i + 1) % 4], "label": i % 3} for i, s in enumerate(SENTENCES * 4)]
    cache_rows = [{"input_ids": [101, 7, 102], "mask_pos": 1, "topk_values": [0.0], "topk_indices": [5],
                   "lse": 0.0, "covered": 1.0}] * 16
    layouts = {"pairs": ("part-00000.parquet", rows, {"task": "smash-pairs"}),
               "garbage": ("part-00000.parquet", rows, {"task": "smash-pairs"}),
               "cache": ("part-00000-00000.parquet", cache_rows,
                         {"stage": "teacher-cache", "plan": {"task": "smash-pairs"},
                          "vocab_fingerprint": vocab_fingerprint(load_tokenizer(tiny_bert))})}
    for folder, (name, table_rows, meta) in layouts.items():
        uri = str(root / folder / name)
        entry = shards.write_table(uri, pa.Table.from_pylist(table_rows))
        shards.write_meta(str(root / folder), {**meta, "files": [name]}, {name: entry})
        pq.write_table(pa.Table.from_pylist(table_rows[:8]), uri)
    (root / "garbage" / "part-00000.parquet").write_bytes(b"PAR1 and then nothing")
    for name, kind in (("empty.jsonl", "jsonl"), ("empty.txt", "text")):
        (root / name).write_text("")
    return root


def _driver_cases(tiny, root, out):
    cache = ["teacher-cache", "--teacher", tiny, "--out", f"{out}/cache"]
    half = r"holds 8 rows but _meta.json lists 16: the shard is damaged or from another build; delete "
    return {  # name: (argv, what the one line must say)
        "teacher-cache, examples shard with half its rows": (
            [*cache, "--examples", f"{root}/pairs"], rf"{root}/pairs/part-00000.parquet {half}{root}/pairs and re-run"),
        "teacher-cache, garbage examples shard": (
            [*cache, "--examples", f"{root}/garbage"], rf"cannot read {root}/garbage/part-00000.parquet \("),
        "distill, cache shard with half its rows": (
            ["distill", f"output_dir={out}/distill", "max_steps=1", f"student={tiny}", f"teacher={tiny}",
             f"data={root}/cache"], rf"{root}/cache/part-00000-00000.parquet {half}"),
        "pairs, empty corpus": (
            ["intermediate", "pairs", "--corpus", f"{root}/empty.jsonl", "--out", f"{out}/pairs",
             "--num-examples", "3"],
            rf"corpus {root}/empty.jsonl holds no documents: its files are empty"),
        "sentiment, empty corpus": (
            ["intermediate", "sentiment", "--corpus", f"{root}/empty.txt", "--teacher", tiny, "--out", f"{out}/sent"],
            rf"corpus {root}/empty.txt holds no documents: its files are empty"),
    }


@pytest.fixture(scope="module")
def driver_results(tiny_bert, damaged, tmp_path_factory):
    cases = _driver_cases(tiny_bert, damaged, tmp_path_factory.mktemp("out"))
    # a fresh shell: not the address of the session's cluster, which `ray.init` exported
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps({k: v[0] for k, v in cases.items()}),
                          capture_output=True, text=True, check=True, env=env)
    return {name: (json.loads(done.stdout.splitlines()[-1])[name], cases[name][1]) for name in cases}


@pytest.mark.parametrize("case", list(_driver_cases("TINY", "ROOT", "OUT")))
def test_damaged_or_empty_input_is_one_line_before_ray_starts(driver_results, case):
    assert_one_line_error(*driver_results[case])
