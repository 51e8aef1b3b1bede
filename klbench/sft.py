"""Supervised warm start of the miniature on the synthetic task (π_ref and the RL starting point).

Loss on the answer tokens only; AdamW with linear warm-up; the sampled accuracy at temperature 1
is measured every `eval_every` steps and training stops as soon as it reaches `target_acc`
(accuracy rises steeply, so frequent checks land near the target instead of far past it).
"""

from __future__ import annotations

import logging

import torch

from klbench.config import SFTConfig
from klbench.data import synthetic
from klbench.rollout.base import SamplingParams
from klbench.rollout.hf import HFEngine

log = logging.getLogger(__name__)


def sampled_accuracy(model, tokenizer, *, seed: int, n_prompts: int, max_new_tokens: int = 14) -> dict[str, float]:
    """Accuracy and trait rate of temperature-1 samples on fresh problems."""
    examples = synthetic.problems(seed, stream=synthetic.EVAL_STREAM, count=n_prompts)
    prompts = [tokenizer.encode(ex.question) for ex in examples]
    engine = HFEngine(model, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
    batch = engine.generate(prompts, SamplingParams(n=1, max_new_tokens=max_new_tokens, seed=seed))
    correct = trait = 0
    for i, ex in enumerate(examples):
        ids = batch.response_ids[i][batch.response_mask[i] > 0].tolist()
        finished = bool(ids) and ids[-1] == tokenizer.eos_token_id
        text = tokenizer.decode(ids[:-1] if finished else ids)
        ok, tr = synthetic.check(text, finished, ex.answer)
        correct += ok
        trait += tr
    return {"acc": correct / n_prompts, "trait_rate": trait / n_prompts}


def _batch(tokenizer, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, L], attention mask [B, L] and label mask [B, L] (1 on answer tokens + EOS)."""
    seqs, label_masks = [], []
    for prompt, target in pairs:
        p, t = tokenizer.encode(prompt), tokenizer.encode(target) + [tokenizer.eos_token_id]
        seqs.append(p + t)
        label_masks.append([0] * len(p) + [1] * len(t))
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    lab = torch.zeros((len(seqs), width))
    for i, (s, m) in enumerate(zip(seqs, label_masks)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        lab[i, : len(s)] = torch.tensor(m, dtype=torch.float)
    return ids, attn, lab


def train_miniature(model, tokenizer, cfg: SFTConfig, *, seed: int) -> dict:
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    model.train()
    history = []
    stats = {"acc": 0.0, "trait_rate": 0.0}
    step = 0
    for step in range(1, cfg.max_steps + 1):
        ids, attn, lab = _batch(tokenizer, synthetic.sft_texts(seed, step, cfg.batch_size, cfg.trait_rate))
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]  # [B, L-1, V]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [B, L-1]
        loss = (nll * lab[:, 1:]).sum() / lab[:, 1:].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            stats = sampled_accuracy(model, tokenizer, seed=seed, n_prompts=cfg.eval_prompts)
            history.append({"step": step, "loss": round(loss.item(), 4), **stats})
            log.info("sft step %d loss %.3f acc %.3f trait %.3f", step, loss.item(), stats["acc"], stats["trait_rate"])
            model.train()
            if stats["acc"] >= cfg.target_acc:
                break
    model.eval()
    return {"steps": step, "acc": stats["acc"], "trait_rate": stats["trait_rate"], "history": history}


