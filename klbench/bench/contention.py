"""`klbench bench --contention`: a `klbench run` alone, and the same run with a second copy beside it.

A run on a machine that does other work should slow down in proportion to the CPU it gets. Each
repetition times one copy alone and two copies started together (alternating which comes first); the
ratio of a copy's wall time beside the other to the wall time alone is 2 where the cores are shared
fairly and much more where waiting OpenMP threads spin against each other.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from klbench.bench.fairness import MachineLoad, describe, load_note, median_ci, openmp_env
from klbench.bench.workload import BenchError
from klbench.provenance import git_info, machine_info

#: Seconds one `klbench run` may take before the benchmark gives up.
RUN_TIMEOUT_S = 3600


def _start(overrides: list[str], run_dir: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "klbench", "run", *overrides, "logger=none", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    with log.open("w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)


def run_copies(n: int, overrides: list[str], work: Path, tag: str) -> list[dict]:
    """Start `n` copies of `klbench run <overrides>` at once; per copy its wall time (to its own exit) and
    step times."""
    t0 = time.perf_counter()
    procs = [_start(overrides, work / f"{tag}-{i}", work / f"{tag}-{i}.log") for i in range(n)]
    ended: dict[int, float] = {}
    while len(ended) < n:
        now = time.perf_counter()
        for i, proc in enumerate(procs):
            if i not in ended and proc.poll() is not None:
                ended[i] = now - t0
        if now - t0 > RUN_TIMEOUT_S:
            for proc in procs:
                proc.kill()
            raise BenchError(f"klbench run ran past {RUN_TIMEOUT_S}s; logs: {work / tag}-*.log")
        time.sleep(0.05)
    out = []
    for i, proc in enumerate(procs):
        if proc.returncode != 0:
            tail = "\n".join((work / f"{tag}-{i}.log").read_text(errors="replace").splitlines()[-15:])
            raise BenchError(f"klbench run {' '.join(overrides)} failed (exit {proc.returncode}):\n{tail}")
        steps = [json.loads(line)["perf/step_s"] for line in (work / f"{tag}-{i}" / "metrics.jsonl").open()]
        out.append({"wall_s": ended[i], "steps_s": sum(steps), "step_s_median": statistics.median(steps),
                    "steps": len(steps)})
    return out


def bench_contention(command: str, overrides: list[str], reps: int, out_dir: Path, work: Path) -> dict:
    machine_load = MachineLoad()
    alone: list[dict] = []
    beside: list[dict] = []
    for rep in range(reps):
        order = ("alone", "pair") if rep % 2 == 0 else ("pair", "alone")
        for what in order:
            print(f"[contention] rep {rep + 1}/{reps}: {what} ...", flush=True)
            if what == "alone":
                alone += run_copies(1, overrides, work, f"alone-{rep}")
            else:
                beside += run_copies(2, overrides, work, f"pair-{rep}")
            last = (alone if what == "alone" else beside)[-1]
            print(f"[contention]   wall {last['wall_s']:.1f} s, median step {last['step_s_median']:.3f} s", flush=True)
    # each repetition: the two copies' mean beside each other over the copy alone
    ratios = [statistics.mean(c["wall_s"] for c in beside[2 * r : 2 * r + 2]) / alone[r]["wall_s"] for r in range(reps)]
    step_ratios = [statistics.mean(c["step_s_median"] for c in beside[2 * r : 2 * r + 2]) / alone[r]["step_s_median"]
                   for r in range(reps)]
    report = {"command": command, "run": "klbench run " + " ".join(overrides), "reps": reps,
              "commit": git_info(), "machine": machine_info(),
              "openmp": openmp_env(),
              "alone": alone, "beside": beside,
              "wall_ratio": {"median": statistics.median(ratios), **median_ci(ratios), "all": ratios},
              "step_ratio": {"median": statistics.median(step_ratios), **median_ci(step_ratios), "all": step_ratios}}
    # the copies are this benchmark's own children: only other processes and steal count against it
    report["machine_load"] = machine_load.stop()
    report["note"] = load_note(report["machine_load"])
    w = report["wall_ratio"]
    interval = f", interval {w['lo']:.2f}-{w['hi']:.2f} ({100 * w['coverage']:.1f}%)" if w["lo"] is not None else ""
    print(f"[contention] wall time beside a second copy / alone: median {w['median']:.2f}{interval} over {reps} "
          f"repetitions; median step time ratio {report['step_ratio']['median']:.2f}")
    print(f"[contention] {report['note'] or describe(report['machine_load'])}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "contention.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"[contention] wrote {path}")
    return report
