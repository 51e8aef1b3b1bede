"""One RL-with-KL experiment: the GRPO-family loop, top to bottom.

Per step: sample G responses for B prompts (rollout engine) → rewards → reference log-probs
(frozen π_ref, once per batch) → advantages (group baselines; the KL penalty subtracted when the
KL term is in the reward) → `algo.ppo_epochs` passes of mini-batch PPO-clip updates with the KL
term as a loss when configured (later mini-batches are genuinely off-policy) → metrics → weights
to the rollout engine (lagged by `rollout.staleness` updates).

Deviations from the papers, on purpose:
- The KL penalty in the reward is not group-normalised: β has the same scale for every placement,
  so `k1_in_reward` and `k2_as_loss` at one β are comparable (claim 2 of docs/theory.md).
- Log-probs for the KL terms and entropies are those of the temperature-scaled policy, the one
  that samples; with top-p < 1 the behaviour log-probs are of the truncated distribution.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

from klbench import advantages as adv_lib
from klbench import kl as kl_lib
from klbench.config import Backend, Config
from klbench.data import Task, build_task
from klbench.data.sources import load_examples
from klbench.errors import KlbenchError
from klbench.losses import ppo_clip
from klbench.models import (
    AdaptersOff,
    add_lora,
    context_length,
    load_causal_lm,
    load_tokenizer,
    resolve_model_dir,
    stop_ids,
)
from klbench.ops import masked_mean
from klbench.precision import logprob_tolerance
from klbench.reward import build_reward
from klbench.rollout.base import RolloutBatch, SamplingParams
from klbench.rollout.factory import build_engine, check_engine
from klbench.train import checkpoint, runstate
from klbench.train.backends import build_backend
from klbench.train.logprobs import token_logprobs, trim

log = logging.getLogger(__name__)


def check_finite(step: int, **terms: torch.Tensor) -> None:
    """Stop with a clear message instead of training on (and writing) garbage."""
    for name, value in terms.items():
        if not torch.isfinite(value).all():
            raise KlbenchError(
                f"non-finite {name} ({value.item() if value.numel() == 1 else 'tensor'}) at step {step}; "
                "lower trainer.lr, keep kl.log_ratio_clamp set, or check the reward"
            )


class Rewards:
    """Scores a rollout: per-sample rewards/correctness and decoded completions."""

    def __init__(self, task: Task, tokenizer, reward_fn):
        self.task, self.tok, self.fn = task, tokenizer, reward_fn

    def __call__(self, batch: RolloutBatch, examples, group_size: int):
        stop = set(stop_ids(self.tok))
        rewards, correct, texts, extras = [], [], [], {}
        for i in range(batch.num_samples):
            ids = batch.response_ids[i][batch.response_mask[i] > 0].tolist()
            finished = bool(ids) and ids[-1] in stop
            text = self.tok.decode(ids[:-1] if finished else ids, skip_special_tokens=False)
            s = self.fn(text, finished, examples[i // group_size])
            rewards.append(s.reward)
            correct.append(float(s.correct))
            texts.append(text)
            for k, v in s.extras.items():
                extras.setdefault(k, []).append(v)
        return torch.tensor(rewards), torch.tensor(correct), texts, {k: torch.tensor(v) for k, v in extras.items()}


class Trainer:
    """Holds the experiment's objects; `fit()` runs the steps. Built once from a validated Config.

    `make_evaluator(tokenizer, dist)` builds the periodic held-out evaluation (klbench.evaluate
    passes it in; None: no evaluation). It is called with the loaded tokenizer and must return an
    object with `due(step, total_steps)` and `__call__(policy, engine, step) -> metrics`.
    `resume_from`: a checkpoint to continue from, already checked against the run (klbench.train.run).
    """

    def __init__(self, cfg: Config, run_dir: Path, tracker, dist=None, make_evaluator=None,
                 resume_from: Path | None = None):
        self.cfg, self.run_dir, self.tracker = cfg, Path(run_dir), tracker
        self.dist = dist or runstate.single_process()
        runstate.set_threads(cfg.trainer.threads)
        torch.manual_seed(cfg.seed)
        self.device = runstate.pick_device(cfg.trainer.device)
        # A missing engine or bad data (a wrong path, a bad row) must fail before the expensive part:
        # building the miniature or loading a large model.
        check_engine(cfg.rollout)
        rows = None if cfg.data.source == "synthetic" else load_examples(cfg.data, cfg.data.split)
        self.model_dir = resolve_model_dir(cfg.model, seed=0)
        self.tokenizer = load_tokenizer(self.model_dir, cfg.model.trust_remote_code)
        self.stop = stop_ids(self.tokenizer)  # a response ends at EOS or the chat template's end of turn
        context = context_length(self.model_dir, cfg.model)
        self.task = build_task(cfg.data, self.tokenizer, cfg.seed, rows=rows,
                               max_tokens=None if context is None else context - cfg.rollout.max_new_tokens)
        # torch backend: a half-precision model.dtype is mixed precision (float32 weights, autocast forwards);
        # DeepSpeed keeps its own float32 master weights for bfloat16 ones
        mixed = cfg.trainer.backend == Backend.torch
        self.policy = load_causal_lm(self.model_dir, cfg.model, self.device, trainable=True, autocast=mixed)
        if cfg.model.lora.rank:  # only adapters train; π_ref is the same module with them off
            self.policy = add_lora(self.policy, cfg.model.lora)
            self.ref = AdaptersOff(self.policy)
        else:
            self.ref = load_causal_lm(self.model_dir, cfg.model, self.device, trainable=False, autocast=mixed)
        self.rewards = Rewards(self.task, self.tokenizer, build_reward(cfg.data))
        self.kl = kl_lib.KLSpec.from_config(cfg.kl)
        self.controller = kl_lib.build_controller(cfg.kl.controller, cfg.kl.coef, cfg.kl.target, cfg.kl.horizon)
        # Stale rollouts sample from a lagged copy of the policy (`rollout.staleness` updates old),
        # copied before a backend may shard the policy (DeepSpeed ZeRO-3).
        self.staleness = cfg.rollout.staleness
        if self.staleness:
            self.sampler_model = copy.deepcopy(self.policy).eval().requires_grad_(False)
            self.snapshots: deque[dict] = deque([self._snapshot()])
        else:
            self.sampler_model = self.policy
        world = self.dist.world
        self.backend = build_backend(cfg.trainer, self.policy, self.dist,
                                     micro_batch_size=algo_mini_batch(cfg, world) // world)
        self.ref = self.backend.prepare_reference(self.ref)  # ZeRO-3 shards π_ref like the policy
        self.engine = build_engine(cfg.rollout, self.sampler_model, self.tokenizer, self.model_dir, cfg.seed)
        self.evaluator = make_evaluator(self.tokenizer, self.dist) if make_evaluator else None
        self.step = 0
        self.last_batch: RolloutBatch | None = None  # checkpoint.check_healthy runs the policy on it
        self.resumed_from = resume_from
        if self.resumed_from is not None:
            checkpoint.load(self, self.resumed_from)
            log.info("resumed from %s (step %d)", self.resumed_from, self.step)

    # -- state -----------------------------------------------------------------------------
    def _snapshot(self) -> dict:
        return {k: v.detach().clone() for k, v in self.policy.state_dict().items()}

    def state_dict(self) -> dict:
        return {"step": self.step, "controller": self.controller.state_dict(),
            "snapshots": list(self.snapshots) if self.staleness else None,
            "backend": self.backend.state_dict(), "rng": runstate.rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.controller.load_state_dict(state["controller"])
        if "backend" in state:  # else the backend restored itself from its own files (DeepSpeed)
            self.backend.load_state_dict(state["backend"])
        if self.staleness:
            self.snapshots = deque(state["snapshots"])
            self.sampler_model.load_state_dict(self.snapshots[0])
        runstate.set_rng_state(state["rng"])
        self.engine.sync_weights(self.sampler_model)

    # -- one step --------------------------------------------------------------------------
    def sampling(self, step: int, prompt_indices: range) -> SamplingParams:
        """Sampling for this rank's prompts. Prompt i of the step (its index in the global batch) is
        seeded by (seed, step, i) alone, so N processes draw exactly the samples one process draws."""
        r, n = self.cfg.rollout, self.cfg.algo.group_size
        seeds = tuple(int(np.random.SeedSequence([self.cfg.seed, step, i]).generate_state(1)[0]) % (2**31 - n)
                      for i in prompt_indices)
        return SamplingParams(n=n, max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                              prompt_seeds=seeds)

    def train_step(self, step: int) -> dict[str, float]:
        cfg, algo = self.cfg, self.cfg.algo
        t0 = time.perf_counter()
        runstate.start_memory_window()
        examples = self.dist.shard(self.task.batch(step, algo.prompts_per_step))
        first = self.dist.rank * len(examples)  # global index of this rank's first prompt
        with self.backend.full_weights():
            batch = self.engine.generate([self.task.encode(ex) for ex in examples],
                                         self.sampling(step, range(first, first + len(examples))))
        self.engine.sleep()  # vLLM's sleep mode: its GPU memory is the trainer's until the next sync
        batch = self.last_batch = trim(batch)
        t_rollout = time.perf_counter() - t0
        mask = batch.response_mask  # [N, R]
        rewards, correct, texts, extras = self.rewards(batch, examples, algo.group_size)

        ref_logp = self.score(self.ref, batch)  # [N, R]
        # log pi_theta of the sampled tokens before this step's updates: the engine's own
        # log-probs when it samples from the current weights, else a trainer forward.
        if self.staleness or cfg.rollout.check_logprobs:
            cur_logp = self.score(self.policy, batch)
        else:
            cur_logp = batch.behaviour_logp
        metrics: dict[str, float] = {}
        if cfg.rollout.check_logprobs:
            sampler_logp = cur_logp if not self.staleness else self.score(self.sampler_model, batch)
            diff = (sampler_logp - batch.behaviour_logp).abs() * mask
            metrics["rollout/logprob_mismatch"] = (diff.sum() / mask.sum()).item()
            metrics["rollout/logprob_mismatch_max"] = diff.max().item()
            tolerance = logprob_tolerance(self.policy, cfg.rollout.max_logprob_mismatch)
            if metrics["rollout/logprob_mismatch_max"] > tolerance:
                raise KlbenchError(
                    f"step {step}: behaviour log-probs from rollout.engine={cfg.rollout.engine} differ from the "
                    f"trainer's by up to {metrics['rollout/logprob_mismatch_max']:.3g} "
                    f"(> rollout.max_logprob_mismatch={tolerance}): weights are out of sync"
                )

        beta = self.controller.value
        u = (cur_logp - ref_logp) * mask  # [N, R]
        seq_adv = adv_lib.compute(algo.advantage, rewards, algo.group_size, algo.std_eps)  # [N]
        penalty = self.kl.reward_penalty(cur_logp, ref_logp, mask)  # [N, R] detached, summed to go
        advantages = seq_adv[:, None] * mask - beta * penalty  # [N, R]

        t1 = time.perf_counter()
        upd = self.update(batch, advantages, ref_logp, beta, step)
        t_update = time.perf_counter() - t1
        self.after_update()
        rkl_k1 = self.dist.mean(u.sum(-1).mean())
        self.controller.update(rkl_k1, batch.num_samples * self.dist.world)

        n_tok = mask.sum()
        metrics.update({
            "kl/rkl_k1": rkl_k1,
            "kl/rkl_k3": self.dist.mean(self._seq_estimate("k3", cur_logp, ref_logp, mask)),
            "kl/rkl_k2": self.dist.mean(self._seq_estimate("k2", cur_logp, ref_logp, mask)),
            "kl/coef": beta,
            "reward/mean": self.dist.mean(rewards.mean()),
            "reward/std": self.global_std(rewards),
            "reward/acc": self.dist.mean(correct.mean()),
            **{f"reward/{k}": self.dist.mean(v.mean()) for k, v in extras.items()},
            "rollout/response_len": self.dist.mean(mask.sum(-1).mean()),
            "rollout/truncated": self.dist.mean((~torch.isin(batch.response_ids[:, -1], torch.tensor(self.stop)))
                                                .logical_and(mask[:, -1] > 0).float().mean()),
            **upd,
            "optim/lr": self.backend.lr,
            "perf/rollout_s": t_rollout,
            "perf/update_s": t_update,
            "perf/step_s": time.perf_counter() - t0,
            "perf/rollout_tok_s": self.dist.sum(n_tok) / max(t_rollout, 1e-9),
            "perf/train_tok_s": self.dist.sum(n_tok) * algo.ppo_epochs / max(t_update, 1e-9),
            "perf/peak_rss_gib": self.dist.max(runstate.window_peak_rss_bytes() / 2**30),  # this step's
        })
        if cfg.trainer.samples_per_log and step % cfg.trainer.log_every == 0:
            self.tracker.log_samples(step, [
                {"prompt": self.task.prompt(examples[i // algo.group_size]), "completion": texts[i],
                 "reward": rewards[i].item(), "correct": bool(correct[i]), "kl_k1": u[i].sum().item()}
                for i in range(0, batch.num_samples, max(1, batch.num_samples // cfg.trainer.samples_per_log))
            ][: cfg.trainer.samples_per_log])
        return metrics

    def micro_batches(self, batch: RolloutBatch) -> list[RolloutBatch]:
        """`batch` in `trainer.micro_batch_size` pieces (one piece when it is null or larger)."""
        size = self.cfg.trainer.micro_batch_size
        if size is None or size >= batch.num_samples:
            return [batch]
        return [trim(batch.select(idx)) for idx in torch.arange(batch.num_samples).split(size)]

    @torch.no_grad()
    def score(self, model, batch: RolloutBatch) -> torch.Tensor:
        """log pi(y_t) `[N, R]` of the batch's tokens under `model`, on the CPU, micro-batch by micro-batch."""
        width = batch.response_ids.shape[1]
        parts = [token_logprobs(model, part, self.cfg.rollout.temperature)[0].cpu() for part in self.micro_batches(batch)]
        return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])

    def _seq_estimate(self, kind: str, logp, ref_logp, mask) -> torch.Tensor:
        """Mean over samples of the per-sequence sum of a KL estimator (padding masked before exp)."""
        k = kl_lib.estimate(kind, logp, ref_logp, log_ratio_clamp=self.kl.log_ratio_clamp)
        return torch.where(mask.bool(), k, 0.0).sum(-1).mean()

    def update(self, batch: RolloutBatch, advantages, ref_logp, beta: float, step: int) -> dict[str, float]:
        """`algo.ppo_epochs` passes over the batch in mini-batches; one optimizer step per mini-batch."""
        algo, temp = self.cfg.algo, self.cfg.rollout.temperature
        n = batch.num_samples  # this rank's samples
        world = self.dist.world
        mb = algo_mini_batch(self.cfg, world) // world  # this rank's share of each mini-batch
        gen = torch.Generator().manual_seed(self.cfg.seed * 31 + step)
        # Metrics stay tensors (float64, so the sums equal those of Python floats) until one transfer at the
        # end: no host sync per mini-batch beyond the finiteness check that must precede each optimizer step.
        sums: dict[str, torch.Tensor] = {}
        counts = 0
        ratio_max = torch.ones((), dtype=torch.float64, device=self.device)
        grad_norms = []
        for epoch in range(algo.ppo_epochs):
            order = torch.randperm(n, generator=gen) if mb < n else torch.arange(n)
            for idx in order.split(mb):
                mini = trim(batch.select(idx))
                first = epoch == 0 and counts == 0
                # A token mean over this rank's tokens times w averages over the ranks to the token mean
                # over the whole mini-batch (w = 1 on one process); DDP/DeepSpeed average gradients.
                n_tok = mini.response_mask.sum()
                w = float(n_tok) * world / self.dist.sum(n_tok) if world > 1 else 1.0
                offset = 0
                vals: dict[str, torch.Tensor] = {}
                parts = self.micro_batches(mini)
                for part in parts:
                    # gradients accumulate over micro-batches: each carries its share of the mini-batch loss,
                    # by tokens (token means) or by sequences (the per-sequence aggregations); one part: 1.0
                    rows = idx[offset : offset + part.num_samples]
                    offset += part.num_samples
                    r = part.response_ids.shape[1]
                    mask = part.response_mask.to(self.device)
                    tok_share = float(mask.sum()) / float(n_tok) if len(parts) > 1 else 1.0
                    seq_share = part.num_samples / len(idx) if len(parts) > 1 else 1.0
                    agg_w = w * tok_share if algo.loss_agg == "token_mean" else seq_share
                    logp, ent = token_logprobs(self.backend.model, part, temp, with_entropy=True)
                    pg = ppo_clip(logp, part.behaviour_logp.to(self.device), advantages[rows, :r].to(self.device),
                                  mask, clip_low=algo.clip_eps, clip_high=algo.clip_eps_high, agg=algo.loss_agg)
                    ref = ref_logp[rows, :r].to(self.device)
                    kl_term = agg_w * self.kl.loss(logp, ref, mask, behaviour_logp=part.behaviour_logp.to(self.device),
                                                   agg=algo.loss_agg)
                    loss = agg_w * pg.loss + beta * kl_term
                    check_finite(step, **{"loss/pg": pg.loss, "loss/kl": kl_term})
                    if part is parts[-1]:
                        grad_norms.append(self.backend.step(loss))
                    else:
                        self.backend.accumulate(loss)
                    share = w * tok_share
                    part_vals = {"loss/pg": _f64(pg.loss) * agg_w, "loss/kl": _f64(beta * kl_term),
                                 "loss/total": _f64(loss), "off/ratio_mean": _f64(pg.ratio_mean) * share,
                                 "off/clipfrac": _f64(pg.clipfrac) * share,
                                 "rollout/entropy": _f64(masked_mean(ent, mask)) * share}
                    if self.kl.as_loss and self.kl.log_ratio_clamp is not None:
                        part_vals["kl/clamp_rate"] = (tok_share if self.kl.level == "token" else seq_share) * _f64(
                            kl_lib.clamp_fraction(logp, ref, mask, log_ratio_clamp=self.kl.log_ratio_clamp,
                                                  level=self.kl.level))
                    for k, v in part_vals.items():
                        vals[k] = vals[k] + v if k in vals else v
                    ratio_max = torch.maximum(ratio_max, _f64(pg.ratio_max))
                grad_norms[-1] = _f64(torch.as_tensor(grad_norms[-1], device=self.device))
                vals["loss/grad_norm"] = grad_norms[-1]
                if first:
                    sums["rollout/entropy_first"] = vals["rollout/entropy"]
                for k, v in vals.items():
                    sums[k] = sums[k] + v if k in sums else v
                counts += 1
        keys = list(sums)
        *values, rmax = torch.stack([sums[k] for k in keys] + [ratio_max]).tolist()  # the one transfer
        host = dict(zip(keys, values))
        if not math.isfinite(host["loss/grad_norm"]):  # the sum is finite only if every mini-batch's norm is
            check_finite(step, **{"loss/grad_norm": torch.stack(grad_norms)})
        out = {k: self.dist.mean(v / counts) for k, v in host.items() if k != "rollout/entropy_first"}
        # entropy of the policy that sampled the batch: the first (on-policy) mini-batch's
        out["rollout/entropy"] = self.dist.mean(host["rollout/entropy_first"])
        out["off/ratio_max"] = self.dist.max(rmax)
        self.backend.end_of_step()
        return out

    def global_std(self, x: torch.Tensor) -> float:
        """The (Bessel-corrected) std of `x` over every rank's samples (ranks hold equally many)."""
        n = x.numel() * self.dist.world
        mean, sq = self.dist.mean(x.double().mean()), self.dist.mean(x.double().square().mean())
        return math.sqrt(max(sq - mean * mean, 0.0) * n / max(n - 1, 1))

    def after_update(self) -> None:
        """Hand the new weights to the rollout engine (lagged by `rollout.staleness` updates)."""
        self.engine.wake_up()
        with self.backend.full_weights():
            if self.staleness:
                self.snapshots.append(self._snapshot())
                while len(self.snapshots) > self.staleness + 1:
                    self.snapshots.popleft()
                self.sampler_model.load_state_dict(self.snapshots[0])
            self.engine.sync_weights(self.sampler_model)

    # -- the run ---------------------------------------------------------------------------
    def fit(self, on_step=None) -> None:
        """Run the remaining steps; checkpoint every `trainer.save_every` steps and at the end.

        SIGTERM / SIGUSR1 / SIGUSR2 (SLURM preemption, timeouts) finish the current step, write a
        checkpoint and raise `Preempted` (the caller records it and hands over to any requeue handler).
        """
        tcfg = self.cfg.trainer
        steps = tcfg.steps
        signals = checkpoint.Preemption().install()
        try:
            while self.step < steps:
                self.step += 1
                metrics = self.train_step(self.step)
                bad = [k for k, v in metrics.items() if not k.startswith("perf/") and not math.isfinite(v)]
                if bad:
                    raise KlbenchError(f"non-finite metrics at step {self.step}: {', '.join(bad)}")
                self.tracker.log(self.step, metrics)
                if self.evaluator is not None and self.evaluator.due(self.step, steps):
                    with self.backend.full_weights():
                        self.tracker.log(self.step, self.evaluator(self.policy, self.engine, self.step))
                if on_step is not None:
                    on_step(self)
                if signals.received is not None:
                    path = checkpoint.save(self, self.run_dir, tcfg.keep_last)
                    raise checkpoint.Preempted(signals.received, path, signals)
                if tcfg.save_every and self.step % tcfg.save_every == 0 and self.step < steps:
                    checkpoint.save(self, self.run_dir, tcfg.keep_last)
            if tcfg.save_every:
                checkpoint.save(self, self.run_dir, tcfg.keep_last)
        except checkpoint.Preempted:
            raise
        finally:
            if signals.received is None:
                signals.restore()

    def close(self) -> None:
        self.engine.close()


def _f64(x: torch.Tensor) -> torch.Tensor:
    """A detached scalar metric in float64 (exact for float32 values), on its device: no host sync."""
    return x.detach().to(torch.float64)


def algo_mini_batch(cfg: Config, world: int) -> int:
    """Samples per optimizer step over all ranks (`algo.mini_batch_size`; null = the whole batch).
    Each of the `world` ranks holds an equal share of every mini-batch."""
    algo = cfg.algo
    mb = algo.mini_batch_size or algo.prompts_per_step * algo.group_size
    if mb % world:
        raise KlbenchError(f"algo.mini_batch_size={mb} does not split over {world} processes; "
                           f"use a multiple of {world}")
    return mb

