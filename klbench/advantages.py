"""Advantage estimators of the GRPO family, as pure functions over per-sample rewards.

All take `rewards` `[N]` with the G samples of each prompt contiguous (N = B * G) and return
per-sample advantages `[N]`; the loop broadcasts them over response tokens and subtracts the
(β-scaled) KL penalty when the KL term sits in the reward. Keeping the KL penalty outside the
normalisation keeps β on the same scale for every placement (see README, "Which KL term").
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from klbench.config import Advantage


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:  # [B, G]
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.view(-1, group_size)


def grpo(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO (Shao et al. 2024): (r - mean_group) / (std_group + eps), unbiased std."""
    r = _groups(rewards, group_size)  # [B, G]
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).flatten()


def dr_grpo(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025): r - mean_group, no std normalisation."""
    r = _groups(rewards, group_size)
    return (r - r.mean(1, keepdim=True)).flatten()


def rloo(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): r - mean of the other G-1 samples of the same prompt."""
    r = _groups(rewards, group_size)
    others = (r.sum(1, keepdim=True) - r) / (group_size - 1)
    return (r - others).flatten()


def reinforce_pp(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE++ with group baseline (Hu 2025): r - mean_group, then whitened over the batch."""
    a = dr_grpo(rewards, group_size)
    return (a - a.mean()) / (a.std() + eps) if a.numel() > 1 else a


ADVANTAGES: dict[Advantage, Callable[..., torch.Tensor]] = {Advantage.grpo: grpo, Advantage.dr_grpo: dr_grpo,
    Advantage.rloo: rloo, Advantage.reinforce_pp: reinforce_pp}


def compute(name: str, rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Advantages `[N]` of the estimator `name` (an unknown name raises, listing the valid ones)."""
    return ADVANTAGES[Advantage(name)](rewards, group_size, eps)
