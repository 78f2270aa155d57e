"""GAE against the explicit sum A_t = Σ_l (γλ)^l δ_{t+l}, computed with Python floats."""

from __future__ import annotations

import random

import pytest
import torch

from chatrlhf.rlhf import gae_advantages


def _gae_by_sum(rewards, values, length, gamma, lam):
    """Advantages and returns of one row by the double loop, V = 0 from `length` on."""
    num_steps = len(rewards)
    v = [values[t] if t < length else 0.0 for t in range(num_steps)] + [0.0]
    r = [rewards[t] if t < length else 0.0 for t in range(num_steps)]
    delta = [r[t] + gamma * v[t + 1] - v[t] for t in range(num_steps)]
    advantages = [
        sum((gamma * lam) ** k * delta[t + k] for k in range(length - t)) if t < length else 0.0
        for t in range(num_steps)
    ]
    returns = [advantages[t] + v[t] if t < length else 0.0 for t in range(num_steps)]
    return advantages, returns


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.9, 0.0)])
def test_gae_matches_explicit_sum(gamma, lam):
    rng = random.Random(0)
    num_steps, lengths = 7, [7, 4, 1, 5]
    # Garbage beyond each length: it must be ignored.
    rewards = [[rng.uniform(-2, 2) for _ in range(num_steps)] for _ in lengths]
    values = [[rng.uniform(-2, 2) for _ in range(num_steps)] for _ in lengths]
    mask = [[1.0 if t < n else 0.0 for t in range(num_steps)] for n in lengths]

    advantages, returns = gae_advantages(
        torch.tensor(rewards, dtype=torch.float64),
        torch.tensor(values, dtype=torch.float64),
        torch.tensor(mask, dtype=torch.float64),
        gamma,
        lam,
    )
    expected = [_gae_by_sum(r, v, n, gamma, lam) for r, v, n in zip(rewards, values, lengths)]
    expected_advantages = torch.tensor([a for a, _ in expected], dtype=torch.float64)
    expected_returns = torch.tensor([g for _, g in expected], dtype=torch.float64)
    torch.testing.assert_close(advantages, expected_advantages, atol=1e-12, rtol=0)
    torch.testing.assert_close(returns, expected_returns, atol=1e-12, rtol=0)
    outside = torch.tensor(mask) == 0
    assert (advantages[outside] == 0).all() and (returns[outside] == 0).all()


def test_gae_single_reward_at_end_gamma_one():
    # γ = 1, λ = 0.95, values 0: A_t = 0.95^(n−1−t)·R, G_t = A_t.
    rewards = torch.tensor([[0.0, 0.0, 0.0, 2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    advantages, returns = gae_advantages(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=0.95)
    expected = torch.tensor([[0.95**3 * 2, 0.95**2 * 2, 0.95 * 2, 2.0, 0.0]])
    torch.testing.assert_close(advantages, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(returns, expected, atol=1e-6, rtol=0)


def test_gae_outputs_carry_no_gradient():
    rewards = torch.randn(2, 3, requires_grad=True)
    values = torch.randn(2, 3, requires_grad=True)
    advantages, returns = gae_advantages(rewards, values, torch.ones(2, 3), 1.0, 0.95)
    assert not advantages.requires_grad and not returns.requires_grad


def _scatter(row_values, positions, num_steps):
    out = [0.0] * num_steps
    for p, v in zip(positions, row_values):
        out[p] = v
    return out


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.9), (0.9, 0.0)])
def test_gae_over_a_mask_with_gaps_is_gae_over_the_masked_tokens_alone(gamma, lam):
    """A multi-turn episode's mask: the policy's turns with the environment's tokens between them. The expected
    values cut the gaps out — keep the masked positions only, run the explicit sum on that compressed row — and put
    the results back; the gaps get 0."""
    rng = random.Random(1)
    num_steps = 12
    masks = [
        [1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0],  # two turns, the environment's answer between, padding after
        [0, 0, 1, 1, 0, 1, 0, 1, 1, 1, 1, 1],  # gaps of one and two tokens; the last turn fills the width
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],  # one policy token, a long gap, one more
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # a single response
    ]
    rewards = [[rng.uniform(-2, 2) for _ in range(num_steps)] for _ in masks]  # garbage in the gaps is ignored
    values = [[rng.uniform(-2, 2) for _ in range(num_steps)] for _ in masks]
    advantages, returns = gae_advantages(
        torch.tensor(rewards, dtype=torch.float64),
        torch.tensor(values, dtype=torch.float64),
        torch.tensor(masks, dtype=torch.float64),
        gamma,
        lam,
    )
    for b, m in enumerate(masks):
        on = [t for t in range(num_steps) if m[t]]
        a, g = _gae_by_sum([rewards[b][t] for t in on], [values[b][t] for t in on], len(on), gamma, lam)
        expected_a = torch.tensor(_scatter(a, on, num_steps), dtype=torch.float64)
        expected_g = torch.tensor(_scatter(g, on, num_steps), dtype=torch.float64)
        torch.testing.assert_close(advantages[b], expected_a, atol=1e-12, rtol=0)
        torch.testing.assert_close(returns[b], expected_g, atol=1e-12, rtol=0)


def test_gae_across_a_gap_takes_the_value_of_the_next_policy_token():
    """By hand, γ = 0.5, λ = 1: tokens 0 and 3 are the policy's, 1 and 2 the environment's. δ_3 = r_3 − V_3,
    δ_0 = r_0 + γ·V_3 − V_0 (V_3, not V_1), A_3 = δ_3, A_0 = δ_0 + γ·A_3: one discount step across the gap."""
    rewards = torch.tensor([[0.5, 7.0, 7.0, 2.0]])
    values = torch.tensor([[1.0, 9.0, 9.0, 3.0]])
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=0.5, lam=1.0)
    d3 = 2.0 - 3.0
    a0 = (0.5 + 0.5 * 3.0 - 1.0) + 0.5 * d3
    torch.testing.assert_close(advantages, torch.tensor([[a0, 0.0, 0.0, d3]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(returns, torch.tensor([[a0 + 1.0, 0.0, 0.0, d3 + 3.0]]), atol=1e-6, rtol=0)
