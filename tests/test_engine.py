import pytest
import torch

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


def test_export_is_fp32_from_a_bf16_model(tiny_bert, tmp_path):
    """A bf16 (DeepSpeed bf16) module exports fp32 weights that transformers loads as fp32."""
    from transformers import AutoModelForMaskedLM

    from rayapp.train.engine import save_hf

    model = AutoModelForMaskedLM.from_pretrained(tiny_bert).to(torch.bfloat16)
    save_hf(model, tmp_path / "out")
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "out")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}


def test_checkpoint_weights_load_strictly(tiny_bert):
    """Only tied weights may be missing from a checkpoint; anything else is an error."""
    from transformers import AutoModelForMaskedLM

    from rayapp.train.engine import load_hf_weights

    model = AutoModelForMaskedLM.from_pretrained(tiny_bert)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "decoder.weight" not in k}
    load_hf_weights(model, weights)  # the decoder is tied to the word embeddings
    weights.pop(next(k for k in weights if "LayerNorm" in k))
    with pytest.raises(ConfigError, match="checkpoint does not match the model: missing"):
        load_hf_weights(model, weights)


def test_deepspeed_load_weights_updates_the_fp32_master(ray_cluster, tmp_path):
    """`Engine.load_weights` also refreshes ZeRO's fp32 master partition, so the next
    checkpoint's optimizer shard holds the loaded (e.g. best-on-dev) weights."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    def _deepspeed_load_weights_loop(config):  # defined here: workers cannot import test modules
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from rayapp.train.engine import Engine
        from rayapp.train.loop import snapshot

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        engine = Engine(model, EngineConfig(engine="deepspeed", use_gpu=False, zero_stage=2), lr=0.1, weight_decay=0.0,
                        warmup_steps=0, total_steps=10, micro_batch=4, grad_accum=1)
        batch = {"x": torch.randn(4, 4), "y": torch.tensor([0, 1, 0, 1])}
        loss_fn = lambda m, b: (torch.nn.functional.cross_entropy(m(b["x"]), b["y"]), {})  # noqa: E731
        engine.train_step([batch], loss_fn)
        kept = snapshot(engine.module)
        for _ in range(3):
            engine.train_step([batch], loss_fn)
        engine.load_weights(kept)
        engine.model.save_checkpoint(config["dir"], tag="t")
        master = get_fp32_state_dict_from_zero_checkpoint(config["dir"], tag="t")
        diff = max(float((master[k] - v).abs().max()) for k, v in kept.items())
        assert diff < 1e-6, f"fp32 master differs from the loaded weights by {diff}"

    trainer = TorchTrainer(_deepspeed_load_weights_loop, train_loop_config={"dir": str(tmp_path / "ds")},
                           torch_config=TorchConfig(backend="gloo"),
                           scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
                           run_config=RunConfig(name="ds", storage_path=str(tmp_path)))
    trainer.fit()  # raises if the worker's assertion failed


def test_progress_without_a_terminal_is_plain_lines(monkeypatch, caplog):
    """A captured log (`ray job submit`, `make demo > log`) gets a line per tenth of the run,
    no cursor escapes, as log records (a worker's print is logged and echoed by Ray Train V2,
    so it showed twice); a resumed run counts from where it resumed."""
    import logging

    from types import SimpleNamespace

    import ray.train

    from rayapp.train.loop import Progress

    monkeypatch.setattr(ray.train, "get_context", lambda: SimpleNamespace(get_world_rank=lambda: 0))
    caplog.set_level(logging.INFO, logger="rayapp.train.loop")
    bar = Progress("prompt SST-2", 20, initial=10, live=False)
    for _ in range(10):
        bar.update(loss="0.5000")
    bar.close()
    out = "\n".join(r.getMessage() for r in caplog.records)
    assert out.splitlines() == [f"prompt SST-2 loss=0.5000 step {s}/20" for s in range(12, 21, 2)]
    assert "\x1b" not in out and "\r" not in out


def test_ray_train_loggers_named_by_file_are_held_to_warnings():
    """Ray Train V2 logs "Reporting training result N" through getLogger(__file__), which the
    run's LoggingConfig(log_level=WARNING) does not reach; the loop holds those to WARNING."""
    import logging
    import os

    from rayapp.train.loop import quiet_train_file_loggers

    train = logging.getLogger(os.path.join(os.sep, "venv", "ray", "train", "v2", "_internal", "context.py"))
    other = logging.getLogger(os.path.join(os.sep, "venv", "mylib", "context.py"))
    quiet_train_file_loggers()
    assert not train.isEnabledFor(logging.INFO) and train.isEnabledFor(logging.WARNING)
    assert other.level == logging.NOTSET
