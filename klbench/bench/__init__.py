"""`klbench bench`: klbench's GRPO step against TRL's `GRPOTrainer` on identical work.

    klbench bench [--workload 1m|25m|100m ...] [--steps N] [--warmup W] [--reps R] [--threads T]
                  [--short] [--curves] [--engine-overhead] [--profile] [--out results/perf]

Each side runs in its own fresh subprocess (`python -m klbench.bench --worker SPEC OUT`), so imports, thread
pools and allocator state never leak between them; the sides alternate A B A B for R repetitions and
the first W steps of every run are warm-up, not timed.

What is identical on both sides:

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
writes `ablations-<workload>.*` (see `klbench.bench.ablations`). Every file records the command, the
commit (+ dirty flag), the machine (CPU model, cores, RAM, load) and the package versions.

Modules: `workload` (the shared step, workloads, worker specs), `klbench_side`, `trl_side`, `vllm_side`
(one worker each), `ablations` (`--ablations`), `runner` (the command: workers, checks, reports).
"""
