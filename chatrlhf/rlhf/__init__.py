"""The math of RLHF as pure functions: tensors and floats in, tensors out.

masks       response masks, EOS truncation, masked reductions and whitening
kl          per-token KL estimators (k1, k2, k3), the KL-penalized reward, the adaptive KL controller
advantages  GAE (PPO) and critic-free advantages: GRPO, RLOO, REINFORCE++ returns, ReMax; DAPO's group filter
shaping     DAPO's overlong reward shaping
losses      token log-probs, loss aggregation, the policy losses (PPO/DAPO, GSPO, CISPO), the value loss,
            pairwise RM loss, LM loss, DPO/IPO loss

Response-side tensors are (B, T) over response positions only (position 0 is the first generated token), with
a float mask that is 1 up to and including the first EOS and 0 after.
"""

from __future__ import annotations

from chatrlhf.rlhf.advantages import (
    discounted_returns,
    gae_advantages,
    grpo_advantages,
    remax_advantages,
    rloo_advantages,
    sequence_to_tokens,
    varied_groups,
)
from chatrlhf.rlhf.kl import KL_ESTIMATORS, adaptive_kl_coef, kl_k1, kl_k2, kl_k3, kl_penalized_rewards
from chatrlhf.rlhf.losses import (
    DPO_LOSS_TYPES,
    LOSS_AGGREGATIONS,
    PolicyLoss,
    PolicyLossStats,
    ValueLossStats,
    aggregate_loss,
    cispo_policy_loss,
    dpo_loss,
    entropy_from_logits,
    gspo_policy_loss,
    lm_loss,
    pairwise_loss,
    ppo_policy_loss,
    token_logprobs,
    value_loss,
)
from chatrlhf.rlhf.masks import (
    last_token_index,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    response_mask,
    run_lengths,
    truncate_after_eos,
)
from chatrlhf.rlhf.shaping import overlong_penalty

__all__ = [
    "DPO_LOSS_TYPES",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "PolicyLoss",
    "PolicyLossStats",
    "ValueLossStats",
    "aggregate_loss",
    "cispo_policy_loss",
    "dpo_loss",
    "entropy_from_logits",
    "gae_advantages",
    "gspo_policy_loss",
    "grpo_advantages",
    "rloo_advantages",
    "remax_advantages",
    "discounted_returns",
    "sequence_to_tokens",
    "varied_groups",
    "adaptive_kl_coef",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalized_rewards",
    "last_token_index",
    "lm_loss",
    "masked_mean",
    "run_lengths",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "pairwise_loss",
    "overlong_penalty",
    "ppo_policy_loss",
    "response_mask",
    "token_logprobs",
    "truncate_after_eos",
    "value_loss",
]
