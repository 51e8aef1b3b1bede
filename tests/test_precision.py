"""model.dtype=bfloat16 with the torch backend: float32 weights, half-precision forwards (autocast)."""

import torch

from klbench.config import ModelConfig, composer, to_config
from klbench.models import load_causal_lm, miniature_dir
from klbench.precision import LOGPROB_TOLERANCE, compute_context, logprob_tolerance
from klbench.records import read_jsonl
from klbench.train.run import run_experiment


def test_mixed_precision_keeps_float32_weights_and_computes_in_bfloat16(miniature_cache):
    path = str(miniature_dir(ModelConfig()))
    cfg = ModelConfig(dtype="bfloat16")
    mixed = load_causal_lm(path, cfg, torch.device("cpu"), trainable=True, autocast=True)
    plain = load_causal_lm(path, cfg, torch.device("cpu"), trainable=False)
    assert {p.dtype for p in mixed.parameters()} == {torch.float32}  # AdamW updates float32 master weights
    assert {p.dtype for p in plain.parameters()} == {torch.bfloat16}  # without autocast: weights in model.dtype
    ids = torch.tensor([[48, 55, 43, 51, 61]])
    with compute_context(mixed):
        assert mixed(input_ids=ids).logits.dtype == torch.bfloat16
    assert mixed(input_ids=ids).logits.dtype == torch.float32  # outside the context: float32 as loaded
    with compute_context(plain):  # a model not loaded for mixed precision: no autocast
        assert plain(input_ids=ids).logits.dtype == torch.bfloat16


def test_a_bfloat16_run_trains_float32_weights_and_samples_as_it_scores(miniature_cache, tmp_path):
    with composer() as compose:
        cfg = to_config(compose(["logger=none", "model.dtype=bfloat16", "algo.prompts_per_step=8", "algo.group_size=4",
                                 "rollout.max_new_tokens=8", "trainer.threads=1", "trainer.steps=3",
                                 "rollout.check_logprobs=true", "trainer.micro_batch_size=16"]))
    run_experiment(cfg, tmp_path / "run")
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl").rows
    assert [r["step"] for r in rows] == [1, 2, 3]
    # the HF engine decodes under the same autocast as the trainer scores: only bf16 round-off between them,
    # up to ~0.2 on one token (so the default stop is the half-precision one) and ~0.002 on average
    assert all(r["rollout/logprob_mismatch"] < 0.01 for r in rows), [r["rollout/logprob_mismatch"] for r in rows]
    assert abs(rows[0]["kl/rkl_k1"]) < 0.05  # pi_theta = pi_ref at step 1, up to that round-off
    assert rows[2]["kl/rkl_k1"] != rows[0]["kl/rkl_k1"]  # and the float32 weights did move
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}


def test_float32_is_untouched_by_autocast(miniature_cache):
    path = str(miniature_dir(ModelConfig()))
    model = load_causal_lm(path, ModelConfig(dtype="float32"), torch.device("cpu"), trainable=False, autocast=True)
    with compute_context(model):
        assert model(input_ids=torch.tensor([[48, 55]])).logits.dtype == torch.float32


def test_the_default_mismatch_stop_follows_the_precision_the_policy_computes_in(miniature_cache):
    path = str(miniature_dir(ModelConfig()))
    plain = load_causal_lm(path, ModelConfig(), torch.device("cpu"), trainable=False)
    mixed = load_causal_lm(path, ModelConfig(dtype="bfloat16"), torch.device("cpu"), trainable=True, autocast=True)
    half = load_causal_lm(path, ModelConfig(dtype="bfloat16"), torch.device("cpu"), trainable=False)
    assert logprob_tolerance(plain, None) == LOGPROB_TOLERANCE[torch.float32] == 0.05
    # float32 weights under bf16 autocast, and bf16 weights (DeepSpeed's), are judged as bf16
    assert logprob_tolerance(mixed, None) == logprob_tolerance(half, None) == LOGPROB_TOLERANCE[torch.bfloat16]
    assert LOGPROB_TOLERANCE[torch.bfloat16] > 0.2  # above the round-off measured on the miniature (max 0.18)
    assert logprob_tolerance(mixed, 1e-3) == 1e-3  # rollout.max_logprob_mismatch when given
