"""Wall time of the whole SMASH pipeline as one `ray job submit` on a multi-node cluster
(a 0-CPU head + 2 one-CPU worker nodes, nothing shared but loopback and S3) against the
same job on one 2-CPU node: what spreading over nodes costs (object storage for every
input and output, models fetched once per node, cross-node gloo allreduce for DeepSpeed).

The job is `cluster.local_cluster.pipeline_job`: pairs from an `hf://` corpus in an s3
asset mirror -> teacher top-k cache, with the corpus's sentiment sentences built beside
them -> SMASH distillation with
DeepSpeed ZeRO-2 on 2 CPU workers -> a 4-trial prompt-FT sweep of the distilled student on
SST-2 -> report, all against a moto S3 server on 127.0.0.1. Teacher: the real local
MiniLM-L6 (`minilm-l6-mlm-wiki`), student its 3-layer cut; `--tiny`: the tiny random
RoBERTa of the tests and its 1-layer cut, fewer steps; `--smoke` (CI): `--tiny` on the
multi-node cluster only.
Both clusters run one after the other in this process, on the same inputs; printed: both wall
times and their ratio.

    python benchmarks/multinode.py [--tiny | --smoke]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # cluster/, tiny.py

from rayapp import env  # noqa: E402

env.apply(env.LOCAL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random models, fewer steps")
    parser.add_argument("--smoke", action="store_true", help="--tiny, the multi-node cluster only")
    args = parser.parse_args()

    import boto3
    from moto.server import ThreadedMotoServer

    from cluster.local_cluster import LocalCluster, cluster_env, free_port, pipeline_job, stage_pipeline_inputs, \
        start_head
    from rayapp.assets import asset
    from rayapp.recipes.pretrain import make_student

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's per-request log
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    boto3.client("s3").create_bucket(Bucket="bench")
    work = Path(tempfile.mkdtemp(prefix="bench-multinode-"))
    if args.tiny or args.smoke:
        from tiny import make_tiny_random_model

        teacher = str(make_tiny_random_model("bpe", work / "teacher", dropout=0.0))
        student, sizes = make_student(teacher, str(work / "student"), layers=[0]), {"pairs": 96, "distill_steps": 20}
    else:
        teacher = str(asset("models", "minilm-l6-mlm-wiki"))
        student, sizes = make_student(teacher, str(work / "student"), layers=[0, 2, 4]), {"pairs": 256,
                                                                                        "distill_steps": 60}
    inputs = stage_pipeline_inputs("s3://bench/inputs", teacher, student)
    print(f"teacher {teacher}; pairs {sizes['pairs']}, distillation {sizes['distill_steps']} steps", flush=True)

    def timed(head, out: str) -> float:
        entry = pipeline_job(out, inputs["corpus"], inputs["teacher"], inputs["student"], inputs["data_dir"],
                             checkpoint_every=sizes["distill_steps"] // 2, **sizes)
        started = time.perf_counter()
        head.wait_job(head.submit(f"export RAYAPP_ASSETS={inputs['mirror']} && {entry}"), timeout=3600)
        return time.perf_counter() - started

    one = None
    if not args.smoke:  # the one-node reference; the smoke run (CI) checks the multi-node path only
        head = start_head(num_cpus=2, environ=cluster_env())
        try:
            one = timed(head, "s3://bench/one-node")
        finally:
            head.stop()
    cluster = LocalCluster()
    try:
        for _ in range(2):
            cluster.add_node(1)
        many = timed(cluster.head, "s3://bench/three-nodes")
    finally:
        cluster.stop()
        server.stop()
    if one is not None:
        print(f"one node, 2 CPUs:                    {one:7.1f} s")
    print(f"0-CPU head + 2 one-CPU worker nodes: {many:7.1f} s" + (f"   ratio {many / one:.2f}x" if one else ""))

if __name__ == "__main__":
    main()
