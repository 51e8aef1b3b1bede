"""Multi-process data parallelism on CPU (gloo): torchrun with the torch backend (DDP) and with
DeepSpeed, and DeepSpeed's own launcher.

A 2-process run must reproduce the 1-process run of the same global batch, step by step: rank r
samples prompts r*B/2 .. (r+1)*B/2 - 1 of the step, each prompt seeded by its global index, so the
responses, rewards and lengths are identical (compared exactly); gradients are averaged over
ranks, which for equal per-rank sample counts equals the 1-process mean (token_mean weighted by
each rank's token share), so losses, KL estimates and gradient norms agree to float32 reduction
order: |2-proc - 1-proc| <= 1e-5 + 1e-4 * |1-proc| (observed: <= 2e-6 absolute over 4 steps).
Only with full-batch updates (algo.mini_batch_size=null): smaller mini-batches are drawn per rank.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow]

SMALL = [
    "logger=none",
    "algo.prompts_per_step=4",
    "algo.group_size=4",
    "trainer.threads=1",
    "trainer.steps=4",
]
#: the default loss (seq_mean_token_mean, k2 as a loss, one PPO epoch)
DEFAULT = SMALL
#: token_mean needs each rank's token share; two PPO epochs make the second update off-policy
TOKEN_MEAN = [*SMALL, "algo.loss_agg=token_mean", "algo.ppo_epochs=2", "kl=k3_as_loss"]
EXACT = ("reward/", "rollout/response_len", "rollout/truncated", "kl/coef", "optim/lr")
RTOL, ATOL = 1e-4, 1e-5
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launch(cmd: list[str], cwd: Path | None = None, env: dict | None = None, timeout: int = 600) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    proc = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**clean, **(env or {})}
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc.stdout + proc.stderr


def torchrun(*args: str, cwd: Path | None = None, env: dict | None = None) -> str:
    """`torchrun --standalone --nproc_per_node 2 -m klbench run ...` (a free rendezvous port)."""
    return launch(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "klbench",
            "run",
            *args,
        ],
        cwd=cwd,
        env=env,
    )


def one_process(*args: str) -> str:
    return launch([sys.executable, "-m", "klbench", "run", *args])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(got_dir: Path, want_dir: Path) -> None:
    got, want = metrics(got_dir), metrics(want_dir)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k, v in w.items():
            if k.startswith("perf/") or k == "step":
                continue
            if k.startswith(EXACT):
                assert g[k] == v, f"step {w['step']} {k}: {g[k]} != {v}"
            else:
                assert abs(g[k] - v) <= ATOL + RTOL * abs(v), f"step {w['step']} {k}: {g[k]} vs {v}"


def assert_written_once(run_dir: Path, world: int) -> None:
    """Rank 0 alone writes the run directory: one status, one row per step, one Hydra record."""
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "completed" and status["world_size"] == world
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert (run_dir / ".hydra" / "config.yaml").exists() and (
        run_dir / "final" / "model.safetensors"
    ).exists()


def assert_matches(run_dir: Path, baseline: Path) -> None:
    """A 2-process run wrote its directory once and logged the 1-process baseline's metrics."""
    assert_written_once(run_dir, world=2)
    assert_same_metrics(run_dir, baseline)


@pytest.fixture(scope="module")
def baselines(miniature_cache, tmp_path_factory) -> dict[str, Path]:
    """1-process torch-backend runs of the two settings."""
    root = tmp_path_factory.mktemp("one_process")
    runs = {"default": DEFAULT, "token_mean": TOKEN_MEAN}
    for name, args in runs.items():
        one_process(*args, f"hydra.run.dir={root / name}")
    return {name: root / name for name in runs}


def test_torchrun_ddp_matches_one_process(baselines, tmp_path):
    run_dir = tmp_path / "ddp"
    torchrun(*DEFAULT, f"hydra.run.dir={run_dir}")
    assert_matches(run_dir, baselines["default"])


def test_torchrun_deepspeed_zero3_matches_one_process(baselines, tmp_path):
    """Every parameter sharded over the two ranks, token_mean, two PPO epochs."""
    run_dir = tmp_path / "zero3"
    torchrun(
        *TOKEN_MEAN,
        "trainer=deepspeed",
        "trainer.deepspeed.zero_stage=3",
        "+trainer.deepspeed.extra.zero_optimization.stage3_param_persistence_threshold=0",
        f"hydra.run.dir={run_dir}",
    )
    assert_matches(run_dir, baselines["token_mean"])


def test_deepspeed_launcher_matches_one_process(baselines, tmp_path):
    """DeepSpeed's launcher on CPU: --num_accelerators sets the process count; --no_local_rank
    because klbench reads LOCAL_RANK from the environment (a --local_rank argument is no override)."""
    run_dir = tmp_path / "launcher"
    launch(
        [
            str(Path(sys.executable).parent / "deepspeed"),
            "--num_accelerators",
            "2",
            "--master_port",
            str(free_port()),
            "--module",
            "--no_local_rank",
            "klbench",
            "run",
            *DEFAULT,
            "trainer=deepspeed",
            f"hydra.run.dir={run_dir}",
        ]
    )
    assert_matches(run_dir, baselines["default"])


def test_ranks_share_one_run_dir(miniature_cache, tmp_path):
    """Without hydra.run.dir, Hydra's ${now:} run directory is rank 0's on every rank.

    Rank 1 starts 2.5 s late (a sitecustomize on PYTHONPATH), so its own clock reads another second.
    """
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        'import os, time\nif os.environ.get("RANK") == "1":\n    time.sleep(2.5)\n'
    )
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p)
    work = tmp_path / "work"
    work.mkdir()
    torchrun(*SMALL[:-1], "trainer.steps=1", cwd=work, env={"PYTHONPATH": path})
    run_dirs = [p for p in (work / "outputs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1, f"ranks wrote {len(run_dirs)} run directories: {run_dirs}"
    assert_written_once(run_dirs[0], world=2)
