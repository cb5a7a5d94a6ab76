"""Wall time of one small grid run trial after trial vs by Ray Tune with 2 trials at a time,
and what a Tune trial costs beyond its training loop.

The grid: prompt-based FT of a tiny random BERT (tests/tiny.py) on SST-2 and MR, 2 splits x
4 learning rates = 16 runs of `--steps` steps (dev every `--steps/2`, test at the end), each one
worker. First the 4 recipe runs one after another (`finetune.run`, no Tune: each a Ray task,
the local launcher), then the same 4 as one `rayapp sweep` (Tune, `max_concurrent_trials=2`:
each trial runs its loop in its actor, reused by the next trial), both on one local Ray
cluster of `--cpus` CPUs started here. Printed: both wall times and their ratio, and per trial
the Tune trial's wall time (Tune's `time_total_s`), the recipe run inside it (`seconds` in the
record) and the loop's own time (`loop_seconds`): per-trial overhead = trial wall - loop. The
fixed costs are named: inside the loop (`timings` in the record: model and data load, dev
evaluations, checkpoint writes, the final test evaluation), outside it (trial wall - loop:
reading the sweep config, checking the model, loading the split, the final checkpoint and the
record), and what a fresh actor pays once (a new Python process importing torch,
transformers and the recipe; measured here in a subprocess). `--smoke`: SST-2, 2 learning
rates (4 runs), 2 steps (CI).

    python benchmarks/sweep.py [--steps 200] [--cpus 2] [--smoke]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tiny.py

from rayapp import env  # noqa: E402

env.apply(env.LOCAL)


def grid(model: str, storage: str, steps: int, smoke: bool = False):
    from rayapp.config import build
    from rayapp.sweep.spec import SweepConfig

    tasks, lrs = (["SST-2"], [1e-3, 1e-4]) if smoke else (["SST-2", "MR"], [1e-3, 3e-4, 1e-4, 3e-5])
    return build(SweepConfig, {
        "name": "bench", "storage": storage, "tasks": tasks, "seeds": [13, 21], "grid": {"lr": lrs},
        "base": {"model": model, "max_steps": steps, "eval_every": max(1, steps // 2), "batch_size": 8,
                 "eval_batch_size": 128, "engine": {"num_workers": 1}},
        "methods": {"prompt": {"method": "prompt"}}, "max_concurrent_trials": 2})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="4 runs of 2 steps")
    args = parser.parse_args()
    if args.smoke:
        args.steps = 2

    import ray

    from rayapp.recipes import get_recipe
    from rayapp.sweep import tune as sweep
    from tiny import make_tiny_random_model

    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    model = str(make_tiny_random_model("wordpiece", work / "tiny-bert", dropout=0.0))
    ray.init(num_cpus=args.cpus, dashboard_host="127.0.0.1", log_to_driver=False)  # Train polls the State API

    cfg = grid(model, str(work / "sequential"), args.steps, args.smoke)
    _, run = get_recipe("finetune")
    started = time.perf_counter()
    sequential = [run(cfg.recipe_config(t, f"seq-{i}", sweep._filler(cfg, t))) for i, t in enumerate(cfg.trials())]
    t_seq = time.perf_counter() - started

    cfg = grid(model, str(work / "tune"), args.steps, args.smoke)
    started = time.perf_counter()
    summary = sweep.run(cfg)
    t_tune = time.perf_counter() - started
    assert summary["done"] == len(sequential), summary

    exp = Path(cfg.experiment)
    records = {r["name"]: r for r in (json.loads(f.read_text()) for f in (exp / "records").glob("*.json"))}
    rows = []
    for trial_dir in sorted((exp / "tune-0").iterdir()):
        if (trial_dir / "result.json").exists():
            last = json.loads((trial_dir / "result.json").read_text().splitlines()[-1])
            rec = records[trial_dir.name]
            rows.append((trial_dir.name, last["time_total_s"], rec["seconds"], rec["loop_seconds"],
                         *(rec["timings"][k] for k in ("setup", "evaluate", "checkpoint", "finish"))))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import rayapp.recipes.finetune, torch, transformers"], check=True)
    fresh = time.perf_counter() - started

    print(f"\n{len(sequential)} runs x {args.steps} steps (tiny BERT, {'/'.join(cfg.tasks)}, 1 worker each), "
          f"{args.cpus}-CPU local cluster")
    print(f"one after another (finetune.run): {t_seq:7.1f} s")
    print(f"Ray Tune, 2 trials at a time:     {t_tune:7.1f} s   speedup {t_seq / t_tune:.2f}x")
    n = len(sequential)
    print(f"sequential runs: run {sum(r['seconds'] for r in sequential) / n:.1f} s, "
          f"loop {sum(r['loop_seconds'] for r in sequential) / n:.1f} s (mean per run)")
    head = ("trial wall", "run", "loop", "overhead", "load", "dev eval", "ckpt", "test")
    print(f"\n{'trial':34s}" + "".join(f"{h:>10s}" for h in head))
    for name, wall, seconds, loop, *fixed in rows:
        print(f"{name:34s}" + "".join(f"{v:10.2f}" for v in (wall, seconds, loop, wall - loop, *fixed)))
    mean = [sum(r[i] for r in rows) / len(rows) for i in range(1, 8)]
    print(f"{'mean':34s}" + "".join(f"{v:10.2f}" for v in (*mean[:3], mean[0] - mean[2], *mean[3:])))
    print("overhead = trial wall - loop (sweep config, model check, split load, final checkpoint, record); "
          "load/dev eval/ckpt/test are inside the loop")
    print(f"a fresh actor's process start + imports (torch, transformers, recipe), paid once per actor: {fresh:.1f} s")
    ray.shutdown()


if __name__ == "__main__":
    main()
