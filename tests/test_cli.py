"""The `klbench` command end to end on the miniature: smoke, files, determinism, help."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file


def read_metrics(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


FAST = ["logger=none", "algo.prompts_per_step=8", "algo.group_size=4"]


def test_help_lists_subcommands(run_cli):
    out = run_cli("--help").stdout
    for cmd in ("run", "eval", "verify", "report", "bench"):
        assert f"  {cmd} " in out


@pytest.mark.parametrize("user", [{}, {"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "7"}])
def test_openmp_spins_briefly_unless_the_user_chose(monkeypatch, capsys, user):
    from klbench import cli

    for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in user.items():
        monkeypatch.setenv(k, v)
    cli.main(["--help"])
    expected = user.get("GOMP_SPINCOUNT") if user else str(cli.OPENMP_SPIN_COUNT)
    assert os.environ.get("GOMP_SPINCOUNT") == expected
    assert os.environ.get("OMP_WAIT_POLICY") == user.get("OMP_WAIT_POLICY")


def test_cfg_job_prints_composed_config(run_cli):
    out = run_cli("run", "kl=k3_as_loss", "kl.coef=0.5", "--cfg", "job").stdout
    assert "estimator: k3" in out and "coef: 0.5" in out and "group_size: 8" in out


def test_smoke_run_trains_and_writes(run_cli, miniature_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_cli("run", "trainer.steps=3", *FAST, f"hydra.run.dir={run_dir}")
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("kl/rkl_k1", "kl/rkl_k3", "reward/mean", "reward/acc", "rollout/response_len",
                "rollout/entropy", "loss/pg", "loss/kl", "loss/total", "off/ratio_mean", "perf/step_s"):
        assert key in rows[0], key
    for name in ("config.yaml", "summary.json", "samples.jsonl", "status.json", "final/model.safetensors"):
        assert (run_dir / name).stat().st_size > 0, name
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    before = load_file(miniature_dir / "model.safetensors")
    after = load_file(run_dir / "final" / "model.safetensors")
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(moved) >= len(before) // 2, "the policy's parameters did not change"
    # KL to π_ref starts at 0 (policy = π_ref) and is non-zero once the policy has moved
    assert abs(rows[0]["kl/rkl_k1"]) < 1e-4 and rows[-1]["kl/rkl_k1"] != 0.0


def test_same_seed_same_metrics(run_cli, miniature_dir, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    args = ["trainer.steps=3", *FAST, "kl=k3_as_loss"]
    run_cli("run", *args, f"hydra.run.dir={a}")
    run_cli("run", *args, f"hydra.run.dir={b}")
    run_cli("run", *args, "seed=1", f"hydra.run.dir={c}")

    def strip(rows):
        return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]

    assert strip(read_metrics(a)) == strip(read_metrics(b))
    assert strip(read_metrics(a)) != strip(read_metrics(c))


@pytest.mark.slow
def test_default_run_learns(run_cli, miniature_dir, tmp_path):
    """`klbench run` with no overrides (W&B offline): the policy learns and drifts from π_ref."""
    run_dir = tmp_path / "default"
    run_cli("run", f"hydra.run.dir={run_dir}", env={"WANDB_MODE": "offline"}, timeout=900)
    rows = read_metrics(run_dir)
    assert len(rows) == 200
    def window(key, part):
        return sum(r[key] for r in part) / len(part)

    # The run optimises reward/mean (accuracy + the trait bonus): 0.43 -> 0.83 over the first and last 20
    # steps on an Intel Xeon; accuracy alone 0.405 -> 0.496 there (more on an AMD EPYC: CPUs round
    # differently, and one seed's trajectory follows).
    assert window("reward/mean", rows[-20:]) > window("reward/mean", rows[:20]) + 0.2
    assert window("reward/acc", rows[-20:]) > window("reward/acc", rows[:20]) + 0.05
    assert window("kl/rkl_k1", rows[-20:]) > 0.1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 200 and "kl/rkl_k1" in summary["window"]
    assert list((run_dir / "wandb").glob("offline-run-*")), "no W&B offline run was written"
