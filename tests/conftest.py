"""Shared fixtures: one local Ray cluster per session, tiny models, a moto S3 server.

The tests run Ray with the same flags as `make` and `rayapp demo` (`rayapp.env.LOCAL`:
loopback only, no hub), set before anything imports ray.
"""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from rayapp import env

env.apply(env.LOCAL)

import pytest

from tiny import make_tiny_random_model, make_tiny_tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """Started after the S3 server so that workers inherit its endpoint and test keys."""
    import ray

    # the dashboard serves the state API that Ray Train's controller and the failure test use
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=free_port(),
             log_to_driver=False)
    yield ray
    ray.shutdown()


class RayHead:
    """A real head node started by `ray start --head` (see the `ray_head` fixture)."""

    def __init__(self, address: str, env: dict[str, str], log: str):
        self.address, self.env, self.log = address, env, log  # dashboard URL, env for clients

    def logs(self) -> str:
        """The tails of `ray start`'s and the dashboard's logs, for failure messages."""
        session = Path(self.log).parent / "session_latest" / "logs"
        return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:]
                         for p in [Path(self.log), session / "dashboard.log"] if p.exists())

    def api(self, path: str) -> dict:
        """GET the dashboard's REST API (jobs: /api/jobs/<id>) with the cluster's token."""
        import json
        import urllib.request

        token = (Path.home() / ".ray" / "auth_token").read_text().strip()
        request = urllib.request.Request(self.address + path, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())


@pytest.fixture(scope="module")  # stopped after the module that uses it: no idle second cluster beside later tests
def ray_head(s3_server):
    """A head node as users start one, on loopback: `ray start --head --block` with free ports,
    token authentication (Ray 2.60's default for new clusters; clients need RAY_AUTH_MODE=token)
    and its own temp dir, so no `ray.init()` of this or another process on the machine finds it.
    It runs in its own process group and inherits the S3 server's endpoint and test keys, as a
    cluster node has its instance profile. Stopped by SIGTERM, then SIGKILL to its group;
    never `ray stop`, which would stop every Ray on the machine."""
    import signal
    import subprocess
    import sys
    import tempfile
    import urllib.error

    ray_cli = str(Path(sys.executable).parent / "ray")
    # `python` in a job is this venv's, as after `source .venv/bin/activate; ray start ...`
    # no drain on SIGTERM: after the jobs ran, the drain waited out its whole 30 s here (a
    # teardown of 36 s against 5 s for a head that ran nothing), with nothing to hand over
    head_env = {**os.environ, **env.LOCAL, "RAY_AUTH_MODE": "token", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    if not (Path.home() / ".ray" / "auth_token").exists():
        subprocess.run([ray_cli, "get-auth-token", "--generate"], env=head_env, check=True, capture_output=True)
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")  # short: socket paths live below it
    dashboard = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dashboard, "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port(),
             "--node-manager-port": free_port(), "--object-manager-port": free_port()}
    log = os.path.join(temp_dir, "ray-start.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [ray_cli, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
             "--num-cpus", "4",  # logical: two small pipeline jobs at once on a 2-core machine
             "--temp-dir", temp_dir, "--disable-usage-stats",
             *(str(a) for kv in ports.items() for a in kv)],
            env=head_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(f"http://127.0.0.1:{dashboard}", head_env, log)

    def ready():
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{Path(log).read_text()[-3000:]}")
        try:
            return head.api("/api/version")
        except (urllib.error.URLError, ConnectionError, OSError):
            return None

    try:
        wait_until(ready, timeout=300, what="the head node's dashboard")
        yield head
    finally:
        # SIGTERM to `ray start` itself, which stops the processes of its group (to the whole
        # group, the GCS would be gone before `ray start` asks it anything)
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever outlived the drain
        except ProcessLookupError:  # the whole group is gone already
            pass
        proc.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def wordpiece_tokenizer(tmp_path_factory):
    return make_tiny_tokenizer("wordpiece", tmp_path_factory.mktemp("wordpiece"))


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory):
    return make_tiny_tokenizer("bpe", tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """Directory of a tiny random BERT MLM (dropout off so runs are exactly comparable)."""
    return str(make_tiny_random_model("wordpiece", tmp_path_factory.mktemp("tiny-bert"), dropout=0.0))


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory) -> str:
    return str(make_tiny_random_model("bpe", tmp_path_factory.mktemp("tiny-roberta"), dropout=0.0))


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; boto3, pyarrow and Ray Train reach it via AWS_ENDPOINT_URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def wait_until(predicate, timeout: float = 120.0, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value (waits on a condition, not a clock)."""
    import threading

    tick = threading.Event()
    deadline = threading.Event()
    timer = threading.Timer(timeout, deadline.set)
    timer.start()
    try:
        while not deadline.is_set():
            value = predicate()
            if value:
                return value
            tick.wait(0.05)
    finally:
        timer.cancel()
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
