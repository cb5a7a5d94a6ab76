"""`TrainConfig`: the fields every training recipe has. A recipe's config extends it and
declares only its own fields (TRL's `GKDConfig(SFTConfig)` style); a recipe that wants
another default redeclares the field."""
from __future__ import annotations

from dataclasses import dataclass, field

from rayapp.config import OutputPath
from rayapp.errors import ConfigError
from rayapp.train.engine import EngineConfig


@dataclass
class TrainConfig:
    batch_size: int = 32                # global: examples per optimizer step over all workers
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    max_steps: int = 1000
    eval_every: int = 0                 # evaluate every N steps and at the end; 0 = only at the end
    checkpoint_every: int = 1000        # recipes that keep the best evaluation checkpoint when it improves
    log_every: int = 10                 # loss/throughput curve points
    # steps whose model is kept besides the checkpoints, as <run>/models/step-<N> (an HF
    # directory; 0 = the model before training): SMASH Figure 2 fine-tunes from each
    keep_steps: list[int] = field(default_factory=list)
    train_seed: int = 42                # model init, data order, masking
    output_dir: OutputPath = "runs"     # local dir or s3:// URI; runs live in <output_dir>/<name>
    name: str | None = None             # default: derived from the config, so a re-run resumes
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        self.require_positive("batch_size", "checkpoint_every", "log_every")
        for key in ("max_steps", "eval_every", "warmup_ratio", "weight_decay"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if any(s < 0 or s > self.max_steps for s in self.keep_steps):
            raise ConfigError(f"keep_steps must lie in 0..max_steps ({self.max_steps}), got {self.keep_steps}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")

    def require_positive(self, *keys: str) -> None:
        """One ConfigError naming the first of `keys` (fields of this config) that is not > 0."""
        for key in keys:
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)}")
