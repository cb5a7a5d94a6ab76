"""SMASH sentence pairs: every label checked against a made-up source corpus, exact counts,
determinism, capacity and bad-input errors, a killed build, s3:// in and out, the CLI."""
import itertools
import json
import uuid

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest

from rayapp import storage
from rayapp.cli import main as cli
from rayapp.data import pairs
from rayapp.data.pairs import PAIRS_SCHEMA, TASK, _far_pair, _source_pairs, build_pairs, label_counts, max_balanced
from rayapp.data.shards import require_meta
from rayapp.errors import ConfigError, DataError
from rayapp.tasks.registry import INTERMEDIATE_TASKS

# Sentence units of each document in source order; a unit's index is its position (sent_*).
# Position 0 is the title line, dropped as a fragment; doc 8 has a heading mid-text and
# doc 6 a sentence with a non-UTF-8 byte, so both have a gap; doc 7 has one sentence.
UNITS = {str(d): [f"T{d}"] + [f"Doc {d} states fact {i} plainly." for i in range(5 + d % 4)]
         for d in range(1, 7)}
UNITS["6"][2] = "Doc 6 has one \ufffd byte."
UNITS["7"] = ["T7", "Doc 7 has only this sentence."]
UNITS["8"] = ["T8", "Doc 8 opens with this sentence.", "Doc 8 goes on with more.", "Heading here.",
              "Doc 8 ends this sentence."]
KEPT = {d: [p for p, s in enumerate(u) if p > 0 and "\ufffd" not in s and s != "Heading here."]
        for d, u in UNITS.items()}


def raw_doc(doc_id: str) -> bytes:
    """Title line, blank line, then paragraphs of three sentences (heading on its own line)."""
    body = UNITS[doc_id][1:]
    lines, paragraph = [], []
    for sentence in body:
        if sentence == "Heading here.":
            lines += [" ".join(paragraph), sentence]
            paragraph = []
            continue
        paragraph.append(sentence)
        if len(paragraph) == 3:
            lines.append(" ".join(paragraph))
            paragraph = []
    lines += [" ".join(paragraph)] if paragraph else []
    text = f'<doc id="{doc_id}" url="http://x/{doc_id}" title="T{doc_id}">\nT{doc_id}\n\n' + "\n".join(lines) + "\n</doc>\n"
    return text.encode().replace("\ufffd".encode(), b"\xff")


def capacity() -> list[int]:
    sizes = [len(k) for k in KEPT.values()]
    adjacent = sum(int(np.sum(np.diff(k) == 1)) for k in KEPT.values())
    return [sum(sizes) ** 2 - sum(s * s for s in sizes),
            sum(s * (s - 1) for s in sizes) - 2 * adjacent, adjacent]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("corpus")
    (root / "wiki_00").write_bytes(b"".join(raw_doc(d) for d in "123"))
    (root / "wiki_01").write_bytes(b"".join(raw_doc(d) for d in "45678"))
    return str(root)


@pytest.fixture(scope="module")
def built(ray_cluster, corpus, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("pairs") / "out")
    return out, build_pairs(corpus=corpus, out=out, num_examples=40, seed=0, rows_per_shard=16)


def read_pairs(out: str):
    files = storage.list_files(out, suffix=".parquet")
    fs, _ = storage.filesystem(out)
    return pq.read_table([storage.filesystem(f)[1] for f in files], filesystem=fs)


def assert_true_to_source(rows: list[dict]) -> None:
    for r in rows:
        assert r["text_a"] == UNITS[r["doc_a"]][r["sent_a"]] and r["text_b"] == UNITS[r["doc_b"]][r["sent_b"]]
        assert r["sent_a"] in KEPT[r["doc_a"]] and r["sent_b"] in KEPT[r["doc_b"]]
        if r["label"] == 0:
            assert r["doc_a"] != r["doc_b"]
        elif r["label"] == 1:
            assert r["doc_a"] == r["doc_b"] and abs(r["sent_b"] - r["sent_a"]) > 1
        else:
            assert r["label"] == 2 and r["doc_a"] == r["doc_b"] and r["sent_b"] == r["sent_a"] + 1
            source = raw_doc(r["doc_a"]).decode(errors="replace")
            assert (r["text_a"] + " " + r["text_b"] in source) or (r["text_a"] + "\n" + r["text_b"] in source)
    keys = [(r["doc_a"], r["sent_a"], r["doc_b"], r["sent_b"]) for r in rows]
    assert len(set(keys)) == len(keys), "pairs must be distinct"


# --- pure helpers --------------------------------------------------------------------------

def test_label_counts_and_max_balanced():
    assert label_counts(40) == [14, 13, 13] and label_counts(2) == [1, 1, 0]
    assert max_balanced([100, 100, 7]) == 23  # N=23 -> [8, 8, 7]
    assert max_balanced([5, 0, 0]) == 1


def test_far_pairs_in_row_major_order():
    for k in [3, 4, 7, 50, 201]:
        f = np.arange((k - 1) * (k - 2) // 2)
        i, j = _far_pair(f, np.full(len(f), k))
        assert list(zip(i.tolist(), j.tolist())) == [(i, j) for i in range(k) for j in range(i + 2, k)]
    # a 10^6-sentence document, at row ends and starts, where float rounding would show
    k, rows = 10**6, np.array([1, 2, 999, 123_456, 999_997])
    start = rows * (2 * k - 3 - rows) // 2
    i, j = _far_pair(np.concatenate([start, start - 1]), np.full(10, k))
    assert (i.tolist(), j.tolist()) == ([*rows, *(rows - 1)], [*(rows + 2), *[k - 1] * 5])


def test_source_pairs_cover_each_pair_once():
    """All label-1 / label-2 pairs of a source whose documents have every pattern of gaps
    (a dropped sentence between two kept ones) for up to 6 kept sentences."""
    docs, positions = [], []
    for k in range(1, 7):
        for steps in itertools.product([1, 2], repeat=k - 1):
            docs += [len(set(docs))] * k
            positions += np.concatenate([[0], np.cumsum(steps)]).tolist()
    doc, pos = np.array(docs), np.array(positions)
    same = [(i, j) for i in range(len(doc)) for j in range(len(doc)) if i != j and doc[i] == doc[j]]
    for label, wanted in ((1, [p for p in same if abs(pos[p[0]] - pos[p[1]]) > 1]),
                          (2, [p for p in same if pos[p[1]] == pos[p[0]] + 1])):
        a, b = _source_pairs(doc, pos, label, np.arange(len(wanted)))
        assert sorted(zip(a.tolist(), b.tolist())) == sorted(wanted)


# --- build_pairs ---------------------------------------------------------------------------

def test_pairs_are_balanced_and_true_to_source(built):
    out, stats = built
    table = read_pairs(out)
    assert table.schema.names == PAIRS_SCHEMA.names
    rows = table.to_pylist()
    assert len(rows) == 40
    assert [sum(r["label"] == label for r in rows) for label in range(3)] == [14, 13, 13]
    assert_true_to_source(rows)
    assert storage.list_files(out) == [storage.join(out, f) for f in
                                       ("_meta.json", "part-00000.parquet", "part-00001.parquet", "part-00002.parquet")]
    labels = table.column("label").to_pylist()
    assert labels != sorted(labels) and labels != sorted(labels, reverse=True), "labels are interleaved"


def test_stats_and_meta_count_what_was_skipped(built):
    out, stats = built
    meta = json.loads(storage.read_text(storage.join(out, "_meta.json")))
    assert {k: v for k, v in meta.items() if k != "shards"} == stats
    assert [e["rows"] for e in meta["shards"].values()] == [16, 16, 8]  # rows_per_shard=16
    assert stats["counts"] == {"0": 14, "1": 13, "2": 13}
    assert stats["template"] == INTERMEDIATE_TASKS[TASK].template == "{x0|nopunct}? {mask}, {x1|lowerfirst}"  # MNLI's
    assert stats["seed"] == 0 and stats["verbalizer"] == {"0": "No", "1": "Maybe", "2": "Yes"}
    assert stats["capacity"] == {str(label): c for label, c in enumerate(capacity())}
    counts = stats["corpus_counts"]
    assert (counts["documents"], counts["single"], counts["undecodable"], counts["fragments"]) == (8, 1, 1, 9)
    assert counts["headings"] == 0
    assert counts["sentences"] == sum(len(k) for k in KEPT.values())


def test_same_seed_same_bytes_other_seed_differs(built, tmp_path):
    out, _ = built
    again = build_pairs(corpus=built[1]["corpus"], out=str(tmp_path / "again"), num_examples=40, seed=0,
                        rows_per_shard=16)
    for name in again["files"]:
        assert storage.read_bytes(storage.join(out, name)) == storage.read_bytes(str(tmp_path / "again" / name))
    build_pairs(corpus=built[1]["corpus"], out=str(tmp_path / "other"), num_examples=40, seed=1, rows_per_shard=16)
    assert read_pairs(str(tmp_path / "other")).to_pylist() != read_pairs(out).to_pylist()
    # the same pairs in the same rows when the corpus is cut into other pieces or shards
    build_pairs(corpus=built[1]["corpus"], out=str(tmp_path / "cut"), num_examples=40, seed=0, chunk_bytes=300)
    assert read_pairs(str(tmp_path / "cut")).to_pylist() == read_pairs(out).to_pylist()


def test_largest_possible_request_uses_every_adjacent_pair(ray_cluster, corpus, tmp_path):
    n = max_balanced(capacity())
    stats = build_pairs(corpus=corpus, out=str(tmp_path / "max"), num_examples=n)
    rows = read_pairs(str(tmp_path / "max")).to_pylist()
    assert len(rows) == n and stats["counts"] == {str(label): c for label, c in enumerate(label_counts(n))}
    assert sum(r["label"] == 2 for r in rows) == capacity()[2]
    assert_true_to_source(rows)
    with pytest.raises(DataError, match=rf"can supply at most {n} balanced pairs, {n + 1} were asked: "
                                        rf"{capacity()[2]} adjacent pairs"):
        build_pairs(corpus=corpus, out=str(tmp_path / "toomany"), num_examples=n + 1)


def test_pairs_to_and_from_s3(ray_cluster, s3_server, corpus):
    bucket = f"pairs-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    for name in ("wiki_00", "wiki_01"):
        s3.upload_file(f"{corpus}/{name}", bucket, f"corpus/{name}")
    stats = build_pairs(corpus=f"s3://{bucket}/corpus", out=f"s3://{bucket}/pairs", num_examples=12)
    rows = read_pairs(f"s3://{bucket}/pairs").to_pylist()
    assert len(rows) == 12 and stats["counts"] == {"0": 4, "1": 4, "2": 4}
    assert_true_to_source(rows)
    assert json.loads(storage.read_text(f"s3://{bucket}/pairs/_meta.json"))["corpus"] == f"s3://{bucket}/corpus"


def test_only_one_sentence_documents(ray_cluster, tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "one.txt").write_text("A lone sentence stands here.\n\nAnother lone sentence is here.\n\n"
                                            "A third lone sentence is here.\n")
    with pytest.raises(DataError, match=r"can supply at most 1 balanced pairs, 3 were asked: 0 adjacent pairs "
                                        r".* \(3 documents with one usable sentence give label 0 only\)"):
        build_pairs(corpus=str(tmp_path / "c"), out=str(tmp_path / "out"), num_examples=3)


def test_empty_corpora(ray_cluster, tmp_path):
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("\n  \n\n")
    with pytest.raises(DataError, match=r"corpus .*blank holds no documents"):
        build_pairs(corpus=str(tmp_path / "blank"), out=str(tmp_path / "o1"), num_examples=3)
    (tmp_path / "frag").mkdir()
    (tmp_path / "frag" / "a.txt").write_text("Too short.\n\nno final punctuation in this one\n")
    with pytest.raises(DataError, match=r"has 2 documents but no usable sentence: dropped 2 fragments"):
        build_pairs(corpus=str(tmp_path / "frag"), out=str(tmp_path / "o2"), num_examples=3)
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match=r"corpus .*none holds no files"):
        build_pairs(corpus=str(tmp_path / "none"), out=str(tmp_path / "o3"), num_examples=3)


def test_refuses_existing_output_and_bad_count(built):
    out, stats = built
    with pytest.raises(DataError, match=r"already holds parquet files or _meta.json; pass a new --out"):
        build_pairs(corpus=stats["corpus"], out=out, num_examples=3)
    with pytest.raises(ConfigError, match=r"num_examples must be at least 1, got 0"):
        build_pairs(corpus=stats["corpus"], out=out + "-new", num_examples=0)


def test_killed_build_leaves_no_finished_looking_folder(ray_cluster, corpus, tmp_path, monkeypatch):
    """A build that dies after its shards and before `_meta.json`: every shard that exists
    is whole (written under a temporary name, then renamed), and a consumer refuses the
    folder, naming it."""
    def crash(out, meta, written):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(pairs, "write_meta", crash)
    out = str(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        build_pairs(corpus, out, num_examples=40, rows_per_shard=16)
    files = sorted(f.rsplit("/", 1)[-1] for f in storage.list_files(out))
    assert files == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert sum(pq.read_metadata(f"{out}/{name}").num_rows for name in files) == 40
    with pytest.raises(DataError, match=rf"{out} has no _meta.json"):
        require_meta(out)
    with pytest.raises(DataError, match=r"already holds parquet files"):  # no silent mix with a re-run
        build_pairs(corpus, out, num_examples=40, rows_per_shard=16)


def test_cli_takes_a_config_file_and_overrides(ray_cluster, corpus, tmp_path, capsys):
    (tmp_path / "pairs.yaml").write_text(f"corpus: {corpus}\nnum_examples: 1000\nseed: 3\n")
    out = str(tmp_path / "cli")
    assert cli(["intermediate", "pairs", "--config", str(tmp_path / "pairs.yaml"), f"out={out}",
                "num_examples=9", "rows_per_shard=4"]) == 0
    meta = require_meta(out)
    assert (meta["num_examples"], meta["seed"], meta["files"]) == (9, 3, [f"part-0000{i}.parquet" for i in range(3)])
    assert cli(["intermediate", "pairs", "--corpus", corpus, "--out", str(tmp_path / "flags"), "--num-examples", "6"]) == 0
    assert require_meta(str(tmp_path / "flags"))["counts"] == {"0": 2, "1": 2, "2": 2}
    assert cli(["intermediate", "pairs", f"corpus={corpus}", f"out={tmp_path / 'x'}", "num_examples=6",
                "min_words=9", "max_words=3"]) == 2
    assert "need 1 <= min_words <= max_words, got 9 and 3" in capsys.readouterr().err
