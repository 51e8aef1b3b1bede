"""The learning-rate schedule both backends use (`trainer.lr_schedule`, `trainer.warmup_steps`)."""

from __future__ import annotations

import math

from klbench.config import TrainerConfig


def lr_lambda(cfg: TrainerConfig):
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        if cfg.lr_schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f
