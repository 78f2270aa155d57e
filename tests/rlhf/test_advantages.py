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
