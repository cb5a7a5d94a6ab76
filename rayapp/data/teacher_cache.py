"""Teacher top-k cache: the teacher's distribution at the mask, computed once by Ray Data.

SMASH distils the student on the teacher's full-vocabulary distribution at `<mask>` (eq. 1).
Stored whole that is V floats per example (~257 GB fp16 for 2.56M RoBERTa examples), so
the cache keeps, per example, the teacher's k largest logits with their vocabulary ids
plus the log-sum-exp of ALL V logits. The kept probabilities are then exact,
p_i = exp(v_i - lse), and `covered` = sum of those p_i records how much mass the cache
drops; its mean is in `_meta.json`, and a mean below `warn_covered` is logged as a
warning (the student would learn from a sharper distribution than the teacher's unless
the loss models the tail; see `rayapp.losses`).

Pipeline (one Ray Data job, constant memory in corpus size):

    shard plan ──► autoscaling actor pool (`rayapp.modeling.scorer`), one shard per call:
    (driver)       read its rows ─► encode ─► teacher at the mask ─► top-k ─► write the shard

Shards and resume. Shard `part-FFFFF-CCCCC.parquet` holds rows [CCCCC*R, (CCCCC+1)*R) of
input file number FFFFF (the examples folder's files in its `_meta.json` order,
R = `rows_per_shard`), so the layout is a pure function of the inputs and R. The actor that
scores a shard writes it whole (`rayapp.data.shards.write_table`), so a shard that exists is
complete and no row passes through the driver. `_plan.json` is written first; a re-run into
the same folder with the same plan skips the shards that exist, and a re-run with another
plan is refused. `_meta.json` comes last, when every shard exists, with each shard's rows
and checksum; `read_cache` and the distill recipe refuse a folder without it, and the
examples folder must have one too. Its shards are checked against it before any actor
starts (`shards.shard_uris`: a half or garbage shard names itself and how to rebuild it),
and the actors read them through `shards.open_shard` (page CRCs verified).

Values are fp16, as logits shifted by the example's largest logit (softmax does not change
under a shift, and `lse` is stored with the same shift, in float32): real teachers put mask
logits around 20-30, where fp16 steps by 0.016 (1.6% on every probability), but shifted
values lie in [-x, 0], where fp16 steps by <= 0.001 for the entries that carry the mass
(|v| < 2) and by more only where p < e^-8. So fp16 halves the cache and keeps the kept
probabilities exact to ~1e-3 relative.

The metadata also stores `vocab_fingerprint` (`rayapp.modeling.models.vocab_fingerprint`):
eq. 1 sums over one vocabulary, so a student whose tokenizer differs must be refused, and
equal sizes do not prove equal vocabularies.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc

from rayapp import env, storage
from rayapp.data import shards
from rayapp.config import InputPath, ModelRef, OutputPath, require_counts
from rayapp.errors import ConfigError, DataError
from rayapp.modeling.models import (check_model, load_model_config, load_tokenizer, local_model_dir, portable_model,
                                    vocab_fingerprint)
from rayapp.modeling.scorer import TeacherScorer, actor_device, default_batch_size, pool_args
from rayapp.tasks.prompts import PromptEncoder
from rayapp.tasks.registry import resolve_intermediate

log = logging.getLogger(__name__)

STAGE = "teacher-cache"
CACHE_COLUMNS = ["input_ids", "mask_pos", "topk_values", "topk_indices", "lse", "covered"]


@dataclass
class CacheConfig:
    """`rayapp teacher-cache --config FILE key=value ...`"""

    examples: InputPath  # a finished intermediate-examples folder (pairs or sentiment), local or s3://
    teacher: ModelRef  # teacher MLM: HF id, local dir or s3://
    out: OutputPath  # the cache folder, local or s3://
    task: str = "smash-pairs"  # intermediate task whose prompt the teacher reads
    top_k: int = 64
    max_length: int | None = None  # None: the task's (SMASH App. A.1)
    batch_size: int | None = None  # examples per forward pass; None: sized for the device
    num_actors: int | None = None  # most scoring actors; None: as many as the cluster gives
    use_gpu: bool = False  # one GPU per actor
    cpus_per_actor: int = 1  # CPUs (torch threads) per actor
    rows_per_shard: int = 10_000
    warn_covered: float = 0.5  # warn when the mean top-k mass is below this

    def __post_init__(self) -> None:
        require_counts(self, "rows_per_shard", "cpus_per_actor", "batch_size", "num_actors")
        if not 0.0 <= self.warn_covered <= 1.0:
            raise ConfigError(f"warn_covered={self.warn_covered} must be a probability mass in [0, 1]")


@dataclass(frozen=True)
class Shard:
    """Rows [start, stop) of one input file; `name` is the output file's name."""

    name: str
    uri: str  # input file
    start: int
    stop: int


def plan_shards(inputs: list[tuple[str, int]], rows_per_shard: int) -> list[Shard]:
    """Fixed row ranges of `(uri, num_rows)` input files, in input order (see module doc)."""
    return [
        Shard(shards.shard_name(f, c), uri, start, min(start + rows_per_shard, rows))
        for f, (uri, rows) in enumerate(inputs)
        for c, start in enumerate(range(0, rows, rows_per_shard))
    ]


def read_range(uri: str, start: int, stop: int, columns: list[str]) -> pa.Table:
    """Rows [start, stop) of a shard, reading only the row groups that hold them."""
    with shards.open_shard(uri) as pf:
        groups, first, offset = [], None, 0
        for i in range(pf.num_row_groups):
            n = pf.metadata.row_group(i).num_rows
            if offset < stop and offset + n > start:
                groups.append(i)
                first = offset if first is None else first
            offset += n
        return pf.read_row_groups(groups, columns=columns).slice(start - first, stop - start)


class CacheWriter:
    """Ray Data actor: scores whole shards with the teacher and writes each one.

    Input rows are `Shard`s; output one row per shard: `name`, `rows`, `tokens` (the
    prompt tokens scored, padding excluded), `start` and `end` (wall clock, seconds), `actor`
    (its process id), `entry` (its `_meta.json` entry)."""

    def __init__(self, teacher: str, task, max_length: int, top_k: int, batch_size: int,
                 columns: list[str], out: str):
        self.scorer = TeacherScorer(teacher, task, max_length, actor_device())
        self.top_k, self.batch_size, self.columns, self.out = top_k, batch_size, columns, out

    def __call__(self, batch: pa.Table) -> pa.Table:
        done = {"name": [], "rows": [], "tokens": [], "start": [], "end": [], "actor": [], "entry": []}
        for shard in batch.to_pylist():
            done["start"].append(time.time())
            table = read_range(shard["uri"], shard["start"], shard["stop"], self.columns)
            for name, column in self.scorer.topk(table, self.top_k, self.batch_size).items():
                table = table.append_column(name, column)
            done["entry"].append(shards.write_table(storage.join(self.out, shard["name"]), table))
            done["name"].append(shard["name"])
            done["rows"].append(table.num_rows)
            done["tokens"].append(pc.sum(pc.list_value_length(table["input_ids"])).as_py() or 0)
            done["end"].append(time.time())
            done["actor"].append(os.getpid())
        return pa.table(done)


def _inspect_inputs(examples: str, required: list[str]) -> tuple[list[tuple[str, int]], list[str]]:
    """`([(uri, rows), ...], columns to carry)` of a finished examples folder, checked."""
    inputs, carry = [], None
    for uri in shards.shard_uris(examples):
        with shards.open_shard(uri) as f:
            meta = f.metadata
        names = meta.schema.to_arrow_schema().names
        missing = [c for c in required if c not in names]
        if missing:
            raise DataError(f"{uri} lacks column(s) {missing} (it has {names}); the task's template needs "
                            f"{required}: build the examples for this task with rayapp")
        # labels ride along for the hard-label baselines when every file has them
        here = required + (["label"] if "label" in names else [])
        carry = here if carry is None else [c for c in carry if c in here]
        inputs.append((uri, meta.num_rows))
    if sum(rows for _, rows in inputs) == 0:
        raise DataError(f"{examples} holds no examples (all {len(inputs)} shards are empty)")
    return inputs, carry


def run(cfg: CacheConfig) -> dict:
    """Score every example with the teacher and write its top-k cache to `cfg.out`.

    Resumable (see module doc). Returns stats: examples (in the whole cache), computed (this
    run), shards_written, shards_skipped, actors (that scored them), mean_covered, tokens
    (prompt tokens scored this run), seconds (the Ray job: actor start-up, scoring,
    writing), examples_per_s and tokens_per_s over those seconds, and scoring_tokens_per_s
    (first shard's start to last shard's end: without the start-up, which a corpus-scale
    build amortises).
    """
    import ray

    task, default_length = resolve_intermediate(cfg.task)
    max_length = cfg.max_length or default_length
    batch_size = cfg.batch_size or default_batch_size(cfg.use_gpu)
    check_model(cfg.teacher)  # a path that is not a model: one line, before Ray starts
    local = local_model_dir(cfg.teacher)
    tokenizer = load_tokenizer(local)
    PromptEncoder(tokenizer, task, max_length)  # bad label words / template fail here, not in an actor
    vocab_size = load_model_config(local).vocab_size
    if not 1 <= cfg.top_k <= vocab_size:
        raise ConfigError(f"top_k={cfg.top_k} must be between 1 and the teacher's vocabulary size {vocab_size}")

    # actors on any node read the examples and teacher and write the shards the driver reads
    # back: refuse node-local paths before any work (made first, so both sides see `out`)
    storage.makedirs(cfg.out)
    storage.require_shared({"examples": cfg.examples, "teacher": cfg.teacher, "out": cfg.out})
    # every examples shard checked against its _meta.json entry before Ray starts
    inputs, carry = _inspect_inputs(cfg.examples, ["text_a", "text_b"][: task.num_inputs])
    env.start_ray()
    plan = {
        "stage": STAGE, "teacher": cfg.teacher, "task": task.name, "template": task.template,
        "verbalizer": task.verbalizer, "max_length": max_length, "top_k": cfg.top_k,
        "rows_per_shard": cfg.rows_per_shard, "inputs": [[uri, rows] for uri, rows in inputs],
    }
    done = shards.begin(cfg.out, plan, "teacher cache")
    planned = plan_shards(inputs, cfg.rows_per_shard)
    todo = [s for s in planned if s.name not in done]
    log.info("teacher cache %s: %d shards to compute, %d already written",
             cfg.out, len(todo), len(planned) - len(todo))
    start, written = time.perf_counter(), []
    if todo:
        written = ray.data.from_items([asdict(s) for s in todo], override_num_blocks=len(todo)).map_batches(
            CacheWriter,
            fn_constructor_kwargs={"teacher": portable_model(cfg.teacher), "task": task, "max_length": max_length,
                                   "top_k": cfg.top_k, "batch_size": batch_size, "columns": carry, "out": cfg.out},
            **pool_args(cfg.num_actors, cfg.use_gpu, cfg.cpus_per_actor),
        ).take_all()
    seconds = time.perf_counter() - start

    covered = pa.concat_arrays([_covered(storage.join(cfg.out, s.name)) for s in planned])
    mean_covered = pc.mean(covered).as_py()
    if mean_covered < cfg.warn_covered:
        log.warning("the top-%d cache %s covers %.1f%% of the teacher's probability mass on average "
                    "(below warn_covered=%s): the dropped tail is what a renormalised top-k loss "
                    "cannot see; raise top_k or keep the tail term in the loss",
                    cfg.top_k, cfg.out, 100 * mean_covered, cfg.warn_covered)
    computed, tokens = sum(r["rows"] for r in written), sum(r["tokens"] for r in written)
    shards.write_meta(cfg.out, {
        "stage": STAGE, "plan": plan, "examples": len(covered),
        "files": [s.name for s in planned], "columns": carry + CACHE_COLUMNS,
        "vocab_size": vocab_size, "vocab_fingerprint": vocab_fingerprint(tokenizer),
        "tokenizer": f"{type(tokenizer).__name__}({tokenizer.name_or_path})",
        "mean_covered": mean_covered, "warn_covered": cfg.warn_covered,
    }, {r["name"]: r["entry"] for r in written})
    return {
        "examples": len(covered), "computed": computed, "shards_written": len(todo),
        "shards_skipped": len(planned) - len(todo), "actors": len({r["actor"] for r in written}),
        "mean_covered": mean_covered,
        "examples_per_s": computed / seconds if computed else 0.0,
        "tokens_per_s": tokens / seconds if tokens else 0.0, "tokens": tokens, "seconds": seconds,
        "scoring_tokens_per_s": tokens / (max(r["end"] for r in written) - min(r["start"] for r in written))
        if tokens else 0.0,
    }


def _covered(uri: str) -> pa.Array:
    """A cache shard's `covered` column (a shard an earlier run wrote is first read here:
    a damaged one fails by name)."""
    with shards.open_shard(uri) as f:
        return f.read(columns=["covered"])["covered"].combine_chunks()


def build_cache(examples: str, teacher: str, out: str, **settings) -> dict:
    """`run(CacheConfig(examples, teacher, out, **settings))`, for Python callers."""
    return run(CacheConfig(examples=examples, teacher=teacher, out=out, **settings))


def cache_meta(uri: str) -> dict:
    """The `_meta.json` of a finished cache (plan, vocabulary, counts, mean covered mass)."""
    meta = shards.require_meta(uri)
    if meta.get("stage") != STAGE:
        raise DataError(f"{uri} is a finished data folder but not a teacher cache (its {shards.META} says "
                        f"stage={meta.get('stage')!r}); build one with `rayapp teacher-cache`")
    return meta


def read_cache(uri: str):
    """A finished cache as a `ray.data.Dataset` (columns: `cache_meta(uri)["columns"]`)."""
    import ray

    cache_meta(uri)
    fs, _ = storage.filesystem(uri)
    return ray.data.read_parquet([storage.filesystem(u)[1] for u in shards.shard_uris(uri)], filesystem=fs)
