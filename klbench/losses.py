"""The PPO-clip policy-gradient surrogate, as a pure function over per-token tensors."""

from __future__ import annotations

from typing import NamedTuple

import torch

from klbench.ops import aggregate, masked_mean


class PGLoss(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable
    clipfrac: torch.Tensor  # scalar, detached: fraction of tokens where the clipped branch was taken
    ratio_mean: torch.Tensor  # scalar, detached
    ratio_max: torch.Tensor  # scalar, detached


def ppo_clip(
    logp: torch.Tensor,  # [N, T] log pi_theta(y_t), carries gradient
    behaviour_logp: torch.Tensor,  # [N, T] log mu(y_t), the policy that sampled
    advantages: torch.Tensor,  # [N, T]
    mask: torch.Tensor,  # [N, T] 1 on response tokens
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    agg: str = "seq_mean_token_mean",
) -> PGLoss:
    """PPO-clip (Schulman et al. 2017) against the behaviour policy:
    loss_t = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - clip_low, 1 + clip_high)), rho_t = pi_theta / mu.
    On-policy (rho = 1) its gradient is the REINFORCE gradient -A_t * grad log pi_theta(y_t).
    """
    clip_high = clip_low if clip_high is None else clip_high
    ratio = torch.exp(logp - behaviour_logp)  # [N, T]
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)  # [N, T]
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        r = ratio.detach()
        ratio_mean = masked_mean(r, mask)
        ratio_max = (r * mask).max() if mask.any() else r.new_tensor(1.0)
    return PGLoss(aggregate(per_token, mask, agg), clipfrac, ratio_mean, ratio_max)
