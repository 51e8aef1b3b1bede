"""`model.attn_implementation=auto`: klbench's small-sequence CPU attention gives SDPA's numbers."""

import pytest
import torch

from klbench import attention
from klbench.config import ConfigError, ModelConfig
from klbench.data import synthetic
from klbench.errors import KlbenchError
from klbench.models import load_causal_lm, load_tokenizer
from klbench.rollout.base import SamplingParams
from klbench.rollout.hf import HFEngine
from klbench.train.logprobs import token_logprobs, trim


def test_matmul_attention_equals_sdpa_with_masks_and_gqa():
    import torch.nn.functional as F

    torch.manual_seed(0)
    q = torch.randn(3, 4, 5, 8)
    k, v = torch.randn(3, 4, 9, 8), torch.randn(3, 4, 9, 8)
    scale = 8 ** -0.5
    causal = torch.ones(5, 9, dtype=torch.bool).tril(4)  # bottom-right aligned: a KV cache of 4
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=scale).transpose(1, 2)
    torch.testing.assert_close(attention.matmul_attention(q, k, v, None, scale), want)
    mask = causal[None, None].repeat(3, 1, 1, 1)
    mask[1, :, :, :2] = False  # a left-padded row
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)
    torch.testing.assert_close(attention.matmul_attention(q, k, v, mask, scale), want)
    # a query with nothing to attend to gets a finite output (SDPA's would be NaN), never read
    mask[2, :, 0, :] = False
    assert attention.matmul_attention(q, k, v, mask, scale).isfinite().all()
    # grouped-query attention: 4 query heads over 2 key/value heads, through the registered function
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    kv2, vv2 = k[:, :2], v[:, :2]
    out, _ = attention.auto_attention(module, q, kv2, vv2, causal[None, None], scaling=scale)
    want = F.scaled_dot_product_attention(q, kv2.repeat_interleave(2, 1), vv2.repeat_interleave(2, 1),
                                          attn_mask=causal, scale=scale).transpose(1, 2)
    torch.testing.assert_close(out, want)


def test_only_small_multi_token_cpu_problems_take_the_matmul_path():
    q, k = torch.zeros(1, 1, 16, 4), torch.zeros(1, 1, 64, 4)
    assert attention.small_attention_applies(q, k[:, :, :64], 0.0)  # 16 x 64 = 1024
    assert not attention.small_attention_applies(q, torch.zeros(1, 1, 65, 4), 0.0)  # too long: SDPA
    assert not attention.small_attention_applies(q[:, :, :1], k, 0.0)  # one decoding query: SDPA
    assert not attention.small_attention_applies(q, k, 0.1)  # attention dropout: SDPA
    assert not attention.small_attention_applies(q.to("meta"), k.to("meta"), 0.0)  # not CPU: SDPA


@pytest.fixture(scope="module")
def models(miniature_dir):
    cpu = torch.device("cpu")
    auto = load_causal_lm(str(miniature_dir), ModelConfig(), cpu, trainable=True)
    sdpa = load_causal_lm(str(miniature_dir), ModelConfig(attn_implementation="sdpa"), cpu, trainable=True)
    return auto, sdpa, load_tokenizer(str(miniature_dir))


def test_auto_is_the_default_and_matches_sdpa_on_rollouts_logprobs_and_gradients(models):
    auto, sdpa, tok = models
    assert ModelConfig().attn_implementation == "auto"
    assert auto.config._attn_implementation == attention.AUTO_NAME
    assert sdpa.config._attn_implementation == "sdpa"
    qs = [ex.question for ex in synthetic.problems(0, 2, 6)]
    prompts = [tok.encode("  " * (i % 3) + q) for i, q in enumerate(qs)]  # ragged: left padding
    params = SamplingParams(n=4, max_new_tokens=16, temperature=1.0, seed=3)
    out = {}
    for name, model in (("auto", auto), ("sdpa", sdpa)):
        engine = HFEngine(model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
        batch = trim(engine.generate(prompts, params))
        assert not bool(batch.prompt_mask.all())
        logp, ent = token_logprobs(model, batch, with_entropy=True)
        (logp.sum() + ent.sum()).backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        model.zero_grad(set_to_none=True)
        out[name] = (batch, logp.detach(), ent, grad)
    (b1, lp1, e1, g1), (b2, lp2, e2, g2) = out["auto"], out["sdpa"]
    assert torch.equal(b1.response_ids, b2.response_ids)
    torch.testing.assert_close(lp1, lp2, atol=1e-4, rtol=0)
    torch.testing.assert_close(lp1, b1.behaviour_logp * b1.response_mask, atol=1e-4, rtol=0)
    torch.testing.assert_close(e1, e2, atol=1e-4, rtol=0)
    assert (g1 - g2).abs().max() <= 1e-4 * g2.abs().max()


def test_a_saved_model_does_not_carry_klbench_attention(models, tmp_path):
    auto, _, _ = models
    auto.save_pretrained(tmp_path)
    assert attention.AUTO_NAME not in (tmp_path / "config.json").read_text()


def test_bad_attention_settings_fail_in_one_line(miniature_dir):
    with pytest.raises(ConfigError, match="model.attn_implementation"):
        ModelConfig(attn_implementation="")
    with pytest.raises(KlbenchError, match="model.attn_implementation='no_such_kernel' is not available"):
        load_causal_lm(str(miniature_dir), ModelConfig(attn_implementation="no_such_kernel"), torch.device("cpu"),
                       trainable=False)
