"""Mixed precision for the torch backend: float32 weights, forwards under torch.autocast.

A model loaded with `load_causal_lm(..., autocast=True)` and a half-precision `model.dtype` carries the
dtype its forwards should run in; every forward of the trainer, the reference and the HF engine enters
`compute_context(model)`, so all three compute alike (π_θ = π_ref exactly at step 1) and log-probs,
KL terms and losses are reduced in float32 from the half-precision logits.
"""

from __future__ import annotations

import contextlib

import torch

#: set on a model loaded for mixed precision: the half-precision dtype its forwards autocast to
AUTOCAST_DTYPE = "klbench_autocast_dtype"


def compute_context(model: torch.nn.Module):
    """torch.autocast to the model's compute dtype if it was loaded for mixed precision, else a no-op.
    Looks through the wrappers a training forward sees (DDP's `.module`, π_ref's `AdaptersOff.policy`;
    a peft model forwards attribute reads to its base model)."""
    for m in (model, getattr(model, "module", None), getattr(model, "policy", None)):
        dtype = getattr(m, AUTOCAST_DTYPE, None) if m is not None else None
        if dtype is not None:
            return torch.autocast(next(model.parameters()).device.type, dtype=dtype)
    return contextlib.nullcontext()
