"""The klbench side of `klbench bench`: the real training loop, timed step by step (and `--profile`)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from klbench import kl as kl_lib
from klbench.bench.workload import (
    WorkerSpec,
    add_timer,
    klbench_config,
    klbench_overrides,
    ordered_steps,
    process_age_s,
)
from klbench.tracking import NullTracker
from klbench.train.loop import Trainer


def run_klbench(spec: WorkerSpec) -> dict:
    cfg = klbench_config(spec)
    record: dict[str, dict] = {}

    class BenchTrainer(Trainer):
        """The real loop; times `train_step` and records what each step did."""

        def train_step(self, step: int) -> dict[str, float]:
            rec = record[step]
            t0 = time.perf_counter()
            metrics = super().train_step(step)
            rec["step_s"] = time.perf_counter() - t0
            rec.update(rollout_s=metrics["perf/rollout_s"], update_s=metrics["perf/update_s"],
                reward=metrics["reward/mean"], kl_seq_k3=metrics["kl/rkl_k3"],
                kl_clamp_rate=metrics.get("kl/clamp_rate"))
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
        startup_s = process_age_s()
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
    floor = _write_profile(profiler, spec) if profiler is not None else None
    steps = ordered_steps(record, ends)
    return {
        "steps": steps,
        "matmul_floor": floor,
        "startup_s": startup_s,
        "torch_threads": torch.get_num_threads(),
        "optimizer": type(trainer.backend.opt).__name__ if hasattr(trainer.backend, "opt") else None,
        "config_overrides": klbench_overrides(spec.load, spec.model_dir, steps=cfg.trainer.steps, threads=spec.threads,
            seed=spec.seed, device=spec.device, dtype=spec.dtype, compiled=spec.compiled),
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


def _write_profile(prof, spec: WorkerSpec) -> dict:
    """Writes the op tables; returns the matrix products' floor (`matmul_floor`)."""
    path = Path(spec.profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    averages = prof.key_averages()
    floor = matmul_floor(averages, spec.steps)
    text = [
        f"torch.profiler over {spec.steps} klbench steps of workload {spec.workload} (after {spec.warmup} warm-up), "
        f"{spec.threads} threads; times are totals over those steps",
        "",
        floor["text"],
        "",
        "== by self CPU time ==",
        averages.table(sort_by="self_cpu_time_total", row_limit=30),
        "== by total CPU time (inclusive) ==",
        averages.table(sort_by="cpu_time_total", row_limit=30),
    ]
    path.write_text("\n".join(text))
    return floor


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def peak_matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of a large float32 square matrix product on this process's threads: the machine's
    practical matmul ceiling, next to which the step's own matrix products are judged."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def matmul_floor(averages, steps: int) -> dict:
    """The step's matrix-product time and FLOPs per step, a large sgemm's rate, and the step time left at that
    rate if everything else cost nothing (`floor_s`); `text`: the same as one paragraph."""
    rows = [e for e in averages if e.key in MATMUL_OPS]
    secs = sum(e.self_cpu_time_total for e in rows) / 1e6 / steps
    gflop = sum(e.flops for e in rows) / 1e9 / steps
    peak = peak_matmul_gflops()
    text = (f"matrix products ({', '.join(MATMUL_OPS)}): {secs:.3f} s and {gflop:.1f} GFLOP per step, "
            f"{gflop / max(secs, 1e-9):.0f} GFLOP/s; a 2048^3 float32 matmul runs at {peak:.0f} GFLOP/s on the same "
            f"threads. With every other cost at zero a step would still take {secs:.3f} s "
            f"({gflop / peak:.3f} s at that peak rate).")
    return {"matmul_s": secs, "gflop": gflop, "peak_gflops": peak, "floor_s": gflop / peak, "text": text}
