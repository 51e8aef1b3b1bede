"""Per-token log-probs (and entropies) of sampled responses under a model."""

from __future__ import annotations

import torch

from klbench.precision import compute_context
from klbench.rollout.base import RolloutBatch

# Split a scoring forward into two length buckets only when that drops at least this share of its
# response positions: each bucket is a further forward call, which a small model pays per call.
MIN_BUCKET_SAVING = 0.1


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
    n, r = batch.response_ids.shape
    groups, inverse = torch.unique(batch.group, return_inverse=True)
    with compute_context(model):  # mixed precision (model.dtype=bfloat16): the forward in half precision
        if len(groups) < batch.num_samples:
            pieces = _shared_prompt_logits(model, batch, inverse, dev)
        else:
            pieces = [(torch.arange(n), _full_logits(model, batch, dev))]
    logps, entropies = [], []
    for rows, logits in pieces:
        logits = logits.float()  # [n, w, V]: the distributions response token t was drawn from; all after in fp32
        if temperature != 1.0:
            logits = logits / temperature
        lse = torch.logsumexp(logits, dim=-1)  # [n, w]
        resp = batch.response_ids[rows, : logits.shape[1]].to(dev)
        logps.append(logits.gather(-1, resp.unsqueeze(-1)).squeeze(-1) - lse)
        if with_entropy:
            with torch.no_grad():
                p = torch.softmax(logits.detach(), dim=-1)
                entropies.append(lse.detach() - (p * logits.detach()).sum(-1))
    mask = batch.response_mask.to(dev)
    logp = rows_in_order(pieces, logps, r) * mask
    entropy = rows_in_order(pieces, entropies, r) * mask if with_entropy else None
    return logp, entropy


def rows_in_order(pieces, values: list[torch.Tensor], width: int) -> torch.Tensor:
    """The per-bucket `[n_b, w_b, ...]` values as one `[N, width, ...]` tensor in the batch's row order
    (zero past each bucket's width)."""
    if len(values) == 1 and values[0].shape[1] == width:
        return values[0]  # one bucket: the rows in order already
    padded = [torch.nn.functional.pad(v, (0, 0) * (v.dim() - 2) + (0, width - v.shape[1])) for v in values]
    order = torch.cat([rows for rows, _ in pieces])
    return torch.cat(padded)[torch.argsort(order)]


def length_buckets(lengths: torch.Tensor) -> list[torch.Tensor]:
    """Rows grouped for the response forward: all rows together (always with several processes), or —
    when that saves at least `MIN_BUCKET_SAVING` of the positions — the shorter and the longer rows apart, each bucket run at
    its own longest response instead of the batch's (no compute on padding that only the other
    bucket's rows need)."""
    n = len(lengths)
    if n < 2 or _distributed():
        return [torch.arange(n)]
    order = torch.argsort(lengths, stable=True)
    sorted_len = lengths[order]
    # positions with a split after sorted row k-1: k rows at sorted_len[k-1], n-k rows at the longest
    k = torch.arange(1, n)
    cost = k * sorted_len[:-1] + (n - k) * sorted_len[-1]
    if float(cost.min()) > (1 - MIN_BUCKET_SAVING) * n * int(sorted_len[-1]):
        return [torch.arange(n)]
    split = int(k[cost.argmin()])
    return [order[:split], order[split:]]


def _distributed() -> bool:
    """Several processes train together: each forward of a DDP or DeepSpeed model is a collective (buffer
    broadcast, ZeRO-3 gathers), so every rank must make the same calls, and ranks' lengths differ."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


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


def _shared_prompt_logits(model, batch: RolloutBatch, inverse: torch.Tensor, dev) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Response logits with each distinct prompt run through the model once, as `(rows, logits)`
    pieces: the batch's rows `rows` and their logits `[n_b, w_b, V]` up to their longest response.

    The G samples of a prompt share its prefix, so a forward over `cat(prompt, response)` per row
    computes every prompt position G times. Instead: one forward over the distinct prompts (their KV
    cache kept, and the logits of the last position, which predict the first response token), the
    cache indexed out to the rows (`inverse`: row → distinct prompt), then a forward over the
    responses alone, per length bucket (`length_buckets`). Same arithmetic up to float rounding;
    gradients flow back through the indexed cache into the shared prompt forward. Saves (G-1)/G of
    the prompt tokens' compute, and the padding of short responses when their lengths spread.
    """
    from transformers import DynamicCache

    n = batch.num_samples
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
    lengths = batch.response_mask.sum(1).long()
    pieces = []
    for rows in length_buckets(lengths):
        w = max(int(lengths[rows].max()), 1)
        sel = inverse[rows].to(dev)
        head = out.logits[sel]  # [n_b, 1, V]: predicts response token 0
        if w == 1:
            pieces.append((rows, head))
            continue
        rows_cache = DynamicCache(ddp_cache_data=[(layer.keys[sel], layer.values[sel]) for layer in cache.layers])
        ids = batch.response_ids[rows, : w - 1].to(dev)  # [n_b, w-1]: the last token predicts nothing needed
        if padded:
            pmask = batch.prompt_mask[rows]
            attn = torch.cat([pmask, torch.ones((len(rows), w - 1), dtype=pmask.dtype)], 1).to(dev)
            pos = (pmask.sum(1, keepdim=True) + torch.arange(w - 1)).to(dev)  # [n_b, w-1]
        body = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=rows_cache, use_cache=True)
        pieces.append((rows, torch.cat([head, body.logits], dim=1)))
    return pieces


def trim(batch: RolloutBatch) -> RolloutBatch:
    """Drop response columns that are padding in every row (no compute on pure padding)."""
    width = int(batch.response_mask.sum(1).max().item()) if batch.num_samples else 0
    width = max(width, 1)
    if width == batch.response_ids.shape[1]:
        return batch
    return RolloutBatch(batch.prompt_ids, batch.prompt_mask, batch.response_ids[:, :width],
                        batch.response_mask[:, :width], batch.behaviour_logp[:, :width], batch.group)
