"""Prompt-Distiller recipe: the unlabelled set X~, the recipe, its methods and bad input."""
import json

import pytest

from rayapp.data.fewshot import load_lmbff
from rayapp.data.unlabelled import default_pool, draw_unlabelled, pseudo_label_agreement
from rayapp.errors import ConfigError, DataError
from rayapp.tasks.registry import get_task

SST2 = get_task("SST-2")


def texts(examples):
    return {(e.text_a, e.text_b) for e in examples}


def test_unlabelled_set_is_n_times_x_disjoint_and_unlabelled():
    split = load_lmbff(None, SST2, k=16, seed=13)
    xu = draw_unlabelled(split, SST2, n=10)
    assert len(xu.examples) == len(xu.hidden_labels) == 10 * len(split.train) == 320
    assert all(e.label is None for e in xu.examples)
    assert len(texts(xu.examples)) == 320  # no duplicates
    assert not texts(xu.examples) & texts(split.train + split.dev + split.test)
    assert set(xu.hidden_labels) == {"0", "1"}
    assert xu.source["pool"] == str(default_pool(SST2))
    # a function of the split's seed: the same split gives the same X~, another split another
    assert draw_unlabelled(split, SST2, n=10).examples == xu.examples
    other = draw_unlabelled(load_lmbff(None, SST2, k=16, seed=21), SST2, n=10)
    assert other.examples != xu.examples
    # MNLI-mm draws from MNLI's pool
    assert default_pool(get_task("MNLI-mm")) == default_pool(get_task("MNLI"))


def test_pool_smaller_than_n_x_is_a_clear_error_with_the_sizes(tmp_path):
    split = load_lmbff(None, SST2, k=16, seed=13)
    pool = tmp_path / "pool.json"
    rows = {str(i): {"text_a": f"sentence number {i}", "text_b": None, "label": str(i % 2)} for i in range(50)}
    rows["50"] = {"text_a": split.train[0].text_a, "text_b": None, "label": split.train[0].label}  # in X: not usable
    pool.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"has 50 usable examples .* \(51 rows in all\), but X~ needs n\*\|X\| = 10\*32 = 320"):
        draw_unlabelled(split, SST2, n=10, pool=pool)
    assert len(draw_unlabelled(split, SST2, n=1, pool=pool).examples) == 32
    with pytest.raises(ConfigError, match="n .* must be >= 1"):
        draw_unlabelled(split, SST2, n=0, pool=pool)


def test_pseudo_label_agreement_counts():
    stats = pseudo_label_agreement([0, 1, 1, 1], ["0", "0", "1", "1"], SST2)
    assert stats["agree"] == 3 and stats["total"] == 4 and stats["rate"] == 0.75
    assert stats["pseudo_counts"] == {"0": 1, "1": 3} and stats["gold_counts"] == {"0": 2, "1": 2}
