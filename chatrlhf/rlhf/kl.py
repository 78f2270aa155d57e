"""Per-token KL estimators and the KL-penalized reward of RLHF.

The estimators approximate KL(π‖π_ref) from log-probabilities of tokens sampled from π (J. Schulman,
"Approximating KL Divergence", 2020, http://joschu.net/blog/kl-approx.html). With r = π_ref(a)/π(a):
k1 = −log r (unbiased, can be negative), k2 = ½(log r)² (biased, low variance, ≥ 0),
k3 = (r − 1) − log r (unbiased, low variance, ≥ 0).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from chatrlhf.rlhf.masks import last_token_index


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = log π(a) − log π_ref(a), elementwise (Schulman 2020).

    Args:
        logp: (B, T) float — log π(a_t|s_t) of the sampled response tokens.
        ref_logp: (B, T) float — log π_ref(a_t|s_t) of the same tokens.

    Returns:
        (B, T) float — k1 per token.
    """
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = ½(log π(a) − log π_ref(a))², elementwise (Schulman 2020).

    Args:
        logp: (B, T) float — log π(a_t|s_t) of the sampled response tokens.
        ref_logp: (B, T) float — log π_ref(a_t|s_t) of the same tokens.

    Returns:
        (B, T) float — k2 per token, ≥ 0.
    """
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = (r − 1) − log r with log r = log π_ref(a) − log π(a), elementwise (Schulman 2020).

    Args:
        logp: (B, T) float — log π(a_t|s_t) of the sampled response tokens.
        ref_logp: (B, T) float — log π_ref(a_t|s_t) of the same tokens.

    Returns:
        (B, T) float — k3 per token, ≥ 0 since e^x ≥ 1 + x.
    """
    log_ratio = ref_logp - logp
    # k3 = r − 1 − log r
    return torch.exp(log_ratio) - 1 - log_ratio


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
"""Estimator name → function (logp, ref_logp) → per-token KL estimate."""


def kl_penalized_rewards(
    scores: Tensor,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    kl_coef: float,
    reward_clip: float | None,
    kl_estimator: Callable[[Tensor, Tensor], Tensor] = kl_k1,
) -> tuple[Tensor, Tensor]:
    """Per-token rewards: a KL penalty at every response token plus the reward-model score at the last one.

    r_t = −β·KL_t + [t = t_last]·clip(R, −c, c)     (InstructGPT, Ouyang et al. 2022, arXiv 2203.02155, eq. 2,
    spread over tokens as in DeepSpeed-Chat `compute_rewards`), with KL_t = kl_estimator(logp, ref_logp)_t·m_t.

    Where the score lands: DeepSpeed-Chat adds it at index `start + n` of the shifted log-prob sequence, which is
    one position past the last response token whenever padding follows the response; it lands on the last token
    only when the response fills the maximum length. Here t_last = last_token_index(mask): the last real response
    token, i.e. the EOS, or the final token when generation was cut at the length limit.

    Args:
        scores: (B,) float — reward-model score R of each full response.
        logp: (B, T) float — log π_old(a_t|s_t) of the response tokens, from the policy that sampled them.
        ref_logp: (B, T) float — log π_ref(a_t|s_t) of the same tokens under the frozen reference model.
        mask: (B, T) float — response mask; each row needs at least one real token.
        kl_coef: β, the weight of the per-token KL penalty.
        reward_clip: c; the score is clamped to [−c, c]. None applies no clamp.
        kl_estimator: per-token estimator, one of `KL_ESTIMATORS`.

    Returns:
        rewards: (B, T) float — r_t, 0 outside the mask.
        kl: (B, T) float — KL_t, 0 outside the mask.
    """
    if reward_clip is not None and reward_clip <= 0:
        raise ValueError(f"reward_clip must be positive or None, got {reward_clip}")
    if scores.shape != mask.shape[:1]:
        raise ValueError(f"scores must have shape (B,) = {tuple(mask.shape[:1])}, got {tuple(scores.shape)}")
    # KL_t, zero after the response
    kl = kl_estimator(logp, ref_logp) * mask
    # r_t = −β·KL_t
    rewards = -kl_coef * kl
    if reward_clip is not None:
        scores = scores.clamp(-reward_clip, reward_clip)
    last = last_token_index(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    # r_{t_last} += clip(R, −c, c)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards, kl


def adaptive_kl_coef(kl_coef: float, observed_kl: float, target_kl: float, horizon: int, n_steps: int) -> float:
    """The adaptive KL controller of Ziegler et al. 2019 (arXiv 1909.08593, §2.2).

    e = clip(KL / KL_target − 1, −0.2, 0.2);   β ← β·(1 + e·n / horizon)

    where KL is the observed per-sequence KL of the last batch and n the number of samples in it. β grows while
    the policy drifts past the target and shrinks while it stays below it.
    """
    if target_kl <= 0 or horizon <= 0:
        raise ValueError("target_kl and horizon must be > 0")
    error = min(max(observed_kl / target_kl - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)
