"""The environment flags rayapp runs Ray and Hugging Face with, defined here and nowhere else.

Two sets:
- `CLUSTER`: every rayapp process, on a laptop or a cloud cluster. `cluster/runtime_env.yaml`
  carries exactly these (a test keeps it equal), and `python -m jobs.X` sets them too.
- `LOCAL`: `CLUSTER` plus what only a single machine without the hub wants. `make`, the tests
  (`tests/conftest.py`) and `rayapp demo` use it.

`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` is for local clusters only: it makes Ray use the
loopback address, so nothing listens on the machine's network address, and it refuses
`ray start --address` (joining a multi-node cluster). Never set it on a real cluster.

Stdlib only, so `make` can read it before any virtualenv exists:
`python3 rayapp/env.py local` prints `KEY=VALUE` lines.
"""
from __future__ import annotations

import os
import sys

CLUSTER: dict[str, str] = {
    "RAY_TRAIN_V2_ENABLED": "1",          # the recipes use the Train V2 API; pinned against a user's 0
    "TOKENIZERS_PARALLELISM": "false",    # fast tokenizers' threads do not survive Ray's worker forks
    # parquet through the V1 reader: V2 starts helper actors that cost 6-11 s per read (measured
    # on the 2-core test machine for a one-file cache); rayapp reads whole folders, never needs
    # V2's ignore_missing_paths/skip_paths
    "RAY_DATA_USE_DATASOURCE_V2": "0",
}

LOCAL: dict[str, str] = {
    **CLUSTER,
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # loopback only; see the module docstring
    "HF_HUB_OFFLINE": "1",                     # local assets only: fail fast instead of retrying the hub
    "HF_DATASETS_OFFLINE": "1",
    # Ray Train's spot-preemption watcher has nothing to watch on one machine, and its actor
    # logs an error line (constructor arguments in the object store) for every run
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # the driver folds worker lines that differ only in numbers into "[repeated Nx across
    # cluster]": progress lines ("step 12/30 loss=...") are exactly those
    "RAY_DEDUP_LOGS": "0",
    # Ray Train's controller takes a worker's report (its queue holds one) only when it polls,
    # every 2 s by default: a short run that evaluates and checkpoints every few steps waited
    # on that clock (measured: a zero-shot run 21 -> 17 s, 80 DeepSpeed steps with a
    # checkpoint every 10 56 -> 42 s on 2 cores). Polling 2 local workers 4x a second is cheap.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
}


def apply(flags: dict[str, str]) -> None:
    """Set `flags` in this process's environment (before `import ray`), keeping values the
    user already set, so `HF_HUB_OFFLINE=0 make demo` still means what it says."""
    for key, value in flags.items():
        os.environ.setdefault(key, value)


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "local"
    if which not in ("local", "cluster"):
        sys.exit(f"usage: python3 rayapp/env.py [local|cluster]; got {which!r}")
    print("\n".join(f"{k}={v}" for k, v in (LOCAL if which == "local" else CLUSTER).items()))
