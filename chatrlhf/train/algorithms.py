"""The RL algorithms as data: what each asks of the run, how it turns scores into advantages, which policy loss it
minimises and how it samples.

`ALGORITHMS[name]` is looked up once when the run is built; the iteration then calls `algo.advantages(...)`,
`algo.policy_loss` (through `train/update.py:Objective`) and `algo.sample(...)` with no branching on the name.
Each piece composes the pure math of `chatrlhf/rlhf/`; the rules (models, group sizes, sampling) are
`config.ALGORITHM_RULES`, checked when the config is validated:

| algo         | critic | group      | advantage                                         | policy loss  | sampling |
|--------------|--------|------------|---------------------------------------------------|--------------|----------|
| ppo          | yes    | 1 (or n)   | GAE over KL-shaped token rewards (opt. whitened)  | clipped ρ_t  | once     |
| grpo         | no     | n ≥ 2      | (R − mean_g R) / std_g R, R = clip(score) − β·ΣKL | clipped ρ_t  | once     |
| dr_grpo      | no     | n ≥ 2      | R − mean_g R                                      | clipped ρ_t  | once     |
| rloo         | no     | n ≥ 2      | R − mean of the other samples' R                  | clipped ρ_t  | once     |
| reinforce_pp | no     | 1 (or n)   | discounted KL-shaped returns, batch-whitened      | clipped ρ_t  | once     |
| remax        | no     | 1 + greedy | R − R(greedy response)                            | clipped ρ_t  | once     |
| dapo         | no     | n ≥ 2      | as grpo                                           | clipped ρ_t  | dynamic  |
| gspo         | no     | n ≥ 2      | as grpo                                           | clipped s_i  | once     |
| cispo        | no     | n ≥ 2      | as grpo                                           | sg[clip ρ]·A | once     |

The clip range is (ε_low, ε_high) = `train.loss.clip_low/clip_high` for every loss; DAPO's clip-higher, token-level
loss and overlong shaping are settings any algorithm may use (recipes/demo-dapo.yaml sets them). With `kl.placement:
loss` the KL is not in R (β_reward = 0) and the update adds β·KL to the policy loss instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from chatrlhf.config import ALGORITHM_RULES, AlgorithmRules, RLTrainConfig
from chatrlhf.rlhf import (
    KL_ESTIMATORS,
    PolicyLoss,
    cispo_policy_loss,
    discounted_returns,
    gae_advantages,
    grpo_advantages,
    gspo_policy_loss,
    kl_penalized_rewards,
    masked_whiten,
    overlong_penalty,
    ppo_policy_loss,
    remax_advantages,
    rloo_advantages,
    run_lengths,
    sequence_to_tokens,
)
from chatrlhf.train.rollout import SAMPLERS, Sampler


@dataclass
class AdvantageInputs:
    """Everything an advantage function may use; (B, T) tensors are over response positions."""

    scores: torch.Tensor
    """(B,) summed reward of each sampled response (reward model and/or functions), before clipping."""
    old_logprobs: torch.Tensor | None
    """(B, T) log π_old of the sampled tokens; None when the update takes them from its own forward (then
    `kl_coef` is 0, and the KL of the result is 0 until the caller fills it in, train/rl.py)."""
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
    turn_scores: torch.Tensor | None = None
    """(B, T) with `train.episode.credit: turn`: the environment's weighted turn rewards, each at the last token of
    its policy turn (`scores` then leaves them out); None puts everything in `scores`."""


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
    length_penalty: torch.Tensor | None = None
    """(B,) DAPO's overlong punishment added to each sequence's reward (None when off)."""


def _shaped(x: AdvantageInputs, t: RLTrainConfig, scores: torch.Tensor | None = None):
    """r_t = −β·KL_t, plus clip(score) + R_length at the last response token; R_length is DAPO's overlong
    punishment (0 when `reward.overlong_buffer` is 0): of the response's length, or on a multi-turn episode the sum
    over its policy turns of each turn's (every turn is bounded by max_new_tokens alike)."""
    s = (x.scores if scores is None else scores).clamp(-t.reward.clip, t.reward.clip)
    penalty = None
    if t.reward.overlong_buffer > 0:
        turns = run_lengths(x.mask)  # one run per response, one per policy turn of an episode
        per_turn = overlong_penalty(
            turns.flatten(), t.generation.max_new_tokens, t.reward.overlong_buffer, t.reward.overlong_penalty
        ).view_as(turns)
        penalty = (per_turn * (turns > 0)).sum(dim=1)
        s = s + penalty
    old = x.old_logprobs
    if old is None:
        if x.kl_coef != 0:
            raise ValueError("a KL penalty in the reward needs π_old's log-probs before the update")
        old = x.ref_logprobs  # KL_t = 0 here: with β = 0 the rewards do not depend on it
    rewards, kl = kl_penalized_rewards(s, old, x.ref_logprobs, x.mask, x.kl_coef, None, KL_ESTIMATORS[t.kl.estimator])
    if x.turn_scores is not None:  # per-turn credit: each turn's reward at its last token, clipped like the score
        rewards = rewards + x.turn_scores.clamp(-t.reward.clip, t.reward.clip) * x.mask
    return rewards, kl, penalty


def ppo(x: AdvantageInputs, t: RLTrainConfig) -> Advantages:
    rewards, kl, penalty = _shaped(x, t)
    advantages, returns = gae_advantages(rewards, x.values, x.mask, t.advantage.gamma, t.advantage.lam)
    if t.advantage.whiten:
        advantages = masked_whiten(advantages, x.mask)
    return Advantages(rewards, kl, advantages, returns, penalty)


def _sequence_level(x: AdvantageInputs, t: RLTrainConfig, baseline: Callable[[torch.Tensor], torch.Tensor]):
    """R = clip(score) (+ R_length) − β·Σ_t KL_t per sequence, then a baseline over R, broadcast to the tokens."""
    rewards, kl, penalty = _shaped(x, t)
    sequence_reward = rewards.sum(dim=1)
    return Advantages(rewards, kl, sequence_to_tokens(baseline(sequence_reward), x.mask), None, penalty)


def grpo(x: AdvantageInputs, t: RLTrainConfig) -> Advantages:
    return _sequence_level(x, t, lambda r: grpo_advantages(r, t.group_size, scale_by_std=True))


def dr_grpo(x: AdvantageInputs, t: RLTrainConfig) -> Advantages:
    return _sequence_level(x, t, lambda r: grpo_advantages(r, t.group_size, scale_by_std=False))


def rloo(x: AdvantageInputs, t: RLTrainConfig) -> Advantages:
    return _sequence_level(x, t, lambda r: rloo_advantages(r, t.group_size))


def remax(x: AdvantageInputs, t: RLTrainConfig) -> Advantages:
    # The greedy response is scored with the same clip; its KL term is not part of the baseline (ReMax, eq. 6,
    # uses the reward alone), so subtract its clipped score from each sampled sequence's KL-shaped return.
    greedy = x.greedy_scores.clamp(-t.reward.clip, t.reward.clip)
    return _sequence_level(x, t, lambda r: remax_advantages(r, greedy))


def reinforce_pp(x: AdvantageInputs, t: RLTrainConfig) -> Advantages:
    scores = x.scores
    if t.advantage.group_baseline:
        # REINFORCE++-baseline: centre each prompt's scores on its group mean before shaping
        scores = grpo_advantages(scores, t.group_size, scale_by_std=False)
    rewards, kl, penalty = _shaped(x, t, scores)
    returns = discounted_returns(rewards, x.mask, t.advantage.gamma)
    # batch-global normalisation of the returns is REINFORCE++'s advantage (arXiv 2501.03262, §3.2)
    return Advantages(rewards, kl, masked_whiten(returns, x.mask), None, penalty)


@dataclass(frozen=True)
class Algorithm:
    name: str
    rules: AlgorithmRules
    """What it asks of the run (config.ALGORITHM_RULES): a critic, a greedy baseline, its sampling, group sizes."""
    advantages: Callable[[AdvantageInputs, RLTrainConfig], Advantages]
    policy_loss: PolicyLoss
    """Per-token policy loss (rlhf/losses.py), reduced by `train.loss.aggregation`."""

    @property
    def uses_critic(self) -> bool:
        return self.rules.critic

    @property
    def needs_greedy(self) -> bool:
        return self.rules.greedy_baseline

    @property
    def sample(self) -> Sampler:
        """How an iteration's rollout batch is drawn (train/rollout.py: one round, or DAPO's dynamic sampling)."""
        return SAMPLERS[self.rules.sampling]


def _algorithm(name: str, advantages, policy_loss: PolicyLoss = ppo_policy_loss) -> Algorithm:
    return Algorithm(name, ALGORITHM_RULES[name], advantages, policy_loss)


ALGORITHMS = {
    "ppo": _algorithm("ppo", ppo),
    "grpo": _algorithm("grpo", grpo),
    "dr_grpo": _algorithm("dr_grpo", dr_grpo),
    "rloo": _algorithm("rloo", rloo),
    "reinforce_pp": _algorithm("reinforce_pp", reinforce_pp),
    "remax": _algorithm("remax", remax),
    "dapo": _algorithm("dapo", grpo),
    "gspo": _algorithm("gspo", grpo, gspo_policy_loss),
    "cispo": _algorithm("cispo", grpo, cispo_policy_loss),
}
