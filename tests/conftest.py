"""Shared fixtures: one local Ray cluster per session (per pytest-xdist worker), tiny models, a
moto S3 server.

The tests run Ray with the same flags as `make` and `rayapp demo` (`rayapp.env.LOCAL`:
loopback only, no hub), set before anything imports ray.
"""
from __future__ import annotations

import os
from collections import Counter

from rayapp import env

env.apply(env.LOCAL)

import pytest

from cluster.local_cluster import ensure_token, free_port, wait_until  # noqa: F401  (tests import wait_until from here)
from tiny import make_tiny_random_model, make_tiny_tokenizer


# --- two pytest-xdist workers (`make test`: -n 2 --dist loadfile --no-loadscope-reorder) --------
# The suite is CPU-bound on process start-ups, yet one process kept both cores busy only 75-78%
# of the time (tests waiting on one process's imports, on a node's death, on an S3 timeout): a
# second worker fills the gaps. A module runs on one worker (its module fixtures once); each
# worker has its own session cluster. (Not `--dist loadgroup`: pytest-xdist 3.8 marks a group
# in `item._nodeid`, which pytest 9.2 no longer reads, so the groups are ignored.)


def pytest_collection_modifyitems(items):
    """Longest modules first, so that no worker starts a long one while the other is nearly
    done (`make test` passes --no-loadscope-reorder, so xdist deals modules out in this order;
    its own order, most tests first, dealt the multi-node module out last: one worker ran 70 s
    alone). A module's length is read from its fixtures: its own clusters (a pipeline job
    each, minutes), then its tests on the session cluster. A stable sort: a module's tests
    keep their order."""
    own, on_session = set(), Counter()
    for item in items:
        uses = set(item.fixturenames)
        if uses & {"multinode", "ray_head"}:
            own.add(item.path)
        on_session[item.path] += "ray_cluster" in uses
    items.sort(key=lambda item: (item.path not in own, -on_session[item.path]))


def pytest_configure(config):
    """Before the workers start Ray: Ray 2.60 writes a new ~/.ray/auth_token with a machine's
    first local cluster, so two workers starting theirs at once on a new machine would each
    write one, and one cluster's clients would read the other's token. The controller makes it
    first, as the local cluster helpers do before a head starts (`ensure_token`)."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        ensure_token(dict(os.environ))


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """Started after the S3 server so that workers inherit its endpoint and test keys."""
    import ray

    # the dashboard serves the state API that Ray Train's controller and the failure test use
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=free_port(),
             log_to_driver=False, runtime_env={"worker_process_setup_hook": env.SETUP_HOOK})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")  # stopped after the module that uses it: no idle second cluster beside later tests
def ray_head(s3_server):
    """A head node as users start one (`cluster.local_cluster.start_head`): `ray start --head
    --block` on loopback with free ports, token authentication (Ray 2.60's default for new
    clusters; clients need RAY_AUTH_MODE=token) and its own temp dir, so no `ray.init()` of
    this or another process on the machine finds it. It inherits the S3 server's endpoint and
    test keys, as a cluster node has its instance profile. Stopped by SIGTERM, then SIGKILL to
    its process group; never `ray stop`, which would stop every Ray on the machine."""
    from cluster.local_cluster import start_head

    head = start_head(num_cpus=4)  # logical: two small pipeline jobs at once on a 2-core machine
    try:
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="module")
def multinode(s3_server):
    """A head with 0 CPUs and two 1-CPU worker nodes, each in its own mount namespace with a
    private /tmp (`cluster.local_cluster`): only loopback and the moto S3 server are shared,
    so a path one node writes under /tmp is not there for the others. Module-scoped: the
    multi-node tests live in one module and stop it after them."""
    from cluster.local_cluster import LocalCluster

    cluster = LocalCluster()
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        yield cluster
    finally:
        cluster.stop()


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


@pytest.fixture(scope="session")
def fewshot_runs(ray_cluster, tiny_bert, tiny_roberta, tmp_path_factory) -> dict:
    """A prompt FT run and a classifier run of the tiny BERT on SST-2 split 13 (local assets),
    and a prompt FT run of the tiny RoBERTa whose label words are two BPE pieces each
    (`multi_token`: two masks, a [B, 2] mask_pos in the ONNX graph)."""
    import yaml

    from rayapp.recipes.finetune import FinetuneConfig, run
    from rayapp.train.engine import EngineConfig

    out = tmp_path_factory.mktemp("export-runs")
    (out / "tasks.yaml").write_text(yaml.safe_dump([{"name": "SST-2", "template": "{x0} It was {mask}.",
                                                     "verbalizer": {"0": "awful", "1": "superb"}, "multi_token": True}]))
    base = dict(task="SST-2", model=tiny_bert, max_steps=4, eval_every=2, batch_size=8, lr=2e-3, max_length=48,
                output_dir=str(out), engine=EngineConfig(num_workers=1))
    found = {method: run(FinetuneConfig(method=method, name=f"{method}-run", **base))
             for method in ("prompt", "classifier")}
    found["multi-token"] = run(FinetuneConfig(**{**base, "model": tiny_roberta, "tasks_file": str(out / "tasks.yaml")},
                                              name="multi-token-run"))
    return found


@pytest.fixture(scope="session")
def docs_corpus(tmp_path_factory) -> str:
    """A text corpus of 12 documents of 8 sentences (blank lines between documents)."""
    corpus = tmp_path_factory.mktemp("docs") / "corpus.txt"
    docs = [[f"Document {d} sentence {s} talks about topic {d * 7 + s} in some detail." for s in range(8)]
            for d in range(12)]
    corpus.write_text("\n\n".join(" ".join(doc) for doc in docs) + "\n")
    return str(corpus)


@pytest.fixture(scope="session")
def pairs(ray_cluster, docs_corpus, tmp_path_factory) -> str:
    """96 SMASH sentence pairs (labels 0/1/2) from `docs_corpus`."""
    from rayapp.data.pairs import build_pairs

    out = str(tmp_path_factory.mktemp("pairs") / "pairs")
    build_pairs(docs_corpus, out, num_examples=96, seed=0, fmt="text")
    return out


@pytest.fixture(scope="session")
def marian(tmp_path_factory) -> dict:
    """Two tiny random MarianMT models (en->pivot, pivot->en) with real MarianTokenizers."""
    from tiny import make_tiny_marian

    root = tmp_path_factory.mktemp("marian")
    return {"forward": str(make_tiny_marian(root / "en-de", seed=0)),
            "backward": str(make_tiny_marian(root / "de-en", seed=1))}


# A scoring stage's actor pool (`rayapp.modeling.scorer.pool_args`) grows by an actor as soon as
# one holds two shards. With a test's few tiny shards, the second actor's start (torch,
# transformers, the model) costs more than the shards it takes (the predict, sentiment and
# teacher-cache modules: 178 -> 161 CPU-s without 11 such starts), so stage tests run a pool of
# one actor, as the `_local` job configs do. The default pool, which grows, runs in
# test_sentiment's `keep_all`.
ONE_ACTOR = {"num_actors": 1}

# On the 2-CPU session cluster a sweep runs two trials at a time, each pair in two new trial
# actors (Ray Tune, torch, transformers: about 6.5 CPU-s each to start); one at a time, one
# actor runs a phase's trials (Tune reuses it), and two busy xdist workers gain nothing from the
# second (the iPET sweep, alone: 64-68 -> 49-50 CPU-s, 40-43 s wall either way). Sweep tests
# whose subject is not concurrency use it; the kill-and-resume sweeps and the multi-node sweep
# keep the cluster-paced default.
ONE_TRIAL = {"max_concurrent_trials": 1}

BT_SETTINGS = dict(tasks=["SST-2", "RTE"], seeds=[13], factor=3, max_length=12, **ONE_ACTOR)  # SST-2: one sentence, RTE: two


@pytest.fixture(scope="session")
def bt_built(ray_cluster, marian, tmp_path_factory) -> tuple[str, dict]:
    """(root, stats) of split 13 of SST-2 and RTE back-translated to 3x their train sets
    (random models never stop early: short translations keep it fast)."""
    from rayapp.data import backtranslate as bt

    out = str(tmp_path_factory.mktemp("bt") / "fewshot-bt")
    return out, bt.backtranslate(out, **marian, **BT_SETTINGS)


@pytest.fixture(scope="session")
def ppt_run(ray_cluster, pairs, tiny_roberta, tmp_path_factory) -> dict:
    """PPT pre-training of a 4-token soft prompt on `pairs` with the tiny RoBERTa frozen:
    DeepSpeed ZeRO-2 in bf16 on 2 CPU workers, 3 steps, the model of step 1 kept; its record."""
    from rayapp.recipes.ppt import PPTConfig, run
    from rayapp.train.engine import EngineConfig

    return run(PPTConfig(student=tiny_roberta, data=pairs, task="smash-pairs", prompt_tokens=4, batch_size=8,
                         max_steps=3, checkpoint_every=3, log_every=1, keep_steps=[1],
                         output_dir=str(tmp_path_factory.mktemp("ppt") / "runs"),
                         engine=EngineConfig(engine="deepspeed", precision="bf16", zero_stage=2, num_workers=2,
                                             cpus_per_worker=0.5, use_gpu=False)))
