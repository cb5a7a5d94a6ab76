"""The training stream: a deterministic, shuffled, exactly resumable row order per worker."""
import numpy as np
import pyarrow as pa
import pytest

from rayapp.data.shards import write_table
from rayapp.errors import DataError
from rayapp.train.stream import ROW_ID, plan_blocks, worker_rows


@pytest.fixture
def shards(tmp_path):
    uris = []
    for i, n in enumerate((50, 37, 13)):
        uri = str(tmp_path / f"part-{i:05d}.parquet")
        write_table(uri, pa.table({"x": [f"{i}-{j}" for j in range(n)]}))
        uris.append(uri)
    return uris


def _take(rows, n):
    out = []
    while len(out) < n:
        out += next(rows).column("x").to_pylist()
    return out[:n]


def test_every_row_once_per_epoch_split_over_workers(shards):
    blocks = plan_blocks(shards, world=2)
    order = np.random.default_rng([7, 0]).permutation(len(blocks))  # epoch 0's block order
    per_rank = [sum(blocks[b].stop - blocks[b].start for b in order[r::2]) for r in range(2)]
    epoch = [_take(worker_rows(blocks, 7, r, 2), per_rank[r]) for r in range(2)]
    assert sorted(epoch[0] + epoch[1]) == sorted(f"{i}-{j}" for i, n in enumerate((50, 37, 13)) for j in range(n))


def test_order_is_seeded_and_resumes_exactly(shards):
    blocks = plan_blocks(shards, world=2)
    first = _take(worker_rows(blocks, 7, 0, 2), 150)  # crosses into the next epochs
    assert first == _take(worker_rows(blocks, 7, 0, 2), 150)
    assert first != _take(worker_rows(blocks, 8, 0, 2), 150)
    for skip in (0, 1, 13, 49, 51, 120):
        assert _take(worker_rows(blocks, 7, 0, 2, skip=skip), 150 - skip) == first[skip:]
    ids = next(worker_rows(blocks, 7, 1, 2)).column(ROW_ID).to_pylist()
    assert len(set(ids)) == len(ids)


def test_too_little_data_for_the_workers(tmp_path):
    uri = str(tmp_path / "one.parquet")
    write_table(uri, pa.table({"x": ["a"]}))
    with pytest.raises(DataError, match="has 1 rows, fewer than the 2 workers"):
        plan_blocks([uri], world=2)
