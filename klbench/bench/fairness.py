"""What makes a timing a result: a confidence interval for the median ratio, and a measure of how much
of the machine other work took while the benchmark ran (a quiet machine is a precondition, not a hope)."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

#: The most CPU that work other than the benchmark's own processes (and the hypervisor's steal) may take,
#: as a share of all cores' time, for a result to count as measured on a quiet machine.
QUIET_MAX_SHARE = 0.05

#: Coverage asked of the median's confidence interval.
CI_LEVEL = 0.90


def median_ci(values: list[float], level: float = CI_LEVEL) -> dict:
    """A distribution-free confidence interval for the median: the order statistics (k, n-k+1) with the
    largest k whose exact binomial coverage 1 - 2 P(Bin(n, 1/2) <= k-1) is still >= `level`.
    n = 5 gives (min, max) at 93.75%; fewer than 5 values cannot reach 90% (lo/hi None)."""
    xs, n = sorted(values), len(values)
    best = None
    for k in range(1, n // 2 + 1):
        coverage = 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n
        if coverage >= level:
            best = (k, coverage)
    if best is None:
        return {"lo": None, "hi": None, "coverage": None, "n": n}
    k, coverage = best
    return {"lo": xs[k - 1], "hi": xs[n - k], "coverage": coverage, "n": n}


def _proc_stat() -> tuple[float, float] | None:
    """(busy, steal) CPU seconds of the whole machine since boot (Linux), else None."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / hz, steal / hz


def _own_cpu_s() -> float:
    t = os.times()  # children count once they have been waited for, as every benchmark worker is
    return t.user + t.system + t.children_user + t.children_system


class MachineLoad:
    """CPU taken by everything but this process and its (finished) children, and the hypervisor's steal,
    between construction and `stop()`; with the 1-min load averages before and after."""

    def __init__(self):
        self.t0, self.stat0, self.own0 = time.monotonic(), _proc_stat(), _own_cpu_s()
        self.load_before = list(os.getloadavg())

    def stop(self) -> dict:
        wall, stat, own = time.monotonic() - self.t0, _proc_stat(), _own_cpu_s()
        cores = os.cpu_count() or 1
        out = {"wall_s": wall, "cores": cores, "load_before": self.load_before, "load_after": list(os.getloadavg()),
               "own_cpu_s": own - self.own0, "other_cpu_share": None, "steal_share": None, "quiet": None}
        if self.stat0 is not None and stat is not None and wall > 0:
            other = max(0.0, (stat[0] - self.stat0[0]) - out["own_cpu_s"])
            out["other_cpu_share"] = other / (wall * cores)
            out["steal_share"] = (stat[1] - self.stat0[1]) / (wall * cores)
            out["quiet"] = out["other_cpu_share"] <= QUIET_MAX_SHARE and out["steal_share"] <= QUIET_MAX_SHARE
        return out


def openmp_env() -> dict:
    """The OpenMP settings every benchmarked process inherits (klbench's CLI sets its default before torch loads)."""
    return {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}


def load_note(load: dict) -> str | None:
    """A warning when other work shared the machine while the benchmark ran."""
    if load["quiet"] is False:
        return f"the machine was not quiet: {describe(load)}; timings are noisy, rerun on a quiet machine"
    return None


def describe(load: dict) -> str:
    """One line on the machine's state during a benchmark."""
    if load["quiet"] is None:
        return (f"1-min load average {load['load_before'][0]:.2f} before, {load['load_after'][0]:.2f} after "
                "(other processes' CPU not measurable on this system)")
    return (f"other processes took {100 * load['other_cpu_share']:.1f}% and the hypervisor "
            f"{100 * load['steal_share']:.1f}% of the {load['cores']} cores' time (quiet: <= "
            f"{100 * QUIET_MAX_SHARE:.0f}% each); 1-min load average {load['load_before'][0]:.2f} before, "
            f"{load['load_after'][0]:.2f} after")
