"""The Hugging Face rollout engine: sampling with the trainer's own model and its KV cache.

It drives the model's forward pass with a `DynamicCache` instead of calling `generate()`, for
three reasons: the behaviour log-probs are those of the exact distribution sampled from
(temperature and top-p applied), each prompt's samples come from its own seeded
`torch.Generator` (`SamplingParams.prompt_seeds`) so a run is reproducible and a prompt's samples do
not depend on which rank or batch it lands in, and no per-step logits-processor machinery runs (the
miniature is overhead-bound).
It samples from a live module (the policy, or the loop's lagged copy for stale rollouts), so a
weight sync costs nothing.
"""

from __future__ import annotations

import torch

from klbench.precision import compute_context
from klbench.rollout.base import RolloutBatch, SamplingParams, prompt_seeds


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists → (ids [N, P], mask [N, P])."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def top_p_filter(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """Log-probs `[N, V]` restricted to the smallest set with mass ≥ top_p, renormalised."""
    if top_p >= 1.0:
        return logp
    sorted_logp, order = logp.sort(dim=-1, descending=True)
    cum = sorted_logp.exp().cumsum(-1)
    drop_sorted = (cum - sorted_logp.exp()) >= top_p  # mass before this token already reaches top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)


def sample_tokens(logp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: row i of `logp` `[N, V]` with its uniform `u[i]` in (0, 1] → token `[N, 1]`."""
    cdf = logp.exp().cumsum(-1)  # [N, V]
    return torch.searchsorted(cdf, u * cdf[:, -1:]).clamp(max=cdf.shape[-1] - 1)


class HFEngine:
    """Samples with an HF causal LM (the trainer's policy, or a lagged copy for stale rollouts)."""

    def __init__(self, model: torch.nn.Module, *, pad_id: int, eos_id: int, stop_ids: tuple[int, ...] | None = None):
        self.pad_id, self.eos_id = pad_id, eos_id
        self.stop = torch.tensor(stop_ids or [eos_id])  # a response ends at any of these (EOS, end of turn)
        self.model = model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        with compute_context(self.model):  # the trainer's precision (model.dtype=bfloat16: autocast)
            return self._generate(prompts, params)

    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        from transformers import DynamicCache

        model, dev = self.model, self.device
        was_training = model.training
        model.eval()
        g = params.n
        unique_ids, unique_mask = left_pad(prompts, self.pad_id)  # [B, P]
        prompt_ids, prompt_mask = unique_ids.repeat_interleave(g, 0), unique_mask.repeat_interleave(g, 0)  # [N, P]
        n = prompt_ids.shape[0]
        # Each prompt's G x T uniforms come from its own generator, drawn once per call; a token is
        # then picked by inverse CDF for all rows at once (one searchsorted per decoding step).
        uniforms = torch.cat([
            1.0 - torch.rand((g, params.max_new_tokens), generator=torch.Generator(device=dev).manual_seed(s),
                             device=dev)  # (0, 1]: a zero-probability token can never be picked
            for s in prompt_seeds(params, len(prompts))
        ])  # [N, T]

        # Prefill each prompt once, then give each of its G samples a copy of its KV cache.
        ids, attn = unique_ids.to(dev), unique_mask.to(dev)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)  # [B, P]
        next_pos = pos[:, -1:].repeat_interleave(g, 0) + 1  # [N, 1]
        if bool(prompt_mask.all()):  # no left padding: plain causal attention, no mask to build
            attn = pos = next_pos = None
        cache = DynamicCache()
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        if g > 1:
            cache.batch_repeat_interleave(g)
            out.logits = out.logits.repeat_interleave(g, 0)
        if attn is not None:
            attn = attn.repeat_interleave(g, 0)  # [N, P]
        # Rows that finished leave the decoding batch (their cache rows too) once an eighth of it has
        # finished, so little compute is spent on padding after EOS and few cache copies are made.
        tokens = torch.full((n, params.max_new_tokens), self.pad_id, dtype=torch.long, device=dev)
        logps = torch.zeros((n, params.max_new_tokens), dtype=torch.float32, device=dev)
        lengths = torch.full((n,), params.max_new_tokens, dtype=torch.long, device=dev)
        rows = torch.arange(n, device=dev)  # batch row of each row of the model's (shrinking) batch
        finished = torch.zeros(n, dtype=torch.bool, device=dev)  # per model row: EOS already emitted
        logits = out.logits[:, -1]
        for t in range(params.max_new_tokens):
            logp = torch.log_softmax(logits.float() / params.temperature, dim=-1)  # [A, V]
            logp = top_p_filter(logp, params.top_p)
            tok = sample_tokens(logp, uniforms[rows, t : t + 1])  # [A, 1]
            live = ~finished
            tokens[rows[live], t] = tok[live, 0]
            logps[rows[live], t] = logp.gather(-1, tok).squeeze(-1)[live]
            ends = live & torch.isin(tok[:, 0], self.stop.to(dev))
            lengths[rows[ends]] = t + 1
            finished = finished | ends
            if t == params.max_new_tokens - 1 or bool(finished.all()):
                break
            if self.should_drop(finished):
                keep = (~finished).nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                rows, tok, finished = rows[keep], tok[keep], finished[keep]
                if attn is not None:
                    attn, next_pos = attn[keep], next_pos[keep]
            if attn is not None:
                attn = torch.cat([attn, torch.ones((len(rows), 1), dtype=attn.dtype, device=dev)], dim=1)
            out = model(input_ids=tok, attention_mask=attn, position_ids=next_pos,
                        past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1]
            if next_pos is not None:
                next_pos = next_pos + 1
        width = t + 1
        response_mask = (torch.arange(width, device=dev) < lengths[:, None]).float()  # [N, R]
        if was_training:
            model.train()
        return RolloutBatch(prompt_ids=prompt_ids, prompt_mask=prompt_mask,
            response_ids=tokens[:, :width].cpu(), response_mask=response_mask.cpu(),
            behaviour_logp=logps[:, :width].cpu(),
            group=torch.arange(len(prompts)).repeat_interleave(params.n))

    @staticmethod
    def should_drop(finished: torch.Tensor) -> bool:
        """Whether the finished rows `[A]` (bool) leave the decoding batch now: once an eighth has finished."""
        return int(finished.sum()) >= len(finished) / 8

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Sample from `model` from now on (the loop passes the module it keeps current)."""
        self.model = model

    def sleep(self) -> None:
        """Nothing to free: the engine shares the trainer's module."""

    def wake_up(self) -> None:
        """Nothing to restore."""

    def close(self) -> None:
        self.model = None
