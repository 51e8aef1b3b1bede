"""model.compile: the decoder through torch.compile gives the eager model's log-probs, gradients and samples."""

import copy

import pytest
import torch

from klbench.config import ModelConfig
from klbench.errors import KlbenchError
from klbench.models import load_causal_lm, load_tokenizer, miniature_dir
from klbench.rollout.base import SamplingParams
from klbench.rollout.hf import HFEngine
from klbench.train.logprobs import token_logprobs

CPU = torch.device("cpu")


def _sample(model, tok):
    engine = HFEngine(model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    prompts = [tok.encode(f"{a}+{b}*{a}=") for a in range(2) for b in (3, 12)]  # two prompt lengths: left padding
    return engine.generate(prompts, SamplingParams(n=4, max_new_tokens=10, temperature=1.0, top_p=1.0,
                                                   prompt_seeds=(1, 2, 3, 4)))


def _logp_and_grads(model, batch):
    model.zero_grad()
    logp, _ = token_logprobs(model, batch)
    logp.sum().backward()
    return logp.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.slow
def test_compiled_model_scores_trains_and_samples_as_the_eager_one(miniature_cache):
    path = str(miniature_dir(ModelConfig()))
    tok = load_tokenizer(path)
    eager = load_causal_lm(path, ModelConfig(), CPU, trainable=True)
    compiled = load_causal_lm(path, ModelConfig(compile=True), CPU, trainable=True)
    batch = _sample(eager, tok)
    again = _sample(compiled, tok)
    assert torch.equal(again.response_ids, batch.response_ids)
    assert torch.allclose(again.behaviour_logp, batch.behaviour_logp, atol=1e-5)
    logp0, grads0 = _logp_and_grads(eager, batch)
    logp1, grads1 = _logp_and_grads(compiled, batch)
    assert (logp1 - logp0).abs().max() < 1e-5
    for g0, g1 in zip(grads0, grads1):
        assert (g1 - g0).abs().max() <= 1e-5 * g0.abs().max()
    # a deep copy (the stale sampler) runs its own weights through the shared compiled graph
    stale = copy.deepcopy(compiled)
    with torch.no_grad():
        stale.get_decoder().norm.weight.mul_(2.0)
        assert not torch.allclose(token_logprobs(stale, batch)[0], logp1, atol=1e-3)
        assert torch.allclose(token_logprobs(compiled, batch)[0], logp1, atol=1e-6)


def test_compile_without_a_cpp_compiler_says_what_to_install(miniature_cache, monkeypatch):
    import torch._inductor.cpp_builder as builder

    def missing():
        raise RuntimeError("no working C++ compiler found")

    monkeypatch.setattr(builder, "get_cpp_compiler", missing)
    with pytest.raises(KlbenchError, match="needs a C.. compiler .*set model.compile=false"):
        load_causal_lm(str(miniature_dir(ModelConfig())), ModelConfig(compile=True), CPU, trainable=False)


def test_compile_needs_a_decoder():
    from klbench.models import compile_decoder

    with pytest.raises(KlbenchError, match="has no decoder to compile"):
        compile_decoder(torch.nn.Linear(2, 2), CPU)
