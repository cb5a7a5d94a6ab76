"""Back-translated few-shot splits (SMASH's distil bt10 data) on tiny random MarianMT models:
the mechanics (sizes, labels, dedup, unchanged dev/test, provenance, resume, bad input; the
"distil bt10" trial on the result: tests/test_smash_rows.py), not translation quality: no MT
weights exist here."""
from __future__ import annotations

from pathlib import Path

import pytest

from rayapp.config import load_config
from rayapp.data import backtranslate as bt
from rayapp.data import shards
from rayapp.data.fewshot import Example, load_lmbff
from rayapp.errors import ConfigError, DataError
from rayapp.sweep.spec import SweepConfig
from conftest import BT_SETTINGS

CONFIGS = Path(__file__).parent.parent / "jobs" / "configs"
TASKS, FACTOR, SETTINGS = BT_SETTINGS["tasks"], BT_SETTINGS["factor"], BT_SETTINGS


@pytest.mark.parametrize("task", TASKS)
def test_train_grows_by_factor_with_labels_kept_and_dev_test_unchanged(bt_built, task):
    out, stats = bt_built
    original, augmented = load_lmbff(None, task, 16, 13), load_lmbff(out, task, 16, 13)
    meta = shards.read_meta(f"{out}/{task}/16-13")
    n = len(original.train)
    assert meta["missing"] == 0 and meta["paraphrases"] == [FACTOR - 1] * n
    assert len(augmented.train) == FACTOR * n and augmented.train[:n] == original.train
    rows = iter(augmented.train[n:])
    for source, count in zip(original.train, meta["paraphrases"]):
        mine = [next(rows) for _ in range(count)]
        assert all(p.label == source.label for p in mine)
        assert all((p.text_b is None) == (source.text_b is None) and p.text_a for p in mine)
        assert len({bt._normal(p) for p in [source, *mine]}) == count + 1  # distinct from it and each other
    assert augmented.dev == original.dev and augmented.test == original.test
    assert augmented.source["backtranslated"]["factor"] == FACTOR
    assert augmented.source["test_source"] == original.source["test_source"]
    assert augmented.source["original_train"] == original.source["train"]
    assert stats["written"] == 2 and stats["missing"] == 0


def test_rerun_skips_finished_splits_and_refuses_other_settings(bt_built, marian):
    out, _ = bt_built
    before = {p: p.read_bytes() for p in Path(out).rglob("*.jsonl")}
    again = bt.backtranslate(out, **marian, **SETTINGS)
    assert (again["written"], again["skipped"], again["splits"]) == (0, 2, 2)
    assert {p: p.read_bytes() for p in Path(out).rglob("*.jsonl")} == before
    folder = shards.read_meta(out)
    assert folder["stage"] == "backtranslate" and folder["splits"] == ["RTE/16-13", "SST-2/16-13"]
    assert folder["counts"]["SST-2/16-13"]["train"] == FACTOR * folder["counts"]["SST-2/16-13"]["train_original"]
    with pytest.raises(DataError, match=r"built with other settings \(factor differ\)"):
        bt.backtranslate(out, **marian, **{**SETTINGS, "factor": 4})


def test_paraphrase_draws_more_rounds_then_keeps_what_exists():
    """Copies of the source, repeats and empty translations are dropped; an example short of
    factor - 1 distinct paraphrases gets more rounds, up to max_rounds, then keeps what it has."""
    pairs = [Example("a b", "c", "0"), Example("d", "e", "1")]
    calls = []

    def round_trip(texts, n, salt):
        calls.append((salt, len(texts)))
        if salt.startswith("0/"):  # the source itself, a repeat, an empty one, one new text
            return [[t, f"{t} x", f"{t}  x", ""][:n] for t in texts]
        return [[f"{t} {salt}"] * n for t in texts]  # later rounds: one new text per round

    kept, rounds = bt.paraphrase(pairs, 4, 3, round_trip)
    assert rounds == 3 and [len(k) for k in kept] == [3, 3]
    assert [p.text_a for p in kept[0]] == ["a b x", "a b 1/text_a", "a b 2/text_a"]
    assert [p.text_b for p in kept[1]] == ["e x", "e 1/text_b", "e 2/text_b"]
    assert all(p.label == src.label for src, k in zip(pairs, kept) for p in k)
    assert calls[:2] == [("0/text_a", 2), ("0/text_b", 2)]
    # enough distinct ones in the first round: no second round
    kept, rounds = bt.paraphrase([Example("s", None, "1")], 2, 3, lambda t, n, s: [[f"{x} {i}" for i in range(n)] for x in t])
    assert rounds == 1 and [p.text_a for p in kept[0]] == ["s 0", "s 1"]


@pytest.mark.parametrize("change, message", [
    ({"factor": 0}, r"factor=0 must be >= 1"),
    ({"tasks": ["NOPE"]}, r"tasks: unknown task 'NOPE'"),
    ({"forward": "/nonexistent/en-de"}, r"forward: cannot load model config: '/nonexistent/en-de' does not exist"),
    ({"backward": "MLM"}, r"backward=.* is a bert model, not an encoder-decoder"),
])
def test_bad_input_is_a_config_error_before_ray_starts(marian, tiny_bert, tmp_path, monkeypatch, change, message):
    def no_ray():
        raise AssertionError("Ray was started for a mistake the driver can see")

    monkeypatch.setattr(bt.env, "start_ray", no_ray)
    settings = {**marian, **SETTINGS, **change}
    settings["backward"] = tiny_bert if settings["backward"] == "MLM" else settings["backward"]
    with pytest.raises(ConfigError, match=message) as e:
        bt.backtranslate(str(tmp_path / "out"), **settings)
    assert "\n" not in str(e.value)


def test_paper_configs_agree():
    """The sweep's distill-bt10 reads what backtranslate-bt10.yaml writes, for Table 2's tasks."""
    paper = load_config(bt.BacktranslateConfig, CONFIGS / "backtranslate-bt10.yaml")
    sweep = load_config(SweepConfig, CONFIGS / "sweep-smash-table2.yaml")
    assert sweep.methods["distill-bt10"]["data_dir"] == paper.out and paper.factor == 10
    assert sweep.methods["distill-bt10"]["teacher"] == sweep.methods["distill"]["teacher"]
    assert paper.tasks == sweep.tasks and paper.seeds == sweep.seeds
    assert "distill-bt10" in sweep.tables[0].rows
