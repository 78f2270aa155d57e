"""KL estimators and the KL-penalized reward against closed forms and per-element Python math."""

from __future__ import annotations

import math

import pytest
import torch

from chatrlhf.rlhf import KL_ESTIMATORS, kl_k1, kl_k2, kl_k3, kl_penalized_rewards


def test_estimators_closed_form():
    # π(a) = 0.5, π_ref(a) = 0.25, so r = π_ref/π = 0.5
    logp = torch.tensor([[math.log(0.5)]], dtype=torch.float64)
    ref_logp = torch.tensor([[math.log(0.25)]], dtype=torch.float64)
    assert kl_k1(logp, ref_logp).item() == pytest.approx(math.log(2), abs=1e-12)
    assert kl_k2(logp, ref_logp).item() == pytest.approx(0.5 * math.log(2) ** 2, abs=1e-12)
    assert kl_k3(logp, ref_logp).item() == pytest.approx(0.5 - 1 - math.log(0.5), abs=1e-12)


def test_estimators_are_zero_when_policies_agree():
    logp = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    for estimator in KL_ESTIMATORS.values():
        assert torch.equal(estimator(logp, logp.clone()), torch.zeros_like(logp))


def test_k2_and_k3_are_nonnegative():
    gen = torch.Generator().manual_seed(1)
    logp, ref_logp = 3 * torch.randn(64, 32, generator=gen), 3 * torch.randn(64, 32, generator=gen)
    assert (kl_k2(logp, ref_logp) >= 0).all()
    assert (kl_k3(logp, ref_logp) >= 0).all()
    assert (kl_k1(logp, ref_logp) < 0).any(), "k1 of single samples can be negative"


def test_k1_and_k3_are_unbiased():
    # E_{a∼π}[k(a)] over the whole support of a small distribution equals KL(π‖π_ref) exactly.
    p = [0.5, 0.3, 0.15, 0.05]
    p_ref = [0.25, 0.25, 0.25, 0.25]
    kl_exact = sum(pi * math.log(pi / qi) for pi, qi in zip(p, p_ref))
    logp = torch.tensor([[math.log(v) for v in p]], dtype=torch.float64)
    ref_logp = torch.tensor([[math.log(v) for v in p_ref]], dtype=torch.float64)
    weights = torch.tensor([p], dtype=torch.float64)
    for estimator in (kl_k1, kl_k3):
        assert (weights * estimator(logp, ref_logp)).sum().item() == pytest.approx(kl_exact, abs=1e-12)


def test_registry():
    assert KL_ESTIMATORS == {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


LOGP = [[-1.0, -2.0, -0.5, -3.0], [-0.1, -0.2, -0.3, -0.4], [-2.0, -1.0, -7.0, -9.0]]
REF = [[-1.5, -1.0, -0.5, -0.2], [-0.3, -0.2, -0.1, -1.4], [-1.0, -1.5, -0.1, -0.1]]
LENGTHS = [2, 4, 1]  # row 1 fills the length (truncated), row 2 ends at position 0


def _expected_rewards(scores, kl_coef, reward_clip):
    rewards, kls = [], []
    for b, n in enumerate(LENGTHS):
        kl_row = [(LOGP[b][t] - REF[b][t]) if t < n else 0.0 for t in range(4)]
        reward_row = [-kl_coef * k for k in kl_row]
        score = scores[b] if reward_clip is None else max(-reward_clip, min(reward_clip, scores[b]))
        reward_row[n - 1] += score  # the last real response token
        rewards.append(reward_row)
        kls.append(kl_row)
    return torch.tensor(rewards, dtype=torch.float64), torch.tensor(kls, dtype=torch.float64)


@pytest.mark.parametrize("reward_clip", [5.0, None])
def test_kl_penalized_rewards(reward_clip):
    scores = [7.0, -2.0, -9.0]
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(4)] for n in LENGTHS], dtype=torch.float64)
    rewards, kl = kl_penalized_rewards(
        torch.tensor(scores, dtype=torch.float64),
        torch.tensor(LOGP, dtype=torch.float64),
        torch.tensor(REF, dtype=torch.float64),
        mask,
        kl_coef=0.1,
        reward_clip=reward_clip,
    )
    expected_rewards, expected_kl = _expected_rewards(scores, 0.1, reward_clip)
    torch.testing.assert_close(rewards, expected_rewards, atol=1e-12, rtol=0)
    torch.testing.assert_close(kl, expected_kl, atol=1e-12, rtol=0)


def test_score_lands_on_last_real_token_not_one_past():
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    zeros = torch.zeros(1, 4)
    rewards, _ = kl_penalized_rewards(torch.tensor([3.0]), zeros, zeros, mask, kl_coef=0.1, reward_clip=5.0)
    assert rewards.tolist() == [[0.0, 3.0, 0.0, 0.0]]


def test_kl_penalized_rewards_with_k3():
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    logp = torch.tensor([[math.log(0.5), math.log(0.2), -50.0]], dtype=torch.float64)
    ref_logp = torch.tensor([[math.log(0.25), math.log(0.4), 0.0]], dtype=torch.float64)
    rewards, kl = kl_penalized_rewards(
        torch.tensor([1.0], dtype=torch.float64), logp, ref_logp, mask, 0.5, None, kl_estimator=kl_k3
    )
    k3 = [r - 1 - math.log(r) for r in (0.5, 2.0)]
    torch.testing.assert_close(kl, torch.tensor([[k3[0], k3[1], 0.0]], dtype=torch.float64), atol=1e-12, rtol=0)
    expected = [[-0.5 * k3[0], -0.5 * k3[1] + 1.0, 0.0]]
    torch.testing.assert_close(rewards, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)


def test_kl_penalized_rewards_rejects_bad_inputs():
    mask, zeros = torch.ones(2, 3), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="reward_clip"):
        kl_penalized_rewards(torch.zeros(2), zeros, zeros, mask, 0.1, 0.0)
    with pytest.raises(ValueError, match="scores"):
        kl_penalized_rewards(torch.zeros(3), zeros, zeros, mask, 0.1, 5.0)
    with pytest.raises(ValueError, match="all zero"):
        kl_penalized_rewards(torch.zeros(2), zeros, zeros, torch.tensor([[1.0, 0, 0], [0, 0, 0]]), 0.1, 5.0)
