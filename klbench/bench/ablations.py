"""`klbench bench --ablations`: what each of klbench's step optimisations saves, one at a time.

For every optimisation the step relies on, the same piece of work is timed two ways on the same
inputs -- klbench's implementation and the plain one it replaced -- alternating A B A B, and the
median times are compared. The predictions (`PREDICTED`) were written down from operation counts
before the first measurement; the report prints both, so a prediction that was wrong stays visible.

Inputs: the benchmark workload's model (1m: the SFT miniature; 25m/100m: random init) and one
rollout batch of the benchmark's shape (16 prompts x G=8, at most 14 new tokens).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from klbench import tables
from klbench.bench.workload import GROUP_SIZE, MAX_NEW_TOKENS, PROMPTS_PER_STEP, TEMPERATURE
from klbench.config import ModelConfig
from klbench.data import synthetic
from klbench.models import load_causal_lm, load_tokenizer
from klbench.rollout.base import SamplingParams
from klbench.rollout.hf import HFEngine
from klbench.train import logprobs
from klbench.train.logprobs import token_logprobs, trim

#: name -> (what the plain alternative does, predicted effect, the reasoning behind the prediction)
PREDICTED = {
    "shared_prompt_forward": (
        "a forward over cat(prompt, response) for every row",
        "ref forward -30-40%, update forward+backward -30-40% (1m)",
        "the G=8 samples of a prompt recompute its ~7 prompt tokens 8 times: 16x7+128x11 = 1520 "
        "instead of 128x19 = 2432 token positions (-37%); compute-bound matmuls scale with tokens",
    ),
    "drop_finished_rows": (
        "every row decodes until the longest one stops",
        "rollout -10-20% (1m; 0 at 25m/100m, whose rows never stop early)",
        "mean response 8.9 of 14 tokens: about a third of row-steps are after EOS, but a 1m decode "
        "step is partly per-call overhead that does not shrink with the batch",
    ),
    "one_prefill_per_prompt": ("prefill every row (prompt repeated G times)", "rollout -3-8%",
        "the prefill is 1 of ~14 forwards; 8x fewer rows in it"),
    "no_4d_mask": ("pass an all-ones attention mask (HF builds a 4-D mask)",
        "scoring forward -5-15% (1m), ~0 at 25m",
        "mask building and masked SDPA are per-call work that matters next to d=128 matmuls"),
    "logits_to_keep": ("logits at every position, then slice", "scoring forward -1-3%",
        "the lm_head is 258x128 per position against ~1M MACs for the body"),
    "gather_logsumexp": ("log_softmax over the vocabulary, then gather",
        "log-prob math (forward+backward) -20-40%, under 1% of the step",
        "one [N, R, V] tensor fewer written and read back"),
    "length_buckets": (
        "one response forward at the batch's longest response",
        "scoring forward+backward -5-15% (1m), 0 at 25m/100m (no row stops early: one bucket)",
        "written after a prototype A/B on this batch (forward -5%, forward+backward -11%, 1 thread): its "
        "responses end at 7-11 tokens, so 16% of the one-bucket response positions are padding, and the "
        "extra forward call is a few ms at 1m",
    ),
    "small_attention": (
        "transformers' SDPA attention everywhere (model.attn_implementation=sdpa)",
        "scoring forward+backward -5-10% (1m), ~0-3% at 25m",
        "written after a prototype A/B of transformers' eager attention (forward -10%, forward+backward -9% "
        "at 1m): at Lq x Lk ~ 13 x 21 and 128 x 4 (batch x head) blocks, CPU SDPA's per-block cost exceeds the "
        "arithmetic; at 25m the matmuls around attention dominate",
    ),
    "fused_adamw": ("torch.optim.AdamW(foreach=True)", "optimizer step -50-80%, a few ms per step (1m)",
        "one fused kernel instead of several foreach passes over 1M parameters"),
}


@dataclass
class Pair:
    name: str
    ours: Callable[[], object]
    plain: Callable[[], object]


@contextlib.contextmanager
def _min_bucket_saving(value: float):
    """`logprobs.MIN_BUCKET_SAVING` set to `value` (1.0: every batch in one length bucket)."""
    saved = logprobs.MIN_BUCKET_SAVING
    logprobs.MIN_BUCKET_SAVING = value
    try:
        yield
    finally:
        logprobs.MIN_BUCKET_SAVING = saved


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(pairs: list[Pair], reps: int) -> list[dict]:
    rows = []
    for pair in pairs:
        pair.ours(), pair.plain()  # warm-up (allocator, thread pool)
        ours, plain = [], []
        for _ in range(reps):
            ours.append(_time(pair.ours))
            plain.append(_time(pair.plain))
        o, p = statistics.median(ours), statistics.median(plain)
        what, predicted, why = PREDICTED[pair.name]
        rows.append({"name": pair.name, "plain": what, "ours_ms": 1e3 * o, "plain_ms": 1e3 * p,
            "saved_pct": 100.0 * (1.0 - o / p), "predicted": predicted, "reasoning": why, "reps": reps})
        print(f"[ablation] {pair.name}: {1e3 * o:.2f} ms vs {1e3 * p:.2f} ms plain "
              f"({100.0 * (1.0 - o / p):+.1f}% saved; predicted {predicted})", flush=True)
    return rows


class KeepFinishedEngine(HFEngine):
    """The HF engine without its one decoding shortcut: finished rows stay in the batch to the end."""

    @staticmethod
    def should_drop(finished: torch.Tensor) -> bool:
        return False


def build_pairs(model_dir: str, *, seed: int = 0) -> list[Pair]:
    """The ablation pairs on one benchmark-shaped rollout batch of the model in `model_dir`.

    Each side is klbench's public code: the plain alternatives are other inputs to it (a batch whose
    rows share no prompt, a model loaded with SDPA attention), a subclass without the optimisation, or
    the plain transformers / torch call it replaced.
    """
    dev = torch.device("cpu")
    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, ModelConfig(dtype="float32"), dev, trainable=True)
    sdpa_model = load_causal_lm(model_dir, ModelConfig(dtype="float32", attn_implementation="sdpa"), dev,
                                trainable=True)  # the same weights with transformers' SDPA attention
    prompts = [tok.encode(ex.question) for ex in synthetic.problems(seed, 1, PROMPTS_PER_STEP)]
    params = SamplingParams(n=GROUP_SIZE, max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, seed=seed)
    engine = HFEngine(model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    keep_engine = KeepFinishedEngine(model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    batch = trim(engine.generate(prompts, params))
    # the same rows with no prompt shared: token_logprobs then runs cat(prompt, response) for every row
    unshared = replace(batch, group=torch.arange(batch.num_samples))
    r = batch.response_ids.shape[1]
    ids = batch.input_ids()
    mask = batch.response_mask

    def scored(b, grad: bool, on=model, buckets=False):
        def run():  # one length bucket unless asked: the other pairs measure what they did before buckets
            with torch.set_grad_enabled(grad), _min_bucket_saving(logprobs.MIN_BUCKET_SAVING if buckets else 1.0):
                logp, _ = token_logprobs(on, b)
                if grad:
                    (logp * mask).sum().backward()
                    on.zero_grad(set_to_none=True)
        return run

    no_grad_forward = torch.no_grad()(lambda **kw: model(input_ids=ids, use_cache=False, **kw))
    with torch.no_grad():
        logits = model(input_ids=ids, logits_to_keep=r + 1).logits[:, :-1]
    logits = logits.float().requires_grad_(True)  # [N, R, V]: the distributions of the response tokens
    resp = batch.response_ids

    def gather_lse():
        logp = logits.gather(-1, resp.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
        (logp * mask).sum().backward()

    def log_softmax_gather():
        logp = torch.log_softmax(logits, -1).gather(-1, resp.unsqueeze(-1)).squeeze(-1)
        (logp * mask).sum().backward()

    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.randn_like(p) * 1e-3 for p in trainable]
    fused = torch.optim.AdamW(trainable, lr=0.0, fused=True)
    foreach = torch.optim.AdamW(trainable, lr=0.0, foreach=True)  # lr 0: the weights stay put

    def adam_step(opt):
        def run():
            for p, g in zip(trainable, grads):  # the scoring pairs reset .grad; both sides pay this loop
                p.grad = g
            opt.step()
        return run

    repeated = [p for p in prompts for _ in range(params.n)]
    one_each = SamplingParams(n=1, max_new_tokens=params.max_new_tokens, temperature=params.temperature, seed=seed)
    pairs = [
        Pair("length_buckets", scored(batch, grad=True, buckets=True), scored(batch, grad=True)),
        Pair("shared_prompt_forward", scored(batch, grad=True), scored(unshared, grad=True)),
        Pair("small_attention", scored(batch, grad=True), scored(batch, grad=True, on=sdpa_model)),
        Pair("drop_finished_rows", lambda: engine.generate(prompts, params),
             lambda: keep_engine.generate(prompts, params)),
        Pair("one_prefill_per_prompt", lambda: engine.generate(prompts, params),
             lambda: engine.generate(repeated, one_each)),
        Pair("logits_to_keep", lambda: no_grad_forward(logits_to_keep=r + 1),
             lambda: no_grad_forward().logits[:, -(r + 1):].contiguous()),
        Pair("gather_logsumexp", gather_lse, log_softmax_gather),
        Pair("fused_adamw", adam_step(fused), adam_step(foreach)),
    ]
    if bool(batch.prompt_mask.all()):  # only prompts of one length skip the mask
        pairs.insert(3, Pair("no_4d_mask", lambda: no_grad_forward(logits_to_keep=r + 1),
                             lambda: no_grad_forward(logits_to_keep=r + 1, attention_mask=torch.ones_like(ids))))
    return pairs


def render_markdown(report: dict) -> str:
    lines = [
        f"# What each optimisation of klbench's step saves: workload {report['workload']['name']}",
        "",
        f"command: `{report['command']}`  ",
        f"commit: {report['commit']['commit']}{' (dirty)' if report['commit']['dirty'] else ''}  ",
        f"machine: {report['machine_line']}  ",
        f"threads: {report['threads']}; median of {report['reps']} alternating repetitions each",
        "",
        tables.markdown(["optimisation", "the plain alternative", "klbench ms", "plain ms", "saved",
                         "predicted (before measuring)"],
                        [[r["name"], r["plain"], f"{r['ours_ms']:.2f}", f"{r['plain_ms']:.2f}", f"{r['saved_pct']:+.1f}%",
                          r["predicted"]] for r in report["ablations"]], "--rrr"),
    ]
    lines += ["", "Reasoning behind each prediction:", ""]
    lines += [f"- **{row['name']}**: {row['reasoning']}" for row in report["ablations"]]
    return "\n".join(lines) + "\n"
