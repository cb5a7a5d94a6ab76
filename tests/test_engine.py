import pytest

from rayapp.train.engine import EngineConfig, global_batch_indices, shard, split_batch
from rayapp.errors import ConfigError


def test_split_batch_keeps_the_global_batch():
    assert split_batch(128, 2) == (64, 1)
    assert split_batch(128, 2, max_device_batch=16) == (16, 4)
    assert split_batch(12, 1, max_device_batch=5) == (4, 3)  # 12 = 3 x 4, never 5 + 5 + 2
    with pytest.raises(ConfigError, match=r"batch_size=6 \(global\) cannot be split evenly over 4 workers"):
        split_batch(6, 4)


def test_global_batches_are_seeded_epochs():
    n, b = 10, 4
    epoch0 = global_batch_indices(n, b, 0, seed=1) + global_batch_indices(n, b, 1, seed=1)
    assert len(set(epoch0)) == 8  # no repeats inside an epoch
    assert global_batch_indices(n, b, 3, seed=1) == global_batch_indices(n, b, 3, seed=1)
    assert global_batch_indices(n, b, 0, seed=1) != global_batch_indices(n, b, 0, seed=2)
    assert shard(list(range(8)), 1, 2) == [4, 5, 6, 7]


def test_engine_config_errors():
    with pytest.raises(ConfigError, match="stages 0-2 are supported"):
        EngineConfig(engine="deepspeed", zero_stage=3)
    with pytest.raises(ConfigError, match="fp16 needs engine=deepspeed"):
        EngineConfig(precision="fp16")
