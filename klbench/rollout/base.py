"""The rollout-engine interface every engine implements, and the batch it returns."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    n: int  # samples per prompt (G)
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0  # seeds the engine's sampler for this call (per-prompt seeds are drawn from it)
    # One seed per prompt, overriding `seed`: prompt i's G samples depend only on prompt_seeds[i], not
    # on the other prompts of the call (so data-parallel ranks sample exactly what one process does).
    prompt_seeds: tuple[int, ...] | None = None


def prompt_seeds(params: SamplingParams, num_prompts: int) -> list[int]:
    """The seed of each prompt's samples: `params.prompt_seeds`, else a stream drawn from `params.seed`."""
    if params.prompt_seeds is not None:
        if len(params.prompt_seeds) != num_prompts:
            raise ValueError(f"{len(params.prompt_seeds)} prompt_seeds for {num_prompts} prompts")
        return list(params.prompt_seeds)
    rng = random.Random(params.seed)
    return [rng.randrange(2**31 - params.n) for _ in range(num_prompts)]


@dataclass
class RolloutBatch:
    """N = B * G sampled responses; the G samples of one prompt are contiguous.

    Prompts are left-padded and responses right-padded, so `cat([prompt_ids, response_ids], 1)`
    is a valid model input whose response logits are `logits[:, P-1 : P+R-1]`.
    """

    prompt_ids: torch.Tensor  # [N, P] long, left-padded with pad_id
    prompt_mask: torch.Tensor  # [N, P] 1 on real prompt tokens
    response_ids: torch.Tensor  # [N, R] long, right-padded with pad_id
    response_mask: torch.Tensor  # [N, R] float, 1 on generated tokens (EOS included)
    behaviour_logp: torch.Tensor  # [N, R] float32 log mu(y_t | prefix) under the sampling distribution; 0 on padding
    group: torch.Tensor  # [N] long, index of the prompt each sample answers

    @property
    def num_samples(self) -> int:
        return self.response_ids.shape[0]

    def input_ids(self) -> torch.Tensor:  # [N, P+R]
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    def attention_mask(self) -> torch.Tensor:  # [N, P+R]
        return torch.cat([self.prompt_mask, self.response_mask.to(self.prompt_mask.dtype)], dim=1)

    def select(self, idx: torch.Tensor) -> RolloutBatch:
        """Rows `idx` (a mini-batch)."""
        return RolloutBatch(self.prompt_ids[idx], self.prompt_mask[idx], self.response_ids[idx],
            self.response_mask[idx], self.behaviour_logp[idx], self.group[idx])


class RolloutEngine(Protocol):
    """What the training loop needs from a rollout engine."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        """Sample `params.n` responses for each tokenised prompt."""
        ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from `model`'s current weights."""
        ...

    def sleep(self) -> None:
        """Free what the engine holds while the trainer updates (vLLM's sleep mode); a no-op if nothing."""
        ...

    def wake_up(self) -> None:
        """Undo `sleep` before the next weight sync and generation."""
        ...

    def close(self) -> None:
        """Free the engine's memory."""
        ...
