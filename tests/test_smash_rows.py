"""SMASH Table 2 / Table 4 rows that need more than a recipe (issue 28): Vanilla PPT, distil
bt10 and a T5 student, each a trial of one `rayapp sweep` on tiny models, then its report."""
from __future__ import annotations

import json

import yaml

from rayapp import storage
from rayapp.cli import main
from rayapp.modeling.models import SOFT_PROMPT_FILE
from rayapp.train.records import read_records
from tiny import make_tiny_t5


def test_ppt_bt10_and_t5_rows_run_as_trials_of_one_sweep(ppt_run, bt_built, tiny_bert, tiny_roberta, tmp_path,
                                                         capsys):
    bt_root, _ = bt_built
    t5 = str(make_tiny_t5(tmp_path / "t5"))
    config = {
        "name": "rows", "storage": str(tmp_path / "sweeps"), "tasks": ["SST-2"], "seeds": [13], "grid": {},
        "base": {"model": tiny_bert, "max_steps": 2, "eval_every": 2, "log_every": 1, "batch_size": 8, "lr": 1e-3,
                 "max_length": 48, "engine": {"num_workers": 1}},
        "methods": {"ppt": {"method": "prompt-tuning", "model": tiny_roberta, "init": ppt_run["model"], "lr": 0.05,
                            "label": "Vanilla PPT"},
                    "distill-bt10": {"method": "prompt", "teacher": tiny_bert, "data_dir": bt_root,
                                     "label": "distil bt10"},
                    "t5": {"method": "prompt", "model": t5, "label": "T5 PT"}},
        "tables": [{"name": "rows", "rows": ["ppt", "distill-bt10", "t5"]}]}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config))
    assert main(["sweep", "--config", str(tmp_path / "sweep.yaml")]) == 0
    experiment = str(tmp_path / "sweeps" / "rows")
    records = {r["sweep"]["method"]: r for r in read_records(experiment).values()}
    assert {m: r["status"] for m, r in records.items()} == {"ppt": "done", "distill-bt10": "done", "t5": "done"}
    ppt = records["ppt"]  # prompt tuning from the pre-trained prompt: the prompt is what it kept
    assert ppt["method"] == "prompt-tuning" and storage.exists(storage.join(ppt["checkpoint"], SOFT_PROMPT_FILE))
    bt10 = records["distill-bt10"]  # KD in prompt FT on the back-translated train set (3x), the split's dev/test
    assert bt10["split"]["train"] == f"{bt_root}/SST-2/16-13/train.jsonl"
    assert bt10["split"]["backtranslated"]["factor"] == 3 and bt10["config"]["teacher"] == tiny_bert
    assert records["t5"]["config"]["model"] == t5 and 0.0 <= records["t5"]["test"] <= 1.0
    capsys.readouterr()
    assert main(["report", experiment, "--out", str(tmp_path / "report")]) == 0
    table = capsys.readouterr().out
    assert all(f"| {label} |" in table for label in ("Vanilla PPT", "distil bt10", "T5 PT"))
    assert json.loads((tmp_path / "sweeps" / "rows" / "sweep.json").read_text())["methods"]["ppt"]["init"] == \
        ppt_run["model"]
