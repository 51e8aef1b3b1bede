"""Per-token log-probs (and entropies) of sampled responses under a model."""

from __future__ import annotations

import torch

from klbench.precision import compute_context
from klbench.rollout.base import RolloutBatch


def token_logprobs(
    model: torch.nn.Module, batch: RolloutBatch, temperature: float = 1.0, *, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(y_t | x, y_<t) `[N, R]` of the batch's responses (0 on padding), and the token
    entropies `[N, R]` of pi(. | x, y_<t) when asked. `pi` is the model's distribution at
    `temperature`, the distribution the engines sample from (top-p aside).

    Log-probs come from a gather and a logsumexp over the logits, never a full log-softmax copy with
    gradient (that copy is what costs memory at real vocabulary sizes); entropies, when asked, take a
    softmax without gradient.
    """
    dev = next(model.parameters()).device
    resp = batch.response_ids.to(dev)  # [N, R]
    groups, inverse = torch.unique(batch.group, return_inverse=True)
    with compute_context(model):  # mixed precision (model.dtype=bfloat16): the forward in half precision
        if len(groups) < batch.num_samples:
            logits = _shared_prompt_logits(model, batch, inverse, dev)
        else:
            logits = _full_logits(model, batch, dev)
    logits = logits.float()  # [N, R, V]: the distributions response token t was drawn from; all after in fp32
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


def _full_logits(model, batch: RolloutBatch, dev) -> torch.Tensor:
    """One forward over `cat(prompt, response)` for every row → response logits `[N, R, V]`."""
    r = batch.response_ids.shape[1]
    ids = batch.input_ids().to(dev)  # [N, P+R]
    if bool(batch.prompt_mask.all()):
        # No left padding: causal attention alone is right for every real token (right padding only
        # follows them). This saves nothing measurable (transformers drops an all-ones mask itself:
        # results/perf/ablations-1m.md, no_4d_mask) but keeps the call the same as the engine's.
        attn = pos = None
    else:
        attn = batch.attention_mask().to(dev)  # [N, P+R]
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False, logits_to_keep=r + 1)
    return out.logits[:, :-1]  # position P-1+t predicts response token t


def _shared_prompt_logits(model, batch: RolloutBatch, inverse: torch.Tensor, dev) -> torch.Tensor:
    """Response logits `[N, R, V]` with each distinct prompt run through the model once.

    The G samples of a prompt share its prefix, so a forward over `cat(prompt, response)` per row
    computes every prompt position G times. Instead: one forward over the distinct prompts (their KV
    cache kept, and the logits of the last position, which predict the first response token), the
    cache indexed out to the rows (`inverse`: row → distinct prompt), then one forward over the
    responses alone. Same arithmetic up to float rounding; gradients flow back through the indexed
    cache into the shared prompt forward. Saves (G-1)/G of the prompt tokens' compute.
    """
    from transformers import DynamicCache

    n = batch.num_samples
    r = batch.response_ids.shape[1]
    first = torch.full((int(inverse.max()) + 1,), n, dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(n), reduce="amin")  # a row of each prompt
    ids = batch.prompt_ids[first].to(dev)  # [U, P]
    padded = not bool(batch.prompt_mask.all())
    attn = pos = None
    if padded:
        attn = batch.prompt_mask[first].to(dev)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    rows = inverse.to(dev)
    cache.batch_select_indices(rows)
    head = out.logits[rows]  # [N, 1, V]: predicts response token 0
    if r == 1:
        return head
    ids = batch.response_ids[:, :-1].to(dev)  # [N, R-1]: the last token predicts nothing needed
    if padded:
        attn = torch.cat([batch.prompt_mask, torch.ones((n, r - 1), dtype=batch.prompt_mask.dtype)], 1).to(dev)
        pos = (batch.prompt_mask.sum(1, keepdim=True) + torch.arange(r - 1)).to(dev)  # [N, R-1]
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True)
    return torch.cat([head, out.logits], dim=1)


def trim(batch: RolloutBatch) -> RolloutBatch:
    """Drop response columns that are padding in every row (no compute on pure padding)."""
    width = int(batch.response_mask.sum(1).max().item()) if batch.num_samples else 0
    width = max(width, 1)
    if width == batch.response_ids.shape[1]:
        return batch
    return RolloutBatch(batch.prompt_ids, batch.prompt_mask, batch.response_ids[:, :width],
                        batch.response_mask[:, :width], batch.behaviour_logp[:, :width], batch.group)
