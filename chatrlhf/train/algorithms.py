"""The RL algorithms as data: which models each needs and how it turns scores into advantages.

`ALGORITHMS[name]` is looked up once when the run is built; the RL step then calls `algo.advantages(...)` with
no branching on the algorithm's name. Each advantage function composes the pure math of `chatrlhf/rlhf/`:

| algo          | critic | samples/prompt | advantage                                                                  |
|---------------|--------|----------------|----------------------------------------------------------------------------|
| ppo           | yes    | 1 (or n)       | GAE over KL-shaped per-token rewards, optionally whitened                  |
| grpo          | no     | n ≥ 2          | (R − mean_g R) / std_g R  (Dr. GRPO: no std), R = clip(score) − β·ΣKL      |
| rloo          | no     | n ≥ 2          | R − mean of the other samples' R                                           |
| reinforce_pp  | no     | 1 (or n)       | discounted KL-shaped returns, whitened over the batch (−group mean first)  |
| remax         | no     | 1 + greedy     | R − R(greedy response)                                                     |

With `kl_in: loss` the KL is not in R (β_reward = 0) and the update adds β·KL to the policy loss instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from chatrlhf.config import RLTrainConfig
from chatrlhf.rlhf import (
    KL_ESTIMATORS,
    discounted_returns,
    gae_advantages,
    grpo_advantages,
    kl_penalized_rewards,
    masked_whiten,
    remax_advantages,
    rloo_advantages,
    sequence_to_tokens,
)


@dataclass
class AdvantageInputs:
    """Everything an advantage function may use; (B, T) tensors are over response positions."""

    scores: torch.Tensor
    """(B,) summed reward of each sampled response (reward model and/or functions), before clipping."""
    old_logprobs: torch.Tensor
    """(B, T) log π_old of the sampled tokens."""
    ref_logprobs: torch.Tensor
    """(B, T) log π_ref of the sampled tokens."""
    mask: torch.Tensor
    """(B, T) response mask."""
    kl_coef: float
    """β shaped into the reward (0 when the KL is a loss term instead)."""
    values: torch.Tensor | None = None
    """(B, T) critic values (PPO only)."""
    greedy_scores: torch.Tensor | None = None
    """(B,) reward of the greedy response to the same prompt (ReMax only)."""


@dataclass
class Advantages:
    rewards: torch.Tensor
    """(B, T) KL-shaped per-token rewards (the score at the last response token)."""
    kl: torch.Tensor
    """(B, T) per-token KL estimate of π_old against π_ref (masked)."""
    advantages: torch.Tensor
    """(B, T) advantage of each response token."""
    returns: torch.Tensor | None
    """(B, T) value targets (PPO only)."""


def _shaped(x: AdvantageInputs, t: RLTrainConfig, scores: torch.Tensor | None = None):
    """r_t = −β·KL_t, plus clip(score) at the last response token."""
    p = t.ppo
    s = x.scores if scores is None else scores
    return kl_penalized_rewards(
        s, x.old_logprobs, x.ref_logprobs, x.mask, x.kl_coef, p.reward_clip, KL_ESTIMATORS[p.kl_estimator]
    )


def ppo(x: AdvantageInputs, t: RLTrainConfig) -> Advantages:
    rewards, kl = _shaped(x, t)
    advantages, returns = gae_advantages(rewards, x.values, x.mask, t.ppo.gamma, t.ppo.lam)
    if t.ppo.whiten_advantages:
        advantages = masked_whiten(advantages, x.mask)
    return Advantages(rewards, kl, advantages, returns)


def _sequence_level(x: AdvantageInputs, t: RLTrainConfig, baseline: Callable[[torch.Tensor], torch.Tensor]):
    """R = clip(score) − β·Σ_t KL_t per sequence, then a baseline over R, broadcast to the tokens."""
    rewards, kl = _shaped(x, t)
    sequence_reward = rewards.sum(dim=1)
    return Advantages(rewards, kl, sequence_to_tokens(baseline(sequence_reward), x.mask), None)


def grpo(x: AdvantageInputs, t: RLTrainConfig) -> Advantages:
    return _sequence_level(x, t, lambda r: grpo_advantages(r, t.group_size, t.grpo_scale_by_std))


def rloo(x: AdvantageInputs, t: RLTrainConfig) -> Advantages:
    return _sequence_level(x, t, lambda r: rloo_advantages(r, t.group_size))


def remax(x: AdvantageInputs, t: RLTrainConfig) -> Advantages:
    # The greedy response is scored with the same clip; its KL term is not part of the baseline (ReMax, eq. 6,
    # uses the reward alone), so subtract its clipped score from each sampled sequence's KL-shaped return.
    greedy = x.greedy_scores.clamp(-t.ppo.reward_clip, t.ppo.reward_clip)
    return _sequence_level(x, t, lambda r: remax_advantages(r, greedy))


def reinforce_pp(x: AdvantageInputs, t: RLTrainConfig) -> Advantages:
    scores = x.scores
    if t.group_baseline:
        # REINFORCE++-baseline: centre each prompt's scores on its group mean before shaping
        scores = grpo_advantages(scores, t.group_size, scale_by_std=False)
    rewards, kl = _shaped(x, t, scores)
    returns = discounted_returns(rewards, x.mask, t.ppo.gamma)
    # batch-global normalisation of the returns is REINFORCE++'s advantage (arXiv 2501.03262, §3.2)
    return Advantages(rewards, kl, masked_whiten(returns, x.mask), None)


@dataclass(frozen=True)
class Algorithm:
    name: str
    uses_critic: bool
    needs_greedy: bool
    advantages: Callable[[AdvantageInputs, RLTrainConfig], Advantages]


ALGORITHMS = {
    "ppo": Algorithm("ppo", uses_critic=True, needs_greedy=False, advantages=ppo),
    "grpo": Algorithm("grpo", uses_critic=False, needs_greedy=False, advantages=grpo),
    "rloo": Algorithm("rloo", uses_critic=False, needs_greedy=False, advantages=rloo),
    "reinforce_pp": Algorithm("reinforce_pp", uses_critic=False, needs_greedy=False, advantages=reinforce_pp),
    "remax": Algorithm("remax", uses_critic=False, needs_greedy=True, advantages=remax),
}
