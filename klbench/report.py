"""`klbench report`: sweep directories → a table, plots and a manifest (the paper's tables and figures).

    klbench report SWEEP [SWEEP ...] [--out DIR] [--window 0.2] [--smooth N] [--metrics PAT ...]
                   [--include-failed] [--replicate seed] [--ignore KEY ...]

Runs are the run directories under the given paths (a `klbench run -m` sweep, several sweeps, one
run, or a folder of runs). A key is *swept* when its override differs across runs (absent counts
as a value); `seed` (`--replicate`) is the replicate axis; `logger`, `trainer.threads` and
`hydra.*` never change results. Runs sharing every other swept value form one *variant*, in sweep
order. Per run: the mean of each training metric over its last `--window` of training steps (the
rule of summary.json, `klbench.records`) and the last value of each `eval/*` metric; per variant:
mean ± sample std (ddof=1) over its completed runs. Failed, interrupted, running and missing jobs
are listed and left out unless `--include-failed` (their steps are still drawn, dotted). The format
of every output file is in docs/scaling.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import json
import math
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from klbench import tables
from klbench.errors import ArgumentParser, writable_dir
from klbench.plots import MAIN_METRICS, band, smooth, write_plots  # noqa: F401 - band, smooth: the report's API
from klbench.provenance import git_info, machine_info
from klbench.records import WINDOW_FRACTION, is_train_row, json_safe, read_jsonl, window_size
from klbench.train.sweep import expand_jobs

DEFAULT_METRICS = (*MAIN_METRICS, "eval/*")
#: Override keys that never change results: not grouping keys even when they differ.
IGNORED_KEYS = ("logger", "trainer.threads")
COMPLETED = "completed"
NO_RUNS = "no klbench runs under {dir}: expected job dirs with metrics.jsonl (a `klbench run -m` sweep)"
_JOB_NUM = re.compile(r"(\d+)(?:_|$)")


# -- runs --------------------------------------------------------------------------------------
@dataclass
class Run:
    """One run directory, loaded."""

    name: str  # job dir name, prefixed by its sweep's name when several sweeps are reported
    path: Path
    num: int | None  # Hydra job number (the `<num>_` prefix of a sweep's job dir)
    overrides: dict[str, str]  # from .hydra/overrides.yaml, in command-line order
    config: dict  # config.yaml ({} when absent)
    status: str  # completed | failed | interrupted | preempted | running | missing
    error: str
    wall_s: float | None
    train: pd.DataFrame  # index: training step; one float column per metric (nan where not logged)
    evals: pd.DataFrame  # columns step, metric, value: eval/* values in logged order
    info: dict = field(default_factory=dict)  # status.json's python, torch, machine, git, ... (never its host)
    bad_lines: int = 0  # metrics.jsonl lines that could not be read

    @property
    def seed(self) -> str | None:
        if "seed" in self.overrides:
            return self.overrides["seed"]
        return None if self.config.get("seed") is None else str(self.config["seed"])

    @property
    def has_metrics(self) -> bool:
        return len(self.train) > 0

    def why_excluded(self) -> str | None:
        """Why this run is not in the table statistics (None: it is)."""
        if self.status == "running":
            return "running: still running, or killed before it could record how it ended"
        if self.status != COMPLETED:
            return self.status + (f": {self.error}" if self.error else "")
        if not self.has_metrics:
            return "completed but logged no training metrics (no metrics.jsonl rows)"
        steps = (self.config.get("trainer") or {}).get("steps")
        if isinstance(steps, int) and int(self.train.index[-1]) < steps:
            return f"incomplete: status completed, but its last logged step is {int(self.train.index[-1])} of {steps}"
        return None

    def eval_series(self, metric: str) -> pd.Series:
        points = self.evals[self.evals.metric == metric]
        return pd.Series(points.value.to_numpy(dtype=float), index=pd.Index(points.step, dtype="int64"))


@dataclass
class MissingJob:
    """A job of a sweep that has no directory at all (the sweep stopped before launching it)."""

    sweep: str
    num: int
    overrides: dict[str, str]

    @property
    def name(self) -> str:
        return f"{self.sweep}/#{self.num}" if self.sweep else f"#{self.num}"


def read_metrics(path: Path) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """(training metrics by step, eval points, unreadable lines) of a metrics.jsonl. Non-numbers become nan."""
    lines = read_jsonl(path)
    rows = [r for r in lines.rows if isinstance(r.get("step"), int)]
    train = pd.DataFrame([r for r in rows if is_train_row(r)])
    if len(train):
        train = train.set_index("step").drop(columns=[c for c in train if c.startswith("eval/")], errors="ignore")
        train = train.apply(pd.to_numeric, errors="coerce").astype(float)
    evals = pd.DataFrame([(r["step"], k, v) for r in rows for k, v in r.items() if k.startswith("eval/")],
                         columns=["step", "metric", "value"])
    evals["value"] = pd.to_numeric(evals.value, errors="coerce")
    return train, evals, len(lines.bad)


def _read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text()) if path.exists() else None
    except (yaml.YAMLError, UnicodeDecodeError):
        return None


def _parse_overrides(lines) -> dict[str, str]:
    return dict(str(ln).split("=", 1) for ln in lines or [] if "=" in str(ln))


def _time(x) -> _dt.datetime | None:
    try:
        return _dt.datetime.fromisoformat(str(x))
    except ValueError:
        return None


def load_run(path: Path, name: str | None = None) -> Run:
    """Load one run directory (any of its files may be missing: a job that never started)."""
    path = Path(path)
    status: dict = {}
    state, error = "missing", "no status.json: the job never started or was killed"
    if (path / "status.json").exists():
        try:
            status = json.loads((path / "status.json").read_text())
        except (ValueError, UnicodeDecodeError):
            status = {"status": "failed", "error": "status.json is unreadable"}
        state, error = status.get("status", "?"), status.get("error") or ""
    wall = status.get("wall_s")
    if not isinstance(wall, (int, float)) and _time(status.get("started")) and _time(status.get("ended")):
        wall = (_time(status["ended"]) - _time(status["started"])).total_seconds()  # failed runs
    train, evals, bad = read_metrics(path / "metrics.jsonl")
    config = _read_yaml(path / "config.yaml") or _read_yaml(path / ".hydra" / "config.yaml") or {}
    m = _JOB_NUM.match(path.name)
    return Run(
        name=name or path.name, path=path, num=int(m.group(1)) if m else None,
        overrides=_parse_overrides(_read_yaml(path / ".hydra" / "overrides.yaml")),
        config=config if isinstance(config, dict) else {}, status=state, error=str(error),
        wall_s=float(wall) if isinstance(wall, (int, float)) else None, train=train, evals=evals,
        info={k: status[k] for k in ("python", "torch", "world_size", "machine", "started", "ended", "git")
              if k in status},
        bad_lines=bad,
    )


def is_run_dir(path: Path) -> bool:
    return (path / ".hydra").is_dir() or (path / "metrics.jsonl").exists() or (path / "status.json").exists()


def find_run_dirs(root: Path, max_depth: int = 4) -> list[Path]:
    """Run directories at or under `root` (not looking inside a run), in job-number order."""
    if is_run_dir(root):
        return [root]
    if max_depth == 0 or not root.is_dir():
        return []

    def order(p: Path):
        m = _JOB_NUM.match(p.name)
        return (0, int(m.group(1)), p.name) if m else (1, 0, p.name)

    children = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=order)
    return [d for child in children for d in find_run_dirs(child, max_depth - 1)]


def expected_jobs(multirun: dict) -> list[dict[str, str]]:
    """Every job's task overrides of a Hydra multirun (its multirun.yaml), in job-number order."""
    hc = multirun.get("hydra") or {}
    jobs = expand_jobs((hc.get("sweeper") or {}).get("params"), (hc.get("overrides") or {}).get("task") or [])
    return [_parse_overrides(job) for job in jobs]


@dataclass
class Sweep:
    """One path given to `report`: its runs and, for a Hydra multirun, the record of the sweep."""

    path: Path
    name: str
    runs: list[Run]
    multirun: dict | None  # multirun.yaml
    missing: list[MissingJob]
    note: str = ""  # why missing jobs could not be determined, if so


def sweep_name(path: Path) -> str:
    """`multirun/2026-11-24/22-00-00` → `2026-11-24_22-00-00`; otherwise the directory's name."""
    path = Path(path).resolve()
    return f"{path.parent.name}_{path.name}" if re.fullmatch(r"\d{4}-\d{2}-\d{2}", path.parent.name) else path.name


def load_sweep(path: Path, prefix: str = "") -> Sweep:
    """Load every run under `path`; for a multirun, also the jobs that never got a directory."""
    path = Path(path)
    runs = [load_run(d, name=f"{prefix}{d.relative_to(path)}" if d != path else prefix + d.name)
            for d in find_run_dirs(path)]
    multirun = _read_yaml(path / "multirun.yaml")
    multirun = multirun if isinstance(multirun, dict) else None
    missing, note = [], ""
    if multirun is not None:
        try:
            jobs = expected_jobs(multirun)
        except ValueError as e:
            jobs, note = [], f"cannot expand the sweep's overrides: {e}"
        nums = {r.num for r in runs}
        missing = [MissingJob(prefix.rstrip("/"), i, ov) for i, ov in enumerate(jobs) if i not in nums]
    return Sweep(path, sweep_name(path), runs, multirun, missing, note)


# -- grouping ----------------------------------------------------------------------------------
def _ignored(key: str, ignore: tuple[str, ...]) -> bool:
    bare = key.lstrip("+~")
    return bare.startswith(("hydra.", "hydra/")) or any(bare == k or bare.startswith(k + ".") for k in ignore)


def swept_keys(runs: list[Run], replicate=("seed",), ignore=IGNORED_KEYS) -> list[str]:
    """Override keys whose values differ across `runs` (absent counts as a value), in first-seen order,
    leaving out the replicate keys (seeds) and keys that never change results."""
    keys = dict.fromkeys(k for r in runs for k in r.overrides)
    return [k for k in keys if k not in replicate and not _ignored(k, ignore)
            and len({r.overrides.get(k) for r in runs}) > 1]


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


def group_runs(runs: list[Run], keys: list[str], replicate=("seed",), ignore=IGNORED_KEYS) -> list[Variant]:
    """Group runs by their values of `keys`, in order of first appearance. With no swept keys all runs
    are one variant, labelled by their common overrides (replicate and ignored keys left out)."""
    groups: dict[tuple, Variant] = {}
    for r in runs:
        values = {k: r.overrides.get(k) for k in keys}
        if tuple(values.items()) not in groups:
            shown = values if keys else {k: v for k, v in r.overrides.items()
                                         if k not in replicate and not _ignored(k, ignore)
                                         and all(o.overrides.get(k) == v for o in runs)}
            label = ",".join(f"{k}={v}" for k, v in shown.items() if v is not None) or "defaults"
            groups[tuple(values.items())] = Variant(label, values, [])
        groups[tuple(values.items())].runs.append(r)
    return list(groups.values())


# -- statistics ------------------------------------------------------------------------------------
def window_mean(run: Run, metric: str, fraction: float = WINDOW_FRACTION) -> float:
    """Mean of `metric` over the last `fraction` of the run's training steps (finite values only);
    for `eval/*`, the last evaluation's value. nan when the run has none."""
    if metric.startswith("eval/"):
        points = run.eval_series(metric)
        return float(points.iloc[-1]) if len(points) else math.nan
    if metric not in run.train or not len(run.train):
        return math.nan
    window = run.train[metric].iloc[-window_size(len(run.train), fraction):]
    window = window[np.isfinite(window)]
    return float(window.mean()) if len(window) else math.nan


def mean_std(values) -> tuple[float, float, int]:
    """(mean, sample std with ddof=1 (nan for fewer than 2), n) of the finite values."""
    s = pd.Series([v for v in values if v is not None], dtype=float)
    s = s[np.isfinite(s)]
    return (float(s.mean()) if len(s) else math.nan), (float(s.std(ddof=1)) if len(s) > 1 else math.nan), len(s)


def select_metrics(patterns: list[str], available: list[str]) -> tuple[list[str], list[str]]:
    """(metrics matching `patterns` in pattern order, the patterns that matched nothing)."""
    out, unmatched = [], []
    for p in patterns:
        hits = sorted(fnmatch.filter(available, p)) if any(c in p for c in "*?[") else [m for m in [p] if m in available]
        unmatched += [] if hits else [p]
        out += [h for h in hits if h not in out]
    return out, unmatched


def variant_stats(variants: list[Variant], metrics: list[str], fraction: float, include_failed: bool) -> pd.DataFrame:
    """One row per variant: n, seeds, excluded runs, `<metric> mean/std/n` per metric, `wall_s mean`."""
    rows = []
    for v in variants:
        runs = v.included(include_failed)
        row = {"variant": v.label, **{k: val or "" for k, val in v.values.items()}, "n": len(runs),
               "seeds": " ".join(str(r.seed) for r in runs), "excluded": " ".join(r.name for r in v.excluded(include_failed))}
        for m in metrics:
            row.update(zip((f"{m} mean", f"{m} std", f"{m} n"), mean_std([window_mean(r, m, fraction) for r in runs])))
        row["wall_s mean"] = mean_std([r.wall_s for r in runs])[0]
        rows.append(row)
    return pd.DataFrame(rows)


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


def fmt_duration(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "—"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def exclusion_lines(runs: list[Run], missing: list[MissingJob], include_failed: bool) -> list[str]:
    """One line per run left out of (or, with include_failed, not completed but kept in) the statistics."""
    lines = []
    for r in runs:
        why = r.why_excluded()
        if why is not None:
            steps = f"{len(r.train)} step(s) logged" if r.has_metrics else "no metrics"
            kept = "; kept in the statistics" if include_failed and r.has_metrics else ""
            lines.append(f"{r.name}: {why} ({steps}{kept})")
    for j in missing:
        ov = ",".join(f"{k}={v}" for k, v in j.overrides.items())
        lines.append(f"{j.name} ({ov}): missing: no job directory (the sweep stopped before launching it)")
    return lines


def markdown_table(stats: pd.DataFrame, metrics: list[str], fraction: float, notes: list[str],
                   include_failed: bool = False) -> str:
    """The GitHub-readable table, with its footer (how to read it, runs that did not complete)."""
    header = ["variant", "n", *(f"`{m}`" for m in metrics), "wall / run"]
    cells = [[r["variant"].replace("|", "\\|"), str(r["n"]), *(fmt_pm(r[f"{m} mean"], r[f"{m} std"]) for m in metrics),
              fmt_duration(r["wall_s mean"])] for r in stats.to_dict("records")]
    lines = [tables.markdown(header, cells, "lr" + "r" * (len(metrics) + 1)), "",
             f"n: runs (seeds) in the statistics. Each cell: mean ± sample std (ddof=1) across seeds of each "
             f"run's mean over its last {fraction:.0%} of training steps; `eval/*`: each run's last evaluation. "
             "wall / run: mean wall time of a run."]
    if notes:
        head = "Runs that did not complete" if include_failed else "Not in the statistics"
        lines += ["", f"{head} ({len(notes)}):", "", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


# -- provenance -------------------------------------------------------------------------------------------
def _cmd(args) -> str:
    """A command line to print, with absolute paths made relative to the working directory (a manifest
    names no host and no absolute path)."""
    def portable(a: str) -> str:
        key, sep, value = a.rpartition("=") if "=" in a else ("", "", a)
        return f"{key}{sep}{os.path.relpath(value)}" if os.path.isabs(value) else a

    return " ".join(shlex.quote(portable(str(a))) for a in args)


def sweep_command(sweep: Sweep) -> list[str]:
    """The command(s) that made the runs: `klbench run -m ...` from multirun.yaml, or rebuilt from the
    jobs' overrides (a sweep over every value seen, or one `klbench run` per single run)."""
    if sweep.multirun is not None:
        ov = (sweep.multirun.get("hydra") or {}).get("overrides") or {}
        hydra_ov = [o for o in ov.get("hydra") or [] if not str(o).startswith("hydra.mode=")]
        return [_cmd(["klbench", "run", "-m", *(ov.get("task") or []), *hydra_ov])]
    if len(sweep.runs) > 1 and all(r.num is not None for r in sweep.runs):  # job dirs without multirun.yaml
        values: dict[str, list[str]] = {}
        for r in sweep.runs:
            for k, v in r.overrides.items():
                values.setdefault(k, [])
                values[k] += [] if v in values[k] else [v]
        return [_cmd(["klbench", "run", "-m", *(f"{k}={','.join(v)}" for k, v in values.items())])]
    return list(dict.fromkeys(_cmd(["klbench", "run", *(f"{k}={v}" for k, v in r.overrides.items())])
                              for r in sweep.runs))




def build_manifest(sweeps: list[Sweep], variants: list[Variant], stats: pd.DataFrame, keys: list[str],
                   metrics: list[str], missing: list[MissingJob], args, n_smooth: int, report_command: str,
                   files: list[str]) -> dict:
    """Everything needed to reproduce and trust the report (no host names, no absolute paths)."""
    runs = [r for s in sweeps for r in s.runs]
    walls = [r.wall_s for r in runs if r.wall_s is not None]
    label = {id(r): v.label for v in variants for r in v.runs}
    envs = [{k: r.info[k] for k in ("python", "torch", "world_size", "machine") if k in r.info} for r in runs]
    commits: dict[str, int] = {}
    for r in runs:
        git = r.info.get("git") if isinstance(r.info.get("git"), dict) else {}
        key = (git.get("commit") or "unknown") + (" (dirty)" if git.get("dirty") else "")
        commits[key] = commits.get(key, 0) + 1

    def span(s: Sweep) -> dict:
        starts = [t for r in s.runs if (t := _time(r.info.get("started")))]
        ends = [t for r in s.runs if (t := _time(r.info.get("ended")))]
        entry = {"name": s.name, "command": sweep_command(s), "jobs_found": len(s.runs), "jobs_missing": len(s.missing),
                 "started": min(starts).isoformat() if starts else None, "ended": max(ends).isoformat() if ends else None,
                 "wall_clock_s": round((max(ends) - min(starts)).total_seconds(), 2) if starts and ends else None}
        return {**entry, "note": s.note} if s.note else entry

    return {
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "report_command": report_command,
        "runs_commits": commits,
        "sweeps": [span(s) for s in sweeps],
        "git": git_info(),
        "machine": machine_info(),
        "runs_environment": [e for i, e in enumerate(envs) if e and e not in envs[:i]],
        "window": args.window,
        "smooth": n_smooth,
        "include_failed": args.include_failed,
        "swept_keys": keys,
        "replicate_keys": list(args.replicate),
        "common_overrides": {k: v for k, v in runs[0].overrides.items()
                             if k not in keys and all(r.overrides.get(k) == v for r in runs)},
        "metrics": metrics,
        "wall_s": {"total": round(sum(walls), 2), "mean_per_run": round(sum(walls) / len(walls), 2) if walls else None,
                   "runs_without_wall_time": len(runs) - len(walls)},
        "variants": [{"label": row["variant"], "values": v.values, "n": row["n"],
                      "seeds": [r.seed for r in v.included(args.include_failed)], "excluded": [r.name for r in v.excluded(args.include_failed)],
                      "metrics": {m: {"mean": row[f"{m} mean"], "std": row[f"{m} std"], "n": row[f"{m} n"]}
                                  for m in metrics},
                      "wall_s_mean": row["wall_s mean"]} for v, row in zip(variants, stats.to_dict("records"))],
        "runs": [{"name": r.name, "variant": label[id(r)], "seed": r.seed, "status": r.status, "error": r.error,
                  "steps_logged": len(r.train), "last_step": int(r.train.index[-1]) if r.has_metrics else 0,
                  "wall_s": r.wall_s, "overrides": r.overrides} for r in runs],
        "missing_jobs": [{"name": j.name, "overrides": j.overrides} for j in missing],
        "files": files,
    }


def _describe_machine(m: dict) -> str:
    gpu = ", ".join(m.get("gpus") or []) or "no GPU"
    return (f"{m.get('cpu')}, {m.get('cores')} cores, {m.get('ram_gb')} GiB RAM, {gpu}; {m.get('os')}; "
            f"python {m.get('python')}, torch {m.get('torch')}")


def readme(manifest: dict, table: str, files: list[str]) -> str:
    """README.md of the out dir: how it was made, the table, the overview figure, the machine."""
    git, runs, wall = manifest["git"], manifest["runs"], manifest["wall_s"]
    commit = git.get("commit") or f"no commit ({git.get('note', 'unknown')})"
    dirty = " (with uncommitted changes to klbench/ or conf/)" if git.get("dirty") else ""
    done = sum(r["status"] == COMPLETED for r in runs)
    made_at = ", ".join(f"`{c}` ({n} run{'s' if n != 1 else ''})" for c, n in manifest["runs_commits"].items())
    lines = [
        f"# klbench report: {', '.join(s['name'] for s in manifest['sweeps'])}", "", "Made by", "", "```",
        manifest["report_command"], "```", "",
        f"on {manifest['created']} with klbench {git.get('version') or ''} at commit `{commit}`{dirty}.", "",
        "## The sweep", "", f"The runs were made at commit {made_at}, by:", "", "```",
        *[c for s in manifest["sweeps"] for c in s["command"]], "```", "",
        f"{len(runs)} run(s): {done} completed, {len(runs) - done} not completed, "
        f"{len(manifest['missing_jobs'])} never launched. Swept: {', '.join(manifest['swept_keys']) or 'nothing'}; "
        f"replicates: {', '.join(manifest['replicate_keys'])}. Wall time: {fmt_duration(wall['total'])} in all, "
        f"{fmt_duration(wall['mean_per_run'])} per run on average.", "", "## Results", "", table,
    ]
    if "overview.png" in files:
        lines += ["![overview](overview.png)", ""]
    plots = [f for f in files if f.startswith("plots/")]
    if plots:
        lines += ["Plots: " + " · ".join(f"[{Path(f).stem}]({f})" for f in plots), ""]
    lines += ["## Machine", "", f"This report was made on: {_describe_machine(manifest['machine'])}."]
    for env in manifest["runs_environment"]:
        desc = (_describe_machine(env["machine"]) if isinstance(env.get("machine"), dict) else
                f"python {env.get('python')}, torch {env.get('torch')}, world size {env.get('world_size')}")
        lines.append(f"The runs recorded: {desc}.")
    lines += ["", "Everything above, machine-readable: [manifest.json](manifest.json); the table: [table.csv](table.csv)."]
    return "\n".join(lines) + "\n"


# -- the command -------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="klbench report", description="Turn klbench sweep directories into a table (md, csv), PNG plots and a manifest.",
        epilog="example: klbench report multirun/2026-11-24/22-00-00 --out results/kl_variants")
    p.add_argument("sweeps", nargs="+", type=Path, metavar="SWEEP_DIR",
                   help="a `klbench run -m` sweep dir, a single run dir, or a dir of runs (several allowed)")
    p.add_argument("--out", type=Path, help="output dir (default: results/<sweep name>)")
    p.add_argument("--window", type=float, default=WINDOW_FRACTION,
                   help=f"average each run's last this-fraction of training steps (default {WINDOW_FRACTION})")
    p.add_argument("--smooth", type=int, default=None,
                   help="plots: N-step trailing moving average (default: ~2%% of the steps; 1 = none)")
    p.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), metavar="METRIC",
                   help=f"metrics (glob patterns allowed) for the table and plots (default: {' '.join(DEFAULT_METRICS)})")
    p.add_argument("--include-failed", action="store_true",
                   help="keep runs that did not complete (their logged steps) in the statistics")
    p.add_argument("--replicate", action="append", metavar="KEY",
                   help="override key(s) whose values are replicates, not variants (default: seed)")
    p.add_argument("--ignore", action="append", default=[], metavar="KEY",
                   help=f"override key(s) never used for grouping (always: hydra.*, {', '.join(IGNORED_KEYS)})")
    args = p.parse_args(argv)
    if not 0 < args.window <= 1:
        p.error(f"--window must be in (0, 1], got {args.window}")
    if args.smooth is not None and args.smooth < 1:
        p.error(f"--smooth must be >= 1, got {args.smooth}")
    args.replicate = tuple(args.replicate or ["seed"])
    args.ignore = (*IGNORED_KEYS, *args.ignore)
    return args


def _say(msg: str) -> None:
    print(f"klbench: {msg}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """`klbench report`: returns 0 when the report was written, 2 for a usage error or no runs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    for s in args.sweeps:
        if not s.is_dir():
            _say(f"error: no such directory: {s}")
            return 2
    several = len(args.sweeps) > 1
    sweeps = [load_sweep(s, prefix=f"{sweep_name(s)}/" if several else "") for s in args.sweeps]
    runs = [r for s in sweeps for r in s.runs]
    if not runs:
        _say("error: " + NO_RUNS.format(dir=next((s.path for s in sweeps if not s.runs), args.sweeps[0])))
        return 2
    for s in sweeps:
        if not s.runs:
            _say("warning: " + NO_RUNS.format(dir=s.path))
    for r in runs:
        if r.bad_lines:
            _say(f"warning: {r.path / 'metrics.jsonl'}: {r.bad_lines} unreadable line(s) skipped")
    missing = [j for s in sweeps for j in s.missing]
    keys = swept_keys(runs, args.replicate, args.ignore)
    variants = group_runs(runs, keys, args.replicate, args.ignore)
    available = list(dict.fromkeys([*(k for r in runs for k in r.train), *sorted({m for r in runs for m in r.evals.metric})]))
    metrics, unmatched = select_metrics(args.metrics, available)
    asked = [p for p in unmatched if p not in DEFAULT_METRICS]
    if asked:
        _say(f"warning: no run logged {', '.join(asked)} (logged: {', '.join(available) or 'nothing'})")
    stats = variant_stats(variants, metrics, args.window, args.include_failed)
    notes = exclusion_lines(runs, missing, args.include_failed)

    out = writable_dir(args.out or Path("results") / sweeps[0].name)
    table = markdown_table(stats, metrics, args.window, notes, args.include_failed)
    (out / "table.md").write_text(table)
    stats.to_csv(out / "table.csv", index=False, lineterminator="\r\n")
    n_smooth = args.smooth or max(1, round(max(len(r.train) for r in runs) / 50))
    title = ", ".join(s.name for s in sweeps) + (f" — by {', '.join(keys)}" if keys else "")
    files = ["table.md", "table.csv", *write_plots(out, variants, metrics, n_smooth, args.include_failed, title)]
    manifest = build_manifest(sweeps, variants, stats, keys, metrics, missing, args, n_smooth,
                              report_command=_cmd(["klbench", "report", *argv]), files=[*files, "manifest.json", "README.md"])
    (out / "manifest.json").write_text(json.dumps(json_safe(manifest), indent=2, default=str) + "\n")
    (out / "README.md").write_text(readme(manifest, table, files))
    done = sum(r.status == COMPLETED and r.has_metrics for r in runs)
    _say(f"report: {len(runs)} run(s) in {len(variants)} variant(s) (swept: {', '.join(keys) or 'nothing'}; "
         f"replicates: {', '.join(args.replicate)}), {done} completed → {out}/")
    for line in notes:
        _say(f"  {line}")
    return 0
