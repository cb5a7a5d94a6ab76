"""The `rayapp` command line: subcommands, help, and one-line errors for user mistakes."""
import re
import subprocess
import sys

import pytest

from rayapp.assets import asset
from rayapp.cli import main


def test_tasks_lists_all_builtin_tasks(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    for name in ("SST-2", "MNLI-mm", "STS-B", "trec", "CoLA"):
        assert name in out


def test_tasks_show_renders_a_prompt(capsys):
    tokenizer = str(asset("models", "bert-base-uncased-tokenizer"))
    assert main(["tasks", "--show", "RTE", "--tokenizer", tokenizer, "--example", "It rains."]) == 0
    out = capsys.readouterr().out
    assert "[CLS] it rains? [MASK], the second sentence. [SEP]" in out
    assert "not_entailment -> ['no']" in out


def test_fewshot_show(capsys):
    assert main(["fewshot", "show", "--task", "RTE", "--seed", "21"]) == 0
    out = capsys.readouterr().out
    assert '"train": 32' in out and '"test": 277' in out


def test_fewshot_make(tmp_path, capsys):
    table = tmp_path / "pool.tsv"
    table.write_text("text\ty\n" + "".join(f"sentence number {i}\t{i % 2}\n" for i in range(40)))
    args = ["fewshot", "make", "--task", "SST-2", "--train", str(table), "--test", str(table),
            "--columns", "text_a=text", "label=y", "--k", "4", "--seeds", "13", "21", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    assert (tmp_path / "out" / "SST-2" / "4-21" / "train.jsonl").exists()
    assert "train 8 dev 8 test 40" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["finetune", "task=SST-3"], "unknown task 'SST-3'"),
    (["finetune", "lrr=1"], r"unknown config key\(s\) \['lrr'\]"),
    (["finetune", "--config", "missing.yaml"], "config file missing.yaml does not exist"),
    (["fewshot", "show", "--task", "RTE", "--k", "8"], "8-13"),
    (["distill", "setting=3"], "data is required"),
    (["teacher-cache", "--examples", "nowhere", "--teacher", "x", "--out", "y"], "cannot find 'x': no local path"),
])
def test_user_mistakes_are_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert re.search(message, err), err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "rayapp.cli", "finetune", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "key=value" in out.stdout


def test_a_captured_log_of_single_commands_is_plain_lines(tiny_bert, tmp_path):
    """`rayapp init-student` (transformers' weight-loading bars, before any Ray), `rayapp
    intermediate pairs` then `rayapp teacher-cache` (Ray tasks, then Ray Data's
    actor pool), each a fresh process with its output in a file, as under `> log` or `ray job
    submit`: rayapp's own lines only, no Ray start-up warning, execution plan, colour code or
    live-bar frame."""
    import json
    import os
    import random
    import re

    rng = random.Random(0)
    words = "river stone garden music winter market bridge letter window forest".split()
    sentence = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(5, 12))).capitalize() + "."
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(sentence() for _ in range(6))}) + "\n" for _ in range(20)))
    log, student_log = tmp_path / "log.txt", tmp_path / "student-log.txt"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)  # as a user's shell: the CLI turns the bars off itself
    command = lambda *argv: [sys.executable, "-m", "rayapp.cli", *argv]
    with open(student_log, "w") as out:  # beside the other two: it reads nothing they write
        student = subprocess.Popen(command("init-student", "--teacher", tiny_bert, "--out", str(tmp_path / "student")),
                                   stdout=out, stderr=subprocess.STDOUT, env=env)  # model loading bars
    try:
        for argv in (["intermediate", "pairs", "--corpus", str(corpus), "--out", str(tmp_path / "pairs"),
                      "--num-examples", "30"],
                     ["teacher-cache", "--examples", str(tmp_path / "pairs"), "--teacher", tiny_bert,
                      "--out", str(tmp_path / "cache"), "--top-k", "4"]):
            with open(log, "a") as out:
                done = subprocess.run(command(*argv), stdout=out, stderr=subprocess.STDOUT, env=env)
            assert done.returncode == 0, log.read_text()
        assert student.wait(timeout=600) == 0, student_log.read_text()
    finally:  # not left running when the test fails first
        if student.poll() is None:
            student.kill()
            student.wait()
    text = student_log.read_text() + log.read_text()
    assert "student written to" in text and "examples written to" in text and "teacher cache written to" in text
    # rayapp's own INFO lines from the driver (they were dropped: no handler took them)
    assert "pairs: sampling 30 pairs from" in text and re.search(r"^teacher cache \S+: \d+ shards to compute, 0 already "
                                                                 r"written$", text, re.M), text
    for noise in ("\x1b[", "\r", "Token authentication", "Started a local Ray instance", "Execution plan",
                  "Running Dataset", "Progress will be logged"):
        assert noise not in text, (noise, text)
    assert not re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+INFO", text, re.M), text


def test_a_captured_log_of_a_training_run_has_its_progress_lines(ray_cluster, tiny_bert, tmp_path):
    """`rayapp finetune > log` (one worker: a Ray task whose output Ray forwards to the driver,
    as under `ray job submit`): a progress line per tenth of the run, each once, no bar frames."""
    import os
    import re

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "rayapp.cli", "finetune", f"model={tiny_bert}", "task=SST-2",
                               "seed=13", "max_steps=20", "batch_size=4", "max_length=32", "eval_batch_size=128",
                               f"output_dir={tmp_path / 'runs'}"], stdout=out, stderr=subprocess.STDOUT, env=env)
    text = log.read_text()
    assert done.returncode == 0, text
    assert re.findall(r"step (\d+)/20", text) == [str(s) for s in range(2, 21, 2)], text
    assert "\r" not in text
