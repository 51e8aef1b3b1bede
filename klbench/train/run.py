"""`klbench run`'s job: one experiment in one run directory.

The run directory (Hydra's job output dir) ends up holding:
  config.yaml     the resolved config          metrics.jsonl  one JSON object per step
  summary.json    final + windowed metrics     samples.jsonl  a few generations per step
  status.json     running|completed|failed     final/         the final policy (HF format)
  .hydra/         Hydra's own record (overrides, unresolved config)
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import OmegaConf

from klbench.config import Config
from klbench.errors import KlbenchError
from klbench.provenance import git_info, machine_info
from klbench.records import summarize, write_json
from klbench.tracking import NullTracker, Tracker
from klbench.train import checkpoint, runstate
from klbench.train.loop import Trainer

log = logging.getLogger(__name__)


def now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def run_experiment(cfg: Config, run_dir: Path, *, sweep: str | None = None, tags: list[str] | None = None,
                   make_evaluator=None) -> dict:
    """Train one experiment into `run_dir`; return its summary. Raises on failure (after recording it).

    `make_evaluator`: the periodic evaluation's factory (see `Trainer`), or None.
    """
    dist = runstate.from_env()
    run_dir = Path(run_dir)
    status_path = run_dir / "status.json"
    if not cfg.trainer.resume and int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0:
        cfg.trainer.resume = "auto"  # a requeued SLURM job (preemption / timeout) continues its run
    if not cfg.trainer.resume and (run_dir / "metrics.jsonl").exists():
        raise KlbenchError(f"{run_dir} already holds a run (metrics.jsonl): continue it with trainer.resume=auto, "
                           "or choose another hydra.run.dir")
    started = time.perf_counter()
    status = {"status": "running", "started": now(), "pid": os.getpid(), "python": platform.python_version(),
              "torch": torch.__version__, "world_size": dist.world, "git": git_info(), "machine": machine_info()}
    slurm_job = "_".join(os.environ[k] for k in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID") if k in os.environ)
    if slurm_job or os.environ.get("SLURM_JOB_ID"):
        status["slurm_job"] = slurm_job or os.environ["SLURM_JOB_ID"]
        status["slurm_restarts"] = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        write_json(status_path, status)
    tracker = NullTracker()
    trainer = None
    try:
        trainer = Trainer(cfg, run_dir, NullTracker(), dist, make_evaluator=make_evaluator)
        if dist.is_main:
            tracker = Tracker(run_dir, cfg.logger, total_steps=cfg.trainer.steps, config=asdict(cfg),
                              name=f"{cfg.name}-{run_dir.name}", group=sweep, tags=tags, resume_step=trainer.step)
            trainer.tracker = tracker
        trainer.fit()
        with trainer.backend.full_weights():  # collective under DeepSpeed ZeRO-3
            if dist.is_main:
                final = run_dir / "final"
                trainer.policy.save_pretrained(final)
                trainer.tokenizer.save_pretrained(final)
        summary = summarize(run_dir / "metrics.jsonl")
        summary["wall_s"] = round(time.perf_counter() - started, 2)
        if dist.is_main:
            write_json(run_dir / "summary.json", summary)
            write_json(status_path, {**status, "status": "completed", "ended": now(), "wall_s": summary["wall_s"],
                                     "step": trainer.step})
        tracker.finish(summary)
        return summary
    except checkpoint.Preempted as e:
        if dist.is_main:
            write_json(status_path, {**status, "status": "preempted", "ended": now(), "step": trainer.step,
                                     "checkpoint": str(e.checkpoint), "error": str(e)})
        tracker.finish()
        trainer.close()
        trainer = None
        e.signals.hand_over()  # e.g. submitit's USR2 handler: requeue this job
        raise SystemExit(128 + e.signum) from None
    except BaseException as e:  # record why, then let the CLI report it
        if dist.is_main:
            kind = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            write_json(status_path, {**status, "status": kind, "ended": now(), "error": f"{type(e).__name__}: {e}",
                                     "step": trainer.step if trainer else 0})
        try:
            tracker.finish()
        except Exception:  # noqa: BLE001 - never mask the original error
            log.exception("while closing the tracker")
        raise
    finally:
        if trainer is not None:
            trainer.close()
