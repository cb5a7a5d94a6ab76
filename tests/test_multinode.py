"""Many nodes, nothing node-local: the pipeline on a multi-node Ray cluster on this machine.

The `multinode` fixture (conftest, `cluster/local_cluster.py`) is a 0-CPU head plus 1-CPU
worker nodes, each in its own mount namespace with a private /tmp: a path under /tmp that
the driver (on the head) writes is not there for any task, actor or Train worker, and what a
node writes there is seen by no one else. Only loopback and the moto S3 server are shared, as
object storage is on a real cluster. Every driver here is a separate process (`rayapp` CLI or
`ray job submit`), as a user's is.
"""
from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest
from conftest import wait_until

from cluster.local_cluster import free_ports, pipeline_job, stage_pipeline_inputs
from rayapp import storage

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def bucket(s3_server, tiny_roberta, tmp_path_factory) -> dict:
    """Everything the pipeline reads, in a bucket (`stage_pipeline_inputs`): the tiny teacher
    and its 1-layer student, an asset mirror holding the `hf://` corpus, LM-BFF's SST-2
    splits 13 and 21."""
    from rayapp.recipes.pretrain import make_student

    name = f"multinode-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=name)
    student = make_student(tiny_roberta, str(tmp_path_factory.mktemp("student")), layers=[0])
    return {"root": f"s3://{name}", **stage_pipeline_inputs(f"s3://{name}", tiny_roberta, student)}


def _record(uri: str) -> dict:
    return json.loads(storage.read_text(uri))


def _train_workers(head) -> list[str]:
    """Node ids of the alive Ray Train workers, from the cluster's state API."""
    found = head.api("/api/v0/actors?limit=1000&filter_keys=class_name&filter_predicates=%3D"
                     "&filter_values=RayTrainWorker")["data"]["result"]["result"]
    return [a["node_id"] for a in found if a["state"] == "ALIVE"]


def _overlap(records: list[dict]) -> int:
    """The most runs that were training at one moment (from each record's start and length)."""
    edges = sorted([(r["started"], 1) for r in records] + [(r["started"] + r["seconds"], -1) for r in records])
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


def _while_running(head, sid: str, predicate):
    """`predicate` for wait_until that fails at once, with the job's log, if the job ends first."""
    def check():
        found = predicate()
        if not found and head.api(f"/api/jobs/{sid}")["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            raise AssertionError(head.api(f"/api/jobs/{sid}/logs")["logs"][-5000:])
        return found
    return check


def test_the_pipeline_runs_across_nodes(multinode, bucket):
    """One `ray job submit`: pairs + sentiment from an `hf://` corpus in an s3 mirror -> teacher
    cache -> DeepSpeed ZeRO-2 distillation on 2 workers on 2 nodes, one of them killed mid-run
    (the run finishes from its checkpoint on a replacement node) -> a sweep whose trials use a
    node that joined after the sweep started -> report. Every input and output is an s3 URI."""
    out = f"{bucket['root']}/out"
    # trials long enough (their loops run in the trial actors: seconds) to still run when the
    # fourth node joins
    entry = pipeline_job(out, bucket["corpus"], bucket["teacher"], bucket["student"], bucket["data_dir"],
                         ft_steps=300)
    sid = multinode.head.submit(f"export RAYAPP_ASSETS={bucket['mirror']} && {entry}")
    first, second = multinode.nodes

    # a worker node dies once the distillation has a checkpoint; a new node replaces it
    snapshot = f"{out}/runs/distill/checkpoint_manager_snapshot.json"
    wait_until(_while_running(multinode.head, sid, lambda: storage.exists(snapshot) and json.loads(
        storage.read_text(snapshot)).get("latest_checkpoint_result")), timeout=600,
        what="the distillation's first checkpoint")
    workers = wait_until(lambda: (lambda w: w if len(w) == 2 else None)(_train_workers(multinode.head)),
                         timeout=120, what="two training workers")
    assert sorted(workers) == sorted([first.node_id, second.node_id])  # 2 workers on 2 nodes
    second.kill()
    third = multinode.add_node(num_cpus=1)
    # a fourth node joins once the sweep has started: its trials must use it
    wait_until(_while_running(multinode.head, sid, lambda: storage.exists(f"{out}/sweeps/pipeline/sweep.json")),
               timeout=600, what="the sweep")
    fourth = multinode.add_node(num_cpus=1)
    job = multinode.head.wait_job(sid)

    logs = multinode.head.api(f"/api/jobs/{job['submission_id']}/logs")["logs"]
    for stage in ("pairs", "sentiment", "cache"):
        meta = json.loads(storage.read_text(f"{out}/{stage}/_meta.json"))
        assert meta["files"] and all(storage.exists(f"{out}/{stage}/{f}") for f in meta["files"])
    distill = _record(f"{out}/runs/records/distill.json")
    assert distill["step"] == 40 and len(distill["restarts"]) == 1, distill["restarts"]
    (_, before), (_, after) = distill["nodes"]
    assert sorted(before) == sorted([first.node_id, second.node_id])
    assert sorted(after) == sorted([first.node_id, third.node_id])  # resumed on the replacement
    assert storage.exists(f"{out}/runs/distill/student/config.json")

    trials = [_record(u) for u in storage.list_files(f"{out}/sweeps/pipeline/records", ".json")]
    assert len(trials) == 4 and all(t["status"] == "done" for t in trials), [t.get("status") for t in trials]
    used = {node for t in trials for _, ranks in t["nodes"] for node in ranks}
    assert fourth.node_id in used and len(used) >= 2, used
    # a snapshot of 2 CPUs at the sweep's start would have run 2 at a time
    assert _overlap(trials) >= 3
    assert "student + SMASH prompt FT" in logs
    # the job's log is no terminal: no bar frames from the workers' weight loads and checkpoints
    assert "Loading weights" not in logs and "Writing model shards" not in logs, logs[-3000:]


def test_the_ports_a_head_is_given_are_distinct():
    """`start_head` passes 9 ports to `ray start`, which refuses one given twice."""
    ports = free_ports(200)
    assert len(set(ports)) == 200 and all(p > 0 for p in ports)


def test_the_pipeline_job_waits_for_its_background_stage_and_fails_with_it(tmp_path):
    """The sentiment stage runs beside pairs -> cache (here it can only end after the cache
    stage ran), the distillation starts only once it is done, every stage sees the caller's
    `export X && <job>`, and the job fails with sentiment's exit code when sentiment fails
    (each `python` here is a stand-in that logs its stage)."""
    log = tmp_path / "stages.log"
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\n'
                    'line="$2 $3 FROM=$FROM"\n'
                    'case "$2 $3" in\n'
                    '  "jobs.intermediate sentiment")\n'
                    '    while [ ! -e "$STAGES.cached" ]; do sleep 0.05; done\n'
                    '    echo "$line" >> "$STAGES"; exit "$SENTIMENT_EXIT";;\n'
                    '  "jobs.teacher_cache --config") echo "$line" >> "$STAGES"; touch "$STAGES.cached"; exit 0;;\n'
                    'esac\n'
                    'echo "$line" >> "$STAGES"\n')
    fake.chmod(0o755)
    entry = pipeline_job("s3://b/out", "hf://c", "s3://b/t", "s3://b/s", "s3://b/d")
    stages = ["jobs.intermediate pairs", "jobs.teacher_cache --config", "jobs.intermediate sentiment",
              "jobs.distill --config", "jobs.sweep --config", "jobs.report s3://b/out/sweeps/pipeline"]
    for code in (0, 5):
        for f in (log, tmp_path / "stages.log.cached"):
            f.unlink(missing_ok=True)
        env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "STAGES": str(log), "SENTIMENT_EXIT": str(code)}
        done = subprocess.run(["bash", "-c", f"export FROM=caller && {entry}"], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        lines = log.read_text().splitlines()
        assert all(line.endswith(" FROM=caller") for line in lines), lines
        ran = [line.removesuffix(" FROM=caller") for line in lines]
        assert done.returncode == code, (done, ran)
        assert ran == (stages if code == 0 else stages[:3]), ran


def _cli(multinode, *args: str) -> subprocess.CompletedProcess:
    """`rayapp ...` as a driver on the multi-node cluster (RAY_ADDRESS), from the repo root."""
    return subprocess.run([sys.executable, "-m", "rayapp.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**multinode.env, "RAY_ADDRESS": multinode.head.gcs_address}, timeout=600)


def test_a_path_only_the_driver_has_is_refused(multinode, bucket, tmp_path):
    """A local path under the driver's /tmp is not on the worker nodes: one error line naming
    the key, before any work, instead of a FileNotFoundError inside a task (the corpus, the
    pairs' scratch folder) or an output scattered over the nodes' disks (the cache shards)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Document {d} says thing {s} about topic {d} here. Then it adds more."
                                  for d in range(6) for s in range(3)) + "\n")
    cases = [
        (["intermediate", "pairs", "--corpus", str(corpus), "--out", f"{bucket['root']}/refused",
          "--num-examples", "12"], "corpus"),
        (["intermediate", "pairs", "--corpus", f"s3://{bucket['root'][5:]}/refused-corpus.txt",
          "--out", str(tmp_path / "pairs"), "--num-examples", "12"], "out"),
        (["teacher-cache", "--examples", f"{bucket['root']}/refused-corpus.txt", "--teacher", bucket["teacher"],
          "--out", str(tmp_path / "cache"), "--top-k", "4"], "out"),
    ]
    storage.write_bytes(f"{bucket['root']}/refused-corpus.txt", corpus.read_bytes())
    for args, key in cases:
        done = _cli(multinode, *args)
        assert done.returncode != 0, done.stdout[-2000:]
        lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert lines and f"{key}=" in lines[0] and "only the driver's node has" in lines[0], done.stderr[-3000:]
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
