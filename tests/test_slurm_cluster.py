"""SLURM path: a private cluster, the sacct stand-in, and klbench's Hydra launcher presets.

These run real slurmctld/slurmd/munged daemons (tests/slurm_cluster.py) and real submitit/Hydra
code: the `slurm_cpu` and `slurm` presets from conf/hydra/launcher submit job arrays, and a job sent
SIGUSR2 is requeued by submitit and resumes. About a minute in all; skipped with the apt command
when slurm-wlm/munge are missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from slurm_cluster import SACCT_STANDIN, SlurmCluster, slurm_cluster_fixture  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# A Hydra app that stands in for a training run: it counts `steps` steps of `step_s` seconds and
# resumes from its run directory's state.json when rerun. It saves that state after every step
# (save_on=step) or only when SIGUSR2 arrives (save_on=signal): a handler chained in front of
# submitit's, which requeues the job and exits at once, so that is the last moment to save.
APP = """
import json, os, signal, socket, time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    out = Path(HydraConfig.get().runtime.output_dir)
    state_file = out / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {"step": 0, "starts": []}
    state["starts"].append({
        "step": state["step"],
        "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        # as squeue/scancel name it: 12_0 for a task of job array 12 (a sweep), 12 for a lone job
        "job": "_".join(os.environ[k] for k in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID") if k in os.environ)
        or os.environ.get("SLURM_JOB_ID"),
        "gpus": os.environ.get("SLURM_GPUS_ON_NODE"),
        "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "partition": os.environ.get("SLURM_JOB_PARTITION"),
    })

    def save():
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, state_file)

    submitit_handler = signal.getsignal(signal.SIGUSR2)  # installed before this function runs

    def save_then_requeue(signum, frame):
        state["saved_on_signal"] = state["step"]
        save()
        submitit_handler(signum, frame)

    if cfg.save_on == "signal" and callable(submitit_handler):
        signal.signal(signal.SIGUSR2, save_then_requeue)
    while state["step"] < cfg.steps:
        time.sleep(cfg.step_s)
        state["step"] += 1
        (out / "progress").write_text(f"{state['step']} {state['starts'][-1]['job']}")
        if cfg.save_on == "step":
            save()
    save()
    (out / "result.json").write_text(json.dumps({"x": cfg.x, "host": socket.gethostname(), **state}))
    return cfg.x * 10


if __name__ == "__main__":
    main()
"""


@pytest.fixture
def hydra_app(tmp_path: Path) -> Path:
    """tmp_path/app.py with a config dir that searches klbench's conf/ (for hydra/launcher presets)."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "config.yaml").write_text(
        textwrap.dedent(f"""\
            x: 0
            steps: 1
            step_s: 0.0
            save_on: step
            hydra:
              searchpath:
                - file://{CONF_DIR}
              sweep:
                dir: {tmp_path}/multirun
            """)
    )
    (tmp_path / "app.py").write_text(APP)
    return tmp_path / "app.py"


def _multirun(
    cluster: SlurmCluster, app: Path, *overrides: str, timeout: float = 120
) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [sys.executable, str(app), "-m", *overrides],
        cwd=app.parent, env=cluster.env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert p.returncode == 0, f"multirun failed\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}\n{cluster.logs()}"
    return p


def _results(sweep: Path, n: int) -> list[dict]:
    return [json.loads((sweep / str(i) / "result.json").read_text()) for i in range(n)]


def test_cluster_runs_a_batch_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    c = slurm_cluster
    # Partition up, node offering .cpus CPUs and 'idle' (or busy with another test's job).
    avail, cpus, state = c.run(["sinfo", "--noheader", "-p", c.partition, "-o", "%a %c %T"]).stdout.split()
    assert (avail, cpus) == ("up", str(c.cpus)) and state in ("idle", "mixed", "allocated"), state
    out = tmp_path / "job.out"
    wrap = "echo ran on $SLURMD_NODENAME in $SLURM_JOB_PARTITION"
    job = c.run(["sbatch", "--parsable", "-o", str(out), "--wrap", wrap])
    job_id = job.stdout.strip().split(";")[0]
    assert c.wait_job(job_id, timeout=60) == "COMPLETED", c.logs()
    assert out.read_text().strip() == f"ran on {c.node} in {c.partition}"
    # Always -o: sbatch's default slurm-%j.out lands in the caller's cwd (the repository).
    failing = c.run(["sbatch", "--parsable", "-o", "/dev/null", "--wrap", "exit 3"]).stdout.strip()
    assert c.wait_job(failing, timeout=60) == "FAILED", c.logs()
    # EnforcePartLimits=ALL: an impossible request is refused at submission instead of pending forever.
    too_big = c.run(
        ["sbatch", "-o", "/dev/null", f"--cpus-per-task={c.cpus + 1}", "--wrap", "true"], check=False
    )
    assert too_big.returncode != 0 and "More processors requested than permitted" in too_big.stderr


def test_sacct_standin_answers_submitit(slurm_cluster: SlurmCluster) -> None:
    from submitit.slurm.slurm import SlurmInfoWatcher

    c = slurm_cluster
    sbatch = ["sbatch", "--parsable", "-o", "/dev/null"]
    array = c.run([*sbatch, "--array=0-2%1", "--wrap", "sleep 0.3"]).stdout.strip()
    single = c.run([*sbatch, "--wrap", "exit 1"]).stdout.strip()
    watcher = SlurmInfoWatcher()
    for jid in (f"{array}_0", f"{array}_1", f"{array}_2", single):
        watcher.register_job(jid)
    # Exactly what submitit runs: sacct -o JobID,State,NodeList --parsable2 -j <id> ...
    command = watcher._make_command()
    assert command is not None and command[0] == "sacct"
    # While the %1 array runs one task at a time, pending tasks show as a range (12_[1-2%1]).
    early = c.run(command).stdout
    assert early.splitlines()[0] == "JobID|State|NodeList"
    early_info = watcher.read_info(early)
    assert {f"{array}_0", f"{array}_1", f"{array}_2", single} <= set(early_info), early
    c.wait_job(array, timeout=60)
    c.wait_job(single, timeout=60)
    out = c.run(command).stdout
    info = watcher.read_info(out)
    assert {k: info[k]["State"] for k in (f"{array}_0", f"{array}_1", f"{array}_2")} == dict.fromkeys(
        (f"{array}_0", f"{array}_1", f"{array}_2"), "COMPLETED"
    ), out
    assert info[single]["State"] == "FAILED" and info[single]["NodeList"] == c.node, out
    # Other jobs are filtered out, and a job the controller never had gives only the header (like sacct).
    assert c.run(["sacct", "--parsable2", "-o", "JobID,State", "-j", single]).stdout.splitlines() == [
        "JobID|State",
        f"{single}|FAILED",
    ]
    assert c.run(["sacct", "-P", "-o", "JobID,State", "-j", "999999"]).stdout.splitlines() == ["JobID|State"]
    bad = c.run(["sacct", "-P", "-o", "JobID,MaxRSS"], check=False)
    assert bad.returncode == 2 and "unsupported field 'MaxRSS'" in bad.stderr
    assert c.run(["which", "sacct"]).stdout.strip() == str(c.root / "bin" / "sacct")
    assert SACCT_STANDIN.is_file()


def test_submitit_sees_a_killed_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """The reason for the stand-in: without a working sacct, submitit waits forever for a killed job."""
    script = tmp_path / "submit.py"
    script.write_text(
        textwrap.dedent(f"""\
            import sys, time, submitit
            ex = submitit.AutoExecutor(folder="{tmp_path}/submitit/%j", cluster="slurm")
            ex.update_parameters(timeout_min=60, cpus_per_task=1)
            job = ex.submit(time.sleep, 300)
            print(job.job_id, flush=True)
            try:
                job.result()
            except submitit.core.utils.UncompletedJobError as e:
                print("UNCOMPLETED", job.state, flush=True)
                sys.exit(0)
            sys.exit(1)
            """)
    )
    c = slurm_cluster
    proc = subprocess.Popen(
        [sys.executable, str(script)], env=c.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        job_id = proc.stdout.readline().strip()
        _wait_until(lambda: c.job_states(job_id).get(job_id) == "RUNNING", 120, f"job {job_id} running", c)
        c.run(["scancel", job_id])
        # submitit polls sacct after 2, 4, 8, 16 s, then waits 15 s for a result file that never comes.
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(
            f"submitit still waits for cancelled job {job_id} after 90 s: it cannot see the job's state "
            f"(is the sacct stand-in first on PATH? `sacct` is {c.run(['which', 'sacct']).stdout.strip()})\n"
            f"{out}\n{err}\n{c.logs()}"
        )
    finally:
        proc.kill()
    assert proc.returncode == 0 and "UNCOMPLETED CANCELLED" in out, f"{out}\n{err}\n{c.logs()}"


def test_hydra_multirun_through_slurm_cpu_preset(slurm_cluster: SlurmCluster, hydra_app: Path) -> None:
    c = slurm_cluster
    p = _multirun(c, hydra_app, "hydra/launcher=slurm_cpu", "x=1,2")
    sweep = hydra_app.parent / "multirun"
    results = _results(sweep, 2)
    assert [r["x"] for r in results] == [1, 2]
    assert all(r["step"] == 1 and r["host"].split(".")[0] == c.node for r in results)
    # Both ran as tasks of one job array on our partition, through the submitit launcher.
    jobs = {r["starts"][0]["job"] for r in results}
    array_id = results[0]["starts"][0]["job"].split("_")[0]
    assert jobs == {f"{array_id}_0", f"{array_id}_1"}, jobs
    assert {r["starts"][0]["partition"] for r in results} == {c.partition}
    # Results exist before SLURM has finished the jobs (COMPLETING): wait for the final state.
    assert c.wait_job(array_id, timeout=60) == "COMPLETED", c.job_states(array_id)
    assert set(c.job_states(array_id)) == {f"{array_id}_0", f"{array_id}_1"}
    assert "Submitit 'slurm' sweep output dir" in p.stdout + p.stderr
    sbatch = (sweep / ".submitit" / array_id / f"{array_id}_submission.sh").read_text()
    for line in (
        "#SBATCH --cpus-per-task=1",
        "#SBATCH --mem=4GB",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR2@30",
    ):
        assert line in sbatch, sbatch


def test_hydra_gpu_preset_submits(slurm_cluster: SlurmCluster, hydra_app: Path) -> None:
    """conf/hydra/launcher/slurm.yaml is accepted by a real sbatch (the test node has 2 fake GPUs)."""
    c = slurm_cluster
    if c.gpus < 1:
        pytest.skip("cluster started without fake GPUs")
    # The node is small: keep the GPU preset but shrink its CPU and memory request.
    _multirun(
        c,
        hydra_app,
        "hydra/launcher=slurm",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=1",
        "x=5",
    )
    (result,) = _results(hydra_app.parent / "multirun", 1)
    start = result["starts"][0]
    assert result["x"] == 5 and start["partition"] == c.partition
    assert start["gpus"] == "1" and start["cuda"] in {str(i) for i in range(c.gpus)}, start
    (sbatch,) = (hydra_app.parent / "multirun" / ".submitit").glob("*/*_submission.sh")
    assert "#SBATCH --gpus-per-node=1" in sbatch.read_text()
    assert "#SBATCH --signal=USR2@300" in sbatch.read_text()


def test_usr2_requeues_and_resumes(slurm_cluster: SlurmCluster, hydra_app: Path) -> None:
    """scancel --signal=USR2 -> submitit's handler -> launcher checkpoint -> scontrol requeue -> rerun resumes.

    A two-point sweep (a job array, as klbench sweeps are); only task 0 is preempted. The app saves
    only in its own SIGUSR2 handler, chained in front of submitit's: the rerun resuming from exactly
    that step shows the chain runs before the requeue kills the job.
    """
    c = slurm_cluster
    steps = 40
    proc = subprocess.Popen(
        [sys.executable, str(hydra_app), "-m", "hydra/launcher=slurm_cpu", "x=7,8", f"steps={steps}",
         "step_s=0.25", "save_on=signal"],
        cwd=hydra_app.parent, env=c.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    sweep = hydra_app.parent / "multirun"

    def progress() -> tuple[int, str]:  # (steps done, job id) of sweep task 0
        try:
            step, job = (sweep / "0" / "progress").read_text().split()
            return int(step), job
        except (OSError, ValueError):
            return 0, ""

    try:
        _wait_until(lambda: progress()[0] >= 3, 120, "task 0 to do 3 steps", c)
        job = progress()[1]  # 12_0
        c.run(["scancel", "--signal=USR2", job])
        assert progress()[0] < steps, "task 0 finished before it was signalled; make it longer"
        out, _ = proc.communicate(timeout=150)
    finally:
        proc.kill()
    assert proc.returncode == 0, f"{out}\n{c.logs()}"
    preempted, untouched = _results(sweep, 2)
    assert preempted["x"] == 7 and untouched["x"] == 8
    starts = preempted["starts"]
    assert preempted["step"] == steps and len(starts) == 2, preempted
    assert starts[0]["restart_count"] == 0 and starts[0]["step"] == 0
    # The rerun is the same array task, requeued once, and it continued from the step saved on
    # SIGUSR2, not from 0.
    assert job.endswith("_0") and starts[1]["job"] == job and starts[1]["restart_count"] == 1, starts
    assert starts[1]["step"] == preempted["saved_on_signal"] >= 3, preempted
    assert untouched["step"] == steps and len(untouched["starts"]) == 1, untouched
    log = (sweep / ".submitit" / job / f"{job}_0_log.out").read_text()
    assert "Caught signal SIGUSR2" in log and "this job is preempted" in log, log
    assert f"Requeued job {job}" in log, log


def _wait_until(cond, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{cluster.logs()}")
