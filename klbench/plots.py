"""The report's figures: per metric, the mean over each variant's seeds with a min–max band (matplotlib).

Variants and runs are those of klbench.report (a variant has `label`, `runs`, `included()`,
`excluded()`; a run has `train`, a DataFrame by step, and `eval_series(metric)`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

#: The metrics of the table and the overview figure, in this order (those a run logs).
MAIN_METRICS = ("kl/rkl_k1", "reward/acc", "reward/mean", "reward/trait", "rollout/entropy", "rollout/response_len")
#: Figure titles (the metric glossary is docs/configuration.md).
DESCRIPTIONS = {"kl/rkl_k1": "reverse KL to the reference (k1, per sequence)",
    "kl/rkl_k3": "reverse KL to the reference (k3, per sequence)",
    "reward/acc": "fraction of correct answers", "reward/mean": "mean reward",
    "reward/trait": "fraction showing π_ref's rare rewarded trait", "rollout/entropy": "mean token entropy",
    "rollout/response_len": "mean response length (tokens)"}


def smooth(values: np.ndarray, n: int) -> np.ndarray:
    """Trailing moving average over `n` points, ignoring nan (the first points average what exists)."""
    return pd.Series(values, dtype=float).rolling(max(n, 1), min_periods=1).mean().to_numpy() if n > 1 else values


def run_series(run, metric: str, n_smooth: int = 1) -> pd.Series:
    """One run's metric by step (eval metrics at their eval steps), non-finite values as gaps, smoothed."""
    if metric.startswith("eval/"):
        return run.eval_series(metric)
    if metric not in run.train:
        return pd.Series(dtype=float, index=pd.Index([], dtype="int64"))
    y = run.train[metric].where(np.isfinite(run.train[metric]))
    return pd.Series(smooth(y.to_numpy(), n_smooth), index=run.train.index)


def band(runs: list, metric: str, n_smooth: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, min, max) across runs at each step any of them logged (nan-aware)."""
    grid = pd.concat([run_series(r, metric, n_smooth) for r in runs], axis=1) if runs else pd.DataFrame()
    grid = grid[grid.notna().any(axis=1)].sort_index() if len(grid.columns) else grid
    if not len(grid):
        empty = np.array([], dtype=float)
        return np.array([], dtype=np.int64), empty, empty, empty
    return grid.index.to_numpy(), grid.mean(axis=1).to_numpy(), grid.min(axis=1).to_numpy(), grid.max(axis=1).to_numpy()


def draw_metric(ax, variants: list, metric: str, n_smooth: int, include_failed: bool, colors) -> None:
    """One panel: per variant the mean over its runs, a min–max band across seeds, failed runs dotted."""
    from matplotlib.ticker import MaxNLocator

    marker = "o" if metric.startswith("eval/") else None
    for v, c in zip(variants, colors):
        runs = v.included(include_failed)
        steps, mean, lo, hi = band(runs, metric, n_smooth)
        if len(steps):
            ax.plot(steps, mean, color=c, lw=1.8, marker=marker, ms=3, label=f"{v.label} (n={len(runs)})")
            if len(runs) > 1:
                ax.fill_between(steps, lo, hi, color=c, alpha=0.18, lw=0)
        for s in (run_series(r, metric, n_smooth) for r in v.excluded(include_failed)):
            if len(s):
                ax.plot(s.index.to_numpy(), s.to_numpy(), color=c, lw=1.0, ls=":", marker=marker, ms=2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.set_xlabel("training step")
    ax.set_ylabel(metric)


def write_plots(out: Path, variants: list, metrics: list[str], n_smooth: int, include_failed: bool,
                title: str) -> list[str]:
    """plots/<metric>.png per metric (eval/* only when evaluated at 2+ steps) and overview.png; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    runs = [r for v in variants for r in v.runs]
    cmap = matplotlib.colormaps["tab10" if len(variants) <= 10 else "tab20"]
    colors = [cmap(i % cmap.N) for i in range(len(variants))]
    how = (f"line: mean over seeds · band: min–max over seeds · "
           f"{f'{n_smooth}-step moving average' if n_smooth > 1 else 'not smoothed'}")
    dotted = ([Line2D([], [], color="0.4", lw=1.0, ls=":", label="run that did not complete")]
              if any(r.has_metrics for v in variants for r in v.excluded(include_failed)) else [])
    files = []
    (out / "plots").mkdir(exist_ok=True)
    plotted = [m for m in metrics if not m.startswith("eval/") or any(len(r.eval_series(m)) > 1 for r in runs)]
    for m in plotted:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        draw_metric(ax, variants, m, n_smooth, include_failed, colors)
        desc = DESCRIPTIONS.get(m, "last evaluation" if m.startswith("eval/") else "")
        ax.set_title(m + (f" — {desc}" if desc else "") + f"\n{how}", fontsize=10)
        handles = ax.get_legend_handles_labels()[0] + dotted
        if handles:
            wide = len(handles) > 6
            ax.legend(handles=handles, fontsize=8, loc="upper left" if wide else "best",
                      bbox_to_anchor=(1.01, 1.0) if wide else None)
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", m).strip("_")
        fig.savefig(out / "plots" / f"{slug}.png", bbox_inches="tight")
        plt.close(fig)
        files.append(f"plots/{slug}.png")
    overview = [m for m in MAIN_METRICS if m in metrics] or plotted[:6]
    if overview:
        ncols = 3 if len(overview) > 4 else min(2, len(overview))
        fig, axes = plt.subplots(math.ceil(len(overview) / ncols), ncols, figsize=(4.6 * ncols, 3.3 * math.ceil(len(overview) / ncols)),
                                 dpi=110, squeeze=False)
        seen: dict = {}
        for ax, m in zip(axes.flat, overview):
            draw_metric(ax, variants, m, n_smooth, include_failed, colors)
            ax.set_title(DESCRIPTIONS.get(m, m), fontsize=10)
            for h, lab in zip(*ax.get_legend_handles_labels()):  # a variant may lack the first metric
                seen.setdefault(lab, h)
        for ax in list(axes.flat)[len(overview):]:
            ax.set_visible(False)
        fig.suptitle(f"{title}\n{how}", fontsize=11)
        fig.tight_layout()
        handles = list(seen.values()) + dotted
        if handles:  # below the grid; bbox_inches="tight" makes room for it
            fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), frameon=False, fontsize=9,
                       ncol=min(len(handles), 3 if len(variants) > 6 else 4))
        fig.savefig(out / "overview.png", bbox_inches="tight")
        plt.close(fig)
        files.append("overview.png")
    return files
