"""klbench.kl: hand-computed values, gradients against the equivalent coefficients, numerics, spec, controllers."""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from klbench import kl
from klbench.cli import one_line
from klbench.config import ConfigError, KLConfig, LossAgg, to_config

DT = torch.float64


def _lp(*probs: float) -> torch.Tensor:
    return torch.tensor([list(map(math.log, probs))], dtype=DT)  # [1, T]


# ------------------------------------------------------------------ estimator values


def test_estimator_values_by_hand():
    logp, ref = _lp(0.5, 0.25, 0.2), _lp(0.25, 0.5, 0.2)  # u = log 2, -log 2, 0
    ln2 = math.log(2)
    expected = {
        "k1": [ln2, -ln2, 0.0],
        "k2": [ln2**2 / 2, ln2**2 / 2, 0.0],
        "k3": [0.5 - 1 + ln2, 2 - 1 - ln2, 0.0],  # δ − 1 − log δ with δ = π_ref/π_θ
    }
    for kind, values in expected.items():
        out = kl.estimate(kind, logp, ref)
        assert out.shape == logp.shape  # [B, T]
        torch.testing.assert_close(out, torch.tensor([values], dtype=DT), rtol=0, atol=1e-15)


def test_k3_is_non_negative_and_k1_can_be_negative():
    u = torch.linspace(-5, 5, 101, dtype=DT)
    assert (kl.estimate("k3", u, torch.zeros_like(u)) >= 0).all()
    assert (kl.estimate("k1", u, torch.zeros_like(u)) < 0).any()


def test_unknown_estimator_lists_valid_ones():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl.estimate("k4", x, x)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl.kl_loss(x, x, torch.ones_like(x), estimator="mse")
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl.equivalent_coefficient("kl", x)


def test_equivalent_coefficient_values():
    u = torch.tensor([-1.0, 0.0, 2.0], dtype=DT)
    torch.testing.assert_close(kl.equivalent_coefficient("k1", u), torch.ones_like(u))
    torch.testing.assert_close(kl.equivalent_coefficient("k2", u), u)
    torch.testing.assert_close(kl.equivalent_coefficient("k3", u), 1 - torch.exp(-u))


# ------------------------------------------------------------------ kl_loss gradients


def _batch(seed: int = 0, b: int = 3, t: int = 5):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=gen, dtype=DT) * 3  # [B, T]
    ref = -torch.rand(b, t, generator=gen, dtype=DT) * 3  # [B, T]
    beh = -torch.rand(b, t, generator=gen, dtype=DT) * 3  # [B, T]
    mask = torch.ones(b, t, dtype=DT)
    mask[0, 3:] = 0  # a shorter response
    mask[2, :1] = 0  # a prompt token
    return logp, ref, beh, mask


def _grad(fn, logp):
    logp = logp.clone().requires_grad_(True)
    out = fn(logp)
    assert out.shape == ()
    (g,) = torch.autograd.grad(out, logp)
    return out, g


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_token_loss_gradient_is_equivalent_coefficient(estimator):
    logp, ref, _, mask = _batch()
    _, g = _grad(lambda lp: kl.kl_loss(lp, ref, mask, estimator=estimator, agg="seq_mean_token_sum"), logp)
    coef = kl.equivalent_coefficient(estimator, logp - ref)  # [B, T]
    torch.testing.assert_close(g, coef * mask / logp.shape[0])


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("agg", ["seq_mean_token_sum", "seq_mean_token_mean", "token_mean"])
def test_sequence_loss_gradient_is_equivalent_coefficient_of_U(estimator, agg):
    """A sequence-level loss counts as its sequence's last token under the PG loss's aggregation."""
    logp, ref, _, mask = _batch()
    value, g = _grad(lambda lp: kl.kl_loss(lp, ref, mask, estimator=estimator, level="sequence", agg=agg), logp)
    big_u = ((logp - ref) * mask).sum(-1, keepdim=True)  # [B, 1]
    coef = kl.equivalent_coefficient(estimator, big_u)  # [B, 1]
    k = kl.estimate(estimator, big_u, torch.zeros_like(big_u))  # [B, 1]
    lengths = mask.sum(-1, keepdim=True)  # [B, 1]
    weight = {"seq_mean_token_sum": 1.0 / logp.shape[0], "seq_mean_token_mean": 1.0 / (logp.shape[0] * lengths),
              "token_mean": 1.0 / mask.sum()}[agg]
    torch.testing.assert_close(g, coef * mask * weight)
    torch.testing.assert_close(value, (k * weight).sum() if agg != "seq_mean_token_sum" else k.mean())


@pytest.mark.parametrize("agg", ["seq_mean_token_sum", "seq_mean_token_mean", "token_mean"])
def test_sequence_k2_loss_matches_k1_in_reward_under_each_aggregation(agg):
    """Claim 2 as the loop uses it: the gradient of sequence-level k2 as loss equals that of the
    policy-gradient surrogate carrying the sequence-level k1 penalty, aggregated the same way."""
    from klbench.ops import aggregate

    logp, ref, _, mask = _batch()
    _, g_loss = _grad(lambda lp: kl.kl_loss(lp, ref, mask, estimator="k2", level="sequence", agg=agg), logp)
    penalty = kl.kl_in_reward(logp, ref, mask, estimator="k1", level="sequence")  # [B, T] summed to go
    _, g_reward = _grad(lambda lp: aggregate(penalty * lp, mask, agg), logp)
    torch.testing.assert_close(g_loss, g_reward)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_off_policy_gradients(estimator, level):
    logp, ref, beh, mask = _batch(1)
    b = logp.shape[0]
    u = (logp - ref) * mask  # [B, T]
    log_rho = (logp - beh) * mask  # [B, T]
    if level == "sequence":
        u, log_rho = u.sum(-1, keepdim=True), log_rho.sum(-1, keepdim=True)  # [B, 1]
    rho, k = log_rho.exp(), kl.estimate(estimator, u, torch.zeros_like(u))
    coef = kl.equivalent_coefficient(estimator, u)
    kw = dict(estimator=estimator, level=level, behaviour_logp=beh, agg="seq_mean_token_sum")
    value, g = _grad(lambda lp: kl.kl_loss(lp, ref, mask, off_policy="sg_ratio", **kw), logp)
    torch.testing.assert_close(g, rho * coef * mask / b)  # sg(ρ)·k: ρ only scales the coefficient
    torch.testing.assert_close(value, (rho * k * mask).sum() / b if level == "token" else (rho * k).mean())
    _, g = _grad(lambda lp: kl.kl_loss(lp, ref, mask, off_policy="ratio", **kw), logp)
    torch.testing.assert_close(g, rho * (k + coef) * mask / b)  # ∇(ρ k) = ρ (k + c) ∇log π


def test_ratio_clip_is_truncated_importance_sampling():
    logp = torch.tensor([[0.0, -1.0]], dtype=DT)
    beh = torch.tensor([[-1.0, 0.0]], dtype=DT)  # ρ_t = e, 1/e
    ref = torch.tensor([[-0.5, -0.5]], dtype=DT)
    mask = torch.ones_like(logp)
    kw = dict(estimator="k2", behaviour_logp=beh, ratio_clip=1.5, agg="seq_mean_token_sum")
    value, g = _grad(lambda lp: kl.kl_loss(lp, ref, mask, off_policy="ratio", **kw), logp)
    u = logp - ref
    rho = torch.tensor([[1.5, math.exp(-1)]], dtype=DT)  # min(ρ, 1.5)
    torch.testing.assert_close(value, (rho * u**2 / 2).sum())
    # clipped token: no gradient through ρ, only ρ̄·u; unclipped token: ρ (k + u)
    torch.testing.assert_close(
        g, torch.tensor([[1.5 * u[0, 0], rho[0, 1] * (u[0, 1] ** 2 / 2 + u[0, 1])]], dtype=DT)
    )


def test_behaviour_none_means_on_policy():
    logp, ref, _, mask = _batch(2)
    for off in ("sg_ratio", "ratio"):
        a = _grad(lambda lp, o=off: kl.kl_loss(lp, ref, mask, estimator="k3", off_policy=o), logp)
        b = _grad(
            lambda lp, o=off: kl.kl_loss(
                lp, ref, mask, estimator="k3", off_policy=o, behaviour_logp=lp.detach()
            ),
            logp,
        )
        torch.testing.assert_close(a, b)
    # on-policy ρ·k3 has gradient (k3 + 1 − δ)·∇log π: k3 in reward plus k3 as loss
    _, g = _grad(
        lambda lp: kl.kl_loss(lp, ref, mask, estimator="k3", off_policy="ratio", agg="seq_mean_token_sum"),
        logp,
    )
    u = logp - ref
    torch.testing.assert_close(
        g, (kl.estimate("k3", logp, ref) + kl.equivalent_coefficient("k3", u)) * mask / 3
    )


def test_reference_and_behaviour_get_no_gradient():
    logp, ref, beh, mask = _batch()
    ref, beh = ref.clone().requires_grad_(True), beh.clone().requires_grad_(True)
    out = kl.kl_loss(
        logp.requires_grad_(True), ref, mask, estimator="k3", off_policy="ratio", behaviour_logp=beh
    )
    out.backward()
    assert ref.grad is None and beh.grad is None and logp.grad is not None


def test_aggregation_modes():
    logp, ref, _, mask = _batch()
    values = kl.estimate("k2", logp, ref) * mask  # [B, T]
    n = mask.sum(-1)  # [B]
    expected = {
        "seq_mean_token_mean": (values.sum(-1) / n).mean(),
        "token_mean": values.sum() / mask.sum(),
        "seq_mean_token_sum": values.sum(-1).mean(),
    }
    assert set(expected) == set(LossAgg.values())
    for agg, want in expected.items():
        torch.testing.assert_close(kl.kl_loss(logp, ref, mask, estimator="k2", agg=agg), want)
    # the default is seq_mean_token_mean; at sequence level agg weighs each sequence's value
    torch.testing.assert_close(kl.kl_loss(logp, ref, mask, estimator="k2"), expected["seq_mean_token_mean"])
    seq = {a: kl.kl_loss(logp, ref, mask, estimator="k2", level="sequence", agg=a) for a in LossAgg.values()}
    per_seq = kl.estimate("k2", (logp * mask).sum(-1), (ref * mask).sum(-1))  # [B]
    torch.testing.assert_close(seq["seq_mean_token_sum"], per_seq.mean())
    torch.testing.assert_close(seq["seq_mean_token_mean"], (per_seq / n).mean())
    torch.testing.assert_close(seq["token_mean"], per_seq.sum() / mask.sum())


# ------------------------------------------------------------------ numerics


def test_k3_clamp_keeps_values_and_gradients_finite():
    logp = torch.tensor([[-1000.0, 1000.0, 0.3]], dtype=torch.float32)
    ref = torch.tensor([[0.0, 0.0, 0.1]], dtype=torch.float32)
    mask = torch.ones_like(logp)
    raw = kl.estimate("k3", logp, ref)
    assert torch.isinf(raw[0, 0])  # without the clamp, exp(1000) overflows
    for level in ("token", "sequence"):
        for off in ("none", "sg_ratio", "ratio"):
            lp = logp.clone().requires_grad_(True)
            out = kl.kl_loss(lp, ref, mask, estimator="k3", level=level, off_policy=off, behaviour_logp=ref)
            out.backward()
            assert torch.isfinite(out) and torch.isfinite(lp.grad).all(), (level, off)
    lp = logp.clone().requires_grad_(True)
    out = kl.kl_loss(lp, ref, mask, estimator="k3", agg="seq_mean_token_sum")
    out.backward()
    c = kl.DEFAULT_LOG_RATIO_CLAMP
    want = math.expm1(c) - c + math.expm1(-c) + c + (math.expm1(-0.2) + 0.2)  # k3(−c) + k3(c) + k3(0.2)
    assert out.item() == pytest.approx(want, rel=1e-6)
    assert lp.grad[0, 0] == 0 and lp.grad[0, 1] == 0  # clamped tokens pass no gradient
    assert lp.grad[0, 2].item() == pytest.approx(-math.expm1(-0.2), rel=1e-5)
    rate = kl.clamp_fraction(logp, ref, mask)
    assert rate.shape == () and rate.item() == pytest.approx(2 / 3)
    assert kl.clamp_fraction(logp, ref, mask, log_ratio_clamp=None).item() == 0
    assert kl.clamp_fraction(logp, ref, mask, level="sequence").item() == 0  # U = 0.2: not clamped
    pen = kl.kl_in_reward(logp, ref, mask, estimator="k3")
    assert torch.isfinite(pen).all()


def test_clamp_is_inactive_below_the_bound_and_k1_k2_are_never_clamped():
    logp, ref, _, mask = _batch()
    for est in ("k1", "k2", "k3"):
        a = kl.kl_loss(logp, ref, mask, estimator=est, log_ratio_clamp=20.0)
        b = kl.kl_loss(logp, ref, mask, estimator=est, log_ratio_clamp=None)
        assert torch.equal(a, b)
    big = torch.tensor([[30.0, 30.0]], dtype=DT)  # U = 60 > 20: a long drifted response
    zero = torch.zeros_like(big)
    assert kl.kl_loss(big, zero, torch.ones_like(big), estimator="k2", level="sequence",
                      agg="seq_mean_token_sum").item() == 1800.0


def test_padding_with_minus_inf_gives_no_nan():
    logp = torch.tensor([[-0.5, -float("inf")]], dtype=DT, requires_grad=True)
    ref = torch.tensor([[-0.7, -float("inf")]], dtype=DT)
    mask = torch.tensor([[1.0, 0.0]], dtype=DT)
    for est in ("k1", "k2", "k3"):
        for level in ("token", "sequence"):
            out = kl.kl_loss(
                logp, ref, mask, estimator=est, level=level, off_policy="ratio", behaviour_logp=ref
            )
            (g,) = torch.autograd.grad(out, logp)
            assert torch.isfinite(out) and torch.isfinite(g).all() and g[0, 1] == 0
            assert torch.isfinite(kl.kl_in_reward(logp, ref, mask, estimator=est, level=level)).all()


# ------------------------------------------------------------------ kl_in_reward


def test_kl_in_reward_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -3.0, -4.0]], dtype=DT, requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -3.5, 0.0]], dtype=DT)  # u = 0.5, -1, 0.5, (padding)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=DT)
    rtg = kl.kl_in_reward(logp, ref, mask, estimator="k1")
    assert rtg.shape == logp.shape and not rtg.requires_grad
    torch.testing.assert_close(rtg, torch.tensor([[0.0, -0.5, 0.5, 0.0]], dtype=DT))
    raw = kl.kl_in_reward(logp, ref, mask, estimator="k1", reward_to_go=False)
    torch.testing.assert_close(raw, torch.tensor([[0.5, -1.0, 0.5, 0.0]], dtype=DT))
    future = kl.kl_in_reward(logp, ref, mask, estimator="k1", include_current=False)
    torch.testing.assert_close(future, torch.tensor([[-0.5, 0.5, 0.0, 0.0]], dtype=DT))
    k2 = kl.kl_in_reward(logp, ref, mask, estimator="k2")
    torch.testing.assert_close(k2, torch.tensor([[0.75, 0.625, 0.125, 0.0]], dtype=DT))
    # sequence level: k(U) on the last response token, summed to go onto every response token
    seq = kl.kl_in_reward(logp, ref, mask, estimator="k1", level="sequence", reward_to_go=False)
    torch.testing.assert_close(seq, torch.tensor([[0.0, 0.0, 0.0, 0.0]], dtype=DT))  # U = 0 here
    ref2 = ref - torch.tensor([[0.0, 0.0, 1.0, 0.0]], dtype=DT)  # U = 1
    seq = kl.kl_in_reward(logp, ref2, mask, estimator="k3", level="sequence", reward_to_go=False)
    torch.testing.assert_close(seq, torch.tensor([[0.0, 0.0, math.exp(-1), 0.0]], dtype=DT))
    seq = kl.kl_in_reward(logp, ref2, mask, estimator="k3", level="sequence")
    torch.testing.assert_close(seq, torch.tensor([[math.exp(-1)] * 3 + [0.0]], dtype=DT))
    with pytest.raises(ValueError, match="include_current"):
        kl.kl_in_reward(logp, ref, mask, estimator="k1", level="sequence", include_current=False)
    with pytest.raises(ValueError, match="include_current"):
        kl.kl_in_reward(logp, ref, mask, estimator="k1", reward_to_go=False, include_current=False)


def test_last_token_placement_with_left_and_right_padding():
    logp = torch.zeros(2, 4, dtype=DT)
    ref = -torch.ones(2, 4, dtype=DT)  # u = 1 per token
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]], dtype=DT)
    seq = kl.kl_in_reward(logp, ref, mask, estimator="k1", level="sequence", reward_to_go=False)
    torch.testing.assert_close(seq, torch.tensor([[0, 0, 2, 0], [0, 0, 0, 4]], dtype=DT))


# ------------------------------------------------------------------ value_clamp, grad_estimator


def test_value_clamp_bounds_the_value_and_stops_the_gradient_where_active():
    u = torch.tensor([[-4.0, -1.0, 0.5, 3.0, 6.0]], dtype=DT)  # k2 = 8, 0.5, 0.125, 4.5, 18
    ref, mask = torch.zeros_like(u), torch.ones_like(u)
    value, g = _grad(
        lambda lp: kl.kl_loss(lp, ref, mask, estimator="k2", value_clamp=4.0, agg="seq_mean_token_sum"), u
    )
    assert value.item() == pytest.approx(4.0 + 0.5 + 0.125 + 4.0 + 4.0)
    torch.testing.assert_close(g, torch.tensor([[0.0, -1.0, 0.5, 0.0, 0.0]], dtype=DT))
    # in the reward: each token's penalty is bounded before it is summed to go
    pen = kl.kl_in_reward(u, ref, mask, estimator="k2", reward_to_go=False, value_clamp=4.0)
    torch.testing.assert_close(pen, torch.tensor([[4.0, 0.5, 0.125, 4.0, 4.0]], dtype=DT))
    seq = kl.kl_in_reward(u, ref, mask, estimator="k1", level="sequence", reward_to_go=False, value_clamp=1.0)
    torch.testing.assert_close(seq, torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]], dtype=DT))  # U = 4.5 -> 1


def test_value_clamp_applies_after_the_importance_weight():
    logp, ref, beh, mask = _batch(2)
    kw = dict(estimator="k3", off_policy="ratio", behaviour_logp=beh, agg="seq_mean_token_sum")
    u, rho = (logp - ref) * mask, ((logp - beh) * mask).exp()
    weighted = rho * kl.estimate("k3", u, torch.zeros_like(u))
    c = float(weighted[mask.bool()].median())
    value, g = _grad(lambda lp: kl.kl_loss(lp, ref, mask, value_clamp=c, **kw), logp)
    torch.testing.assert_close(value, (weighted.clamp(-c, c) * mask).sum() / logp.shape[0])
    assert ((g == 0) == ((weighted.abs() > c) | (mask == 0))).all()


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grad_estimator_is_straight_through(level):
    """Value of k3 (clamped), gradient of k2: sg(k3) + k2 - sg(k2), as verl's "k3+"."""
    logp, ref, _, mask = _batch(3)
    kw = dict(level=level, agg="seq_mean_token_sum")
    value, g = _grad(
        lambda lp: kl.kl_loss(lp, ref, mask, estimator="k3", grad_estimator="k2", value_clamp=0.5, **kw), logp
    )
    want_value, _ = _grad(lambda lp: kl.kl_loss(lp, ref, mask, estimator="k3", value_clamp=0.5, **kw), logp)
    _, want_g = _grad(lambda lp: kl.kl_loss(lp, ref, mask, estimator="k2", **kw), logp)  # no value clamp
    torch.testing.assert_close(value, want_value)
    torch.testing.assert_close(g, want_g)


def test_grad_estimator_weights_only_the_gradient_off_policy():
    """OpenRLHF's unbiased_gradient: value of the estimator, gradient sg(min(rho, 10)) * u."""
    logp, ref, beh, mask = _batch(4)
    kw = dict(off_policy="sg_ratio", ratio_clip=1.5, behaviour_logp=beh, agg="seq_mean_token_sum")
    value, g = _grad(lambda lp: kl.kl_loss(lp, ref, mask, estimator="k3", grad_estimator="k2", **kw), logp)
    u, rho = (logp - ref) * mask, ((logp - beh) * mask).exp().clamp(max=1.5)
    torch.testing.assert_close(value, (kl.estimate("k3", u, torch.zeros_like(u)) * mask).sum() / 3)
    torch.testing.assert_close(g, rho * u * mask / 3)


def test_grad_estimator_none_keeps_the_value_and_has_no_gradient():
    logp, ref, _, mask = _batch(5)
    logp = logp.requires_grad_(True)
    out = kl.kl_loss(logp, ref, mask, estimator="k3", grad_estimator="none", value_clamp=1.0)
    torch.testing.assert_close(out, kl.kl_loss(logp, ref, mask, estimator="k3", value_clamp=1.0).detach())
    assert not out.requires_grad
    with pytest.raises(ValueError, match="GradEstimator 'k4'"):
        kl.kl_loss(logp, ref, mask, estimator="k3", grad_estimator="k4")


def test_new_options_default_to_the_old_behaviour():
    logp, ref, beh, mask = _batch(6)
    for kw in (
        dict(estimator="k3"),
        dict(estimator="k2", level="sequence", off_policy="ratio", behaviour_logp=beh),
    ):
        a = kl.kl_loss(logp, ref, mask, **kw)
        b = kl.kl_loss(logp, ref, mask, value_clamp=None, grad_estimator="same", **kw)
        assert torch.equal(a, b)
    spec = kl.KLSpec.from_config(KLConfig())
    assert (spec.value_clamp, spec.grad_estimator) == (None, "same")


# ------------------------------------------------------------------ KLSpec


def _cfg(**over):
    base = dict(
        coef=0.1,
        estimator="k2",
        placement="loss",
        level="token",
        reward_to_go=True,
        off_policy="none",
        ratio_clip=None,
        log_ratio_clamp=20.0,
        value_clamp=None,
        grad_estimator="same",
        controller="adaptive",  # controller fields are ignored
        target=6.0,
        horizon=10000,
    )
    return SimpleNamespace(**{**base, **over})


def test_klspec_from_config_and_properties():
    spec = kl.KLSpec.from_config(_cfg())
    assert (spec.coef, spec.estimator, spec.placement) == (0.1, "k2", "loss")
    assert spec.as_loss and not spec.in_reward
    both = kl.KLSpec.from_config(_cfg(placement="both", estimator="k3"))
    assert both.as_loss and both.in_reward
    none = kl.KLSpec.from_config(_cfg(placement="none"))
    assert not (none.as_loss or none.in_reward)
    with pytest.raises(AttributeError, match="estimator"):
        kl.KLSpec.from_config(SimpleNamespace(coef=0.1))
    with pytest.raises(AttributeError):
        spec.coef = 1.0  # frozen
    # every field of the spec is a field of the config it is built from (one source of truth)
    assert {f.name for f in dataclasses.fields(kl.KLSpec)} <= {f.name for f in dataclasses.fields(KLConfig)}
    assert kl.KLSpec.from_config(KLConfig()) == kl.KLSpec(
        coef=0.2, estimator="k2", placement="loss", level="token", reward_to_go=True, off_policy="none",
        ratio_clip=None, log_ratio_clamp=20.0)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("estimator", "k4", "kl.estimator='k4' is not valid; allowed: k1, k2, k3"),
        ("placement", "advantage", "kl.placement.*none, reward, loss, both"),
        ("level", "batch", "kl.level.*token, sequence"),
        ("off_policy", "is", "kl.off_policy.*none, sg_ratio, ratio"),
        ("coef", -0.1, "kl.coef"),
        ("coef", float("nan"), "kl.coef=nan is not valid"),
        ("coef", float("inf"), "kl.coef=inf is not valid; must be a finite number"),
        ("target", float("inf"), "kl.target=inf"),
        ("ratio_clip", 0.0, "kl.ratio_clip"),
        ("log_ratio_clamp", -1.0, "kl.log_ratio_clamp"),
        ("value_clamp", 0.0, "kl.value_clamp=0.0 is not valid; must be > 0 or null"),
        ("grad_estimator", "k4", "kl.grad_estimator='k4' is not valid; allowed: same, k1, k2, k3, none"),
    ],
)
def test_kl_config_is_validated_once_in_one_line(field, value, match):
    """Allowed values and ranges are checked when the config is built, not by the KL functions."""
    over = {field: value}
    if field == "ratio_clip":
        over["off_policy"] = "sg_ratio"
    with pytest.raises(Exception) as err:  # noqa: B017 - OmegaConf's or klbench's error, shown as one line
        to_config(OmegaConf.create({"kl": over}))
    msg = one_line(err.value)
    assert re.search(match, msg), msg
    assert "\n" not in msg


def test_kl_config_rejects_settings_that_would_do_nothing():
    with pytest.raises(ConfigError, match="applies to a KL \\*loss\\*"):
        KLConfig(coef=0.1, estimator="k1", placement="reward", off_policy="sg_ratio")
    with pytest.raises(ConfigError, match="clips the IS weight"):
        KLConfig(coef=0.1, estimator="k2", placement="loss", ratio_clip=2.0)
    with pytest.raises(ConfigError, match="sets the gradient of a KL \\*loss\\*"):
        KLConfig(coef=0.1, estimator="k3", placement="reward", grad_estimator="k2")


def test_klspec_helpers_call_kl_functions_without_beta():
    logp, ref, beh, mask = _batch()
    small = kl.KLSpec(coef=0.01, estimator="k3", placement="both", off_policy="ratio", ratio_clip=2.0)
    large = kl.KLSpec(coef=5.0, estimator="k3", placement="both", off_policy="ratio", ratio_clip=2.0)
    for spec in (small, large):
        pen = spec.reward_penalty(logp, ref, mask)
        assert pen.shape == logp.shape  # [B, T]
        torch.testing.assert_close(pen, kl.kl_in_reward(logp, ref, mask, estimator="k3"))
        loss = spec.loss(logp, ref, mask, behaviour_logp=beh, agg="token_mean")
        want = kl.kl_loss(
            logp,
            ref,
            mask,
            estimator="k3",
            off_policy="ratio",
            behaviour_logp=beh,
            ratio_clip=2.0,
            agg="token_mean",
        )
        torch.testing.assert_close(loss, want)
    reward_only = kl.KLSpec(
        coef=0.1, estimator="k1", placement="reward", reward_to_go=False, level="sequence"
    )
    zero = reward_only.loss(logp, ref, mask)
    assert zero.shape == () and zero.item() == 0
    torch.testing.assert_close(
        reward_only.reward_penalty(logp, ref, mask),
        kl.kl_in_reward(logp, ref, mask, estimator="k1", level="sequence", reward_to_go=False),
    )
    loss_only = kl.KLSpec(coef=0.1, estimator="k2", placement="loss")
    assert torch.equal(loss_only.reward_penalty(logp, ref, mask), torch.zeros_like(logp))


# ------------------------------------------------------------------ controllers


def test_adaptive_controller_moves_towards_target():
    ctl = kl.AdaptiveKLController(init_coef=0.1, target=6.0, horizon=100)
    ctl.update(12.0, n_steps=10)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    before = ctl.value
    ctl.update(5.7, n_steps=10)  # error −0.05
    assert ctl.value == pytest.approx(before * (1 - 0.05 * 10 / 100))
    ctl.update(0.0, n_steps=10)  # error clipped to −0.2
    assert ctl.value < before
    for _ in range(200):  # a KL stuck above target keeps raising β
        ctl.update(60.0, n_steps=1)
    assert ctl.value > before
    with pytest.raises(TypeError, match="float"):
        ctl.update(torch.tensor(1.0), 1)


def test_controller_state_round_trip_and_build():
    ctl = kl.build_controller("adaptive", coef=0.05, target=3.0, horizon=50)
    ctl.update(9.0, 5)
    restored = kl.build_controller("adaptive", coef=0.05, target=3.0, horizon=50)
    restored.load_state_dict(ctl.state_dict())
    assert restored.state_dict() == ctl.state_dict()
    restored.update(1.0, 5)
    ctl.update(1.0, 5)
    assert restored.value == ctl.value
    fixed = kl.build_controller("fixed", coef=0.3)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.3
    other = kl.FixedKLController(0.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.3
    with pytest.raises(ValueError, match="fixed, adaptive"):
        kl.build_controller("pid", coef=0.1)
    with pytest.raises(ValueError, match="target"):
        kl.build_controller("adaptive", coef=0.1, target=None, horizon=10)


# ------------------------------------------------------------------ import weight


def test_import_kl_is_light():
    heavy = ("transformers", "hydra", "omegaconf", "vllm", "deepspeed", "datasets", "wandb")
    code = f"import sys, klbench.kl; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
