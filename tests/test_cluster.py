"""What a cluster user runs: cluster.yaml through the autoscaler's own checks, the image
recipe against the pins, the env flags in one place, and `ray job submit` of the jobs/
entrypoints to a real head node (`ray start --head`, conftest `ray_head`), local and on S3."""
import copy
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import jsonschema
import pytest
import yaml
from conftest import wait_until

from rayapp import env, storage
from rayapp.assets import asset

ROOT = Path(__file__).parent.parent


# --- cluster.yaml, the image, the env flags -----------------------------------------------------

def _validated(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_the_autoscalers_checks():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    prepared = _validated(config)
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"]["CPU"] > 0  # job drivers, Tune trials and Train controllers run here
    workers = {name: t for name, t in types.items() if name != prepared["head_node_type"]}
    kinds = {name: t["node_config"]["InstanceType"].split(".")[0] for name, t in workers.items()}
    assert any(k.startswith(("g", "p")) for k in kinds.values()), kinds  # a GPU group
    assert any(k.startswith(("m", "c", "r")) for k in kinds.values()), kinds  # a CPU group for data stages
    assert all(t["min_workers"] == 0 for t in workers.values())  # both scale from 0
    for t in types.values():  # S3 and ECR through instance profiles, on workers as on the head
        assert "IamInstanceProfile" in t["node_config"]
        assert "deeplearning" in t["node_config"]["ImageId"]
    registry = prepared["docker"]["image"].split("/")[0]
    assert any(registry in c and "docker login" in c for c in prepared["initialization_commands"])
    assert not re.search(r"AWS_(ACCESS|SECRET)", (ROOT / "cluster.yaml").read_text())


def test_the_autoscaler_check_rejects_a_broken_config():
    """The check above can fail: a misspelt node type key is refused."""
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        _validated(config)


def test_the_image_installs_the_pinned_ray_and_torch():
    docker = (ROOT / "cluster" / "Dockerfile").read_text()
    pins = dict(re.findall(r'"([\w-]+)(?:\[[\w,]+\])?==([\w.]+)"', (ROOT / "pyproject.toml").read_text()))
    assert f"rayproject/ray:{pins['ray']}-py3" in docker
    torch = re.search(r"torch==([\w.]+) --index-url https://download.pytorch.org/whl/cu(\d+)", docker)
    assert torch and torch.group(1) == pins["torch"]
    # the AMI's driver must serve that CUDA: cluster.yaml documents >= 580 (CUDA 13.x needs 580+)
    if torch.group(2).startswith("13"):
        assert "driver >= 580" in (ROOT / "cluster.yaml").read_text()


def test_env_flags_are_defined_once_and_used_everywhere():
    runtime_env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    assert runtime_env["env_vars"] == env.CLUSTER
    assert env.LOCAL.items() >= env.CLUSTER.items()
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in env.CLUSTER  # local clusters only
    for key in env.LOCAL:  # the tests run with them (conftest applied env.LOCAL)
        assert os.environ[key] == env.LOCAL[key] or key in os.environ
    extra = "print-env:\n\t@env\n"
    made = subprocess.run(["make", "-s", "-f", "Makefile", "-f", "-", "print-env"], cwd=ROOT, input=extra,
                          capture_output=True, text=True, check=True,
                          env={k: v for k, v in os.environ.items() if k not in env.LOCAL})
    assert env.LOCAL.items() <= dict(line.split("=", 1) for line in made.stdout.splitlines() if "=" in line).items()


# --- ray job submit to a real head node ---------------------------------------------------------

def _submit(head, entrypoint: str) -> str:
    """`ray job submit` as the README shows, from the repo root; returns the submission id."""
    sid = f"pipeline-{uuid.uuid4().hex[:8]}"
    ray_cli = str(Path(sys.executable).parent / "ray")

    def submitted():
        done = subprocess.run([ray_cli, "job", "submit", "--address", head.address, "--submission-id", sid,
                               "--no-wait", "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml", "--",
                               "bash", "-c", entrypoint], cwd=ROOT, env=head.env, capture_output=True, text=True)
        if done.returncode == 0:
            return sid
        # the dashboard answers before the node's job agent has registered: Ray says to retry
        assert "No available agent to submit job" in done.stderr, done.stderr[-3000:] + head.logs()
        return None

    return wait_until(submitted, timeout=180, what="the head node to accept a job")


def _finished(head, sid: str) -> dict:
    job = wait_until(lambda: (lambda j: j if j["status"] in ("SUCCEEDED", "FAILED", "STOPPED") else None)(
        head.api(f"/api/jobs/{sid}")), timeout=600, what=f"job {sid}")
    assert job["status"] == "SUCCEEDED", head.api(f"/api/jobs/{sid}/logs")["logs"][-5000:]
    return job


def _pipeline(corpus: str, out: str, model: str) -> str:
    """pairs -> teacher cache -> distill (2 steps), each stage its own `python -m jobs.X`."""
    return " && ".join([
        f"python -m jobs.intermediate pairs --config jobs/configs/intermediate-pairs_local.yaml "
        f"corpus={corpus} out={out}/pairs num_examples=24",
        f"python -m jobs.teacher_cache --config jobs/configs/teacher-cache-pairs_local.yaml "
        f"examples={out}/pairs teacher={model} out={out}/cache top_k=8 batch_size=16",
        f"python -m jobs.distill --config jobs/configs/distill-smash-pairs_local.yaml student={model} "
        f"teacher={model} data={out}/cache output_dir={out}/runs name=job max_steps=2 batch_size=4 "
        f"checkpoint_every=2 log_every=1",
    ])


def _check_outputs(out: str) -> None:
    for stage in ("pairs", "cache"):
        meta = json.loads(storage.read_text(storage.join(out, stage, "_meta.json")))
        assert meta["files"] and all(storage.exists(storage.join(out, stage, f)) for f in meta["files"])
    runs = storage.list_files(storage.join(out, "runs"))
    assert storage.join(out, "runs", "job", "student", "config.json") in runs
    assert any(f.endswith(".safetensors") and "/checkpoint" in f for f in runs), runs
    record = json.loads(storage.read_text(storage.join(out, "runs", "records", "job.json")))
    assert record["recipe"] == "distill" and record["name"] == "job" and record["config"]["max_steps"] == 2


@pytest.fixture(scope="module")
def pipeline_jobs(ray_head, tiny_bert, tmp_path_factory, s3_server):
    """Both pipeline jobs submitted at once (the head has 4 logical CPUs for two jobs);
    the tests below wait for their own."""
    local_out = str(tmp_path_factory.mktemp("job-out"))
    bucket = f"jobs-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    corpus = asset("corpus", "wikipedia-en", "AA", "wiki_00")
    storage.write_bytes(f"s3://{bucket}/corpus/wiki_00", corpus.read_bytes())
    s3_out = f"s3://{bucket}/out"
    return {"local": (_submit(ray_head, _pipeline(str(corpus), local_out, tiny_bert)), local_out),
            "s3": (_submit(ray_head, _pipeline(f"s3://{bucket}/corpus", s3_out, tiny_bert)), s3_out)}


def test_pipeline_job_on_a_head_node(ray_head, pipeline_jobs):
    sid, out = pipeline_jobs["local"]
    _finished(ray_head, sid)
    _check_outputs(out)


def test_pipeline_job_reads_and_writes_s3(ray_head, pipeline_jobs):
    """Corpus read from and every output (checkpoints included) written to the S3 server by
    Ray workers that were handed no keys: they use the node's credential chain."""
    sid, out = pipeline_jobs["s3"]
    _finished(ray_head, sid)
    _check_outputs(out)
