"""Recipe: SMASH distillation (SMASH §3.2, §4.4).

The student (any HF masked LM, or T5: SMASH §4.7 distils T5-large into T5-small through
`<extra_id_0>`, see `modeling.models.LogitsAt`) learns the teacher's distribution at the
`<mask>` of the intermediate task's prompt. The seven settings of SMASH §4.4 are presets of
`objective` (and of the teacher/data you point them at):

| setting | objective    | teacher | data                         | loss                         |
|---------|--------------|---------|------------------------------|------------------------------|
| (1)/(2) | `ce`         | large / base | teacher cache or examples | eq. 1 soft CE                |
| (3)     | `ce+hidden`  | online  | examples                     | eq. 1 + 0.01 eq. 2           |
| (4)     | `ce+attn`    | online  | examples                     | eq. 1 + 0.01 eq. 3           |
| (5)     | `distilbert` | online  | raw corpus text, length 512  | 5 L_ce + 2 L_mlm + 1 L_cos   |
| (6)     | `rule`       | none    | pair examples (labels 0/1/2) | CE over No/Maybe/Yes         |
| (7)     | `hard-label` | none    | sentiment examples (5-class) | CE over terrible..great      |

`data` is a teacher cache (`rayapp teacher-cache`) for `ce` with `teacher_mode=cache`, a
corpus (any `corpus.read_documents` format) for `distilbert` (SMASH §4.4 trains setting 5
on raw Wikipedia text at length 512, not on the intermediate examples; its L_ce is on every
non-pad token, DistilBERT's default, or with `distilbert_ce=masked` on the masked tokens only:
`losses.distilbert_loss`), else intermediate
examples (parquet with text_a[, text_b], label). A cache keeps the teacher's top-k logits;
`topk_mode=tail` (default) puts the missing mass in one tail bucket (see
`losses.soft_ce_topk`). It streams from Ray Data into each worker; the batch size is global
(default 128, lr 1e-4, linear schedule, as SMASH App. A.1). Checkpoints every
`checkpoint_every` steps to the run's storage; after a worker failure or a re-submission
the run resumes from the last one. The final student is exported as an HF directory
(`<run>/student`, fp32) that `rayapp finetune model=<dir>` or `init=<dir>` loads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rayapp import env
from rayapp.config import InputPath, ModelRef
from rayapp.errors import ConfigError
from rayapp.losses import TOPK_MODES
from rayapp.modeling.batches import MLMBatcher, cache_batch, prompt_batch
from rayapp.modeling.models import LogitsAt, check_model, load_mlm, load_tokenizer, local_model_dir, portable_model
from rayapp.recipes import objectives
from rayapp.recipes.finetune import check_same_vocabulary
from rayapp.tasks.prompts import PromptEncoder
from rayapp.tasks.registry import INTERMEDIATE_TASKS, MAX_LENGTH
from rayapp.train.config import TrainConfig
from rayapp.train.engine import split_batch
from rayapp.train.loop import Setup
from rayapp.train.stream import plan_blocks, stream_batches
from rayapp.train.worker import worker
from rayapp.train.run import export_model, run_recipe

Objective = Literal["ce", "ce+hidden", "ce+attn", "distilbert", "rule", "hard-label"]

# SMASH §4.4 settings as config presets (the teacher model is the user's choice: (1) large, (2)-(5) base)
SETTINGS: dict[int, dict] = {
    1: {"objective": "ce"}, 2: {"objective": "ce"},
    3: {"objective": "ce+hidden", "teacher_mode": "online", "aux_weight": 0.01},
    4: {"objective": "ce+attn", "teacher_mode": "online", "aux_weight": 0.01},
    5: {"objective": "distilbert", "teacher_mode": "online", "lr": 1e-5, "temperature": 2.0},
    6: {"objective": "rule", "task": "smash-pairs", "lr": 1e-5},
    7: {"objective": "hard-label", "task": "smash-sentiment", "lr": 1e-5},
}
NEEDS_TEACHER = {"ce", "ce+hidden", "ce+attn", "distilbert"}
DISTILBERT_MAX_LENGTH = 512  # SMASH §4.4 setting (5)


@dataclass
class DistillConfig(TrainConfig):
    student: ModelRef = "distilroberta-base"
    teacher: ModelRef | None = "roberta-large"
    data: InputPath = ""                # teacher cache, corpus (distilbert) or intermediate examples URI
    setting: int | None = None          # SMASH §4.4 preset (1)-(7); explicit keys still win
    objective: Objective = "ce"
    teacher_mode: Literal["cache", "online"] = "cache"
    task: str = "smash-pairs"           # prompt of the intermediate task (smash-pairs / smash-sentiment)
    max_length: int | None = None       # default: 128 pairs, 64 sentiment (App. A.1), 512 distilbert
    aux_weight: float = 0.01            # weight of eq. 2 / eq. 3 next to eq. 1
    temperature: float = 1.0
    topk_mode: str = "tail"             # cache: "tail" (missing mass as one bucket) or "renormalize"
    mlm_probability: float = 0.15       # (distilbert) tokens masked in raw text
    distilbert_ce: Literal["tokens", "masked"] = "tokens"  # (distilbert) L_ce on every non-pad token, or masked only
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 0.01
    max_steps: int = 200_000
    log_every: int = 50

    def __post_init__(self) -> None:
        if self.setting is not None:
            if self.setting not in SETTINGS:
                raise ConfigError(f"setting must be one of {sorted(SETTINGS)} (SMASH §4.4), got {self.setting}")
            defaults = DistillConfig.__dataclass_fields__
            for key, value in SETTINGS[self.setting].items():
                if getattr(self, key) == defaults[key].default:  # a preset never overrides an explicit key
                    setattr(self, key, value)
        super().__post_init__()
        if self.max_steps == 0:
            raise ConfigError("max_steps must be > 0: a distillation of 0 steps has no student to export")
        if not self.data:
            raise ConfigError("data is required: a teacher cache (rayapp teacher-cache), a corpus (distilbert) "
                              "or intermediate examples URI")
        if self.objective in NEEDS_TEACHER and not self.teacher:
            raise ConfigError(f"objective={self.objective} needs a teacher model (teacher=...)")
        if self.objective in NEEDS_TEACHER - {"ce"} and self.teacher_mode == "cache":
            raise ConfigError(f"objective={self.objective} needs the teacher's hidden states/logits over all "
                              "tokens, which the top-k cache does not hold: set teacher_mode=online")
        if self.topk_mode not in TOPK_MODES:
            raise ConfigError(f"topk_mode must be one of {TOPK_MODES}, got {self.topk_mode!r}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.uses_cache and self.topk_mode == "tail" and self.temperature != 1.0:
            raise ConfigError("the top-k cache stores the teacher's log-sum-exp at temperature 1 only: with "
                              "temperature != 1 set topk_mode=renormalize (or teacher_mode=online)")
        if self.task not in INTERMEDIATE_TASKS:
            raise ConfigError(f"task={self.task!r} is not an intermediate task; choose one of {sorted(INTERMEDIATE_TASKS)}")

    @property
    def uses_cache(self) -> bool:
        return self.objective == "ce" and self.teacher_mode == "cache"

    @property
    def objective_name(self) -> str:
        return "ce-cache" if self.uses_cache else self.objective


def setup(cfg: DistillConfig, inputs: dict, device) -> Setup:
    task, max_length = INTERMEDIATE_TASKS[inputs["task"]], inputs["max_length"]
    attn = {"attn_implementation": "eager"} if cfg.objective == "ce+attn" else {}  # sdpa returns no attentions
    student_dir = local_model_dir(inputs["student"])
    tokenizer = load_tokenizer(student_dir)
    teacher = None
    if cfg.objective in NEEDS_TEACHER and not cfg.uses_cache:
        teacher = LogitsAt(load_mlm(local_model_dir(inputs["teacher"]), **attn)).to(device).eval().requires_grad_(False)
    encoder = PromptEncoder(tokenizer, task, max_length) if cfg.objective != "distilbert" else None
    if cfg.uses_cache:
        to_batch = lambda rows: cache_batch(rows, tokenizer.pad_token_id)  # noqa: E731
    elif encoder is None:
        seed = cfg.train_seed * 1000 + worker().rank
        to_batch = MLMBatcher(tokenizer, max_length, cfg.mlm_probability, seed)
    else:
        to_batch = lambda rows: prompt_batch(rows, encoder)  # noqa: E731
    ctx = objectives.Context(cfg, task, encoder.label_word_ids if encoder else None)
    return Setup(model=LogitsAt(load_mlm(student_dir, **attn)),
                 objective=objectives.bind(cfg.objective_name, teacher, ctx),
                 batches=lambda first, micro, accum: stream_batches(inputs["blocks"], to_batch, micro, accum, first,
                                                                    cfg.train_seed),
                 tokenizer=tokenizer, desc=f"distill {cfg.objective}")


def run(cfg: DistillConfig, callbacks=(), *, recipe: str = "distill", setup=setup) -> dict:
    """Distil; returns the run's record (`<output_dir>/records/<name>.json`). A recipe over the
    same data and checks (PPT's prompt pre-training) passes its name and its `setup`."""
    from rayapp.data.mlm_text import build_text_chunks
    from rayapp.data.shards import shard_uris

    split_batch(cfg.batch_size, cfg.engine.num_workers, cfg.engine.max_device_batch)
    # user mistakes fail here, as one line, before Ray starts
    mlm_only = ("objective=distilbert (setting 5) trains masked-LM terms on raw text"
                if cfg.objective == "distilbert" else None)
    check_model(cfg.student, needs_mlm=mlm_only)
    if cfg.objective in NEEDS_TEACHER and not cfg.uses_cache:
        check_model(cfg.teacher, needs_mlm=mlm_only)
        # eq. 1 pairs logits id by id: as many tokens is not the same vocabulary (cache mode checks its fingerprint)
        check_same_vocabulary(cfg.student, cfg.teacher)
    task_name = cfg.task
    if cfg.uses_cache:
        from rayapp.data.teacher_cache import cache_meta

        meta = cache_meta(cfg.data)
        task_name = meta["plan"]["task"]
        check_cache_vocabulary(cfg.student, meta, cfg.data)
    if cfg.objective == "distilbert":  # raw text, materialised once as a data folder
        env.start_ray()
        data = build_text_chunks(cfg.data, cfg.output_dir, cfg.max_length or DISTILBERT_MAX_LENGTH, 0)
    else:
        data = cfg.data
    blocks = plan_blocks(shard_uris(data), cfg.engine.num_workers)
    max_length = cfg.max_length or (DISTILBERT_MAX_LENGTH if cfg.objective == "distilbert" else MAX_LENGTH[task_name])
    inputs = {"task": task_name, "max_length": max_length, "blocks": blocks, "student": portable_model(cfg.student),
              "teacher": portable_model(cfg.teacher) if cfg.objective in NEEDS_TEACHER else None}
    return run_recipe(recipe, cfg, setup, inputs, {"setting": cfg.setting, "objective": cfg.objective},
                      prefix=f"{recipe}-{cfg.objective}", callbacks=callbacks,
                      derive=lambda record: export_model(cfg.output_dir, record, "student"))


def check_cache_vocabulary(student: str, meta: dict, cache: str) -> None:
    """Eq. 1 sums over one vocabulary: the student must have the teacher's tokenizer, not just
    as many tokens (the cache stores a fingerprint of the teacher's vocabulary)."""
    from rayapp.modeling.models import vocab_fingerprint

    tokenizer = load_tokenizer(local_model_dir(student))
    if meta.get("vocab_fingerprint") != vocab_fingerprint(tokenizer):
        raise ConfigError(f"student {student} does not have the tokenizer the teacher cache {cache} was built with "
                          f"({len(tokenizer)} vs {meta.get('vocab_size')} tokens, different vocabulary "
                          "fingerprint): soft CE over the vocabulary (SMASH eq. 1) needs the same tokenizer "
                          "(e.g. roberta-large -> distilroberta-base)")
