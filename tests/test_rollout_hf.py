"""The HF rollout engine: shapes, EOS, seeding, top-p, and behaviour log-probs equal to the trainer's."""

import pytest
import torch

from klbench.config import ModelConfig
from klbench.data import synthetic
from klbench.models import load_causal_lm, load_tokenizer
from klbench.rollout.base import SamplingParams
from klbench.rollout.hf import HFEngine, left_pad, sample_tokens, top_p_filter
from klbench.train.logprobs import token_logprobs, trim


@pytest.fixture(scope="module")
def engine_and_model(miniature_dir):
    tok = load_tokenizer(str(miniature_dir))
    model = load_causal_lm(str(miniature_dir), ModelConfig(), torch.device("cpu"), trainable=True)
    return HFEngine(model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id), model, tok


def prompts(tok, ragged: bool):
    qs = [ex.question for ex in synthetic.problems(0, 3, 6)]
    if ragged:  # different lengths force left padding and the masked path
        qs = [q if i % 2 else "  " * i + q for i, q in enumerate(qs)]
    return [tok.encode(q) for q in qs]


@pytest.mark.parametrize("ragged", [False, True])
def test_batch_shapes_eos_and_logprobs_match_trainer(engine_and_model, ragged):
    engine, model, tok = engine_and_model
    batch = engine.generate(prompts(tok, ragged), SamplingParams(n=4, max_new_tokens=12, temperature=0.8, seed=1))
    n = 24
    assert batch.prompt_ids.shape[0] == batch.response_ids.shape[0] == n
    assert batch.group.tolist() == [i for i in range(6) for _ in range(4)]
    mask = batch.response_mask
    lengths = mask.sum(1).long()
    for i in range(n):  # EOS is the last real token of every finished row, padding after it
        ids = batch.response_ids[i]
        ln = lengths[i].item()
        assert (ids[ln:] == tok.pad_token_id).all()
        assert (ids[: ln - 1] != tok.eos_token_id).all()
        assert ids[ln - 1] == tok.eos_token_id or ln == 12
    assert (batch.behaviour_logp[mask == 0] == 0).all() and (batch.behaviour_logp[mask > 0] < 0).all()
    with torch.no_grad():
        logp, _ = token_logprobs(model, trim(batch), temperature=0.8)
    diff = (logp - trim(batch).behaviour_logp).abs().max().item()
    assert diff < 1e-4, f"behaviour log-probs differ from the trainer's by {diff}"


def test_seeded_reproducible_and_seed_sensitive(engine_and_model):
    engine, _, tok = engine_and_model
    p = prompts(tok, False)
    a = engine.generate(p, SamplingParams(n=4, max_new_tokens=10, seed=7))
    b = engine.generate(p, SamplingParams(n=4, max_new_tokens=10, seed=7))
    c = engine.generate(p, SamplingParams(n=4, max_new_tokens=10, seed=8))
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.behaviour_logp, b.behaviour_logp)
    assert not torch.equal(a.response_ids, c.response_ids)


def test_top_p_filter_hand_values():
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    out = top_p_filter(logp, 0.8).exp()  # {0.5, 0.3} reach 0.8: renormalised to 0.625 / 0.375
    torch.testing.assert_close(out, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    assert top_p_filter(logp, 1.0) is logp
    out = top_p_filter(logp, 0.4).exp()  # the top token alone reaches 0.4
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_top_p_sampling_never_leaves_the_nucleus(engine_and_model):
    engine, model, tok = engine_and_model
    batch = engine.generate(prompts(tok, False), SamplingParams(n=8, max_new_tokens=6, top_p=0.5, seed=3))
    # with top-p the behaviour log-probs are of the truncated distribution: >= the full model's
    with torch.no_grad():
        full, _ = token_logprobs(model, trim(batch))
    m = trim(batch).response_mask > 0
    assert (trim(batch).behaviour_logp[m] >= full[m] - 1e-5).all()


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_inverse_cdf_sampling_matches_the_distribution():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05])
    n = 200_000
    u = 1.0 - torch.rand((n, 1), generator=torch.Generator().manual_seed(0))
    tok = sample_tokens(probs.log().expand(n, -1), u).squeeze(-1)
    freq = torch.bincount(tok, minlength=5).double() / n
    assert freq[1] == 0.0  # a zero-probability token is never drawn
    sigma = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert ((freq - probs.double()).abs() <= 4 * sigma + 1e-12).all(), freq


@pytest.mark.parametrize("ragged", [False, True])
def test_shared_prompt_forward_equals_one_forward_per_row(engine_and_model, ragged):
    """token_logprobs runs each distinct prompt once and the responses on its indexed KV cache; the
    log-probs, entropies and parameter gradients must equal a plain forward over every full row,
    also on a shuffled mini-batch where a prompt's samples are scattered."""
    from klbench.train import logprobs as lp

    engine, model, tok = engine_and_model
    batch = trim(engine.generate(prompts(tok, ragged), SamplingParams(n=4, max_new_tokens=12, seed=3)))
    mini = trim(batch.select(torch.randperm(batch.num_samples, generator=torch.Generator().manual_seed(0))[:10]))
    for b in (batch, mini):
        _, inverse = torch.unique(b.group, return_inverse=True)
        pieces = lp._shared_prompt_logits(model, b, inverse, torch.device("cpu"))
        shared = lp.rows_in_order(pieces, [logits for _, logits in pieces], b.response_ids.shape[1])
        g_shared = torch.autograd.grad((shared.float().logsumexp(-1) * b.response_mask).sum(), list(model.parameters()))
        full = lp._full_logits(model, b, torch.device("cpu"))
        g_full = torch.autograd.grad((full.float().logsumexp(-1) * b.response_mask).sum(), list(model.parameters()))
        m = b.response_mask.bool()
        assert shared.shape == full.shape
        torch.testing.assert_close(shared[m], full[m], atol=2e-5, rtol=1e-5)
        for a, c in zip(g_shared, g_full):
            torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)
    # the public function (shared path for grouped rows) gives the full forward's log-probs
    logp, _ = token_logprobs(model, mini)
    full = lp._full_logits(model, mini, torch.device("cpu")).float()
    expect = (full.gather(-1, mini.response_ids.unsqueeze(-1)).squeeze(-1) - full.logsumexp(-1)) * mini.response_mask
    torch.testing.assert_close(logp, expect, atol=2e-5, rtol=1e-5)


def test_length_buckets_split_only_when_padding_is_worth_a_forward(monkeypatch):
    from klbench.train import logprobs as lp

    monkeypatch.setattr(lp, "MIN_BUCKET_SAVING", 0.1)
    assert [b.tolist() for b in lp.length_buckets(torch.tensor([5, 5, 5, 5]))] == [[0, 1, 2, 3]]
    assert [b.tolist() for b in lp.length_buckets(torch.tensor([7]))] == [[0]]
    # 6 short rows and 2 long ones: 6x3 + 2x12 = 42 positions instead of 8x12 = 96
    buckets = lp.length_buckets(torch.tensor([3, 12, 2, 3, 12, 1, 3, 3]))
    assert [sorted(b.tolist()) for b in buckets] == [[0, 2, 3, 5, 6, 7], [1, 4]]
    # 200 positions at one bucket: one row of 1 saves 9 (< 10%: one bucket), four rows of 4 save 24
    lengths = torch.full((20,), 10)
    lengths[0] = 1
    assert len(lp.length_buckets(lengths)) == 1
    lengths[:4] = 4
    assert [sorted(b.tolist()) for b in lp.length_buckets(lengths)] == [[0, 1, 2, 3], list(range(4, 20))]


@pytest.mark.parametrize("ragged", [False, True])
def test_length_buckets_give_the_one_bucket_logprobs_and_gradients(engine_and_model, ragged, monkeypatch):
    """Running short and long responses apart changes only which padding is computed: log-probs,
    entropies and gradients equal the one-bucket forward's up to float rounding (other matmul shapes)."""
    from klbench.train import logprobs as lp

    engine, model, tok = engine_and_model
    batch = trim(engine.generate(prompts(tok, ragged), SamplingParams(n=4, max_new_tokens=12, seed=3)))
    lengths = batch.response_mask.sum(1).long()
    cut = lengths.clone()
    cut[::3] = torch.clamp(lengths[::3] // 3, min=1)  # a third of the rows much shorter: a split pays
    mask = (torch.arange(batch.response_ids.shape[1]) < cut[:, None]).to(batch.response_mask.dtype)
    short = trim(type(batch)(batch.prompt_ids, batch.prompt_mask, batch.response_ids, mask, batch.behaviour_logp,
                             batch.group))
    assert len(lp.length_buckets(short.response_mask.sum(1).long())) == 2

    def run():
        logp, ent = token_logprobs(model, short, with_entropy=True)
        grads = torch.autograd.grad(logp.sum(), list(model.parameters()))
        return logp.detach(), ent, grads

    split = run()
    monkeypatch.setattr(lp, "MIN_BUCKET_SAVING", 1.0)  # never split
    assert len(lp.length_buckets(short.response_mask.sum(1).long())) == 1
    whole = run()
    torch.testing.assert_close(split[0], whole[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split[1], whole[1], atol=1e-5, rtol=1e-5)
    assert (split[0][short.response_mask == 0] == 0).all()
    for a, c in zip(split[2], whole[2]):
        torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)
