"""`klbench report` on fixture sweep directories with synthetic metrics (no training run).

Every expected number below is computed by hand from the synthetic metrics the fixtures write.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from klbench import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HOST = "secret-host-42"  # status.json records the host; the report must not repeat it


# -- fixture builders ----------------------------------------------------------------------------
def write_run(
    job: Path,
    overrides: list[str],
    rows: list[dict] | None,
    status: str | None = "completed",
    error: str = "",
    wall_s: float = 60.0,
) -> Path:
    """A run directory in klbench/train/run.py's format: .hydra/, config.yaml, metrics.jsonl, status.json."""
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    ov = dict(o.split("=", 1) for o in overrides)
    config = {
        "seed": int(ov.get("seed", 0)),
        "kl": {"estimator": ov.get("kl", "k2_as_loss")},
        "name": "klbench",
    }
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (job / "config.yaml").write_text(yaml.safe_dump(config))
    if rows is not None:
        (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if status is not None:
        st = {
            "status": status,
            "started": "2026-11-24T22:00:00+00:00",
            "host": HOST,
            "pid": 1,
            "python": "3.11.7",
            "torch": "2.13.0+cpu",
            "world_size": 1,
            "git": {"commit": "a" * 40, "dirty": False},
            "ended": "2026-11-24T22:01:00+00:00",
            "step": len(rows or []),
        }
        if status == "completed":
            st["wall_s"] = wall_s
        if error:
            st["error"] = error
        (job / "status.json").write_text(json.dumps(st))
    return job


def train_rows(n: int, **slopes: float) -> list[dict]:
    """n training rows; metric m at step s is slopes[m] * s (names use '__' for '/')."""
    return [{"step": s, **{k.replace("__", "/"): v * s for k, v in slopes.items()}} for s in range(1, n + 1)]


def write_multirun(sweep: Path, task: list[str], params: dict | None = None) -> None:
    sweep.mkdir(parents=True, exist_ok=True)
    doc = {
        "hydra": {
            "sweep": {"dir": str(sweep), "subdir": "${hydra.job.num}_${hydra.job.override_dirname}"},
            "sweeper": {"params": params},
            "overrides": {"hydra": ["hydra.mode=MULTIRUN", "hydra/launcher=basic"], "task": task},
            "job": {"name": "klbench", "num": "???"},
        }
    }
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(doc))


KL_VALUES = ("none", "k2_as_loss")


def make_sweep(root: Path, n_steps: int = 10, seeds=(0, 1)) -> Path:
    """kl={none,k2_as_loss} × seed: kl/rkl_k1 = a·step, a = 0.1 (none) / 0.2 (k2) + seed·0.2;
    reward/acc = 0.02·(seed+1)·step; rollout/entropy = step; wall time 60 s·(seed+1)."""
    sweep = root / "multirun" / "2026-11-24" / "22-00-00"
    write_multirun(
        sweep,
        [
            "kl=none,k2_as_loss",
            f"seed={','.join(map(str, seeds))}",
            f"trainer.steps={n_steps}",
            "logger=none",
        ],
    )
    num = 0
    for i, kl in enumerate(KL_VALUES):
        for seed in seeds:
            a = 0.1 * (i + 1) + 0.2 * seed
            rows = train_rows(n_steps, kl__rkl_k1=a, reward__acc=0.02 * (seed + 1), rollout__entropy=1.0)
            write_run(
                sweep / f"{num}_kl={kl},seed={seed}",
                [f"kl={kl}", f"seed={seed}", f"trainer.steps={n_steps}", "logger=none"],
                rows,
                wall_s=60.0 * (seed + 1),
            )
            num += 1
    return sweep


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


# -- loading and grouping ----------------------------------------------------------------------------
def test_groups_by_swept_keys_with_seeds_as_replicates(tmp_path):
    sweep = make_sweep(tmp_path, seeds=(0, 1, 2))
    runs = report.load_sweep(sweep).runs
    assert [r.num for r in runs] == [0, 1, 2, 3, 4, 5]
    keys = report.swept_keys(runs)
    assert keys == ["kl"]  # seed is the replicate axis; trainer.steps and logger are the same everywhere
    variants = report.group_runs(runs, keys)
    assert [v.label for v in variants] == ["kl=none", "kl=k2_as_loss"]  # sweep order, not alphabetical
    assert [[r.seed for r in v.runs] for v in variants] == [["0", "1", "2"], ["0", "1", "2"]]


def test_two_swept_keys_and_an_absent_override_make_variants(tmp_path):
    root = tmp_path / "sweep"
    specs = [
        (["kl=k3_as_loss", "kl.coef=0.5"], 0),
        (["kl=k3_as_loss", "kl.coef=0.5"], 1),
        (["kl=k3_as_loss", "kl.coef=0.1"], 0),
        (["kl=none"], 0),
        (["kl=none"], 1),
    ]
    for num, (ov, seed) in enumerate(specs):
        write_run(
            root / f"{num}_x",
            [*ov, f"seed={seed}", f"logger={'none' if seed else 'wandb'}"],
            train_rows(4, kl__rkl_k1=1),
        )
    runs = report.load_sweep(root).runs
    keys = report.swept_keys(runs)
    assert keys == ["kl", "kl.coef"]  # logger differs too, but never changes results
    variants = report.group_runs(runs, keys)
    assert [(v.label, len(v.runs)) for v in variants] == [
        ("kl=k3_as_loss,kl.coef=0.5", 2),
        ("kl=k3_as_loss,kl.coef=0.1", 1),
        ("kl=none", 2),
    ]
    # a key given as --replicate is not a variant axis
    assert report.swept_keys(runs, replicate=("seed", "kl.coef")) == ["kl"]


def test_expected_jobs_follow_hydra_basic_sweeper_order(tmp_path):
    doc = {
        "hydra": {
            "sweeper": {"params": {"kl": "none,k3_as_loss", "seed": "0,1"}},
            "overrides": {"task": ["seed=range(0,3)", "trainer.steps=5", "hydra.job.chdir=false"]},
        }
    }
    jobs = report.expected_jobs(doc)
    # params first, then the command line; a later value of a key replaces it in place
    assert jobs == [
        {"kl": kl, "seed": s, "trainer.steps": "5"} for kl in ("none", "k3_as_loss") for s in "012"
    ]


# -- statistics --------------------------------------------------------------------------------------------
def test_window_mean_matches_the_summary_json_rule(tmp_path):
    from klbench.train.run import summarize

    for n in (1, 3, 7, 10, 13):
        for fraction in (0.2, 0.5, 1.0):
            job = write_run(tmp_path / f"r{n}_{fraction}", ["seed=0"], train_rows(n, kl__rkl_k1=0.5))
            run = report.load_run(job)
            expected = summarize(job / "metrics.jsonl", fraction)["window"]["kl/rkl_k1"]
            assert report.window_mean(run, "kl/rkl_k1", fraction) == pytest.approx(expected)
    run = report.load_run(tmp_path / "r10_0.2")
    assert report.window_mean(run, "kl/rkl_k1", 0.2) == pytest.approx(0.5 * (9 + 10) / 2)  # steps 9, 10
    assert report.window_mean(run, "kl/rkl_k1", 0.5) == pytest.approx(0.5 * 8)  # steps 6..10


def test_table_values_are_exact_windowed_mean_and_std(tmp_path, capsys):
    sweep = make_sweep(tmp_path, n_steps=10, seeds=(0, 1))
    # eval rows (separate lines, same step) in kl=none's runs: last acc@1 is 0.4 (seed 0), 0.6 (seed 1)
    for job, (first, last) in zip(sorted(sweep.glob("[01]_*")), [(0.2, 0.4), (0.3, 0.6)]):
        with (job / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": 5, "eval/arith/acc@1": first}) + "\n")
            f.write(json.dumps({"step": 10, "eval/arith/acc@1": last}) + "\n")
    out = tmp_path / "out"
    assert report.main([str(sweep), "--out", str(out)]) == 0
    rows = {r["variant"]: r for r in read_csv(out / "table.csv")}
    assert list(rows) == ["kl=none", "kl=k2_as_loss"]
    # window = last 2 of 10 steps → mean of a·9, a·10 = 9.5a; a = 0.1, 0.3 (none) and 0.2, 0.4 (k2)
    none, k2 = rows["kl=none"], rows["kl=k2_as_loss"]
    assert float(none["kl/rkl_k1 mean"]) == pytest.approx(9.5 * 0.2)  # (0.95 + 2.85) / 2
    assert float(none["kl/rkl_k1 std"]) == pytest.approx(9.5 * 0.2 / math.sqrt(2))  # |2.85 − 0.95| / √2
    assert float(k2["kl/rkl_k1 mean"]) == pytest.approx(9.5 * 0.3)
    assert float(k2["kl/rkl_k1 std"]) == pytest.approx(9.5 * 0.2 / math.sqrt(2))
    assert float(none["reward/acc mean"]) == pytest.approx(9.5 * 0.03)  # (0.19 + 0.38) / 2
    assert float(none["rollout/entropy std"]) == pytest.approx(0.0)
    assert float(none["eval/arith/acc@1 mean"]) == pytest.approx(0.5)
    assert float(none["eval/arith/acc@1 std"]) == pytest.approx(0.1 * math.sqrt(2))
    assert k2["eval/arith/acc@1 mean"] == "" and k2["eval/arith/acc@1 n"] == "0"
    manifest = json.loads(
        (out / "manifest.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON")
    )
    k2_eval = manifest["variants"][1]["metrics"]["eval/arith/acc@1"]
    assert k2_eval == {"mean": None, "std": None, "n": 0}
    assert none["n"] == "2" and none["seeds"] == "0 1" and float(none["wall_s mean"]) == pytest.approx(90.0)
    md = (out / "table.md").read_text()
    assert "| kl=none | 2 | 1.90 ± 1.3 | 0.285 ± 0.13 | 9.50 ± 0 | 0.500 ± 0.14 | 90 s |" in md
    assert "| kl=k2_as_loss | 2 | 2.85 ± 1.3 |" in md
    assert md.index("kl=none") < md.index("kl=k2_as_loss")
    assert "`eval/arith/acc@1`" in md.splitlines()[0] and "| 0.500 ± 0.14 |" in md
    assert "reward/trait" not in md  # not logged by any run, so no column

    # --window 0.5: steps 6..10 → mean 8a
    assert report.main([str(sweep), "--out", str(out), "--window", "0.5"]) == 0
    assert float(read_csv(out / "table.csv")[0]["kl/rkl_k1 mean"]) == pytest.approx(8 * 0.2)


def test_non_finite_values_are_left_out_of_the_window(tmp_path):
    rows = train_rows(5, kl__rkl_k1=1.0)
    rows[-1]["kl/rkl_k1"] = "nan"
    run = report.load_run(write_run(tmp_path / "r", ["seed=0"], rows))
    assert report.window_mean(run, "kl/rkl_k1", 0.4) == pytest.approx(4.0)  # steps 4, 5 → only 4 is finite
    assert report.mean_std([1.0, float("nan"), 3.0]) == (2.0, pytest.approx(math.sqrt(2)), 2)
    mean, std, n = report.mean_std([5.0])
    assert (mean, n) == (5.0, 1) and math.isnan(std)


def test_smoothing_and_seed_band():
    y = np.array([1.0, 2.0, np.nan, 4.0, 6.0])
    np.testing.assert_allclose(report.smooth(y, 2), [1.0, 1.5, 2.0, 4.0, 5.0])
    np.testing.assert_allclose(report.smooth(y, 1)[[0, 1, 3, 4]], [1, 2, 4, 6])

    def fake(steps, values):
        return report.Run(
            name="r",
            path=Path("."),
            num=None,
            overrides={},
            config={},
            status="completed",
            error="",
            wall_s=None,
            train=pd.DataFrame({"m": np.array(values, dtype=float)}, index=pd.Index(steps, name="step")),
            evals=pd.DataFrame(columns=["step", "metric", "value"]),
        )

    steps, mean, lo, hi = report.band([fake([1, 2, 3], [1, 2, 3]), fake([1, 2], [3, 6])], "m")
    np.testing.assert_array_equal(steps, [1, 2, 3])
    np.testing.assert_allclose(mean, [2, 4, 3])
    np.testing.assert_allclose(lo, [1, 2, 3])
    np.testing.assert_allclose(hi, [3, 6, 3])


# -- failed and missing runs ---------------------------------------------------------------------------------
def make_sweep_with_failures(tmp_path) -> Path:
    """kl={none,k2_as_loss} × seed={0,1,2}: job 2 failed after 3 steps, job 4 has no status.json, job 5 never ran."""
    sweep = tmp_path / "multirun" / "2026-11-24" / "23-00-00"
    write_multirun(sweep, ["kl=none,k2_as_loss", "seed=0,1,2", "trainer.steps=10", "logger=none"])
    num = 0
    for kl in KL_VALUES:
        for seed in (0, 1, 2):
            ov = [f"kl={kl}", f"seed={seed}", "trainer.steps=10", "logger=none"]
            job = sweep / f"{num}_kl={kl},seed={seed}"
            if num == 2:
                write_run(
                    job,
                    ov,
                    train_rows(3, kl__rkl_k1=100.0),
                    status="failed",
                    error="KlbenchError: non-finite metrics at step 4: loss/kl",
                )
            elif num == 4:
                write_run(job, ov, None, status=None)
            elif num < 5:
                write_run(job, ov, train_rows(10, kl__rkl_k1=0.1 * (seed + 1)))
            num += 1
    return sweep


def test_failed_and_missing_runs_are_listed_and_excluded(tmp_path, capsys):
    sweep = make_sweep_with_failures(tmp_path)
    out = tmp_path / "out"
    assert report.main([str(sweep), "--out", str(out)]) == 0
    rows = {r["variant"]: r for r in read_csv(out / "table.csv")}
    none, k2 = rows["kl=none"], rows["kl=k2_as_loss"]
    assert none["n"] == "2" and none["seeds"] == "0 1"
    assert float(none["kl/rkl_k1 mean"]) == pytest.approx(9.5 * 0.15)  # the failed run's 100·step left out
    assert k2["n"] == "1" and float(k2["kl/rkl_k1 mean"]) == pytest.approx(9.5 * 0.1)
    assert none["excluded"] == "2_kl=none,seed=2" and k2["excluded"] == "4_kl=k2_as_loss,seed=1"

    md = (out / "table.md").read_text()
    err = capsys.readouterr().err
    readme = (out / "README.md").read_text()
    assert "Not in the statistics (3):" in md
    for text in (md, err, readme):
        assert "2_kl=none,seed=2: failed: KlbenchError: non-finite metrics at step 4" in text
        assert "4_kl=k2_as_loss,seed=1: missing: no status.json" in text
        assert "#5 (kl=k2_as_loss,seed=2,trainer.steps=10,logger=none): missing: no job directory" in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == [
        "completed",
        "completed",
        "failed",
        "completed",
        "missing",
    ]
    assert manifest["missing_jobs"] == [
        {
            "name": "#5",
            "overrides": {"kl": "k2_as_loss", "seed": "2", "trainer.steps": "10", "logger": "none"},
        }
    ]
    assert manifest["sweeps"][0]["jobs_missing"] == 1 and manifest["sweeps"][0]["jobs_found"] == 5

    # --include-failed: the failed run's 3 steps join the statistics (window: its last step, 100·3)
    assert report.main([str(sweep), "--out", str(out), "--include-failed"]) == 0
    none = read_csv(out / "table.csv")[0]
    assert none["n"] == "3"
    assert float(none["kl/rkl_k1 mean"]) == pytest.approx((0.95 + 1.9 + 300.0) / 3)


# -- plots, manifest, README -----------------------------------------------------------------------------------
def test_plots_are_non_empty_pngs(tmp_path):
    sweep = make_sweep_with_failures(tmp_path)
    for job in sorted(sweep.glob("[03]_*")):  # two eval points per run: eval/* gets a figure too
        with (job / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": 5, "eval/arith/acc@1": 0.2}) + "\n")
            f.write(json.dumps({"step": 10, "eval/arith/acc@1": 0.3}) + "\n")
    out = tmp_path / "out"
    assert report.main([str(sweep), "--out", str(out), "--smooth", "3"]) == 0
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert pngs == ["overview.png", "plots/eval_arith_acc_1.png", "plots/kl_rkl_k1.png"]
    for name in pngs:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, name
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(pngs) <= set(manifest["files"]) and manifest["smooth"] == 3


def test_manifest_and_readme_describe_the_sweep(tmp_path):
    sweep = make_sweep(tmp_path)
    out = tmp_path / "out"
    assert report.main([str(sweep), "--out", str(out), "--window", "0.3"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    for key in (
        "created",
        "report_command",
        "sweeps",
        "git",
        "machine",
        "window",
        "swept_keys",
        "variants",
        "runs",
        "wall_s",
        "files",
        "missing_jobs",
    ):
        assert key in manifest, key
    cmd = "klbench run -m kl=none,k2_as_loss seed=0,1 trainer.steps=10 logger=none hydra/launcher=basic"
    assert manifest["sweeps"][0]["command"] == [cmd]
    assert manifest["sweeps"][0]["wall_clock_s"] == 60.0
    # absolute paths are written relative to the working directory: a manifest names no absolute path
    assert manifest["report_command"] == (f"klbench report {os.path.relpath(sweep)} --out {os.path.relpath(out)} "
                                          "--window 0.3")
    git = manifest["git"]
    assert set(git) >= {"commit", "dirty"}
    assert git["commit"] is None or (len(git["commit"]) == 40 and isinstance(git["dirty"], bool))
    machine = manifest["machine"]
    assert machine["cores"] >= 1 and machine["cpu"] and machine["os"] and machine["python"]
    assert isinstance(machine["gpus"], list)
    assert manifest["wall_s"]["total"] == pytest.approx(2 * (60 + 120))
    assert manifest["common_overrides"] == {"trainer.steps": "10", "logger": "none"}
    assert {f.name for f in out.iterdir()} >= {
        "table.md",
        "table.csv",
        "manifest.json",
        "README.md",
        "overview.png",
        "plots",
    }
    readme = (out / "README.md").read_text()
    assert cmd in readme and manifest["report_command"] in readme and "![overview](overview.png)" in readme
    assert "| kl=none | 2 |" in readme
    assert manifest["runs_commits"] == {"a" * 40: 4} and f"made at commit `{'a' * 40}` (4 runs)" in readme
    for text in (readme, (out / "manifest.json").read_text()):
        assert HOST not in text


def test_default_out_dir_is_named_after_the_sweep(tmp_path, monkeypatch):
    sweep = make_sweep(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert report.main([str(sweep)]) == 0
    assert (tmp_path / "results" / "2026-11-24_22-00-00" / "table.md").exists()


# -- other layouts and errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["empty", "junk"])
def test_no_runs_exits_2_with_one_line(tmp_path, capsys, layout):
    d = tmp_path / "nothing"
    d.mkdir()
    if layout == "junk":
        (d / "notes.txt").write_text("hi")
        (d / "sub").mkdir()
    assert report.main([str(d), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"klbench: error: no klbench runs under {d}: expected job dirs with metrics.jsonl "
        "(a `klbench run -m` sweep)"
    )
    assert not (tmp_path / "out").exists()


def test_cli_report_exits_2_on_an_empty_dir(tmp_path):
    from klbench.cli import main as cli_main

    with pytest.raises(SystemExit) as e:
        cli_main(["report", str(tmp_path)])
    assert e.value.code == 2


def test_a_single_run_dir(tmp_path):
    run = write_run(
        tmp_path / "outputs" / "2026-11-24" / "10-00-00",
        ["kl=k3_as_loss", "kl.coef=0.5", "seed=3"],
        train_rows(5, kl__rkl_k1=2.0, reward__acc=0.1),
    )
    out = tmp_path / "out"
    assert report.main([str(run), "--out", str(out)]) == 0
    (row,) = read_csv(out / "table.csv")
    assert row["variant"] == "kl=k3_as_loss,kl.coef=0.5" and row["n"] == "1" and row["seeds"] == "3"
    assert (
        float(row["kl/rkl_k1 mean"]) == pytest.approx(2.0 * 5) and row["kl/rkl_k1 std"] == ""
    )  # window: step 5
    assert "| kl=k3_as_loss,kl.coef=0.5 | 1 | 10.0 | 0.500 |" in (out / "table.md").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sweeps"][0]["command"] == ["klbench run kl=k3_as_loss kl.coef=0.5 seed=3"]
    assert (out / "overview.png").read_bytes()[:8] == PNG_MAGIC


def test_a_dir_of_single_runs_and_several_sweeps(tmp_path):
    outputs = tmp_path / "outputs"
    write_run(outputs / "2026-11-24" / "10-00-00", ["kl=none"], train_rows(5, kl__rkl_k1=1.0))
    write_run(outputs / "2026-11-24" / "11-00-00", ["kl=k3_as_loss"], train_rows(5, kl__rkl_k1=3.0))
    write_run(outputs / "2026-11-25" / "09-00-00", ["kl=none", "seed=1"], train_rows(5, kl__rkl_k1=2.0))
    out = tmp_path / "out"
    assert report.main([str(outputs), "--out", str(out)]) == 0
    rows = read_csv(out / "table.csv")
    # the seed=1 run has no kl override difference → it is a replicate of kl=none
    assert [(r["variant"], r["n"], float(r["kl/rkl_k1 mean"])) for r in rows] == [
        ("kl=none", "2", pytest.approx(7.5)),
        ("kl=k3_as_loss", "1", pytest.approx(15.0)),
    ]

    sweep = make_sweep(tmp_path / "a")
    other = tmp_path / "b" / "sweep2"
    write_multirun(other, ["kl=k3_as_loss", "seed=0", "trainer.steps=10", "logger=none"])
    write_run(
        other / "0_kl=k3_as_loss,seed=0",
        ["kl=k3_as_loss", "seed=0", "trainer.steps=10", "logger=none"],
        train_rows(10, kl__rkl_k1=1.0),
    )
    assert report.main([str(sweep), str(other), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [v["label"] for v in manifest["variants"]] == ["kl=none", "kl=k2_as_loss", "kl=k3_as_loss"]
    assert manifest["runs"][-1]["name"] == "sweep2/0_kl=k3_as_loss,seed=0"
    assert len(manifest["sweeps"]) == 2


def test_metrics_option_selects_columns_and_warns_on_unknown(tmp_path, capsys):
    sweep = make_sweep(tmp_path)
    out = tmp_path / "out"
    assert report.main([str(sweep), "--out", str(out), "--metrics", "rollout/*", "kl/nope"]) == 0
    header = (out / "table.md").read_text().splitlines()[0]
    assert "`rollout/entropy`" in header and "kl/rkl_k1" not in header
    assert "no run logged kl/nope" in capsys.readouterr().err
