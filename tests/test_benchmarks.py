"""Every benchmark runs in CI: its `--smoke` mode executes the same code path as its full run
at tiny sizes, so an import or API break fails here instead of in a user's hands."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
# what each benchmark's final table prints when it ran to the end
PRINTS = {
    "fidelity": "stage wall times (s):",
    "intermediate": "teacher cache vs bare PyTorch",
    "multinode": "0-CPU head + 2 one-CPU worker nodes:",
    "pretrain": "ratio rayapp / plain (tokens/s):",
    "sweep": "Ray Tune, 2 trials at a time:",
    "train_overhead": "rayapp on Ray Train (1 worker)",
}


def test_every_benchmark_has_a_smoke_run_here():
    assert sorted(p.stem for p in BENCHMARKS.glob("*.py")) == sorted(PRINTS)


@pytest.mark.parametrize("name", sorted(PRINTS))
def test_benchmark_smoke_run(name, tmp_path):
    args = [sys.executable, str(BENCHMARKS / f"{name}.py"), "--smoke"]
    if name == "fidelity":
        args += ["--work-dir", str(tmp_path / "fidelity")]
    # its own local Ray cluster, not the session's
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert PRINTS[name] in done.stdout, out[-3000:]
