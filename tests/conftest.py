"""Shared fixtures: one local Ray cluster per session, tiny models, a moto S3 server.

The tests run Ray with the same flags as `make` and `rayapp demo` (`rayapp.env.LOCAL`:
loopback only, no hub), set before anything imports ray.
"""
from __future__ import annotations

import os
import socket

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
