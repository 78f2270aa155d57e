"""Generalized advantage estimation (GAE)."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def gae_advantages(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Advantages and returns by GAE (Schulman et al. 2016, arXiv 1506.02438, eq. 16).

    δ_t = r_t + γ·V_{t+1} − V_t,   A_t = Σ_l (γλ)^l δ_{t+l} = δ_t + γλ·A_{t+1},   G_t = A_t + V_t.

    Rewards and values are zeroed outside the mask, so V is 0 beyond the last real token (the episode ends there)
    and A, G are 0 after it. Computed without autograd: advantages and returns are fixed targets for PPO.

    Args:
        rewards: (B, T) float — per-token rewards r_t, e.g. from `kl_penalized_rewards`.
        values: (B, T) float — critic values V(s_t) of the states before each response token.
        mask: (B, T) float — response mask (a contiguous prefix of 1s).
        gamma: γ, the discount.
        lam: λ, the GAE bias/variance trade-off.

    Returns:
        advantages: (B, T) float — A_t, 0 outside the mask.
        returns: (B, T) float — G_t = A_t + V_t, the critic's regression target, 0 outside the mask.
    """
    rewards = rewards * mask
    values = values * mask
    num_steps = rewards.shape[1]
    last_gae = torch.zeros_like(rewards[:, 0])
    reversed_advantages = []
    for t in reversed(range(num_steps)):
        # V beyond the last position is 0
        next_values = values[:, t + 1] if t + 1 < num_steps else torch.zeros_like(last_gae)
        # δ_t = r_t + γ·V(s_{t+1}) − V(s_t)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        # A_t = δ_t + γλ·A_{t+1}
        last_gae = delta + gamma * lam * last_gae
        reversed_advantages.append(last_gae)
    advantages = torch.stack(reversed_advantages[::-1], dim=1) * mask
    # G_t = A_t + V_t
    returns = (advantages + values) * mask
    return advantages, returns
