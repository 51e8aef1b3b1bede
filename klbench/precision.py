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

#: `rollout.max_logprob_mismatch` when unset, by the precision the policy computes in: the largest
#: |Δ log-prob| between the engine's behaviour log-probs and the trainer's that round-off alone explains.
#: float32: below 1e-4 measured. Half precision: bf16 round-off alone reached a max of 0.18 per step (mean
#: 0.002) over 20 steps of the miniature's HF engine against the trainer (AMD EPYC), so 0.05 would stop
#: healthy runs.
LOGPROB_TOLERANCE = {torch.float32: 0.05, torch.bfloat16: 0.5, torch.float16: 0.5}


def _autocast_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The half-precision dtype of a model loaded for mixed precision, looking through the wrappers a
    training forward sees (DDP's `.module`, π_ref's `AdaptersOff.policy`; a peft model forwards attribute
    reads to its base model); None otherwise."""
    for m in (model, getattr(model, "module", None), getattr(model, "policy", None)):
        dtype = getattr(m, AUTOCAST_DTYPE, None) if m is not None else None
        if dtype is not None:
            return dtype
    return None


def logprob_tolerance(model: torch.nn.Module, configured: float | None) -> float:
    """The mismatch that stops a run with rollout.check_logprobs: the configured one, else the one of the
    precision the model computes in (its autocast dtype, else its weights')."""
    if configured is not None:
        return configured
    dtype = _autocast_dtype(model) or next(model.parameters()).dtype
    return LOGPROB_TOLERANCE.get(dtype, LOGPROB_TOLERANCE[torch.bfloat16])


def compute_context(model: torch.nn.Module):
    """torch.autocast to the model's compute dtype if it was loaded for mixed precision, else a no-op."""
    dtype = _autocast_dtype(model)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=dtype)
