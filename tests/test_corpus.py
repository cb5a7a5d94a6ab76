"""rayapp.data.corpus and .formats: the sentence splitter and filter, every reader (local and
s3://), reading in bounded pieces, bad input."""
import io
import json
import uuid

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayapp.assets import asset
from rayapp.data.corpus import document_sentences, is_heading, plan_sources, read_documents, read_sentences, split_sentences
from rayapp.data.formats import first_line, iter_lines
from rayapp.errors import DataError


def docs_of(ds) -> dict[str, str]:
    rows = ds.take_all()
    assert len({r["doc_id"] for r in rows}) == len(rows), "doc ids must be unique"
    return {r["doc_id"]: r["text"] for r in rows}


# --- sentences -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("Mr. Smith went to Washington. He met Dr. Jones there!", ["Mr. Smith went to Washington.", "He met Dr. Jones there!"]),
    ("He met J. R. R. Tolkien. Was it 3.5 km away? Yes.", ["He met J. R. R. Tolkien.", "Was it 3.5 km away?", "Yes."]),
    ("The U.S. Army, e.g. Patton, fought. It ended in 1945.", ["The U.S. Army, e.g. Patton, fought.", "It ended in 1945."]),
    ('He said "Stop." Then he left (quietly). "Why?" she asked.', ['He said "Stop."', "Then he left (quietly).", '"Why?" she asked.']),
    ("See Fig. 3 and No. 5 in Jan. 1990. The answer was no. Then we left.",
     ["See Fig. 3 and No. 5 in Jan. 1990.", "The answer was no.", "Then we left."]),
    ("lower case after a period. does not split", ["lower case after a period. does not split"]),
    ("It grew to 60 cm ( 24 in ) . It is blue .", ["It grew to 60 cm ( 24 in ) .", "It is blue ."]),  # WikiText tokens
    ("   ", []),
])
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


def test_document_sentences_filters_counts_and_keeps_positions():
    text = ("Title Without Period\n"
            "Etymology and terminology.\n"  # WikiExtractor heading, 3 words: a fragment
            "History of atomic theory.\n"  # WikiExtractor heading, 4 words
            "The first sentence is fine here. The second one is fine too.\n"
            "A bad \ufffd byte sits in this sentence. Long" + " word" * 80 + " ends here.\n"
            "The last sentence is fine as well.")
    doc = document_sentences(text, min_words=4, max_words=80)
    assert doc.sentences == ["The first sentence is fine here.", "The second one is fine too.",
                             "The last sentence is fine as well."]
    assert doc.positions == [3, 4, 7]  # dropped sentences keep their place
    assert (doc.fragments, doc.headings, doc.long, doc.undecodable) == (2, 1, 1, 1)


# WikiExtractor section headings of the local Wikipedia sample (period added by WikiExtractor)
# and one-sentence paragraphs of it that are real sentences
HEADINGS = ["Etymology and terminology.", "Early life and work.", "History of atomic theory.",
            "Status of African Americans.", "Twin towns and sister cities.", "Types of alternative medicine.",
            "Examples of terrestrial albedo effects.", "Political struggles in the Empire.",
            "Mitigation of effects of petroleum shortages.", "1989–1997: Early years and breakthrough."]
SENTENCES = ["Typewriter art was also called keyboard art.", "Apollo turned Cephissus into a sea monster.",
             "The Rijksmuseum possesses the largest and most important collection of classical Dutch art.",
             "Psychoacoustics explains how humans respond to sounds.", "Foreign media refer to her as Ms. Suu Kyi, or Miss Suu Kyi.",
             "He also lent his voice to the following movies.", "AMOS could also include inline Assembly Language.",
             "A typical performance runs approximately 40 minutes in length.",
             "5.98% of the population were Hispanic or Latino of any race."]


def test_headings_are_not_sentences():
    assert [s for s in HEADINGS if not is_heading(s)] == []
    assert [s for s in SENTENCES if is_heading(s)] == []
    # only a paragraph that is one sentence can be a heading
    doc = document_sentences("\n".join(HEADINGS + SENTENCES) + "\nEarly life and work. He was born in 1900.")
    assert doc.sentences == SENTENCES + ["Early life and work.", "He was born in 1900."]
    assert (doc.headings, doc.fragments) == (len(HEADINGS) - 1, 1)  # 3 words: a fragment first
    assert doc.positions[0] == len(HEADINGS)


# --- readers -------------------------------------------------------------------------------

def test_wikiextractor_real_slice(ray_cluster):
    docs = docs_of(read_documents(str(asset("corpus", "wikipedia-en", "AA", "wiki_00"))))
    assert len(docs) == 38
    assert docs["12"].startswith("\nAnarchism\n\nAnarchism is a political philosophy")
    assert "<doc" not in "".join(docs.values()) and "</doc>" not in "".join(docs.values())
    rows = read_sentences(str(asset("corpus", "wikipedia-en", "AA", "wiki_00"))).take_all()
    row = next(r for r in rows if r["doc_id"] == "12")
    assert row["sentences"][0].startswith("Anarchism is a political philosophy that advocates")
    assert "Etymology and terminology." not in row["sentences"]  # heading: 3 words, a fragment
    assert "Internal issues and debates." not in row["sentences"] and row["headings"] == 5
    assert row["fragments"] > 0
    assert len(row["sentences"]) == len(row["positions"]) > 100


def test_wikiextractor_in_pieces_reads_every_document_once():
    """Cut into ~64 KB pieces (packed across files, split inside them), the local
    Wikipedia reads as it does whole."""
    root = str(asset("corpus", "wikipedia-en"))
    pieces = plan_sources(root, chunk_bytes=1 << 16)
    whole = plan_sources(root, chunk_bytes=1 << 40)
    assert len(whole) == 1 and len(pieces) > 300
    assert [d for s in pieces for d in s.docs()] == list(whole[0].docs())


def test_text_blocks_and_per_file(ray_cluster, tmp_path):
    text = "First doc line one.\nStill first doc.\n\n  \nSecond doc here.\n"
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("Only doc of b.\n")
    (tmp_path / "_SUCCESS").write_text("")  # not a corpus file
    # ids: file + the byte where the document starts
    assert docs_of(read_documents(str(tmp_path))) == {
        "a.txt#0": "First doc line one.\nStill first doc.", f"a.txt#{text.index('Second')}": "Second doc here.\n",
        "sub/b.txt#0": "Only doc of b.\n"}
    assert set(docs_of(read_documents(str(tmp_path), fmt="text", per_file=True))) == {"a.txt", "sub/b.txt"}


def test_jsonl_text_and_id_columns(ray_cluster, tmp_path):
    lines = [{"body": "Doc one text.", "key": 7}, {"body": "Doc two text.", "key": 8}, {"key": 9}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    uri = str(tmp_path / "c.jsonl")
    line = [len(json.dumps(r)) + 1 for r in lines]  # ids: file + the byte where the line starts
    assert docs_of(read_documents(uri, text_column="body")) == {
        "c.jsonl#0": "Doc one text.", f"c.jsonl#{line[0]}": "Doc two text.", f"c.jsonl#{line[0] + line[1]}": ""}
    assert set(docs_of(read_documents(uri, text_column="body", id_column="key"))) == {"7", "8", "9"}
    with pytest.raises(DataError, match=r"c.jsonl has no column 'text' \(text_column\); "
                                        r"available columns: body, key"):
        read_documents(uri)
    # Ray tasks parse the later lines: a broken one is an error naming its line, or skipped and flagged
    (tmp_path / "c.jsonl").write_text('{"body": "Fine."}\n[1]\n{"body": 5}\n{"body": "Fine too.\n')
    with pytest.raises(DataError, match=r"c.jsonl line 2 \(byte 18\) is not a JSON object; fix or delete that line, "
                                        r"or pass on_bad_lines=skip"):
        read_documents(uri, text_column="body").take_all()
    rows = read_documents(uri, text_column="body", on_bad_lines="skip").take_all()
    assert {r["doc_id"]: (r["text"], r["bad_line"]) for r in rows} == {
        "c.jsonl#0": ("Fine.", False), "c.jsonl#18": ("", True), "c.jsonl#22": ("", True), "c.jsonl#34": ("", True)}


def test_jsonl_first_document_longer_than_any_sniff(ray_cluster, tmp_path):
    """Wikipedia JSONL dumps hold a document per line; the first may be hundreds of KB."""
    long = " ".join(["A sentence of the first document is here."] * 5000)  # ~200 KB
    assert len(long) > 200_000
    rows = [{"id": "a", "url": "u", "text": long}, {"id": "b", "url": "u", "text": "A short one is here."}]
    (tmp_path / "wiki.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert json.loads(first_line(str(tmp_path / "wiki.jsonl")))["text"] == long
    assert docs_of(read_documents(str(tmp_path), id_column="id")) == {"a": long, "b": "A short one is here."}


def test_iter_lines_joins_lines_across_blocks():
    data = b"short\n" + b"x" * 50 + b"\n\nlast line without break"
    lines = list(iter_lines(io.BytesIO(data), offset=100, block=7))
    assert [line for _, line in lines] == [b"short\n", b"x" * 50 + b"\n", b"\n", b"last line without break"]
    assert [start for start, _ in lines] == [100, 106, 157, 158]


def test_text_file_streamed_in_pieces(ray_cluster, tmp_path):
    """A text file cut into 40-byte pieces: lines and documents straddle the cuts, and every
    document is still read once, whole, with the id it has when the file is read whole."""
    docs = ["Doc zero has a single line that is longer than one piece of the file.",
            "Doc one line one.\nDoc one line two is here.", "Doc two.", "Doc three has\nthree\nlines."]
    text = "\n\n".join(docs[:2]) + "\n \t\n\n" + "\n\n".join(docs[2:]) + "\n"
    (tmp_path / "t.txt").write_text(text)
    pieces = plan_sources(str(tmp_path / "t.txt"), chunk_bytes=40)
    assert len(pieces) == -(-len(text) // 40) > 3
    expected = {f"t.txt#{text.index(d)}": d for d in docs[:-1]} | {f"t.txt#{text.index(docs[-1])}": docs[-1] + "\n"}
    assert docs_of(read_documents(str(tmp_path / "t.txt"), chunk_bytes=40)) == expected
    assert docs_of(read_documents(str(tmp_path / "t.txt"))) == expected
    for size in range(1, 50):  # every cut, including inside the run of blank lines
        assert dict(d for s in plan_sources(str(tmp_path / "t.txt"), chunk_bytes=size) for d in s.docs()) == expected


def test_parquet_text_and_id_columns(ray_cluster, tmp_path):
    pq.write_table(pa.table({"article": ["Alpha text.", "Beta text.", "Alpha text."], "n": [1, 2, 3]}),
                   tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t.parquet has no column 'text'.*available columns: article, n"):
        read_documents(str(tmp_path))
    docs = docs_of(read_documents(str(tmp_path), text_column="article"))
    # without an id column, ids are file + row hash: unique even for duplicate texts
    assert sorted(docs.values()) == ["Alpha text.", "Alpha text.", "Beta text."]
    assert all(d.startswith("t.parquet#") for d in docs)
    assert docs_of(read_documents(str(tmp_path), text_column="article", id_column="n"))["2"] == "Beta text."
    with pytest.raises(DataError, match=r"no column 'id' \(id_column\)"):
        read_documents(str(tmp_path), text_column="article", id_column="id")


def test_hf_hub_uri_streams_every_shard(ray_cluster, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        table = {"id": ["a", "b", "c", "d", "e"], "text": [f"Text {i}." for i in range(5)]}
        return datasets.Dataset.from_dict(table).to_iterable_dataset(num_shards=3)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    docs = docs_of(read_documents("hf://wikipedia/20220301.en", id_column="id"))
    assert calls == [("wikipedia", "20220301.en", "train", True)]
    assert docs == {"a": "Text 0.", "b": "Text 1.", "c": "Text 2.", "d": "Text 3.", "e": "Text 4."}
    with pytest.raises(DataError, match=r"no column 'body'.*available columns: id, text"):
        read_documents("hf://wikipedia/20220301.en", text_column="body")

    def missing(*args, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError("Dataset 'nope' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(DataError, match=r"cannot load hf://nope \(Dataset 'nope' doesn't exist.*\); check the"):
        read_documents("hf://nope")


def test_hf_saved_dataset_folder(ray_cluster, tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["One doc.", "Two doc."]}).save_to_disk(str(tmp_path / "saved"))
    assert docs_of(read_documents(str(tmp_path / "saved"))) == {
        "data-00000-of-00001.arrow#0": "One doc.", "data-00000-of-00001.arrow#1": "Two doc."}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x."]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"dd holds splits \['train'\]; point at one split's folder"):
        read_documents(str(tmp_path / "dd"), fmt="hf")


def test_saved_dataset_read_from_s3_file_by_file(ray_cluster, s3_server, tmp_path, monkeypatch):
    """A mirrored hub corpus on s3:// is read by every node from the bucket, a source per
    data file: nothing downloads the dataset to one node's disk first."""
    import datasets

    from rayapp import storage

    texts = [f"Document number {i} is here." for i in range(30)]
    saved = datasets.Dataset.from_dict({"text": texts, "id": [f"w{i}" for i in range(30)]})
    saved.save_to_disk(str(tmp_path / "local"), num_shards=3)
    bucket = f"mirror-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    mirror = f"s3://{bucket}/mirror"
    storage.copy_dir(str(tmp_path / "local"), f"{mirror}/datasets/wikimedia/wikipedia/20231101.en/train")
    monkeypatch.setattr(storage, "local_copy", lambda uri: pytest.fail(f"copied {uri} to local disk"))
    remote = f"{mirror}/datasets/wikimedia/wikipedia/20231101.en/train"
    sources = plan_sources(remote)
    assert [s.name for s in sources] == [f"data-0000{i}-of-00003.arrow" for i in range(3)]
    assert docs_of(read_documents(remote)) == docs_of(read_documents(str(tmp_path / "local")))
    monkeypatch.setenv("RAYAPP_ASSETS", mirror)
    by_ref = docs_of(read_documents("hf://wikimedia/wikipedia?config=20231101.en", id_column="id"))
    assert by_ref == {f"w{i}": t for i, t in enumerate(texts)}
    with pytest.raises(DataError, match=r"data-00000-of-00003.arrow has no column 'body' \(text_column\)"):
        plan_sources("hf://wikimedia/wikipedia?config=20231101.en", text_column="body")


def test_parse_hf_uri():
    from rayapp.storage import parse_hf_uri
    assert parse_hf_uri("hf://wikipedia/20220301.en") == ("wikipedia", "20220301.en", "train")
    assert parse_hf_uri("hf://wikimedia/wikipedia?config=20231101.en&split=train[:1%]") == (
        "wikimedia/wikipedia", "20231101.en", "train[:1%]")
    assert parse_hf_uri("hf://bookcorpus?split=validation") == ("bookcorpus", None, "validation")
    with pytest.raises(DataError, match=r"cannot parse 'hf://a/b/c'; use hf://NAME"):
        parse_hf_uri("hf://a/b/c")


def test_s3_corpus_reads_like_local(ray_cluster, s3_server, tmp_path):
    bucket = f"corpus-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    wiki = '<doc id="5" url="u" title="T">\nT\n\nA first sentence here. A second one.\n</doc>\n'
    for name, body in {"wiki_00": wiki, "wiki_01": wiki.replace('"5"', '"6"')}.items():
        s3.put_object(Bucket=bucket, Key=f"wiki/AA/{name}", Body=body.encode())
        (tmp_path / name).write_text(body)
    assert docs_of(read_documents(f"s3://{bucket}/wiki")) == docs_of(read_documents(str(tmp_path)))
    with pytest.raises(DataError, match=rf"s3://{bucket}/nothing does not exist"):
        read_documents(f"s3://{bucket}/nothing")


def test_non_utf8_bytes_cost_only_their_sentence(ray_cluster, tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"A clean first sentence here. A broken \xff\xfe sentence here. "
                                       b"A clean last sentence here.\n")
    row = read_sentences(str(tmp_path)).take_all()[0]
    assert row["sentences"] == ["A clean first sentence here.", "A clean last sentence here."]
    assert row["positions"] == [0, 2] and row["undecodable"] == 1


def test_bad_corpus_input(ray_cluster, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"corpus .*empty holds no files"):
        read_documents(str(tmp_path / "empty"))
    with pytest.raises(DataError, match=r"nothere does not exist"):
        read_documents(str(tmp_path / "nothere"))
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "mixed" / "b.txt").write_text("x\n")
    with pytest.raises(DataError, match=r"corpus mixes file kinds \(jsonl, plain\)"):
        read_documents(str(tmp_path / "mixed"))
    with pytest.raises(DataError, match=r"unknown corpus format 'csv'"):
        read_documents(str(tmp_path / "mixed"), fmt="csv")
    (tmp_path / "notjson.jsonl").write_text("[1, 2]\n")
    with pytest.raises(DataError, match=r"notjson.jsonl line 1 is not a JSON object"):
        read_documents(str(tmp_path / "notjson.jsonl"))
    with pytest.raises(DataError, match=r"need 1 <= min_words <= max_words"):
        read_sentences(str(tmp_path / "mixed"), min_words=10, max_words=5)
    with pytest.raises(DataError, match=r"per_file=True splits plain text files only, but .* is read as jsonl"):
        read_documents(str(tmp_path / "mixed" / "a.jsonl"), per_file=True)
    with pytest.raises(DataError, match=r"mixed is not a folder written by datasets' save_to_disk"):
        read_documents(str(tmp_path / "mixed"), fmt="hf")
