"""Masked tensor reductions shared by the KL terms (klbench.kl) and the policy losses (klbench.losses).

Both must aggregate over tokens the same way: the token-level repairs of docs/theory.md (k3 in both,
k2-as-loss + future-token k1 in reward) only hold when the loss part and the reward part use
one aggregation. Pure functions over tensors; no config, no logging.
"""

from __future__ import annotations

import torch

from klbench.config import LossAgg


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `x` where `mask` is 1 (over all elements, or along `dim`)."""
    x = x * mask
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` where `mask` is 1; rows with an empty mask give 0, not NaN."""
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1)


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str = "seq_mean_token_mean") -> torch.Tensor:
    """Reduce per-token `values` `[B, T]` over response tokens (`mask` `[B, T]`) to a scalar:
    - seq_mean_token_mean: mean over each sequence's response tokens, then over sequences (GRPO)
    - token_mean: one mean over every response token of the batch (DAPO / TRL "dapo")
    - seq_mean_token_sum: sum over each sequence's tokens, then mean over sequences (Dr. GRPO, the theory's sums)
    """
    mode = LossAgg(mode)
    if mode == LossAgg.seq_mean_token_mean:
        return masked_mean(values, mask, dim=-1).mean()
    if mode == LossAgg.token_mean:
        return masked_mean(values, mask)
    return masked_sum(values, mask, dim=-1).mean()


def reverse_cumsum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reward-to-go: out[:, t] = sum_{t' >= t} x[:, t'] * mask[:, t'] (zero where mask is 0)."""
    x = x * mask
    return torch.flip(torch.cumsum(torch.flip(x, [-1]), -1), [-1]) * mask
