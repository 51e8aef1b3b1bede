"""klbench.theory: the paper's claims, checked by exact enumeration through klbench.kl."""

from __future__ import annotations

import json

import pytest
import torch

from klbench import kl, theory

DRIFTS = (0.25, 1.0)


@pytest.fixture(scope="module")
def rows() -> dict[tuple[str, float], theory.Row]:
    out = theory.run_verification(vocab=3, steps=3, drifts=DRIFTS, seed=0, samples=0)
    assert len(out) == len(theory.VARIANTS) * len(DRIFTS)
    return {(r.key, r.drift): r for r in out}


def _keys(claim: str) -> list[str]:
    return [v.key for v in theory.VARIANTS if v.claim == claim]


EXACT_RKL = {
    "k1_reward_seq",
    "k1_reward_tok_rtg",
    "k2_loss_seq",
    "k3_both_seq",
    "k3_both_tok_sum",
    "k2_loss_tok_k1_future",
    "sg_ratio_k2_seq",
    "ratio_k3_seq",
    "ratio_k1_seq",
    "k1_reward_seq_is",
}
BIASED = {
    "k1_reward_tok_nortg",
    "k2_loss_tok",
    "k3_loss_tok",
    "k3_both_tok_mean",
    "k2_loss_seq_offpolicy",
    "ratio_k2_seq",
    "sg_ratio_k2_tok",
    "ratio_k3_tok",
}


def test_variant_registry_states_the_papers_claims():
    # the claims below are docs/theory.md's; the registry must not quietly relabel them
    assert set(_keys("rkl")) >= EXACT_RKL
    assert set(_keys("biased")) >= BIASED
    assert {"k3_loss_seq", "sg_ratio_k3_seq"} <= set(_keys("fkl"))
    assert {"k1_loss_seq", "k1_loss_tok"} == set(_keys("zero"))
    assert len({v.key for v in theory.VARIANTS}) == len(theory.VARIANTS)


@pytest.mark.parametrize("key", sorted(EXACT_RKL))
def test_exact_rkl_variants(rows, key):
    for drift in DRIFTS:
        r = rows[key, drift]
        assert r.err_rkl < 1e-9 and r.scale_rkl == pytest.approx(1, abs=1e-9), (key, drift, r.err_rkl)
        assert r.cos_rkl == pytest.approx(1, abs=1e-12)
        assert r.holds


def test_k3_in_both_with_token_mean_for_both_parts_is_rkl_scaled_by_one_over_length(rows):
    for drift in DRIFTS:
        r = rows["k3_both_tok_mean_both", drift]
        assert r.err_rkl < 1e-9 and r.scale_rkl == pytest.approx(3, rel=1e-9)  # T = 3 tokens


def test_sequence_k3_as_loss_is_the_forward_kl_gradient(rows):
    for drift in DRIFTS:
        r = rows["k3_loss_seq", drift]
        assert r.err_fkl < 1e-9 and r.err_rkl > 0.05
        assert r.norm == pytest.approx(r.norm_fkl, rel=1e-9)


def test_k1_as_loss_is_a_zero_vector(rows):
    for key in ("k1_loss_seq", "k1_loss_tok"):
        for drift in DRIFTS:
            r = rows[key, drift]
            assert r.zero_vector and r.norm < 1e-14 and r.err_rkl is None
            assert r.norm_rkl > 0.1  # there was something to regularise
            assert r.variance > 1  # but the term still injects noise


@pytest.mark.parametrize("key", sorted(BIASED))
def test_biased_variants(rows, key):
    for drift in DRIFTS:
        assert rows[key, drift].err_rkl > 1e-2, (key, drift)


def test_token_level_error_grows_with_drift():
    keys = {"k2_loss_tok", "k3_loss_tok"}
    variants = [v for v in theory.VARIANTS if v.key in keys]
    drifts = (0.01, 0.02, 0.1, 0.25, 0.5, 1.0)
    out = theory.run_verification(vocab=3, steps=4, drifts=drifts, seed=0, variants=variants)
    for key in keys:
        errs = [r.err_rkl for r in out if r.key == key]
        assert all(a < b for a, b in zip(errs, errs[1:])), (key, errs)
        # the dropped future-token terms are one order higher in the drift: error ∝ drift when small
        assert errs[1] / errs[0] == pytest.approx(2, rel=0.05), (key, errs)


def test_off_policy_without_weight_is_biased_and_exact_once_weighted(rows):
    for drift in DRIFTS:
        assert rows["k2_loss_seq_offpolicy", drift].err_rkl > 0.1
        assert rows["sg_ratio_k2_seq", drift].err_rkl < 1e-9
        assert rows["ratio_k2_seq", drift].err_rkl > 1e-2
        assert rows["ratio_k3_seq", drift].err_rkl < 1e-9


def test_every_claim_holds(rows):
    assert [k for k, r in rows.items() if not r.holds] == []


def test_reference_gradients_match_finite_differences():
    tab = theory.Tabular.build(3, 2)
    theta, theta_ref, _ = theory.make_policies(tab, drift=0.7, behaviour_shift=0.5, seed=3)
    g_rkl, g_fkl = theory.exact_kl_gradients(theta, theta_ref, tab)

    def kls(th):
        lp = theory.token_logp(th, tab.seqs, tab.prefix).sum(-1)
        lr = theory.token_logp(theta_ref, tab.seqs, tab.prefix).sum(-1)
        return (lp.exp() * (lp - lr)).sum(), (lr.exp() * (lr - lp)).sum()

    h = 1e-6
    for idx in [(0, 0), (0, 2), (1, 1), (3, 0)]:
        e = torch.zeros_like(theta)
        e[idx] = h
        (rp, fp), (rm, fm) = kls(theta + e), kls(theta - e)
        assert float((rp - rm) / (2 * h)) == pytest.approx(float(g_rkl[idx]), abs=1e-8)
        assert float((fp - fm) / (2 * h)) == pytest.approx(float(g_fkl[idx]), abs=1e-8)


def test_tabular_prefix_rows_are_shared_by_equal_prefixes():
    tab = theory.Tabular.build(3, 3)
    assert tab.seqs.shape == (27, 3) and tab.n_prefixes == 1 + 3 + 9
    for n in range(27):
        for m in range(27):
            for t in range(3):
                same = torch.equal(tab.seqs[n, :t], tab.seqs[m, :t])
                assert (tab.prefix[n, t] == tab.prefix[m, t]) == same


def test_per_sample_gradients_match_batched_autograd():
    """vmap per-sample gradients average to the gradient of one kl_loss call on the whole batch."""
    tab = theory.Tabular.build(3, 3)
    theta, theta_ref, theta_mu = theory.make_policies(tab, drift=0.8, behaviour_shift=0.5, seed=1)
    by_key = {v.key: v for v in theory.VARIANTS}
    for key, kw in [
        ("k3_loss_tok", dict(estimator="k3", level="token", agg="seq_mean_token_sum")),
        ("ratio_k2_seq", dict(estimator="k2", level="sequence", off_policy="ratio", agg="seq_mean_token_sum")),
    ]:
        per_sample = theory.per_sample_gradients(by_key[key], theta, theta_ref, theta_mu, tab)  # [N, P, V]
        th = theta.clone().requires_grad_(True)
        logp = theory.token_logp(th, tab.seqs, tab.prefix)
        ref = theory.token_logp(theta_ref, tab.seqs, tab.prefix)
        beh = theory.token_logp(theta_mu, tab.seqs, tab.prefix)
        loss = kl.kl_loss(logp, ref, torch.ones_like(logp), behaviour_logp=beh, log_ratio_clamp=None, **kw)
        (g,) = torch.autograd.grad(loss, th)
        torch.testing.assert_close(per_sample.mean(0), g, rtol=1e-12, atol=1e-14)


def test_verifier_uses_klbench_kl(monkeypatch):
    """Break kl_loss's off-policy correction and kl_in_reward's reward-to-go: the verifier must notice."""
    real_loss, real_reward = kl.kl_loss, kl.kl_in_reward

    def loss_without_correction(*args, **kwargs):
        return real_loss(*args, **{**kwargs, "off_policy": "none", "ratio_clip": None})

    def reward_without_to_go(*args, **kwargs):
        kwargs = {**kwargs, "reward_to_go": False, "include_current": True}
        return real_reward(*args, **kwargs)

    monkeypatch.setattr(kl, "kl_loss", loss_without_correction)
    monkeypatch.setattr(kl, "kl_in_reward", reward_without_to_go)
    keys = {"sg_ratio_k2_seq", "k1_reward_tok_rtg", "k2_loss_seq"}
    out = theory.run_verification(3, 3, (0.5,), variants=[v for v in theory.VARIANTS if v.key in keys])
    holds = {r.key: r.holds for r in out}
    assert holds == {"sg_ratio_k2_seq": False, "k1_reward_tok_rtg": False, "k2_loss_seq": True}


def test_monte_carlo_agrees_with_exact_variance():
    variants = [v for v in theory.VARIANTS if v.key in {"k2_loss_seq", "k1_loss_seq", "k3_loss_tok"}]
    out = theory.run_verification(3, 3, (0.5,), samples=20000, variants=variants)
    for r in out:
        assert r.mc_samples == 20000
        assert r.mc_variance == pytest.approx(r.variance, rel=0.1), r.key
        bias2 = 0.0 if r.claim == "rkl" else (1.0 if r.zero_vector else None)
        if bias2 is not None:
            assert r.mc_expected_rel_mse == pytest.approx(bias2 + r.variance / 20000, rel=1e-9)
    by_key = {r.key: r for r in out}
    assert by_key["k1_loss_seq"].mc_rel_mse == pytest.approx(1, abs=0.05)  # all bias: E ĝ = 0
    assert by_key["k2_loss_seq"].mc_rel_mse < 5 * by_key["k2_loss_seq"].mc_expected_rel_mse  # all variance


def test_main_writes_reports(tmp_path, capsys):
    argv = ["--vocab", "3", "--steps", "3", "--drifts", "0.5", "1", "--samples", "50", "--out", str(tmp_path)]
    argv += ["--json", str(tmp_path / "extra" / "rows.json")]
    assert theory.main(argv) == 0
    printed = capsys.readouterr().out
    assert "k2 as loss, sequence" in printed and "rows bear out their claim" in printed
    md = (tmp_path / "theory.md").read_text()
    assert md.startswith("# Exact gradients") and "Command: `klbench verify --vocab 3 --steps 3" in md
    assert f"torch {torch.__version__}" in md and "**NO**" not in md
    data = json.loads((tmp_path / "theory.json").read_text())
    assert data == json.loads((tmp_path / "extra" / "rows.json").read_text())
    assert len(data["rows"]) == 2 * len(theory.VARIANTS) and data["config"]["drifts"] == [0.5, 1.0]
    assert all(r["holds"] for r in data["rows"])


def test_main_exits_nonzero_when_a_claim_fails(monkeypatch, tmp_path):
    real_loss = kl.kl_loss
    monkeypatch.setattr(kl, "kl_loss", lambda *a, **k: real_loss(*a, **{**k, "level": "token"}))
    assert theory.main(["--vocab", "2", "--steps", "2", "--drifts", "0.5", "--samples", "0"]) == 1
