"""jobs/: one thin entrypoint per stage, each config in jobs/configs/ valid for its stage.

(The entrypoints running under `ray job submit` on a real head node: tests/test_cluster.py.)"""
import importlib
import runpy
import sys
from pathlib import Path

import pytest

from rayapp.cli import build_parser
from rayapp.config import load_config

CONFIGS = Path(__file__).parent.parent / "jobs" / "configs"
# job module -> the `rayapp` command it runs
JOBS = {"intermediate": "intermediate", "teacher_cache": "teacher-cache", "distill": "distill",
        "finetune": "finetune", "evaluate": "evaluate", "sweep": "sweep", "prompt_distill": "prompt-distill",
        "report": "report", "predict": "predict", "ppt": "ppt", "backtranslate": "backtranslate",
        "lmbff_search": "lmbff-search"}


def _config_class(name: str):
    """The typed config a file in jobs/configs/ is for, by its name."""
    if name.startswith("distill-"):
        from rayapp.recipes.distill import DistillConfig
        return DistillConfig
    if name.startswith("ppt-"):
        from rayapp.recipes.ppt import PPTConfig
        return PPTConfig
    if name.startswith("finetune-"):
        from rayapp.recipes.finetune import FinetuneConfig
        return FinetuneConfig
    if name.startswith("backtranslate-"):
        from rayapp.data.backtranslate import BacktranslateConfig
        return BacktranslateConfig
    if name.startswith("lmbff-search"):
        from rayapp.tasks.search import SearchConfig
        return SearchConfig
    if name.startswith("teacher-cache-"):
        from rayapp.data.teacher_cache import CacheConfig
        return CacheConfig
    if name.startswith("intermediate-pairs"):
        from rayapp.data.pairs import PairsConfig
        return PairsConfig
    if name.startswith("predict"):
        from rayapp.ship.predict import PredictConfig
        return PredictConfig
    if name.startswith("intermediate-sentiment"):
        from rayapp.data.sentiment import SentimentConfig
        return SentimentConfig
    return None


MINE = sorted(p.name for p in CONFIGS.glob("*.yaml") if _config_class(p.name))


@pytest.mark.parametrize("name", MINE)
def test_every_config_loads_as_its_typed_config(name):
    cfg = load_config(_config_class(name), CONFIGS / name)
    local = name.endswith("_local.yaml")
    paths = [v for v in vars(cfg).values() if isinstance(v, str) and ("/" in v or v.startswith("s3:"))]
    # paper scale reads/writes S3 and names hub models; local ones stay on this machine
    assert any(p.startswith("s3://") for p in paths) != local, paths
    if local:
        assert all(not p.startswith("s3://") for p in paths)


def _gpu_flags(name: str) -> list[bool]:
    """Whether each run that runs a model on a config of jobs/configs/ takes GPUs, the config
    loaded as its job loads it: a Train run's engine, a data stage's scoring actors, every
    trial of a sweep (base < method < task overrides); [] for a stage without a model."""
    if name.startswith("sweep-"):
        from rayapp.sweep import tune
        from rayapp.sweep.spec import SweepConfig

        cfg = load_config(SweepConfig, CONFIGS / name)
        return [cfg.recipe_config(t, "check", tune._unfilled).engine.use_gpu for t in cfg.trials()]
    cfg = load_config(_config_class(name), CONFIGS / name)
    if hasattr(cfg, "engine"):
        return [cfg.engine.use_gpu]
    return [cfg.use_gpu] if hasattr(cfg, "use_gpu") else []


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_paper_scale_configs_run_their_models_on_gpus(name):
    """Paper scale trains and scores on the GPU worker group (a CPU DDP worker is the engine's
    default); the `_local` configs are for one CPU machine."""
    flags = _gpu_flags(name)
    if name.endswith("_local.yaml"):
        assert not any(flags), flags
    elif name.startswith("intermediate-pairs"):
        assert flags == []  # sentence pairs: text only, the CPU worker group
    else:
        assert flags and all(flags), flags


def test_local_configs_sit_next_to_paper_scale_ones():
    for name in MINE:
        if name.endswith("_local.yaml"):
            assert (CONFIGS / name.replace("_local.yaml", ".yaml")).exists() or \
                   any(CONFIGS.glob(name.replace("_local.yaml", "-*.yaml"))), name


@pytest.mark.parametrize("module", sorted(JOBS))
def test_each_job_runs_its_rayapp_command(module, monkeypatch, capsys):
    """`python -m jobs.X --help` is `rayapp <command> --help`: the job is only a door to the CLI."""
    commands = build_parser()._subparsers._group_actions[0].choices
    if JOBS[module] not in commands:
        importlib.import_module(f"jobs.{module}")  # importable as a package module (`python -m jobs.X`)
        pytest.skip(f"`rayapp {JOBS[module]}` is not in the CLI yet")
    monkeypatch.setattr(sys, "argv", [f"jobs/{module}.py", "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module(f"jobs.{module}", run_name="__main__")
    assert done.value.code == 0
    assert f"rayapp {JOBS[module]}" in capsys.readouterr().out
