"""`klbench run`'s job: one experiment in one run directory.

The run directory (Hydra's job output dir) ends up holding:
  config.yaml     the resolved config          metrics.jsonl  one JSON object per step
  summary.json    final + windowed metrics     samples.jsonl  a few generations per step
  status.json     running|completed|failed     final/         the final policy (HF format)
  .hydra/         Hydra's own record (overrides, unresolved config)
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import OmegaConf

from klbench.config import Config, flatten, to_config
from klbench.provenance import git_info, machine_info
from klbench.records import summarize, write_json
from klbench.tracking import NullTracker, Tracker
from klbench.train import checkpoint, runstate
from klbench.train.loop import Trainer
from klbench.train.rundir import RunDir, check_resume, check_start

log = logging.getLogger(__name__)


def now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def run_experiment(cfg: Config, run_dir: Path, *, sweep: str | None = None, tags: list[str] | None = None,
                   make_evaluator=None, on_start=None) -> dict:
    """Train one experiment into `run_dir`; return its summary. Raises on failure (after recording it).

    `make_evaluator`: the periodic evaluation's factory (see `Trainer`), or None. `on_start(run_dir)`:
    called once the run may write into the directory (the CLI writes Hydra's `.hydra/` record). The directory is locked
    for the run's life, and a directory that already holds results is only continued from a checkpoint
    after that checkpoint and the config have been checked: until then nothing in it changes.
    """
    dist = runstate.from_env()
    run_dir = Path(run_dir)
    if not cfg.trainer.resume and int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0:
        cfg.trainer.resume = "auto"  # a requeued SLURM job (preemption / timeout) continues its run
    run = RunDir(run_dir)
    if dist.is_main:
        run.lock()
    try:
        return _run(cfg, run, dist, sweep, tags, make_evaluator, on_start if dist.is_main else None)
    finally:
        run.release()


def _validated_resume(cfg: Config, run: RunDir) -> Path | None:
    """The checkpoint to continue from, checked (files, config) before the run dir is touched; None: start."""
    path = checkpoint.resolve(cfg.trainer.resume, run.path)
    check_start(run, cfg, path)
    if path is None:
        return None
    meta = checkpoint.verify(path)
    saved = meta.get("config")
    if saved is None and (run.path / "config.yaml").exists():  # checkpoints written before meta held it
        saved = json.loads(json.dumps(flatten(to_config(OmegaConf.load(run.path / "config.yaml"))), default=str))
    if saved is not None:
        check_resume(cfg, saved, meta["step"], path)
    return path


def _record(path: Path, status: dict) -> None:
    """status.json, or a log line if even that cannot be written (a full disk): never mask the real error."""
    try:
        write_json(path, status)
    except OSError as e:
        log.error("could not write %s: %s", path, e)


def _run(cfg: Config, run: RunDir, dist, sweep, tags, make_evaluator, on_start) -> dict:
    run_dir, status_path = run.path, run.path / "status.json"
    fresh = not run.holds_results()
    resume_from = _validated_resume(cfg, run) if dist.is_main else checkpoint.resolve(cfg.trainer.resume, run_dir)
    if resume_from is not None and run.status().get("status") == "completed" \
            and checkpoint.verify(resume_from)["step"] == cfg.trainer.steps and (run_dir / "summary.json").exists():
        print(f"klbench: {run_dir} is complete (step {cfg.trainer.steps} of {cfg.trainer.steps}): nothing to do",
              file=sys.stderr)
        return json.loads((run_dir / "summary.json").read_text())
    on_start = on_start or (lambda _: None)
    started = time.perf_counter()
    status = {"status": "running", "started": now(), "pid": os.getpid(), "python": platform.python_version(),
              "torch": torch.__version__, "world_size": dist.world, "git": git_info(), "machine": machine_info()}
    slurm_job = "_".join(os.environ[k] for k in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID") if k in os.environ)
    if slurm_job or os.environ.get("SLURM_JOB_ID"):
        status["slurm_job"] = slurm_job or os.environ["SLURM_JOB_ID"]
        status["slurm_restarts"] = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    tracker = NullTracker()
    trainer = None
    try:
        trainer = Trainer(cfg, run_dir, NullTracker(), dist, make_evaluator=make_evaluator, resume_from=resume_from)
    except BaseException as e:
        if dist.is_main and fresh:  # nothing was there to protect: record why the run never started
            run_dir.mkdir(parents=True, exist_ok=True)
            on_start(run_dir)
            _record(status_path, {**status, "status": "failed", "ended": now(), "error": f"{type(e).__name__}: {e}",
                                  "step": 0})
        raise
    # validated: from here on this run owns the directory
    try:
        if dist.is_main:
            on_start(run_dir)
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
            write_json(status_path, status)
            tracker = Tracker(run_dir, cfg.logger, total_steps=cfg.trainer.steps, config=asdict(cfg),
                              name=f"{cfg.name}-{run_dir.name}", group=sweep, tags=tags, resume_step=trainer.step)
            trainer.tracker = tracker
        trainer.fit()
        checkpoint.check_healthy(trainer)
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
            _record(status_path, {**status, "status": "preempted", "ended": now(), "step": trainer.step,
                                  "checkpoint": str(e.checkpoint), "error": str(e)})
        tracker.finish()
        trainer.close()
        trainer = None
        e.signals.hand_over()  # e.g. submitit's USR2 handler: requeue this job
        raise SystemExit(128 + e.signum) from None
    except BaseException as e:  # record why, then let the CLI report it
        if dist.is_main:
            kind = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            _record(status_path, {**status, "status": kind, "ended": now(), "error": f"{type(e).__name__}: {e}",
                                  "step": trainer.step})
        try:
            tracker.finish()
        except Exception:  # noqa: BLE001 - never mask the original error
            log.exception("while closing the tracker")
        raise
    finally:
        if trainer is not None:
            trainer.close()
