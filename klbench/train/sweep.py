"""End-of-sweep summary: after a multirun, list every job that did not complete, with its reason."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

#: Jobs of the last multirun in this process that did not complete: (job dir, reason).
FAILED: list[tuple[str, str]] = []


def sweep_status(sweep_dir: Path) -> list[tuple[str, str, str]]:
    """(job dir name, status, reason) for every job directory of a sweep."""
    out = []
    for job in sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir() and (p / ".hydra").is_dir()):
        st_path = job / "status.json"
        if not st_path.exists():
            out.append((job.name, "missing", "no status.json: the job never started or was killed"))
            continue
        st = json.loads(st_path.read_text())
        out.append((job.name, st.get("status", "?"), st.get("error", "")))
    return out


class SweepSummary(Callback):
    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = sweep_status(sweep_dir)
        FAILED.clear()
        FAILED.extend((name, f"{status}: {reason}") for name, status, reason in rows if status != "completed")
        done = sum(status == "completed" for _, status, _ in rows)
        print(f"klbench: sweep {sweep_dir}: {done}/{len(rows)} jobs completed", file=sys.stderr)
        for name, why in FAILED:
            print(f"klbench:   {name}: {why}", file=sys.stderr)
