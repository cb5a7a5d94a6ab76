"""iPET (SMASH Table 3): PET's patterns, the ensemble's labels between generations against
hand-computed values, and 2 generations x 2 patterns with its three final classifiers as one
real sweep on Ray."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from conftest import ONE_ACTOR, ONE_TRIAL
from rayapp import storage
from rayapp.data import ipet, shards
from rayapp.data.fewshot import Example
from rayapp.errors import ConfigError
from rayapp.modeling.scorer import fixed_lists
from rayapp.recipes.finetune import FinetuneConfig
from rayapp.tasks.registry import PET_PATTERNS, get_task, pet_pattern


def test_pet_patterns_are_pets_own_with_the_task_labels():
    """PET's 4 patterns per task: the Yelp ones for sentiment (the review's subject in place
    of "the restaurant"), MNLI's for pairs (verbalizer A for 0-1, B for 2-3)."""
    sst2 = PET_PATTERNS["SST-2"]
    assert [t.template for t in sst2] == ["It was {mask}. {x0}", "{x0|nopunct}. All in all, it was {mask}.",
                                          "Just {mask}! {x0}", "{x0} In summary, the movie is {mask}."]
    assert {tuple(t.verbalizer.items()) for t in sst2} == {(("0", "bad"), ("1", "good"))}
    rte = PET_PATTERNS["RTE"]
    assert [t.verbalizer["entailment"] for t in rte] == ["Right", "Right", "Yes", "Yes"]
    assert rte[0].template == rte[2].template and rte[1].template == rte[3].template
    assert set(PET_PATTERNS["MNLI"][0].verbalizer) == set(get_task("MNLI").labels)
    assert FinetuneConfig(task="mr", pattern=3).resolve_task().template.endswith("the movie is {mask}.")
    with pytest.raises(ConfigError, match="task trec has no PET patterns; define them .* trec-pet0"):
        pet_pattern(get_task("trec"), 0)
    with pytest.raises(ConfigError, match="pattern=4: task SST-2 has PET patterns 0..3"):
        FinetuneConfig(task="SST-2", pattern=4).resolve_task()


def _labels_folder(root, logits: dict[str, list[list[float]]], weights: dict[str, float], pool: list[Example]) -> str:
    """A generation's labels folder as `label_pool` writes it, from given logits."""
    out = str(root)
    ipet.write_examples(storage.join(out, ipet.POOL), pool)
    written = {ipet.model_file(m): shards.write_table(storage.join(out, ipet.model_file(m)),
                                                      pa.table({"logits": fixed_lists(torch.tensor(v), pa.float32())}))
               for m, v in logits.items()}
    shards.write_meta(out, {"files": list(written), "models": [{"id": m, "weight": weights[m]} for m in logits]},
                      written)
    return out


def test_next_training_sets_and_soft_labels_follow_pet(tmp_path):
    """Model a's next set is labelled by the others only (logits_percentage 1: b and c),
    weighted by their accuracy before training; |T_label| (d - 1) examples per label, each
    drawn once; the final targets are the weighted mean of every model's logits."""
    task = get_task("SST-2")
    pool = [Example(f"pool sentence {i}", None, None) for i in range(6)]
    logits = {"a": [[9.0, 0.0]] * 6,  # a says 0 everywhere: it must not label its own set
              "b": [[0.0, 1.0], [0.0, 2.0], [3.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0]],
              "c": [[0.0, 3.0], [0.0, 2.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 1.0]]}
    weights = {"a": 0.5, "b": 0.75, "c": 0.25}
    folder = _labels_folder(tmp_path / "g0", logits, weights, pool)
    train = [Example("x", None, "0"), Example("y", None, "1")]
    cfg = ipet.IPetConfig(scale_factor=3.0, logits_percentage=1.0)
    got = ipet.next_train_set(folder, "a", train, task, generation=0, cfg=cfg)
    # b and c agree: rows 2, 4 are class 0 and rows 0, 1, 3, 5 class 1; (3 - 1) x 1 per label
    assert sorted(e.label for e in got) == ["0", "0", "1", "1"]
    assert {e.text_a for e in got if e.label == "0"} == {"pool sentence 2", "pool sentence 4"}
    assert {e.text_a for e in got if e.label == "1"} <= {"pool sentence 0", "pool sentence 1", "pool sentence 3",
                                                         "pool sentence 5"}
    assert len({e.text_a for e in got}) == 4
    assert got == ipet.next_train_set(folder, "a", train, task, generation=0, cfg=cfg)  # seeded
    # generation 1: |T_label| (d^2 - 1) = 8 per label from 2 class-0 rows: repeated, as PET does
    assert sorted(e.label for e in ipet.next_train_set(folder, "b", train, task, 1, cfg)).count("0") == 8
    soft = ipet.soft_label_set(folder, cfg)
    want = (0.5 * np.array(logits["a"]) + 0.75 * np.array(logits["b"]) + 0.25 * np.array(logits["c"])) / 1.5
    assert np.allclose([row for _, row in soft], want) and [e.text_a for e, _ in soft] == [e.text_a for e in pool]
    assert np.allclose(ipet.merge(np.stack([np.array(v) for v in logits.values()]), np.zeros(3), "wmean"),
                       np.mean([np.array(v) for v in logits.values()], 0))


def test_ipet_sweep_two_generations_and_two_final_classifiers(ray_cluster, tiny_bert, tmp_path):
    """Generation 1: SST-2 patterns 0 and 1; its models label the unlabelled pool (Ray Data);
    generation 2 trains each pattern on T plus the set the other model labelled; the final
    classifiers (standard FT and prompt FT: iPET and "+ PT") train on the merged
    logits of generation 2 and are selected and tested on the split like any run."""
    from rayapp.sweep import tune as sweep
    from rayapp.sweep.ipet import labels_dir
    from rayapp.sweep.spec import SweepConfig
    from rayapp.train.records import read_records

    cfg = SweepConfig(
        name="ipet", storage=str(tmp_path / "sweeps"), tasks=["SST-2"], seeds=[13], grid={}, **ONE_TRIAL,
        base={"model": tiny_bert, "max_steps": 2, "eval_every": 2, "batch_size": 8, "lr": 1e-3, "max_length": 48,
              "engine": {"num_workers": 1}},
        methods={"g1": {"method": "prompt", "grid": {"pattern": [0, 1]}},
                 "g2": {"method": "prompt", "grid": {"pattern": [0, 1]}, "extra_train": "{ipet:g1}"},
                 "ipet": {"method": "classifier", "soft_labels": "{soft:g2}"},
                 "ipet-pt": {"method": "prompt", "soft_labels": "{soft:g2}"}},
        ipet=ipet.IPetConfig(scale_factor=2.0, logits_percentage=1.0, unlabelled_per_label=20, **ONE_ACTOR))
    assert cfg.phases == [["g1"], ["g2"], ["ipet", "ipet-pt"]]
    done = sweep.run(cfg)
    assert done["done"] == 6 and done["failed"] == 0
    records = {r["sweep"]["method"] + str(r["sweep"]["point"]): r for r in read_records(cfg.experiment).values()}
    folder = labels_dir(cfg, "g1", "SST-2", 13)
    meta = shards.require_meta(folder)
    assert [m["id"] for m in meta["models"]] == ["pattern0", "pattern1"] and meta["pool"] == 40
    for p in (0, 1):
        g2 = records["g2" + str({"pattern": p})]
        # |T_label| (d - 1) = 16 examples of each label the other pattern's model predicts on the pool
        other = shards.read_whole(storage.join(folder, ipet.model_file(f"pattern{1 - p}")), None).column("logits")
        predicted = {int(np.argmax(row)) for row in other.to_pylist()}
        assert g2["extra_train"]["examples"] == 16 * len(predicted)
        assert g2["extra_train"]["uri"].endswith(f"next/pattern{p}.jsonl") and g2["config"]["pattern"] == p
    soft = storage.join(labels_dir(cfg, "g2", "SST-2", 13), ipet.SOFT_LABELS)
    rows = [json.loads(line) for line in storage.read_text(soft).splitlines()]
    assert len(rows) == 40 and all(len(r["logits"]) == 2 for r in rows)
    for name in ("ipet", "ipet-pt"):
        rec = records[name + "{}"]
        assert rec["soft_labels"] == {"uri": soft, "examples": 40} and 0.0 <= rec["test"] <= 1.0
    assert records["ipet{}"]["method"] == "classifier" and records["ipet-pt{}"]["method"] == "prompt"
