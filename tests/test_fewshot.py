"""Few-shot splits: LM-BFF's published files for every task, sampling, writing/reading back,
every table format, and the error messages for bad input."""
from __future__ import annotations

import collections
import json
import logging
import os
import subprocess
import sys

import pytest

from rayapp.assets import REPO_ROOT, asset
from rayapp.errors import DataError
from rayapp.data.fewshot import (
    SEEDS,
    TEST_SOURCES,
    Columns,
    Example,
    _hf_table,
    draw_lmbff_split,
    holds_split,
    load_lmbff,
    make_splits,
    read_table,
    sample_fewshot,
)
from rayapp.tasks.registry import BUILTIN_TASKS, get_task


@pytest.fixture(scope="module")
def sst2_pool() -> list[Example]:
    return read_table(asset("fewshot", "pool", "SST-2", "train.json"), None, "SST-2")


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name", [name for name in BUILTIN_TASKS if name != "MNLI-mm"])
def test_load_lmbff_every_task_has_k_per_label(name, caplog):
    task = get_task(name)
    with caplog.at_level(logging.WARNING, logger="rayapp.data.fewshot"):
        split = load_lmbff(None, name, k=16, seed=13)
    assert (split.task, split.k, split.seed) == (name, 16, 13)
    assert len(split.train) == len(split.dev) == 16 * (2 if task.is_regression else len(task.labels))
    assert len(split.test) > 100
    if task.is_regression:
        assert all(isinstance(ex.label, float) and 0 <= ex.label <= 5 for ex in split.train + split.test)
        assert sum(ex.label >= 2.5 for ex in split.train) == 16  # LM-BFF's two bins, K each
    else:
        assert collections.Counter(ex.label for ex in split.train) == {label: 16 for label in task.labels}
        assert collections.Counter(ex.label for ex in split.dev) == {label: 16 for label in task.labels}
    assert all((ex.text_b is not None) == (task.num_inputs == 2) for ex in split.train + split.test)
    # LM-BFF has no test file here for these: the pool's dev split stands in, loudly and on record
    fallback = name in ("MNLI", "SNLI", "QQP")
    assert split.source["test_fallback"] == fallback
    assert split.source["test_source"] == ("pool (not the original dev set)" if fallback else "original (LM-BFF test file)")
    assert ("not the original dev set" in caplog.text) == fallback
    assert split.source["test"].endswith("dev.json" if fallback else ("tsv", "csv"))


def test_mnli_mm_is_not_mnli():
    """Without the mismatched test set MNLI-mm refuses: the pool (matched genres) would make it MNLI."""
    message = r"MNLI/16-13/test_mismatched.tsv does not exist and task MNLI-mm has no stand-in .*mismatched genres.*dev_mismatched"
    with pytest.raises(DataError, match=message):
        load_lmbff(None, "MNLI-mm")


def test_mnli_mm_reads_the_mismatched_test_file(tmp_path):
    seed_dir = tmp_path / "MNLI" / "16-13"
    seed_dir.mkdir(parents=True)
    source = asset("fewshot", "k-shot", "MNLI", "16-13")
    for name in ("train.tsv", "dev_matched.tsv"):
        write(seed_dir / name, (source / name).read_text(encoding="utf-8"))
    header = (source / "train.tsv").read_text(encoding="utf-8").splitlines()[0]
    fields = ["0"] * (header.count("\t") + 1)
    fields[8:10], fields[-1] = ["A letter from abroad.", "Nobody wrote."], "contradiction"
    write(seed_dir / "test_mismatched.tsv", header + "\n" + "\t".join(fields) + "\n")
    split = load_lmbff(tmp_path, "MNLI-mm")
    assert split.test == [Example("A letter from abroad.", "Nobody wrote.", "contradiction")]
    assert (split.source["test_source"], split.source["test_fallback"]) == ("original (LM-BFF test file)", False)


def test_load_lmbff_reads_task_specific_columns():
    # each case exercises one format quirk: BOM'd MRPC header, headerless CoLA, SNLI's long rows
    mrpc = load_lmbff(None, "MRPC").train[0]
    assert mrpc.text_a.startswith("The court 's 1992 decision") and mrpc.text_b.startswith("In a 1992 case")
    cola = load_lmbff(None, "CoLA").train[0]
    assert cola == Example("Bill seems to be obnoxious, but I don't think that Sam tends.", None, "0")
    snli = load_lmbff(None, "SNLI").train[0]
    assert (snli.text_b, snli.label) == ("a girl wears black", "entailment")
    # quoted CSV field with commas inside
    assert load_lmbff(None, "sst-5").train[0].text_a.startswith("what 's surprising about this traditional thriller , mod")


def test_fallback_test_drops_examples_seen_in_train_or_dev(tmp_path):
    seed_dir = tmp_path / "k-shot" / "QQP" / "16-13"
    seed_dir.mkdir(parents=True)
    header = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    rows = [f"{i}\t0\t0\tq{i}?\tp{i}?\t{i % 2}\n" for i in range(4)]
    write(seed_dir / "train.tsv", header + "".join(rows[:2]))
    write(seed_dir / "dev.tsv", header + "".join(rows[2:]))
    pool = {str(i): {"text_a": f"q{i}?", "text_b": f"p{i}?", "label": str(i % 2)} for i in (1, 7, 8)}
    (tmp_path / "pool" / "QQP").mkdir(parents=True)
    write(tmp_path / "pool" / "QQP" / "dev.json", json.dumps(pool))
    split = load_lmbff(tmp_path / "k-shot", "QQP")
    assert [ex.text_a for ex in split.test] == ["q7?", "q8?"]
    assert split.source["test_fallback"] and split.source["test_source"] == TEST_SOURCES["pool"]
    assert "1 also in train/dev removed" in split.source["test_note"]


def test_sample_fewshot_k_per_label_disjoint_and_reproducible(sst2_pool):
    train, dev = sample_fewshot(sst2_pool, "SST-2", k=8, seed=13)
    assert collections.Counter(ex.label for ex in train) == collections.Counter(ex.label for ex in dev) == {"0": 8, "1": 8}
    assert not set(train) & set(dev)
    assert (train, dev) == sample_fewshot(sst2_pool, "SST-2", k=8, seed=13)
    assert train != sample_fewshot(sst2_pool, "SST-2", k=8, seed=21)[0]
    # regression: two bins at the range's midpoint, K each
    stsb = [Example(f"a{i}", f"b{i}", i / 10) for i in range(51)]
    train, dev = sample_fewshot(stsb, "STS-B", k=4, seed=42)
    assert sum(ex.label >= 2.5 for ex in train) == sum(ex.label < 2.5 for ex in dev) == 4


def test_sample_fewshot_never_picks_empty_text():
    pool = [Example(" ", None, "0"), Example("", None, "1")] + [Example(f"s{i}", None, str(i % 2)) for i in range(4)]
    train, dev = sample_fewshot(pool, "SST-2", k=1, seed=0)
    assert all(ex.text_a.startswith("s") for ex in train + dev)


def test_make_splits_writes_and_load_lmbff_reads_back(tmp_path):
    pool = [Example(f"premise {i}", f"hypothesis\t{i} \"q\"", label) for i in range(6) for label in get_task("RTE").labels]
    pool.append(Example("", "empty premise", "entailment"))
    test = [Example("t", "u", "entailment")]
    splits = make_splits(pool, test, "RTE", k=2, seeds=(13, 21), out_dir=tmp_path)
    assert [s.seed for s in splits] == [13, 21] and splits[0].train != splits[1].train
    assert splits[0].source["empty_text_skipped"] == 1
    assert splits[0].source["test_source"] == "given to make_splits" and not splits[0].source["test_fallback"]
    assert (tmp_path / "RTE" / "2-21" / "dev.jsonl").is_file()
    for split in splits:
        back = load_lmbff(tmp_path, "RTE", k=2, seed=split.seed)
        assert (back.train, back.dev, back.test) == (split.train, split.dev, test)
        assert back.source["test_source"] == "given to make_splits"
    scores = [Example("a", "b", x / 2) for x in range(11)]
    (stsb,) = make_splits(scores, [Example("a", "b", 1.5)], "STS-B", k=2, seeds=(13,), out_dir=tmp_path)
    assert load_lmbff(tmp_path, "STS-B", k=2, seed=13).train == stsb.train  # float labels survive JSONL


def test_make_splits_default_seeds_are_lmbff():
    pool = [Example(f"s{i}", None, str(i % 2)) for i in range(20)]
    assert [s.seed for s in make_splits(pool, pool[:1], "SST-2", k=2)] == list(SEEDS) == [13, 21, 42, 87, 100]


def test_lmbff_procedure_gives_lmbffs_published_sst2_splits(tmp_path):
    """LM-BFF's SST-2 splits come from its original train file (6,920 sentences), which the
    local assets lack; `shared/data/glue/SST-2/train.tsv` cannot give them (ALPS's 60,614-row
    re-split of GLUE's 67,349 phrases, in another order: numpy's shuffle of n rows depends on n
    and the order). tests/data holds that file's row order and labels (from a public copy) and
    where each published split's line sits in it: a table of that shape, the published
    sentences at their rows, must give back LM-BFF's train.tsv and dev.tsv line for line."""
    original = json.loads((REPO_ROOT / "tests" / "data" / "lmbff_sst2_train_order.json").read_text())
    published = {seed: load_lmbff(None, "SST-2", 16, seed) for seed in SEEDS}
    text = {row: ex.text_a for seed, where in original["positions"].items() for part in ("train", "dev")
            for row, ex in zip(where[part], getattr(published[int(seed)], part))}
    rows = [f"{text.get(i, f'sentence {i} of the original train set')}\t{label}"
            for i, label in enumerate(original["labels"])]
    train = write(tmp_path / "train.tsv", "sentence\tlabel\n" + "\n".join(rows) + "\n")
    for seed in SEEDS:
        drawn = draw_lmbff_split(None, "SST-2", 16, seed, str(tmp_path / "out"), train=str(train))
        assert (drawn.train, drawn.dev, drawn.test) == (published[seed].train, published[seed].dev, published[seed].test)
        assert drawn.source["pool"] == str(train) and drawn.source["pool_kind"] == "original train set"


def test_a_missing_k_is_drawn_from_the_pool_once(tmp_path):
    """K=32 is not in the assets: drawn from the labelled pool beside them (its source says so),
    test = the 16-shot split's test file; a second call reads the written split back."""
    out = str(tmp_path / "splits")
    assert holds_split(None, "SST-2", 16, 13) and not holds_split(None, "SST-2", 32, 13)
    split = draw_lmbff_split(None, "SST-2", 32, 13, out)
    assert collections.Counter(ex.label for ex in split.dev) == {"0": 32, "1": 32} and holds_split(out, "SST-2", 32, 13)
    assert split.source["pool"].endswith("pool/SST-2/train.json") and "not the split LM-BFF" in split.source["pool_kind"]
    assert split.source["test"].endswith("16-13/test.tsv") and split.test == load_lmbff(None, "SST-2", 16, 13).test
    assert draw_lmbff_split(None, "SST-2", 32, 13, out, train="/nowhere.tsv").train == split.train
    with pytest.raises(DataError, match=r"SST-2 split 4000-13 from .*train.json: task SST-2: label '\d' has \d+ usable"):
        draw_lmbff_split(None, "SST-2", 4000, 13, out)


CLEAN = [("a good film", "1"), ('he said "fine", then left', "0")]


@pytest.mark.parametrize("ext", ["tsv", "csv", "jsonl", "json", "parquet"])
def test_read_table_formats_with_column_mapping(tmp_path, ext):
    path = tmp_path / f"t.{ext}"
    records = [{"id": i, "review": text, "stars": label} for i, (text, label) in enumerate(CLEAN)]
    if ext == "tsv":  # GLUE style: bare quotes, no quoting
        write(path, "id\treview\tstars\n" + "".join(f"{r['id']}\t{r['review']}\t{r['stars']}\n" for r in records))
    elif ext == "csv":
        write(path, 'id,review,stars\n0,a good film,1\n1,"he said ""fine"", then left",0\n')
    elif ext == "jsonl":
        write(path, "".join(json.dumps(r) + "\n" for r in records))
    elif ext == "json":
        write(path, json.dumps(records))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([{**r, "stars": int(r["stars"])} for r in records]), path)
    assert read_table(path, Columns(text_a="review", label="stars"), "SST-2") == [Example(t, None, y) for t, y in CLEAN]


def test_read_table_positions_without_header_and_pool_json(tmp_path):
    path = write(tmp_path / "t.csv", '1,"great, really"\n0,bad\n')
    expected = [Example("great, really", None, "1"), Example("bad", None, "0")]
    assert read_table(path, Columns(text_a=1, label=0), "mr", header=False) == expected
    pool = write(tmp_path / "pool.json", json.dumps({"0": {"text_a": "a", "text_b": "b", "label": "neutral"}}))
    assert read_table(pool, None, "SNLI") == [Example("a", "b", "neutral")]
    assert read_table(pool, None, "snli", fmt="json")[0].label == "neutral"  # task names are case-insensitive


def test_hf_classlabel_ints_become_label_names():
    import datasets

    features = datasets.Features(
        {"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
         "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"])}
    )
    ds = datasets.Dataset.from_dict({"premise": ["p"], "hypothesis": ["h"], "label": [2]}, features=features)
    names, rows = _hf_table(ds, "hf://nyu-mll/glue?config=mnli&split=train")
    assert names == ["premise", "hypothesis", "label"] and rows == [["p", "h", "contradiction"]]


# --- bad input: every message names the input and says what to do ---------------------------


def test_missing_task_folder_lists_what_exists(tmp_path):
    (tmp_path / "SST-2").mkdir()
    with pytest.raises(DataError, match=r"RTE/16-13/train.tsv does not exist \(.* holds: SST-2\)"):
        load_lmbff(tmp_path, "RTE")


def test_missing_seed_folder_lists_seeds():
    with pytest.raises(DataError, match=r"SST-2/16-14/train.tsv does not exist .*holds: 16-100, 16-13, 16-21, 16-42, 16-87\)"):
        load_lmbff(None, "SST-2", seed=14)


def test_missing_test_without_pool_says_what_to_add(tmp_path):
    seed_dir = tmp_path / "SST-2" / "16-13"
    seed_dir.mkdir(parents=True)
    for name in ("train", "dev"):
        write(seed_dir / f"{name}.tsv", "sentence\tlabel\nok\t1\n")
    message = r"test.tsv does not exist \(.*holds: dev.tsv, train.tsv\); put the task's labelled test file there"
    with pytest.raises(DataError, match=message):
        load_lmbff(tmp_path, "SST-2")


def test_missing_column_lists_available(tmp_path):
    path = write(tmp_path / "t.tsv", "text\tlabel\nok\t1\n")
    with pytest.raises(DataError, match=r"t.tsv has no column 'sentence'; its columns are \['text', 'label'\]"):
        read_table(path, Columns(), "SST-2")


def test_name_without_header_asks_for_positions(tmp_path):
    path = write(tmp_path / "t.csv", "1,ok\n")
    with pytest.raises(DataError, match=r"without a header.*give 0-based positions"):
        read_table(path, Columns(), "mr", header=False)


def test_unknown_label_lists_task_labels(tmp_path):
    path = write(tmp_path / "t.jsonl", '{"sentence": "ok", "label": "1"}\n{"sentence": "meh", "label": "positive"}\n')
    message = r"t.jsonl row 2 column 'label': label 'positive' is not one of task SST-2's labels \['0', '1'\]"
    with pytest.raises(DataError, match=message):
        read_table(path, Columns(), "SST-2")


def test_regression_label_out_of_range(tmp_path):
    path = write(tmp_path / "t.jsonl", '{"a": "x", "b": "y", "score": "7"}\n')
    message = r"row 1 column 'score': label '7' is not a number in task STS-B's range \[0.0, 5.0\]"
    with pytest.raises(DataError, match=message):
        read_table(path, Columns("a", "b", "score"), "STS-B")


def test_too_few_examples_for_a_label(sst2_pool):
    pool = [ex for ex in sst2_pool if ex.label == "1"][:100] + [ex for ex in sst2_pool if ex.label == "0"][:20]
    message = r"label '0' has 20 usable examples .* a 16-shot split needs 32 \(16 train \+ 16 dev\)"
    with pytest.raises(DataError, match=message):
        sample_fewshot(pool, "SST-2", k=16, seed=13)


def test_empty_table(tmp_path):
    path = write(tmp_path / "t.tsv", "sentence\tlabel\n")
    with pytest.raises(DataError, match=r"t.tsv has no data rows"):
        read_table(path, Columns(), "SST-2")


def test_unsupported_extension(tmp_path):
    path = write(tmp_path / "t.xlsx", "x")
    message = r"cannot tell the format of .*t.xlsx from its extension 'xlsx'; supported: .tsv .csv"
    with pytest.raises(DataError, match=message):
        read_table(path, Columns(), "SST-2")


def test_pair_task_without_text_b(tmp_path):
    path = write(tmp_path / "t.tsv", "sentence\tlabel\nok\tentailment\n")
    with pytest.raises(DataError, match=r"task RTE takes two inputs: set Columns.text_b"):
        read_table(path, Columns(), "RTE")


def test_short_row_names_row_and_column(tmp_path):
    path = write(tmp_path / "t.tsv", "sentence\tlabel\nok\t1\nbroken\n")
    with pytest.raises(DataError, match=r"t.tsv line 3 has 1 fields but the header has 2; fix or delete that line, "
                                        r"or pass on_bad_lines=skip"):
        read_table(path, Columns(), "SST-2")


def test_bad_hf_uri():
    with pytest.raises(DataError, match=r"cannot parse 'hf://a/b/c'; use hf://NAME, hf://NAME/CONFIG"):
        read_table("hf://a/b/c", Columns(), "SST-2")


def test_split_does_not_depend_on_hash_seed(sst2_pool):
    code = (
        "from rayapp.assets import asset; from rayapp.data.fewshot import read_table, sample_fewshot; "
        "pool = read_table(asset('fewshot', 'pool', 'SST-2', 'train.json'), None, 'SST-2'); "
        "print([ex.text_a for ex in sample_fewshot(pool, 'SST-2', 4, 87)[0]])"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert out.strip() == str([ex.text_a for ex in sample_fewshot(sst2_pool, "SST-2", 4, 87)[0]])


# --- s3:// roots: what every node of a multi-node cluster reads ------------------------------


@pytest.fixture
def s3_data(s3_server, tmp_path, monkeypatch):
    """A small data root in the LM-BFF layout (SST-2 16-13 with its test file, QQP 16-13
    without one, both tasks' pools), locally and pushed to a fresh bucket; no mirror, no
    local assets, so nothing can be read from anywhere but the given root."""
    import uuid

    import boto3

    from rayapp import assets

    data = tmp_path / "data"
    source = asset("fewshot", "k-shot", "SST-2", "16-13")
    (data / "fewshot" / "k-shot" / "SST-2" / "16-13").mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv", "test.tsv"):
        lines = (source / name).read_text(encoding="utf-8").splitlines(keepends=True)
        write(data / "fewshot" / "k-shot" / "SST-2" / "16-13" / name, "".join(lines[:9] if name == "test.tsv" else lines))
    qqp = data / "fewshot" / "k-shot" / "QQP" / "16-13"
    qqp.mkdir(parents=True)
    header = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    rows = [f"{i}\t0\t0\tq{i}?\tp{i}?\t{i % 2}\n" for i in range(4)]
    write(qqp / "train.tsv", header + "".join(rows[:2]))
    write(qqp / "dev.tsv", header + "".join(rows[2:]))
    for task, pair in (("SST-2", False), ("QQP", True)):
        (data / "fewshot" / "pool" / task).mkdir(parents=True)
        for name, size in (("train", 400), ("dev", 3)):
            pool = {str(i): {"text_a": f"{task} {name} {i}", "text_b": f"b{i}" if pair else None, "label": str(i % 2)}
                    for i in range(size)}
            write(data / "fewshot" / "pool" / task / f"{name}.json", json.dumps(pool))
    bucket = f"fewshot-{uuid.uuid4().hex[:10]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    root = f"s3://{bucket}/mirror"
    assets.push(root, data)
    monkeypatch.delenv("RAYAPP_ASSETS", raising=False)
    monkeypatch.setenv("RAYAPP_DATA", str(tmp_path / "no-local-assets"))
    return data / "fewshot", f"{root}/fewshot"


def test_load_lmbff_from_s3_equals_local(s3_data):
    local, uri = s3_data
    for task in ("SST-2", "QQP"):
        here, there = load_lmbff(local / "k-shot", task), load_lmbff(f"{uri}/k-shot", task)
        assert (there.train, there.dev, there.test) == (here.train, here.dev, here.test)
        assert there.source["root"] == f"{uri}/k-shot"
        assert there.source["train"] == f"{uri}/k-shot/{task}/16-13/train.tsv"
    assert len(here.test) == 3 and not load_lmbff(f"{uri}/k-shot", "SST-2").source["test_fallback"]
    # QQP has no test file: the pool beside the s3 root stands in, named by its URI
    assert there.source["test_fallback"] and there.source["test"] == f"{uri}/pool/QQP/dev.json"
    assert f"{uri}/pool/QQP/dev.json" in there.source["test_note"]
    assert read_table(f"{uri}/pool/SST-2/dev.json", None, "SST-2") == read_table(local / "pool" / "SST-2" / "dev.json",
                                                                                 None, "SST-2")


def test_missing_s3_files_name_the_uri(s3_data):
    _, uri = s3_data
    with pytest.raises(DataError, match=rf"^{uri}/k-shot/RTE/16-13/train.tsv does not exist; expected LM-BFF's"):
        load_lmbff(f"{uri}/k-shot", "RTE")
    with pytest.raises(DataError, match=rf"^{uri}/pool/SST-2/nope.json does not exist; check the path"):
        read_table(f"{uri}/pool/SST-2/nope.json", None, "SST-2")
    with pytest.raises(DataError, match=rf"^{uri}/k-shot/QQP/16-13/test.tsv does not exist; .*a pool at "
                       rf"{uri}/other-pool/QQP/dev.json"):
        load_lmbff(f"{uri}/k-shot", "QQP", pool_root=f"{uri}/other-pool")


def test_draw_unlabelled_from_s3(s3_data):
    from rayapp.data.unlabelled import default_pool, draw_unlabelled

    local, uri = s3_data
    task = get_task("SST-2")
    split = load_lmbff(f"{uri}/k-shot", task)
    beside = draw_unlabelled(split, task, n=2)  # the pool beside the split's root
    assert beside.source["pool"] == f"{uri}/pool/SST-2/train.json" and len(beside.examples) == 2 * len(split.train)
    given = draw_unlabelled(split, task, n=2, pool=f"{uri}/pool/SST-2/train.json")
    assert given.examples == beside.examples == draw_unlabelled(load_lmbff(local / "k-shot", task), task, n=2).examples
    # a root without a pool beside it, no mirror, no local assets: one error naming both
    with pytest.raises(DataError, match=rf"no unlabelled pool for task SST-2: {uri}/nowhere/pool/SST-2/train.json "
                       r"does not exist; no few-shot data fewshot/pool: .*rayapp assets push"):
        default_pool(task, f"{uri}/nowhere/k-shot")
