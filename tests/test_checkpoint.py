"""Checkpoints and exact resume: kill at a random step, resume, and get the uninterrupted run's metrics."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ARGS = ["logger=none", "algo.prompts_per_step=4", "algo.group_size=4", "trainer.save_every=2", "kl=k3_as_loss",
        "rollout.staleness=1"]


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def start(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "klbench", "run", *ARGS, *extra, f"hydra.run.dir={run_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_steps(proc: subprocess.Popen, run_dir: Path, n: int, timeout: float = 300) -> None:
    path = run_dir / "metrics.jsonl"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no step {n} within {timeout}s")


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_exact(run_cli, miniature_cache, tmp_path):
    steps = 8
    ref, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    run_cli("run", *ARGS, f"trainer.steps={steps}", f"hydra.run.dir={ref}")

    kill_after = random.Random().randint(3, steps - 1)  # a random step after the first checkpoint (step 2)
    proc = start(killed, f"trainer.steps={steps}")
    wait_for_steps(proc, killed, kill_after)
    proc.kill()
    proc.wait()
    assert len(metrics(killed)) < steps, "the run finished before it was killed"
    # a kill may land mid-save: only complete checkpoints count, a temp dir may be left behind
    run_cli("run", *ARGS, f"trainer.steps={steps}", "trainer.resume=auto", f"hydra.run.dir={killed}")
    assert metrics(killed) == metrics(ref), f"resumed run (killed after step {kill_after}) differs"
    ckpts = sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_000006", "step_000008"]  # keep_last=2 rotation


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits(run_cli, miniature_cache, tmp_path):
    run_dir = tmp_path / "term"
    proc = start(run_dir, "trainer.steps=50", "trainer.save_every=0")
    wait_for_steps(proc, run_dir, 2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "preempted"
    step = status["step"]
    assert 2 <= step < 50
    assert (run_dir / "checkpoints" / f"step_{step:06d}" / "meta.json").exists()
    assert len(metrics(run_dir)) == step
    # and it resumes from there to the end
    run_cli("run", *ARGS, "trainer.steps=" + str(step + 2), "trainer.save_every=0", "trainer.resume=auto",
            f"hydra.run.dir={run_dir}")
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, step + 3))
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory, miniature_cache):
    from conftest import klbench

    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    klbench("run", *ARGS, "trainer.steps=2", f"hydra.run.dir={run_dir}")
    return run_dir


def test_truncated_checkpoint_names_the_file(run_cli, checkpointed_run, tmp_path):
    ckpt = tmp_path / "step_000002"
    subprocess.run(["cp", "-r", str(checkpointed_run / "checkpoints" / "step_000002"), str(ckpt)], check=True)
    weights = ckpt / "policy" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    proc = run_cli("run", *ARGS, "trainer.steps=3", f"trainer.resume={ckpt}", f"hydra.run.dir={tmp_path / 'r'}",
                   check=False)
    assert proc.returncode == 1
    assert "corrupt checkpoint" in proc.stderr and "model.safetensors" in proc.stderr and "truncated" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_checkpoint_of_another_model_is_rejected(run_cli, checkpointed_run, tmp_path, miniature_dir):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    other = tmp_path / "other-model"
    cfg = Qwen2Config(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    Qwen2ForCausalLM(cfg).save_pretrained(other)
    AutoTokenizer.from_pretrained(miniature_dir).save_pretrained(other)
    ckpt = checkpointed_run / "checkpoints" / "step_000002"
    proc = run_cli("run", *ARGS, "trainer.steps=3", f"model.name_or_path={other}", f"trainer.resume={ckpt}",
                   f"hydra.run.dir={tmp_path / 'r'}", check=False)
    assert proc.returncode == 1 and "with a different experiment (model.name_or_path:" in proc.stderr  # before loading
    # allowed to change the path, the model itself is still checked against the checkpoint's fingerprint
    proc = run_cli("run", *ARGS, "trainer.steps=3", f"model.name_or_path={other}", f"trainer.resume={ckpt}",
                   "trainer.resume_allow_changes=[model.name_or_path]", f"hydra.run.dir={tmp_path / 'r2'}", check=False)
    assert proc.returncode == 1
    assert "was made for a different model" in proc.stderr and "hidden_size: checkpoint 128 vs model 64" in proc.stderr


def test_existing_run_dir_is_not_overwritten(run_cli, checkpointed_run):
    before = (checkpointed_run / "metrics.jsonl").read_text()
    proc = run_cli("run", *ARGS, "trainer.steps=2", f"hydra.run.dir={checkpointed_run}", check=False)
    assert proc.returncode == 1 and "holds a run" in proc.stderr and "trainer.resume=auto" in proc.stderr
    assert (checkpointed_run / "metrics.jsonl").read_text() == before


def test_a_resume_may_switch_compilation_but_not_the_experiment(tmp_path):
    from klbench.config import Config, ModelConfig, flatten
    from klbench.errors import KlbenchError
    from klbench.train.rundir import check_resume

    saved = json.loads(json.dumps(flatten(Config()), default=str))
    check_resume(Config(model=ModelConfig(compile=True)), saved, 1, tmp_path)  # a speed setting: accepted
    with pytest.raises(KlbenchError, match="model.hidden_size"):
        check_resume(Config(model=ModelConfig(compile=True, hidden_size=64)), saved, 1, tmp_path)
