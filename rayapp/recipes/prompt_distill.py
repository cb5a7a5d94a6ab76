"""Recipe: Prompt-Distiller (PD) and the baselines of its Table 1.

Prompt-Distiller (`method=prompt-distiller`, PD §2): a small student S learns from two
frozen teachers, T' (a pre-trained MLM, `teacher`) and T (T' prompt-tuned PET-style on the
K-shot train set X, `tuned_teacher`), with the objective of PD eq. 8:

    L = L_MLM(X) + lambda1 (L_KD(X; T) + L_KD(X~; T')) + lambda2 (L_CPD(X; T) + L_CPD(X~; T'))

(`rayapp.losses`, eq. 1-8; `rayapp.recipes.objectives.prompt_distiller_objective`).

- T: given as `tuned_teacher` (a rayapp checkpoint or HF dir; a sweep passes
  `{best:teacher-pt}`, the best-dev prompt FT run of T' on the same split), or else trained
  here by the finetune recipe (prompt FT of T' on X, best on dev) under
  `<output_dir>/teachers/` with a config-derived name, so every student method of the same
  (task, split, teacher settings) reuses it. FT-paradigm baselines use a classifier-tuned T'
  the same way.
- X~ (`rayapp.data.unlabelled`): n |X| examples of the task's train pool, disjoint from the
  split; its pseudo-labels are T''s zero-shot predictions with the task's prompt (eq. 7's
  negatives); the record says how many agree with the hidden gold labels.
- Probes (`rayapp.modeling.probes`): trained once per run on X (best on dev) for T, T' and the
  initial student, frozen; saved under `<output_dir>/<name>/probes/`; per-layer dev accuracy
  in the record.
- Teachers are frozen, so their label-word scores and probe outputs on X and X~ are computed
  once in `setup` and travel with the batches: training runs the student only. All PD terms
  are distributions over the task's labels, so T'/T and S may have different tokenizers.
- Each step sees `batch_size` examples of X and `batch_size` of X~ (one forward). Negatives
  for eq. 6-7: other-(pseudo-)label examples of the batch; an example with none gets its
  negatives from a bank drawn each step: one cached teacher-probe output per class of the
  same set (X for eq. 6, X~ for eq. 7).

Ablations (PD Table 2): `contrastive=false` (no L_CPD terms), `unlabelled=false` (no X~
terms), both. `method=prompt-kd` (Table 1's Prompt-KD: "distills the logits of the teacher
MLM head without unlabeled data and contrastive learning") is exactly PD with both off:
L_MLM + lambda1 L_KD(X) on the label-word logits.

FT-paradigm baselines (Table 1, classification head, teacher = T' fine-tuned as a
classifier): `vanilla-kd` (Hinton et al.: (1-w) CE + w T^2 soft CE), `bert-pkd` (+ PKD-Skip's
normalised [CLS] patient loss) and `tinybert` (+ hidden-state and attention MSE through the
uniform layer map, one stage; see the objectives' docstrings for what changes when the
tokenizers differ). Teacher/student FT/PT rows are finetune runs (sweep methods).

Where we differ from the paper (the paper does not say): the probe architecture
(`modeling.probes`), how alpha is applied (`losses.kd_ce`: alpha softens the teacher only, as
eq. 3-4 print it; `kd_form=hinton` softens both sides and scales by alpha^2 instead), the
negative pairs and the bank (`losses.contrastive_probe_loss`), X~ drawn without replacement
(`data.unlabelled`), and the prompts:

Prompts. PD §3.1 "keep[s] all the prompts to be the same as in PET [4]", but PET's paper
(Schick & Schütze 2021) gives patterns for Yelp, AG's News, Yahoo, MNLI and X-Stance only: of
PD's eight tasks only MNLI has one. rayapp uses the task registry's prompts for every task:
LM-BFF's manual templates and verbalizers (Gao et al. 2021, whose splits and protocol PD
follows); MNLI's `x0? <mask>, x1` over Yes/Maybe/No is also one of PET's MNLI patterns. With
`lmbff_exact=true` the prompts are tokenised by LM-BFF's own rules too (`tasks.prompts`), for
the student, T' and the tuning of T alike; a PET pattern can be given as a task of
`tasks_file`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch

from rayapp import storage
from rayapp.config import InputPath, ModelRef, Overrides, build
from rayapp.data.fewshot import Example, FewShotSplit, load_lmbff
from rayapp.data.unlabelled import UnlabelledSet, default_pool, draw_unlabelled, pseudo_label_agreement
from rayapp.errors import ConfigError
from rayapp.modeling.models import (LogitsAt, check_model, load_classifier, load_mlm, load_tokenizer,
                                    portable_model, vocab_fingerprint)
from rayapp.modeling.probes import LayerProbes, fit_probes, frozen_outputs, save_probes
from rayapp.recipes import objectives
from rayapp.recipes.finetune import FinetuneConfig, evaluate, fewshot_setup, find_task, make_batch, model_source
from rayapp.tasks.prompts import PromptEncoder, Task
from rayapp.train.config import TrainConfig
from rayapp.train.engine import global_batch_indices, shard, split_batch
from rayapp.train.loop import Setup
from rayapp.train.launch import nested
from rayapp.train.records import record_uri, run_name
from rayapp.train.run import run_recipe
from rayapp.train.worker import worker

PROMPT_METHODS = ("prompt-distiller", "prompt-kd")
FT_METHODS = ("vanilla-kd", "bert-pkd", "tinybert")


@dataclass
class PromptDistillConfig(TrainConfig):
    task: str = "SST-2"
    method: Literal["prompt-distiller", "prompt-kd", "vanilla-kd", "bert-pkd", "tinybert"] = "prompt-distiller"
    model: ModelRef = "prajjwal1/bert-small"  # the student S: HF id or local dir of a masked LM
    teacher: ModelRef = "roberta-large"  # T', the pre-trained teacher (a masked LM with its head)
    tuned_teacher: ModelRef | None = None  # T; None: tuned here from T' by the finetune recipe, cached
    teacher_config: Annotated[dict, Overrides(FinetuneConfig)] = field(default_factory=dict)  # FinetuneConfig fields for tuning T here
    tasks_file: InputPath | None = None
    data_dir: InputPath | None = None    # LM-BFF k-shot root; default: local assets
    k: int = 16
    seed: int = 13                       # few-shot split seed (13 21 42 87 100)
    max_length: int = 128
    lmbff_exact: bool = False            # LM-BFF's own prompt tokenisation rules, for T's tuning too (module docstring)
    eval_batch_size: int = 32
    # PD eq. 3-8 and §3.1 defaults
    alpha: float = 10.0                  # KD temperature on the teachers' label-word logits
    kd_form: Literal["paper", "hinton"] = "paper"  # eq. 3-4 as printed (alpha on T only) or both x alpha^2 (losses.kd_ce)
    lambda1: float = 0.2                 # weight of the KD terms
    lambda2: float = 0.2                 # weight of the contrastive terms
    n: int = 10                          # |X~| = n |X|
    unlabelled_pool: InputPath | None = None  # table X~ is drawn from; default the LM-BFF pool beside data_dir
    contrastive: bool = True             # False: PD w/o contrastive learning (Table 2)
    unlabelled: bool = True              # False: PD w/o unlabelled data (Table 2)
    probe_steps: int = 200
    probe_lr: float = 1e-3
    # FT-paradigm baselines
    kd_weight: float = 0.5               # w in (1-w) CE + w KD
    kd_temperature: float = 2.0
    pkd_beta: float = 100.0              # BERT-PKD's patient-loss weight
    batch_size: int = 4
    lr: float = 1e-5
    max_steps: int = 1000
    eval_every: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_positive("k", "eval_batch_size", "max_length", "probe_steps")
        if not self.alpha > 0:
            raise ConfigError(f"alpha (the KD temperature of PD eq. 3-4) must be > 0, got {self.alpha}; the paper uses 10")
        if self.lambda1 < 0 or self.lambda2 < 0:
            raise ConfigError(f"lambda1 and lambda2 (PD eq. 8) must be >= 0, got lambda1={self.lambda1}, "
                              f"lambda2={self.lambda2}; the paper uses 0.2")
        if self.n < 1:
            raise ConfigError(f"n (|X~| = n |X|) must be >= 1, got {self.n}; the paper uses 10")
        if not 0 <= self.kd_weight <= 1 or self.kd_temperature <= 0 or self.pkd_beta < 0 or self.probe_lr <= 0:
            raise ConfigError("kd_weight must be in [0, 1], kd_temperature and probe_lr > 0, pkd_beta >= 0")
        if self.method == "prompt-kd":  # Prompt-KD is PD without X~ and without L_CPD
            self.unlabelled = self.contrastive = False

    def resolve_task(self) -> Task:
        return find_task(self.task, self.tasks_file, self.lmbff_exact)

    @property
    def variant(self) -> str:
        """The method as the record names it (Table 1/2 row)."""
        if self.method != "prompt-distiller":
            return self.method
        if not (self.contrastive or self.unlabelled):
            return "prompt-kd"
        return "prompt-distiller" + ("" if self.contrastive else "-no-contrastive") + ("" if self.unlabelled else "-no-unlabelled")

    @property
    def teacher_method(self) -> str:
        """How T is tuned from T': prompt FT for the PT paradigm, a classifier for FT."""
        return "prompt" if self.method in PROMPT_METHODS else "classifier"


# --- teachers --------------------------------------------------------------------------

def check_mlm_head(mlm, info: dict, name: str) -> None:
    """T' predicts label words zero-shot (eq. 4, 7) and every probe starts from a model's MLM
    head: a checkpoint without trained head weights (an encoder such as a sentence-transformers
    model, which `AutoModelForMaskedLM` completes with a random head) cannot be a teacher."""
    missing = [k for k in info.get("missing_keys", []) if k.split(".")[0] in ("cls", "lm_head")
               and not k.endswith("decoder.weight")]  # the decoder is tied to the input embeddings
    if missing:
        raise ConfigError(f"{name} has no trained MLM head (its checkpoint lacks {missing[0]} and {len(missing) - 1} "
                          "more head weights): Prompt-Distiller's teachers score label words with their MLM head; "
                          "give a masked LM saved with its head (e.g. roberta-large)")


def load_frozen_mlm(ref: str, name: str, device):
    mlm, info = load_mlm(ref, output_loading_info=True)
    check_mlm_head(mlm, info, name)
    return LogitsAt(mlm).to(device).eval().requires_grad_(False)


def tuned_teacher(cfg: PromptDistillConfig, split: FewShotSplit, callbacks=()) -> str:
    """T: `cfg.tuned_teacher`, or T' tuned on X by the finetune recipe (best on dev), cached
    under `<output_dir>/teachers/` by its config: a second student method of the same
    (task, split, teacher settings) finds the record and reuses the checkpoint. `callbacks`
    are the PD run's: in a sweep trial T is tuned in the trial's process (`launch.nested`).
    In a sweep, T is better a method of its own (`tuned_teacher: "{best:teacher-pt}"`): two
    trials of one split tuning the same T at once would write the same run folder."""
    if cfg.tuned_teacher:
        return cfg.tuned_teacher
    from rayapp.recipes import finetune

    fields = {"task": cfg.task, "tasks_file": cfg.tasks_file, "data_dir": cfg.data_dir, "k": cfg.k, "seed": cfg.seed,
              "max_length": cfg.max_length, "lmbff_exact": cfg.lmbff_exact, "eval_batch_size": cfg.eval_batch_size, "model": cfg.teacher,
              "method": cfg.teacher_method, "output_dir": storage.join(cfg.output_dir, "teachers"),
              **cfg.teacher_config}
    fcfg = build(FinetuneConfig, fields)
    fcfg.engine = cfg.engine
    fcfg.name = fcfg.name or run_name(f"teacher-{fcfg.method}-{split.task}-{cfg.k}-{cfg.seed}", fcfg)
    cached = record_uri(fcfg.output_dir, fcfg.name)
    if storage.exists(cached):
        return json.loads(storage.read_text(cached))["checkpoint"]
    return finetune.run(fcfg, split, callbacks=nested(callbacks))["checkpoint"]


# --- the per-worker setup ------------------------------------------------------------------

def _labels(task: Task, examples: list[Example]) -> torch.Tensor:
    return torch.tensor([task.label_index(e.label) for e in examples])


def _prompt_batches(encoder: PromptEncoder, examples: list[Example], size: int):
    two = encoder.task.num_inputs == 2
    for i in range(0, len(examples), size):
        chunk = examples[i:i + size]
        yield encoder.encode_batch([e.text_a for e in chunk], [e.text_b for e in chunk] if two else None)


def frozen_view(model: LogitsAt, encoder: PromptEncoder, sets: dict[str, list[Example]], split: FewShotSplit,
                cfg: PromptDistillConfig, probes: bool, name: str) -> dict:
    """A frozen model's eq. 1 label-word scores on each of `sets`, and with `probes` its layer
    probes trained on X (best on dev) and their class probabilities on each set."""
    task = encoder.task
    layers = list(range(1, model.mlm.config.num_hidden_layers)) if probes else []
    passes = {key: frozen_outputs(model, _prompt_batches(encoder, exs, cfg.eval_batch_size), encoder.label_word_ids, layers)
              for key, exs in {"train": split.train, "dev": split.dev, **sets}.items()}
    view = {"scores": {key: scores for key, (scores, _) in passes.items()}}
    if probes:
        heads = LayerProbes.from_mlm(model.mlm, encoder.label_word_ids, name).cpu()  # trained on the cached states
        view["probe_dev_acc"] = fit_probes(heads, passes["train"][1], _labels(task, split.train), passes["dev"][1],
                                           _labels(task, split.dev), steps=cfg.probe_steps, lr=cfg.probe_lr,
                                           seed=cfg.train_seed)
        with torch.no_grad():
            view["probe_probs"] = {key: heads.probs(states) for key, (_, states) in passes.items()}
        view["probes"] = heads
    return view


def _bank(probs: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One random example per (pseudo-)label present: negatives for batch rows that have none."""
    picks = [rows[torch.randint(len(rows), (1,), generator=gen)]
             for rows in (torch.nonzero(labels == c).flatten() for c in labels.unique())]
    idx = torch.cat(picks)
    return probs[idx], labels[idx]


def _save_probes(views: dict[str, dict], run_dir: str, models: dict[str, str]) -> None:
    if worker().rank != 0:
        return
    for key, view in views.items():
        if "probes" in view:
            save_probes(view["probes"], storage.join(run_dir, "probes", f"{key}.pt"),
                        {"model": models[key], "layers": view["probes"].layers, "dev_acc": view["probe_dev_acc"]})


def _step_rows(n: int, cfg: PromptDistillConfig, step: int, seed_offset: int) -> list[int]:
    ids = global_batch_indices(n, cfg.batch_size, step, cfg.train_seed + seed_offset)
    return shard(ids, worker().rank, worker().world_size)


def _setup_prompt(cfg: PromptDistillConfig, inputs: dict, device) -> Setup:
    split, task, xu = inputs["split"], inputs["task"], inputs["unlabelled"]
    x = split.train
    y = _labels(task, x)
    sets = {"xu": xu.examples} if cfg.unlabelled else {}

    t_src = model_source(inputs["tuned_ref"], True)
    tuned = load_frozen_mlm(t_src, "the prompt-tuned teacher T", device)
    t_enc = PromptEncoder(load_tokenizer(t_src), task, cfg.max_length)  # T' has T's tokenizer
    views = {"teacher": frozen_view(tuned, t_enc, {}, split, cfg, cfg.contrastive, "T")}
    del tuned
    stats = {}
    if cfg.unlabelled:
        pre = load_frozen_mlm(model_source(inputs["teacher_ref"], False), f"teacher {cfg.teacher!r} (T')", device)
        views["pretrained_teacher"] = frozen_view(pre, t_enc, sets, split, cfg, cfg.contrastive, "T'")
        del pre
        pseudo = views["pretrained_teacher"]["scores"]["xu"].argmax(-1)
        stats["pseudo_labels"] = pseudo_label_agreement(pseudo.tolist(), xu.hidden_labels, task)
    s_src = model_source(inputs["model_ref"], False)
    tokenizer = load_tokenizer(s_src)
    encoder = PromptEncoder(tokenizer, task, cfg.max_length)
    student = LogitsAt(load_mlm(s_src)).to(device)
    probes = None
    if cfg.contrastive:
        student.eval()
        views["student"] = frozen_view(student, encoder, {}, split, cfg, True, "the student")
        probes = views["student"]["probes"].to(device)
    _save_probes(views, inputs["run_dir"], {"teacher": inputs["tuned_ref"], "pretrained_teacher": cfg.teacher,
                                            "student": cfg.model})
    stats["probe_dev_acc"] = {key: v["probe_dev_acc"] for key, v in views.items() if "probe_dev_acc" in v}
    teacher_view = views["teacher"]
    pre_view = views.get("pretrained_teacher")

    def micro_batch(ids: list[int], uids: list[int], gen: torch.Generator) -> dict:
        rows = [x[i] for i in ids] + [xu.examples[j] for j in uids]
        two = task.num_inputs == 2
        b = encoder.encode_batch([e.text_a for e in rows], [e.text_b for e in rows] if two else None)
        b["labels"] = y[ids]
        b["t_scores"] = teacher_view["scores"]["train"][ids]
        if cfg.unlabelled:
            b["u_t_scores"] = pre_view["scores"]["xu"][uids]
            b["u_pseudo"] = pseudo[uids]
        if cfg.contrastive:
            b["t_probes"] = teacher_view["probe_probs"]["train"][ids]
            b["bank_probes"], b["bank_labels"] = _bank(teacher_view["probe_probs"]["train"], y, gen)
            if cfg.unlabelled:
                b["u_t_probes"] = pre_view["probe_probs"]["xu"][uids]
                b["u_bank_probes"], b["u_bank_labels"] = _bank(pre_view["probe_probs"]["xu"], pseudo, gen)
        return b

    def batches(first_step: int, micro: int, accum: int):
        step = first_step
        while True:  # the data of step s is a function of s: resume needs no bookkeeping
            ids = _step_rows(len(x), cfg, step, 0)
            uids = _step_rows(len(xu.examples), cfg, step, 1) if cfg.unlabelled else []
            gen = torch.Generator().manual_seed(cfg.train_seed * 1_000_003 + step)
            yield [micro_batch(ids[j:j + micro], uids[j:j + micro], gen) for j in range(0, len(ids), micro)]
            step += 1

    def score(model, examples):
        return evaluate(model, examples, task, tokenizer, encoder, cfg, device)

    ctx = objectives.PDContext(cfg, task, encoder.label_word_ids, probes=probes)
    return fewshot_setup(student, objectives.bind("prompt-distiller", None, ctx), batches, score, split, tokenizer,
                         f"{cfg.variant} {task.name}", **stats)


class HintStudent(torch.nn.Module):
    """A sequence classifier whose hidden states come out projected to the teacher's width
    (TinyBERT's learned W_h; the identity when the widths agree), for the hint losses of the
    FT baselines. `mlm` is the HF model: the engine exports `module.mlm` (W_h is a training
    aid: it is not exported, and a resumed run starts it afresh)."""

    def __init__(self, classifier, teacher_hidden: int):
        super().__init__()
        self.mlm = classifier
        width = classifier.config.hidden_size
        self.proj = torch.nn.Identity() if width == teacher_hidden else torch.nn.Linear(width, teacher_hidden)

    def forward(self, **inputs):
        out = self.mlm(**inputs)
        if out.hidden_states is not None:
            out.hidden_states = tuple(self.proj(h) for h in out.hidden_states)
        return out


def ft_classifier(src: str, task: Task, method: str):
    """A classifier of `task` for the FT baselines; TinyBERT's attention loss needs the
    attention maps, which only the eager attention returns (sdpa gives none)."""
    model = load_classifier(src, len(task.labels))
    if method == "tinybert":
        model.set_attn_implementation("eager")
    return model


def _setup_ft(cfg: PromptDistillConfig, inputs: dict, device) -> Setup:
    split, task = inputs["split"], inputs["task"]
    t_src, s_src = model_source(inputs["tuned_ref"], True), model_source(inputs["model_ref"], False)
    t_tok, tokenizer = load_tokenizer(t_src), load_tokenizer(s_src)
    teacher = ft_classifier(t_src, task, cfg.method).to(device).eval().requires_grad_(False)
    student = HintStudent(ft_classifier(s_src, task, cfg.method), teacher.config.hidden_size)

    def micro_batch(examples: list[Example]) -> dict:
        b = make_batch(examples, task, tokenizer, None, cfg.max_length)
        t = make_batch(examples, task, t_tok, None, cfg.max_length)
        b["t_input_ids"], b["t_attention_mask"] = t["input_ids"], t["attention_mask"]
        return b

    def batches(first_step: int, micro: int, accum: int):
        step = first_step
        while True:
            ids = _step_rows(len(split.train), cfg, step, 0)
            yield [micro_batch([split.train[i] for i in ids[j:j + micro]]) for j in range(0, len(ids), micro)]
            step += 1

    def score(model, examples):
        return evaluate(model.mlm, examples, task, tokenizer, None, cfg, device)

    ctx = objectives.PDContext(cfg, task, same_tokenizer=vocab_fingerprint(t_tok) == vocab_fingerprint(tokenizer))
    return fewshot_setup(student, objectives.bind(cfg.method, teacher, ctx), batches, score, split, tokenizer,
                         f"{cfg.method} {task.name}")


def setup(cfg: PromptDistillConfig, inputs: dict, device) -> Setup:
    return (_setup_prompt if cfg.method in PROMPT_METHODS else _setup_ft)(cfg, inputs, device)


# --- the driver ------------------------------------------------------------------------------

def run(cfg: PromptDistillConfig, split: FewShotSplit | None = None, callbacks=()) -> dict:
    """Distil one task/split (T tuned first when not given); returns the record."""
    task = cfg.resolve_task()
    if task.is_regression:
        raise ConfigError(f"task {task.name} is a regression task; Prompt-Distiller's KD and contrastive negatives "
                          "need class labels")
    if task.multi_token:
        raise ConfigError(f"task {task.name} has multi_token: true; Prompt-Distiller compares the teacher's and "
                          "the student's vocabulary distributions at one mask, so its label words must be one "
                          "token each (multi-token words work in rayapp finetune method=prompt)")
    split_batch(cfg.batch_size, cfg.engine.num_workers, cfg.engine.max_device_batch)  # fail before launching
    mlm_only = None  # why a seq2seq LM (T5) cannot take part; Prompt-KD reads label-word logits only
    if cfg.method in FT_METHODS:
        mlm_only = f"method={cfg.method} matches an encoder's hidden states"
    elif cfg.contrastive:  # T5's label word is read by its decoder: no encoder layer holds its state
        mlm_only = ("Prompt-Distiller's layer probes read a masked LM's hidden states at the mask "
                    "(contrastive=false runs without them)")
    check_model(cfg.model, needs_mlm=mlm_only)
    check_model(cfg.teacher, needs_mlm=mlm_only)
    if cfg.tuned_teacher:  # a classifier for the FT baselines
        check_model(cfg.tuned_teacher, mlm=cfg.method in PROMPT_METHODS, needs_mlm=mlm_only)
    if cfg.method in PROMPT_METHODS and Path(portable_model(cfg.teacher)).is_dir():
        # a local T' without its MLM head fails here; others are checked where the workers load them
        load_frozen_mlm(portable_model(cfg.teacher), f"teacher {cfg.teacher!r} (T')", "cpu")
    split = split or load_lmbff(cfg.data_dir, task, k=cfg.k, seed=cfg.seed)
    # drawn on the driver: a pool too small fails here, before any teacher is tuned; the default
    # pool follows the split's k-shot root (data_dir=s3://.../k-shot: s3://.../pool)
    xu = UnlabelledSet([], [])
    if cfg.unlabelled and cfg.method in PROMPT_METHODS:
        pool = cfg.unlabelled_pool or default_pool(task, split.source.get("root") or cfg.data_dir)
        xu = draw_unlabelled(split, task, cfg.n, pool=pool)
    tuned = tuned_teacher(cfg, split, callbacks)
    prefix = f"{cfg.variant}-{task.name}-{cfg.k}-{cfg.seed}"
    name = cfg.name or run_name(prefix, cfg)
    inputs = {"task": task, "split": split, "unlabelled": xu, "model_ref": portable_model(cfg.model),
              "teacher_ref": portable_model(cfg.teacher), "tuned_ref": portable_model(tuned),
              "run_dir": storage.join(cfg.output_dir, name)}
    extra = {"task": task.name, "method": cfg.variant, "metric": task.metric, "k": cfg.k, "seed": cfg.seed,
             "split": split.source, "teacher": cfg.teacher, "tuned_teacher": tuned, "unlabelled_set": xu.source}
    return run_recipe("prompt-distill", cfg, setup, inputs, extra, callbacks=callbacks, prefix=prefix,
                      keep_checkpoints=1, derive=_summary)


def _summary(record: dict) -> dict:
    """The few-shot protocol's numbers plus PD's diagnostics: `loss_terms` is each logged term
    of the objective (PD eq. 8: mlm, kd_x, kd_xu, cpd_x, cpd_xu, unweighted; an absent one 0)
    averaged over the run, so a term's size is in the record (its curve: `parts_curve`)."""
    metrics, curve = record["metrics"], record.get("parts_curve") or []
    terms = {k: round(sum(parts[k] for _, parts in curve) / len(curve), 4) for k in (curve[0][1] if curve else {})}
    return {"dev_curve": [[step, m["dev"]] for step, m in record["evals"]], "best_dev": record["best"],
            "test": metrics.get("test"), "probe_dev_acc": metrics.get("probe_dev_acc"),
            "pseudo_label_agreement": metrics.get("pseudo_labels"), "loss_terms": terms}
