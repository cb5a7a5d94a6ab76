"""Teacher top-k cache: the teacher's distribution at the mask, computed once by Ray Data.

SMASH distils the student on the teacher's full-vocabulary distribution at `<mask>` (eq. 1).
Stored whole that is V floats per example (~257 GB fp16 for 2.56M RoBERTa examples), so
`build_cache` keeps, per example, the teacher's k largest logits with their vocabulary ids
plus the log-sum-exp of ALL V logits. The kept probabilities are then exact,
p_i = exp(v_i - lse), and `covered` = sum of those p_i records how much mass the cache
drops (`losses.soft_ce_topk` renormalises over it or not).

Pipeline (one Ray Data stream, constant memory in corpus size):

    examples parquet ──read row range per shard──► TeacherScorer actor pool ──► driver
    (text_a[, text_b])  (Ray tasks)                 (MLM at the mask, GPU      regroups rows
                                                     when the cluster has one)  into shards,
                                                                                writes each whole

Shards and resume. Shard `part-FFFFF-CCCCC.parquet` holds rows [CCCCC*R, (CCCCC+1)*R) of
input file number FFFFF (input files in sorted order, R = `rows_per_shard`), so the shard
layout is a pure function of the input files and R. Each shard is written whole
(serialised in memory, then a local temp file + rename, or one S3 PUT), so a shard that
exists is complete; re-running `build_cache` into the same `out_uri` skips existing shards
and computes only the missing ones. `_meta.json` is written first with the plan (teacher,
task, top_k, inputs, ...) and `complete: false`; a re-run with a different plan is refused
instead of mixing two caches. When every shard exists it is rewritten with the counts and
`complete: true`, which `read_cache` requires.

Values are fp16, as logits shifted by the example's largest logit (softmax does not change
under a shift, and `lse` is stored with the same shift, in float32): real teachers put mask
logits around 20-30, where fp16 steps by 0.016 (1.6% on every probability), but shifted
values lie in [-x, 0], where fp16 steps by <= 0.001 for the entries that carry the mass
(|v| < 2) and by more only where p < e^-8. So fp16 halves the cache and keeps the kept
probabilities exact to ~1e-3 relative.

`TeacherScorer` is the Ray Data callable class shared with `rayapp.data.sentiment`, which asks
it for probabilities over the verbalizer's label words instead of the top-k.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from rayapp import storage
from rayapp.errors import ConfigError, DataError
from rayapp.modeling.models import load_mlm, load_model_config, mlm_head, load_tokenizer, local_model_dir, portable_model
from rayapp.tasks.prompts import PromptEncoder, Task, class_logits
from rayapp.tasks.registry import INTERMEDIATE_TASKS, resolve_intermediate

log = logging.getLogger(__name__)

META = "_meta.json"
_SHARD, _ROW = "_shard", "_row"  # bookkeeping columns, dropped before a shard is written


# --- the teacher at the mask --------------------------------------------------------------

def mask_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_pos: torch.Tensor,
                half: torch.dtype | None = None) -> torch.Tensor:
    """float32 MLM logits at each example's mask position, `[B, V]`.

    Only B of the B*T positions are needed, so the vocabulary projection runs on the mask's
    hidden state (B*V instead of B*T*V: 0.8 GB of fp16 at B=64, T=128, V=50k). With `half`
    (bf16/fp16 on GPU) the encoder runs under autocast and the head in float32, so the
    logits the cache stores are not rounded to a half type.
    """
    device = input_ids.device.type
    autocast = torch.autocast(device, dtype=half) if half is not None else contextlib.nullcontext()
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    head = mlm_head(model)
    with torch.inference_mode():
        if head is None:
            with autocast:
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            return logits[rows, mask_pos].float()
        with autocast:
            hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        with torch.autocast(device, enabled=False):
            return head(hidden[rows, mask_pos].float()).float()


def topk_summary(logits: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """The cache's per-example record of float32 logits `[B, V]`: top-k values (descending)
    and indices, log-sum-exp of all V logits, and the probability mass the top-k covers.
    Values and lse are shifted by the top logit (so values are <= 0; see module docstring)."""
    values, indices = logits.topk(k, dim=-1)
    top = values[:, :1]
    values, lse = values - top, (logits - top).logsumexp(-1)
    return {
        "topk_values": values,
        "topk_indices": indices.to(torch.int32),
        "lse": lse,
        "covered": (values.logsumexp(-1) - lse).exp(),
    }


def _fixed_lists(x: torch.Tensor, value_type: pa.DataType) -> pa.Array:
    # fixed_size_list keeps [B, k] a plain 2-D array when Ray Data hands batches to torch
    flat = pa.array(x.detach().cpu().reshape(-1).numpy(), type=value_type)
    return pa.FixedSizeListArray.from_arrays(flat, x.shape[-1])


class TeacherScorer:
    """Ray Data callable class: appends the teacher's view of each example to a batch.

    Loads the teacher and its tokenizer once per actor. Input: a pyarrow batch with
    `text_a` (and `text_b` for two-sentence tasks). Appended columns:
    - with `top_k`: `input_ids` (list<int32>, unpadded), `mask_pos`, `topk_values`,
      `topk_indices`, `lse`, `covered` (see `topk_summary`);
    - with `label_probs`: `probs`, softmax over the task's label words (list<float32>, C).
    On a GPU actor the encoder runs in bf16 (fp16 where bf16 is unsupported).
    """

    def __init__(self, teacher: str, task: Task, max_length: int, top_k: int | None = None,
                 label_probs: bool = False):
        self.top_k, self.label_probs = top_k, label_probs
        teacher = local_model_dir(teacher)  # an s3:// teacher is fetched once per node
        self.encoder = PromptEncoder(load_tokenizer(teacher), task, max_length)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.half = None
        if self.device.type == "cuda":
            self.half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.model = load_mlm(teacher).to(self.device).eval()

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts_b = batch["text_b"].to_pylist() if self.encoder.task.num_inputs == 2 else None
        enc = self.encoder.encode_batch(batch["text_a"].to_pylist(), texts_b)
        logits = mask_logits(
            self.model, enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device),
            enc["mask_pos"].to(self.device), self.half,
        )
        columns: dict[str, pa.Array] = {}
        if self.top_k is not None:
            lengths = enc["attention_mask"].sum(-1).tolist()  # right-padded
            columns["input_ids"] = pa.array(
                [ids[:n] for ids, n in zip(enc["input_ids"].tolist(), lengths)], type=pa.list_(pa.int32())
            )
            columns["mask_pos"] = pa.array(enc["mask_pos"].numpy(), type=pa.int32())
            summary = topk_summary(logits, self.top_k)
            columns["topk_values"] = _fixed_lists(summary["topk_values"].half(), pa.float16())
            columns["topk_indices"] = _fixed_lists(summary["topk_indices"], pa.int32())
            columns["lse"] = pa.array(summary["lse"].cpu().numpy(), type=pa.float32())
            columns["covered"] = pa.array(summary["covered"].cpu().numpy(), type=pa.float32())
        if self.label_probs:
            probs = class_logits(logits, self.encoder.label_word_ids).softmax(-1)
            columns["probs"] = _fixed_lists(probs, pa.float32())
        for name, column in columns.items():
            batch = batch.append_column(name, column)
        return batch


def scorer_pool(num_actors: int | None, use_gpu: bool | None) -> dict:
    """`map_batches` arguments for a TeacherScorer actor pool.

    use_gpu=None uses GPUs when the cluster has them: one actor per GPU. On CPU each actor
    is single-threaded and takes one CPU, one CPU is left for the reading tasks (with none
    left the pipeline would starve); pass `num_actors` to bound memory for big teachers.
    """
    import ray

    if not ray.is_initialized():
        ray.init()
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if use_gpu and gpus == 0:
        raise ConfigError("use_gpu=true but the Ray cluster has no GPUs; set use_gpu=false or add GPU nodes")
    on_gpu = gpus > 0 if use_gpu is None else use_gpu
    n = num_actors or (gpus if on_gpu else max(1, cpus - 1))
    if n < 1:
        raise ConfigError(f"num_actors must be >= 1, got {num_actors}")
    return {
        "compute": ray.data.ActorPoolStrategy(size=n),
        "num_gpus": 1 if on_gpu else 0,
        "num_cpus": 1,
    }


# --- shards ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    """Rows [start, stop) of one input file; `name` is the output file's name."""

    name: str
    path: str  # input file, inside the input filesystem
    start: int
    stop: int


def plan_shards(inputs: list[tuple[str, int]], rows_per_shard: int) -> list[Shard]:
    """Fixed row ranges of `(path, num_rows)` input files, in input order (see module doc)."""
    return [
        Shard(f"part-{f:05d}-{c:05d}.parquet", path, start, min(start + rows_per_shard, rows))
        for f, (path, rows) in enumerate(inputs)
        for c, start in enumerate(range(0, rows, rows_per_shard))
    ]


def read_range(fs, path: str, start: int, stop: int, columns: list[str]) -> pa.Table:
    """Rows [start, stop) of a parquet file, reading only the row groups that hold them."""
    pf = pq.ParquetFile(fs.open_input_file(path))
    groups, first, offset = [], None, 0
    for i in range(pf.num_row_groups):
        n = pf.metadata.row_group(i).num_rows
        if offset < stop and offset + n > start:
            groups.append(i)
            first = offset if first is None else first
        offset += n
    return pf.read_row_groups(groups, columns=columns).slice(start - first, stop - start)


def _read_shards(batch: pa.Table, fs, columns: list[str]) -> pa.Table:
    """Ray Data fn: shard descriptors -> their example rows, tagged with shard and row."""
    tables = []
    for shard in batch.to_pylist():
        table = read_range(fs, shard["path"], shard["start"], shard["stop"], columns)
        table = table.append_column(_SHARD, pa.array([shard["name"]] * table.num_rows, pa.string()))
        tables.append(table.append_column(_ROW, pa.array(range(table.num_rows), pa.int64())))
    return pa.concat_tables(tables)


def assemble_shards(batches: Iterable[pa.Table], sizes: dict[str, int]) -> Iterator[tuple[str, pa.Table]]:
    """Regroup scored rows, which arrive in any order, into whole shards in input row order.

    Memory: only shards with rows still in flight are buffered, a window bounded by Ray
    Data's backpressure, not by the corpus size.
    """
    parts: dict[str, list[pa.Table]] = defaultdict(list)
    have: dict[str, int] = defaultdict(int)
    for batch in batches:
        tags = batch[_SHARD]
        for name in pc.unique(tags).to_pylist():
            part = batch.filter(pc.equal(tags, name))
            parts[name].append(part)
            have[name] += part.num_rows
            if have[name] == sizes[name]:
                del have[name]
                table = pa.concat_tables(parts.pop(name)).sort_by(_ROW)
                yield name, table.drop_columns([_SHARD, _ROW])
    assert not parts, f"rows of shards {sorted(parts)} never arrived"


def write_table(uri: str, table: pa.Table) -> None:
    """Write a whole parquet file at once: serialised in memory, then `storage.write_bytes`
    (temp file + rename locally, one PUT on S3), so a file that exists is complete."""
    sink = io.BytesIO()
    pq.write_table(table, sink)
    storage.write_bytes(uri, sink.getvalue())


# --- inputs, meta -----------------------------------------------------------------------

def _inspect_inputs(examples_uri: str, required: list[str]) -> tuple[list[tuple[str, int]], list[str]]:
    """`([(uri, rows), ...], columns to carry)` of the examples' parquet files, checked."""
    uris = storage.list_files(examples_uri, suffix=".parquet")
    if not uris:
        raise DataError(f"no .parquet files under {examples_uri}; build examples first "
                        "(rayapp.data.pairs.build_pairs or rayapp.data.sentiment.build_sentiment)")
    inputs, carry = [], None
    for uri in uris:
        fs, path = storage.filesystem(uri)
        meta = pq.ParquetFile(fs.open_input_file(path)).metadata
        names = meta.schema.to_arrow_schema().names
        missing = [c for c in required if c not in names]
        if missing:
            raise DataError(f"{uri} lacks column(s) {missing} (it has {names}); the task's template needs "
                            f"{required}: rename the columns or build the examples with rayapp")
        # labels ride along for the hard-label baselines when every file has them
        here = required + (["label"] if "label" in names else [])
        carry = here if carry is None else [c for c in carry if c in here]
        inputs.append((uri, meta.num_rows))
    if sum(rows for _, rows in inputs) == 0:
        raise DataError(f"{examples_uri} holds no examples (all {len(uris)} parquet files are empty)")
    return inputs, carry


def _read_meta(out_uri: str) -> dict | None:
    uri = storage.join(out_uri, META)
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else None


def _check_resumable(out_uri: str, plan: dict) -> None:
    """Refuse to add shards to a folder that holds another cache or other parquet files."""
    old = _read_meta(out_uri)
    if old is None:
        if storage.exists(out_uri) and storage.list_files(out_uri, suffix=".parquet"):
            raise DataError(f"{out_uri} holds parquet files but no {META}, so it is not a teacher cache; "
                            "write the cache to an empty or new folder")
        return
    changed = sorted(k for k in plan if old.get("plan", {}).get(k) != plan[k])
    if changed:
        raise DataError(f"{out_uri} holds a teacher cache built with other settings ({', '.join(changed)} "
                        "differ); resume with the same settings, or write to a new out_uri")


def cache_meta(uri: str) -> dict:
    """The `_meta.json` of a cache (plan, vocab size, counts, mean covered mass)."""
    meta = _read_meta(uri)
    if meta is None:
        raise DataError(f"{uri} is not a teacher cache (no {META}); build it with "
                        "rayapp.data.teacher_cache.build_cache")
    return meta


# --- build / read -----------------------------------------------------------------------------

def build_cache(
    examples_uri: str,
    teacher: str,
    out_uri: str,
    *,
    task: str | Task = "smash-pairs",
    top_k: int = 64,
    max_length: int | None = None,
    batch_size: int = 64,
    num_actors: int | None = None,
    use_gpu: bool | None = None,
    rows_per_shard: int = 10_000,
) -> dict:
    """Score every example with the teacher and write its top-k cache to `out_uri`.

    Resumable (see module doc). Returns stats: examples (in the whole cache), computed (this
    run), shards_written, shards_skipped, mean_covered, examples_per_s, seconds.
    """
    import ray

    task, default_length = resolve_intermediate(task)
    max_length = max_length or default_length
    if rows_per_shard < 1 or batch_size < 1:
        raise ConfigError(f"rows_per_shard and batch_size must be >= 1, got {rows_per_shard} and {batch_size}")
    local = local_model_dir(teacher)
    tokenizer = load_tokenizer(local)
    PromptEncoder(tokenizer, task, max_length)  # bad label words / template fail here, not in an actor
    vocab_size = load_model_config(local).vocab_size
    if not 1 <= top_k <= vocab_size:
        raise ConfigError(f"top_k={top_k} must be between 1 and the teacher's vocabulary size {vocab_size}")

    required = ["text_a", "text_b"][: task.num_inputs]
    inputs, carry = _inspect_inputs(examples_uri, required)
    in_fs, _ = storage.filesystem(inputs[0][0])
    plan = {
        "teacher": teacher, "task": task.name, "template": task.template, "verbalizer": task.verbalizer,
        "max_length": max_length, "top_k": top_k, "rows_per_shard": rows_per_shard,
        "inputs": [[uri, rows] for uri, rows in inputs],
    }
    _check_resumable(out_uri, plan)
    storage.makedirs(out_uri)
    shards = plan_shards([(storage.filesystem(uri)[1], rows) for uri, rows in inputs], rows_per_shard)
    meta = {
        "plan": plan, "complete": False, "vocab_size": vocab_size,
        "tokenizer": f"{type(tokenizer).__name__}({tokenizer.name_or_path})",
        "columns": carry + ["input_ids", "mask_pos", "topk_values", "topk_indices", "lse", "covered"],
        "shards": [s.name for s in shards],
    }
    storage.write_text(storage.join(out_uri, META), json.dumps(meta, indent=2))

    done = {os.path.basename(uri) for uri in storage.list_files(out_uri, suffix=".parquet")}
    todo = [s for s in shards if s.name not in done]
    log.info("teacher cache %s: %d shards to compute, %d already written",
             out_uri, len(todo), len(shards) - len(todo))
    start, computed = time.perf_counter(), 0
    if todo:
        ds = ray.data.from_items([vars(s) for s in todo], override_num_blocks=len(todo)).map_batches(
            _read_shards, fn_kwargs={"fs": in_fs, "columns": carry}, batch_size=1, batch_format="pyarrow",
        ).map_batches(
            TeacherScorer,
            fn_constructor_kwargs={"teacher": portable_model(teacher), "task": task, "max_length": max_length,
                                   "top_k": top_k},
            batch_size=batch_size, batch_format="pyarrow", udf_modifying_row_count=False,
            **scorer_pool(num_actors, use_gpu),
        )
        scored = ds.iter_batches(batch_size=None, batch_format="pyarrow")
        for name, table in assemble_shards(scored, {s.name: s.stop - s.start for s in todo}):
            write_table(storage.join(out_uri, name), table)
            computed += table.num_rows
    seconds = time.perf_counter() - start

    out_fs, out_root = storage.filesystem(out_uri)
    covered = pa.concat_arrays([
        pq.read_table(f"{out_root}/{s.name}", columns=["covered"], filesystem=out_fs)["covered"].combine_chunks()
        for s in shards
    ])
    meta.update(complete=True, examples=len(covered), mean_covered=pc.mean(covered).as_py())
    storage.write_text(storage.join(out_uri, META), json.dumps(meta, indent=2))
    return {
        "examples": meta["examples"], "computed": computed, "shards_written": len(todo),
        "shards_skipped": len(shards) - len(todo), "mean_covered": meta["mean_covered"],
        "examples_per_s": computed / seconds if computed else 0.0, "seconds": seconds,
    }


def read_cache(uri: str):
    """A complete cache as a `ray.data.Dataset` (columns: see `cache_meta(uri)["columns"]`)."""
    import ray

    meta = cache_meta(uri)
    if not meta["complete"]:
        raise DataError(f"teacher cache {uri} is incomplete (a build was interrupted); "
                        "re-run build_cache with the same arguments to finish it")
    fs, root = storage.filesystem(uri)
    return ray.data.read_parquet([f"{root}/{name}" for name in meta["shards"]], filesystem=fs)
