"""`klbench bench`: klbench's GRPO step against TRL's `GRPOTrainer` on identical work.

Each side runs in its own subprocess, alternating, and every step is checked to have done the same
work on both sides; docs/performance.md says what is identical, what differs by design, how steps
are timed and what each mode writes. Modules: `workload` (the shared step, workloads, worker
specs), `klbench_side`, `trl_side`, `vllm_side` (one worker each), `ablations` (`--ablations`),
`runner` (the command: workers, checks, statistics, reports).
"""
