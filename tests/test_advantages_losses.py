"""Hand-computed values of the advantage estimators and the PPO-clip surrogate."""

import math

import pytest
import torch

from klbench import advantages
from klbench.losses import ppo_clip
from klbench.ops import aggregate, reverse_cumsum


def test_grpo_hand_values():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])  # two groups of 3
    a = advantages.compute("grpo", r, 3, eps=0.0)
    # group 1: mean 1/3, unbiased std sqrt(1/3) -> (2/3)/0.57735 = 1.1547, (-1/3)/0.57735 = -0.57735
    assert a[:3].tolist() == pytest.approx([1.1547005, -0.5773503, -0.5773503], abs=1e-6)
    # group 2: all equal -> zero advantage (0/0 guarded by eps=1e-6 in practice)
    a2 = advantages.compute("grpo", r, 3)
    assert a2[3:].tolist() == [0.0, 0.0, 0.0]


def test_dr_grpo_rloo_reinforce_pp_hand_values():
    r = torch.tensor([3.0, 1.0, 2.0, 0.0])  # two groups of 2
    assert advantages.compute("dr_grpo", r, 2).tolist() == [1.0, -1.0, 1.0, -1.0]
    # RLOO: r_i - mean(others) = 3-1, 1-3, 2-0, 0-2
    assert advantages.compute("rloo", r, 2).tolist() == [2.0, -2.0, 2.0, -2.0]
    # REINFORCE++: dr_grpo then whitened over the batch: [1,-1,1,-1] has mean 0, std 2/sqrt(3)
    s = 2 / math.sqrt(3)
    assert advantages.compute("reinforce_pp", r, 2, eps=0.0).tolist() == pytest.approx([1 / s, -1 / s] * 2)


def test_unknown_advantage_lists_valid_names():
    with pytest.raises(ValueError, match="grpo, dr_grpo, rloo, reinforce_pp"):
        advantages.compute("ppo", torch.zeros(4), 2)


def test_ppo_clip_on_policy_is_reinforce():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]], requires_grad=True)
    adv = torch.tensor([[2.0, 2.0], [-1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    out = ppo_clip(logp, logp.detach(), adv, mask)
    # ratio 1 everywhere: loss = mean_seq(mean_tok(-A)) = ((-2-2)/2 + (1)/1)/2 = -0.5
    assert out.loss.item() == pytest.approx(-0.5)
    out.loss.backward()
    # d/dlogp of -A*ratio at ratio 1 = -A, scaled by 1/(B*len)
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5, -0.5], [0.5, 0.0]]))
    assert out.clipfrac.item() == 0.0 and out.ratio_mean.item() == pytest.approx(1.0)


def test_ppo_clip_clips_hand_values():
    # one token, ratio e^{0.5}=1.6487 > 1.2 with A>0: clipped branch (constant 1.2*A) is the max of the negatives
    logp = torch.tensor([[0.5]], requires_grad=True)
    out = ppo_clip(logp, torch.zeros(1, 1), torch.tensor([[1.0]]), torch.ones(1, 1), clip_low=0.2)
    assert out.loss.item() == pytest.approx(-1.2)
    out.loss.backward()
    assert logp.grad.item() == 0.0  # clipped: no gradient
    assert out.clipfrac.item() == 1.0
    # A<0 with ratio > 1+eps: unclipped branch -A*ratio is larger, gradient flows
    logp2 = torch.tensor([[0.5]], requires_grad=True)
    out2 = ppo_clip(logp2, torch.zeros(1, 1), torch.tensor([[-1.0]]), torch.ones(1, 1), clip_low=0.2)
    assert out2.loss.item() == pytest.approx(math.exp(0.5))
    out2.loss.backward()
    assert logp2.grad.item() == pytest.approx(math.exp(0.5))


def test_asymmetric_clip_high():
    logp = torch.tensor([[math.log(1.25)]], requires_grad=True)
    out = ppo_clip(logp, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), clip_low=0.2, clip_high=0.28)
    assert out.loss.item() == pytest.approx(-1.25)  # 1.25 < 1.28: not clipped


def test_aggregations_hand_values():
    v = torch.tensor([[1.0, 3.0, 100.0], [2.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert aggregate(v, m, "seq_mean_token_mean").item() == pytest.approx((2.0 + 2.0) / 2)
    assert aggregate(v, m, "token_mean").item() == pytest.approx(6.0 / 3)
    assert aggregate(v, m, "seq_mean_token_sum").item() == pytest.approx((4.0 + 2.0) / 2)
    assert reverse_cumsum(v, m).tolist() == [[4.0, 3.0, 0.0], [2.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="token_mean"):
        aggregate(v, m, "sum")
