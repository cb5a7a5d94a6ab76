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

import logging
import os
import sys

CLUSTER: dict[str, str] = {
    "RAY_TRAIN_V2_ENABLED": "1",          # the recipes use the Train V2 API; pinned against a user's 0
    "TOKENIZERS_PARALLELISM": "false",    # fast tokenizers' threads do not survive Ray's worker forks
    # parquet through the V1 reader: V2 starts helper actors that cost 6-11 s per read (measured
    # on the 2-core test machine for a one-file cache); rayapp reads whole folders, never needs
    # V2's ignore_missing_paths/skip_paths
    "RAY_DATA_USE_DATASOURCE_V2": "0",
    # a job's log is no terminal: the hub's bars in its workers (transformers' weight loading,
    # each checkpoint's shard writing) reached it as a line per frame; rayapp's own progress
    # lines stay
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
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
    # the raylet keeps at most this many idle Python workers (default: the CPU count, 2 here);
    # each Ray Data execution of a stage then starts fresh workers that import pyarrow, torch
    # and the stage again (3-5 s each on 2 cores). Keeping 6 warm cut the data-stage tests
    # (sentiment, pairs, teacher cache) from 74 s to 60 s; idle workers cost only memory.
    "RAY_num_workers_soft_limit": "6",
}


def apply(flags: dict[str, str]) -> None:
    """Set `flags` in this process's environment (before `import ray`), keeping values the
    user already set, so `HF_HUB_OFFLINE=0 make demo` still means what it says."""
    for key, value in flags.items():
        os.environ.setdefault(key, value)


# worker-side HF noise off, for a cluster rayapp starts itself (a job's workers get the
# submitter's runtime env instead)
QUIET_WORKERS: dict[str, str] = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                                 "PYTHONWARNINGS": "ignore"}


# run by every Ray worker process as it starts (after Ray's own import), before it imports what
# its actor needs (Ray Train, Tune, Data, torch): rayapp's garbage-collection thresholds
# (`rayapp/__init__.py`) for those imports too. The tests' cluster, `start_ray`'s own clusters
# and `cluster/runtime_env.yaml` (jobs) set it; a driver attached to another cluster keeps that
# cluster's runtime env.
SETUP_HOOK = "rayapp.fewer_full_collections"


def plain_output() -> None:
    """When stdout is not a terminal (a captured log), no `\r` bars and no colour codes from
    the start: environment flags only (no import), so the CLI sets them before any command
    loads a model (transformers reads its bar setting from HF_HUB_DISABLE_PROGRESS_BARS at
    import: a sweep cuts its students before Ray starts)."""
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # read by the driver when it prints worker lines
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


class _Console(logging.StreamHandler):
    """A handler writing to the current `sys.stdout` or `sys.stderr` (`name`), looked up per
    record (a test's output capture replaces them between commands run in one process)."""

    def __init__(self, name: str):
        self.name_ = name
        super().__init__()

    @property
    def stream(self):
        return getattr(sys, self.name_)

    @stream.setter
    def stream(self, _):  # StreamHandler.__init__ sets it
        pass


def console_logging() -> None:
    """rayapp's own log lines as plain lines: INFO (a stage's "N shards to compute, M already
    written") on stdout beside the command's other output, warnings on stderr, so a user
    error stays the one line there. Nothing else gives the `rayapp` logger a handler: its INFO
    records were dropped (Python's last-resort handler prints WARNING and up only).
    Idempotent; records still propagate (a test's caplog sees them)."""
    logger = logging.getLogger("rayapp")
    if not any(isinstance(h, _Console) for h in logger.handlers):
        for name, keep in (("stdout", lambda r: r.levelno < logging.WARNING),
                           ("stderr", lambda r: r.levelno >= logging.WARNING)):
            handler = _Console(name)
            handler.setFormatter(logging.Formatter("%(message)s"))
            handler.addFilter(keep)
            logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def quiet_console() -> None:
    """What a rayapp command prints: its own progress and errors. Ray Data's execution plans
    and INFO lines stay in Ray's session logs (`/tmp/ray/session_*/logs`: Ray Data's file
    handlers keep every level), HF loading messages are off. When stdout is not a terminal
    (a captured log: `> file`, `ray job submit`) also no live bars (tqdm's `\r` frames) and no
    colour codes around worker lines; in a terminal Ray Data keeps its live bars."""
    import ray.data
    import transformers

    plain_output()
    if not sys.stdout.isatty():
        ray.data.DataContext.get_current().enable_progress_bars = False
        transformers.utils.logging.disable_progress_bar()
    logging.getLogger("ray").setLevel(logging.WARNING)
    for handler in logging.getLogger("ray.data").handlers:  # its own logger, DEBUG, console at INFO
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)  # also "progress bars disabled", a WARNING
    transformers.utils.logging.set_verbosity_error()


def start_ray() -> None:
    """Connect this driver to Ray, the one place rayapp does: the cluster `RAY_ADDRESS` names
    (a job's driver under `ray job submit`) or a new local one, with a quiet console: Ray's
    start-up lines (the token-auth warning, the dashboard URL in colour codes) go to its logs."""
    import ray

    if ray.is_initialized():
        return
    quiet_console()
    own = {} if os.environ.get("RAY_ADDRESS") else {
        "dashboard_host": "127.0.0.1",
        "runtime_env": {"env_vars": QUIET_WORKERS, "worker_process_setup_hook": SETUP_HOOK}}
    ray.init(logging_level="ERROR", **own)


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "local"
    if which not in ("local", "cluster"):
        sys.exit(f"usage: python3 rayapp/env.py [local|cluster]; got {which!r}")
    print("\n".join(f"{k}={v}" for k, v in (LOCAL if which == "local" else CLUSTER).items()))
