"""`rayapp sweep` on Ray Tune: plan, methods as configs, bad input, concurrent records, and a
tiny sweep through Tune that is killed, resumed and reported."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from conftest import ONE_TRIAL, wait_until

from rayapp import storage
from rayapp.assets import asset
from rayapp.cli import main
from rayapp.config import build, load_config
from rayapp.errors import ConfigError, DataError, PromptError
from rayapp.sweep import spec
from rayapp.sweep import tune as sweep
from rayapp.sweep.spec import SweepConfig
from rayapp.train.records import read_records, write_record

CONFIGS = Path(__file__).parent.parent / "jobs" / "configs"


def _sweep(tmp_path, **kw) -> SweepConfig:
    data = {"name": "s", "storage": str(tmp_path), "tasks": ["SST-2"], "seeds": [13, 21],
            "grid": {"lr": [1e-4, 1e-3]}, "methods": {"prompt": {"method": "prompt"}}, **kw}
    return build(SweepConfig, data)


# --- plan and methods -----------------------------------------------------------------------

def test_shipped_configs_plan_the_papers_grid():
    paper = load_config(SweepConfig, CONFIGS / "sweep-smash-table2.yaml")
    assert len(paper.tasks) == 12 and paper.seeds == [13, 21, 42, 87, 100]
    assert len(paper.method("prompt-ft").points()) == 6 and paper.method("zero-shot").points() == [{}]
    assert paper.phases[-1] == ["distill", "distill-bt10"]  # read the teacher's best runs: after them
    rte = paper.recipe_config({"method": "smash", "task": "RTE", "seed": 13, "point": {"lr": 1e-5, "batch_size": 2}},
                              "x", sweep._unfilled)
    sst2 = paper.recipe_config({"method": "smash", "task": "SST-2", "seed": 13, "point": {"lr": 1e-5, "batch_size": 2}},
                               "x", sweep._unfilled)
    assert rte.init.endswith("smash-pairs/student") and rte.max_length == 128
    assert sst2.init.endswith("smash-sentiment/student") and sst2.max_length == 64
    local = load_config(SweepConfig, CONFIGS / "sweep-smash-table2_local.yaml")
    assert local.tasks == ["SST-2", "RTE"] and len(local.seeds) == 5
    assert all(len(local.method(m).points()) == 2 for m in local.method_names if m != "zero-shot")
    assert not local.storage.startswith("s3://") and paper.storage.startswith("s3://")


def test_trials_resolve_placeholders_and_layers(tmp_path):
    cfg = _sweep(tmp_path, base={"model": "base-model", "max_steps": 7}, per_task={"SST-2": {"max_length": 64}},
                 methods={"teacher": {"method": "prompt", "model": "big"},
                          "distill": {"method": "prompt", "teacher": "{best:teacher}", "kd_weight": 0.5,
                                      "per_task": {"SST-2": {"max_steps": 9}}},
                          "zero": {"method": "zero-shot", "grid": {}}})
    assert cfg.phases == [["teacher", "zero"], ["distill"]]
    assert [t["point"] for t in cfg.trials() if t["method"] == "teacher" and t["seed"] == 13] == [{"lr": 1e-4}, {"lr": 1e-3}]
    assert len(cfg.trials()) == 2 * 2 + 2 * 2 + 2
    trial = {"method": "distill", "task": "SST-2", "seed": 21, "point": {"lr": 1e-3}}
    rc = cfg.recipe_config(trial, "run-x", lambda p: f"ckpt-of-{p}")
    assert (rc.teacher, rc.kd_weight, rc.model, rc.max_length, rc.max_steps) == \
           ("ckpt-of-best:teacher", 0.5, "base-model", 64, 9)
    assert (rc.lr, rc.seed, rc.task, rc.k, rc.name, rc.output_dir) == (1e-3, 21, "SST-2", 16, "run-x", cfg.experiment)


def test_a_method_runs_on_its_own_splits(tmp_path):
    """`seeds:` on a method (zero-shot: nothing trained, one test file for every split): only
    those splits are planned, run and expected by the report."""
    cfg = _sweep(tmp_path, seeds=[13, 21, 42],
                 methods={"prompt": {"method": "prompt"}, "zero": {"method": "zero-shot", "grid": {}, "seeds": [21]}})
    assert [(t["method"], t["seed"]) for t in cfg.trials() if t["method"] == "zero"] == [("zero", 21)]
    assert len(cfg.trials()) == 3 * 2 + 1
    assert cfg.expected().seeds["zero", "SST-2"] == [21] and cfg.expected().seeds["prompt", "SST-2"] == [13, 21, 42]
    with pytest.raises(ConfigError, match=r"methods\.zero\.seeds must be .* from the sweep's seeds \[13, 21, 42\]"):
        _sweep(tmp_path, seeds=[13, 21, 42], methods={"zero": {"method": "zero-shot", "seeds": [7]}})


@pytest.mark.parametrize("kw, match", [
    ({"grid": {"lr": []}}, r"grid\.lr must be a non-empty list"),
    ({"methods": {"a": {"method": "prompt", "grid": {"batch_size": []}}}}, r"methods\.a\.grid\.batch_size must be a non-empty"),
    ({"methods": {}}, "the sweep has no methods"),
    ({"methods": {"a": {"recipe": "nope"}}}, "method 'a': unknown recipe 'nope'"),
    ({"methods": {"a": {"teacher": "{best:b}"}}}, r"method 'a' reads the runs of 'b' but there is no such method"),
    ({"methods": {"a": {"extra_train": "{ipet:b}"}}}, r"method 'a' reads the runs of 'b' but there is no such method"),
    ({"methods": {"a": {"teacher": "{best:b}"}, "b": {"teacher": "{best:a}"}}}, "in a cycle"),
    ({"methods": {"a": {"lr": 1e-5}}}, r"method 'a' sets \['lr'\], which its grid varies"),
    ({"methods": {"a": {"seed": 13}}}, "method 'a' sets 'seed', which the sweep sets"),
    ({"methods": {"a": {"lerning_rate": 1}}}, None),  # checked per trial, see below
    ({"tables": [{"rows": ["a-typo"]}]}, "table 'table': unknown method 'a-typo'"),
    ({"per_task": {"NOPE": {"max_length": 64}}}, r"per_task\.NOPE: unknown task 'NOPE'; the sweep's tasks"),
    ({"methods": {"a": {"model": "{student:x}"}}}, r"uses \{student:x\} but students has no 'x'"),
])
def test_bad_sweep_configs_are_one_line_errors(tmp_path, kw, match):
    if match is None:
        with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['lerning_rate'\]"):
            sweep.check(_sweep(tmp_path, **kw))
        return
    with pytest.raises(ConfigError, match=match):
        _sweep(tmp_path, **kw)


# --- an axis: a key swept outside the grid, a result per value ----------------------------------

def test_an_axis_plans_a_result_per_value_with_its_overrides(tmp_path):
    """Every axis value is its own set of trials (not a candidate of the grid), with the
    overrides that go with it; `{best:}` and `{k}` read the trial's own point."""
    cfg = _sweep(tmp_path, seeds=[13, 21], methods={"teacher": {"method": "prompt", "model": "big"},
                                                    "kd": {"method": "prompt", "teacher": "{best:teacher}"}},
                 axis={"key": "k", "values": [16, 32], "overrides": [{"max_steps": 1000}, {"max_steps": 2000}]})
    trials = cfg.trials()
    assert len(trials) == 2 * 2 * 2 * 2  # methods x K x splits x grid points
    assert [(t["axis"], t["seed"], t["method"]) for t in trials[:5:2]] == \
           [("k16", 13, "teacher"), ("k16", 13, "kd"), ("k16", 21, "teacher")]
    kd32 = {"method": "kd", "task": "SST-2", "seed": 21, "point": {"lr": 1e-3}, "axis": "k32"}
    rc = cfg.recipe_config(kd32, "n", lambda p: p)
    assert (rc.k, rc.max_steps, rc.lr, rc.teacher) == (32, 2000, 1e-3, "best:teacher")
    assert (cfg.recipe_config({**kd32, "axis": "k16"}, "n", lambda p: p).k, sweep._filler(cfg, kd32)("k")) == (16, 32)
    assert sweep.run_name(kd32, "t1") == "kd-SST-2-s21-k32-t1"
    # {best:teacher} at K=32 is the teacher's best run at K=32, not at K=16
    for axis in ("k16", "k32"):
        for lr in (1e-4, 1e-3):
            write_record(cfg.experiment, {"name": f"teacher-{axis}-{lr}", "status": "done", "task": "SST-2", "seed": 21,
                                          "metric": "acc", "best_dev": lr, "test": 0.5, "checkpoint": f"/{axis}-{lr}",
                                          "sweep": {"method": "teacher", "task": "SST-2", "seed": 21,
                                                    "point": {"lr": lr}, "axis": axis}})
    assert sweep._filler(cfg, kd32)("best:teacher") == "/k32-0.001"


def test_shipped_figure_configs_carry_the_papers_schedules_and_prompts():
    fig4 = load_config(SweepConfig, CONFIGS / "sweep-smash-fig4.yaml")
    steps = {t["axis"]: fig4.recipe_config(t, "x", sweep._unfilled).max_steps for t in fig4.trials()}
    assert steps == {"k16": 1000, "k32": 1000, "k64": 2000, "k128": 2000, "k256": 4000}  # SMASH App. A.1
    fig3 = load_config(SweepConfig, CONFIGS / "sweep-smash-fig3.yaml")
    auto1 = {(t["task"], t["seed"]): fig3.recipe_config(t, "x", sweep._unfilled).resolve_task().template
             for t in fig3.trials() if t["axis"] == "auto-T1"}
    # LM-BFF auto_template/SST-2/16-13.sort.txt line 1: *cls**sent_0*_And_that_is*mask*.*sep+*
    assert auto1["SST-2", 13] == "{x0} And that is {mask}." and len(set(auto1.values())) > 2
    words = load_config(SweepConfig, CONFIGS / "sweep-smash-fig3-verbalizers.yaml")
    l1 = next(t for t in words.trials() if (t["task"], t["seed"], t["axis"]) == ("MNLI", 13, "auto-L1"))
    # auto_label_mapping/MNLI/16-13.sort.txt line 1
    assert words.recipe_config(l1, "x", sweep._unfilled).resolve_task().verbalizer == \
           {"contradiction": "Alternatively", "entailment": "Similarly", "neutral": "Additionally"}


@pytest.mark.parametrize("axis, kw, match", [
    ({"key": "nope", "values": [1]}, {}, r"axis\.key 'nope' is no config key of recipe 'finetune' \(method 'prompt'\)"),
    ({"key": "k", "values": []}, {}, r"axis\.values must be a non-empty list"),
    ({"key": "template", "values": {"SST-2": []}}, {}, r"axis\.values must be a non-empty list"),
    ({"key": "lr", "values": [1e-4]}, {}, r"the grid varies \['lr'\], which the axis sets"),
    ({"key": "k", "values": [16], "overrides": [{"lr": 1}]}, {}, r"the grid varies \['lr'\], which the axis sets"),
    ({"key": "template", "values": ["{x0} It was {mask}."]}, {"methods": {"a": {"template": "{x0} {mask}."}}},
     r"method 'a' sets or varies \['template'\], which the axis sets per value"),
    ({"key": "seed", "values": [1]}, {}, r"axis\.key 'seed' is set by the sweep for every trial"),
    ({"key": "k", "values": [16, 32], "overrides": [{"max_steps": 1}]}, {}, r"axis\.overrides has 1 entries for 2 values"),
    ({"key": "k", "values": [16.5]}, {}, r"axis k: values must be positive integers"),
    ({"key": "template", "values": [{"by_seed": {13: "{x0} A {mask} one."}}]}, {},
     r"by_seed has no value for split 21"),
    ({"key": "template", "values": {"RTE": ["{x0} A {mask} one."]}}, {}, r"axis\.values has no values for task SST-2"),
])
def test_bad_axis_configs_are_one_line_errors(tmp_path, axis, kw, match):
    with pytest.raises(ConfigError, match=match):
        _sweep(tmp_path, axis=axis, **kw)


def test_a_k_the_pool_cannot_give_is_refused_before_ray_starts(tmp_path, capsys):
    cfg_file = tmp_path / "s.yaml"
    cfg_file.write_text(yaml.safe_dump({"name": "s", "storage": str(tmp_path / "runs"), "tasks": ["SST-2"], "seeds": [13],
                                        "grid": {}, "methods": {"prompt": {"method": "prompt"}},
                                        "axis": {"key": "k", "values": [16, 4000]}}))
    err = _cli_error(capsys, ["sweep", "--config", str(cfg_file)])
    assert re.search(r"axis k=4000: SST-2 split 4000-13 from .*pool/SST-2/train.json: task SST-2: label '\d' has \d+ "
                     r"usable examples .* needs 8000 .*original_data\.SST-2", err), err


def _cli_error(capsys, args) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_bad_input_through_the_cli(tmp_path, capsys):
    cfg_file = tmp_path / "s.yaml"
    base = {"name": "s", "storage": str(tmp_path / "runs"), "tasks": ["SST-2"], "seeds": [13],
            "grid": {"lr": [1e-4]}, "methods": {"prompt": {"method": "prompt", "model": str(asset("models", "minilm-l6-mlm-wiki"))}}}

    def run(**kw):
        cfg_file.write_text(yaml.safe_dump({**base, **kw}))
        return _cli_error(capsys, ["sweep", "--config", str(cfg_file)])

    assert "unknown task 'NOPE'" in run(tasks=["NOPE"])
    assert "grid.lr must be a non-empty list" in run(grid={"lr": []})
    assert "unknown method 'teacher'" in run(tables=[{"rows": ["teacher"]}])
    # a split directory with a missing file: named, with the task and seed
    data = tmp_path / "k-shot" / "SST-2" / "16-13"
    data.mkdir(parents=True)
    shutil.copy(asset("fewshot", "k-shot", "SST-2", "16-13", "train.tsv"), data)
    err = run(base={"data_dir": str(tmp_path / "k-shot")})
    assert "task SST-2 split seed 13" in err and str(data / "dev.tsv") in err
    assert "not a sweep directory" in _cli_error(capsys, ["sweep", "--resume", str(tmp_path / "nothing")])
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("records"))


def test_unknown_task_and_missing_split_errors_name_the_input(tmp_path):
    with pytest.raises(PromptError, match="unknown task 'NOPE'"):
        sweep.check(_sweep(tmp_path, tasks=["NOPE"]))
    with pytest.raises(DataError, match="task SST-2 split seed 7"):
        sweep.check(_sweep(tmp_path, seeds=[7]))


def test_asha_compares_grid_points_of_one_split_only():
    """A weak split (all grid points low) is not stopped because another split scores higher."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

    def trial(i, seed):
        return SimpleNamespace(trial_id=f"t{i}", config={"trial": {"method": "m", "task": "RTE", "seed": seed}})

    trials = [trial(0, 13), trial(1, 13), trial(2, 21)]
    results = [0.9, 0.8, 0.2]
    grouped = sweep.GroupedASHA(grace_period=1, reduction_factor=2, max_t=10)
    grouped.set_search_properties("dev", "max")
    plain = AsyncHyperBandScheduler(time_attr="step", metric="dev", mode="max", grace_period=1, reduction_factor=2,
                                    max_t=11)
    decisions = {}
    for name, sched in (("grouped", grouped), ("plain", plain)):
        for t in trials:
            sched.on_trial_add(None, t)
        decisions[name] = [sched.on_trial_result(None, t, {"step": 1, "dev": d}) for t, d in zip(trials, results)]
    assert decisions["plain"][2] == TrialScheduler.STOP  # compared with another split's trials
    assert decisions["grouped"][2] == TrialScheduler.CONTINUE  # alone in its split
    assert len(grouped._groups) == 2


def test_a_log_file_gets_one_line_per_ended_trial(capsys):
    """Without a terminal Tune is silent (its boxes and tables were most of a captured demo log)
    and the sweep prints one line per trial that ended, with its metrics."""
    lines = sweep.TrialLines(total=3)
    spec = {"method": "prompt", "task": "SST-2", "seed": 13}
    lines.on_trial_complete(0, [], SimpleNamespace(trial_id="ab_00000", config={"trial": spec},
                                                   last_result={"dev": 0.625, "test": 0.6123, "step": 30}))
    lines.on_trial_error(0, [], SimpleNamespace(trial_id="ab_00001", config={"trial": {**spec, "seed": 21}},
                                                last_result=None))
    assert capsys.readouterr().out.splitlines() == [
        "[1/3] prompt-SST-2-s13-ab_00000 done dev=0.6250 test=0.6123",
        "[2/3] prompt-SST-2-s21-ab_00001 failed"]


# --- records concurrent trials cannot lose -----------------------------------------------------

@pytest.mark.parametrize("where", ["local", "s3"])
def test_records_written_at_once_are_all_kept(where, tmp_path, s3_server):
    if where == "s3":
        import boto3

        boto3.client("s3").create_bucket(Bucket="sweep-records")
        out = "s3://sweep-records/exp"
    else:
        out = str(tmp_path / "exp")
    n = 8
    barrier = threading.Barrier(n)

    def trial(i):
        barrier.wait()  # every writer at the same moment
        return write_record(out, {"name": f"run-{i}", "status": "done", "i": i})

    with ThreadPoolExecutor(n) as pool:
        uris = list(pool.map(trial, range(n)))
    assert len(set(uris)) == n
    assert sorted(r["i"] for r in read_records(out).values()) == list(range(n))


# --- a tiny sweep through Tune: killed, resumed, reported -------------------------------------

def _independent_cells(records: list[dict], grids: dict[str, list[float]]) -> dict[str, str]:
    """`mean (std)` per method, computed here from the records: per split the best dev over the
    method's grid (ties to the earlier point), its test x100; numpy's std over splits, and
    `(1 split)` for a method run on one."""
    out = {}
    for method in sorted({r["sweep"]["method"] for r in records}):
        tests = []
        for seed in sorted({r["sweep"]["seed"] for r in records if r["sweep"]["method"] == method}):
            mine = {r["sweep"]["point"]["lr"]: r for r in records
                    if r["sweep"]["method"] == method and r["sweep"]["seed"] == seed}
            best = None
            for lr in grids[method]:
                if best is None or mine[lr]["best_dev"] > best["best_dev"]:
                    best = mine[lr]
            tests.append(100 * best["test"])
        out[method] = f"{np.mean(tests):.1f} " + ("(1 split)" if len(tests) == 1 else f"({np.std(tests):.1f})")
    return out


def test_tiny_sweep_is_killed_resumed_and_reported(ray_cluster, tiny_bert, tmp_path, capsys):
    grid = [3e-3, 3e-4]
    cfg_file = tmp_path / "sweep.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "name": "tiny", "storage": str(tmp_path / "sweeps"), "tasks": ["SST-2"], "seeds": [13, 21],
        "grid": {"lr": grid},
        "base": {"model": tiny_bert, "max_steps": 3, "eval_every": 1, "batch_size": 8, "eval_batch_size": 128},
        # classifier on one split and grid point: a second row at the cost of one trial
        "methods": {"prompt": {"method": "prompt", "label": "prompt FT"},
                    "classifier": {"method": "classifier", "seeds": [13], "grid": {"lr": grid[:1]}},
                    # fails in its trial (a global batch of 3 does not split over 2 workers): a gap in the report
                    "broken": {"method": "prompt", "grid": {}, "batch_size": 3, "seeds": [13],
                               "engine": {"num_workers": 2, "cpus_per_worker": 0.5}}}}))
    cfg = load_config(SweepConfig, cfg_file)
    exp = Path(cfg.experiment)
    assert sweep.cluster_fits(sweep.trial_resources(cfg)) == 2  # two 1-CPU trials side by side on the 2-CPU cluster

    # the driver in its own process group on the session's cluster; killed once some trials finished
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "-m", "rayapp.cli", "sweep", "--config", str(cfg_file)], env=env,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def finished():
        folder = exp / "records"
        files = folder.glob("*.json") if folder.is_dir() else []
        return [f for f in files if json.loads(f.read_text()).get("status") == "done"]

    def two_finished():
        if driver.poll() is not None:
            raise AssertionError(f"the sweep driver exited ({driver.returncode}) before it was killed")
        return len(finished()) >= 2

    try:
        wait_until(two_finished, timeout=900, what="two finished trials")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    before = {f.name: f.stat().st_mtime_ns for f in finished()}
    assert 2 <= len(before) < 5

    # --resume completes it: all 6 trials, the finished ones untouched; the broken method's one failed
    assert main(["sweep", "--resume", str(exp)]) == 0
    summary = capsys.readouterr().out
    records = [json.loads(f.read_text()) for f in sorted((exp / "records").glob("*.json"))]
    failed = [r for r in records if r["status"] == "failed"]
    records = [r for r in records if r["status"] == "done"]
    assert len(records) == 5 and len(failed) == 1, summary
    assert all("cannot be split evenly over 2 workers" in r["error"] for r in failed)
    assert {f: (exp / "records" / f).stat().st_mtime_ns for f in before} == before
    assert len({(r["sweep"]["method"], r["sweep"]["seed"], r["sweep"]["point"]["lr"]) for r in records}) == 5
    # every trial reported dev to Tune, which logged it for TensorBoard
    logged = {f.parent.name for f in exp.glob("tune-0/*/events.out.tfevents*")}
    assert all(any(d.startswith(r["name"]) for d in logged) for r in records), logged

    # the report's cells are the independently computed mean (std) of the best-dev trials' tests
    assert main(["report", str(exp), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "table.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip().strip("*") for line in md.splitlines()
            if line.startswith("| ") and not line.startswith("| method")}
    expected = _independent_cells(records, {"prompt": grid, "classifier": grid[:1]})
    assert rows == {"prompt FT": expected["prompt"], "classifier": expected["classifier"], "broken": "— [1]"}
    assert "[1] broken / SST-2: 0/1 splits; seed 13: (fixed) failed: batch_size=3 (global) cannot be split" in md
    assert (tmp_path / "report" / "report.html").stat().st_size > 10_000


def test_sweep_on_s3_keeps_tune_results_records_and_report_there(ray_cluster, s3_server, tiny_bert, tmp_path,
                                                                capsys):
    """Storage s3://: sweep.json, Tune's experiment (results, TensorBoard events) and the
    records live in the bucket, and the report reads them from there (one zero-shot trial).
    Its output, not a terminal, is the sweep's own lines only (no Tune boxes)."""
    import boto3

    from rayapp.sweep import report

    boto3.client("s3").create_bucket(Bucket="sweeps")
    cfg = build(SweepConfig, {"name": "on-s3", "storage": "s3://sweeps/exp", "tasks": ["SST-2"], "seeds": [13],
                              "grid": {}, "base": {"model": tiny_bert, "eval_batch_size": 128},
                              "methods": {"zero-shot": {"method": "zero-shot"}}})
    summary = sweep.run(cfg)
    assert (summary["done"], summary["failed"]) == (1, 0), summary
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith("sweep s3://sweeps/exp/on-s3: 1 trials"), out
    assert re.fullmatch(r"\[1/1\] zero-shot-SST-2-s13-\w+ done dev=0\.\d{4} test=0\.\d{4}", out[1]), out
    files = storage.list_files(cfg.experiment)
    assert any(f.endswith("/sweep.json") for f in files)
    assert any("/tune-0/" in f and "events.out.tfevents" in f for f in files)
    assert any("/tune-0/" in f and f.endswith("/result.json") for f in files)
    (rec,) = [f for f in files if "/records/" in f]
    md = report.write([cfg.experiment], str(tmp_path / "out"))["markdown"]
    test = json.loads(storage.read_text(rec))["test"]
    assert f"**{100 * test:.1f} (1 split)**" in md


def test_trials_are_split_major():
    """A sweep stopped part-way has every method on the splits it reached."""
    cfg = build(SweepConfig, {"name": "order", "tasks": ["SST-2", "RTE"], "seeds": [13, 21], "grid": {"lr": [1, 2]},
                              "methods": {"a": {"method": "prompt"}, "b": {"method": "classifier"}}})
    order = [(t["task"], t["seed"], t["method"], t["point"]["lr"]) for t in cfg.trials()]
    assert order[:4] == [("SST-2", 13, "a", 1), ("SST-2", 13, "a", 2), ("SST-2", 13, "b", 1), ("SST-2", 13, "b", 2)]
    assert order == sorted(order, key=lambda o: (["SST-2", "RTE"].index(o[0]), o[1], o[2], o[3]))


def test_an_interrupted_phase_stops_the_sweep_before_the_next(tmp_path, monkeypatch):
    """Tune's fit() returns normally after Ctrl-C/SIGTERM with trials unfinished: the sweep must
    not start phase 2 (it needs phase 1's best runs) and tells how to continue. A phase has
    ended when each of its trials left a record."""
    cfg = build(SweepConfig, {"name": "phased", "storage": str(tmp_path), "tasks": ["SST-2"], "seeds": [13, 21],
                              "grid": {}, "methods": {"teacher": {"method": "prompt"},
                                                      "kd": {"method": "prompt", "teacher": "{best:teacher}"}}})
    assert len(cfg.phases) == 2
    first = cfg.trials(0)

    class Tuner:  # stands in for an interrupted Tune run: only the first trial wrote its record
        def __init__(self, trainable, param_space, **kw):
            pass

        @staticmethod
        def can_restore(*a, **kw):
            return False

        def fit(self):
            sweep._write_gap(cfg.experiment, cfg.k, first[0], "t0", "failed", {}, error="x")

    monkeypatch.setattr(sweep.tune, "Tuner", Tuner)
    with pytest.raises(sweep.SweepInterrupted, match=r"stopped in phase 1 of 2 \(1/2 trials ended\).*--resume"):
        sweep._phase(cfg, 0)
    sweep._write_gap(cfg.experiment, cfg.k, first[1], "t1", "failed", {}, error="y")
    sweep._phase(cfg, 0)  # both ended: the next phase may start


def test_sweep_concurrency_follows_the_autoscalers_maximum(ray_cluster):
    """Trials fill the cluster an autoscaler may grow to (its cluster config, as `ray up`'s
    autoscaler reports it to the GCS), not the nodes alive at submit time; without one, the
    nodes alive now (the multi-node test adds a node mid-sweep)."""
    from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY as KEY, GCS_AUTOSCALER_STATE_NAMESPACE as NS
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    cpu, gpu = {"CPU": 1.0, "GPU": 0.0}, {"CPU": 0.0, "GPU": 1.0}
    assert sweep.cluster_fits(cpu) == 2 and sweep.cluster_fits(gpu) == 1  # 2 CPUs; no GPU: one waits
    config = autoscaler_pb2.ClusterConfig(node_group_configs=[
        autoscaler_pb2.NodeGroupConfig(name="cpu", resources={"CPU": 8}, max_count=4),
        autoscaler_pb2.NodeGroupConfig(name="gpu", resources={"CPU": 4, "GPU": 1}, max_count=6)])
    _internal_kv_put(KEY.encode(), config.SerializeToString(), namespace=NS.encode())
    try:
        assert sweep.cluster_fits(cpu) == 8 * 4 + 4 * 6 and sweep.cluster_fits(gpu) == 6
        assert sweep.ClusterPacedGrid(gpu).limit() == 6
    finally:
        _internal_kv_del(KEY.encode(), namespace=NS.encode())
    assert sweep.cluster_fits(gpu) == 1


# --- one-worker trials run their loop in the trial's actor ----------------------------------

def _tune_results(exp: Path) -> dict[str, list[dict]]:
    """Tune's results per trial dir (every report the trial made to Tune)."""
    return {d.name: [json.loads(line) for line in (d / "result.json").read_text().splitlines()]
            for d in (exp / "tune-0").iterdir() if (d / "result.json").is_file()}


def test_a_reused_trial_actor_carries_nothing_into_the_next_trial(ray_cluster, tiny_bert, tmp_path):
    """Trials of two tasks and two methods, one after the other on one reused actor, each give
    exactly the run it gives on its own (model, optimizer, RNG and task are the trial's own),
    and none started a Ray Train run."""
    import dataclasses

    from ray.util.state import list_actors

    from rayapp.recipes.finetune import run

    cfg = _sweep(tmp_path, tasks=["SST-2", "MR"], seeds=[13], grid={}, **ONE_TRIAL,
                 base={"model": tiny_bert, "max_steps": 4, "eval_every": 2, "batch_size": 4, "eval_batch_size": 128},
                 methods={"prompt": {"method": "prompt"}, "classifier": {"method": "classifier"}})
    def train_workers() -> int:  # every Ray Train worker this cluster ever had, dead ones included
        return len(list_actors(address=ray_cluster.get_runtime_context().gcs_address, limit=10_000,
                               filters=[("class_name", "=", "RayTrainWorker")]))

    before = train_workers()
    assert sweep.run(cfg)["done"] == 4
    results = _tune_results(Path(cfg.experiment))
    assert len(results) == 4 and len({r[-1]["pid"] for r in results.values()}) == 1, "one actor ran every trial"
    assert train_workers() == before
    for rec in read_records(cfg.experiment).values():
        trial = {k: rec["sweep"][k] for k in ("method", "task", "seed", "point")}
        own = dataclasses.replace(cfg.recipe_config(trial, rec["name"], sweep._filler(cfg, trial)),
                                  output_dir=str(tmp_path / "alone"))
        alone = run(own)
        assert (alone["loss_curve"], alone["dev_curve"], alone["test"]) == \
            (rec["loss_curve"], rec["dev_curve"], rec["test"]), rec["name"]


def test_a_killed_one_worker_trial_resumes_from_its_checkpoint(ray_cluster, tiny_bert, tmp_path):
    """The actor of a one-worker trial is killed after its run committed a checkpoint; Tune
    restarts the trial (`max_failures`) and the run continues from that checkpoint, not step 0."""
    from ray.util.state import list_actors

    # killed at its first checkpoint (step 10): 110 more steps and 11 evaluations outlast the kill
    steps = 120
    cfg_file = tmp_path / "sweep.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "name": "killed", "storage": str(tmp_path / "sweeps"), "tasks": ["SST-2"], "seeds": [13], "grid": {},
        "max_failures": 1, "methods": {"prompt": {"method": "prompt"}},
        "base": {"model": tiny_bert, "max_steps": steps, "eval_every": 10, "batch_size": 4,
                 "eval_batch_size": 128}}))
    cfg = load_config(SweepConfig, cfg_file)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "-m", "rayapp.cli", "sweep", "--config", str(cfg_file)], env=env,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gcs = ray_cluster.get_runtime_context().gcs_address
    try:
        def committed():
            if driver.poll() is not None:
                raise AssertionError(f"the sweep driver exited ({driver.returncode}) before the kill")
            runs = [d for d in Path(cfg.experiment).glob("prompt-*") if (d / "latest.json").is_file()]
            return runs[0] if runs else None

        run_dir = wait_until(committed, timeout=600, what="a committed checkpoint")
        (actor,) = list_actors(address=gcs, filters=[("class_name", "=", "ImplicitFunc"), ("state", "=", "ALIVE")])
        os.kill(actor.pid, signal.SIGKILL)
        killed_after = json.loads((run_dir / "latest.json").read_text())["metrics"]["step"]
        assert driver.wait(timeout=900) == 0
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    (rec,) = read_records(cfg.experiment).values()
    assert rec["status"] == "done" and rec["step"] == steps
    (resumed_at,) = rec["restarts"]
    assert 0 < killed_after == resumed_at < steps  # from the checkpoint committed when it was killed
    assert [first for first, _ in rec["nodes"]] == [0, resumed_at]
    assert rec["dev_curve"][0][0] == 0 and len(rec["dev_curve"]) == steps // 10 + 1


# --- axis sweeps through Tune ------------------------------------------------------------------

def _small_root(tmp_path) -> Path:
    """LM-BFF's SST-2 16-shot splits 13 and 21 with a 40-example test set, and a 400-row pool
    beside them: a K=32 split can be drawn and every evaluation is quick."""
    root = tmp_path / "fewshot"
    for seed in (13, 21):
        folder = root / "k-shot" / "SST-2" / f"16-{seed}"
        folder.mkdir(parents=True)
        source = asset("fewshot", "k-shot", "SST-2", f"16-{seed}")
        for name in ("train.tsv", "dev.tsv"):
            shutil.copy(source / name, folder)
        (folder / "test.tsv").write_text("".join((source / "test.tsv").read_text().splitlines(keepends=True)[:41]))
    pool = json.loads(asset("fewshot", "pool", "SST-2", "train.json").read_text())
    (root / "pool" / "SST-2").mkdir(parents=True)
    (root / "pool" / "SST-2" / "train.json").write_text(json.dumps({k: pool[k] for k in list(pool)[:400]}))
    return root / "k-shot"


def test_a_k_axis_sweep_runs_and_reports_a_table_per_k_and_the_figure(ray_cluster, tiny_bert, tmp_path):
    """K in {16, 32}: 16 is LM-BFF's split, 32 is drawn from the pool before the trials (under
    the experiment, where the trials read it) and runs its own steps; the report has a table
    per K and report.html the line figure, whose series are the records' mean (std) per K."""
    from rayapp.sweep import report

    data = _small_root(tmp_path)
    cfg = _sweep(tmp_path, grid={}, base={"model": tiny_bert, "data_dir": str(data), "eval_every": 1,
                                         "batch_size": 4, "eval_batch_size": 64},
                 methods={"prompt": {"method": "prompt", "label": "prompt FT"}},
                 axis={"key": "k", "title": "K", "values": [16, 32], "overrides": [{"max_steps": 2}, {"max_steps": 3}]},
                 **ONE_TRIAL)
    assert sweep.run(cfg)["done"] == 4
    exp = Path(cfg.experiment)
    assert sorted(spec.load(str(exp)).made_splits) == ["SST-2/32-13", "SST-2/32-21"]
    records = [json.loads(f.read_text()) for f in (exp / "records").glob("*.json")]
    by_k = {k: [r for r in records if r["sweep"]["axis"] == f"k{k}"] for k in (16, 32)}
    assert all(r["k"] == k and r["config"]["max_steps"] == k // 16 + 1 and r["step"] == k // 16 + 1
               for k, rs in by_k.items() for r in rs)
    assert all(r["split"]["pool"] == str(data.parent / "pool" / "SST-2" / "train.json") and
               r["split"]["train"].startswith(str(exp / "splits")) for r in by_k[32])
    assert all(r["split"]["test"].endswith("16-13/test.tsv") or r["split"]["test"].endswith("16-21/test.tsv")
               for r in by_k[32])
    out = report.write([str(exp)], str(tmp_path / "report"))
    names = {Path(f).name for f in out["files"]}
    assert {"table-k16.md", "table-k32.md", "table-k16.csv", "axis.png", "report.html"} <= names
    series = report.axis_series(report.gather([str(exp)]))
    expected = [(float(k), float(np.mean([100 * r["test"] for r in rs])), float(np.std([100 * r["test"] for r in rs])))
                for k, rs in by_k.items()]
    assert list(series) == ["SST-2"] and list(series["SST-2"]) == ["prompt"]
    assert np.allclose(series["SST-2"]["prompt"], expected)
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Test metric vs K" in html and html.count("data:image/png;base64,") == 1 and "(K = 32)" in html


def test_a_label_word_the_model_cannot_score_is_refused_before_the_trials(tiny_bert, tmp_path):
    """The pre-check encodes each method's prompt with its model, as the run itself would: a
    label word of several tokens is one line naming the method and task, not failed trials."""
    cfg = _sweep(tmp_path, seeds=[13], grid={}, base={"model": tiny_bert, "data_dir": str(_small_root(tmp_path))},
                 methods={"prompt": {"method": "prompt"},
                          "words": {"method": "prompt", "verbalizer": {"0": "terrible", "1": "xqzzyqwv"}}})
    with pytest.raises(PromptError, match=r"^method words on SST-2: .*xqzzyqwv"):
        sweep.check(cfg)


def test_a_template_axis_runs_each_template(ray_cluster, tiny_bert, tmp_path):
    templates = ["{x0} It was {mask}.", "{x0} A {mask} one."]
    cfg = _sweep(tmp_path, seeds=[13], grid={}, methods={"zero-shot": {"method": "zero-shot"}},
                 base={"model": tiny_bert, "data_dir": str(_small_root(tmp_path)), "eval_batch_size": 64},
                 axis={"key": "template", "values": templates}, **ONE_TRIAL)
    assert sweep.run(cfg)["done"] == 2
    records = read_records(cfg.experiment).values()
    assert {(r["sweep"]["axis"], r["config"]["template"]) for r in records} == \
           {("template1", templates[0]), ("template2", templates[1])}
