"""The driver side of every recipe run: name, launch, record. Written once for all recipes."""
from __future__ import annotations

import time
from typing import Callable, Sequence

from rayapp import storage
from rayapp.config import to_dict
from rayapp.train.launch import launch
from rayapp.train.loop import train_loop
from rayapp.train.records import RECORDS, run_name, write_record

# what the loop's final report carries besides the recipe's own final metrics
_LOOP_KEYS = ("final", "step", "best", "best_step", "evals", "loss_curve", "parts_curve", "throughput", "restarts",
              "loop_seconds", "timings", "data_digest", "nodes")


def run_recipe(recipe: str, cfg, setup: Callable | None, inputs: dict, extra: dict, *, prefix: str | None = None,
               callbacks: Sequence = (), keep_checkpoints: int = 2,
               derive: Callable[[dict], dict] | None = None, loop: Callable[[dict], None] = train_loop) -> dict:
    """Run `setup`'s recipe (on the launcher `cfg.engine` picks) as `<output_dir>/<name>` and write its record.
    `loop` is rayapp's one loop; a recipe whose training is a library's own (SetFit) passes
    its loop, which reports through the same worker seam (`rayapp.train.worker`).

    The name is `cfg.name` or `<prefix>-<config hash>` (stable: a re-submission resumes).
    `<output_dir>`, the run's folder and `records/` are checked writable before the launch.
    The record = `extra` + the loop's curves and final metrics (+ `derive(record)`), written
    to `<output_dir>/records/<name>.json`; returned with `record["record"]` = that URI."""
    name = cfg.name or run_name(prefix or recipe, cfg)
    # before Ray starts: a folder that cannot take the checkpoints or the record fails now, not after training
    storage.require_writable(cfg.output_dir, "output_dir", (name, RECORDS))
    started = time.time()
    loop_cfg = {"cfg": cfg, "setup": setup, "run": storage.join(cfg.output_dir, name), **inputs}
    outcome = launch(loop, loop_cfg, cfg.engine, storage=cfg.output_dir,
                     name=name, callbacks=callbacks, keep_checkpoints=keep_checkpoints)
    metrics = dict(outcome.metrics)
    trained = metrics.get("step", cfg.max_steps)
    record = {"recipe": recipe, "name": name, "config": to_dict(cfg), **extra,
              **{k: metrics.pop(k) for k in _LOOP_KEYS if k in metrics},
              "metrics": metrics,  # the recipe's final metrics (e.g. test)
              # a run of 0 steps saved no weights (its model is its input)
              "checkpoint": storage.join(outcome.checkpoint, "model") if trained else None,
              "started": round(started, 3), "seconds": round(time.time() - started, 1)}
    if derive is not None:
        record.update(derive(record))
    record["record"] = write_record(cfg.output_dir, record)
    return record


def export_model(output_dir: str, record: dict, what: str) -> dict:
    """Copy the final checkpoint's HF model to `<run>/<what>` (what `init=`/`model=` load)."""
    uri = storage.join(output_dir, record["name"], what)
    storage.copy_dir(record["checkpoint"], uri)
    curve = record["loss_curve"]
    return {"model": uri, "first_loss": curve[0][1] if curve else None, "last_loss": curve[-1][1] if curve else None}
