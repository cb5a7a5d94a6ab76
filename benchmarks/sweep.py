"""Wall time of one small grid run trial after trial vs by Ray Tune with 2 trials at a time,
and what a Tune trial costs beyond its training loop.

The grid: prompt-based FT of a tiny random BERT (tests/tiny.py) on SST-2, 2 splits x 2
learning rates = 4 runs of `--steps` steps (dev every `--steps/2`, test at the end), each a
1-worker Ray Train run. First the 4 recipe runs one after another (`finetune.run`, no Tune),
then the same 4 as one `rayapp sweep` (Tune, `max_concurrent_trials=2`), both on one local
Ray cluster of `--cpus` CPUs started here. Printed: both wall times and their ratio, and per
trial the loop's own time (`loop_seconds` in the record: setup, steps, evaluations), the
Ray Train run around it (`seconds`) and the Tune trial around that (Tune's `time_total_s`):
per-trial overhead = trial wall time - loop time.

    python benchmarks/sweep.py [--steps 20] [--cpus 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tiny.py

from rayapp import env  # noqa: E402

env.apply(env.LOCAL)


def grid(model: str, storage: str, steps: int):
    from rayapp.config import build
    from rayapp.sweep.spec import SweepConfig

    return build(SweepConfig, {
        "name": "bench", "storage": storage, "tasks": ["SST-2"], "seeds": [13, 21], "grid": {"lr": [1e-3, 1e-4]},
        "base": {"model": model, "max_steps": steps, "eval_every": max(1, steps // 2), "batch_size": 8,
                 "eval_batch_size": 128, "engine": {"num_workers": 1}},
        "methods": {"prompt": {"method": "prompt"}}, "max_concurrent_trials": 2})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()

    import ray

    from rayapp.recipes import get_recipe
    from rayapp.sweep import tune as sweep
    from tiny import make_tiny_random_model

    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    model = str(make_tiny_random_model("wordpiece", work / "tiny-bert", dropout=0.0))
    ray.init(num_cpus=args.cpus, dashboard_host="127.0.0.1", log_to_driver=False)  # Train polls the State API

    cfg = grid(model, str(work / "sequential"), args.steps)
    _, run = get_recipe("finetune")
    started = time.perf_counter()
    sequential = [run(cfg.recipe_config(t, f"seq-{i}", sweep._filler(cfg, t))) for i, t in enumerate(cfg.trials())]
    t_seq = time.perf_counter() - started

    cfg = grid(model, str(work / "tune"), args.steps)
    started = time.perf_counter()
    summary = sweep.run(cfg)
    t_tune = time.perf_counter() - started
    assert summary["done"] == 4, summary

    exp = Path(cfg.experiment)
    records = {r["name"]: r for r in (json.loads(f.read_text()) for f in (exp / "records").glob("*.json"))}
    rows = []
    for trial_dir in sorted((exp / "tune-0").iterdir()):
        if (trial_dir / "result.json").exists():
            last = json.loads((trial_dir / "result.json").read_text().splitlines()[-1])
            rec = records[trial_dir.name]
            rows.append((trial_dir.name, last["time_total_s"], rec["seconds"], rec["loop_seconds"]))

    print(f"\n{len(sequential)} runs x {args.steps} steps (tiny BERT, SST-2, 1 worker each), {args.cpus}-CPU local cluster")
    print(f"one after another (finetune.run): {t_seq:7.1f} s")
    print(f"Ray Tune, 2 trials at a time:    {t_tune:7.1f} s   speedup {t_seq / t_tune:.2f}x")
    print(f"sequential runs: Train run {sum(r['seconds'] for r in sequential) / 4:.1f} s, "
          f"loop {sum(r['loop_seconds'] for r in sequential) / 4:.1f} s (mean per run)")
    print(f"\n{'trial':34s} {'trial wall':>10s} {'Train run':>10s} {'loop':>7s} {'overhead':>9s}")
    for name, wall, seconds, loop in rows:
        print(f"{name:34s} {wall:10.1f} {seconds:10.1f} {loop:7.1f} {wall - loop:9.1f}")
    mean = [sum(r[i] for r in rows) / len(rows) for i in (1, 2, 3)]
    print(f"{'mean':34s} {mean[0]:10.1f} {mean[1]:10.1f} {mean[2]:7.1f} {mean[0] - mean[2]:9.1f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
