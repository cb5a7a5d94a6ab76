import json

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


def _fit_on_workers(loop, config: dict, tmp_path, num_workers: int, launcher: str = "train") -> None:
    """Run `loop` on `num_workers` CPU Ray Train workers (gloo), or with `launcher="auto"` on
    the launcher rayapp picks (one DDP worker: a Ray task), through rayapp's launcher (the
    loop's Engine asks its worker for its device and rank); raises if a worker failed."""
    from rayapp.train.launch import launch

    launch(loop, config, EngineConfig(num_workers=num_workers, cpus_per_worker=0.5, use_gpu=False, launcher=launcher),
           storage=str(tmp_path / "ray"), name="run")


@pytest.fixture(scope="module")
def one_worker_deepspeed(ray_cluster, tmp_path_factory) -> dict:
    """The one-worker DeepSpeed checks of the two tests below, run in one Ray Train run (its
    start-up is most of a check's time): check name -> None where it passed, else its error."""

    def _checks_loop(config):  # defined here: workers cannot import test modules
        import json
        import traceback
        from pathlib import Path

        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from rayapp.train.engine import Engine
        from rayapp.train.loop import snapshot

        def engine(zero_stage: int, lr: float, precision: str = "fp32") -> tuple[Engine, dict]:
            """A seeded two-layer model under DeepSpeed, and a batch drawn after it (as each
            check drew its own when it ran alone)."""
            torch.manual_seed(0)
            ds = Engine(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)),
                        EngineConfig(engine="deepspeed", use_gpu=False, zero_stage=zero_stage, precision=precision),
                        lr=lr, weight_decay=0.0, warmup_steps=0, total_steps=10, micro_batch=4, grad_accum=1)
            return ds, {"x": torch.randn(4, 4), "y": torch.tensor([0, 1, 0, 1])}

        def load_weights_updates_the_fp32_master():
            ds, batch = engine(zero_stage=2, lr=0.1)
            loss_fn = lambda m, b: (torch.nn.functional.cross_entropy(m(b["x"]), b["y"]), {})  # noqa: E731
            ds.train_step([batch], loss_fn)
            kept = snapshot(ds.module)
            for _ in range(3):
                ds.train_step([batch], loss_fn)
            ds.load_weights(kept)
            ds.model.save_checkpoint(config["dir"], tag="t")
            master = get_fp32_state_dict_from_zero_checkpoint(config["dir"], tag="t")
            diff = max(float((master[k] - v).abs().max()) for k, v in kept.items())
            assert diff < 1e-6, f"fp32 master differs from the loaded weights by {diff}"

        def zero0_bf16_exports_its_fp32_copies():
            ds, batch = engine(zero_stage=0, lr=1e-2, precision="bf16")

            def loss_fn(m, b):  # the module is bf16 under DeepSpeed
                return torch.nn.functional.cross_entropy(m(b["x"].to(torch.bfloat16)).float(), b["y"]), {}

            for _ in range(3):
                ds.train_step([batch], loss_fn)
            exported, module = ds.export_state(), ds.module.state_dict()
            assert exported.keys() == module.keys()
            for k, v in exported.items():
                assert v.dtype == torch.float32 and torch.equal(v.to(torch.bfloat16), module[k]), k
            assert any(not torch.equal(v, module[k].float()) for k, v in exported.items())

        results = {}
        for check in (load_weights_updates_the_fp32_master, zero0_bf16_exports_its_fp32_copies):
            try:
                check()
                results[check.__name__] = None
            except Exception:  # noqa: BLE001 - reported by the check's own test
                results[check.__name__] = traceback.format_exc()
        Path(config["results"]).write_text(json.dumps(results))

    out = tmp_path_factory.mktemp("deepspeed-one-worker")
    _fit_on_workers(_checks_loop, {"dir": str(out / "ds"), "results": str(out / "results.json")}, out, 1)
    return json.loads((out / "results.json").read_text())


def test_deepspeed_load_weights_updates_the_fp32_master(one_worker_deepspeed):
    """`Engine.load_weights` also refreshes ZeRO's fp32 master partition, so the next
    checkpoint's optimizer shard holds the loaded (e.g. best-on-dev) weights."""
    assert one_worker_deepspeed["load_weights_updates_the_fp32_master"] is None, \
        one_worker_deepspeed["load_weights_updates_the_fp32_master"]


def test_deepspeed_bf16_exports_the_fp32_master_weights(ray_cluster, tiny_bert, tmp_path):
    """A ZeRO-2 bf16 run on 2 workers exports the fp32 master weights of the optimizer
    shards, not the bf16 module cast up; its shards load back weights-only, and a shard
    holding a pickled object is refused."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file
    from transformers import AutoModelForMaskedLM

    def _bf16_export_loop(config):  # defined here: workers cannot import test modules
        import shutil
        from pathlib import Path

        import ray.train
        import torch.distributed as dist
        from transformers import AutoModelForMaskedLM

        from rayapp.errors import DataError
        from rayapp.train.engine import Engine

        rank = ray.train.get_context().get_world_rank()
        engine = Engine(AutoModelForMaskedLM.from_pretrained(config["model"]),
                        EngineConfig(engine="deepspeed", zero_stage=2, precision="bf16", num_workers=2, use_gpu=False),
                        lr=1e-2, weight_decay=0.01, warmup_steps=0, total_steps=10, micro_batch=2, grad_accum=1)
        ids = torch.randint(1000, 2000, (2, 8), generator=torch.Generator().manual_seed(rank))
        for _ in range(3):
            engine.train_step([{"input_ids": ids, "labels": ids}], lambda m, b: (m(**b).loss, {}))
        out = Path(config["dir"])
        engine.save(out, {"step": 3})
        if rank == 0:
            torch.save({k: v.float() for k, v in engine.hf_model.state_dict().items()}, out / "bf16.pt")
            bad = out.parent / "tampered"
            shutil.copytree(out, bad)

            class Payload:
                def __reduce__(self):
                    return (open, (config["marker"], "w"))

            torch.save({"module": Payload()}, bad / "deepspeed" / "state" / "mp_rank_00_model_states.pt")
        dist.barrier()
        assert engine.load(out) == {"step": 3}  # DeepSpeed's own files pass the weights-only load
        try:
            engine.load(out.parent / "tampered")
        except DataError as e:
            assert "mp_rank_00_model_states.pt holds pickled objects" in str(e), e
        else:
            raise AssertionError("a shard holding a pickled object was loaded")

    out, marker = tmp_path / "ckpt", tmp_path / "ran"
    _fit_on_workers(_bf16_export_loop, {"model": tiny_bert, "dir": str(out), "marker": str(marker)}, tmp_path, 2)
    assert not marker.exists()
    exported = load_file(out / "model" / "model.safetensors")
    master = get_fp32_state_dict_from_zero_checkpoint(str(out / "deepspeed"), tag="state")
    bf16 = torch.load(out / "bf16.pt", weights_only=True)
    names = [n for n, _ in AutoModelForMaskedLM.from_pretrained(tiny_bert).named_parameters()]
    assert {exported[n].dtype for n in names} == {torch.float32}
    assert max(float((exported[n] - master[n].detach()).abs().max()) for n in names) <= 1e-7
    # the bf16 module, cast up, is what the export must not be
    assert max(float((exported[n] - bf16[n]).abs().max()) for n in names) > 1e-5


def test_deepspeed_zero0_bf16_exports_its_fp32_copies(one_worker_deepspeed):
    """ZeRO 0 keeps whole fp32 copies beside the bf16 module (no ZeRO partitions): the export
    is those, so it rounds to the module's weights exactly and is not the module cast up."""
    assert one_worker_deepspeed["zero0_bf16_exports_its_fp32_copies"] is None, \
        one_worker_deepspeed["zero0_bf16_exports_its_fp32_copies"]


def test_a_checkpoint_holding_a_pickled_object_is_refused(ray_cluster, tiny_bert, tmp_path):
    """`optimizer.pt` of a DDP checkpoint loads weights-only: what `save` writes loads, and
    a file holding a pickled object is refused with an error naming it, its code never run."""

    def _ddp_refuse_loop(config):
        from pathlib import Path

        from transformers import AutoModelForMaskedLM

        from rayapp.errors import DataError
        from rayapp.train.engine import Engine

        engine = Engine(AutoModelForMaskedLM.from_pretrained(config["model"]), EngineConfig(use_gpu=False),
                        lr=1e-3, weight_decay=0.01, warmup_steps=1, total_steps=10, micro_batch=2, grad_accum=1)
        ids = torch.randint(1000, 2000, (2, 8))
        engine.train_step([{"input_ids": ids, "labels": ids}], lambda m, b: (m(**b).loss, {}))
        out = Path(config["dir"])
        engine.save(out, {"step": 1})
        assert engine.load(out) == {"step": 1}

        class Payload:
            def __reduce__(self):
                return (open, (config["marker"], "w"))

        torch.save({"optimizer": Payload(), "scheduler": {}}, out / "optimizer.pt")
        try:
            engine.load(out)
        except DataError as e:
            assert "optimizer.pt holds pickled objects rayapp does not write" in str(e) and "open" in str(e), e
        else:
            raise AssertionError("an optimizer.pt holding a pickled object was loaded")

    marker = tmp_path / "ran"
    # one DDP worker: the local launcher, as a one-worker run takes (no Ray Train start-up)
    _fit_on_workers(_ddp_refuse_loop, {"model": tiny_bert, "dir": str(tmp_path / "ckpt"), "marker": str(marker)},
                    tmp_path, 1, launcher="auto")
    assert not marker.exists()


def test_progress_without_a_terminal_is_plain_lines(caplog, tmp_path):
    """A captured log (`ray job submit`, `make demo > log`) gets a line per tenth of the run,
    no cursor escapes, as log records (a worker's print is logged and echoed by Ray Train V2,
    so it showed twice); a resumed run counts from where it resumed."""
    import logging

    from rayapp.train.loop import Progress
    from rayapp.train.worker import LocalWorker, running_on

    caplog.set_level(logging.INFO, logger="rayapp.train.loop")
    with running_on(LocalWorker(str(tmp_path / "run"), keep=1, use_gpu=False)):
        bar = Progress("prompt SST-2", 20, initial=10, live=False)
        for _ in range(10):
            bar.update(loss="0.5000")
        bar.close()
    out = "\n".join(r.getMessage() for r in caplog.records)
    assert out.splitlines() == [f"prompt SST-2 loss=0.5000 step {s}/20" for s in range(12, 21, 2)]
    assert "\x1b" not in out and "\r" not in out


def test_importing_rayapp_makes_full_collections_rare_and_keeps_a_rarer_setting():
    """A rayapp process imports torch, transformers and Ray first: with CPython's default
    thresholds (700, 10, 10) full collections over those objects were 11-19% of the imports'
    CPU (benchmarks/startup.py). Importing rayapp raises the third threshold to 1000 and keeps
    the first two, and leaves a user's higher one as it is."""
    import subprocess
    import sys

    show = "import gc; {}; import rayapp; print(*gc.get_threshold())"
    got = [subprocess.run([sys.executable, "-c", show.format(before)], capture_output=True, text=True,
                          check=True).stdout.split() for before in ("pass", "gc.set_threshold(500, 20, 5000)")]
    assert got == [["700", "10", "1000"], ["500", "20", "5000"]]


def test_a_new_ray_worker_has_rayapps_thresholds_before_it_imports_anything(ray_cluster):
    """A Train worker, Tune trial or Ray Data actor imports Ray Train, Tune or Data (and torch)
    for its actor before anything of rayapp: the setup hook (`rayapp.env.SETUP_HOOK`) gives it
    rayapp's thresholds first. A task in a new worker (its own runtime env) sees them with
    torch not yet imported."""
    import uuid

    def thresholds():  # local: pickled by value, so the worker imports nothing of this module
        import gc
        import sys

        return gc.get_threshold(), "torch" in sys.modules

    fresh = {"env_vars": {"RAYAPP_TEST_FRESH_WORKER": uuid.uuid4().hex}}  # no warm worker matches it
    assert ray_cluster.get(ray_cluster.remote(thresholds).options(runtime_env=fresh).remote()) == ((700, 10, 1000), False)


def test_a_reused_process_frees_the_last_runs_cycles_before_the_next_run(tmp_path):
    """Full collections are rare in a rayapp process, so a run that ends with its model in a
    reference cycle (a failed run's traceback holds one) would keep it through the next run
    of a reused Tune actor or Ray task worker; the next run frees it before it starts."""
    import gc
    import weakref

    import torch

    from rayapp.train.worker import LocalWorker, running_on

    class Held:
        pass

    with running_on(LocalWorker(str(tmp_path / "first"), keep=1, use_gpu=False)):
        held = Held()
        held.model, held.itself = torch.nn.Linear(64, 64), held
        gc.collect()  # the cycle survives into the oldest generation, as a run's model does
        model = weakref.ref(held.model)
        del held
    gc.collect(1)  # young collections do not reach it
    assert model() is not None
    with running_on(LocalWorker(str(tmp_path / "second"), keep=1, use_gpu=False)):
        assert model() is None


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


def test_a_local_run_trains_on_as_many_threads_as_it_holds_cpus(ray_cluster, tmp_path):
    """torch sizes its thread pool once per process, so a reused Ray worker kept the size of
    the task that first imported torch: the demo's 2-CPU distillation trained on 1 thread.
    A local worker sets it from the CPUs its task holds."""
    import torch

    from rayapp.train.worker import LocalWorker

    @ray_cluster.remote(num_cpus=2)
    def threads(run: str) -> tuple[int, int]:
        torch.set_num_threads(1)  # as a worker that imported torch for a one-CPU task
        before = torch.get_num_threads()
        LocalWorker(run, keep=1, use_gpu=False)
        return before, torch.get_num_threads()

    assert ray_cluster.get(threads.remote(str(tmp_path / "run"))) == (1, 2)
    mine = torch.get_num_threads()
    LocalWorker(str(tmp_path / "driver"), keep=1, use_gpu=False)  # a driver (no task) keeps its own
    assert torch.get_num_threads() == mine
