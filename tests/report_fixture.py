"""A sweep of synthetic runs that exercises every part of `klbench report`'s table (shared by tests).

Three variants x three seeds with seeded noise, held-out evaluations, a non-finite value, a run that
failed part-way, one that never recorded how it ended, and a job that never got a directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

VARIANTS = ("none", "k2_as_loss", "k3_as_loss")
SEEDS = (0, 1, 2)
STEPS = 40


def _run(job: Path, overrides: list[str], rows: list[dict], status: str | None, wall_s: float) -> None:
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    ov = dict(o.split("=", 1) for o in overrides)
    config = {"seed": int(ov["seed"]), "kl": {"preset": ov["kl"]}, "name": "klbench"}
    (job / "config.yaml").write_text(yaml.safe_dump(config))
    (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if status is None:
        return
    st = {"status": status, "started": "2026-11-24T22:00:00+00:00", "ended": "2026-11-24T22:10:00+00:00",
          "python": "3.11.7", "torch": "2.13.0+cpu", "world_size": 1, "git": {"commit": "b" * 40, "dirty": False}}
    if status == "completed":
        st["wall_s"] = wall_s
    else:
        st["error"] = "KlbenchError: non-finite metrics at step 17: loss/total"
    (job / "status.json").write_text(json.dumps(st))


def make_golden_sweep(root: Path) -> Path:
    sweep = root / "multirun" / "2026-11-30" / "09-00-00"
    sweep.mkdir(parents=True)
    task = [f"kl={','.join(VARIANTS)}", f"seed={','.join(map(str, SEEDS))}", f"trainer.steps={STEPS}"]
    doc = {"hydra": {"sweep": {"dir": str(sweep), "subdir": "${hydra.job.num}_${hydra.job.override_dirname}"},
                     "sweeper": {"params": None},
                     "overrides": {"hydra": ["hydra.mode=MULTIRUN"], "task": task},
                     "job": {"name": "klbench", "num": "???"}}}
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(doc))
    rng = np.random.default_rng(7)
    num = 0
    for i, kl in enumerate(VARIANTS):
        for seed in SEEDS:
            if (kl, seed) == ("k3_as_loss", 2):  # the sweep stopped before this job: no directory
                num += 1
                continue
            n = 17 if (kl, seed) == ("k2_as_loss", 1) else STEPS
            rows = []
            for s in range(1, n + 1):
                row = {"step": s,
                       "kl/rkl_k1": float((0.05 + 0.03 * i) * s + rng.normal(0, 0.2)),
                       "reward/mean": float(0.4 + 0.01 * s * (1 - 0.2 * i) + rng.normal(0, 0.05)),
                       "reward/acc": float(rng.uniform(0.3, 0.6)),
                       "rollout/entropy": float(1.5 - 0.01 * s + rng.normal(0, 0.02)),
                       "rollout/response_len": float(rng.integers(6, 14)),
                       "perf/step_s": float(rng.uniform(0.2, 0.3))}
                if (kl, seed, s) == ("none", 1, STEPS):
                    row["kl/rkl_k1"] = "nan"  # a non-finite value is logged as a string
                if kl != "none":
                    row["reward/trait"] = float(rng.uniform(0, 1))
                rows.append(row)
                if s % 20 == 0:
                    rows.append({"step": s, "eval/arithmetic/acc@4": float(rng.uniform(0.3, 0.5)),
                                 "eval/arithmetic/pass@4": float(rng.uniform(0.6, 0.8))})
            status = "failed" if n < STEPS else ("running" if (kl, seed) == ("none", 2) else "completed")
            _run(sweep / f"{num}_kl={kl},seed={seed}", [f"kl={kl}", f"seed={seed}", f"trainer.steps={STEPS}"],
                 rows, status, wall_s=300.0 + 10 * num)
            num += 1
    return sweep
