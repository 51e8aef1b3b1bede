"""Per-token log-probs (and entropies) of sampled responses under a model."""

from __future__ import annotations

import torch

from klbench.rollout.base import RolloutBatch


def token_logprobs(
    model: torch.nn.Module, batch: RolloutBatch, temperature: float = 1.0, *, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(y_t | x, y_<t) `[N, R]` of the batch's responses (0 on padding), and the token
    entropies `[N, R]` of pi(. | x, y_<t) when asked. `pi` is the model's distribution at
    `temperature`, the distribution the engines sample from (top-p aside).

    Log-probs come from a gather and a logsumexp over the logits, never a full log-softmax copy.
    """
    dev = next(model.parameters()).device
    ids = batch.input_ids().to(dev)  # [N, P+R]
    resp = batch.response_ids.to(dev)  # [N, R]
    r = resp.shape[1]
    if bool(batch.prompt_mask.all()):
        # No left padding: causal attention alone is right for every real token (right padding only
        # follows them), so skip building a 4-D mask -- a large share of a tiny model's forward.
        attn = pos = None
    else:
        attn = batch.attention_mask().to(dev)  # [N, P+R]
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False, logits_to_keep=r + 1)
    logits = out.logits[:, :-1].float()  # [N, R, V]: position P-1+t predicts response token t
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)  # [N, R]
    logp = logits.gather(-1, resp.unsqueeze(-1)).squeeze(-1) - lse
    mask = batch.response_mask.to(dev)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            p = torch.softmax(logits.detach(), dim=-1)
            entropy = (lse.detach() - (p * logits.detach()).sum(-1)) * mask  # [N, R]
    return logp * mask, entropy


def trim(batch: RolloutBatch) -> RolloutBatch:
    """Drop response columns that are padding in every row (no compute on pure padding)."""
    width = int(batch.response_mask.sum(1).max().item()) if batch.num_samples else 0
    width = max(width, 1)
    if width == batch.response_ids.shape[1]:
        return batch
    return RolloutBatch(batch.prompt_ids, batch.prompt_mask, batch.response_ids[:, :width],
                        batch.response_mask[:, :width], batch.behaviour_logp[:, :width], batch.group)
