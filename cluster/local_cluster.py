"""A multi-node Ray cluster on one machine, with nothing shared between nodes but loopback
and object storage: what the tests use to catch node-local paths, and what a user can run
to try a cluster job before paying for one.

    python -m cluster.local_cluster --workers 2 --cpus 1     # prints the address; Ctrl-C stops it

- The head is `ray start --head --block` on 127.0.0.1 with free ports, token
  authentication and 0 CPUs by default (as on a real cluster whose head only drives: every
  task, actor and trial lands on a worker node). It serves the dashboard and the job API,
  so `ray job submit --address http://127.0.0.1:PORT` works against it.
- Each worker node is a Ray node started with Ray's node API (`ray._private.node.Node`) in a
  process of its own inside `unshare --user --map-root-user --mount --pid --fork`, which
  first mounts a private tmpfs over `/tmp`: pytest's tmp dirs, Ray's session folder,
  `$RAYAPP_CACHE` and anything else under `/tmp` that one node writes is invisible to the
  driver and to the other nodes, as on separate machines. The repository and the read-only
  assets (`/work`, `$HOME`) stay visible, as an image's files are on every node.
  Why not `ray start --address`: with `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (loopback only,
  rayapp's local flag set) Ray refuses to join a second node from the CLI; the node API
  does not make that check, and the node still binds to loopback only.
- A node is stopped (or killed, to test failures) by signalling its process group: in its
  own PID namespace, the namespace's first process dying takes every raylet, worker and
  agent of that node with it, and its tmpfs goes with the namespace. Nothing here stops
  processes by name, and no `ray stop` touches other clusters on the machine.

Requires Linux with unprivileged user namespaces (or root): `unshare --user` must work.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `python -m cluster.local_cluster` from anywhere; stdlib + rayapp.env only

from rayapp import env  # noqa: E402  (stdlib-only module: no Ray import before the flags are set)

TOKEN = Path.home() / ".ray" / "auth_token"


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports. Every socket stays bound until all are chosen: asked one
    at a time, the OS can hand out a port it just gave again (a head once got the same port for
    its GCS and its runtime-env agent, and `ray start` refused it)."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def free_port() -> int:
    return free_ports(1)[0]


def wait_until(predicate, timeout: float = 120.0, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value (waits on a condition, not a clock):
    every 0.05 s at first, then less often, up to every 0.25 s. The predicates ask a dashboard,
    the state API or S3 (4-7 ms of CPU a call here), and a wait of minutes at 20 calls a second
    took a tenth of a core from the work it waits for."""
    tick = threading.Event()
    end = time.monotonic() + timeout
    pause = 0.05
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        tick.wait(pause)
        pause = min(2 * pause, 0.25)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def cluster_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus rayapp's local flags and token auth, with this Python's
    bin folder first on PATH (a job's `python` is this venv's)."""
    bin_dir = str(Path(sys.executable).parent)
    return {**env.LOCAL, **os.environ, "RAY_AUTH_MODE": "token",
            # nothing to hand over when a test stops the head: the drain would wait out 30 s
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            # a node stopped by a test is dead to the GCS in about 3 s, not 15 s (Ray's 3 s x 5
            # misses): until then Ray Train's restart waits on the dead node's bundles
            "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
            "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]), **(extra or {})}


def node_env(environ: dict[str, str], num_cpus: int) -> dict[str, str]:
    """`environ` for a node of `num_cpus` CPUs: it keeps at most that many idle workers. With
    LOCAL's 6 (for the one-node test session) each one-CPU node started up to 8 workers for a
    stage's queued tasks: the 1 GB pairs build on 3 nodes paid 16 worker start-ups on this
    machine's 2 cores and ran 1.3x slower than on one node (`benchmarks/intermediate.py`); a
    node started with the node API does not size the pool by its logical CPUs by itself."""
    return {**environ, "RAY_num_workers_soft_limit": str(max(1, num_cpus))}


def ensure_token(environ: dict[str, str]) -> None:
    """A Ray auth token in ~/.ray/auth_token, readable by its owner only."""
    if not TOKEN.exists():
        subprocess.run([str(Path(sys.executable).parent / "ray"), "get-auth-token", "--generate"],
                       env=environ, check=True, capture_output=True)
    TOKEN.chmod(0o600)


def _stop_group(proc: subprocess.Popen, timeout: float, group: bool = False) -> None:
    """SIGTERM to the process (it stops its own children; `group`: to its whole group), then
    SIGKILL to its group."""
    if proc.poll() is None:
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever outlived it
    except ProcessLookupError:
        pass
    proc.wait()


@dataclass
class Head:
    """A head node started by `ray start --head --block` in its own process group."""

    address: str  # the dashboard / job API URL
    gcs_address: str
    env: dict[str, str]
    temp_dir: str
    proc: subprocess.Popen
    log: str

    def logs(self) -> str:
        """The tails of `ray start`'s and the dashboard's logs, for failure messages."""
        session = Path(self.temp_dir) / "session_latest" / "logs"
        return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:]
                         for p in [Path(self.log), session / "dashboard.log"] if p.exists())

    def api(self, path: str) -> dict:
        """GET the dashboard's REST API (jobs: /api/jobs/<id>) with the cluster's token."""
        request = urllib.request.Request(self.address + path,
                                         headers={"Authorization": f"Bearer {TOKEN.read_text().strip()}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def submit(self, entrypoint: str, timeout: float = 180) -> str:
        """`ray job submit --no-wait` as the README shows, from the repo root, with
        `cluster/runtime_env.yaml`; returns the submission id."""
        sid = f"job-{uuid.uuid4().hex[:8]}"

        def submitted():
            done = subprocess.run(
                [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", self.address,
                 "--submission-id", sid, "--no-wait", "--working-dir", ".", "--runtime-env",
                 "cluster/runtime_env.yaml", "--", "bash", "-c", entrypoint],
                cwd=ROOT, env=self.env, capture_output=True, text=True)
            if done.returncode == 0:
                return sid
            # the dashboard answers before the node's job agent has registered: Ray says to retry
            if "No available agent to submit job" not in done.stderr:
                raise RuntimeError(f"ray job submit failed:\n{done.stderr[-3000:]}\n{self.logs()}")
            return None

        return wait_until(submitted, timeout=timeout, what="the head node to accept a job")

    def wait_job(self, sid: str, timeout: float = 600) -> dict:
        """The job's final status record; RuntimeError with its log's tail unless it succeeded."""
        job = wait_until(lambda: (lambda j: j if j["status"] in ("SUCCEEDED", "FAILED", "STOPPED") else None)(
            self.api(f"/api/jobs/{sid}")), timeout=timeout, what=f"job {sid}")
        if job["status"] != "SUCCEEDED":
            raise RuntimeError(f"job {sid} {job['status']}:\n" + self.api(f"/api/jobs/{sid}/logs")["logs"][-5000:])
        return job

    def stop(self) -> None:
        # SIGTERM to `ray start` itself, which stops the processes of its group (to the whole
        # group, the GCS would be gone before `ray start` asks it anything)
        _stop_group(self.proc, timeout=45)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_head(num_cpus: int = 0, environ: dict[str, str] | None = None, timeout: float = 300) -> Head:
    """`ray start --head` on loopback with free ports and its own temp dir, so no
    `ray.init()` of another process on the machine finds it; waits for its dashboard."""
    environ = environ or cluster_env()
    ensure_token(environ)
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")  # short: socket paths live below it
    names = ["--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
             "--node-manager-port", "--object-manager-port"]
    ports = dict(zip(names, free_ports(len(names))))
    gcs, dashboard = ports["--port"], ports["--dashboard-port"]
    log = os.path.join(temp_dir, "ray-start.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address",
             "127.0.0.1", "--dashboard-host", "127.0.0.1", "--num-cpus", str(num_cpus), "--temp-dir", temp_dir,
             "--disable-usage-stats", *(str(a) for kv in ports.items() for a in kv)],
            env=node_env(environ, num_cpus), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    head = Head(f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{gcs}", environ, temp_dir, proc, log)

    def ready():
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{Path(log).read_text()[-3000:]}")
        try:
            return head.api("/api/version")
        except (urllib.error.URLError, ConnectionError, OSError):
            return None

    try:
        wait_until(ready, timeout=timeout, what="the head node's dashboard")
    except BaseException:
        head.stop()
        raise
    return head


@dataclass
class WorkerNode:
    """A worker node in its own user, mount and PID namespaces (module docstring)."""

    name: str
    proc: subprocess.Popen
    log: str
    node_id: str = ""
    resources: dict = field(default_factory=dict)

    def kill(self) -> None:
        """Kill the node at once, as a machine that dies (SIGKILL to its namespace's group)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def stop(self) -> None:
        # SIGTERM to the whole group, so the node's raylet and log monitor get it themselves (they
        # exit within a second): `unshare`, the process started here, does not pass it on. The
        # node's own Python process has been seen not to exit on it at all, so the group's
        # SIGKILL follows after 2 s (it waited out 10 s on every stop before)
        _stop_group(self.proc, timeout=2, group=True)


def _node_main(gcs_address: str, num_cpus: int, resources: str, name: str, ready_file: str) -> None:
    """Inside the namespaces: start a Ray worker node and serve until SIGTERM."""
    import ray._private.node
    import ray._private.parameter

    params = ray._private.parameter.RayParams(
        gcs_address=gcs_address, node_ip_address="127.0.0.1", num_cpus=num_cpus, num_gpus=0,
        resources=json.loads(resources), temp_dir="/tmp/ray", min_worker_port=0, max_worker_port=0,
        node_manager_port=0, dashboard_agent_listen_port=None, include_log_monitor=True,
        labels={"rayapp.local/node": name})
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    Path(ready_file).write_text(node.unique_id)  # /tmp here is the node's own: the parent reads it via /proc
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)


def _private_tmp() -> str:
    """Shell commands giving a node its own empty /tmp (a tmpfs). The repo and the venv stay
    visible at their paths when they live under /tmp (a clone in /tmp/...): the old /tmp is
    bound to a hold point outside it first, and those two folders are bound back from there.
    Everything else under the driver's /tmp stays out of the node's sight at its own path."""
    under_tmp = {p for p in (str(ROOT), sys.prefix) if p.startswith("/tmp/")}
    # a venv inside the repo comes back with the repo
    keep = sorted(p for p in under_tmp if not any(p.startswith(q + os.sep) for q in under_tmp))
    if not keep:
        return "mount -t tmpfs -o size=4g tmpfs /tmp"
    hold = Path.home() / ".cache" / "rayapp" / "node-hold"  # an empty mount point outside /tmp
    hold.mkdir(parents=True, exist_ok=True)
    steps = [f"mount --rbind /tmp {shlex.quote(str(hold))}", "mount -t tmpfs -o size=4g tmpfs /tmp"]
    for path in keep:
        src = shlex.quote(str(hold / os.path.relpath(path, "/tmp")))
        steps += [f"mkdir -p {shlex.quote(path)}", f"mount --rbind {src} {shlex.quote(path)}"]
    return " && ".join(steps)


class LocalCluster:
    """A head (`start_head`) plus worker nodes added and removed at will."""

    def __init__(self, head_cpus: int = 0, environ: dict[str, str] | None = None):
        self.env = environ or cluster_env()
        self.head = start_head(head_cpus, self.env)
        self.nodes: list[WorkerNode] = []

    @property
    def address(self) -> str:
        return self.head.address

    def add_node(self, num_cpus: int = 1, resources: dict | None = None, timeout: float = 120) -> WorkerNode:
        """Start a worker node and wait until the cluster lists it alive."""
        name = f"node-{len(self.nodes) + 1}"
        log = os.path.join(self.head.temp_dir, f"{name}.log")
        ready = "/tmp/rayapp-node-ready"  # in the node's private /tmp
        inner = (f"{_private_tmp()} && exec {sys.executable} -m cluster.local_cluster node "
                 f"--gcs {self.head.gcs_address} --cpus {num_cpus} --resources '{json.dumps(resources or {})}' "
                 f"--name {name} --ready {ready}")
        with open(log, "w") as out:
            proc = subprocess.Popen(
                ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private", "--pid", "--fork",
                 "--mount-proc",  # a /proc of the namespace: Ray (psutil) looks its own pids up there
                 "sh", "-c", inner],
                cwd=ROOT, env={**node_env(self.env, num_cpus), "RAYAPP_CACHE": "/tmp/rayapp-cache"}, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        node = WorkerNode(name, proc, log, resources={"CPU": num_cpus, **(resources or {})})
        self.nodes.append(node)

        def alive():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{Path(log).read_text()[-3000:]}")
            listed = [n for n in self._list_nodes() if n.get("labels", {}).get("rayapp.local/node") == name
                      and n.get("state") == "ALIVE"]
            return listed[0] if listed else None

        try:
            node.node_id = wait_until(alive, timeout=timeout, what=f"{name} to join the cluster")["node_id"]
        except TimeoutError as exc:  # the node's own log says why; it is gone once the cluster stops
            raise TimeoutError(f"{exc}; its log:\n{Path(log).read_text()[-3000:]}") from None
        return node

    def _list_nodes(self) -> list[dict]:
        try:
            return self.head.api("/api/v0/nodes?limit=1000&detail=1")["data"]["result"]["result"]
        except (urllib.error.URLError, ConnectionError, OSError, KeyError):
            return []

    def stop(self) -> None:
        # nodes in parallel: each waits on its own raylet's drain
        stoppers = [threading.Thread(target=node.stop) for node in self.nodes]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
        self.head.stop()


CORPUS = "hf://wikimedia/wikipedia?config=20231101.en"  # the corpus the paper-scale configs name


def stage_pipeline_inputs(root: str, teacher: str, student: str, *, docs: int = 60,
                          seeds: tuple[int, ...] = (13, 21), task: str = "SST-2") -> dict[str, str]:
    """Put what `pipeline_job` reads under `root` (an `s3://` prefix): the teacher and student
    model folders, an asset mirror holding `CORPUS` (the first `docs` documents of the local
    Wikipedia sample as a `save_to_disk` folder in 2 files), and LM-BFF's `task` splits of
    `seeds` (`rayapp assets push` pushes them all). Returns the URIs `pipeline_job` takes."""
    import datasets

    from rayapp import storage
    from rayapp.assets import asset

    text = asset("corpus", "wikipedia-en", "AA", "wiki_00").read_text()
    bodies = [d.split(">", 1)[1] for d in text.split("</doc>") if "<doc " in d][:docs]
    mirror = storage.join(root, "mirror")
    with tempfile.TemporaryDirectory() as tmp:
        datasets.Dataset.from_dict({"id": [str(i) for i in range(len(bodies))], "text": bodies}).save_to_disk(
            tmp, num_shards=2)
        storage.copy_dir(tmp, storage.join(mirror, "datasets/wikimedia/wikipedia/20231101.en/train"))
    for seed in seeds:
        storage.copy_dir(str(asset("fewshot", "k-shot", task, f"16-{seed}")),
                         storage.join(root, f"fewshot/k-shot/{task}/16-{seed}"))
    storage.copy_dir(teacher, storage.join(root, "models/teacher"))
    storage.copy_dir(student, storage.join(root, "models/student"))
    return {"corpus": CORPUS, "teacher": storage.join(root, "models/teacher"),
            "student": storage.join(root, "models/student"), "mirror": mirror,
            "data_dir": storage.join(root, "fewshot/k-shot")}


def pipeline_job(out: str, corpus: str, teacher: str, student: str, data_dir: str, *, pairs: int = 96,
                 distill_steps: int = 40, checkpoint_every: int = 5, seeds: tuple[int, ...] = (13, 21),
                 lrs: tuple[float, ...] = (1e-4, 5e-4), ft_steps: int = 4, task: str = "SST-2") -> str:
    """The SMASH pipeline as the shell command of one `ray job submit`, every stage its own
    `python -m jobs.X` and every input and output a URI (`s3://` on a cluster): pairs from
    `corpus` -> the teacher's top-k cache of the pairs, with `corpus`'s sentiment sentences
    built beside these two (neither reads the other's output; the job waits for both and fails
    if either does) -> SMASH
    distillation of `student` with DeepSpeed ZeRO-2 on 2 one-CPU workers (gloo, no GPU) -> a Ray Tune sweep of
    prompt FT of the distilled student on `task` over `seeds` x `lrs` (splits under
    `data_dir`) -> the report. Outputs land under `out`: pairs/, sentiment/, cache/,
    runs/distill/ (+ runs/records/distill.json), sweeps/pipeline/; the report prints to the
    job's log and writes report/ in the job's working dir (`rayapp report` writes locally)."""
    sweep = {"name": "pipeline", "storage": f"{out}/sweeps", "tasks": [task], "seeds": list(seeds), "k": 16,
             "grid": {"lr": list(lrs)},
             "base": {"model": f"{out}/runs/distill/student", "data_dir": data_dir, "batch_size": 4,
                      "max_steps": ft_steps, "eval_every": max(1, ft_steps // 2), "max_length": 64,
                      "engine": {"engine": "ddp", "num_workers": 1}},
             "methods": {"smash-pt": {"method": "prompt", "label": "student + SMASH prompt FT"}}}
    sentiment = (f"python -m jobs.intermediate sentiment --config jobs/configs/intermediate-sentiment_local.yaml "
                 f"corpus='{corpus}' teacher={teacher} out={out}/sentiment threshold=0 num_examples={pairs} "
                 "batch_size=16")
    # sentiment in the background (stopped if the job ends before it is waited for), all in one
    # { group; } so that `export X && <this>` still reads as one command
    return f"{{ {sentiment} & sentiment=$!; trap 'kill $sentiment 2>/dev/null' EXIT; " + " && ".join([
        f"python -m jobs.intermediate pairs --config jobs/configs/intermediate-pairs_local.yaml corpus='{corpus}' "
        f"out={out}/pairs num_examples={pairs}",
        f"python -m jobs.teacher_cache --config jobs/configs/teacher-cache-pairs_local.yaml examples={out}/pairs "
        f"teacher={teacher} out={out}/cache top_k=8 batch_size=16 num_actors=2 rows_per_shard={max(1, pairs // 2)}",
        "wait $sentiment",
        f"python -m jobs.distill --config jobs/configs/distill-smash-pairs_local.yaml student={student} "
        f"teacher={teacher} data={out}/cache output_dir={out}/runs name=distill max_steps={distill_steps} "
        f"batch_size=4 checkpoint_every={checkpoint_every} log_every={checkpoint_every} engine.engine=deepspeed "
        "engine.zero_stage=2 engine.num_workers=2 engine.cpus_per_worker=1 engine.max_failures=2 engine.use_gpu=false",
        f"echo '{json.dumps(sweep)}' > pipeline-sweep.yaml",  # JSON is YAML; in the job's own working dir
        "python -m jobs.sweep --config pipeline-sweep.yaml",
        f"python -m jobs.report {out}/sweeps/pipeline --out report",
    ]) + "; }"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cluster.local_cluster", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    node = sub.add_parser("node", help="(internal) run one worker node inside its namespaces")
    node.add_argument("--gcs", required=True)
    node.add_argument("--cpus", type=int, default=1)
    node.add_argument("--resources", default="{}")
    node.add_argument("--name", required=True)
    node.add_argument("--ready", required=True)
    parser.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
    parser.add_argument("--cpus", type=int, default=1, help="logical CPUs per worker node (default 1)")
    args = parser.parse_args(argv)
    if args.command == "node":
        env.apply(env.LOCAL)
        _node_main(args.gcs, args.cpus, args.resources, args.name, args.ready)
        return
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # sigwait takes only blocked signals
    cluster = LocalCluster()
    try:
        for _ in range(args.workers):
            cluster.add_node(args.cpus)
        print(f"head: {cluster.address} (GCS {cluster.head.gcs_address}); {args.workers} worker nodes\n"
              f"  RAY_AUTH_MODE=token ray job submit --address {cluster.address} --working-dir . -- python ...\n"
              "Ctrl-C stops the cluster.", flush=True)
        signal.sigwait(stop_signals)
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
