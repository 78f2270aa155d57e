"""Step 7 of the RL iteration: the update, the same for every algorithm.

What differs between algorithms is data chosen once when the run is built (`objective`): the per-token policy loss
(PPO's clipped ρ_t, GSPO's clipped s_i, CISPO's clipped stop-gradient weights), the clip range, the aggregation,
and whether a KL or an entropy term joins it. `update` walks `update.epochs` × mini-batches × micro-batches of a
`TrainBatch`, sums each micro-batch's share of the mini-batch loss (`aggregate_loss` with the mini-batch's totals,
so accumulation equals one big batch), adds the PTX loss once per mini-batch, steps the optimizers and the EMA.

L_actor = aggregate(ℓ_policy) + β·aggregate(KL(π_θ‖π_ref)) [kl.placement loss] − c_H·aggregate(H(π_θ)) [entropy
bonus] + ptx_coef·L_ptx;  L_critic = aggregate(ℓ_value) (PPO). docs/algorithms.md §3.5–3.8, §11–13.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from chatrlhf import distributed as dist
from chatrlhf.config import RLTrainConfig
from chatrlhf.engine.base import TrainEngine
from chatrlhf.rlhf import KL_ESTIMATORS, PolicyLoss, aggregate_loss, masked_mean, value_loss
from chatrlhf.train.forward import shifted_lm_loss
from chatrlhf.train.rl_models import PTXBatches
from chatrlhf.train.rollout import Rollout, rollout_logprobs, rollout_logprobs_and_entropy, rollout_values


@dataclass
class TrainBatch:
    """What the update trains on; (B, R) tensors over response positions."""

    rollout: Rollout
    """The sequences (prompts and responses) and the response mask."""
    old_logprobs: torch.Tensor | None
    """log π_old(a_t|s_t), from the rollout's no-grad forward; None: the update's own forward, detached (the update
    is exactly on-policy, `reuses_update_forward`)."""
    ref_logprobs: torch.Tensor
    """log π_ref(a_t|s_t)."""
    advantages: torch.Tensor
    """A_t (times the truncated importance weights with `rollout.tis_cap`)."""
    loss_mask: torch.Tensor
    """The tokens the losses count: the response mask, less the truncated responses with `loss.mask_truncated`."""
    old_values: torch.Tensor | None = None
    """V_old(s_t) (PPO)."""
    returns: torch.Tensor | None = None
    """The critic's targets G_t (PPO)."""

    def select(self, idx: torch.Tensor) -> TrainBatch:
        def rows(t):
            return t[idx] if t is not None else None

        return TrainBatch(
            rollout=self.rollout.select(idx),
            old_logprobs=rows(self.old_logprobs),
            ref_logprobs=self.ref_logprobs[idx],
            advantages=self.advantages[idx],
            loss_mask=self.loss_mask[idx],
            old_values=rows(self.old_values),
            returns=rows(self.returns),
        )

    def trimmed(self) -> TrainBatch:
        """The same rows without the columns none of them uses: the prompts' leading all-padding columns and the
        responses' trailing ones, past every row's last attended token. Nothing attends to those columns or is
        trained on them, so the losses are unchanged, and the forwards skip them: a micro-batch of short responses
        no longer pays for the rollout's longest (`train.update.trim_padding`)."""
        r = self.rollout
        prompt_used = r.prompt_mask.bool().any(0)
        p0 = int(prompt_used.nonzero()[0]) if prompt_used.any() else 0
        response_used = r.response_attention_mask.bool().any(0)
        width = int(response_used.nonzero()[-1]) + 1 if response_used.any() else 1

        def cols(t):
            return t[:, :width] if t is not None else None

        rollout = Rollout(
            prompts=[],
            prompt_ids=r.prompt_ids[:, p0:],
            prompt_mask=r.prompt_mask[:, p0:],
            response=r.response[:, :width],
            response_mask=r.response_mask[:, :width],
            response_attention=cols(r.response_attention),
        )
        return TrainBatch(
            rollout=rollout,
            old_logprobs=cols(self.old_logprobs),
            ref_logprobs=self.ref_logprobs[:, :width],
            advantages=self.advantages[:, :width],
            loss_mask=self.loss_mask[:, :width],
            old_values=cols(self.old_values),
            returns=cols(self.returns),
        )


def by_length(rows: torch.Tensor, lengths: torch.Tensor, micro: int) -> torch.Tensor:
    """`rows` reordered longest response first when they make more than one micro-batch of `micro`, so that each
    micro-batch holds responses of similar length and `TrainBatch.trimmed` drops the most; a stable sort, so equal
    lengths keep their (shuffled) order. The mini-batch's gradient is the sum over its micro-batches either way."""
    if len(rows) <= micro:
        return rows
    return rows[torch.sort(lengths[rows], descending=True, stable=True).indices]


@dataclass(frozen=True)
class Objective:
    """The losses of one update, chosen once when the run is built (`objective`)."""

    policy_loss: PolicyLoss
    """The algorithm's per-token policy loss (rlhf/losses.py)."""
    clip_low: float
    clip_high: float
    aggregation: str
    """`aggregate_loss` mode of every term."""
    kl_estimator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
    """The KL term's estimator with `kl.placement: loss`; None when the KL is in the reward."""
    entropy_coef: float
    """c_H of the entropy bonus (0: the entropy of π_θ is not computed)."""
    value_clip: float
    """ε_v of the critic's clipped value loss."""


def objective(policy_loss: PolicyLoss, train: RLTrainConfig) -> Objective:
    loss, kl = train.loss, train.kl
    return Objective(
        policy_loss=policy_loss,
        clip_low=loss.clip_low,
        clip_high=loss.high,
        aggregation=loss.aggregation,
        kl_estimator=KL_ESTIMATORS[kl.estimator] if kl.placement == "loss" else None,
        entropy_coef=loss.entropy_coef,
        value_clip=loss.value_clip,
    )


def actor_loss(
    obj: Objective,
    logp: torch.Tensor,
    entropy: torch.Tensor | None,
    b: TrainBatch,
    kl_coef: float,
    total_tokens: float,
    total_seqs: int,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The actor's loss on micro-batch `b` (its share of the mini-batch's, whose totals are given), and its parts
    for the metrics (the detached stats weighted by the micro-batch's share of the tokens)."""
    mask = b.loss_mask
    totals = {"mode": obj.aggregation, "total_tokens": total_tokens, "total_seqs": total_seqs}
    per_token, stats = obj.policy_loss(logp, b.old_logprobs, b.advantages, mask, obj.clip_low, obj.clip_high)
    policy = aggregate_loss(per_token, mask, **totals)
    share = float(mask.sum()) / total_tokens
    parts = {
        "loss/policy": policy.item(),
        "policy/clipfrac": float(stats.clipfrac) * share,
        "policy/approx_kl": float(stats.approx_kl) * share,
    }
    loss = policy
    if obj.kl_estimator is not None:
        # masked log-probs: the estimate is 0 (and finite) off the response
        kl = aggregate_loss(obj.kl_estimator(logp * mask, b.ref_logprobs * mask), mask, **totals)
        loss = loss + kl_coef * kl
        parts["loss/kl"] = kl.item()
    if entropy is not None:
        bonus = aggregate_loss(entropy, mask, **totals)
        loss = loss - obj.entropy_coef * bonus
        parts["loss/entropy"] = bonus.item()
    return loss, parts


def reuses_update_forward(train: RLTrainConfig, backend: str) -> bool:
    """The update is exactly on-policy, so π_old's log-probs are its own first forward's, detached, and the rollout's
    separate no-grad forward of the actor can be skipped (`update.old_logprobs: auto`): one epoch and one
    mini-batch (every micro-batch's forward runs before the only optimizer step, at θ_old); nothing needs them before
    the update — no KL in the reward (or β = 0 without a target), no TIS weights, no engine mismatch to measure (the
    hf backend samples with the trainer's weights)."""
    u, kl = train.update, train.kl
    one_step = u.epochs == 1 and u.mini_batch_size in (0, train.rollout_batch_size * train.group_size)
    kl_free_reward = kl.placement == "loss" or (kl.coef == 0 and kl.target is None)
    return (
        u.old_logprobs == "auto" and one_step and kl_free_reward and train.rollout.tis_cap is None and backend == "hf"
    )


@dataclass
class Updated:
    """What `update` returns: its metrics, and with the batch's `old_logprobs` None the log-probs and entropy its
    forward took at θ_old ((B, R), every row, the same on every rank), else None."""

    metrics: dict[str, float]
    old_logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def _actor_forward(
    model, r: Rollout, with_entropy: bool, entropy_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if with_entropy:
        return rollout_logprobs_and_entropy(model, r, entropy_grad)
    return rollout_logprobs(model, r), None


@dataclass(frozen=True)
class Schedule:
    """How `update` walks a batch: epochs, mini-batches and per-rank micro-batches; the shuffles come from a
    generator seeded by `order_seed`, the same on every rank."""

    epochs: int
    mini_batch_size: int
    """Sequences per optimizer step (0 = the whole batch)."""
    micro_batch_size: int
    """Sequences per forward/backward on each rank (0 = the rank's whole share of a mini-batch)."""
    order_seed: int
    trim_padding: bool
    """Micro-batches by response length, each without the columns none of its rows uses (`TrainBatch.trimmed`)."""


def update(
    actor: TrainEngine,
    critic: TrainEngine | None,
    batch: TrainBatch,
    obj: Objective,
    schedule: Schedule,
    kl_coef: float,
    ptx: PTXBatches | None = None,
    ptx_coef: float = 0.0,
    after_step: Callable[[], None] | None = None,
) -> Updated:
    """7. `schedule.epochs` × mini-batches; micro-batches accumulate with the mini-batch's totals (the loss tokens,
    the sequences that hold any). With W ranks each rank trains on its contiguous 1/W of every mini-batch.
    `after_step` runs after each actor step (the EMA). A mini-batch without loss tokens (every response in it
    filtered out) takes no step. Without `batch.old_logprobs` (one epoch, one mini-batch only), π_old's log-probs
    are each micro-batch's own, detached, and are returned with the entropy."""
    n = batch.rollout.response.shape[0]
    world = dist.world_size()
    mini = schedule.mini_batch_size or n
    micro = schedule.micro_batch_size or mini // world
    reuse = batch.old_logprobs is None
    if reuse and (schedule.epochs != 1 or mini < n):
        raise ValueError("old log-probs can come from the update only with one epoch and one mini-batch")
    taken = torch.zeros_like(batch.loss_mask) if reuse else None
    taken_entropy = torch.zeros_like(batch.loss_mask) if reuse else None
    shuffle = torch.Generator().manual_seed(schedule.order_seed)
    device = batch.rollout.response.device
    lengths = batch.rollout.response_attention_mask.sum(1) if schedule.trim_padding else None  # columns a row needs
    sums: dict[str, float] = {}  # this rank's shares of the losses and fractions: summed over ranks below
    norms: dict[str, float] = {}  # gradient norms: global already, the same on every rank
    updates = 0
    for _ in range(schedule.epochs):
        order = torch.randperm(n, generator=shuffle).to(device)
        for m0 in range(0, n, mini):
            mb_idx = order[m0 : m0 + mini]
            mb_mask = batch.loss_mask[mb_idx]
            total_tokens, total_seqs = float(mb_mask.sum()), int((mb_mask.sum(1) > 0).sum())
            if total_tokens == 0:
                continue
            mine = torch.stack(dist.shard(mb_idx)[0])
            if schedule.trim_padding:
                mine = by_length(mine, lengths, micro)
            for u0 in range(0, len(mine), micro):
                rows = mine[u0 : u0 + micro]
                b = batch.select(rows)
                if schedule.trim_padding:
                    b = b.trimmed()
                logp, entropy = _actor_forward(
                    actor.model, b.rollout, obj.entropy_coef > 0 or reuse, entropy_grad=obj.entropy_coef > 0
                )
                if reuse:  # θ = θ_old until the step below: this forward is π_old's
                    width = logp.shape[1]  # the micro-batch's, when trimmed
                    taken[rows, :width], taken_entropy[rows, :width] = logp.detach(), entropy.detach()
                    b = replace(b, old_logprobs=logp.detach())
                bonus = entropy if obj.entropy_coef > 0 else None
                loss, parts = actor_loss(obj, logp, bonus, b, kl_coef, total_tokens, total_seqs)
                actor.backward(loss)
                _acc(sums, parts)
                if critic is not None:
                    values = rollout_values(critic.model, b.rollout)
                    vl, vstats = value_loss(
                        values, b.old_values, b.returns, b.loss_mask, obj.value_clip, obj.aggregation,
                        total_tokens, total_seqs,
                    )  # fmt: skip
                    critic.backward(vl)
                    share = float(b.loss_mask.sum()) / total_tokens
                    _acc(sums, {"loss/value": vl.item(), "value/clipfrac": float(vstats.clipfrac) * share})
            if ptx is not None:
                ids, attn, lmask = next(ptx)
                ptx_loss = shifted_lm_loss(actor.model, ids, attn, lmask) / world  # the mean of the ranks'
                actor.backward(ptx_coef * ptx_loss)
                _acc(sums, {"loss/ptx": ptx_loss.item()})
            a_stats = actor.step()
            _acc(norms, {"optim/actor_grad_norm": a_stats.grad_norm})
            metrics_lr = {"optim/actor_lr": a_stats.lr}
            if critic is not None:
                c_stats = critic.step()
                _acc(norms, {"optim/critic_grad_norm": c_stats.grad_norm})
                metrics_lr["optim/critic_lr"] = c_stats.lr
            if after_step is not None:
                after_step()
            updates += 1
    if updates == 0:
        return Updated({})
    metrics = {k: v / updates for k, v in {**dist.sum_dict_across(sums), **norms}.items()}
    metrics.update(metrics_lr)
    if reuse:  # each rank filled its own rows
        return Updated(metrics, dist.sum_tensor_across(taken), dist.sum_tensor_across(taken_entropy))
    return Updated(metrics)


def _acc(sums: dict[str, float], values: dict[str, float]) -> None:
    for k, v in values.items():
        sums[k] = sums.get(k, 0.0) + v


def tis_weights(old_logprobs: torch.Tensor, rollout: Rollout, cap: float | None) -> torch.Tensor | None:
    """Truncated importance weights min(π_old / π_rollout, cap) per token (None when disabled)."""
    if cap is None:
        return None
    return torch.exp(old_logprobs - rollout.rollout_logprobs).clamp(max=cap) * rollout.response_mask


def tis_metrics(weights: torch.Tensor, mask: torch.Tensor, cap: float) -> dict[str, float]:
    return {
        "tis/weight_mean": float(masked_mean(weights, mask)),
        "tis/capped_frac": float(masked_mean((weights >= cap).float(), mask)),
    }


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """θ_ema ← d·θ_ema + (1 − d)·θ (DeepSpeed-Chat's `moving_average`, d = 0.992)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.device, e.dtype), 1.0 - decay)
