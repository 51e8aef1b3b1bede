"""Sweeps: how a multirun expands into jobs, and the end-of-sweep summary of the jobs that did not complete."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

#: Jobs of the last multirun in this process that did not complete: (job dir, reason).
FAILED: list[tuple[str, str]] = []


def expand_jobs(params: dict[str, Any] | None, overrides: list[str]) -> list[list[str]]:
    """Every job's overrides, in job-number order, as Hydra's BasicSweeper expands a multirun.

    `hydra.sweeper.params` (a recipe's sweep) come first, then the command line's overrides; a
    later override of a key replaces an earlier one in its place; the jobs are the cartesian
    product of the sweep values. `hydra.*` overrides (launcher, directories) are left out. Raises
    ValueError for what this cannot expand (a non-discrete sweep, a grammar error).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(overrides)
    try:
        parsed = OverridesParser.create().parse_overrides(lines)
    except Exception as e:  # noqa: BLE001 - any grammar or plugin error
        raise ValueError(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from e
    axes: dict[str, list[str]] = {}
    for ov in parsed:
        key = ov.get_key_element()
        if key.lstrip("+~").startswith("hydra"):
            continue
        if ov.is_sweep_override():
            if not ov.is_discrete_sweep():
                raise ValueError(f"'{ov.input_line}' is not a discrete sweep")
            axes[key] = [f"{key}={v}" for v in ov.sweep_string_iterator()]
        else:
            axes[key] = [f"{key}={ov.get_value_element_as_str()}"]
    return [list(job) for job in itertools.product(*axes.values())]


def sweep_status(sweep_dir: Path) -> list[tuple[str, str, str]]:
    """(job dir name, status, reason) for every job directory of a sweep."""
    out = []
    for job in sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir() and (p / ".hydra").is_dir()):
        st_path = job / "status.json"
        if not st_path.exists():
            out.append((job.name, "missing", "no status.json: the job never started or was killed"))
            continue
        try:
            st = json.loads(st_path.read_text())
        except (OSError, ValueError):
            out.append((job.name, "unreadable", f"{st_path.name} is not valid JSON"))
            continue
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
