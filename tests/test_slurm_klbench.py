"""klbench sweeps on a real (private, single-node) SLURM cluster through Hydra's submitit launcher:
every job's outputs, and a preempted job (scancel --signal=USR2) that checkpoints, is requeued and
resumes from its checkpoint. Skipped with the apt command when slurm-wlm/munge are missing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, slurm_cluster_fixture  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(600)]

SMALL = ["logger=none", "algo.prompts_per_step=4", "algo.group_size=4", "trainer.threads=1"]


def klbench_sweep(cluster: SlurmCluster, cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "klbench", "run", "-m", "hydra/launcher=slurm_cpu", *args],
                            cwd=cwd, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def job_dirs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if (p / ".hydra").is_dir()), key=lambda p: int(p.name.split("_")[0]))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sweep_runs_every_job(slurm_cluster: SlurmCluster, miniature_cache, tmp_path):
    sweep = tmp_path / "sweep"
    proc = klbench_sweep(slurm_cluster, tmp_path, "kl=none,k2_as_loss", "seed=0,1", "trainer.steps=2", *SMALL,
                         f"hydra.sweep.dir={sweep}")
    out, _ = proc.communicate(timeout=500)
    assert proc.returncode == 0, f"{out[-4000:]}\n{slurm_cluster.logs()}"
    jobs = job_dirs(sweep)
    assert len(jobs) == 4
    for job in jobs:
        status = json.loads((job / "status.json").read_text())
        assert status["status"] == "completed", (job, status)
        assert status["slurm_job"].split("_")[0].isdigit()  # ran as a SLURM job (array task)
        assert [r["step"] for r in metrics(job)] == [1, 2]
        assert (job / "final" / "model.safetensors").exists()
    assert "4/4 jobs completed" in out
    # the report reads the sweep as it was written on the cluster
    report = subprocess.run([sys.executable, "-m", "klbench", "report", str(sweep), "--out", str(tmp_path / "rep")],
                            capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    assert "kl=k2_as_loss" in (tmp_path / "rep" / "table.md").read_text()


def test_preempted_job_is_requeued_and_resumes(slurm_cluster: SlurmCluster, miniature_cache, tmp_path):
    steps = 30
    sweep = tmp_path / "sweep"
    proc = klbench_sweep(slurm_cluster, tmp_path, "kl=k2_as_loss,k3_as_loss", f"trainer.steps={steps}", *SMALL,
                         f"hydra.sweep.dir={sweep}")
    try:
        first = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # wait for task 0 to be a few steps in
            jobs = job_dirs(sweep) if sweep.is_dir() else []
            if jobs and (jobs[0] / "metrics.jsonl").exists() and len(metrics(jobs[0])) >= 3:
                first = jobs[0]
                break
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            time.sleep(0.2)
        assert first is not None, f"task 0 never reached step 3\n{slurm_cluster.logs()}"
        job_id = json.loads((first / "status.json").read_text())["slurm_job"]
        slurm_cluster.run(["scancel", "--signal=USR2", job_id])
        out, _ = proc.communicate(timeout=400)
    finally:
        proc.kill()
    assert proc.returncode == 0, f"{out[-4000:]}\n{slurm_cluster.logs()}"
    status = json.loads((first / "status.json").read_text())
    assert status["status"] == "completed" and status["slurm_restarts"] == 1, status
    steps_logged = [r["step"] for r in metrics(first)]
    assert steps_logged == list(range(1, steps + 1)), "steps missing or duplicated after the requeue"
    ckpts = [p.name for p in (first / "checkpoints").iterdir() if p.name.startswith("step_")]
    assert ckpts, "the preempted job wrote no checkpoint"
    log = next((sweep / ".submitit").rglob(f"{job_id}_0_log.out")).read_text()
    assert "Caught signal SIGUSR2" in log and f"Requeued job {job_id}" in log, log[-3000:]
    other = job_dirs(sweep)[1]
    assert json.loads((other / "status.json").read_text())["slurm_restarts"] == 0
