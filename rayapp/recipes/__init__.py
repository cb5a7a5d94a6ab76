"""Recipes: a typed config (extending `train.config.TrainConfig`), a `setup` for the shared
loop, objectives in `recipes.objectives`, and `run(cfg, callbacks=()) -> record`.

`RECIPES` is the one registry (the CLI and `rayapp sweep` find recipes here): adding a
recipe is one entry."""
from __future__ import annotations

import importlib
from typing import Callable

from rayapp.errors import ConfigError

RECIPES: dict[str, tuple[str, str]] = {  # name -> (module, config class)
    "finetune": ("rayapp.recipes.finetune", "FinetuneConfig"),
    "distill": ("rayapp.recipes.distill", "DistillConfig"),
    "ppt": ("rayapp.recipes.ppt", "PPTConfig"),
    "pretrain": ("rayapp.recipes.pretrain", "PretrainConfig"),
    "prompt-distill": ("rayapp.recipes.prompt_distill", "PromptDistillConfig"),
    "setfit": ("rayapp.recipes.setfit", "SetFitConfig"),  # needs the setfit extra
}


def get_recipe(name: str) -> tuple[type, Callable[..., dict]]:
    """(config class, run function) of recipe `name`."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}")
    module, config = RECIPES[name]
    mod = importlib.import_module(module)
    return getattr(mod, config), mod.run
