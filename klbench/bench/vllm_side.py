"""The vLLM sides of `klbench bench --engine-overhead`: klbench's VLLMEngine against bare `vllm.LLM`."""

from __future__ import annotations

import os
import random
import time

import torch

from klbench.bench.workload import (
    TEMPERATURE,
    WorkerSpec,
    klbench_config,
    process_age_s,
)
from klbench.data import build_task
from klbench.models import load_tokenizer
from klbench.rollout.base import SamplingParams
from klbench.rollout.vllm import VLLMEngine


def run_vllm(spec: WorkerSpec) -> dict:
    """Rollout tokens/s of klbench's VLLMEngine or of bare `vllm.LLM.generate` on the same prompts."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    torch.set_num_threads(spec.threads)
    cfg = klbench_config(spec)
    tokenizer = load_tokenizer(spec.model_dir)
    task = build_task(cfg.data, tokenizer, cfg.seed)
    pad, eos, n, new = tokenizer.pad_token_id, tokenizer.eos_token_id, spec.load.group_size, spec.new_tokens
    kv_bytes = int(cfg.rollout.kv_cache_gib * 2**30)
    if spec.side == "vllm-engine":
        engine = VLLMEngine(spec.model_dir, pad_id=pad, eos_id=eos, seed=spec.seed,
            kv_cache_gib=cfg.rollout.kv_cache_gib, enforce_eager=cfg.rollout.enforce_eager)

        def generate(prompts: list[list[int]], seed: int) -> int:
            batch = engine.generate(prompts,
                SamplingParams(n=n, max_new_tokens=new, temperature=TEMPERATURE, seed=seed))
            return int(batch.response_mask.sum().item())

        close = engine.close
    else:
        import vllm
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.inputs import TokensPrompt

        threads = torch.get_num_threads()
        eager = cfg.rollout.enforce_eager  # None: as VLLMEngine resolves it, eager on CPU
        llm = vllm.LLM(model=spec.model_dir, dtype="float32", seed=spec.seed,
            enforce_eager=(not torch.cuda.is_available()) if eager is None else eager,
            logprobs_mode="processed_logprobs", generation_config="vllm", kv_cache_memory_bytes=kv_bytes)
        torch.set_num_threads(threads)

        def generate(prompts: list[list[int]], seed: int) -> int:
            if spec.side == "vllm-bare":  # the sampling requests VLLMEngine builds, without its wrapping
                rng = random.Random(seed)
                sampling = [
                    VllmSamplingParams(n=n, temperature=TEMPERATURE, top_p=1.0, max_tokens=new,
                        seed=rng.randrange(2**31 - n), logprobs=0, ignore_eos=True, stop_token_ids=[eos],
                        detokenize=False)
                    for _ in prompts
                ]
            else:  # one unseeded request type: what a throughput-only user would write
                sampling = VllmSamplingParams(n=n, temperature=TEMPERATURE, max_tokens=new, logprobs=0,
                    detokenize=False)
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sampling, use_tqdm=False)
            return sum(len(c.token_ids) for o in outs for c in o.outputs)

        close = llm.llm_engine.engine_core.shutdown
    steps = []
    startup_s = process_age_s()
    try:
        for call in range(1, spec.warmup + spec.steps + 1):
            prompts = [task.encode(ex) for ex in task.batch(call, spec.load.prompts_per_step)]
            t0 = time.perf_counter()
            tokens = generate(prompts, seed=call)
            dt = time.perf_counter() - t0
            steps.append(
                {"step": call, "step_s": dt, "completion_tokens": tokens, "completions": len(prompts) * n,
                    "generate_calls": 1}
            )
    finally:
        close()
    return {"steps": steps, "startup_s": startup_s, "torch_threads": torch.get_num_threads()}
