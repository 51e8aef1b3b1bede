"""Metric sinks behind one interface: the console, `metrics.jsonl` in the run directory, and W&B.

Only rank 0 builds a real `Tracker`; other ranks get `NullTracker`, so the loop has no
`if rank == 0` branches. Metric names follow the glossary in the README (kl/, reward/,
rollout/, loss/, off/, perf/, eval/).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from klbench.config import LoggerConfig

#: The numbers the console shows for each step.
CONSOLE_KEYS = ("reward/acc", "reward/mean", "kl/rkl_k1", "rollout/entropy", "rollout/response_len", "perf/step_s")


def _short(key: str) -> str:
    return key.split("/", 1)[-1]


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def wandb_mode(cfg: LoggerConfig) -> str:
    """`auto`: WANDB_MODE if set, else online when an API key is configured, else offline."""
    if cfg.mode != "auto":
        return cfg.mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        if "api.wandb.ai" in netrc.read_text():
            return "online"
    except OSError:
        pass
    return "offline"


class NullTracker:
    """What non-zero ranks (and tests that want silence) log to."""

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_samples(self, step: int, samples: list[dict]) -> None: ...

    def finish(self, summary: dict | None = None) -> None: ...


class Tracker(NullTracker):
    def __init__(self, run_dir: Path, cfg: LoggerConfig, *, total_steps: int, config: dict, name: str,
                 group: str | None = None, tags: list[str] | None = None, resume_step: int = 0):
        self.run_dir = Path(run_dir)
        self.total = total_steps
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.samples_path = self.run_dir / "samples.jsonl"
        self._truncate_after(resume_step)
        self._metrics = self.metrics_path.open("a")
        self._samples = self.samples_path.open("a")
        self.cfg = cfg
        self._tty = sys.stderr.isatty()
        self._every = max(1, total_steps // 20)
        self._t0 = time.perf_counter()
        self._progress = None
        if cfg.progress and self._tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("[bold]klbench"), BarColumn(), MofNCompleteColumn(),
                                      TimeRemainingColumn(), TextColumn("{task.description}"))
            self._task = self._progress.add_task("", total=total_steps, completed=resume_step)
            self._progress.start()
        self._wandb = None
        if cfg.wandb:
            import wandb

            mode = wandb_mode(cfg)
            self._wandb = wandb.init(
                project=cfg.project, entity=cfg.entity, group=cfg.group or group, tags=list(cfg.tags or tags or []),
                name=name, config=config, dir=str(self.run_dir), mode=mode, resume="allow",
                id=self._wandb_id(), reinit="finish_previous",
            )

    def _wandb_id(self) -> str:
        """A stable id per run directory, so a resumed run continues the same W&B run."""
        path = self.run_dir / ".wandb_id"
        if path.exists():
            return path.read_text().strip()
        import uuid

        rid = uuid.uuid4().hex[:12]  # W&B run ids: lowercase letters and digits
        path.write_text(rid)
        return rid

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint's step (they will be logged again)."""
        for path in (self.metrics_path, self.samples_path):
            if not path.exists():
                continue
            if step == 0:
                path.unlink()
                continue
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            os.replace(tmp, path)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        shown = "  ".join(f"{_short(k)} {metrics[k]:.3g}" for k in CONSOLE_KEYS if k in metrics)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, description=shown)
        elif self.cfg.progress and (step % self._every == 0 or step == self.total or step == 1):
            elapsed = time.perf_counter() - self._t0
            print(f"[klbench] step {step}/{self.total} ({elapsed:.0f}s)  {shown}", file=sys.stderr, flush=True)

    def log_samples(self, step: int, samples: list[dict]) -> None:
        for s in samples:
            self._samples.write(json.dumps({"step": step, **s}) + "\n")
        self._samples.flush()

    def finish(self, summary: dict | None = None) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._metrics.close()
        self._samples.close()
        if self._wandb is not None:
            if summary:
                self._wandb.summary.update({k: v for k, v in summary.get("window", {}).items()})
            self._wandb.finish()
