"""trainer.micro_batch_size: forwards and backwards in pieces, gradients accumulated over the mini-batch.

The update must be the one the whole mini-batch gives (each piece carries its share of the loss, by tokens
for token means, by sequences for the per-sequence aggregations), so the runs agree to float round-off.
"""

import pytest

from klbench.config import ConfigError, composer, to_config
from klbench.records import read_jsonl
from klbench.train.run import run_experiment

BASE = ["logger=none", "algo.prompts_per_step=8", "algo.group_size=4", "rollout.max_new_tokens=8",
        "trainer.threads=1", "trainer.steps=2", "trainer.samples_per_log=0"]


def train(tmp_path, name, *overrides):
    with composer() as compose:
        cfg = to_config(compose([*BASE, *overrides]))
    run_experiment(cfg, tmp_path / name)
    return read_jsonl(tmp_path / name / "metrics.jsonl").rows


@pytest.mark.parametrize("setting", [
    ["algo.loss_agg=seq_mean_token_mean", "kl=k2_as_loss"],
    ["algo.loss_agg=token_mean", "kl=k3_as_loss", "algo.mini_batch_size=16"],
    ["algo.loss_agg=seq_mean_token_sum", "kl=k2_as_loss", "kl.level=sequence"],
])
def test_micro_batches_give_the_whole_batch_update(setting, miniature_cache, tmp_path):
    """Step 1's losses and accumulated gradient norm, and step 2's (after one update, with the KL term now
    pulling), agree. Only to round-off: AdamW's first step is sign(g) * lr, so parameters whose gradient is
    float noise move differently; their effect on the metrics is of that noise's order."""
    whole = train(tmp_path, "whole", *setting)
    parts = train(tmp_path, "parts", *setting, "trainer.micro_batch_size=5")  # uneven pieces: 5+5+...+2 (or +1)
    assert len(whole) == len(parts) == 2
    for a, b in zip(whole, parts):
        for key in a:
            if not key.startswith("perf/"):
                assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), (key, a["step"])
    assert parts[1]["loss/kl"] != 0 and all(r["perf/peak_rss_gib"] > 0.05 for r in parts)


def test_micro_batch_size_is_checked_at_config_time():
    with composer() as compose:
        with pytest.raises(ConfigError, match="accumulates gradients with trainer.backend=torch only"):
            to_config(compose(["trainer=deepspeed", "trainer.micro_batch_size=8"]))
        with pytest.raises(ConfigError, match="must be >= 1"):
            to_config(compose(["trainer.micro_batch_size=0"]))
