"""Metric sinks behind one interface: the console, `metrics.jsonl` in the run directory, and W&B.

Only rank 0 builds a real `Tracker`; other ranks get `NullTracker`, so the loop has no
`if rank == 0` branches. Metric names follow the glossary in docs/configuration.md (kl/, reward/,
rollout/, loss/, off/, perf/, eval/). W&B never stops or stalls a run: when it cannot start online
(no network, no or a bad API key) the run logs offline, and when it cannot run at all, without it;
either way one warning line says so, and metrics.jsonl is complete.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from klbench.config import LoggerConfig
from klbench.errors import warn

#: The numbers the console shows for each step.
CONSOLE_KEYS = ("reward/acc", "reward/mean", "kl/rkl_k1", "rollout/entropy", "rollout/response_len", "perf/step_s")


def _short(key: str) -> str:
    return key.split("/", 1)[-1]


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


#: Seconds W&B may take to start online before the run goes on offline.
WANDB_INIT_TIMEOUT_S = 15.0


def _wandb_host() -> str:
    return urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"


def wandb_reachable(timeout_s: float = 3.0) -> bool:
    try:
        socket.create_connection((_wandb_host(), 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def wandb_mode(cfg: LoggerConfig) -> str:
    """`auto`: WANDB_MODE if set, else online when an API key is configured and W&B can be reached, else offline."""
    if cfg.mode != "auto":
        return cfg.mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        logged_in = bool(os.environ.get("WANDB_API_KEY")) or _wandb_host() in netrc.read_text()
    except OSError:
        logged_in = bool(os.environ.get("WANDB_API_KEY"))
    return "online" if logged_in and wandb_reachable() else "offline"


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
        self._wandb = self._start_wandb(cfg, project=cfg.project, entity=cfg.entity, group=cfg.group or group,
                                        tags=list(cfg.tags or tags or []), name=name, config=config) if cfg.wandb else None

    def _start_wandb(self, cfg: LoggerConfig, **kw):
        """A W&B run (online, else offline), or None: one warning line for what did not work."""
        import wandb

        mode = wandb_mode(cfg)
        if mode == "online" and not wandb_reachable():
            warn(f"W&B is unreachable ({_wandb_host()}): logging offline (sync later with `wandb sync`)")
            mode = "offline"
        for attempt in [mode, "offline"] if mode == "online" else [mode]:
            try:
                return wandb.init(dir=str(self.run_dir), mode=attempt, resume="allow", id=self._wandb_id(),
                                  reinit="finish_previous", settings=wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S),
                                  **kw)
            except Exception as e:  # noqa: BLE001 - any W&B failure: the run goes on
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                then = "logging offline" if attempt == "online" else "W&B is off for this run (metrics.jsonl has it all)"
                warn(f"W&B could not start {attempt} ({type(e).__name__}: {first}): {then}")
        return None

    def _wandb_id(self) -> str:
        """A stable id per run directory, so a resumed run continues the same W&B run."""
        path = self.run_dir / ".wandb_id"
        if path.exists():
            return path.read_text().strip()
        rid = uuid.uuid4().hex[:12]  # W&B run ids: lowercase letters and digits
        path.write_text(rid)
        return rid

    def _truncate_after(self, step: int) -> None:
        """On resume, keep the lines logged up to the checkpoint's step (the rest will be logged again),
        dropping lines a kill tore mid-write. A fresh run (step 0) appends; it never deletes."""
        for path in (self.metrics_path, self.samples_path):
            if step == 0 or not path.exists():
                continue
            keep = []
            for raw in path.read_bytes().splitlines():
                try:
                    row = json.loads(raw)
                except ValueError:  # torn by a kill, or not UTF-8
                    continue
                if isinstance(row, dict) and row.get("step", 0) <= step:
                    keep.append(raw + b"\n")
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(b"".join(keep))
            os.replace(tmp, path)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        if self._wandb is not None:
            try:
                self._wandb.log(metrics, step=step)
            except Exception as e:  # noqa: BLE001 - a tracker failure never stops a run
                warn(f"W&B stopped logging ({type(e).__name__}: {e}); metrics.jsonl goes on")
                self._wandb = None
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
            try:
                if summary:
                    self._wandb.summary.update(dict(summary.get("window", {})))
                self._wandb.finish()
            except Exception as e:  # noqa: BLE001
                warn(f"W&B could not finish the run ({type(e).__name__}: {e})")
