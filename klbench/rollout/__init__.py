"""Rollout engines: sample G responses per prompt and report behaviour log-probs.

`klbench.rollout.factory.build_engine(cfg, ...)` builds the engine `rollout.engine` names (hf | vllm);
`klbench.rollout.base` holds the interface both implement and the batch they return.
"""
