"""klbench's attention kernel choice (`model.attn_implementation=auto`).

On CPU, PyTorch's fused scaled-dot-product attention pays a fixed cost per (batch row, head) block,
so at the lengths of an RL step on a small model (a prompt of ~10 tokens, ~15 response tokens, 128 rows)
it costs more than the arithmetic it does: plain `softmax(q kᵀ) v` by two batched matmuls is faster
there (results/perf/ablations-*.md: `small_attention`). It materialises the `[B, H, Lq, Lk]` scores,
which is what makes it slower — and memory-hungry — on long sequences, so `auto` uses it only on CPU,
for a multi-token query with `Lq · Lk ≤ SMALL_ATTENTION_LIMIT` and no attention dropout, and hands
everything else to transformers' SDPA path unchanged (GPUs always take SDPA; a single-token decoding
query takes SDPA too, where the measured difference went the other way).

The function is registered with transformers' `AttentionInterface` under `AUTO_NAME`, with SDPA's mask
builder, so it receives exactly the masks SDPA would: a boolean `[B, 1, Lq, Lk]` mask (True = attend),
or None when causal attention alone is right (no padding and Lq == Lk, or one query token).
"""

from __future__ import annotations

import torch

from klbench.errors import KlbenchError

AUTO_NAME = "klbench_auto"
# Lq · Lk up to this (32 × 32) takes the matmul path on CPU; above it SDPA's blocked kernel wins
# (measured forward and backward on the miniature and the 25M model: results/perf/NOTES.md).
SMALL_ATTENTION_LIMIT = 1024


def small_attention_applies(query: torch.Tensor, key: torch.Tensor, dropout: float) -> bool:
    """Whether `auto` computes this call by matmuls (else: SDPA)."""
    lq, lk = query.shape[-2], key.shape[-2]
    return query.device.type == "cpu" and lq > 1 and lq * lk <= SMALL_ATTENTION_LIMIT and dropout == 0.0


def matmul_attention(query, key, value, attention_mask, scaling: float) -> torch.Tensor:
    """softmax(q kᵀ · scaling + mask) v for `[B, H, Lq, D]` queries and `[B, H, Lk, D]` keys/values →
    `[B, Lq, H, D]`. The mask is boolean (True = attend), as SDPA's mask builder makes it; None means causal (bottom-right aligned, as with a KV cache). Masked scores
    take the dtype's minimum rather than -inf, so a query with nothing to attend to (a left-padding
    position, whose output nobody reads) gets a finite uniform average instead of NaN."""
    lq, lk = query.shape[-2], key.shape[-2]
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # [B, H, Lq, Lk]
    if attention_mask is None:
        attention_mask = torch.ones((lq, lk), dtype=torch.bool, device=query.device).tril(lk - lq)
    scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous()


def auto_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: matmuls for small CPU problems, SDPA otherwise."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if not small_attention_applies(query, key, dropout):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return matmul_attention(query, key, value, attention_mask, scaling), None


def register() -> None:
    """Make `AUTO_NAME` a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(AUTO_NAME, auto_attention)
    AttentionMaskInterface.register(AUTO_NAME, sdpa_mask)


def apply(model: torch.nn.Module, choice: str) -> None:
    """Set the model's attention implementation from `model.attn_implementation`.
    `auto` → klbench's (above); any other value is a transformers name (sdpa, eager, flash_attention_2, ...).
    A model whose code cannot switch (old remote code) keeps what it loaded with."""
    name = AUTO_NAME if choice == "auto" else choice
    if name == AUTO_NAME:
        register()
    try:
        model.set_attn_implementation(name)
    except (ValueError, ImportError, AttributeError) as e:
        if choice != "auto":
            raise KlbenchError(f"model.attn_implementation={choice!r} is not available for this model: {e}") from e
