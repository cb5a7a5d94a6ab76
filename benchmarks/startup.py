"""CPU time a fresh rayapp process spends importing what a Tune trial imports (Ray, Ray Tune,
torch, a transformers model class), with CPython's default garbage-collection thresholds vs
with rayapp's (`import rayapp` raises the full-collection threshold; `rayapp/__init__.py`).

Each run is a new `python` process, as a trial actor, Train worker or Ray Data actor is; it
times only the imports (`time.process_time`), so interpreter start-up and exit are left out.
The two settings alternate, `--runs` times each, and the medians are compared. `--smoke`: one
run of each (CI).

    python benchmarks/startup.py [--runs 7] [--smoke]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

# the first line picks the setting; `import rayapp` is what every rayapp process runs first
IMPORTS = """
{first}
import time
started = time.process_time()
import ray, ray.tune, torch
from transformers import AutoModelForMaskedLM, BertForMaskedLM
print(time.process_time() - started, *__import__("gc").get_threshold())
"""
SETTINGS = {"CPython default": "import gc", "rayapp": "import rayapp"}


def import_seconds(first: str) -> tuple[float, tuple[int, ...]]:
    """(CPU seconds of the imports, the GC thresholds they ran under) in a fresh process."""
    done = subprocess.run([sys.executable, "-c", IMPORTS.format(first=first)], capture_output=True, text=True,
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
        for name, first in SETTINGS.items():
            cpu, thresholds[name] = import_seconds(first)
            seconds[name].append(cpu)
    median = {name: statistics.median(v) for name, v in seconds.items()}
    print(f"\nimports of a trial's process (ray, ray.tune, torch, transformers' BERT), {runs} fresh processes each:")
    for name, v in seconds.items():
        print(f"  {name:16s} gc thresholds {thresholds[name]}: median {median[name]:.2f} CPU-s "
              f"(min {min(v):.2f}, max {max(v):.2f})")
    base, ours = median["CPython default"], median["rayapp"]
    print(f"ratio rayapp / default (CPU-s): {ours / base:.2f}  ({base - ours:+.2f} s per process)")


if __name__ == "__main__":
    main()
