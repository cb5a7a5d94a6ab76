"""SMASH distillation on Ray Train: cache and online teachers, every objective, DeepSpeed
ZeRO-2 with a worker killed mid-run, s3:// storage, and the hand-off to prompt FT."""
from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import boto3
import pytest
import torch
from transformers import AutoModelForMaskedLM

from conftest import wait_until
from rayapp.recipes.distill import DistillConfig, run
from rayapp.train.engine import EngineConfig
from rayapp.errors import ConfigError
from rayapp.recipes.finetune import FinetuneConfig
from rayapp.recipes.finetune import run as finetune
from rayapp.recipes.pretrain import make_student
from rayapp.data.teacher_cache import build_cache
from rayapp.train.records import read_records
from rayapp.train.worker import LATEST, read_latest

@pytest.fixture(scope="module")
def cache(pairs, tiny_roberta, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("cache") / "cache")
    build_cache(pairs, tiny_roberta, out, task="smash-pairs", top_k=16)
    return out


@pytest.fixture(scope="module")
def student(tiny_roberta, tmp_path_factory) -> str:
    """A 1-layer student cut from the 2-layer tiny teacher (same tokenizer and widths)."""
    return make_student(tiny_roberta, str(tmp_path_factory.mktemp("student")), layers=[0])


def _cfg(tmp_path, **kw) -> DistillConfig:
    base = dict(batch_size=8, lr=5e-3, max_steps=12, checkpoint_every=6, log_every=2,
                output_dir=str(tmp_path / "runs"), engine=EngineConfig(num_workers=1))
    return DistillConfig(**{**base, **kw})


def test_distill_from_cache_then_finetune(cache, student, tmp_path):
    rec = run(_cfg(tmp_path, student=student, data=cache, engine=EngineConfig(num_workers=2, cpus_per_worker=0.5)))
    assert rec["step"] == 12 and rec["last_loss"] < rec["first_loss"]
    assert rec["restarts"] == []
    # the exported student is an HF dir, and prompt FT starts from it
    AutoModelForMaskedLM.from_pretrained(rec["model"])
    ft = finetune(FinetuneConfig(task="RTE", model=student, init=rec["model"], method="zero-shot",
                                 output_dir=str(tmp_path / "ft"), engine=EngineConfig(num_workers=1)))
    assert ft["dev_curve"][0][0] == 0 and 0.0 <= ft["test"] <= 1.0


def _registered(run_dir: Path) -> dict | None:
    """The newest checkpoint a run has committed (what a restart resumes from), as it keeps it
    in the run's storage: Ray Train's controller snapshot, or a local run's `latest.json`;
    None before the first one."""
    try:
        return json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return read_latest(str(run_dir)) if (run_dir / LATEST).is_file() else None


def test_online_teacher_distills_from_intermediate_examples(pairs, student, tiny_roberta, tmp_path):
    """teacher_mode=online reads the pairs folder itself (no cache): the teacher's full
    distribution at the mask each step (eq. 1), then the student is exported."""
    rec = run(_cfg(tmp_path, student=student, teacher=tiny_roberta, data=pairs, teacher_mode="online",
                   max_steps=3, checkpoint_every=3, log_every=1))
    assert rec["step"] == 3 and rec["objective"] == "ce"
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in rec["loss_curve"])
    assert AutoModelForMaskedLM.from_pretrained(rec["model"]).config.num_hidden_layers == 1


def test_deepspeed_zero2_survives_a_killed_worker(cache, student, tmp_path):
    import ray
    from ray.util.state import list_actors

    # the worker dies just after the first checkpoint (step 10): 70 more steps keep the run alive
    # well past the kill, however slow the machine, without paying for hundreds of steps
    cfg = _cfg(tmp_path, student=student, data=cache, max_steps=80, checkpoint_every=10, log_every=10,
               batch_size=4, name="ft-run",
               engine=EngineConfig(num_workers=2, cpus_per_worker=0.5, engine="deepspeed", zero_stage=2,
                                   use_gpu=False, max_failures=1))
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run(cfg)))
    thread.start()

    def worker_pids():
        alive = list_actors(address=ray.get_runtime_context().gcs_address,
                            filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        return sorted(a.pid for a in alive) if len(alive) == 2 else None

    pids = wait_until(worker_pids, timeout=900, what="two training workers")
    run_dir = tmp_path / "runs" / "ft-run"
    registered = wait_until(lambda: _registered(run_dir), timeout=900, what="a registered checkpoint")
    os.kill(pids[1], signal.SIGKILL)  # a training worker process dies mid-run
    registered = registered["metrics"]["step"]
    thread.join(timeout=900)
    assert not thread.is_alive() and result, "distillation did not finish after the worker was killed"
    assert result["step"] == 80 and registered < 80
    (resumed_at,) = result["restarts"]  # exactly one restart, from the latest checkpoint
    # at most one checkpoint interval of steps was lost: it resumed from the newest checkpoint
    assert resumed_at >= registered and resumed_at % 10 == 0
    # every rank saved its ZeRO shard into the checkpoint
    last = run_dir / _registered(run_dir)["checkpoint_dir_name"]
    assert json.loads((last / "trainer_state.json").read_text())["step"] == 80
    shards = list((last / "deepspeed" / "state").glob("*optim_states.pt"))
    assert len(shards) == 2


def test_distill_checkpoints_to_s3(cache, student, s3_server, tmp_path):
    boto3.client("s3").create_bucket(Bucket="runs")
    rec = run(_cfg(tmp_path, student=student, data=cache, max_steps=4, checkpoint_every=2,
                   output_dir="s3://runs/smash", name="s3-run"))
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="runs")["Contents"]]
    assert "smash/records/s3-run.json" in keys
    assert "smash/s3-run/student/model.safetensors" in keys
    assert any(k.endswith("trainer_state.json") and "checkpoint_" in k for k in keys)
    assert rec["model"] == "s3://runs/smash/s3-run/student"


def test_distilbert_setting_trains_on_raw_corpus_text(student, tiny_roberta, docs_corpus, tmp_path):
    """Setting (5) reads a corpus (not the joined pair examples) at length 512 (SMASH §4.4)."""
    rec = run(_cfg(tmp_path, student=student, teacher=tiny_roberta, data=docs_corpus, setting=5, max_steps=2,
                   batch_size=4, log_every=1))
    assert rec["objective"] == "distilbert" and rec["step"] == 2
    assert list(read_records(str(tmp_path / "runs")).values())[0]["name"] == rec["name"]


def test_resubmitted_run_trains_exactly_the_unseen_batches(ray_cluster, cache, student, tmp_path):
    """A run killed mid-way and submitted again (same config -> same name) resumes from its
    last checkpoint and trains on exactly the rows an uninterrupted run trains on next."""
    import subprocess
    import sys

    kw = dict(student=student, data=cache, max_steps=60, checkpoint_every=10, log_every=50, batch_size=4)
    full = run(_cfg(tmp_path / "full", **kw))
    cfg = _cfg(tmp_path / "cut", **kw)
    script = (f"import ray, pickle; ray.init(address={ray_cluster.get_runtime_context().gcs_address!r}); "
              f"from rayapp.recipes.distill import run; run(pickle.loads({__import__('pickle').dumps(cfg)!r}))")
    driver = subprocess.Popen([sys.executable, "-c", script], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "cut" / "runs" / full["name"]
    try:
        registered = wait_until(lambda: _registered(run_dir), timeout=600, what="a registered checkpoint")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the job's driver dies mid-run
        driver.wait()
    resumed = run(cfg)
    assert (run_dir / LATEST).is_file()  # one worker: the local launcher, resumed from its own commit
    assert resumed["name"] == full["name"] and registered["metrics"]["step"] < 60
    assert len(resumed["restarts"]) == 1 and resumed["restarts"][0] % 10 == 0
    assert resumed["data_digest"] == full["data_digest"] and len(full["data_digest"]) == 60


def test_distill_config_errors(cache, tiny_bert, tmp_path):
    with pytest.raises(ConfigError, match=r"setting must be one of \[1, 2, 3, 4, 5, 6, 7\]"):
        DistillConfig(data=cache, setting=9)
    with pytest.raises(ConfigError, match="the top-k cache does not hold: set teacher_mode=online"):
        DistillConfig(data=cache, objective="ce+hidden")
    with pytest.raises(ConfigError, match="data is required"):
        DistillConfig()
    # a BERT student cannot learn a RoBERTa teacher's vocabulary distribution
    with pytest.raises(ConfigError, match="needs the same tokenizer"):
        run(_cfg(tmp_path, student=tiny_bert, data=cache))
    with pytest.raises(ConfigError, match="with temperature != 1 set topk_mode=renormalize"):
        DistillConfig(data=cache, temperature=2.0)


def swapped_vocabulary(model_dir: str, out: Path) -> str:
    """A copy of `model_dir` whose tokenizer has two tokens' ids swapped: as many tokens, same
    weights, another vocabulary (what a size check cannot tell apart)."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(model_dir, out)
    tok = AutoTokenizer.from_pretrained(out)
    a, b = sorted(v for v in tok.backend_tokenizer.get_vocab() if v.isalpha())[:2]
    content = (out / "tokenizer.json").read_text().replace(f'"{a}":', '"@@tmp@@":').replace(f'"{b}":', f'"{a}":')
    (out / "tokenizer.json").write_text(content.replace('"@@tmp@@":', f'"{b}":'))
    other = AutoTokenizer.from_pretrained(out)
    assert len(other) == len(tok) and other.get_vocab() != tok.get_vocab()
    return str(out)


def test_same_vocabulary_size_is_not_the_same_vocabulary(cache, student, tmp_path):
    """A student whose tokenizer has as many tokens as the teacher's but other tokens is
    refused: the cache records a fingerprint of the teacher's vocabulary, not just its size."""
    other = swapped_vocabulary(student, tmp_path / "other")
    with pytest.raises(ConfigError, match="different vocabulary fingerprint"):
        run(_cfg(tmp_path, student=other, data=cache))


def test_online_teacher_of_another_vocabulary_is_refused_before_ray_starts(tiny_bert, tmp_path):
    """teacher_mode=online (every online objective: ce, ce+hidden, ce+attn, distilbert) checks
    the vocabulary itself, as cache mode and finetune KD do, on the driver: one `error:` line,
    exit 2, no Ray (it used to check the size only, in the worker, so this ran)."""
    import subprocess
    import sys

    from test_driver_checks import RUNNER

    teacher = swapped_vocabulary(tiny_bert, tmp_path / "teacher")
    data = tmp_path / "corpus.txt"
    data.write_text("A sentence about nothing.\n")
    argv = ["distill", f"output_dir={tmp_path / 'runs'}", "max_steps=1", f"student={tiny_bert}",
            f"teacher={teacher}", f"data={data}"]
    cases = {objective: [*argv, f"objective={objective}", "teacher_mode=online"]
             for objective in ("ce", "ce+hidden", "distilbert")}
    done = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(cases), capture_output=True, text=True,
                          check=True)
    for objective, got in json.loads(done.stdout.splitlines()[-1]).items():
        lines = got["stderr"].strip().splitlines()
        assert got["code"] == 2 and len(lines) == 1, (objective, got)
        assert lines[0].startswith("error: teacher ") and "have different vocabularies" in lines[0], lines[0]
        assert not got["ray"], objective
