"""Do klbench and TRL learn the same? Reward and KL curves of both sides over several seeds, and a test
that asks whether their difference is larger than the seed-to-seed spread.

One trajectory is one draw of a noisy, autocorrelated process: per-step values within a window are not
independent draws (the per-step KL has lag-1 autocorrelation up to 0.74 on the miniature), so a
standard error from the per-step spread is too small. The unit of replication is the seed. Per window
of steps, each seed gives one mean per side; the window's statistic is Welch's t of those means over
seeds, and the test statistic of a metric is the largest |t| over its windows. Its null distribution
comes from relabelling: every way of splitting the 2S trajectories into two groups of S. That keeps
the windows' correlation, controls the error over all windows at once, and needs no normality. The
two sides of a seed share their prompts, so under the null they are positively correlated; relabelling
splits such pairs, which makes the test conservative, never anti-conservative.
"""

from __future__ import annotations

import itertools
import statistics
from pathlib import Path

import numpy as np

from klbench.bench.workload import SIDES

#: Steps per window of the agreement test.
WINDOW = 20

#: Significance level of the agreement test, for each metric.
ALPHA = 0.05

METRICS = ("reward", "kl")


def window_means(rows: list[dict], metric: str, window: int = WINDOW) -> list[float]:
    """Means of `metric` over consecutive windows of `window` steps (a shorter last window is dropped)."""
    vals = [r[metric] for r in rows]
    return [statistics.mean(vals[i : i + window]) for i in range(0, len(vals) - window + 1, window)]


def welch_t(xa, xb, axis: int = -1):
    """(mean a - mean b) / sqrt(var a / n_a + var b / n_b) along `axis`; +-inf for a difference with no spread."""
    xa, xb = np.asarray(xa, dtype=float), np.asarray(xb, dtype=float)
    se = np.sqrt(xa.var(axis=axis, ddof=1) / xa.shape[axis] + xb.var(axis=axis, ddof=1) / xb.shape[axis])
    diff = xa.mean(axis=axis) - xb.mean(axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(se > 0, diff / se, np.where(diff == 0, 0.0, np.copysign(np.inf, diff)))


def curve_agreement(runs: dict[int, dict[str, list[dict]]], window: int = WINDOW) -> dict[str, dict]:
    """`runs[seed][side]`: per-step rows of sides "klbench" and "trl". Per metric: each window's mean per
    side over seeds, the spread over seeds and Welch's t, and the relabelling test of the largest |t|
    (`p`; `agree`: p >= ALPHA, None when fewer seeds could never reach ALPHA)."""
    seeds = sorted(runs)
    steps = min(len(runs[s][side]) for s in seeds for side in SIDES)
    out: dict[str, dict] = {}
    for metric in METRICS:
        a = [window_means(runs[s]["klbench"][:steps], metric, window) for s in seeds]
        b = [window_means(runs[s]["trl"][:steps], metric, window) for s in seeds]
        first = runs[seeds[0]]["klbench"]
        windows = []
        for w in range(len(a[0])):
            xa, xb = [s[w] for s in a], [s[w] for s in b]
            row = {"steps": f"{first[w * window]['step']}-{first[w * window + window - 1]['step']}",
                   "klbench": statistics.mean(xa), "trl": statistics.mean(xb),
                   "diff": statistics.mean(xa) - statistics.mean(xb)}
            if len(seeds) > 1:
                row["sd_klbench"], row["sd_trl"] = statistics.stdev(xa), statistics.stdev(xb)
                row["t"] = float(welch_t(xa, xb))
            windows.append(row)
        result = {"windows": windows, "seeds": seeds, "window": window, "alpha": ALPHA}
        if len(seeds) > 1 and windows:
            n = len(seeds)
            pooled = np.array(a + b)  # [2S, windows]
            observed = float(np.abs(welch_t(pooled[:n], pooled[n:], axis=0)).max())
            splits = np.array(list(itertools.combinations(range(2 * n), n)))  # [splits, S]: group a's rows
            rest = np.array([[i for i in range(2 * n) if i not in g] for g in splits])
            null = np.abs(welch_t(pooled[splits], pooled[rest], axis=1)).max(axis=1)  # [splits]
            p = float((null >= observed - 1e-12).mean())
            result.update({"max_abs_t": observed, "p": p, "splits": len(splits),
                           "min_p": 2 / len(splits),
                           "agree": (p >= ALPHA) if 2 / len(splits) < ALPHA else None})
        out[metric] = result
    return out


def verdict(result: dict) -> str:
    """One line for a metric's agreement result."""
    if not result["windows"]:
        return f"no test: fewer steps than one window of {result['window']}"
    if "p" not in result:
        return "no test with one seed (the test compares seeds: --seed 0 1 2 3 4)"
    line = (f"largest |t| {result['max_abs_t']:.2f} over {len(result['windows'])} windows, relabelling p = "
            f"{result['p']:.3f} ({result['splits']} splits of {len(result['seeds'])}+{len(result['seeds'])} seeds)")
    if result["agree"] is None:
        return line + f": too few seeds for a test at {ALPHA} (the smallest p is {result['min_p']:.2f}; use >= 4)"
    return line + (": within seed noise" if result["agree"] else f": DIFFERENT at {ALPHA}")


def plot_curves(runs: dict[int, dict[str, list[dict]]], path: Path, title: str, window: int = 10) -> None:
    """Reward and KL per step: each seed thin, the mean over seeds (smoothed over `window` steps) thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted(runs)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "reward", "reward (mean over the step's completions)"),
                           (axes[1], "kl", "KL: per-token k3, mean over response tokens")):
        for color, side in zip(("tab:blue", "tab:orange"), SIDES):
            n = min(len(runs[s][side]) for s in seeds)
            steps = [r["step"] for r in runs[seeds[0]][side][:n]]
            for s in seeds:
                ax.plot(steps, [r[key] for r in runs[s][side][:n]], color=color, alpha=0.15, linewidth=0.7)
            mean = [statistics.mean(runs[s][side][i][key] for s in seeds) for i in range(n)]
            smooth = [statistics.mean(mean[max(0, i - window + 1) : i + 1]) for i in range(n)]
            ax.plot(steps, smooth, color=color, linewidth=2,
                    label=f"{side} (mean of {len(seeds)} seeds, {window}-step mean)")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"klbench vs TRL GRPOTrainer: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
