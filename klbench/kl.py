"""The KL term of RL fine-tuning: estimators, placements, off-policy correction, controllers.

Pure functions over tensors and masks; importing this module loads torch, klbench.ops and
klbench.config (dataclasses only), so any trainer can use it. docs/theory.md states what each
combination does to the gradient and `klbench verify` (klbench.theory) checks it on these functions.

Notation, per sampled response token t (`mask` 1 on response tokens):
    u_t = log π_θ(y_t|·) − log π_ref(y_t|·)        per-token log-ratio          # [B, T]
    U   = Σ_t u_t = log π_θ(y) − log π_ref(y)      per-sequence log-ratio       # [B]
    ρ   = π_θ / μ                                  importance ratio to the behaviour policy μ
Estimators, of x = u_t (level "token") or x = U (level "sequence"): k1 = x, k2 = x²/2, k3 = e^{−x} − 1 + x.
In the reward (`kl_in_reward`) the detached value multiplies the score function; as a loss
(`kl_loss`) k_n is differentiated, which equals an in-reward coefficient ∂k_n/∂log π_θ
(`equivalent_coefficient`: 1, u, 1 − e^{−u}). `value_clamp` and `grad_estimator` reproduce what RL
frameworks ship (docs/audit.md): a bound on the value, and a gradient taken from another estimator
(straight-through) or none at all.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from klbench.config import Controller, Estimator, GradEstimator, Level, OffPolicy, Placement
from klbench.ops import aggregate, masked_mean, reverse_cumsum

#: Default bound on |log-ratio| before it is exponentiated (verl uses the same ±20).
DEFAULT_LOG_RATIO_CLAMP = 20.0


def _clamp(x: torch.Tensor, log_ratio_clamp: float | None) -> torch.Tensor:
    """x clamped to [−c, c]; the gradient is zero where the clamp is active."""
    return x if log_ratio_clamp is None else x.clamp(-log_ratio_clamp, log_ratio_clamp)


def _estimate(kind: str, x: torch.Tensor, log_ratio_clamp: float | None) -> torch.Tensor:
    """Estimator `kind` of a log-ratio `x` (any shape). Only k3 exponentiates, so only k3 is clamped."""
    kind = Estimator(kind)
    if kind == Estimator.k1:
        return x
    if kind == Estimator.k2:
        return 0.5 * x * x
    x = _clamp(x, log_ratio_clamp)
    return torch.expm1(-x) + x  # exp(−x) − 1 + x, accurate near x = 0


def _masked_log_ratio(logp: torch.Tensor, other_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p − log q on response tokens, exactly 0 elsewhere (padding may hold -inf or garbage)."""
    return torch.where(mask.bool(), logp - other_logp, torch.zeros_like(logp))  # [B, T]


def estimate(
    kind: str,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    *,
    log_ratio_clamp: float | None = None,
) -> torch.Tensor:
    """Per-token estimator values k1 | k2 | k3 of u = logp − ref_logp (same shape as `logp`).

    No masking and, by default, no clamp: this is the raw formula (k3 overflows for u < −88
    in float32). `log_ratio_clamp` applies the same clamp as `kl_loss` (k3 only).
    """
    return _estimate(kind, logp - ref_logp, log_ratio_clamp)


def equivalent_coefficient(estimator: str, u: torch.Tensor) -> torch.Tensor:
    """∂k_n/∂log π_θ at log-ratio `u`: the in-reward coefficient that `estimator` as loss is worth.

    k1 → 1, k2 → u, k3 → 1 − exp(−u). Same shape as `u`.
    """
    estimator = Estimator(estimator)
    if estimator == Estimator.k1:
        return torch.ones_like(u)
    if estimator == Estimator.k2:
        return u
    return -torch.expm1(-u)


def clamp_fraction(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    log_ratio_clamp: float | None = DEFAULT_LOG_RATIO_CLAMP,
    level: str = "token",
) -> torch.Tensor:
    """Fraction of response tokens (level "token") or sequences ("sequence") whose log-ratio
    |u| (or |U|) exceeds `log_ratio_clamp`, i.e. where k3 is clamped and passes no gradient.

    A 0-dim tensor (no host sync); zero when `log_ratio_clamp` is None. Log it as `kl/clamp_rate`.
    """
    mask = mask.to(logp.dtype)
    u = _masked_log_ratio(logp.detach(), ref_logp.detach(), mask)  # [B, T]
    if log_ratio_clamp is None:
        return logp.new_zeros(())
    if Level(level) == Level.token:
        return masked_mean((u.abs() > log_ratio_clamp).to(logp.dtype), mask)
    has_tokens = (mask.sum(-1) > 0).to(logp.dtype)  # [B]
    clamped = (u.sum(-1).abs() > log_ratio_clamp).to(logp.dtype)  # [B]
    return (clamped * has_tokens).sum() / has_tokens.sum().clamp(min=1)


def _importance_ratio(
    logp: torch.Tensor,
    behaviour_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: str,
    off_policy: str,
    ratio_clip: float | None,
    log_ratio_clamp: float | None,
) -> torch.Tensor:
    """ρ = π_θ/μ per token `[B, T]` or per sequence `[B]`, detached for "sg_ratio", truncated at `ratio_clip`."""
    log_rho = _masked_log_ratio(logp, behaviour_logp, mask)  # [B, T]
    if level == Level.sequence:
        log_rho = log_rho.sum(-1)  # [B]
    rho = torch.exp(_clamp(log_rho, log_ratio_clamp))
    if off_policy == OffPolicy.sg_ratio:
        rho = rho.detach()
    if ratio_clip is not None:
        rho = rho.clamp(max=ratio_clip)  # truncated IS: min(ρ, c); no gradient where clipped
    return rho


def kl_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    estimator: str,
    level: str = "token",
    off_policy: str = "none",
    behaviour_logp: torch.Tensor | None = None,
    ratio_clip: float | None = None,
    agg: str = "seq_mean_token_mean",
    log_ratio_clamp: float | None = DEFAULT_LOG_RATIO_CLAMP,
    value_clamp: float | None = None,
    grad_estimator: str = "same",
) -> torch.Tensor:
    """The KL term as a loss: a 0-dim tensor whose gradient flows into `logp` only (β not applied).

    Args:
        logp: `[B, T]` log π_θ of the sampled tokens (carries gradient).
        ref_logp: `[B, T]` log π_ref of the same tokens (detached here).
        mask: `[B, T]` 1 on response tokens, 0 on prompt/padding (padding logp may be -inf).
        estimator: "k1" | "k2" | "k3".
        level: "token": estimator per token, reduced with `agg` (pass the policy-gradient loss's
            aggregation; the token-level repairs need "seq_mean_token_sum"). "sequence": estimator
            of U = Σ_t u_t, counted as the value of the sequence's last token and reduced with `agg`
            like the reward penalty it is equivalent to: "seq_mean_token_sum" gives the mean over
            sequences, "seq_mean_token_mean" divides each by its length |y| (as that aggregation
            divides a sequence-level penalty in the reward), "token_mean" sums over sequences and
            divides by the tokens.
        off_policy: "none"; "sg_ratio": multiply by the detached ρ = π_θ/μ; "ratio": by ρ with
            gradient. ρ is per token at level "token" and per sequence at level "sequence".
        behaviour_logp: `[B, T]` log μ of the sampled tokens (the rollout policy's log-probs).
            None means the samples came from the current policy: μ = sg(π_θ), ρ = 1 (with
            gradient for "ratio", which makes `ratio`·k3 equal k3 in both reward and loss).
        ratio_clip: truncated importance sampling: ρ is replaced by min(ρ, ratio_clip), which
            bounds the variance at the price of a bias; where the clip is active "ratio" passes
            no gradient through ρ. None: no clip.
        agg: "seq_mean_token_mean" | "token_mean" | "seq_mean_token_sum" (klbench.ops.aggregate).
        log_ratio_clamp: numerical guard for the exponentials: the k3 log-ratio (u or U) and
            log ρ are clamped to [−c, c] before `exp`. A clamped k3 token keeps the finite value
            k3(±c) and contributes *no gradient* (as verl's low_var_kl); a clamped log ρ gives
            ρ = e^{±c} with no gradient through it. k1 and k2 are polynomials and are never
            clamped (a long response can legitimately have |U| > 20). None disables the clamp.
            Log `clamp_fraction` to see how often it is active.
        value_clamp: bound on the term's value (per token, or per sequence at level "sequence"),
            applied after the IS weight: values outside [−c, c] become ±c and pass no gradient.
            None (default): no bound. Frameworks clamp at 10 (conf/kl/frameworks/).
        grad_estimator: "same" (default): the gradient of the value. "k1" | "k2" | "k3": straight-
            through, sg(value) + g − sg(g): the value of `estimator` (clamped, *not* IS-weighted: the
            KL estimate one logs) with the gradient of g, the `off_policy`-weighted `grad_estimator`
            term without `value_clamp` (verl's "k3+", OpenRLHF's unbiased_gradient). "none": the value
            with no gradient at all (skyrl-train 0.3.1's KL loss under torch.no_grad).

    Allowed values are validated once, by `klbench.config.KLConfig`; an unknown name raises here.
    """
    level, off_policy, grad_estimator = Level(level), OffPolicy(off_policy), GradEstimator(grad_estimator)
    mask = mask.to(logp.dtype)
    u = _masked_log_ratio(logp, ref_logp.detach(), mask)  # [B, T]
    x = u if level == Level.token else u.sum(-1)  # [B, T] or [B]
    values = _estimate(estimator, x, log_ratio_clamp)  # [B, T] or [B]
    rho = None
    if off_policy != OffPolicy.none:
        behaviour = logp.detach() if behaviour_logp is None else behaviour_logp.detach()
        rho = _importance_ratio(
            logp,
            behaviour,
            mask,
            level=level,
            off_policy=off_policy,
            ratio_clip=ratio_clip,
            log_ratio_clamp=log_ratio_clamp,
        )  # same shape as values
    if grad_estimator in (GradEstimator.same, GradEstimator.none):
        values = _clamp(values if rho is None else rho * values, value_clamp)
        if grad_estimator == GradEstimator.none:
            values = values.detach()
    else:  # straight-through: the (clamped) value of `estimator`, the gradient of the weighted grad_estimator
        surrogate = _estimate(grad_estimator.value, x, log_ratio_clamp)
        surrogate = surrogate if rho is None else rho * surrogate
        values = _clamp(values, value_clamp).detach() + surrogate - surrogate.detach()
    if level == Level.sequence:
        # One value per sequence, aggregated like the policy-gradient loss: with "seq_mean_token_mean"
        # each sequence's term is divided by its length, the scale a sequence-level penalty in the
        # reward gets from that loss, so k2 as loss and k1 in reward stay equal at one β.
        values = _on_last_token(values, mask)  # [B, T]
    return aggregate(values, mask, agg)


def _on_last_token(per_seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`[B]` values placed on each sequence's last response token → `[B, T]`, zero elsewhere."""
    positions = torch.arange(mask.shape[-1], device=mask.device)  # [T]
    last = (mask * positions).argmax(-1, keepdim=True)  # [B, 1] index of the last response token
    return torch.zeros_like(mask, dtype=per_seq.dtype).scatter(-1, last, per_seq.unsqueeze(-1)) * mask


def kl_in_reward(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    estimator: str,
    level: str = "token",
    reward_to_go: bool = True,
    include_current: bool = True,
    log_ratio_clamp: float | None = DEFAULT_LOG_RATIO_CLAMP,
    value_clamp: float | None = None,
) -> torch.Tensor:
    """The KL term as a detached reward penalty `[B, T]` (β not applied; the caller subtracts β·this).

    level "token": k_n(u_t) on each response token. level "sequence": k_n(U) placed on the last
    response token of each sequence. With `reward_to_go`, the penalties are summed to go,
    out[:, t] = Σ_{t' ≥ t} penalty[:, t'] (so a sequence-level penalty reaches every response
    token): multiply by β and subtract from per-token returns/advantages. Without it the raw
    per-token penalties are returned. `include_current=False` (token level, reward-to-go only)
    gives the "future tokens only" coefficient Σ_{t' > t}, which with estimator "k1" completes
    token-level k2 as loss into the exact RKL gradient (docs/theory.md). Zero off the mask.
    `log_ratio_clamp` as in `kl_loss` (k3 only); `value_clamp` bounds each penalty (per token, or per
    sequence at level "sequence") to [−c, c] before it is summed to go.
    """
    level = Level(level)
    if not include_current and (level != Level.token or not reward_to_go):
        raise ValueError("include_current=False needs level='token' and reward_to_go=True")

    with torch.no_grad():
        mask = mask.to(logp.dtype)
        u = _masked_log_ratio(logp, ref_logp, mask)  # [B, T]
        if level == Level.token:
            penalty = _clamp(_estimate(estimator, u, log_ratio_clamp), value_clamp) * mask  # [B, T]
        else:
            per_seq = _clamp(_estimate(estimator, u.sum(-1), log_ratio_clamp), value_clamp)  # [B]
            penalty = _on_last_token(per_seq, mask)  # [B, T]
        if not reward_to_go:
            return penalty
        to_go = reverse_cumsum(penalty, mask)  # [B, T]
        return to_go if include_current else to_go - penalty


@dataclass(frozen=True)
class KLSpec:
    """Everything about the KL term; the training loop calls its two helpers.

    β is *not* applied inside `reward_penalty` or `loss`: the loop multiplies by the current
    coefficient, which an adaptive controller may change (`build_controller(..., coef=spec.coef)`):
        beta = controller.value
        rewards = rewards - beta * spec.reward_penalty(old_logp, ref_logp, mask)   # [B, T]
        loss = pg_loss + beta * spec.loss(logp, ref_logp, mask, behaviour_logp=old_logp, agg=pg_agg)

    placement "both" uses the same estimator in reward and loss (k3 in both is the exact one;
    pass agg="seq_mean_token_sum" at token level). coef may be 0 with a placement (the term is
    computed, e.g. for logging, but does not regularise). Build it from a validated
    `klbench.config.KLConfig` with `from_config`; its fields are a subset of that config's.
    """

    coef: float = 0.0
    estimator: Estimator = Estimator.k1
    placement: Placement = Placement.none
    level: Level = Level.token
    reward_to_go: bool = True
    off_policy: OffPolicy = OffPolicy.none
    ratio_clip: float | None = None
    log_ratio_clamp: float | None = DEFAULT_LOG_RATIO_CLAMP
    value_clamp: float | None = None
    grad_estimator: GradEstimator = GradEstimator.same

    @classmethod
    def from_config(cls, cfg: Any) -> KLSpec:
        """The spec's fields read by name from `cfg` (a `KLConfig`; its other fields are ignored)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})

    @property
    def in_reward(self) -> bool:
        return self.placement in ("reward", "both")

    @property
    def as_loss(self) -> bool:
        return self.placement in ("loss", "both")

    def reward_penalty(self, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Detached penalties `[B, T]` without β (summed to go if `reward_to_go`); zeros if not in reward."""
        if not self.in_reward:
            return torch.zeros_like(logp).detach()
        return kl_in_reward(logp, ref_logp, mask, estimator=self.estimator, level=self.level,
            reward_to_go=self.reward_to_go, log_ratio_clamp=self.log_ratio_clamp,
            value_clamp=self.value_clamp)

    def loss(
        self,
        logp: torch.Tensor,
        ref_logp: torch.Tensor,
        mask: torch.Tensor,
        *,
        behaviour_logp: torch.Tensor | None = None,
        agg: str = "seq_mean_token_mean",
    ) -> torch.Tensor:
        """The KL loss without β, a 0-dim tensor (a constant zero if not as loss); see `kl_loss`."""
        if not self.as_loss:
            return logp.new_zeros(())
        return kl_loss(logp, ref_logp, mask, estimator=self.estimator, level=self.level,
            off_policy=self.off_policy, behaviour_logp=behaviour_logp, ratio_clip=self.ratio_clip, agg=agg,
            log_ratio_clamp=self.log_ratio_clamp, value_clamp=self.value_clamp,
            grad_estimator=self.grad_estimator)


class FixedKLController:
    """β that never changes."""

    def __init__(self, coef: float) -> None:
        if not coef >= 0:
            raise ValueError(f"KL coefficient must be >= 0, got {coef!r}")
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op (same signature as the adaptive controller)."""

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "fixed", "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller steering the measured KL towards `target` (Ziegler et al. 2019).

    error = clip(current_kl / target − 1, −0.2, 0.2);  β ← β · (1 + error · n_steps / horizon).
    `current_kl` is a Python float, the KL the target refers to (typically the batch mean of the
    per-sequence Σ_t u_t); `n_steps` the samples (or steps) since the last update.
    """

    def __init__(self, init_coef: float, target: float, horizon: float) -> None:
        if not init_coef >= 0:
            raise ValueError(f"KL init_coef must be >= 0, got {init_coef!r}")
        if target is None or not target > 0:
            raise ValueError(f"adaptive KL control needs target > 0, got {target!r}; set kl.target")
        if horizon is None or not horizon > 0:
            raise ValueError(f"adaptive KL control needs horizon > 0, got {horizon!r}; set kl.horizon")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        if isinstance(current_kl, torch.Tensor):
            raise TypeError(
                "AdaptiveKLController.update takes a Python float; reduce the KL (e.g. .item()) once per step"
            )
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "adaptive", "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))


def build_controller(
    kind: str, coef: float, target: float | None = None, horizon: float | None = None
) -> FixedKLController | AdaptiveKLController:
    """ "fixed" → FixedKLController(coef); "adaptive" → AdaptiveKLController(coef, target, horizon)."""
    if Controller(kind) == Controller.fixed:
        return FixedKLController(coef)
    return AdaptiveKLController(coef, target, horizon)
