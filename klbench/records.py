"""Run-directory records: atomic JSON writes, JSON lines that survive a torn last line, and the one
window rule every summary and report uses. Standard library only."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

#: Summaries average the last this-fraction of training steps (per-step KL estimates are noisy).
WINDOW_FRACTION = 0.2


def json_safe(x: Any) -> Any:
    """Strict JSON: nan/inf become null, numpy scalars plain numbers (containers walked)."""
    if hasattr(x, "item") and getattr(x, "ndim", None) == 0:
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def write_json(path: Path, obj) -> None:
    """Atomic write: a reader never sees half a file, and a failed write leaves no temporary behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, default=str))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class Lines(NamedTuple):
    rows: list[dict]  # every line that is a JSON object
    bad: list[int]  # 1-based numbers of the lines that are not (torn by a kill, or not UTF-8)


def read_jsonl(path: Path) -> Lines:
    """The JSON objects of a JSON-lines file, one per line; unreadable lines are skipped and numbered."""
    rows, bad = [], []
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return Lines([], [])
    for i, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            bad.append(i)
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(i)
    return Lines(rows, bad)


def is_train_row(row: dict) -> bool:
    """A training step's row of metrics.jsonl (evaluation rows carry only eval/* and perf/eval_s)."""
    return any(k.startswith(("kl/", "reward/")) for k in row)


def window_size(n_steps: int, fraction: float = WINDOW_FRACTION) -> int:
    """How many of a run's last training steps its window holds."""
    return max(1, round(n_steps * fraction)) if n_steps else 0


def summarize(metrics_path: Path, fraction: float = WINDOW_FRACTION) -> dict:
    """summary.json: the last training step's metrics, their means over the window, the last evaluation."""
    rows = read_jsonl(metrics_path).rows
    train = [r for r in rows if is_train_row(r)]
    if not train:
        return {"steps": 0, "final": {}, "window": {}}
    window = train[-window_size(len(train), fraction) :]
    keys = sorted({k for r in window for k in r if k != "step"})
    avg = {}
    for k in keys:
        vals = [r[k] for r in window if isinstance(r.get(k), (int, float))]
        if vals:
            avg[k] = sum(vals) / len(vals)
    evals = {}
    for r in rows:
        evals.update({k: v for k, v in r.items() if k.startswith("eval/")})
    return {"steps": train[-1]["step"], "window_steps": [window[0]["step"], window[-1]["step"]],
            "final": {k: v for k, v in train[-1].items() if k != "step"}, "window": avg, "eval": evals}
