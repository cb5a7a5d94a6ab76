"""Recipe: few-shot fine-tuning (SMASH §4, LM-BFF protocol).

Methods (`method=`):
- `prompt`: prompt-based fine-tuning with the MLM head; the class score is the MLM logit of
  the class's label word at the mask; CE over classes, or for regression tasks (STS-B) the
  SMASH §3.1 KL objective between interpolated label-word probabilities and the gold score.
  With `teacher=` it is SMASH's "distill" baseline: plus `kd_weight` x eq. 1 between the
  teacher's and the student's vocabulary logits at the mask (same tokenizer needed).
- `prompt-tuning`: the same objective with the model frozen and only `prompt_tokens` soft
  prompt vectors trained (Lester et al. 2021; PPT, Gu et al. 2021, tunes 100 tokens at a
  constant lr 0.05; here the schedule is the loop's linear one). With `init=` a PPT run's
  `student` (`rayapp ppt`) it starts from the pre-trained
  soft prompt, which then sets the length; else from copies of the mask token's embedding.
- `classifier`: standard fine-tuning with a fresh classification head (baseline); MSE for
  regression.
- `zero-shot`: no training; prompt-based evaluation of the model as it is.

iPET (`rayapp/data/ipet.py`): `pattern=P` trains with the task's PET pattern P instead of its
template (`registry.PET_PATTERNS`); `extra_train=` adds a generation's labelled examples to the
split's train set; `soft_labels=` trains the final classifier (any method) on the ensemble's
logits over the unlabelled set instead of the train set, with PET's distillation loss (KL at
`soft_label_temperature`, as soft CE: the same gradient); selection and test stay the split's.

LM-BFF (`demonstrations=true`, `rayapp.data.demonstrations`): every prompt is followed by one
train example per class, drawn from the `demo_filter_rate` share of that class most similar to
the input by the SBERT `demo_model`, redrawn every step; dev and test predict from the mean
class log-probabilities of `demo_samples` drawn sets (`predict`). With `tasks_file=` pointing at
a `rayapp lmbff-search` output (`rayapp.tasks.search`) it is SMASH's LM-BFF row.

The shared loop (`rayapp.train.loop`) evaluates on the few-shot dev set every `eval_every`
steps, keeps the best model among those evaluations (LM-BFF selects among evaluations during
training; the step-0 evaluation is on the curve only) and evaluates it on test. The run's
record (`<output_dir>/records/<name>.json`) holds the config, the split's provenance, the dev
curve, best step, dev and test metrics and the best checkpoint.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from rayapp import storage
from rayapp.config import InputPath, ModelRef
from rayapp.data.demonstrations import LMBFF_SBERT, Demonstrations, check_sbert
from rayapp.data.fewshot import Example, FewShotSplit, load_lmbff, read_table
from rayapp.data.ipet import read_soft_labels
from rayapp.errors import ConfigError
from rayapp.modeling.models import (LogitsAt, check_model, load_classifier, load_mlm, load_tokenizer,
                                    load_soft_prompt, local_model_dir, portable_model, prompt_tuned)
from rayapp.recipes import objectives
from rayapp.tasks.metrics import compute_metric
from rayapp.tasks.prompts import PromptEncoder, Task, class_logits, predicted
from rayapp.tasks.registry import get_task, load_tasks, pet_pattern, with_prompt
from rayapp.train.config import TrainConfig
from rayapp.train.engine import global_batch_indices, shard, split_batch
from rayapp.train.loop import Setup
from rayapp.train.run import run_recipe
from rayapp.train.worker import worker


@dataclass
class FinetuneConfig(TrainConfig):
    task: str = "SST-2"
    model: ModelRef = "distilroberta-base"  # HF id or local dir of a masked LM (or T5: models.LogitsAt)
    init: ModelRef | None = None        # start from this checkpoint (rayapp run checkpoint or HF dir)
    method: Literal["prompt", "prompt-tuning", "classifier", "zero-shot"] = "prompt"
    prompt_tokens: int = 100            # prompt-tuning: soft prompt length (PPT's), unless init has one
    teacher: ModelRef | None = None     # prompt + KD from this teacher's logits (SMASH "distill")
    kd_weight: float = 1.0
    kd_temperature: float = 1.0
    tasks_file: InputPath | None = None  # YAML with extra (user-defined) tasks
    pattern: int | None = None          # iPET: the task's PET pattern (registry.PET_PATTERNS) as its prompt
    template: str | None = None         # this template instead of the task's (SMASH Fig. 3: LM-BFF's auto templates)
    verbalizer: dict[str, str] | None = None  # label -> word instead of the task's (Fig. 3: auto label words)
    extra_train: InputPath | None = None  # iPET: labelled examples (JSONL) added to the split's train set
    soft_labels: InputPath | None = None  # iPET's final classifier: train on these target logits (JSONL)
    soft_label_temperature: float = 2.0   # PET's distillation temperature
    data_dir: InputPath | None = None   # LM-BFF k-shot root (TASK/K-SEED/...); default: local assets
    k: int = 16
    seed: int = 13                      # few-shot split seed (13 21 42 87 100)
    max_length: int = 128
    lmbff_exact: bool = False           # LM-BFF's own prompt tokenisation rules (tasks.prompts.Task)
    # LM-BFF's demonstrations (rayapp.data.demonstrations): one train example per class after the input
    demonstrations: bool = False
    demo_model: ModelRef = LMBFF_SBERT  # the SBERT whose similarities pick them (local: all-MiniLM-L6-v2)
    demo_filter_rate: float = 0.5       # drawn from this share of each class's most similar examples
    demo_samples: int = 16              # demonstration sets averaged at dev/test (LM-BFF: 16; 4 for QQP, MNLI, SNLI)
    eval_batch_size: int = 32           # sequences per forward pass (with demonstrations: examples x demo_samples)
    # LM-BFF/SMASH defaults: batch 2-4, lr 1e-5..5e-5, 1000 steps, dev every 100
    batch_size: int = 2
    lr: float = 1e-5
    eval_every: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_positive("k", "eval_batch_size", "max_length", "prompt_tokens", "demo_samples")
        if not 0 < self.demo_filter_rate <= 1:
            raise ConfigError(f"demo_filter_rate={self.demo_filter_rate} must be in (0, 1]: the share of each class's "
                              "train examples, most similar first, that demonstrations are drawn from (LM-BFF: 0.5)")
        if self.demonstrations and (self.method == "classifier" or self.extra_train or self.soft_labels):
            raise ConfigError("demonstrations=true writes labelled train examples into the prompt (LM-BFF): it needs a "
                              "prompt method trained on the split's train set; drop method=classifier, extra_train= "
                              "and soft_labels=")
        if self.teacher and self.method not in ("prompt", "prompt-tuning"):
            raise ConfigError(f"teacher= (KD during prompt FT) needs method=prompt, got method={self.method}")
        if self.kd_temperature <= 0 or self.kd_weight < 0 or self.soft_label_temperature <= 0:
            raise ConfigError("kd_temperature and soft_label_temperature must be > 0 and kd_weight >= 0")
        if self.pattern is not None and (self.template or self.verbalizer):
            raise ConfigError("pattern= brings its own prompt: drop template=/verbalizer=, or pattern=")
        if self.soft_labels and (self.teacher or self.extra_train):
            raise ConfigError("soft_labels= trains on the ensemble's targets alone: drop teacher= and extra_train=")
        if self.method == "zero-shot":
            self.max_steps = 0

    def resolve_task(self) -> Task:
        task = with_prompt(find_task(self.task, self.tasks_file, self.lmbff_exact), self.template, self.verbalizer)
        if self.pattern is None:
            return task
        return pet_pattern(task, self.pattern, load_tasks(self.tasks_file) if self.tasks_file else None)

    @property
    def objective(self) -> str:
        if self.soft_labels:
            return "classifier-soft" if self.method == "classifier" else "prompt-soft"
        if self.method == "classifier":
            return "classifier"
        return "prompt+kd" if self.teacher else "prompt"


def find_task(name: str, tasks_file: str | None, lmbff_exact: bool) -> Task:
    """Task `name` (a user-defined one of `tasks_file` first, else built in), with LM-BFF's own
    tokenisation rules (`tasks.prompts`) when `lmbff_exact`."""
    extra = load_tasks(tasks_file) if tasks_file else {}
    task = extra[name] if name in extra else get_task(name)
    return dataclasses.replace(task, lmbff_exact=True) if lmbff_exact else task


def model_source(ref: str, is_init: bool) -> str:
    """Local directory (or hub id) of the weights to start from, on this worker's node. A
    rayapp checkpoint holds the HF model under `model/`; `s3://` ones are downloaded."""
    src = local_model_dir(ref)
    if storage.exists(storage.join(src, "model", "config.json")):
        return storage.join(src, "model")
    if is_init and not storage.exists(storage.join(src, "config.json")):
        raise ConfigError(f"init={ref!r} is neither an HF model directory nor a rayapp checkpoint (no config.json)")
    return src


# --- batches and evaluation ---------------------------------------------------------------

def gold_labels(task: Task, examples: list[Example]) -> torch.Tensor:
    """Class indices of `examples`, or their scores for a regression task."""
    if task.is_regression:
        return torch.tensor([float(e.label) for e in examples])
    return torch.tensor([task.label_index(e.label) for e in examples])


def make_batch(examples: list[Example], task: Task, tokenizer, encoder: PromptEncoder | None,
               max_length: int, demos: list | None = None) -> dict:
    """Inputs of `examples` (prompt or classifier), with `labels` unless they are unlabelled;
    `demos`: each example's demonstrations (`data.demonstrations`)."""
    texts_a = [e.text_a for e in examples]
    texts_b = [e.text_b for e in examples] if task.num_inputs == 2 else None
    if encoder is not None:
        batch = encoder.encode_batch(texts_a, texts_b, demos)
    else:  # classifier: the tokenizer's own sentence-pair encoding
        batch = dict(tokenizer(texts_a, texts_b, truncation=True, max_length=max_length, padding=True,
                               return_tensors="pt"))
    if examples[0].label is not None:
        batch["labels"] = gold_labels(task, examples)
    return batch


@torch.no_grad()
def predict(model, batch, task: Task, encoder: PromptEncoder | None, samples: int = 1) -> torch.Tensor:
    """Predicted class index, or score for regression tasks. A prompt batch may hold `samples`
    consecutive rows per example (its demonstration sets), predicted as LM-BFF's ensemble
    predicts: a class from the mean of the sets' class log-probabilities (LM-BFF averages the
    raw label-word logits, which differ from them by one shift per row: the same argmax), a
    regression score as the mean of the sets' scores."""
    if encoder is not None:
        logits = class_logits(objectives.at_mask(model, batch)[0], encoder.label_word_ids)
        sets = logits.log_softmax(-1).unflatten(0, (-1, samples))
        return predicted(sets, task).mean(1) if task.is_regression else predicted(sets.mean(1), task)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "mask_pos")}
    logits = model(**inputs).logits
    return logits.squeeze(-1) if task.is_regression else logits.argmax(-1)


def evaluate(model, examples: list[Example], task: Task, tokenizer, encoder, cfg: FinetuneConfig, device,
             demos: Demonstrations | None = None) -> float:
    """Metric over `examples`; each worker predicts a strided share and the shares are
    gathered, so evaluation also scales with the number of workers. Predictions do not depend
    on the batching: a row's padding is masked out. With `demos`, each example is predicted
    from its `demos.samples` demonstration sets (`predict`)."""
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    # batches of similar length (by characters, before tokenising): a batch pads to its
    # longest; in file order, batches of 32 padded the test sets of SST-2 (max_length 64) and
    # RTE (128) to 1.76x and 1.95x their tokens, sorted to 1.22x and 1.21x
    mine = sorted(range(rank, len(examples), world), key=lambda i: len(examples[i].text_a) + len(
        examples[i].text_b or ""))
    model.eval()
    preds, idx = [], []
    samples = demos.samples if demos is not None else 1
    per = max(1, cfg.eval_batch_size // samples)  # examples per forward pass, `samples` rows each
    for i in range(0, len(mine), per):
        chunk = mine[i:i + per]
        shown = None if demos is None else [d for j in chunk for d in demos.for_evaluation(examples[j], j)]
        batch = make_batch([examples[j] for j in chunk for _ in range(samples)], task, tokenizer, encoder,
                           cfg.max_length, shown)
        batch = {k: v.to(device) for k, v in batch.items()}
        preds += predict(model, batch, task, encoder, samples).float().cpu().tolist()
        idx += chunk
    gathered = [(idx, preds)]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, (idx, preds))
    order, values = zip(*sorted((i, p) for ids, ps in gathered for i, p in zip(ids, ps)))
    labels = gold_labels(task, [examples[i] for i in order]).tolist()
    return compute_metric(task.metric, list(values), labels)


# --- the recipe -------------------------------------------------------------------------

def setup(cfg: FinetuneConfig, inputs: dict, device) -> Setup:
    split: FewShotSplit = inputs["split"]
    task: Task = inputs["task"]
    src = model_source(inputs["model_ref"], cfg.init is not None)
    tokenizer = load_tokenizer(src)
    if cfg.method == "classifier":
        model, encoder = load_classifier(src, 1 if task.is_regression else len(task.labels)), None
    else:
        mlm = load_mlm(src)
        # any other method takes the model as it is, with its soft prompt if it has one (PPT zero-shot)
        model = (prompt_tuned(mlm, tokenizer, cfg.prompt_tokens, src) if cfg.method == "prompt-tuning"
                 else LogitsAt(mlm, load_soft_prompt(src)))
        encoder = PromptEncoder(tokenizer, task, cfg.max_length, cfg.demonstrations)
    demos = None if not cfg.demonstrations else Demonstrations.build(
        task, split, inputs["demo_ref"], cfg.demo_filter_rate, cfg.demo_samples, cfg.train_seed, device)
    teacher = None
    if cfg.teacher:
        teacher = LogitsAt(load_mlm(local_model_dir(inputs["teacher_ref"]))).to(device).eval().requires_grad_(False)
    rank, world = worker().rank, worker().world_size

    train, soft = inputs["train"], inputs.get("soft_logits")

    def batch_of(ids: list[int], step: int) -> dict:
        shown = None if demos is None else [demos.for_training(i, step) for i in ids]
        batch = make_batch([train[i] for i in ids], task, tokenizer, encoder, cfg.max_length, shown)
        return batch if soft is None else {**batch, "soft_logits": soft[ids]}

    def batches(first_step: int, micro: int, accum: int):
        step = first_step
        while True:  # the data of step s is a function of s: resume needs no bookkeeping
            ids = shard(global_batch_indices(len(train), cfg.batch_size, step, cfg.train_seed), rank, world)
            yield [batch_of(ids[j:j + micro], step) for j in range(0, len(ids), micro)]
            step += 1

    def score(model, examples):
        return evaluate(model, examples, task, tokenizer, encoder, cfg, device, demos)

    ctx = objectives.Context(cfg, task, encoder.label_word_ids if encoder else None)
    return fewshot_setup(model, objectives.bind(cfg.objective, teacher, ctx), batches, score, split, tokenizer,
                         f"{cfg.method} {task.name}")


def fewshot_setup(model, objective, batches, score, split: FewShotSplit, tokenizer, desc: str,
                  **final) -> Setup:
    """LM-BFF's protocol around any few-shot objective: select the checkpoint by `score` on
    the split's dev set, report `score` on its test set at the end (plus `final` stats)."""
    return Setup(
        model=model, objective=objective, batches=batches,
        evaluate=lambda m: {"dev": score(m, split.dev)},
        select="dev",
        finish=lambda m: {"test": score(m, split.test) if split.test else None, **final},
        tokenizer=tokenizer, desc=desc,
    )


def check_models(cfg: FinetuneConfig, task: Task) -> None:
    """Driver-side, before Ray starts (a run's, or a sweep's for every trial): the model fits
    the method and the task's prompt (single-token label words, the template within
    max_length), the teacher shares its vocabulary, the SBERT of demonstrations loads."""
    check_model(cfg.init or cfg.model, mlm=cfg.method != "classifier",
                prompt=(task, cfg.max_length, cfg.demonstrations) if cfg.method != "classifier" else None,
                soft_prompt=cfg.prompt_tokens if cfg.method == "prompt-tuning" else 0,
                needs_mlm="demonstrations=true closes each demonstration with a separator token ([SEP], </s>), "
                "which T5 has none of" if cfg.demonstrations else None)
    if cfg.teacher:
        check_model(cfg.teacher)
        check_same_vocabulary(cfg.init or cfg.model, cfg.teacher)
    if cfg.demonstrations:
        check_sbert(cfg.demo_model)


def run(cfg: FinetuneConfig, split: FewShotSplit | None = None, callbacks=()) -> dict:
    """Fine-tune (or evaluate) one task/split; returns the run's record."""
    task = cfg.resolve_task()
    if task.multi_token and cfg.teacher:
        raise ConfigError(f"task {task.name} has multi_token: true; KD from teacher= compares vocabulary "
                          "distributions at one mask, so it needs label words of one token each")
    split_batch(cfg.batch_size, cfg.engine.num_workers, cfg.engine.max_device_batch)  # fail before launching
    check_models(cfg, task)
    split = split or load_lmbff(cfg.data_dir, task, k=cfg.k, seed=cfg.seed)
    inputs = {"task": task, "split": split, "model_ref": portable_model(cfg.init or cfg.model),
              "teacher_ref": portable_model(cfg.teacher) if cfg.teacher else None, "train": split.train,
              "demo_ref": portable_model(cfg.demo_model) if cfg.demonstrations else None}
    extra = {"task": task.name, "method": cfg.method, "metric": task.metric, "k": cfg.k, "seed": cfg.seed,
             "split": split.source}
    if cfg.extra_train:  # iPET: T plus a generation's labelled examples
        inputs["train"] = split.train + read_table(cfg.extra_train, None, task)
        extra["extra_train"] = {"uri": cfg.extra_train, "examples": len(inputs["train"]) - len(split.train)}
    if cfg.soft_labels:  # iPET's final classifier: the ensemble's targets instead of T
        inputs["train"], inputs["soft_logits"] = read_soft_labels(cfg.soft_labels, len(task.labels))
        extra["soft_labels"] = {"uri": cfg.soft_labels, "examples": len(inputs["train"])}
    return run_recipe("finetune", cfg, setup, inputs, extra, callbacks=callbacks,
                      prefix=f"{cfg.method}-{task.name}-{cfg.k}-{cfg.seed}", keep_checkpoints=1,
                      derive=lambda record: few_shot_summary(record, cfg))


def few_shot_summary(record: dict, cfg) -> dict:
    """The few-shot protocol's numbers: dev curve, best dev (selection) and its test. A run
    of 0 steps (zero-shot) saved no copy of its model: its checkpoint is the model it evaluated.
    Every few-shot recipe's record (finetune, SetFit) takes these keys from it."""
    out = {"dev_curve": [[step, m["dev"]] for step, m in record["evals"]],
           "best_dev": record["best"], "test": record["metrics"].get("test")}
    if record["checkpoint"] is None:
        out["checkpoint"] = getattr(cfg, "init", None) or cfg.model
    return out


def check_same_vocabulary(student: str, teacher: str) -> None:
    """Eq. 1 sums over one vocabulary: KD at the mask needs the student's tokenizer."""
    s, t = load_tokenizer(local_model_dir(student)), load_tokenizer(local_model_dir(teacher))
    if s.get_vocab() != t.get_vocab():
        raise ConfigError(f"teacher {teacher} and student {student} have different vocabularies ({len(t)} vs "
                          f"{len(s)} tokens): soft CE over the vocabulary (SMASH eq. 1) needs the same tokenizer "
                          "(e.g. roberta-large -> distilroberta-base)")
