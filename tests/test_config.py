import pytest

from rayapp.config import load_config, parse_overrides
from rayapp.recipes.distill import DistillConfig
from rayapp.errors import ConfigError
from rayapp.recipes.finetune import FinetuneConfig


def test_yaml_plus_overrides(tmp_path):
    path = tmp_path / "ft.yaml"
    path.write_text("task: RTE\nlr: 1e-5\nengine:\n  num_workers: 2\n")
    cfg = load_config(FinetuneConfig, path, ["lr=2e-5", "engine.engine=deepspeed", "max_steps=10"])
    assert (cfg.task, cfg.lr, cfg.max_steps) == ("RTE", 2e-5, 10)
    assert (cfg.engine.num_workers, cfg.engine.engine) == (2, "deepspeed")


def test_distill_setting_presets_never_override_explicit_keys():
    cfg = load_config(DistillConfig, None, ["data=x", "setting=3"])
    assert (cfg.objective, cfg.teacher_mode, cfg.aux_weight) == ("ce+hidden", "online", 0.01)
    cfg = load_config(DistillConfig, None, ["data=x", "setting=3", "aux_weight=0.5"])
    assert cfg.aux_weight == 0.5


@pytest.mark.parametrize("overrides, message", [
    (["lrr=1e-5"], r"unknown config key\(s\) \['lrr'\] for FinetuneConfig; valid keys: .*'lr'"),
    (["engine.num_wokers=2"], r"unknown config key\(s\) \['engine.num_wokers'\]"),
    (["max_steps=lots"], "config key 'max_steps' must be of type int, got 'lots'"),
    (["method=distill"], r"config key 'method' must be one of \['prompt', 'prompt-tuning', 'classifier', 'zero-shot'\]"),
    (["engine.engine=horovod"], r"config key 'engine.engine' must be one of \['ddp', 'deepspeed'\]"),
    (["batch_size=0"], "batch_size must be > 0, got 0"),
    (["lr"], "override 'lr' is not of the form key=value"),
])
def test_bad_overrides(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(FinetuneConfig, None, overrides)


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(FinetuneConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(FinetuneConfig, bad)


def test_parse_overrides_nests_and_types():
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "d=true"]) == {"a": {"b": 1, "c": [1, 2]}, "d": True}


def test_user_error_raised_in_a_ray_task_comes_back_as_its_own_line():
    """Ray re-raises a worker's ConfigError as RayTaskError(ConfigError), which is both a
    ConfigError and a whole remote traceback: sweeps and the CLI show the user's line only."""
    from ray.exceptions import RayTaskError

    from rayapp.errors import find_user_error

    wrapped = RayTaskError("trial_fn", "Traceback ...\nConfigError: batch_size=3", ConfigError("batch_size=3")
                           ).as_instanceof_cause()
    assert isinstance(wrapped, ConfigError) and str(wrapped) != "batch_size=3"
    assert str(find_user_error(wrapped)) == "batch_size=3"
    assert find_user_error(RuntimeError("x")) is None


@pytest.mark.parametrize("recipe", ["distill", "pretrain"])
def test_a_recipe_that_exports_a_model_needs_steps(recipe):
    """0 steps save no weights (a zero-shot FT run's model is its input): nothing to export."""
    from rayapp.recipes.pretrain import PretrainConfig

    cls = DistillConfig if recipe == "distill" else PretrainConfig
    with pytest.raises(ConfigError, match="max_steps must be > 0: a .* of 0 steps has no"):
        load_config(cls, None, ["data=x", "max_steps=0"])
