"""Rollout engines: sample G responses per prompt and report behaviour log-probs.

`build_engine(cfg, ...)` picks the engine named by `rollout.engine` (hf | vllm).
"""
