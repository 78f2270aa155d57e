"""Advantage estimators: GAE for PPO (`gae_advantages`), and the critic-free ones — discounted returns
(REINFORCE++), group-normalised rewards (GRPO, Dr. GRPO), the leave-one-out baseline (RLOO) and the greedy
baseline (ReMax) — plus `sequence_to_tokens`, which spreads a sequence-level advantage over its tokens, and
`varied_groups`, the filter of DAPO's dynamic sampling."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def gae_advantages(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Advantages and returns by GAE (Schulman et al. 2016, arXiv 1506.02438, eq. 16).

    δ_t = r_t + γ·V_{t'} − V_t,   A_t = δ_t + γλ·A_{t'},   G_t = A_t + V_t,

    where t' is the next position of the mask after t: t + 1 for a single response, whose mask is a contiguous
    prefix. The mask may have gaps — the environment's tokens between the policy's turns of a multi-turn episode
    (docs/episodes.md) — and the recursion then runs over the masked tokens only, as if the gaps were cut out: the
    next value of a policy token is the value at the next POLICY token (the state after the environment answered),
    and the tokens in the gaps get no advantage or return. Past the last masked token V = 0 (the episode ends
    there). Computed without autograd: advantages and returns are fixed targets for PPO.

    Args:
        rewards: (B, T) float — per-token rewards r_t, e.g. from `kl_penalized_rewards`.
        values: (B, T) float — critic values V(s_t) of the states before each response token.
        mask: (B, T) float — 1 on the tokens the policy sampled (a contiguous prefix of 1s for single responses).
        gamma: γ, the discount (per policy token).
        lam: λ, the GAE bias/variance trade-off.

    Returns:
        advantages: (B, T) float — A_t, 0 outside the mask.
        returns: (B, T) float — G_t = A_t + V_t, the critic's regression target, 0 outside the mask.
    """
    rewards = rewards * mask
    values = values * mask
    on = mask != 0
    last_gae = torch.zeros_like(rewards[:, 0])
    next_values = torch.zeros_like(rewards[:, 0])  # V at the next masked position; 0 past the last
    reversed_advantages = []
    for t in reversed(range(rewards.shape[1])):
        # δ_t = r_t + γ·V(s_t') − V(s_t)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        # A_t = δ_t + γλ·A_t'
        gae = delta + gamma * lam * last_gae
        reversed_advantages.append(gae)
        # a token off the mask (an environment's) leaves the recursion as it was: t' skips it
        last_gae = torch.where(on[:, t], gae, last_gae)
        next_values = torch.where(on[:, t], values[:, t], next_values)
    advantages = torch.stack(reversed_advantages[::-1], dim=1) * mask
    # G_t = A_t + V_t
    returns = (advantages + values) * mask
    return advantages, returns


def _groups(scores: Tensor, group_size: int) -> Tensor:
    """(B,) → (B / n, n): samples of one prompt are contiguous."""
    if scores.ndim != 1 or group_size < 1 or scores.shape[0] % group_size:
        raise ValueError(f"scores of shape {tuple(scores.shape)} do not split into groups of {group_size}")
    return scores.view(-1, group_size)


@torch.no_grad()
def grpo_advantages(scores: Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024, arXiv 2402.03300, §4.1.2, outcome supervision).

    A_i = (r_i − mean_g(r)) / (std_g(r) + ε), std with Bessel's correction (n − 1) as in the paper's reference
    implementations; with `scale_by_std=False` A_i = r_i − mean_g(r) (Dr. GRPO, Liu et al. 2025, arXiv 2503.20783,
    which removes the std division that over-weights near-unanimous groups). A group of identical rewards gets 0.

    scores: (B,) float — sequence rewards, B = prompts × group_size, each prompt's samples contiguous.
    Returns (B,) float — one advantage per sequence (broadcast over its tokens by the caller).
    """
    g = _groups(scores, group_size)
    centered = g - g.mean(dim=1, keepdim=True)
    if scale_by_std:
        if group_size < 2:
            raise ValueError("GRPO's std needs group_size >= 2")
        centered = centered / (g.std(dim=1, keepdim=True) + eps)
    return centered.reshape(-1)


@torch.no_grad()
def rloo_advantages(scores: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, arXiv 2402.14740, eq. 5).

    A_i = r_i − 1/(n−1)·Σ_{j≠i} r_j: each sample's baseline is the mean reward of the OTHER samples of its prompt,
    so it is independent of the sample's own action (unbiased).

    scores: (B,) float, prompts × group_size contiguous. Returns (B,) float.
    """
    if group_size < 2:
        raise ValueError("RLOO needs group_size >= 2")
    g = _groups(scores, group_size)
    # baseline_i = (Σ_j r_j − r_i) / (n − 1)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - baseline).reshape(-1)


@torch.no_grad()
def remax_advantages(scores: Tensor, greedy_scores: Tensor) -> Tensor:
    """ReMax (Li et al. 2023, arXiv 2310.10505, eq. 6): A_i = r(x, y_i) − r(x, ŷ), ŷ the greedy response.

    scores: (B,) float — rewards of sampled responses; greedy_scores: (B,) float — the greedy response's reward
    for the same prompt. Returns (B,) float.
    """
    if scores.shape != greedy_scores.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and greedy_scores {tuple(greedy_scores.shape)} differ")
    return scores - greedy_scores


@torch.no_grad()
def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """G_t = Σ_{k≥t, k masked} γ^{n(t,k)} r_k over the masked response (REINFORCE++, Hu 2025, arXiv 2501.03262, §3),
    n(t, k) the masked tokens after t up to k: G_t = r_t + γ·G_t', t' the next masked position. The mask may have
    gaps (an episode's environment tokens, docs/episodes.md); they are not discount steps and get no return.

    rewards: (B, T) float — per-token rewards (KL-shaped, the score at the last token); mask: (B, T) float.
    Returns (B, T) float, 0 outside the mask.
    """
    rewards = rewards * mask
    on = mask != 0
    running = torch.zeros_like(rewards[:, 0])
    out = []
    for t in reversed(range(rewards.shape[1])):
        # G_t = r_t + γ·G_t'; a token off the mask leaves G as it was
        running = torch.where(on[:, t], rewards[:, t] + gamma * running, running)
        out.append(running)
    return torch.stack(out[::-1], dim=1) * mask


def sequence_to_tokens(advantages: Tensor, mask: Tensor) -> Tensor:
    """(B,) sequence advantages → (B, T): every response token of a sequence gets its sequence's advantage."""
    return advantages.unsqueeze(1) * mask


@torch.no_grad()
def varied_groups(scores: Tensor, group_size: int) -> Tensor:
    """Which groups' rewards are not all equal: the groups DAPO's dynamic sampling keeps (Yu et al. 2025,
    arXiv 2503.14476, §3.2: prompts whose samples are all right or all wrong are dropped).

    A group of equal rewards has a group-relative advantage of 0 for every sample, so it adds no gradient but
    dilutes the batch. The comparison is exact (max = min), as for DAPO's 0/1 accuracy.

    scores: (B,) float — sequence rewards, B = prompts × group_size, each prompt's samples contiguous.
    Returns (B / group_size,) bool — True where the group's rewards differ.
    """
    g = _groups(scores, group_size)
    return g.amax(dim=1) > g.amin(dim=1)
