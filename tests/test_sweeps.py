"""Sweeps through the real CLI: every KL preset trains, and a failing job is reported without stopping the rest."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

TINY = ["trainer.steps=2", "logger=none", "algo.prompts_per_step=2", "algo.group_size=4", "rollout.max_new_tokens=10"]
PRESETS = ["none", "k1_in_reward", "k1_as_loss", "k2_as_loss", "k3_as_loss", "k3_both", "k2_as_loss_is", "k3_as_loss_is"]


def preset(job):
    overrides = (job / ".hydra" / "overrides.yaml").read_text().split()
    return next(o.split("=", 1)[1] for o in overrides if o.startswith("kl="))


def job_dirs(sweep):
    return sorted((p for p in sweep.iterdir() if (p / ".hydra").is_dir()), key=lambda p: int(p.name.split("_")[0]))


def test_every_kl_preset_trains(run_cli, miniature_cache, tmp_path):
    sweep = tmp_path / "sweep"
    # two PPO epochs in mini-batches: the IS presets then weigh genuinely off-policy samples
    run_cli("run", "-m", f"kl={','.join(PRESETS)}", *TINY, "algo.ppo_epochs=2", "algo.mini_batch_size=4",
            f"hydra.sweep.dir={sweep}")
    jobs = job_dirs(sweep)
    assert [preset(j) for j in jobs] == PRESETS
    for job in jobs:
        rows = [json.loads(ln) for ln in (job / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and json.loads((job / "status.json").read_text())["status"] == "completed"
        as_loss = preset(job) not in ("none", "k1_in_reward")
        assert (rows[-1]["loss/kl"] != 0.0) == as_loss, (preset(job), rows[-1]["loss/kl"])


def test_failed_job_is_listed_and_the_rest_still_run(run_cli, miniature_cache, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"question": f"{i}+{i}=", "answer": str(2 * i)}) + "\n" for i in range(4)))
    bad = tmp_path / "bad.jsonl"  # row 2 has no answer: the job fails at load time, after the sweep started
    bad.write_text(json.dumps({"question": "1+1=", "answer": "2"}) + "\n" + json.dumps({"question": "2+2="}) + "\n")
    sweep = tmp_path / "sweep"
    proc = run_cli("run", "-m", "data=jsonl", f"data.path={bad},{good}", "data.prompt.template=raw", *TINY,
                   f"hydra.sweep.dir={sweep}", check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "1/2 jobs completed" in proc.stderr
    failed, ok = job_dirs(sweep)
    assert json.loads((ok / "status.json").read_text())["status"] == "completed"
    status = json.loads((failed / "status.json").read_text())
    assert status["status"] == "failed" and "answer" in status["error"]
    assert f"{failed.name}: failed:" in proc.stderr  # the end-of-sweep list says which job and why
    report = subprocess.run([sys.executable, "-m", "klbench", "report", str(sweep), "--out", str(tmp_path / "r")],
                            capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    table = (tmp_path / "r" / "table.md").read_text()
    assert failed.name in table and "failed" in table  # listed, not silently dropped
