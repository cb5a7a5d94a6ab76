"""The one training loop every recipe runs, on each Ray Train worker or on one local worker
(`train.worker`: the loop sees its worker only through `worker()`).

A recipe is its config, a `setup` and its objectives (torchtune's shape): `setup(cfg, inputs,
device)` builds what this loop needs (`Setup`: the model to train, the objective, the batch
stream, an optional evaluation and a final evaluation), and the loop does the rest once for
all recipes: engine, resume, steps, curves, evaluation, best-checkpoint selection, progress,
checkpoints and the final report.

Checkpoints. A recipe with a selection metric (`Setup.select`, e.g. few-shot dev accuracy)
reports a checkpoint whenever that metric improves, so the run's storage keeps the best
model and a restart resumes from it (later steps are recomputed: their data order is a
function of the step). Selection is among the evaluations *during training* (steps >= 1), as
in LM-BFF: the untrained model is evaluated at step 0 for the curve only. Recipes without a
selection metric checkpoint every `checkpoint_every` steps. The final report holds the kept
model (the best, or the last) and the recipe's final metrics (e.g. test); a run of 0 steps
(zero-shot evaluation) checkpoints its trainer state only: its model is the one it was given.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from rayapp import storage
from rayapp.train.config import TrainConfig
from rayapp.train.engine import Engine, split_batch
from rayapp.train.launch import report, restore
from rayapp.train.stream import pop_digest
from rayapp.train.worker import worker

log = logging.getLogger(__name__)

KEPT = "models"  # <run>/models/step-<N>: the models of `TrainConfig.keep_steps`
Batches = Iterator[list[dict]]  # one list of `grad_accum` micro-batches per optimizer step


@dataclass
class Setup:
    """What a recipe's setup hands the loop (built on each worker)."""
    model: torch.nn.Module                                  # the module the engine trains
    objective: Callable[[torch.nn.Module, dict], tuple]     # (model, batch) -> (loss, parts)
    batches: Callable[[int, int, int], Batches]             # (first step, micro, accum) -> steps' batches
    evaluate: Callable[[torch.nn.Module], dict] | None = None  # held-out metrics of the model
    select: str | None = None                               # metric of `evaluate` that picks the kept model
    finish: Callable[[torch.nn.Module], dict] | None = None   # final metrics of the kept model
    tokenizer: Any = None                                   # saved with every checkpoint
    desc: str = "train"


class Progress:
    """Rank 0's progress. `live`: a bar rendered by the driver (`ray.experimental.tqdm_ray`),
    one live bar in a terminal instead of a log line per update. Otherwise (the driver's
    output is a file: `ray job submit` logs, a captured `make demo`, a Tune trial) plain lines,
    about every tenth of the run, with no cursor escapes: log records on a Ray Train worker (Ray
    Train V2 patches a worker's `print` to log *and* echo to its redirected stdout, so a print
    showed twice), printed where INFO records are dropped (a local worker's root logger)."""

    def __init__(self, desc: str, total: int, initial: int = 0, live: bool = True):
        self.desc, self.total, self.step = desc, total, initial
        self.every = max(1, total // 10)
        self.rank0 = worker().rank == 0
        self.bar = None
        if self.rank0 and live:
            from ray.experimental.tqdm_ray import tqdm

            self.bar = tqdm(desc=desc, total=total)
            if initial:
                self.bar.update(initial)

    def update(self, **postfix) -> None:
        self.step += 1
        text = " ".join([self.desc, *(f"{k}={v}" for k, v in postfix.items())])
        if self.bar is not None:
            if postfix:
                self.bar.set_description(text)
            self.bar.update(1)
        elif self.rank0 and (self.step % self.every == 0 or self.step == self.total):
            line = f"{text} step {self.step}/{self.total}"
            if log.isEnabledFor(logging.INFO):  # a Ray Train worker: its root logger writes INFO to its console
                log.info(line)
            else:  # a local worker (Ray task or Tune actor) drops INFO records: its output is what Ray forwards
                print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def snapshot(module: torch.nn.Module) -> dict:
    """A copy of the weights that later optimizer steps do not change."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def quiet_train_file_loggers() -> None:
    """Some Ray Train V2 modules log through `logging.getLogger(__file__)` (e.g. "Reporting
    training result N: TrainingReport(...)" at every report), a name that escapes the
    `ray.train` level set by the run's `LoggingConfig`: hold them to WARNING on the console too."""
    marker = os.sep + os.path.join("ray", "train") + os.sep
    for name in list(logging.root.manager.loggerDict):
        if name.endswith(".py") and marker in name:
            logging.getLogger(name).setLevel(logging.WARNING)


def kept_model(run: str, step: int) -> str:
    """Where run `run` (its URI) keeps its model of step `step` (`TrainConfig.keep_steps`)."""
    return storage.join(run, KEPT, f"step-{step}")


def rank_nodes() -> list[str]:
    """The Ray node id of every rank, in rank order (a collective: every rank calls it)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if not torch.distributed.is_initialized():
        return [node]
    nodes = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(nodes, node)
    return nodes


def train_loop(loop_cfg: dict) -> None:
    """The loop on one worker: `loop_cfg` = {"cfg": TrainConfig, "setup": fn, ...inputs}."""
    loop_started = time.perf_counter()  # the loop's own time (in the record), beside the run's wall time
    # this attempt's fixed costs inside the loop (in the record; the rest of the loop is its steps)
    timings = dict.fromkeys(("setup", "evaluate", "checkpoint", "finish"), 0.0)

    @contextlib.contextmanager
    def timed(key: str):
        started = time.perf_counter()
        yield
        timings[key] += time.perf_counter() - started

    quiet_train_file_loggers()
    cfg: TrainConfig = loop_cfg["cfg"]
    torch.manual_seed(cfg.train_seed)
    world = worker().world_size
    micro, accum = split_batch(cfg.batch_size, world, cfg.engine.max_device_batch)
    steps = cfg.max_steps
    with timed("setup"):  # model and data load, engine, resume
        setup: Setup = loop_cfg["setup"](cfg, loop_cfg, worker().device)
        engine = Engine(setup.model, cfg.engine, lr=cfg.lr, weight_decay=cfg.weight_decay,
                        warmup_steps=int(cfg.warmup_ratio * steps), total_steps=max(1, steps),
                        micro_batch=micro, grad_accum=accum)
        state = restore(engine)
    if state is not None:
        if not state["done"]:
            state["restarts"].append(state["step"])  # resumed here after a failure or re-submission
        # with a selection metric the checkpoint holds the best model so far
        best_weights = snapshot(engine.module) if setup.select and state["best"] is not None else None
    else:
        state = {"step": 0, "done": False, "best": None, "best_step": None, "evals": [], "loss_curve": [],
                 "throughput": [], "restarts": [], "data_digest": []}
        best_weights = None
    state.setdefault("parts_curve", [])  # a fresh run, or a checkpoint older than the curve
    # where each attempt trained: [first step, node id of every rank] (older checkpoints lack it)
    state.setdefault("nodes", []).append([state["step"], rank_nodes()])

    def evaluate(step: int) -> dict:
        with timed("evaluate"):
            metrics = setup.evaluate(engine.module)
        state["evals"].append([step, metrics])
        return metrics

    def keep_model(step: int) -> None:  # `TrainConfig.keep_steps`
        with timed("checkpoint"), tempfile.TemporaryDirectory() as tmp:
            if engine.save_model(tmp, setup.tokenizer):
                uri = kept_model(loop_cfg["run"], step)
                storage.remove(uri)  # a partial copy of a killed attempt
                storage.copy_dir(tmp, uri)

    if not state["done"]:
        if state["step"] == 0 and 0 in cfg.keep_steps:
            keep_model(0)
        if state["step"] == 0 and setup.evaluate is not None:
            metrics = evaluate(0)
            if steps == 0 and setup.select:  # nothing is trained: the model as it is is the result
                state.update(best=metrics[setup.select], best_step=0)
        bar = Progress(setup.desc, steps, state["step"], live=loop_cfg.get("live_progress", False))
        batches = setup.batches(state["step"], micro, accum)
        window, tokens, started = [], 0, time.perf_counter()
        for step in range(state["step"] + 1, steps + 1):
            step_batches = next(batches)
            rows = pop_digest(step_batches)
            if rows is not None:  # which rows each step trained on: resume is checked against it
                state["data_digest"].append([step, rows])
            logs = engine.train_step(step_batches, setup.objective)
            tokens += sum(int(b["attention_mask"].sum()) for b in step_batches if "attention_mask" in b)
            window.append(logs)
            if step % cfg.log_every == 0 or step == steps:
                # throughput includes data loading: it is what a user's run gets (ranks see equal shares)
                state["throughput"].append([step, tokens * world / (time.perf_counter() - started)])
                state["loss_curve"].append([step, sum(w["loss"] for w in window) / len(window)])
                # the objective's parts (e.g. PD's eq. 8 terms), so a term's size is visible in the record
                parts = {k: sum(w[k] for w in window) / len(window) for k in logs if k != "loss"}
                if parts:
                    state["parts_curve"].append([step, parts])
                window, tokens, started = [], 0, time.perf_counter()
            bar.update(loss=f"{logs['loss']:.4f}")
            if step in cfg.keep_steps:  # before the step's checkpoint: a restart from it finds the model kept
                keep_model(step)
            metrics, checkpoint = {}, False
            if setup.evaluate is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == steps):
                metrics = evaluate(step)
                if setup.select and (state["best"] is None or metrics[setup.select] > state["best"]):
                    state.update(best=metrics[setup.select], best_step=step)
                    best_weights, checkpoint = snapshot(engine.module), True
            if not setup.select and (step % cfg.checkpoint_every == 0 or step == steps):
                checkpoint = True
            if metrics or checkpoint:
                if checkpoint:
                    state["step"] = step
                with timed("checkpoint"):
                    report({"step": step, "loss": logs["loss"], **metrics, "best": state["best"]},
                           engine if checkpoint else None, dict(state), setup.tokenizer)
        bar.close()
        if best_weights is not None:
            engine.load_weights(best_weights)  # the kept model is the best on the selection metric
        state.update(step=steps, done=True)
    with timed("finish"):
        final = setup.finish(engine.module) if setup.finish is not None else {}
    selected = {setup.select: state["best"]} if setup.select else {}
    curves = ("step", "best", "best_step", "evals", "loss_curve", "parts_curve", "throughput", "restarts", "data_digest",
              "nodes")
    # a run that trained nothing (zero-shot) keeps no copy of the weights it was given
    # the final checkpoint's own write is outside `loop_seconds` (in the run's `seconds`)
    report({"final": True, **selected, **final, "loop_seconds": round(time.perf_counter() - loop_started, 2),
            "timings": {k: round(v, 2) for k, v in timings.items()},
            **{k: state[k] for k in curves}}, engine, dict(state), setup.tokenizer, weights=steps > 0)
