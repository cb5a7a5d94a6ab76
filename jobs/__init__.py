"""Thin `ray job submit` entrypoints, one per pipeline stage; each runs one `rayapp` command:

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env cluster/runtime_env.yaml \\
        -- python -m jobs.<stage> --config jobs/configs/<stage>.yaml key=value ...

`jobs/configs/` holds paper-scale configs (hub ids, s3://) and `*_local.yaml` ones for one CPU
machine with the local assets (paths relative to the repo root: under `ray job submit` the job
runs in a copy of the working dir, so give outputs as absolute paths or s3:// there).
"""
from __future__ import annotations

import sys

from rayapp import env


def run(*command: str) -> None:
    """`rayapp <command> <this process's arguments>`, exiting with its status."""
    env.apply(env.CLUSTER)  # also when started without cluster/runtime_env.yaml; set ones win
    from rayapp.cli import main

    sys.exit(main([*command, *sys.argv[1:]]))
