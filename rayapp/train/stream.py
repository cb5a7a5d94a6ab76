"""Training input: each worker's deterministic, shuffled, exactly resumable stream of rows
from a finished rayapp data folder (parquet shards listed in its `_meta.json`).

Why not Ray Data's `streaming_split`: its split of rows across workers depends on timing,
so after a restart the "next" batches are not the ones the run had not seen, and skipping
the consumed ones means reading them again. Here the order is a pure function of
(seed, epoch, rank): the shards' row groups are cut into blocks of at most `block_rows`
rows (planned on the driver from parquet metadata, nothing read); every epoch permutes the
blocks with the seed, worker `rank` takes every `world`-th block of that order, and the
rows inside a block are permuted too (block order + a block-sized local shuffle). A
worker's rows form one endless sequence, so resuming after `n` consumed rows is arithmetic:
whole blocks are skipped by their row counts, and only the block holding row `n` is read.
The data stages (Ray Data) produce these folders; training reads them directly. The
recipes pass `shards.shard_uris(folder)`, which checks every shard against `_meta.json` on
the driver (rows, size, footer); workers read through `shards.open_shard`, so a page whose
CRC fails, or a shard damaged since, is one DataError naming the file and how to rebuild it.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa

from rayapp.data.shards import open_shard
from rayapp.errors import DataError
from rayapp.train.worker import worker

ROW_ID = "_row"  # (block, row) identity of every row, for the loop's data digest


@dataclass(frozen=True)
class Block:
    uri: str
    row_group: int
    start: int   # rows [start, stop) of the row group
    stop: int


def plan_blocks(uris: list[str], world: int, block_rows: int = 4096) -> list[Block]:
    """Blocks of the shards' row groups, small enough that every worker gets several."""
    groups = []
    for uri in uris:
        with open_shard(uri) as f:
            meta = f.metadata
        groups += [(uri, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
    total = sum(n for *_, n in groups)
    if total < world:
        raise DataError(f"the data ({', '.join(uris[:3])}...) has {total} rows, fewer than the {world} workers")
    size = max(1, min(block_rows, math.ceil(total / (world * 8))))
    return [Block(uri, g, s, min(s + size, n)) for uri, g, n in groups for s in range(0, n, size)]


def _read(block: Block) -> pa.Table:
    with open_shard(block.uri) as f:
        table = f.read_row_group(block.row_group)
    return table.slice(block.start, block.stop - block.start)


def worker_rows(blocks: list[Block], seed: int, rank: int, world: int, skip: int = 0) -> Iterator[pa.Table]:
    """Worker `rank`'s endless row sequence as tables, from row `skip` on (see module doc)."""
    epoch = 0
    while True:
        for b in np.random.default_rng([seed, epoch]).permutation(len(blocks))[rank::world]:
            block = blocks[b]
            n = block.stop - block.start
            if skip >= n:
                skip -= n
                continue
            order = np.random.default_rng([seed, epoch, b]).permutation(n)[skip:]
            skip = 0
            table = _read(block).take(order)
            yield table.append_column(ROW_ID, pa.array(b * (1 << 32) + order.astype(np.int64)))
        epoch += 1


def stream_batches(blocks: list[Block], to_batch: Callable[[dict], dict], micro: int, accum: int,
                   first_step: int, seed: int) -> Iterator[list[dict]]:
    """`accum` micro-batches of `micro` rows per optimizer step, resuming after `first_step`
    steps without reading what they consumed. Each micro-batch carries its rows' ids under
    `_row` (numpy; the loop takes them out with `pop_digest`)."""
    w = worker()
    rows = worker_rows(blocks, seed, w.rank, w.world_size, first_step * accum * micro)
    pending: list[pa.Table] = []
    have = 0
    while True:
        step = []
        for _ in range(accum):
            while have < micro:
                table = next(rows)
                pending.append(table)
                have += len(table)
            table = pa.concat_tables(pending)
            pending, have = [table.slice(micro)], len(table) - micro
            data = table.slice(0, micro).to_pydict()
            ids = np.asarray(data.pop(ROW_ID))
            batch = to_batch(data)
            batch[ROW_ID] = ids
            step.append(batch)
        yield step


def pop_digest(batches: list[dict]) -> int | None:
    """Remove the rows' ids from one step's micro-batches; a short fingerprint of them (equal
    digests: the same rows, in the same order), None for batches without ids."""
    ids = [b.pop(ROW_ID) for b in batches if ROW_ID in b]
    return zlib.crc32(b"".join(np.asarray(i).tobytes() for i in ids)) if ids else None
