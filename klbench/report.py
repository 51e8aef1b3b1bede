"""`klbench report`: sweep directories → a table, plots and a manifest (the paper's tables and figures).

    klbench report multirun/2026-11-24/22-00-00                  # → results/2026-11-24_22-00-00/
    klbench report SWEEP [SWEEP ...] [--out DIR] [--window 0.2] [--smooth N] [--metrics PAT ...]
                   [--include-failed] [--replicate seed] [--ignore KEY ...]

What it reads (see klbench/train/run.py for the run-directory format): every run directory under
the given paths — a `klbench run -m` sweep (job dirs `<num>_<override_dirname>` next to
`multirun.yaml`), several sweeps, a single run, or a directory of single runs. Per run:
`.hydra/overrides.yaml` (the job's overrides), `config.yaml` (resolved config), `metrics.jsonl`,
`status.json`.

How runs are grouped: a key is *swept* when its override value differs across the runs
(a run without the override counts as a value of its own). `seed` (`--replicate`) is the
replicate axis; `logger`, `trainer.threads` and `hydra.*` never change results and are ignored
(`--ignore` adds keys). Runs that share the values of all other swept keys form one *variant*,
e.g. `kl=k3_as_loss,kl.coef=0.5`; variants keep sweep order (order of first appearance).

What it computes: per run, the mean of each training metric over its last `--window` fraction of
training steps (the same window rule as `summary.json`), and the last value of each `eval/*`
metric; per variant, mean ± sample std (ddof=1) of those over its completed runs.

What it writes into the out dir:
  table.md, table.csv       per variant: n, mean ± std of the windowed metrics, eval metrics, wall time
  overview.png              the main metrics vs step in one grid (mean over seeds, min–max band)
  plots/<metric>.png        one figure per metric
  manifest.json, README.md  the sweep command, the report command, git commit, machine, wall times, runs

Failed, interrupted, still-running and missing jobs are listed (table footer, README, stderr) and
left out of the statistics unless `--include-failed`; their logged steps are still drawn (dotted).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import fnmatch
import json
import math
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from klbench.provenance import git_info, machine_info

#: The metrics of the table and the overview figure, in this order (those a run logs).
MAIN_METRICS = (
    "kl/rkl_k1",
    "reward/acc",
    "reward/mean",
    "reward/trait",
    "rollout/entropy",
    "rollout/response_len",
)
#: `--metrics` default: the main metrics and every held-out evaluation metric.
DEFAULT_METRICS = (*MAIN_METRICS, "eval/*")
#: What each main metric means (figure titles); the glossary is docs/DESIGN.md.
DESCRIPTIONS = {
    "kl/rkl_k1": "reverse KL to the reference (k1, per sequence)",
    "kl/rkl_k3": "reverse KL to the reference (k3, per sequence)",
    "reward/acc": "fraction of correct answers",
    "reward/mean": "mean reward",
    "reward/trait": "fraction showing π_ref's rare rewarded trait",
    "rollout/entropy": "mean token entropy",
    "rollout/response_len": "mean response length (tokens)",
}
#: Override keys that never change results: not grouping keys even when they differ.
IGNORED_KEYS = ("logger", "trainer.threads")
#: Run statuses written by klbench/train/run.py, plus `missing` (job dir without status.json).
COMPLETED = "completed"
NO_RUNS = "no klbench runs under {dir}: expected job dirs with metrics.jsonl (a `klbench run -m` sweep)"


# -- runs --------------------------------------------------------------------------------------
@dataclass
class Run:
    """One run directory, loaded."""

    name: str  # job dir name, prefixed by its sweep dir's name when several sweeps are reported
    path: Path
    num: int | None  # Hydra job number (the `<num>_` prefix of a sweep's job dir)
    overrides: dict[str, str]  # key → value, from .hydra/overrides.yaml, in command-line order
    config: dict  # the resolved config.yaml ({} when absent)
    status: str  # completed | failed | interrupted | running | missing
    error: str
    wall_s: float | None
    steps: np.ndarray  # [T] training steps
    train: dict[str, np.ndarray]  # metric → [T] values (nan where a step did not log it)
    evals: dict[str, list[tuple[int, float]]]  # eval/* metric → [(step, value)] in logged order
    # status.json's python, torch, world_size, machine, started, ended (never its host)
    info: dict = field(default_factory=dict)

    @property
    def seed(self) -> str | None:
        if "seed" in self.overrides:
            return self.overrides["seed"]
        return None if self.config.get("seed") is None else str(self.config["seed"])

    @property
    def has_metrics(self) -> bool:
        return len(self.steps) > 0

    @property
    def last_step(self) -> int:
        return int(self.steps[-1]) if self.has_metrics else 0

    def why_excluded(self) -> str | None:
        """Why this run is not in the table statistics (None: it is)."""
        if self.status == "running":
            return "running: still running, or killed before it could record how it ended"
        if self.status != COMPLETED:
            return self.status + (f": {self.error}" if self.error else "")
        if not self.has_metrics:
            return "completed but logged no training metrics (no metrics.jsonl rows)"
        return None


@dataclass
class MissingJob:
    """A job of a sweep that has no directory at all (the sweep stopped before launching it)."""

    sweep: str
    num: int
    overrides: dict[str, str]

    @property
    def name(self) -> str:
        return f"{self.sweep}/#{self.num}" if self.sweep else f"#{self.num}"


def _float(v) -> float:
    """A metrics.jsonl value as a float ('nan'/'inf' strings included; anything else → nan)."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return math.nan
    return math.nan


def read_metrics(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, list[tuple[int, float]]]]:
    """(steps [T], training metric → [T] values, eval metric → [(step, value)]) of a metrics.jsonl.

    A training row is one with any `kl/` or `reward/` key (the rule of `summary.json`); eval rows
    are the ones the evaluator logs (same step number, `eval/*` keys). Unreadable lines (a run
    killed mid-write) are skipped.
    """
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
    train_rows = [r for r in rows if any(k.startswith(("kl/", "reward/")) for k in r)]
    keys = list(dict.fromkeys(k for r in train_rows for k in r if k != "step" and not k.startswith("eval/")))
    steps = np.array([r["step"] for r in train_rows], dtype=np.int64)
    train = {k: np.array([_float(r.get(k)) for r in train_rows], dtype=np.float64) for k in keys}
    evals: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("eval/"):
                evals.setdefault(k, []).append((r["step"], _float(v)))
    return steps, train, evals


def _read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text()) if path.exists() else None
    except yaml.YAMLError:
        return None


def _parse_overrides(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines or []:
        key, sep, value = str(line).partition("=")
        if sep:
            out[key] = value
    return out


def _wall_s(status: dict) -> float | None:
    if isinstance(status.get("wall_s"), (int, float)):
        return float(status["wall_s"])
    try:  # failed runs record start and end but no wall time
        start = _dt.datetime.fromisoformat(status["started"])
        end = _dt.datetime.fromisoformat(status["ended"])
    except (KeyError, TypeError, ValueError):
        return None
    return (end - start).total_seconds()


def load_run(path: Path, name: str | None = None) -> Run:
    """Load one run directory (any of its files may be missing: a job that never started)."""
    path = Path(path)
    m = re.match(r"(\d+)(?:_|$)", path.name)
    status_path = path / "status.json"
    status: dict = {}
    if status_path.exists():
        try:
            status = json.loads(status_path.read_text())
        except json.JSONDecodeError:
            status = {"status": "failed", "error": "status.json is unreadable"}
        state, error = status.get("status", "?"), status.get("error") or ""
    else:
        state, error = "missing", "no status.json: the job never started or was killed"
    steps, train, evals = read_metrics(path / "metrics.jsonl")
    config = _read_yaml(path / "config.yaml") or _read_yaml(path / ".hydra" / "config.yaml") or {}
    info = {
        k: status[k] for k in ("python", "torch", "world_size", "machine", "started", "ended", "git") if k in status
    }
    return Run(
        name=name or path.name,
        path=path,
        num=int(m.group(1)) if m else None,
        overrides=_parse_overrides(_read_yaml(path / ".hydra" / "overrides.yaml") or []),
        config=config if isinstance(config, dict) else {},
        status=state,
        error=str(error),
        wall_s=_wall_s(status),
        steps=steps,
        train=train,
        evals=evals,
        info=info,
    )


def is_run_dir(path: Path) -> bool:
    return (path / ".hydra").is_dir() or (path / "metrics.jsonl").exists() or (path / "status.json").exists()


def _order(path: Path):
    """Job dirs in job-number order (`10_...` after `9_...`), others by name."""
    m = re.match(r"(\d+)(?:_|$)", path.name)
    return (0, int(m.group(1)), path.name) if m else (1, 0, path.name)


def find_run_dirs(root: Path, max_depth: int = 4) -> list[Path]:
    """Run directories at or under `root` (not looking inside a run), in sweep order."""
    root = Path(root)
    if is_run_dir(root):
        return [root]
    if max_depth == 0 or not root.is_dir():
        return []
    out = []
    for child in sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_order):
        out.extend(find_run_dirs(child, max_depth - 1))
    return out


def expected_jobs(multirun: dict) -> list[dict[str, str]]:
    """Every job's task overrides of a Hydra multirun, in job-number order, from its multirun.yaml.

    The expansion of Hydra's BasicSweeper: `hydra.sweeper.params` first, then the command line's
    task overrides, one entry per key (a later one replaces an earlier one in place); the jobs
    are the cartesian product. Raises ValueError for sweeps it cannot expand (other sweepers).
    """
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    hc = multirun.get("hydra") or {}
    params = (hc.get("sweeper") or {}).get("params") or {}
    task = (hc.get("overrides") or {}).get("task") or []
    lines = [f"{k}={v}" for k, v in params.items()] + list(task)
    try:
        parsed = OverridesParser.create().parse_overrides(lines)
    except Exception as e:  # noqa: BLE001 - any grammar/plugin error: cannot expand here
        raise ValueError(f"cannot expand the sweep's overrides: {e}") from e
    axes: dict[str, list[str]] = {}
    for ov in parsed:
        key = ov.get_key_element()
        if ov.is_sweep_override():
            if not ov.is_discrete_sweep():
                raise ValueError(f"'{ov.input_line}' is not a discrete sweep")
            axes[key] = list(ov.sweep_string_iterator())
        else:
            axes[key] = [ov.get_value_element_as_str()]
    keys = [k for k in axes if not k.lstrip("+~").startswith("hydra")]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


@dataclass
class Sweep:
    """One path given to `report`: its runs and, for a Hydra multirun, the record of the sweep."""

    path: Path
    name: str
    runs: list[Run]
    multirun: dict | None  # multirun.yaml
    missing: list[MissingJob]
    note: str = ""  # why missing jobs could not be determined, if so


def load_sweep(path: Path, prefix: str = "") -> Sweep:
    """Load every run under `path`; for a multirun, also the jobs that never got a directory."""
    path = Path(path)
    dirs = find_run_dirs(path)
    runs = [
        load_run(d, name=f"{prefix}{d.relative_to(path)}" if d != path else prefix + d.name) for d in dirs
    ]
    multirun = _read_yaml(path / "multirun.yaml")
    missing: list[MissingJob] = []
    note = ""
    if isinstance(multirun, dict):
        try:
            jobs = expected_jobs(multirun)
        except ValueError as e:
            jobs, note = [], str(e)
        nums = {r.num for r in runs if r.num is not None}
        missing = [MissingJob(prefix.rstrip("/"), i, ov) for i, ov in enumerate(jobs) if i not in nums]
    return Sweep(
        path=path,
        name=sweep_name(path),
        runs=runs,
        multirun=multirun if isinstance(multirun, dict) else None,
        missing=missing,
        note=note,
    )


def sweep_name(path: Path) -> str:
    """`multirun/2026-11-24/22-00-00` → `2026-11-24_22-00-00`; otherwise the directory's name."""
    path = Path(path).resolve()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", path.parent.name):
        return f"{path.parent.name}_{path.name}"
    return path.name


# -- grouping ----------------------------------------------------------------------------------
def _ignored(key: str, ignore: tuple[str, ...]) -> bool:
    bare = key.lstrip("+~")
    return bare.startswith(("hydra.", "hydra/")) or any(bare == k or bare.startswith(k + ".") for k in ignore)


def swept_keys(
    runs: list[Run], replicate: tuple[str, ...] = ("seed",), ignore: tuple[str, ...] = IGNORED_KEYS
) -> list[str]:
    """Override keys whose values differ across `runs` (absent counts as a value), in first-seen order,
    leaving out the replicate keys (seeds) and keys that never change results."""
    keys = list(dict.fromkeys(k for r in runs for k in r.overrides))
    return [
        k
        for k in keys
        if k not in replicate and not _ignored(k, ignore) and len({r.overrides.get(k) for r in runs}) > 1
    ]


@dataclass
class Variant:
    """Runs that differ only in their replicate keys (seeds)."""

    label: str  # e.g. "kl=k3_as_loss,kl.coef=0.5"
    values: dict[str, str | None]  # swept key → this variant's value (None: not overridden)
    runs: list[Run]

    def included(self, include_failed: bool = False) -> list[Run]:
        """The runs in the statistics: completed ones with metrics (any with metrics if include_failed)."""
        return [r for r in self.runs if r.has_metrics and (include_failed or r.why_excluded() is None)]

    def excluded(self, include_failed: bool = False) -> list[Run]:
        kept = {id(r) for r in self.included(include_failed)}
        return [r for r in self.runs if id(r) not in kept]


def group_runs(
    runs: list[Run],
    keys: list[str],
    replicate: tuple[str, ...] = ("seed",),
    ignore: tuple[str, ...] = IGNORED_KEYS,
) -> list[Variant]:
    """Group runs by their values of `keys`, in order of first appearance (sweep order).

    With no swept keys all runs are one variant, labelled by their common overrides (the
    replicate and ignored keys left out), or "defaults".
    """
    groups: dict[tuple, Variant] = {}
    for r in runs:
        values = {k: r.overrides.get(k) for k in keys}
        key = tuple(values.items())
        if key not in groups:
            if keys:
                label = ",".join(f"{k}={v}" for k, v in values.items() if v is not None) or "defaults"
            else:
                common = {
                    k: v
                    for k, v in r.overrides.items()
                    if k not in replicate
                    and not _ignored(k, ignore)
                    and all(o.overrides.get(k) == v for o in runs)
                }
                label = ",".join(f"{k}={v}" for k, v in common.items()) or "defaults"
            groups[key] = Variant(label=label, values=values, runs=[])
        groups[key].runs.append(r)
    return list(groups.values())


# -- statistics ------------------------------------------------------------------------------------
def window_size(n_steps: int, fraction: float) -> int:
    """How many of a run's last training steps its window holds (summary.json's rule)."""
    return max(1, round(n_steps * fraction)) if n_steps else 0


def window_mean(run: Run, metric: str, fraction: float) -> float:
    """Mean of `metric` over the last `fraction` of the run's training steps (finite values only);
    for `eval/*` metrics, the last evaluation's value. nan when the run has none."""
    if metric.startswith("eval/"):
        points = run.evals.get(metric) or []
        return points[-1][1] if points else math.nan
    values = run.train.get(metric)
    if values is None or not len(values):
        return math.nan
    window = values[-window_size(len(values), fraction) :]
    window = window[np.isfinite(window)]
    return float(window.mean()) if len(window) else math.nan


def mean_std(values) -> tuple[float, float, int]:
    """(mean, sample std with ddof=1 (nan for fewer than 2), n) of the finite values."""
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if not len(a):
        return math.nan, math.nan, 0
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else math.nan, len(a)


def select_metrics(patterns: list[str], available: list[str]) -> tuple[list[str], list[str]]:
    """(metrics matching `patterns` in pattern order, the patterns that matched nothing)."""
    out, unmatched = [], []
    for p in patterns:
        hits = (
            sorted(m for m in available if fnmatch.fnmatchcase(m, p))
            if any(c in p for c in "*?[")
            else ([p] if p in available else [])
        )
        if not hits:
            unmatched.append(p)
        out.extend(h for h in hits if h not in out)
    return out, unmatched


def variant_rows(
    variants: list[Variant], metrics: list[str], fraction: float, include_failed: bool = False
) -> list[dict]:
    """Per variant: label, n, seeds, excluded runs, per-metric (mean, std, n) and mean wall time."""
    rows = []
    for v in variants:
        runs = v.included(include_failed)
        stats = {m: mean_std([window_mean(r, m, fraction) for r in runs]) for m in metrics}
        rows.append(
            {
                "variant": v.label,
                "values": v.values,
                "n": len(runs),
                "seeds": [r.seed for r in runs],
                "excluded": [r.name for r in v.excluded(include_failed)],
                "stats": stats,
                "wall_s": mean_std([r.wall_s for r in runs if r.wall_s is not None]),
            }
        )
    return rows


# -- table ---------------------------------------------------------------------------------------------
def fmt(x: float, digits: int = 3) -> str:
    """`x` to `digits` significant figures, trailing zeros kept (9.00, 0.0469, 123); tiny values in e-notation."""
    if x is None or not math.isfinite(x):
        return "—"
    if x == 0:
        return "0"
    if abs(x) < 1e-3:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{max(0, digits - 1 - math.floor(math.log10(abs(x))))}f}"


def fmt_pm(mean: float, std: float) -> str:
    """`mean ± std` (std to 2 significant figures); the mean alone when there is no std (one seed)."""
    if not math.isfinite(mean):
        return "—"
    return fmt(mean) if not math.isfinite(std) else f"{fmt(mean)} ± {fmt(std, 2)}"


def fmt_duration(s: float) -> str:
    if s is None or not math.isfinite(s):
        return "—"
    if s < 120:
        return f"{s:.0f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def exclusion_lines(runs: list[Run], missing: list[MissingJob], include_failed: bool) -> list[str]:
    """One line per run left out of (or, with include_failed, not completed but kept in) the statistics."""
    lines = []
    for r in runs:
        why = r.why_excluded()
        if why is None:
            continue
        kept = include_failed and r.has_metrics
        steps = f"{len(r.steps)} step(s) logged" if r.has_metrics else "no metrics"
        lines.append(f"{r.name}: {why} ({steps}{'; kept in the statistics' if kept else ''})")
    for j in missing:
        ov = ",".join(f"{k}={v}" for k, v in j.overrides.items())
        lines.append(f"{j.name} ({ov}): missing: no job directory (the sweep stopped before launching it)")
    return lines


def markdown_table(
    rows: list[dict], metrics: list[str], fraction: float, notes: list[str], include_failed: bool = False
) -> str:
    """The GitHub-readable table, with its footer (how to read it, runs that did not complete)."""
    head = ["variant", "n", *metrics, "wall / run"]
    lines = [
        "| " + " | ".join(f"`{h}`" if "/" in h and h != "wall / run" else h for h in head) + " |",
        "|" + "|".join([":---", "---:"] + ["---:"] * (len(metrics) + 1)) + "|",
    ]
    for row in rows:
        cells = [row["variant"].replace("|", "\\|"), str(row["n"])]
        cells += [fmt_pm(*row["stats"][m][:2]) for m in metrics]
        cells.append(fmt_duration(row["wall_s"][0]))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"n: runs (seeds) in the statistics. Each cell: mean ± sample std (ddof=1) across seeds of each "
        f"run's mean over its last {fraction:.0%} of training steps; `eval/*`: each run's last evaluation. "
        "wall / run: mean wall time of a run.",
    ]
    if notes:
        head = "Runs that did not complete" if include_failed else "Not in the statistics"
        lines += ["", f"{head} ({len(notes)}):", ""]
        lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict], metrics: list[str], keys: list[str]) -> None:
    """table.csv: full-precision numbers, one column per swept key, mean/std/n per metric."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "variant",
                *keys,
                "n",
                "seeds",
                "excluded",
                *[f"{m} {s}" for m in metrics for s in ("mean", "std", "n")],
                "wall_s mean",
            ]
        )
        for row in rows:
            w.writerow(
                [
                    row["variant"],
                    *[row["values"].get(k) or "" for k in keys],
                    row["n"],
                    " ".join(str(s) for s in row["seeds"]),
                    " ".join(row["excluded"]),
                    *[_csv_num(x) for m in metrics for x in row["stats"][m]],
                    _csv_num(row["wall_s"][0]),
                ]
            )


def _csv_num(x) -> str:
    return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else repr(x)


# -- plots -------------------------------------------------------------------------------------------------
def smooth(values: np.ndarray, n: int) -> np.ndarray:
    """Trailing moving average over `n` points, ignoring nan (the first points average what exists)."""
    if n <= 1 or not len(values):
        return values
    ok = np.isfinite(values)
    s = np.concatenate([[0.0], np.cumsum(np.where(ok, values, 0.0))])
    c = np.concatenate([[0], np.cumsum(ok)])
    i = np.arange(len(values))
    lo = np.maximum(0, i - n + 1)
    cnt = c[i + 1] - c[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, (s[i + 1] - s[lo]) / np.maximum(cnt, 1), np.nan)


def run_series(run: Run, metric: str, n_smooth: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one run's metric (eval metrics at their eval steps), smoothed."""
    if metric.startswith("eval/"):
        pts = run.evals.get(metric) or []
        return np.array([p[0] for p in pts], dtype=np.int64), np.array([p[1] for p in pts], dtype=np.float64)
    if metric not in run.train:
        return np.array([], dtype=np.int64), np.array([], dtype=np.float64)
    y = np.where(np.isfinite(run.train[metric]), run.train[metric], np.nan)
    return run.steps, smooth(y, n_smooth)


def band(
    runs: list[Run], metric: str, n_smooth: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, min, max) across runs at each step any of them logged (nan-aware)."""
    series = [run_series(r, metric, n_smooth) for r in runs]
    if not series:  # a variant whose every run failed: nothing to draw
        empty = np.array([], dtype=float)
        return np.array([], dtype=np.int64), empty, empty, empty
    steps = np.unique(np.concatenate([s for s, _ in series]))
    grid = np.full((len(series), len(steps)), np.nan)  # [R, S]
    for i, (s, y) in enumerate(series):
        grid[i, np.searchsorted(steps, s)] = y
    ok = np.isfinite(grid)
    cnt = ok.sum(0)
    keep = cnt > 0
    mean = np.where(ok, grid, 0.0).sum(0)[keep] / cnt[keep]
    lo = np.where(ok, grid, np.inf).min(0)[keep]
    hi = np.where(ok, grid, -np.inf).max(0)[keep]
    return steps[keep], mean, lo, hi


def _colors(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def draw_metric(
    ax, variants: list[Variant], metric: str, n_smooth: int, include_failed: bool, colors: list
) -> None:
    """One panel: per variant the mean over its runs, a min–max band across seeds, failed runs dotted."""
    from matplotlib.ticker import MaxNLocator

    marker = "o" if metric.startswith("eval/") else None
    for v, c in zip(variants, colors):
        runs = [r for r in v.included(include_failed)]
        steps, mean, lo, hi = band(runs, metric, n_smooth)
        if len(steps):
            ax.plot(steps, mean, color=c, lw=1.8, marker=marker, ms=3, label=f"{v.label} (n={len(runs)})")
            if len(runs) > 1:
                ax.fill_between(steps, lo, hi, color=c, alpha=0.18, lw=0)
        for r in v.excluded(include_failed):
            s, y = run_series(r, metric, n_smooth)
            if len(s):
                ax.plot(s, y, color=c, lw=1.0, ls=":", marker=marker, ms=2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.set_xlabel("training step")
    ax.set_ylabel(metric)


def _legend_extras(variants: list[Variant], include_failed: bool) -> list:
    from matplotlib.lines import Line2D

    if any(r.has_metrics for v in variants for r in v.excluded(include_failed)):
        return [Line2D([], [], color="0.4", lw=1.0, ls=":", label="run that did not complete")]
    return []


def _how(n_smooth: int) -> str:
    s = f"{n_smooth}-step moving average" if n_smooth > 1 else "not smoothed"
    return f"line: mean over seeds · band: min–max over seeds · {s}"


def _slug(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", metric).strip("_")


def plot_metric(
    path: Path, variants: list[Variant], metric: str, n_smooth: int, include_failed: bool
) -> None:
    """plots/<metric>.png: the metric vs step, one line per variant."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    draw_metric(ax, variants, metric, n_smooth, include_failed, _colors(len(variants)))
    desc = DESCRIPTIONS.get(metric, "last evaluation" if metric.startswith("eval/") else "")
    ax.set_title(f"{metric}" + (f" — {desc}" if desc else "") + f"\n{_how(n_smooth)}", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    handles += _legend_extras(variants, include_failed)
    if handles:
        if len(handles) > 6:
            ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.legend(handles=handles, fontsize=8, loc="best")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def plot_overview(
    path: Path, variants: list[Variant], metrics: list[str], n_smooth: int, include_failed: bool, title: str
) -> None:
    """overview.png: the main metrics in one grid with one shared legend."""
    import matplotlib.pyplot as plt

    ncols = 3 if len(metrics) > 4 else min(2, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.3 * nrows), dpi=110, squeeze=False)
    colors = _colors(len(variants))
    for ax, metric in zip(axes.flat, metrics):
        draw_metric(ax, variants, metric, n_smooth, include_failed, colors)
        ax.set_title(DESCRIPTIONS.get(metric, metric), fontsize=10)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    for ax in list(axes.flat)[1 : len(metrics)]:  # a variant may lack the first metric
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    handles = list(seen.values()) + _legend_extras(variants, include_failed)
    fig.suptitle(f"{title}\n{_how(n_smooth)}", fontsize=11)
    fig.tight_layout()
    if handles:  # below the grid; bbox_inches="tight" makes room for it
        ncol = min(len(handles), 3 if len(variants) > 6 else 4)
        fig.legend(
            handles=handles,
            loc="upper center",
            bbox_to_anchor=(0.5, 0.0),
            ncol=ncol,
            fontsize=9,
            frameon=False,
        )
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def write_plots(
    out: Path, variants: list[Variant], metrics: list[str], n_smooth: int, include_failed: bool, title: str
) -> list[str]:
    """plots/<metric>.png per metric (eval/* only when evaluated at 2+ steps) and overview.png; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    runs = [r for v in variants for r in v.runs]
    plotted = [
        m for m in metrics if not m.startswith("eval/") or any(len(r.evals.get(m, [])) > 1 for r in runs)
    ]
    files = []
    (out / "plots").mkdir(exist_ok=True)
    for m in plotted:
        plot_metric(out / "plots" / f"{_slug(m)}.png", variants, m, n_smooth, include_failed)
        files.append(f"plots/{_slug(m)}.png")
    overview = [m for m in MAIN_METRICS if m in metrics] or plotted[:6]
    if overview:
        plot_overview(out / "overview.png", variants, overview, n_smooth, include_failed, title)
        files.append("overview.png")
    return files


def auto_smooth(runs: list[Run]) -> int:
    """Default smoothing: ~2% of the longest run's steps (none for runs under 75 steps)."""
    longest = max((len(r.steps) for r in runs), default=0)
    return max(1, round(longest / 50))


# -- provenance -------------------------------------------------------------------------------------------
def _cmd(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def sweep_command(sweep: Sweep) -> list[str]:
    """The command(s) that made the runs: `klbench run -m ...` from multirun.yaml, or rebuilt from the
    jobs' overrides (a sweep over every value seen, or one `klbench run` per single run)."""
    if sweep.multirun is not None:
        ov = (sweep.multirun.get("hydra") or {}).get("overrides") or {}
        hydra_ov = [o for o in ov.get("hydra") or [] if not str(o).startswith("hydra.mode=")]
        return [_cmd(["klbench", "run", "-m", *map(str, ov.get("task") or []), *map(str, hydra_ov)])]
    if not sweep.runs:
        return []
    if len(sweep.runs) > 1 and all(r.num is not None for r in sweep.runs):  # job dirs without multirun.yaml
        values: dict[str, list[str]] = {}
        for r in sweep.runs:
            for k, v in r.overrides.items():
                values.setdefault(k, [])
                if v not in values[k]:
                    values[k].append(v)
        return [_cmd(["klbench", "run", "-m", *[f"{k}={','.join(v)}" for k, v in values.items()]])]
    return list(
        dict.fromkeys(
            _cmd(["klbench", "run", *[f"{k}={v}" for k, v in r.overrides.items()]]) for r in sweep.runs
        )
    )


def _describe_machine(m: dict) -> str:
    gpu = ", ".join(m.get("gpus") or []) or "no GPU"
    return (
        f"{m.get('cpu')}, {m.get('cores')} cores, {m.get('ram_gb')} GiB RAM, {gpu}; {m.get('os')}; "
        f"python {m.get('python')}, torch {m.get('torch')}"
    )


# -- the command -------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="klbench report",
        description="Turn klbench sweep directories into a table (md, csv), PNG plots and a manifest.",
        epilog="example: klbench report multirun/2026-11-24/22-00-00 --out results/kl_variants",
    )
    p.add_argument(
        "sweeps",
        nargs="+",
        type=Path,
        metavar="SWEEP_DIR",
        help="a `klbench run -m` sweep dir, a single run dir, or a dir of runs (several allowed)",
    )
    p.add_argument("--out", type=Path, help="output dir (default: results/<sweep name>)")
    p.add_argument(
        "--window",
        type=float,
        default=0.2,
        help="average each run's last this-fraction of training steps (default 0.2)",
    )
    p.add_argument(
        "--smooth",
        type=int,
        default=None,
        help="plots: N-step trailing moving average (default: ~2%% of the steps; 1 = none)",
    )
    p.add_argument(
        "--metrics",
        nargs="+",
        default=list(DEFAULT_METRICS),
        metavar="METRIC",
        help="metrics (glob patterns allowed) for the table and plots "
        f"(default: {' '.join(DEFAULT_METRICS)})",
    )
    p.add_argument(
        "--include-failed",
        action="store_true",
        help="keep runs that did not complete (their logged steps) in the statistics",
    )
    p.add_argument(
        "--replicate",
        action="append",
        metavar="KEY",
        help="override key(s) whose values are replicates, not variants (default: seed)",
    )
    p.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="KEY",
        help=f"override key(s) never used for grouping (always: hydra.*, {', '.join(IGNORED_KEYS)})",
    )
    args = p.parse_args(argv)
    if not 0 < args.window <= 1:
        p.error(f"--window must be in (0, 1], got {args.window}")
    if args.smooth is not None and args.smooth < 1:
        p.error(f"--smooth must be >= 1, got {args.smooth}")
    args.replicate = tuple(args.replicate or ["seed"])
    args.ignore = (*IGNORED_KEYS, *args.ignore)
    return args


def _err(msg: str) -> None:
    print(f"klbench: {msg}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """`klbench report`: returns 0 when the report was written, 2 for a usage error or no runs."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for s in args.sweeps:
        if not s.is_dir():
            _err(f"error: no such directory: {s}")
            return 2
    several = len(args.sweeps) > 1
    sweeps = [load_sweep(s, prefix=f"{sweep_name(s)}/" if several else "") for s in args.sweeps]
    runs = [r for s in sweeps for r in s.runs]
    if not runs:
        empty = next((s.path for s in sweeps if not s.runs), args.sweeps[0])
        _err("error: " + NO_RUNS.format(dir=empty))
        return 2
    for s in sweeps:
        if not s.runs:
            _err("warning: " + NO_RUNS.format(dir=s.path))
    missing = [j for s in sweeps for j in s.missing]

    keys = swept_keys(runs, args.replicate, args.ignore)
    variants = group_runs(runs, keys, args.replicate, args.ignore)
    available = list(
        dict.fromkeys([*(k for r in runs for k in r.train), *sorted({k for r in runs for k in r.evals})])
    )
    metrics, unmatched = select_metrics(args.metrics, available)
    asked = [p for p in unmatched if p not in DEFAULT_METRICS]
    if asked:
        _err(f"warning: no run logged {', '.join(asked)} (logged: {', '.join(available) or 'nothing'})")
    rows = variant_rows(variants, metrics, args.window, args.include_failed)
    notes = exclusion_lines(runs, missing, args.include_failed)

    out = args.out or Path("results") / sweeps[0].name
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, metrics, args.window, notes, args.include_failed)
    (out / "table.md").write_text(table)
    write_csv(out / "table.csv", rows, metrics, keys)

    n_smooth = args.smooth or auto_smooth(runs)
    title = ", ".join(s.name for s in sweeps) + (f" — by {', '.join(keys)}" if keys else "")
    files = [
        "table.md",
        "table.csv",
        *write_plots(out, variants, metrics, n_smooth, args.include_failed, title),
    ]

    argv_used = sys.argv[1:] if argv is None else argv
    manifest = build_manifest(
        sweeps,
        variants,
        rows,
        keys,
        metrics,
        missing,
        args,
        n_smooth,
        report_command=_cmd(["klbench", "report", *map(str, argv_used)]),
        files=[*files, "manifest.json", "README.md"],
    )
    (out / "manifest.json").write_text(json.dumps(_json_safe(manifest), indent=2, default=str) + "\n")
    (out / "README.md").write_text(readme(manifest, table, "overview.png" in files, files))

    done = sum(r.status == COMPLETED and r.has_metrics for r in runs)
    _err(
        f"report: {len(runs)} run(s) in {len(variants)} variant(s) (swept: {', '.join(keys) or 'nothing'}; "
        f"replicates: {', '.join(args.replicate)}), {done} completed → {out}/"
    )
    for line in notes:
        _err(f"  {line}")
    return 0


def _json_safe(x):
    """nan/inf → null, so manifest.json is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _time(x) -> _dt.datetime | None:
    try:
        return _dt.datetime.fromisoformat(str(x))
    except ValueError:
        return None


def _sweep_entry(s: Sweep) -> dict:
    """A sweep's command, job counts and wall-clock span (first start to last end of its runs)."""
    starts = [t for r in s.runs if (t := _time(r.info.get("started"))) is not None]
    ends = [t for r in s.runs if (t := _time(r.info.get("ended"))) is not None]
    entry = {
        "name": s.name,
        "command": sweep_command(s),
        "jobs_found": len(s.runs),
        "jobs_missing": len(s.missing),
        "started": min(starts).isoformat() if starts else None,
        "ended": max(ends).isoformat() if ends else None,
        "wall_clock_s": round((max(ends) - min(starts)).total_seconds(), 2) if starts and ends else None,
    }
    if s.note:
        entry["note"] = s.note
    return entry


def build_manifest(
    sweeps: list[Sweep],
    variants: list[Variant],
    rows: list[dict],
    keys: list[str],
    metrics: list[str],
    missing: list[MissingJob],
    args: argparse.Namespace,
    n_smooth: int,
    report_command: str,
    files: list[str],
) -> dict:
    """Everything needed to reproduce and trust the report (no host names, no absolute paths)."""
    runs = [r for s in sweeps for r in s.runs]
    walls = [r.wall_s for r in runs if r.wall_s is not None]
    label = {id(r): v.label for v in variants for r in v.runs}
    common = {
        k: v
        for k, v in runs[0].overrides.items()
        if k not in keys and all(r.overrides.get(k) == v for r in runs)
    }
    run_envs = []
    for r in runs:
        env = {k: r.info[k] for k in ("python", "torch", "world_size", "machine") if k in r.info}
        if env and env not in run_envs:
            run_envs.append(env)
    run_commits: dict[str, int] = {}
    for r in runs:
        git = r.info.get("git") if isinstance(r.info.get("git"), dict) else {}
        key = (git.get("commit") or "unknown") + (" (dirty)" if git.get("dirty") else "")
        run_commits[key] = run_commits.get(key, 0) + 1
    return {
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "report_command": report_command,
        "runs_commits": run_commits,
        "sweeps": [_sweep_entry(s) for s in sweeps],
        "git": git_info(),
        "machine": machine_info(),
        "runs_environment": run_envs,
        "window": args.window,
        "smooth": n_smooth,
        "include_failed": args.include_failed,
        "swept_keys": keys,
        "replicate_keys": list(args.replicate),
        "common_overrides": common,
        "metrics": metrics,
        "wall_s": {
            "total": round(sum(walls), 2),
            "mean_per_run": round(sum(walls) / len(walls), 2) if walls else None,
            "runs_without_wall_time": len(runs) - len(walls),
        },
        "variants": [
            {
                "label": row["variant"],
                "values": row["values"],
                "n": row["n"],
                "seeds": row["seeds"],
                "excluded": row["excluded"],
                "metrics": {m: dict(zip(("mean", "std", "n"), row["stats"][m])) for m in metrics},
                "wall_s_mean": row["wall_s"][0],
            }
            for row in rows
        ],
        "runs": [
            {
                "name": r.name,
                "variant": label[id(r)],
                "seed": r.seed,
                "status": r.status,
                "error": r.error,
                "steps_logged": len(r.steps),
                "last_step": r.last_step,
                "wall_s": r.wall_s,
                "overrides": r.overrides,
            }
            for r in runs
        ],
        "missing_jobs": [{"name": j.name, "overrides": j.overrides} for j in missing],
        "files": files,
    }


def readme(manifest: dict, table: str, overview: bool, files: list[str]) -> str:
    """README.md of the out dir: how it was made, the table, the overview figure, the machine."""
    git = manifest["git"]
    commit = git.get("commit") or f"no commit ({git.get('note', 'unknown')})"
    dirty = " (with uncommitted changes to klbench/ or conf/)" if git.get("dirty") else ""
    runs = manifest["runs"]
    done = sum(r["status"] == COMPLETED for r in runs)
    wall = manifest["wall_s"]
    lines = [
        f"# klbench report: {', '.join(s['name'] for s in manifest['sweeps'])}",
        "",
        "Made by",
        "",
        "```",
        manifest["report_command"],
        "```",
        "",
        f"on {manifest['created']} with klbench {git.get('version') or ''} at commit `{commit}`{dirty}.",
        "",
        "## The sweep",
        "",
        "The runs were made at commit "
        + ", ".join(f"`{c}` ({n} run{'s' if n != 1 else ''})" for c, n in manifest.get("runs_commits", {}).items())
        + ", by:",
        "",
        "```",
        *[c for s in manifest["sweeps"] for c in s["command"]],
        "```",
        "",
        f"{len(runs)} run(s): {done} completed, {len(runs) - done} not completed, "
        f"{len(manifest['missing_jobs'])} never launched. Swept: {', '.join(manifest['swept_keys']) or 'nothing'}; "
        f"replicates: {', '.join(manifest['replicate_keys'])}. Wall time: {fmt_duration(wall['total'])} in all, "
        f"{fmt_duration(wall['mean_per_run'] or math.nan)} per run on average.",
        "",
        "## Results",
        "",
        table,
    ]
    if overview:
        lines += ["![overview](overview.png)", ""]
    plots = [f for f in files if f.startswith("plots/")]
    if plots:
        lines += ["Plots: " + " · ".join(f"[{Path(f).stem}]({f})" for f in plots), ""]
    lines += ["## Machine", "", f"This report was made on: {_describe_machine(manifest['machine'])}."]
    for env in manifest["runs_environment"]:
        desc = (
            _describe_machine(env["machine"])
            if isinstance(env.get("machine"), dict)
            else (f"python {env.get('python')}, torch {env.get('torch')}, world size {env.get('world_size')}")
        )
        lines.append(f"The runs recorded: {desc}.")
    lines += [
        "",
        "Everything above, machine-readable: [manifest.json](manifest.json); the table: "
        "[table.csv](table.csv).",
    ]
    return "\n".join(lines) + "\n"
