"""Build the rollout engine named by `rollout.engine`."""

from __future__ import annotations

import torch

from klbench.config import RolloutConfig


def build_engine(cfg: RolloutConfig, sampler_model: torch.nn.Module, tokenizer, model_dir: str, seed: int):
    """`sampler_model` is the module the engine must sample from (the policy, or its lagged copy)."""
    if cfg.engine == "hf":
        from klbench.rollout.hf import HFEngine

        return HFEngine(sampler_model, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
    if cfg.engine == "vllm":
        from klbench.rollout.vllm import VLLMEngine

        engine = VLLMEngine(model_dir, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                            gpu_memory_utilization=cfg.gpu_memory_utilization,
                            tensor_parallel_size=cfg.tensor_parallel_size, enable_sleep_mode=cfg.enable_sleep_mode,
                            seed=seed, kv_cache_gib=cfg.kv_cache_gib, enforce_eager=cfg.enforce_eager)
        engine.sync_weights(sampler_model)
        return engine
    raise ValueError(f"unknown rollout.engine {cfg.engine!r}; expected hf or vllm")
