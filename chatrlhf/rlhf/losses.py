"""Token log-probabilities, loss aggregation, and the losses of the three RLHF stages.

SFT: `lm_loss`. Reward model: `pairwise_loss`. RL: the per-token policy losses `ppo_policy_loss` (PPO's clipped
surrogate, DAPO's decoupled clip), `gspo_policy_loss` (sequence-level ratio) and `cispo_policy_loss` (clipped
stop-gradient weights), and `value_loss` (the critic). DPO and IPO: `dpo_loss`. Each per-token loss is reduced by
`aggregate_loss`, the one place where token-mean vs sequence-mean and gradient-accumulation scaling are decided.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from chatrlhf.rlhf.masks import masked_sum


def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """log π(y_t | y_<t): the log-softmax of the logits at the label tokens.

    log p_t = z_{t, y_t} − log Σ_v exp(z_{t, v}), computed in float32 (float64 if the logits are float64). Rows
    are done one at a time: besides the log-softmax outputs that autograd keeps, only one (T, V) float32 copy of
    the logits exists at once, instead of a (B, T, V) one.

    Args:
        logits: (B, T, V) float — logits already aligned with `labels` (the caller shifts them).
        labels: (B, T) long — token ids to score.

    Returns:
        (B, T) float32 (float64 for float64 logits) — log-probabilities of the labels.
    """
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    rows = []
    for row_logits, row_labels in zip(logits, labels):
        row_logprobs = F.log_softmax(row_logits.to(compute_dtype), dim=-1)
        rows.append(row_logprobs.gather(dim=-1, index=row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the next-token distribution at each position, computed in at least float32.

    H_t = −Σ_v p_v log p_v = log Σ_v exp(z_v) − Σ_v p_v z_v, with p = softmax(z).

    Args:
        logits: (B, T, V) float — logits.

    Returns:
        (B, T) float32 (float64 for float64 logits) — entropy in nats.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    probs = F.softmax(logits, dim=-1)
    # H = logsumexp(z) − Σ p·z
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def _token_mean(per_token: Tensor, mask: Tensor, total_tokens: float | None, total_seqs: int | None) -> Tensor:
    # Σ_{b,t} ℓ·m / N_tokens
    if total_tokens is None:
        total_tokens = mask.sum()
    if total_tokens == 0:
        raise ValueError("token_mean loss with total_tokens == 0: the batch holds no response tokens")
    return masked_sum(per_token, mask) / total_tokens


def _seq_mean_token_mean(per_token: Tensor, mask: Tensor, total_tokens: float | None, total_seqs: int | None) -> Tensor:
    # Σ_b (Σ_t ℓ·m / Σ_t m) / N_seqs; a row without tokens (e.g. filtered out of the loss) adds 0
    tokens_per_seq = mask.sum(dim=1)
    if total_seqs is None:
        total_seqs = int((tokens_per_seq > 0).sum())
    if total_seqs == 0:
        raise ValueError("seq_mean_token_mean loss with total_seqs == 0: no sequence holds a token")
    return (masked_sum(per_token, mask, dim=1) / tokens_per_seq.clamp(min=1)).sum() / total_seqs


def _seq_mean_token_sum(per_token: Tensor, mask: Tensor, total_tokens: float | None, total_seqs: int | None) -> Tensor:
    # Σ_{b,t} ℓ·m / N_seqs
    if total_seqs is None:
        total_seqs = int((mask.sum(dim=1) > 0).sum())
    if total_seqs == 0:
        raise ValueError("seq_mean_token_sum loss with total_seqs == 0")
    return masked_sum(per_token, mask) / total_seqs


_AGGREGATORS: dict[str, Callable[[Tensor, Tensor, float | None, int | None], Tensor]] = {
    "token_mean": _token_mean,
    "seq_mean_token_mean": _seq_mean_token_mean,
    "seq_mean_token_sum": _seq_mean_token_sum,
}

LOSS_AGGREGATIONS = tuple(_AGGREGATORS)
"""Names accepted by `aggregate_loss(mode=...)`."""


def aggregate_loss(
    per_token: Tensor,
    mask: Tensor,
    mode: str = "token_mean",
    total_tokens: float | None = None,
    total_seqs: int | None = None,
) -> Tensor:
    """Reduce a per-token loss to a scalar.

    Modes, with N_tokens = `total_tokens` (default Σ m) and N_seqs = `total_seqs` (default: the rows of `mask`
    that hold a token; a row without tokens adds nothing to any mode):
      - "token_mean":          L = Σ_{b,t} ℓ_{b,t}·m_{b,t} / N_tokens — every token weighs the same
        (DeepSpeed-Chat's actor and critic losses, with N_tokens the tokens of the batch).
      - "seq_mean_token_mean": L = Σ_b (Σ_t ℓ_{b,t}·m_{b,t} / Σ_t m_{b,t}) / N_seqs — every sequence weighs the
        same, whatever its length (GRPO's reduction; veRL's "seq-mean-token-mean").
      - "seq_mean_token_sum":  L = Σ_{b,t} ℓ_{b,t}·m_{b,t} / N_seqs — per-sequence sums, so long sequences
        weigh more (veRL's "seq-mean-token-sum").

    Gradient accumulation: pass the totals of the whole accumulation batch (all its micro-batches) and sum the
    micro-batch losses; the gradient then equals the gradient of one big batch. With the defaults each
    micro-batch is normalised by its own counts, which weighs tokens unequally when micro-batches differ in
    length. The result is meant to be summed, not averaged: where an engine divides each micro-batch loss by
    the number of accumulation steps, or averages gradients over data-parallel ranks, the caller must undo that
    division (e.g. by passing totals divided by the same count).

    Args:
        per_token: (B, T) float — loss per token ℓ_{b,t}.
        mask: (B, T) float — 1 for tokens that count, 0 otherwise.
        mode: one of `LOSS_AGGREGATIONS`.
        total_tokens: N_tokens for "token_mean"; ignored by the other modes.
        total_seqs: N_seqs for the "seq_mean_*" modes; ignored by "token_mean".

    Returns:
        () float — the loss.

    Raises:
        ValueError: unknown mode, or a zero denominator.
    """
    if mode not in _AGGREGATORS:
        raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {', '.join(LOSS_AGGREGATIONS)}")
    return _AGGREGATORS[mode](per_token, mask, total_tokens, total_seqs)


class PolicyLossStats(NamedTuple):
    """Diagnostics of a policy loss; detached scalars, masked means over response tokens (0 for an empty mask)."""

    clipfrac: Tensor
    """Fraction of tokens where the clip acted: the clipped term was selected (PPO, GSPO: there the whole
    sequence), or the importance weight was clipped (CISPO)."""
    approx_kl: Tensor
    """½(log π_θ − log π_old)², an estimate of KL(π_old‖π_θ) (k2 of Schulman 2020)."""
    ratio_mean: Tensor
    """Mean of the ratio the loss uses: ρ_t = π_θ/π_old per token (PPO, CISPO), s_i per sequence (GSPO); 1 on the
    first mini-batch of a rollout."""


PolicyLoss = Callable[[Tensor, Tensor, Tensor, Tensor, float, float], tuple[Tensor, PolicyLossStats]]
"""The signature every policy loss shares: (logp, old_logp, advantages, mask, clip_low, clip_high) →
(per-token loss ℓ (B, T), stats). The caller reduces ℓ with `aggregate_loss`."""


def _mean_or_zero(x: Tensor, mask: Tensor) -> Tensor:
    """The masked mean, or 0 for an empty mask (a micro-batch whose responses are all left out of the loss)."""
    return masked_sum(x, mask) / mask.sum().clamp(min=1)


def _stats(log_ratio: Tensor, ratio: Tensor, clipped: Tensor, mask: Tensor) -> PolicyLossStats:
    with torch.no_grad():
        return PolicyLossStats(
            clipfrac=_mean_or_zero(clipped.float(), mask),
            approx_kl=_mean_or_zero(0.5 * log_ratio**2, mask),
            ratio_mean=_mean_or_zero(ratio, mask),
        )


def _clipped_surrogate(
    ratio: Tensor, advantages: Tensor, mask: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, Tensor]:
    """ℓ = max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high)) per token, 0 outside the mask, and (B, T) bool: where the
    clipped term is the larger one (the token's gradient is cut). Shared by PPO's token ratio and GSPO's sequence
    ratio."""
    # −A·ρ
    unclipped = -advantages * ratio
    # −A·clip(ρ, 1−ε_low, 1+ε_high)
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    return torch.maximum(unclipped, clipped) * mask, clipped > unclipped


def ppo_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, PolicyLossStats]:
    """PPO's clipped surrogate per token (Schulman et al. 2017, arXiv 1707.06347, eq. 7, negated to minimise),
    with the decoupled clip range of DAPO (Yu et al. 2025, arXiv 2503.14476, §3.1 "Clip-Higher").

    ρ_t = exp(log π_θ(a_t|s_t) − log π_old(a_t|s_t)),
    ℓ_t = max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε_low, 1 + ε_high)).

    ε_low = ε_high = ε is PPO's symmetric clip; ε_high > ε_low lets the probability of an unlikely token with a
    positive advantage grow further before the clip stops it (DAPO's remedy for entropy collapse).

    The log-ratio is multiplied by the mask before the exponential (as DeepSpeed-Chat does), so ρ = 1 outside
    the mask and log-probs at padding positions cannot overflow into inf·0 = NaN.

    Args:
        logp: (B, T) float — log π_θ(a_t|s_t) under the policy being trained (requires grad).
        old_logp: (B, T) float — log π_old(a_t|s_t) from the policy that sampled the rollout.
        advantages: (B, T) float — A_t.
        mask: (B, T) float — the tokens that count.
        clip_low, clip_high: ε_low, ε_high; the ratio is kept in [1 − ε_low, 1 + ε_high].

    Returns:
        per_token: (B, T) float — ℓ_t, 0 outside the mask.
        stats: `PolicyLossStats`, detached.
    """
    log_ratio = (logp - old_logp) * mask
    # ρ_t = π_θ(a_t|s_t) / π_old(a_t|s_t)
    ratio = torch.exp(log_ratio)
    per_token, clipped = _clipped_surrogate(ratio, advantages, mask, clip_low, clip_high)
    return per_token, _stats(log_ratio, ratio, clipped, mask)


def gspo_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, PolicyLossStats]:
    """GSPO's sequence-level clipped objective in its GSPO-token form (Zheng et al. 2025, arXiv 2507.18071),
    negated to minimise.

    s_i = exp((1/|y_i|)·Σ_t (log π_θ(y_i,t) − log π_old(y_i,t)))       the length-normalised sequence ratio
    s_i,t = sg[s_i]·π_θ(y_i,t) / sg[π_θ(y_i,t)]                           (= s_i in value)
    ℓ_i,t = max(−A_i,t·s_i,t, −A_i,t·clip(s_i,t, 1 − ε_low, 1 + ε_high))

    With one advantage per sequence (A_i,t = A_i, every critic-free estimator here) the GSPO-token form equals GSPO:
    every token of a sequence has the same value s_i, so the clip acts on whole sequences, and the gradient of
    ℓ_i,t is −A_i·s_i·∇log π_θ(y_i,t). Reduced by `seq_mean_token_mean` this gives GSPO's gradient
    ∇J = (1/G)·Σ_i s_i·A_i·(1/|y_i|)·Σ_t ∇log π_θ(y_i,t) (the paper's two gradients, eqs. 11 and 18, agree when
    the advantage is the sequence's). The paper's clip ranges are far narrower than PPO's (§5.1: ε_low = 3e-4,
    ε_high = 4e-4), since s_i is a geometric mean of per-token ratios.

    Args:
        logp, old_logp, advantages, mask: as in `ppo_policy_loss`; |y_i| = Σ_t mask (a row without tokens gets
            s_i = 1 and no loss).
        clip_low, clip_high: ε_low, ε_high of the sequence ratio.

    Returns:
        per_token: (B, T) float — ℓ_i,t, 0 outside the mask.
        stats: `PolicyLossStats`, detached; `ratio_mean` and `clipfrac` are over sequences, weighted by tokens.
    """
    log_ratio = (logp - old_logp) * mask
    lengths = mask.sum(dim=1, keepdim=True).clamp(min=1)
    # log s_i = (1/|y_i|)·Σ_t log ρ_i,t
    seq_log_ratio = log_ratio.sum(dim=1, keepdim=True) / lengths
    # log s_i,t = sg[log s_i] + log π_θ(y_i,t) − sg[log π_θ(y_i,t)]
    token_log_ratio = seq_log_ratio.detach() + logp - logp.detach()
    ratio = torch.exp(token_log_ratio * mask)
    per_token, clipped = _clipped_surrogate(ratio, advantages, mask, clip_low, clip_high)
    return per_token, _stats(log_ratio, ratio, clipped, mask)


def cispo_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, PolicyLossStats]:
    """CISPO: REINFORCE with clipped, stop-gradient importance weights (MiniMax 2025, arXiv 2506.13585, §3.1),
    negated to minimise.

    ρ_t = π_θ(a_t|s_t) / π_old(a_t|s_t),   ρ̂_t = clip(ρ_t, 1 − ε_low, 1 + ε_high),
    ℓ_t = −sg[ρ̂_t]·A_t·log π_θ(a_t|s_t),   so ∇ℓ_t = −ρ̂_t·A_t·∇log π_θ(a_t|s_t).

    Unlike PPO's clip, which drops the gradient of a clipped token, every token keeps its gradient; the clip only
    bounds its weight. The paper sets no lower bound in practice (a large ε_low; ε_low = 1 gives clip(ρ, 0, ·)) and
    tunes ε_high. The value of ℓ (it contains log π) is not a progress measure; its gradient is what matters.

    Args, Returns: as `ppo_policy_loss`; `clipfrac` is the fraction of tokens whose weight was clipped.
    """
    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    # ρ̂ = clip(ρ, 1−ε_low, 1+ε_high), no gradient through it
    weight = ratio.clamp(1 - clip_low, 1 + clip_high).detach()
    per_token = -weight * advantages * logp * mask
    out_of_range = (ratio < 1 - clip_low) | (ratio > 1 + clip_high)
    return per_token, _stats(log_ratio, ratio, out_of_range, mask)


class ValueLossStats(NamedTuple):
    """Diagnostics of `value_loss`; detached scalars, masked means over response tokens (0 for an empty mask)."""

    clipfrac: Tensor
    """Fraction of tokens where the clipped value error was the larger one and so was selected."""
    mean_value: Tensor
    """Mean of the critic's current values V_t."""
    mean_return: Tensor
    """Mean of the returns G_t."""


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float,
    mode: str = "token_mean",
    total_tokens: float | None = None,
    total_seqs: int | None = None,
) -> tuple[Tensor, ValueLossStats]:
    """Clipped value loss of the PPO critic, as in DeepSpeed-Chat `critic_loss_fn`.

    V̂_t = V_old,t + clip(V_t − V_old,t, −ε, ε),   ℓ_t = ½·max((V_t − G_t)², (V̂_t − G_t)²), reduced by
    `aggregate_loss`.

    Args:
        values: (B, T) float — V_t from the critic being trained (requires grad).
        old_values: (B, T) float — V_old,t recorded with the rollout.
        returns: (B, T) float — G_t, e.g. from `gae_advantages`.
        mask: (B, T) float — response mask.
        clip_eps: ε, how far the new value may move from the old one before the clipped error takes over.
        mode, total_tokens, total_seqs: see `aggregate_loss`.

    Returns:
        loss: () float — the aggregated loss.
        stats: `ValueLossStats`, detached.
    """
    # V̂ = V_old + clip(V − V_old, −ε, ε)
    clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    # ℓ = ½·max((V − G)², (V̂ − G)²)
    per_token = 0.5 * torch.maximum(unclipped_error, clipped_error)
    loss = aggregate_loss(per_token, mask, mode, total_tokens, total_seqs)
    with torch.no_grad():
        stats = ValueLossStats(
            clipfrac=_mean_or_zero((clipped_error > unclipped_error).float(), mask),
            mean_value=_mean_or_zero(values, mask),
            mean_return=_mean_or_zero(returns, mask),
        )
    return loss, stats


def pairwise_loss(chosen_scores: Tensor, rejected_scores: Tensor) -> Tensor:
    """Pairwise (Bradley–Terry) reward-model loss (Ouyang et al. 2022, arXiv 2203.02155, eq. 1).

    L = mean_b −log σ(r_c,b − r_r,b)

    Args:
        chosen_scores: (B,) float — reward r_c of the preferred response of each pair.
        rejected_scores: (B,) float — reward r_r of the other response.

    Returns:
        () float — the loss; log 2 when the scores are equal.
    """
    if chosen_scores.shape != rejected_scores.shape:
        raise ValueError(
            f"chosen_scores {tuple(chosen_scores.shape)} and rejected_scores {tuple(rejected_scores.shape)} "
            "must have the same shape"
        )
    # −log σ(r_c − r_r), computed stably by logsigmoid
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()


def lm_loss(
    logits: Tensor,
    labels: Tensor,
    mask: Tensor,
    mode: str = "token_mean",
    total_tokens: float | None = None,
    total_seqs: int | None = None,
) -> Tensor:
    """Next-token cross-entropy: ℓ_t = −log π(y_t | y_<t), reduced by `aggregate_loss`.

    Args:
        logits: (B, T, V) float — logits already shifted to align with `labels`.
        labels: (B, T) long — target tokens.
        mask: (B, T) float — 1 for tokens that count in the loss.
        mode, total_tokens, total_seqs: see `aggregate_loss`.

    Returns:
        () float — the loss.
    """
    return aggregate_loss(-token_logprobs(logits, labels), mask, mode, total_tokens, total_seqs)


def _dpo_sigmoid(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    # −(1−ε)·log σ(β·h) − ε·log σ(−β·h), computed stably by logsigmoid
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def _ipo(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    if label_smoothing != 0:
        raise ValueError(f"label_smoothing={label_smoothing} applies to the sigmoid loss only, not to ipo")
    # (h − 1/(2τ))², with β playing τ
    return (h - 1 / (2 * beta)) ** 2


_DPO_LOSSES: dict[str, Callable[[Tensor, float, float], Tensor]] = {"sigmoid": _dpo_sigmoid, "ipo": _ipo}

DPO_LOSS_TYPES = tuple(_DPO_LOSSES)
"""Names accepted by `dpo_loss(loss_type=...)`."""


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct preference optimisation losses over sequence log-probabilities.

    With log π(y|x) = Σ_t log π(y_t | x, y_<t) summed over the response tokens (EOS included):

        h = (log π_θ(y_c|x) − log π_ref(y_c|x)) − (log π_θ(y_r|x) − log π_ref(y_r|x))

      - "sigmoid" (DPO; Rafailov et al. 2023, arXiv 2305.18290, eq. 7):
            ℓ = −log σ(β·h)
        with `label_smoothing` ε > 0 the conservative DPO of the same authors (cDPO; labels flipped with
        probability ε):
            ℓ = −(1 − ε)·log σ(β·h) − ε·log σ(−β·h)
      - "ipo" (IPO; Azar et al. 2023, arXiv 2310.12036, eq. 17, with β playing τ):
            ℓ = (h − 1/(2β))²
        minimal at h = 1/(2β): the log-likelihood-ratio margin is regressed to a finite target instead of being
        pushed to infinity.

    L = mean_b ℓ_b. The implicit rewards are r(x, y) = β·(log π_θ(y|x) − log π_ref(y|x)) (DPO §5), detached;
    both are 0 while π_θ = π_ref, where the sigmoid loss is log 2.

    Args:
        policy_chosen_logps: (B,) float — log π_θ(y_c|x), the policy's sequence log-prob of the chosen response.
        policy_rejected_logps: (B,) float — log π_θ(y_r|x) of the rejected response.
        ref_chosen_logps: (B,) float — log π_ref(y_c|x) under the frozen reference.
        ref_rejected_logps: (B,) float — log π_ref(y_r|x).
        beta: β > 0, the strength of the implicit KL constraint (IPO's τ).
        loss_type: one of `DPO_LOSS_TYPES`.
        label_smoothing: ε in [0, 0.5), the assumed label-noise rate (sigmoid only).

    Returns:
        loss: () float — L.
        chosen_rewards: (B,) float — β·(log π_θ(y_c|x) − log π_ref(y_c|x)), detached.
        rejected_rewards: (B,) float — β·(log π_θ(y_r|x) − log π_ref(y_r|x)), detached.

    Raises:
        ValueError: unknown loss_type, β ≤ 0, ε outside [0, 0.5), ε > 0 with ipo, or mismatched shapes.
    """
    if loss_type not in _DPO_LOSSES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {', '.join(DPO_LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    shapes = {tuple(x.shape) for x in logps}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"the four log-prob tensors must share one (B,) shape, got {sorted(shapes)}")
    chosen_logratio = policy_chosen_logps - ref_chosen_logps
    rejected_logratio = policy_rejected_logps - ref_rejected_logps
    # h = (log π_θ(y_c) − log π_ref(y_c)) − (log π_θ(y_r) − log π_ref(y_r))
    h = chosen_logratio - rejected_logratio
    loss = _DPO_LOSSES[loss_type](h, beta, label_smoothing).mean()
    # r(x, y) = β·(log π_θ(y|x) − log π_ref(y|x))
    return loss, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()
