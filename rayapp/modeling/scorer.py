"""The teacher at the mask, for the data stages that ask a teacher (teacher cache, sentiment).

`TeacherScorer` loads a masked LM once and scores whole shards of examples through
`LogitsAt` (the vocabulary projection only at the mask). Rows are encoded with the task's
prompt, cut into batches of similar length (longest first: padding wasted on short rows
drops, and a batch that does not fit in memory fails at once, not hours in), scored, and
returned in input order. On a GPU the encoder runs under bf16 autocast (fp16 where bf16 is
unsupported) while the vocabulary head stays float32: the cache stores logits, which a half
type would round (fp16 steps by 0.016 around a logit of 25).

Where it runs. Both stages score shards in a Ray Data actor pool (`pool_args`): an
autoscaling pool, `ActorPoolStrategy(min_size=1, max_size=num_actors)`, so a cluster that
starts with no GPU (or CPU) workers grows into the pool instead of the pool being sized from
what is up when the job starts; one GPU per actor with `use_gpu`. An actor takes its device
from `ray.get_gpu_ids()` (`actor_device`): Ray 2.60 no longer hides the GPUs from zero-GPU
workers, so `torch.cuda.is_available()` is true in an actor that was given none.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from rayapp.modeling.models import LogitsAt, load_mlm, load_tokenizer, local_model_dir, mlm_head
from rayapp.tasks.prompts import PromptEncoder, Task, class_logits, pad_ids


def default_batch_size(use_gpu: bool) -> int:
    """Examples per forward pass: large on a GPU; on CPU more buys nothing (measured with
    MiniLM-L6 in `benchmarks/intermediate.py`) and costs memory."""
    return 256 if use_gpu else 32


def actor_device() -> torch.device:
    """The device Ray gave this worker: `cuda` for an actor with a GPU, else `cpu`.

    Ray points CUDA_VISIBLE_DEVICES at the actor's GPU, so it is `cuda:0` there; with
    RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES all GPUs stay visible and the id is the index."""
    import ray

    ids = [str(i) for i in ray.get_gpu_ids()]
    if not ids:
        return torch.device("cpu")
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return torch.device("cuda", visible.index(ids[0]) if ids[0] in visible else int(ids[0]))


def pool_args(num_actors: int | None, use_gpu: bool, cpus_per_actor: int = 1) -> dict:
    """`map_batches` arguments for an actor pool that scores one whole shard per call.

    Nothing here asks the cluster what it has now. With `num_actors` the pool asks for that
    many actors at once (an autoscaling cluster sees the whole demand and starts the nodes)
    and starts work as soon as one is up; without, it grows from one actor as long as its
    actors are busy and the cluster gives more. Two calls in flight per actor: Ray Data
    grows a pool only when its utilisation (calls in flight per actor) reaches 1.75, so with
    one a pool would never grow; the second call also hides the gap between two shards."""
    from ray.data import ActorPoolStrategy

    return {
        "compute": ActorPoolStrategy(min_size=1, max_size=num_actors, initial_size=num_actors,
                                     max_tasks_in_flight_per_actor=2),
        "num_gpus": 1 if use_gpu else 0,
        "num_cpus": cpus_per_actor,
        "batch_size": 1,
        "batch_format": "pyarrow",
    }


def length_batches(lengths, batch_size: int) -> list[np.ndarray]:
    """Row indices in batches of `batch_size`, longest rows first (see module docstring)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def token_batches(lengths, tokens: int) -> list[np.ndarray]:
    """Row indices, longest rows first, in batches of at most `tokens` padded tokens (a row
    longer than that alone): short rows share a batch, so a batch's cost follows its tokens,
    not a fixed row count sized for the longest row."""
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        size = max(1, tokens // max(int(lengths[order[start]]), 1))  # the first row is the batch's longest
        batches.append(order[start:start + size])
        start += size
    return batches


class _Float32(torch.nn.Module):
    """Runs the wrapped vocabulary head in float32 with autocast off."""

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            return self.head(hidden.float())


class TeacherScorer:
    """A teacher MLM and its prompt encoder; scores tables of examples (`text_a`, and
    `text_b` for two-sentence tasks) at the mask."""

    def __init__(self, teacher: str, task: Task, max_length: int, device: torch.device | str = "cpu"):
        teacher = local_model_dir(teacher)  # an s3:// teacher is fetched once per node
        self.encoder = PromptEncoder(load_tokenizer(teacher), task, max_length)
        self.device = torch.device(device)
        self.half = None
        if self.device.type == "cuda":
            self.half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        mlm = load_mlm(teacher)
        head = mlm_head(mlm)
        if head is not None:  # a no-op without autocast
            name = next(n for n, m in mlm.named_children() if m is head)
            setattr(mlm, name, _Float32(head))
        self.model = LogitsAt(mlm).to(self.device).eval()

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_pos: torch.Tensor) -> torch.Tensor:
        """float32 vocabulary logits at each row's mask, `[B, V]`, on the scorer's device."""
        autocast = (torch.autocast(self.device.type, dtype=self.half) if self.half is not None
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            logits, _ = self.model(input_ids.to(self.device), attention_mask.to(self.device),
                                   mask_pos.to(self.device))
        return logits.float()

    def encode(self, table: pa.Table) -> list[dict]:
        texts_b = table["text_b"].to_pylist() if self.encoder.task.num_inputs == 2 else [None] * table.num_rows
        return [self.encoder.encode(a, b) for a, b in zip(table["text_a"].to_pylist(), texts_b)]

    def score(self, encoded: list[dict], batch_size: int,
              reduce: Callable[[torch.Tensor], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """`reduce(logits [B, V])` for every encoded row, batched by length, in row order."""
        pad = self.encoder.tokenizer.pad_token_id
        parts, rows = [], []
        for index in length_batches([len(e["input_ids"]) for e in encoded], batch_size):
            ids, mask = pad_ids([encoded[i]["input_ids"] for i in index], pad)
            pos = torch.tensor([encoded[i]["mask_pos"] for i in index])
            parts.append({k: v.cpu() for k, v in reduce(self.logits(ids, mask, pos)).items()})
            rows.append(torch.as_tensor(index))
        inverse = torch.argsort(torch.cat(rows))
        return {k: torch.cat([p[k] for p in parts])[inverse] for k in parts[0]}

    def topk(self, table: pa.Table, k: int, batch_size: int) -> dict[str, pa.Array]:
        """The teacher cache's columns for `table`'s rows (see `topk_summary`), plus the
        unpadded `input_ids` and `mask_pos` the student will read."""
        encoded = self.encode(table)
        s = self.score(encoded, batch_size, lambda logits: topk_summary(logits, k))
        return {
            "input_ids": pa.array([e["input_ids"] for e in encoded], type=pa.list_(pa.int32())),
            "mask_pos": pa.array([e["mask_pos"] for e in encoded], type=pa.int32()),
            "topk_values": fixed_lists(s["topk_values"].half(), pa.float16()),
            "topk_indices": fixed_lists(s["topk_indices"], pa.int32()),
            "lse": pa.array(s["lse"].numpy(), type=pa.float32()),
            "covered": pa.array(s["covered"].numpy(), type=pa.float32()),
        }

    def label_probs(self, table: pa.Table, batch_size: int) -> pa.Array:
        """Softmax over the task's label words at the mask, `fixed_size_list<float32, C>`."""
        words = self.encoder.label_word_ids
        s = self.score(self.encode(table), batch_size,
                       lambda logits: {"probs": class_logits(logits, words).softmax(-1)})
        return fixed_lists(s["probs"], pa.float32())


def topk_summary(logits: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """The cache's per-example record of float32 logits `[B, V]`: top-k values (descending)
    and indices, log-sum-exp of all V logits, and the probability mass the top-k covers.
    Values and lse are shifted by the top logit, so values are <= 0 (why: the cache's
    module docstring)."""
    values, indices = logits.topk(k, dim=-1)
    top = values[:, :1]
    values, lse = values - top, (logits - top).logsumexp(-1)
    return {
        "topk_values": values,
        "topk_indices": indices.to(torch.int32),
        "lse": lse,
        "covered": (values.logsumexp(-1) - lse).exp(),
    }


def fixed_lists(x: torch.Tensor, value_type: pa.DataType) -> pa.Array:
    """`[B, k]` as `fixed_size_list<k>`: Ray Data hands it to torch as a plain 2-D array."""
    flat = pa.array(x.detach().cpu().reshape(-1).numpy(), type=value_type)
    return pa.FixedSizeListArray.from_arrays(flat, x.shape[-1])
