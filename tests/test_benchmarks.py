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
    "predict": "rayapp predict vs bare PyTorch",
    "pretrain": "ratio rayapp / plain (tokens/s):",
    "startup": "ratio rayapp / default (CPU-s):",
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


def test_fidelity_distils_at_most_one_epoch(tmp_path):
    """SMASH distils for one epoch (App. A.1): by default one pass over the examples, and a
    budget that would show them twice is refused (the sentiment student saw its 2,604
    sentences 2.5 times before)."""
    import importlib.util

    import pyarrow as pa

    from rayapp.data import shards

    spec = importlib.util.spec_from_file_location("fidelity", BENCHMARKS / "fidelity.py")
    fidelity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fidelity)
    names = ["part-00000.parquet", "part-00001.parquet"]
    written = {name: shards.write_table(str(tmp_path / name), pa.table({"text_a": ["x"] * rows}))
               for name, rows in zip(names, (30, 20))}
    shards.write_meta(str(tmp_path), {"files": names}, written)
    assert fidelity.one_epoch(str(tmp_path), None) == 4  # ceil(50 / 16)
    assert fidelity.one_epoch(str(tmp_path), 3) == 3
    with pytest.raises(SystemExit, match=r"more than once \(one epoch = 4 steps at batch 16"):
        fidelity.one_epoch(str(tmp_path), 5)
