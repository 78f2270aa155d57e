"""The policy losses of DAPO (clip-higher), GSPO (sequence ratio) and CISPO (clipped stop-gradient weights), DAPO's
group filter and overlong punishment, and why a k1 KL loss is refused — against values and gradients computed by
hand, token by token."""

from __future__ import annotations

import math

import pytest
import torch

from chatrlhf.rlhf import (
    aggregate_loss,
    cispo_policy_loss,
    gspo_policy_loss,
    kl_k1,
    kl_k3,
    overlong_penalty,
    ppo_policy_loss,
    varied_groups,
)

F64 = torch.float64


def _rows(ratios, advantages):
    """One token per row: log π_θ = log ratio (log π_old = 0), a padding column that must not count."""
    logp = torch.tensor([[math.log(r), 300.0] for r in ratios], dtype=F64, requires_grad=True)
    old = torch.tensor([[0.0, -300.0]] * len(ratios), dtype=F64)
    adv = torch.tensor([[a, 5.0] for a in advantages], dtype=F64)
    mask = torch.tensor([[1.0, 0.0]] * len(ratios), dtype=F64)
    return logp, old, adv, mask


# (advantage, ratio, clipped with (ε_low, ε_high) = (0.2, 0.28)?, clipped with symmetric 0.2?)
DAPO_CASES = [
    (1.0, 1.25, False, True),  # A > 0 above 1 + ε_low but below 1 + ε_high: clip-higher lets it grow
    (1.0, 1.30, True, True),  # above 1 + ε_high: capped either way
    (-1.0, 0.79, True, True),  # A < 0 below 1 − ε_low: the low side is not raised
    (-1.0, 0.85, False, False),
    (-1.0, 1.25, False, False),  # A < 0 above the range: the unclipped term is the larger loss
    (1.0, 0.7, False, False),  # A > 0 below the range: likewise
]


@pytest.mark.parametrize("high, column", [(0.28, 2), (0.2, 3)])
def test_dapo_clip_is_asymmetric(high, column):
    ratios, advantages = [c[1] for c in DAPO_CASES], [c[0] for c in DAPO_CASES]
    logp, old, adv, mask = _rows(ratios, advantages)
    per_token, stats = ppo_policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=high)
    loss = aggregate_loss(per_token, mask)
    n = len(DAPO_CASES)
    expected = [max(-a * r, -a * min(max(r, 0.8), 1 + high)) for a, r in zip(advantages, ratios)]
    assert loss.item() == pytest.approx(sum(expected) / n, abs=1e-12)
    assert stats.clipfrac.item() == pytest.approx(sum(c[column] for c in DAPO_CASES) / n, abs=1e-12)
    (grad,) = torch.autograd.grad(loss, logp)
    for row, case in enumerate(DAPO_CASES):
        a, r, clipped = case[0], case[1], case[column]
        # ∂(−A·ρ)/∂log π = −A·ρ where unclipped; a clipped token has no gradient
        assert grad[row, 0].item() == pytest.approx(0.0 if clipped else -a * r / n, abs=1e-12)
        assert grad[row, 1].item() == 0.0


def test_gspo_uses_the_length_normalised_sequence_ratio():
    gen = torch.Generator().manual_seed(0)
    lengths = [3, 1, 4]  # the 9.0 log-ratios of `log_ratio` below are padding
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(4)] for n in lengths], dtype=F64)
    logp = (-torch.rand(3, 4, generator=gen, dtype=F64)).requires_grad_()
    # log π_θ − log π_old per token; mean 0.03 (s above 1 + ε_high, A > 0: clipped), −0.005 (inside), −0.05 (below
    # 1 − ε_low with A > 0: the unclipped term is the larger loss)
    log_ratio = torch.tensor([[0.1, -0.05, 0.04, 9.0], [-0.005, 9.0, 9.0, 9.0], [0.02, -0.1, -0.12, 0.0]], dtype=F64)
    old = logp.detach() - log_ratio
    seq_adv = [1.5, -0.7, 0.4]
    adv = torch.tensor(seq_adv, dtype=F64).unsqueeze(1) * mask
    lo, hi = 0.01, 0.02
    per_token, stats = gspo_policy_loss(logp, old, adv, mask, lo, hi)
    loss = aggregate_loss(per_token, mask, "seq_mean_token_mean")

    expected, expected_grad, clipped = 0.0, torch.zeros(3, 4, dtype=F64), []
    for i, n in enumerate(lengths):
        # s_i = exp((1/|y_i|)·Σ_t (log π_θ − log π_old))
        s = math.exp(sum(logp[i, t].item() - old[i, t].item() for t in range(n)) / n)
        a = seq_adv[i]
        unclipped, clip = -a * s, -a * min(max(s, 1 - lo), 1 + hi)
        expected += max(unclipped, clip) / 3
        clipped.append(clip > unclipped)
        for t in range(n):
            # GSPO's gradient: −A_i·s_i·(1/|y_i|)·∇log π(y_i,t), divided by G = 3 sequences; 0 for a clipped one
            expected_grad[i, t] = 0.0 if clipped[-1] else -a * s / n / 3
    assert clipped == [True, False, False]
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=0)
    # the clip acts on whole sequences: the fraction of tokens clipped is that of the clipped sequences' tokens
    assert stats.clipfrac.item() == pytest.approx(sum(n for n, c in zip(lengths, clipped) if c) / 8, abs=1e-12)


def test_gspo_clips_the_sequence_not_its_tokens():
    """Token ratios of 1.5 and 1/1.5 average (geometrically) to 1: PPO clips the first, GSPO neither."""
    logp = torch.tensor([[math.log(1.5), math.log(1 / 1.5)]], dtype=F64, requires_grad=True)
    old, adv, mask = torch.zeros(1, 2, dtype=F64), torch.ones(1, 2, dtype=F64), torch.ones(1, 2, dtype=F64)
    _, gspo = gspo_policy_loss(logp, old, adv, mask, 0.2, 0.2)
    _, ppo = ppo_policy_loss(logp, old, adv, mask, 0.2, 0.2)
    assert gspo.clipfrac.item() == 0.0 and gspo.ratio_mean.item() == pytest.approx(1.0, abs=1e-12)
    assert ppo.clipfrac.item() == 0.5  # the 1.5 token (A > 0); the other is below the range, unclipped


def test_cispo_weights_are_clipped_and_carry_no_gradient():
    ratios, advantages = [1.5, 0.5, 1.05, 0.9], [1.0, -2.0, 0.5, 3.0]
    logp, old, adv, mask = _rows(ratios, advantages)
    lo, hi = 0.2, 0.1
    per_token, stats = cispo_policy_loss(logp, old, adv, mask, lo, hi)
    loss = aggregate_loss(per_token, mask)
    weights = [min(max(r, 1 - lo), 1 + hi) for r in ratios]  # 1.1, 0.8, 1.05, 0.9
    n = len(ratios)
    # ℓ = −ŵ·A·log π_θ
    expected = sum(-w * a * math.log(r) for w, a, r in zip(weights, advantages, ratios)) / n
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    (grad,) = torch.autograd.grad(loss, logp)
    # ∂ℓ/∂log π = −ŵ·A: no term from the weight's own dependence on π_θ, and a clipped token keeps its gradient
    for row, (w, a) in enumerate(zip(weights, advantages)):
        assert grad[row, 0].item() == pytest.approx(-w * a / n, abs=1e-12)
    assert grad[0, 0].item() != 0.0  # clipped above: PPO would give 0 here
    assert stats.clipfrac.item() == pytest.approx(2 / 4, abs=1e-12)


def test_cispo_at_ratio_one_is_reinforce():
    logp = torch.tensor([[-0.5, -1.2]], dtype=F64, requires_grad=True)
    adv, mask = torch.tensor([[2.0, 2.0]], dtype=F64), torch.ones(1, 2, dtype=F64)
    per_token, _ = cispo_policy_loss(logp, logp.detach(), adv, mask, 1.0, 0.28)
    (grad,) = torch.autograd.grad(aggregate_loss(per_token, mask), logp)
    # REINFORCE: ∇(−A·log π) / N
    torch.testing.assert_close(grad, torch.tensor([[-1.0, -1.0]], dtype=F64), atol=1e-12, rtol=0)


def test_varied_groups():
    scores = torch.tensor([0.5, 0.5, 0.5, 1.0, 0.0, 1.0, 0.3, 0.3, 0.3000001])
    assert varied_groups(scores, 3).tolist() == [False, True, True]


@pytest.mark.parametrize("length, expected", [(0, 0.0), (12, 0.0), (13, -0.25), (14, -0.5), (16, -1.0), (20, -1.0)])
def test_overlong_penalty(length, expected):
    # L_max 16, L_cache 4: free up to 12 tokens, then −(|y| − 12)/4, −1 at the limit and beyond
    out = overlong_penalty(torch.tensor([length]), max_len=16, buffer=4, factor=1.0)
    assert out.item() == pytest.approx(expected, abs=1e-7)
    assert overlong_penalty(torch.tensor([length]), 16, 4, factor=0.5).item() == pytest.approx(expected / 2, abs=1e-7)


def test_overlong_penalty_rejects_a_bad_buffer():
    with pytest.raises(ValueError, match="overlong buffer"):
        overlong_penalty(torch.tensor([3]), max_len=8, buffer=9)


def test_k1_as_a_loss_ignores_the_reference():
    """Why `kl.placement: loss` with k1 is refused: ∇(log π_θ − log π_ref) = ∇log π_θ, whatever the reference,
    and its expectation over samples of π_θ is 0 (Σ_a π·∇log π = ∇Σ_a π = 0); k3's gradient depends on it."""
    z = torch.tensor([0.3, -1.0, 0.5], dtype=F64, requires_grad=True)
    logp_all = torch.log_softmax(z, 0)
    probs = logp_all.exp().detach()
    grads = {}
    references = {"near": [-1.0, -1.2, -1.1], "far": [-0.1, -5.0, -3.0]}
    for name, values in references.items():
        ref = torch.tensor(values, dtype=F64)
        for est_name, est in (("k1", kl_k1), ("k3", kl_k3)):
            # E_{a~π}[∇ k(a)] = Σ_a π(a)·∇k(log π(a), log π_ref(a)), π held fixed as the sampling distribution
            expectation = sum(probs[a] * est(logp_all[a], ref[a]) for a in range(3))
            (grads[name, est_name],) = torch.autograd.grad(expectation, z, retain_graph=True)
    torch.testing.assert_close(grads["near", "k1"], grads["far", "k1"], atol=1e-12, rtol=0)
    torch.testing.assert_close(grads["near", "k1"], torch.zeros(3, dtype=F64), atol=1e-12, rtol=0)
    assert not torch.allclose(grads["near", "k3"], grads["far", "k3"])
