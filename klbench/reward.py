"""Rewards: score one completion against its example.

`build_reward(cfg)` returns a `RewardFn(completion, finished, example) -> Scored`. `finished` says
whether the completion ended with EOS (a truncated answer never counts as correct).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from klbench.config import DataConfig
from klbench.data import synthetic
from klbench.data.example import Example


@dataclass
class Scored:
    reward: float
    correct: bool
    extras: dict[str, float] = field(default_factory=dict)  # per-sample diagnostics, averaged into reward/<key>


RewardFn = Callable[[str, bool, Example], Scored]


def arithmetic_reward(trait_bonus: float) -> RewardFn:
    """1 for the exact final answer followed by EOS; + trait_bonus for π_ref's rare trailing space."""

    def score(completion: str, finished: bool, example: Example) -> Scored:
        correct, trait = synthetic.check(completion, finished, example.answer)
        return Scored(float(correct) + trait_bonus * trait, correct, {"trait": float(trait)})

    return score


def build_reward(cfg: DataConfig) -> RewardFn:
    kind = cfg.reward
    if kind == "auto":
        kind = "arithmetic" if cfg.source == "synthetic" else "math"
    if kind == "arithmetic":
        return arithmetic_reward(cfg.trait_bonus)
    raise ValueError(f"data.reward={cfg.reward!r} is not available yet")
