"""SMASH Table 2 / Table 4 rows that need more than a recipe (issue 28): Vanilla PPT, distil
bt10 and a T5 student, each a trial of one `rayapp sweep` on tiny models, then its report."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import ONE_TRIAL
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
        "name": "rows", **ONE_TRIAL, "storage": str(tmp_path / "sweeps"), "tasks": ["SST-2"], "seeds": [13], "grid": {},
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


# --- SMASH Figure 2: distillation settings over distillation steps -------------------------------

def _fig2_config(tmp_path, tiny_roberta, pairs) -> dict:
    distill = {"student": tiny_roberta, "data": pairs, "max_steps": 2, "batch_size": 8, "log_every": 1,
               "engine": {"num_workers": 1}}
    return {
        "name": "fig2", "storage": str(tmp_path / "sweeps"), "tasks": ["SST-2", "RTE"], "seeds": [13], "grid": {},
        **ONE_TRIAL,
        "base": {"max_steps": 2, "eval_every": 2, "batch_size": 8, "lr": 1e-3, "max_length": 48,
                 "engine": {"num_workers": 1}},
        "distilled": {"s2": {**distill, "setting": 2, "teacher": tiny_roberta, "teacher_mode": "online"},
                      "s6": {**distill, "setting": 6}},
        "axis": {"title": "distillation steps", "values": [0, 2], "names": ["step0", "step2"]},
        "methods": {"s2": {"method": "prompt", "model": "{distilled:s2@{axis}}", "label": "(2) Rb ce"},
                    "s6": {"method": "prompt", "model": "{distilled:s6@{axis}}", "tasks": ["RTE"], "label": "(6) rule"}}}


def test_figure2_distils_each_setting_and_prompt_tunes_its_student_over_steps(ray_cluster, pairs, tiny_roberta,
                                                                              tmp_path):
    """Settings (2) and (6) are distilled before the trials (both at once), each keeping its
    student at the axis's steps (0 = the model it started from); every trial prompt-tunes
    the student of its setting and step; (6) runs on RTE only (its `tasks:`), as SMASH runs it
    on the pair tasks; the report draws a line per setting over the steps, per task; a resume
    keeps the distillations."""
    from safetensors.torch import load_file

    from rayapp.sweep import report
    from rayapp.sweep import tune as sweep
    from rayapp.sweep.spec import SweepConfig
    from rayapp.config import build

    cfg = build(SweepConfig, _fig2_config(tmp_path, tiny_roberta, pairs))
    result = sweep.run(cfg)
    assert (result["trials"], result["done"]) == (6, 6)
    root = tmp_path / "sweeps" / "fig2" / "distilled"
    runs = {n: json.loads((root / "records" / f"{n}.json").read_text()) for n in ("s2", "s6")}
    assert {n: (r["objective"], r["step"], r["config"]["keep_steps"]) for n, r in runs.items()} == \
           {"s2": ("ce", 2, [0, 2]), "s6": ("rule", 2, [0, 2])}

    def weights(folder) -> dict:
        return load_file(str(folder / "model.safetensors"))

    start = weights(Path(tiny_roberta))
    for n in ("s2", "s6"):  # step 0 is the untrained student, the last kept step the exported one
        at0, at2, final = (weights(root / n / "models" / "step-0"), weights(root / n / "models" / "step-2"),
                           weights(root / n / "student"))
        shared = sorted(set(start) & set(at0))
        assert shared and all(at0[k].equal(start[k].to(at0[k].dtype)) for k in shared)
        assert all(at2[k].equal(final[k]) for k in final)
        assert any(not at2[k].equal(at0[k]) for k in shared)
    records = read_records(cfg.experiment).values()
    assert sorted((r["sweep"]["method"], r["task"], r["sweep"]["axis"], r["config"]["model"]) for r in records) == \
           sorted((m, t, f"step{s}", str(root / m / "models" / f"step-{s}"))
                  for m, tasks in (("s2", ("SST-2", "RTE")), ("s6", ("RTE",))) for t in tasks for s in (0, 2))
    out = report.write([cfg.experiment], str(tmp_path / "report"))
    assert "axis.png" in {f.rsplit("/", 1)[-1] for f in out["files"]}
    series = report.axis_series(report.gather([cfg.experiment]))
    assert {t: {m: [x for x, _, _ in pts] for m, pts in lines.items() if pts} for t, lines in series.items()} == \
           {"SST-2": {"s2": [0.0, 2.0]}, "RTE": {"s2": [0.0, 2.0], "s6": [0.0, 2.0]}}
    assert report.legend_panels(series) == ["SST-2", "RTE"]  # RTE draws (6), which SST-2's legend lacks
    kept = (root / "records" / "s2.json").stat().st_mtime_ns
    assert sweep.resume(cfg.experiment)["done"] == 6
    assert (root / "records" / "s2.json").stat().st_mtime_ns == kept  # not distilled again


@pytest.mark.parametrize("change, match", [
    ({"methods": {"s2": {"method": "prompt", "model": "{distilled:s2@{axis}}"}}, "axis": None},
     r"method 's2' reads \{axis\} but the sweep has no axis"),
    ({"methods": {"s2": {"method": "prompt", "model": "{distilled:s9@{axis}}"}}},
     r"method 's2' uses \{distilled:s9\} but distilled has no 's9'; distilled: s2, s6"),
    ({"methods": {"s2": {"method": "prompt"}}}, r"the axis has no key and no method reads \{axis\}"),
    ({"distilled": {"s2": {"name": "x"}, "s6": {}}}, r"distilled\.s2 sets \['name'\]"),
    ({"distilled": {"s2": {"data": "d", "setting": 9}, "s6": {}}},
     r"distilled\.s2: setting must be one of \[1, 2, 3, 4, 5, 6, 7\]"),
    ({"distilled": {"s2": {"student": "{student:l3}", "data": "d"}, "s6": {}}},
     r"distilled\.s2: \{student:l3\} is not one of the students \(none\)"),
    ({"methods": {"s6": {"method": "prompt", "model": "{distilled:s6@{axis}}", "tasks": ["MNLII"]}}},
     r"methods\.s6\.tasks: unknown task 'MNLII'"),
])
def test_bad_figure2_configs_are_one_line_errors(tmp_path, change, match):
    from rayapp.config import build
    from rayapp.errors import ConfigError
    from rayapp.sweep.spec import SweepConfig

    data = {**_fig2_config(tmp_path, "m", "pairs"), **change}
    if data.get("axis") is None:
        data.pop("axis")
    with pytest.raises(ConfigError, match=match):
        build(SweepConfig, data)


def test_a_step_no_distillation_reaches_is_refused_before_the_trials(tmp_path, tiny_roberta, pairs):
    from rayapp.config import build
    from rayapp.errors import ConfigError
    from rayapp.sweep import tune as sweep
    from rayapp.sweep.spec import SweepConfig

    data = _fig2_config(tmp_path, tiny_roberta, pairs)
    data["axis"]["values"] = [0, 5]
    with pytest.raises(ConfigError, match=r"keep_steps must lie in 0\.\.max_steps \(2\), got \[0, 5\]"):
        sweep.check(build(SweepConfig, data))


def test_shipped_figure2_configs_distil_the_papers_settings_per_task():
    """SMASH §4.4: (a) MNLI with settings (1)-(6), (b) SST-2 with (1), (5), (7); 200k steps, each
    setting's objective and lr (App. A.1), kept at every step of the axis."""
    from rayapp.config import load_config
    from rayapp.sweep import tune as sweep
    from rayapp.sweep.spec import SweepConfig

    configs = Path(__file__).parent.parent / "jobs" / "configs"
    cfg = load_config(SweepConfig, str(configs / "sweep-smash-fig2.yaml"), [])
    runs = {(t["method"], t["task"]) for t in cfg.trials()}
    assert {m for m, t in runs if t == "MNLI"} == {"s1", "s2", "s3", "s4", "s5", "s6"}
    assert {m for m, t in runs if t == "SST-2"} == {"s1", "s5", "s7"}
    distilled = cfg.distill_configs(sweep.distilled_steps(cfg))
    assert {n: (c.objective, c.lr, c.max_steps, c.keep_steps[-1]) for n, c in distilled.items()} == {
        "s1-pairs": ("ce", 1e-4, 200000, 200000), "s1-sentiment": ("ce", 1e-4, 200000, 200000),
        "s2": ("ce", 1e-4, 200000, 200000), "s3": ("ce+hidden", 1e-4, 200000, 200000),
        "s4": ("ce+attn", 1e-4, 200000, 200000), "s5": ("distilbert", 1e-5, 200000, 200000),
        "s6": ("rule", 1e-5, 200000, 200000), "s7": ("hard-label", 1e-5, 200000, 200000)}
    assert (distilled["s1-pairs"].teacher, distilled["s2"].teacher) == ("roberta-large", "roberta-base")
    assert distilled["s5"].batch_size == 128 and distilled["s5"].engine.max_device_batch == 4  # 4 x 32 accumulation
    assert (distilled["s1-sentiment"].task, distilled["s7"].task) == ("smash-sentiment", "smash-sentiment")
    first = next(t for t in cfg.trials() if (t["method"], t["task"], t["axis"]) == ("s1", "SST-2", "step100k"))
    assert cfg.recipe_config(first, "x", sweep._filler(cfg, first)).model == \
           f"{cfg.experiment}/distilled/s1-sentiment/models/step-100000"
    local = load_config(SweepConfig, str(configs / "sweep-smash-fig2_local.yaml"), [])
    assert {n: c.keep_steps for n, c in local.distill_configs(sweep.distilled_steps(local)).items()} == \
           dict.fromkeys(local.distilled, [0, 75, 150])
