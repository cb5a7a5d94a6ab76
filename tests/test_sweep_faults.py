"""A sweep always finishes and says what is wrong: narrowed configs, unknown tasks, lost or
damaged trial records, one resume hint on Ctrl-C; pool-fallback test sets marked."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ONE_TRIAL, wait_until
from test_driver_checks import RUNNER

from rayapp.cli import SWEEP_EXAMPLE, build_parser, main
from rayapp.config import build, load_config
from rayapp.errors import ConfigError
from rayapp.sweep import report, spec as sweep_spec, tune as sweep
from rayapp.sweep.spec import SweepConfig

ROOT = Path(__file__).parent.parent
CONFIGS = ROOT / "jobs" / "configs"
LOCAL = "jobs/configs/sweep-smash-table2_local.yaml"


# --- narrowing a config, unknown tasks --------------------------------------------------------

def test_the_help_example_passes_the_sweeps_checks():
    """`rayapp sweep --help`'s example narrows the shipped local config to RTE on one split: its
    per_task entry for SST-2 (a task the sweep no longer runs) is ignored, and every check
    before the trials passes without Ray (in a fresh process: the suite's cluster is up here)."""
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["sweep"].format_help().split())
    assert SWEEP_EXAMPLE in help_text
    argv = shlex.split(SWEEP_EXAMPLE)
    assert argv[:3] == ["rayapp", "sweep", "--config"]
    code = f"""
import json, ray
from rayapp.config import load_config
from rayapp.sweep import tune as sweep
from rayapp.sweep.spec import SweepConfig
cfg = load_config(SweepConfig, {argv[3]!r}, {argv[4:]!r})
sweep.check(cfg)
print(json.dumps({{"tasks": cfg.tasks, "seeds": cfg.seeds, "per_task": sorted(cfg.per_task),
                  "trial_tasks": sorted({{t["task"] for t in cfg.trials()}}),
                  "max_length": cfg.recipe_config(cfg.trials()[0], "x", sweep._unfilled).max_length,
                  "ray": ray.is_initialized()}}))
"""
    # cwd: the config's paths (../shared/...) are relative to the repo
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.splitlines()[-1])
    assert got["tasks"] == ["RTE"] and got["seeds"] == [13] and "SST-2" in got["per_task"]
    assert got["trial_tasks"] == ["RTE"]
    assert got["max_length"] == 128  # base, not SST-2's 64
    assert not got["ray"]


def test_narrowed_tables_keep_only_the_tasks_run():
    paper = load_config(SweepConfig, CONFIGS / "sweep-pd-table1.yaml", ["tasks=[RTE, SST-2]"])
    assert [(t.name, t.columns) for t in paper.table_specs()] == [("table1", []), ("table2", ["SST-2"])]
    only_rte = load_config(SweepConfig, CONFIGS / "sweep-pd-table1.yaml", ["tasks=[RTE]"])
    assert [t.name for t in only_rte.table_specs()] == ["table1"]  # table2 has no column the sweep runs


@pytest.mark.parametrize("kw, match", [
    ({"per_task": {"RTEE": {"max_length": 64}}},
     r"per_task\.RTEE: unknown task 'RTEE'; the sweep's tasks: SST-2; known tasks: SST-2, .*RTE"),
    ({"per_task": {"sst-2": {"max_length": 64}}}, r"per_task\.sst-2: 'sst-2' is spelled 'SST-2' in the sweep's tasks"),
    ({"tables": [{"columns": ["SST2"]}]}, r"table 'table': unknown task 'SST2'"),
])
def test_a_misspelt_task_is_still_an_error(tmp_path, kw, match):
    data = {"name": "s", "storage": str(tmp_path), "tasks": ["SST-2"], "methods": {"p": {"method": "prompt"}}, **kw}
    with pytest.raises(ConfigError, match=match):
        build(SweepConfig, data)


def test_an_unknown_sweep_task_is_named_through_the_cli(tmp_path):
    """`tasks=[NOPE]` on the local config blamed its `per_task.SST-2`: now the one line names
    NOPE and lists the known tasks, and Ray is not started."""
    cases = {"unknown task": ["sweep", "--config", LOCAL, "tasks=[NOPE]", f"storage={tmp_path}"],
             "per_task typo": ["sweep", "--config", LOCAL, "per_task={RTEE: {max_length: 64}}", f"storage={tmp_path}"]}
    done = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(cases), capture_output=True, text=True,
                          check=True, cwd=ROOT)
    results = json.loads(done.stdout.splitlines()[-1])
    for name, want in (("unknown task", r"unknown task 'NOPE'; built-in tasks: SST-2, .*, RTE, "),
                       ("per_task typo", r"per_task\.RTEE: unknown task 'RTEE'")):
        r = results[name]
        lines = r["stderr"].strip().splitlines()
        assert (r["code"], len(lines), r["ray"]) == (2, 1, False), (name, r)
        assert lines[0].startswith("error: ") and re.search(want, lines[0]), (name, lines[0])
        assert "per_task.SST-2" not in lines[0]


# --- pool-fallback test sets ----------------------------------------------------------------

def test_zero_shot_runs_every_split_of_a_pool_test_task(tiny_bert, tmp_path):
    """One zero-shot split stands for all where every split shares LM-BFF's test file (SST-2),
    not where the test sets are drawn from the pool (MNLI here): they differ per split."""
    cfg = build(SweepConfig, {"name": "pool", "storage": str(tmp_path), "tasks": ["SST-2", "MNLI"], "seeds": [13, 21],
                              "grid": {}, "base": {"model": tiny_bert},
                              "methods": {"zero": {"method": "zero-shot", "seeds": [13]}}})
    sweep.check(cfg)
    assert cfg.pool_test_tasks == ["MNLI"]
    assert [(t["task"], t["seed"]) for t in cfg.trials()] == [("SST-2", 13), ("MNLI", 13), ("MNLI", 21)]
    assert cfg.expected().seeds == {("zero", "SST-2"): [13], ("zero", "MNLI"): [13, 21]}
    sweep_spec.save(cfg)  # the plan the report and --resume read back keeps it
    assert sweep_spec.load(cfg.experiment).expected().seeds == cfg.expected().seeds


def test_paper_scale_configs_read_the_mirror():
    """Every node reads its split from the mirror the config names (not each node's own local
    assets), and the comment says which test files the mirror needs."""
    for name in ("sweep-smash-table2.yaml", "sweep-pd-table1.yaml"):
        cfg = load_config(SweepConfig, CONFIGS / name)
        assert cfg.base["data_dir"].startswith("s3://"), name
        assert "test_matched.tsv" in (CONFIGS / name).read_text(), name


def _record(method, seed, test, pool):
    name = f"{method}-MNLI-s{seed}"
    return {"name": name, "status": "done", "task": "MNLI", "seed": seed, "metric": "acc", "best_dev": 0.5,
            "test": test, "dev_curve": [[0, 0.5]], "split": {"test_fallback": pool},
            "sweep": {"method": method, "task": "MNLI", "seed": seed, "point": {}}}


def test_report_marks_cells_on_pool_test_sets(tmp_path):
    folder = tmp_path / "runs" / "records"
    folder.mkdir(parents=True)
    for rec in (_record("own", 13, 0.6, False), _record("own", 21, 0.7, False),
                _record("pool", 13, 0.5, True), _record("pool", 21, 0.4, True)):
        (folder / f"{rec['name']}.json").write_text(json.dumps(rec))
    out = report.write([str(tmp_path / "runs")], str(tmp_path / "out"))
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in out["markdown"].splitlines()
            if line.startswith("| ") and not line.startswith("| method")}
    assert rows == {"own": "**65.0 (5.0)**", "pool": "45.0 (5.0) †"}
    assert report.POOL_NOTE in out["markdown"] and report.POOL_NOTE.startswith("† test set drawn from the task's")
    assert "45.0 (5.0) †" in (tmp_path / "out" / "table.csv").read_text()
    assert "45.0 (5.0) †" in (tmp_path / "out" / "report.html").read_text()
    selected = (tmp_path / "out" / "selected.csv").read_text()
    assert ",0.4,pool," in selected and ",0.6,task," in selected


# --- lost records and Ctrl-C on a real (tiny) sweep -------------------------------------------

def _tiny(tmp_path, tiny_bert, name, steps, methods) -> Path:
    cfg_file = tmp_path / f"{name}.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "name": name, **ONE_TRIAL, "storage": str(tmp_path / "sweeps"), "tasks": ["SST-2"], "seeds": [13], "grid": {},
        "base": {"model": tiny_bert, "max_steps": steps, "eval_every": 1, "batch_size": 4, "eval_batch_size": 128},
        "methods": methods}))
    return cfg_file


def test_resume_reruns_a_trial_whose_record_is_missing_or_damaged(ray_cluster, tiny_bert, tmp_path, capsys):
    """Tune counts a trial as finished whatever became of its record: a deleted or damaged
    record made `--resume` stop in phase 1 forever. It now runs those trials again, says so
    once per trial, and the sweep finishes; an intact record is kept as it is."""
    cfg_file = _tiny(tmp_path, tiny_bert, "lost", 1, {
        "teacher": {"method": "prompt"}, "zero": {"method": "zero-shot"},
        "kd": {"method": "prompt", "teacher": "{best:teacher}"}})
    cfg = load_config(SweepConfig, cfg_file)
    assert cfg.phases == [["teacher", "zero"], ["kd"]]
    assert sweep.run(cfg)["done"] == 3
    capsys.readouterr()
    records = {json.loads(f.read_text())["sweep"]["method"]: f for f in Path(cfg.experiment, "records").glob("*.json")}
    records["teacher"].unlink()
    records["kd"].write_text('{"name": "trunc')
    kept = records["zero"].stat().st_mtime_ns

    assert main(["sweep", "--resume", cfg.experiment]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("re-running trial")]
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"re-running trial {records['teacher'].stem}: ") and lines[0].endswith("is missing")
    assert lines[1].startswith(f"re-running trial {records['kd'].stem}: ") and "is not JSON" in lines[1]
    assert all(json.loads(f.read_text())["status"] == "done" for f in records.values())
    assert records["zero"].stat().st_mtime_ns == kept


def test_ctrl_c_prints_one_resume_hint_rayapps(ray_cluster, tiny_bert, tmp_path):
    """SIGINT once a trial reported to Tune: the sweep stops (exit 130) with its own
    `rayapp sweep --resume DIR` line, and Tune's `Tuner.restore(...)` hint is not printed."""
    cfg_file = _tiny(tmp_path, tiny_bert, "ctrl-c", 100_000, {"prompt": {"method": "prompt"}})
    exp = Path(load_config(SweepConfig, cfg_file).experiment)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with out.open("w") as o, err.open("w") as e:
        driver = subprocess.Popen([sys.executable, "-m", "rayapp.cli", "sweep", "--config", str(cfg_file)], env=env,
                                  start_new_session=True, stdout=o, stderr=e)
    try:
        def reported():  # the trial's first evaluation reached Tune: fit() is running its loop
            if driver.poll() is not None:
                raise AssertionError(f"the sweep driver exited ({driver.returncode}) before the SIGINT")
            return any(f.stat().st_size for f in exp.glob("tune-0/*/result.json"))

        wait_until(reported, timeout=300, what="a trial's first report")
        os.kill(driver.pid, signal.SIGINT)
        assert driver.wait(timeout=300) == 130
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    text = out.read_text() + err.read_text()
    assert text.count(f"rayapp sweep --resume {exp}") == 1, text
    assert "Tuner.restore" not in text, text
