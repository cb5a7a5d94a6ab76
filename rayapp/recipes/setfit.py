"""SetFit (Tunstall et al. 2022, "Efficient Few-Shot Learning Without Prompts"): the peer a
practitioner picks instead of a prompt-based student, as a rayapp recipe so it runs in the
same sweeps, on the same LM-BFF splits, with the same records and report rows (issue 29).

- `method=setfit`: SetFit's two phases, by the `setfit` library itself (`pip install
  rayapp[setfit]`): the sentence-transformer body is fine-tuned contrastively on pairs
  drawn from the few-shot train set (`num_iterations` positive and negative pairs per
  example, CosineSimilarityLoss), then a logistic-regression head is fit on its embeddings.
  Defaults are the paper's (§4 / App. A): 20 iterations, 1 epoch, batch 16, body lr 2e-5.
- `method=distill`: SetFit's distillation (paper §6, `setfit.DistillationTrainer`): a
  student body learns, on unlabelled in-domain text (`unlabelled` sentences drawn from the
  task's pool, as Prompt-Distiller draws its set: `rayapp.data.unlabelled`), to reproduce
  the cosine similarities of a SetFit teacher's embeddings; its head is fit on the
  teacher's labels of that text. `teacher` is a SetFit model folder: in a sweep
  `{best:setfit}`, the best-dev SetFit run on the same task and split.

Where this differs from the paper, and why:
- Selection. The paper reports a fixed configuration; here, as for every method of a
  rayapp sweep, the grid point is chosen by dev accuracy on the split's dev set (LM-BFF's
  protocol), and test is reported for that point.
- The local body is `all-MiniLM-L6-v2` (the paper's is `paraphrase-mpnet-base-v2`). Its
  folder here has no `modules.json`, so sentence-transformers builds mean pooling without
  the normalisation the hub model has; a hub id gets the model's own modules.
- The `setfit` Trainer's `metric="accuracy"` loads the metric from the hub; the task's own
  metric (`rayapp.tasks.metrics`) is used instead.

The run is one process: the loop runs as the local launcher's one worker (in a sweep, in
the trial's actor), reports its dev and test through the same seam as every recipe
(`rayapp.train.worker`), and its checkpoint is the SetFit model folder
(`SetFitModel.from_pretrained` loads `<checkpoint>`). A SetFit run is minutes: a killed run
starts again rather than resuming mid-training.
"""
from __future__ import annotations

import importlib.util
import math
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from rayapp.config import InputPath, ModelRef
from rayapp.errors import ConfigError
from rayapp.train.config import TrainConfig


@dataclass
class SetFitConfig(TrainConfig):
    task: str = "SST-2"
    model: ModelRef = "sentence-transformers/paraphrase-mpnet-base-v2"  # the body (SetFit's default)
    method: Literal["setfit", "distill"] = "setfit"
    teacher: ModelRef | None = None      # distill: a SetFit model folder (a setfit run's checkpoint)
    unlabelled: int = 1000               # distill: sentences drawn from the task's pool
    pool: InputPath | None = None        # distill: the unlabelled pool (default: the task's LM-BFF pool)
    tasks_file: InputPath | None = None
    data_dir: InputPath | None = None    # LM-BFF k-shot root; default: local assets
    k: int = 16
    seed: int = 13                       # few-shot split seed
    num_iterations: int = 20             # pairs per example per class (SetFit's pair sampling)
    num_epochs: int = 1
    max_length: int | None = None        # None: the body's own
    # SetFit's defaults: batch 16, body lr 2e-5; max_steps 0 = num_epochs over the pairs
    batch_size: int = 16
    lr: float = 2e-5
    max_steps: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_positive("k", "num_iterations", "num_epochs", "unlabelled")
        if (self.method == "distill") != (self.teacher is not None):
            raise ConfigError("method=distill needs teacher=<a SetFit model folder>, and only it takes one "
                              f"(got method={self.method}, teacher={self.teacher!r})")
        if self.engine.num_workers != 1 or self.engine.engine != "ddp" or self.engine.launcher != "auto":
            raise ConfigError("SetFit trains in one process (the setfit library's own trainer): leave engine at "
                              "num_workers=1, engine=ddp, launcher=auto")


def _texts(examples) -> list[str]:
    """SetFit embeds one text per example: a sentence pair joins its two sentences."""
    return [e.text_a if e.text_b is None else f"{e.text_a} {e.text_b}" for e in examples]


def _setfit_loop(loop_cfg: dict) -> None:
    """Both SetFit phases, then dev and test with the task's metric; one final report with the
    model as its checkpoint."""
    import datasets
    from setfit import DistillationTrainer, SetFitModel, Trainer, TrainingArguments

    from rayapp.modeling.models import local_model_dir
    from rayapp.tasks.metrics import compute_metric
    from rayapp.train.worker import worker

    started = time.perf_counter()
    cfg: SetFitConfig = loop_cfg["cfg"]
    task, split = loop_cfg["task"], loop_cfg["split"]
    labels = {label: i for i, label in enumerate(task.labels)}
    model = SetFitModel.from_pretrained(local_model_dir(loop_cfg["model_ref"]))
    if cfg.max_length is not None:
        model.model_body.max_seq_length = cfg.max_length
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, batch_size=cfg.batch_size, num_epochs=cfg.num_epochs,
                                 num_iterations=cfg.num_iterations, body_learning_rate=cfg.lr,
                                 max_steps=cfg.max_steps or -1, seed=cfg.train_seed, report_to="none",
                                 save_strategy="no", show_progress_bar=False, logging_strategy="no")
        if cfg.method == "setfit":
            train = datasets.Dataset.from_dict({"text": _texts(split.train),
                                                "label": [labels[e.label] for e in split.train]})
            trainer = Trainer(model=model, args=args, train_dataset=train)
        else:
            teacher = SetFitModel.from_pretrained(local_model_dir(loop_cfg["teacher_ref"]))
            trainer = DistillationTrainer(teacher_model=teacher, student_model=model, args=args,
                                          train_dataset=datasets.Dataset.from_dict({"text": loop_cfg["unlabelled"]}))
        trainer.train()
    steps = trainer.st_trainer.state.global_step  # the body's optimizer steps (its sentence-transformers trainer)
    metrics = {}
    for name, examples in (("dev", split.dev), ("test", split.test)):
        predicted = np.asarray(model.predict(_texts(examples), as_numpy=True))
        metrics[name] = compute_metric(task.metric, predicted, np.array([labels[e.label] for e in examples]))
    steps = max(steps, 1)  # the head was fit even where the body took no step
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(f"{tmp}/model")
        worker().report({"final": True, **metrics, "step": steps, "best": metrics["dev"], "best_step": steps,
                         "evals": [[steps, {"dev": metrics["dev"]}]], "loss_curve": [],
                         "loop_seconds": round(time.perf_counter() - started, 2)}, tmp)


def run(cfg: SetFitConfig, callbacks=()) -> dict:
    """One SetFit (or SetFit distillation) run on one task and split; returns its record."""
    from rayapp.data.fewshot import load_lmbff
    from rayapp.data.unlabelled import draw_unlabelled
    from rayapp.modeling.models import portable_model
    from rayapp.recipes.finetune import few_shot_summary, find_task
    from rayapp.train.run import run_recipe

    if importlib.util.find_spec("setfit") is None:
        raise ConfigError("the SetFit recipe needs the setfit extra: pip install 'rayapp[setfit]'")
    task = find_task(cfg.task, cfg.tasks_file, False)
    if task.is_regression:
        raise ConfigError(f"task {task.name} is a regression task; SetFit's head is a classifier")
    split = load_lmbff(cfg.data_dir, task, k=cfg.k, seed=cfg.seed)
    inputs = {"task": task, "split": split, "model_ref": portable_model(cfg.model),
              "teacher_ref": portable_model(cfg.teacher) if cfg.teacher else None}
    if cfg.method == "distill":
        drawn = draw_unlabelled(split, task, n=math.ceil(cfg.unlabelled / max(1, len(split.train))), pool=cfg.pool)
        inputs["unlabelled"] = _texts(drawn.examples)[:cfg.unlabelled]
    extra = {"task": task.name, "method": f"setfit-{cfg.method}" if cfg.method != "setfit" else "setfit",
             "metric": task.metric, "k": cfg.k, "seed": cfg.seed, "split": split.source}
    return run_recipe("setfit", cfg, None, inputs, extra, callbacks=callbacks, loop=_setfit_loop,
                      prefix=f"{cfg.method}-{task.name}-{cfg.k}-{cfg.seed}", keep_checkpoints=1,
                      derive=lambda record: few_shot_summary(record, cfg))
