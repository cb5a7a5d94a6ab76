"""CPU time a fresh rayapp process spends importing what a Tune trial imports (Ray, Ray Tune,
torch, a transformers model class), with CPython's default garbage-collection thresholds vs
with rayapp's (`import rayapp` raises the full-collection threshold; `rayapp/__init__.py`).

In the order a Ray worker imports: Ray (the worker's own start), then what its actor needs
(Ray Tune), then the trial's code, which imports rayapp, torch and transformers. rayapp's
thresholds take effect either from the point the trial imports rayapp, or, with the setup
hook every rayapp cluster and job sets (`rayapp.env.SETUP_HOOK`), right after Ray's own import.

Each run is a new `python` process, as a trial actor, Train worker or Ray Data actor is; it
times only the imports (`time.process_time`), so interpreter start-up and exit are left out.
The settings alternate, `--runs` times each, and the medians are compared. `--smoke`: one run
of each (CI).

    python benchmarks/startup.py [--runs 7] [--smoke]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

# `hook` and `trial` pick the setting: where `import rayapp` runs, if at all
IMPORTS = """
import time
started = time.process_time()
import ray
{hook}
import ray.tune
{trial}
import torch
from transformers import AutoModelForMaskedLM, BertForMaskedLM
print(time.process_time() - started, *__import__("gc").get_threshold())
"""
SETTINGS = {"CPython default": {"hook": "", "trial": ""},
            "rayapp from the trial": {"hook": "", "trial": "import rayapp"},
            "rayapp's setup hook": {"hook": "import rayapp", "trial": ""}}


def import_seconds(setting: dict) -> tuple[float, tuple[int, ...]]:
    """(CPU seconds of the imports, the GC thresholds they ended with) in a fresh process."""
    done = subprocess.run([sys.executable, "-c", IMPORTS.format(**setting)], capture_output=True, text=True,
                          check=True)
    seconds, *thresholds = done.stdout.split()
    return float(seconds), tuple(map(int, thresholds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="one run of each setting")
    args = parser.parse_args()
    runs = 1 if args.smoke else args.runs

    seconds = {name: [] for name in SETTINGS}
    thresholds = {}
    for _ in range(runs):
        for name, setting in SETTINGS.items():
            cpu, thresholds[name] = import_seconds(setting)
            seconds[name].append(cpu)
    median = {name: statistics.median(v) for name, v in seconds.items()}
    print(f"\nimports of a trial's process (ray, ray.tune, torch, transformers' BERT), {runs} fresh processes each:")
    for name, v in seconds.items():
        print(f"  {name:22s} gc thresholds {thresholds[name]}: median {median[name]:.2f} CPU-s "
              f"(min {min(v):.2f}, max {max(v):.2f})")
    base, trial, ours = median["CPython default"], median["rayapp from the trial"], median["rayapp's setup hook"]
    print(f"ratio rayapp from the trial / default (CPU-s): {trial / base:.2f}  ({base - trial:+.2f} s per process)")
    print(f"ratio rayapp / default (CPU-s): {ours / base:.2f}  ({base - ours:+.2f} s per process; with the setup hook)")


if __name__ == "__main__":
    main()
