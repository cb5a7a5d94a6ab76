"""What a cluster user runs: cluster.yaml through the autoscaler's own checks and what its
nodes get (GPUs, shm, profiles, the token's mode), the image recipe against the pins and its
build context, the env flags in one place, and `ray job submit` of the jobs/
entrypoints to a real head node (`ray start --head`, conftest `ray_head`), local and on S3."""
import copy
import json
import os
import re
import subprocess
import uuid
from pathlib import Path

import boto3
import jsonschema
import pytest
import yaml

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
    torch = re.search(r"torch==([\w.]+) --index-url https://download.pytorch.org/whl/cu(\d+)", docker)
    assert torch and torch.group(1) == pins["torch"]
    # Ray's CUDA image of the same CUDA as the torch wheel (`-gpu` is another CUDA's alias)
    (base,) = re.findall(r"^FROM (\S+)", docker, re.M)
    assert base == f"rayproject/ray:{pins['ray']}-py311-cu{torch.group(2)}", base
    # the container toolkit exposes the node's GPUs to compute only when the image asks for them
    env_lines = " ".join(re.findall(r"^ENV (.+)$", docker, re.M))
    assert "NVIDIA_VISIBLE_DEVICES=all" in env_lines.split()
    assert "compute" in re.search(r"NVIDIA_DRIVER_CAPABILITIES=(\S+)", env_lines).group(1).split(",")
    # the AMI's driver must serve that CUDA: cluster.yaml documents >= 580 (CUDA 13.x needs 580+)
    if torch.group(2).startswith("13"):
        assert "driver >= 580" in (ROOT / "cluster.yaml").read_text()


def test_the_build_context_leaves_out_the_venv_and_the_repo():
    """.dockerignore keeps the venv, git history, runs and caches out of `docker build .`,
    and nothing the Dockerfile copies."""
    from fnmatch import fnmatch

    patterns = [line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:  # a path is left out when it or a folder above it matches
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(fnmatch(p, pat) or (pat.startswith("**/") and fnmatch(p.rsplit("/", 1)[-1], pat[3:]))
                   for p in prefixes for pat in patterns)

    for path in (".venv/bin/python", ".git/HEAD", "runs/local/pairs/_meta.json", ".cache/huggingface/x",
                 ".pytest_cache/v", "rayapp/__pycache__/cli.cpython-311.pyc", "rayapp.egg-info/PKG-INFO"):
        assert ignored(path), path
    docker = (ROOT / "cluster" / "Dockerfile").read_text()
    copied = [src for line in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", docker, re.M) for src in line.split()]
    assert copied and not any(ignored(src) for src in copied), copied


# memory of the instance types cluster.yaml uses, GiB (AWS's instance type specifications)
INSTANCE_MEMORY_GIB = {"m6i.2xlarge": 32, "m6i.4xlarge": 64, "g5.2xlarge": 32}


def _run_options(config: dict, node_type: str) -> list[str]:
    """The `docker run` options the autoscaler starts `node_type`'s container with: the shared
    ones, then the head's or the workers' (a node type's own `docker` replaces the keys it sets)."""
    docker = {**config["docker"], **(config["available_node_types"][node_type].get("docker") or {})}
    own = "head_run_options" if node_type == config["head_node_type"] else "worker_run_options"
    return docker.get("run_options", []) + docker.get(own, [])


def _gib(size: str) -> float:
    """A docker size (`10g`, `512m`, binary units) in GiB."""
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([bkmg]?)", size.strip("'\"").lower()).groups()
    return float(number) * 1024 ** "bkmg".index(unit or "b") / 1024 ** 3


def test_gpu_containers_get_the_gpus_and_every_node_shm_for_its_object_store():
    prepared = _validated(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    for name, t in prepared["available_node_types"].items():
        instance = t["node_config"]["InstanceType"]
        options = " ".join(_run_options(prepared, name)).split()
        gpu = instance.startswith(("g", "p"))
        assert ("--gpus" in options and options[options.index("--gpus") + 1] == "all") == gpu, (name, options)
        # Ray puts its object store (30% of the node's memory) in /dev/shm and caps it at its size
        shm = [o.split("=", 1)[1] for o in options if o.startswith("--shm-size=")]
        assert len(shm) == 1, (name, options)
        assert _gib(shm[0]) >= 0.3 * INSTANCE_MEMORY_GIB[instance], (name, shm, instance)


def test_head_and_workers_have_their_own_instance_profiles():
    """The head launches workers (EC2, iam:PassRole); workers only need the bucket and ECR,
    so they run with another, narrower profile (README lists both policies)."""
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    types = config["available_node_types"]
    profile = {name: t["node_config"]["IamInstanceProfile"]["Name"] for name, t in types.items()}
    head = profile.pop(config["head_node_type"])
    assert profile and head not in profile.values(), (head, profile)
    assert len(set(profile.values())) == 1, profile  # the head may pass one worker role only


def test_every_node_keeps_the_auth_token_to_its_owner():
    """file_mounts copies ~/.ray/auth_token with the mode it has on the client; every node's
    setup makes it 0600 before Ray starts."""
    prepared = _validated(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    assert "~/.ray/auth_token" in prepared["file_mounts"]
    for name, t in prepared["available_node_types"].items():
        commands = (prepared["head_setup_commands"] if name == prepared["head_node_type"]
                    else t.get("worker_setup_commands") or prepared["worker_setup_commands"])
        assert "chmod 600 ~/.ray/auth_token" in commands, (name, commands)


def test_env_flags_are_defined_once_and_used_everywhere():
    runtime_env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    assert runtime_env["env_vars"] == env.CLUSTER
    assert runtime_env["worker_process_setup_hook"] == env.SETUP_HOOK
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
    return {"local": (ray_head.submit(_pipeline(str(corpus), local_out, tiny_bert)), local_out),
            "s3": (ray_head.submit(_pipeline(f"s3://{bucket}/corpus", s3_out, tiny_bert)), s3_out)}


def test_pipeline_job_on_a_head_node(ray_head, pipeline_jobs):
    sid, out = pipeline_jobs["local"]
    ray_head.wait_job(sid)
    _check_outputs(out)


def test_pipeline_job_reads_and_writes_s3(ray_head, pipeline_jobs):
    """Corpus read from and every output (checkpoints included) written to the S3 server by
    Ray workers that were handed no keys: they use the node's credential chain."""
    sid, out = pipeline_jobs["s3"]
    ray_head.wait_job(sid)
    _check_outputs(out)
