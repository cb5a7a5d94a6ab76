"""SetFit and SetFit distillation as rayapp sweep methods: trials on Ray Tune, dev-based
selection, the same records and report rows as every method; a run's checkpoint is a SetFit
model whose test predictions are the record's test number."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import ONE_TRIAL
from rayapp.errors import ConfigError

pytest.importorskip("setfit")


def test_setfit_and_its_distillation_through_a_sweep(ray_cluster, tiny_bert, tmp_path, capsys):
    """`setfit` over a 2-point grid, then `setfit-distill` from the best SetFit run on the same
    split (`{best:setfit}`) into a 1-layer student cut before the sweep; the report has a row
    for each, and the best SetFit run's checkpoint predicts its recorded test accuracy."""
    import yaml
    from setfit import SetFitModel

    from rayapp.cli import main
    from rayapp.data.fewshot import load_lmbff

    cfg_file = tmp_path / "sweep.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "name": "setfit", **ONE_TRIAL, "storage": str(tmp_path / "sweeps"), "tasks": ["SST-2"], "seeds": [13],
        "grid": {"lr": [2e-5, 1e-3]},
        "students": {"small": {"teacher": tiny_bert, "layers": [0]}},
        "base": {"model": tiny_bert, "num_iterations": 2, "max_length": 32},
        "methods": {"setfit": {"recipe": "setfit", "label": "SetFit"},
                    "setfit-distill": {"recipe": "setfit", "method": "distill", "teacher": "{best:setfit}",
                                       "model": "{student:small}", "unlabelled": 48, "grid": {},
                                       "label": "SetFit distill"}},
        "tables": [{"name": "table", "rows": ["setfit", "setfit-distill"]}]}))
    assert main(["sweep", "--config", str(cfg_file)]) == 0
    exp = tmp_path / "sweeps" / "setfit"
    records = [json.loads(f.read_text()) for f in sorted((exp / "records").glob("*.json"))]
    assert len(records) == 3 and all(r["status"] == "done" for r in records), [r.get("error") for r in records]
    by_method = {}
    for r in records:
        by_method.setdefault(r["sweep"]["method"], []).append(r)
        assert r["metric"] == "acc" and 0 <= r["best_dev"] <= 1 and 0 <= r["test"] <= 1
        # 32 examples x 2 iterations x 2 pairs each, batch 16; distill: 48 sentences x 2, batch 16
        assert r["step"] == (8 if r["sweep"]["method"] == "setfit" else 6), r["step"]
    best = max(by_method["setfit"], key=lambda r: r["best_dev"])
    (distill,) = by_method["setfit-distill"]
    assert distill["config"]["teacher"] == best["checkpoint"] and distill["method"] == "setfit-distill"
    assert "students" in distill["config"]["model"]

    # the checkpoint is a SetFit model; its test accuracy is the record's
    test = load_lmbff(None, "SST-2", k=16, seed=13).test
    model = SetFitModel.from_pretrained(best["checkpoint"])
    predicted = np.asarray(model.predict([e.text_a for e in test], as_numpy=True))
    assert np.mean(predicted == np.array([int(e.label) for e in test])) == pytest.approx(best["test"], abs=1e-12)

    capsys.readouterr()
    assert main(["report", str(exp), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "table.md").read_text()
    rows = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ") and "method" not in line]
    assert rows == ["SetFit", "SetFit distill"]


def test_setfit_config_mistakes_are_one_line():
    from rayapp.recipes.setfit import SetFitConfig
    from rayapp.train.engine import EngineConfig

    with pytest.raises(ConfigError, match="method=distill needs teacher="):
        SetFitConfig(method="distill")
    with pytest.raises(ConfigError, match="method=distill needs teacher="):
        SetFitConfig(teacher="some/model")
    with pytest.raises(ConfigError, match="SetFit trains in one process"):
        SetFitConfig(engine=EngineConfig(num_workers=2))
    with pytest.raises(ConfigError, match="num_iterations must be > 0"):
        SetFitConfig(num_iterations=0)
