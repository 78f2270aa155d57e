"""Step 3: RLHF — PPO (actor, critic, frozen reference, reward) or a critic-free algorithm (GRPO, RLOO,
REINFORCE++, ReMax), all on the same loop and the same hybrid engine.

One iteration (DESIGN.md), each a named function below:
  1. sample a batch of prompts (left-padded), each repeated `group_size` times;
  2. generation mode: sample responses, truncate after EOS, build the response mask;
  3. score: reward model end score and/or Python reward functions, weighted and summed;
  4. log-probs of the actor (old) and the reference, values of the critic (PPO) — one no-grad forward each;
  5–6. the algorithm's advantages (train/algorithms.py): KL-shaped rewards → GAE, or a group / leave-one-out /
     greedy / batch baseline;
  7. ppo_epochs × mini-batches: clipped policy loss (+ KL loss, + PTX loss) and, for PPO, the clipped value loss;
     optimizer steps; EMA of the actor;
  8. log every metric (docs/metrics.md) and save.

Dropout is off in the actor and critic throughout (eval mode; gradients still flow), so the first mini-batch
recomputes the rollout's log-probs (up to float rounding between batch shapes) and the ratio starts at 1, as with
DeepSpeed-Chat's zero-dropout actor.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from chatrlhf.config import RLConfig, RLTrainConfig
from chatrlhf.data import to_prompt, to_sft
from chatrlhf.data.collate import collate_sft, encode_all, encode_sft
from chatrlhf.engine import distributed as dist
from chatrlhf.engine.hybrid import HybridEngine
from chatrlhf.engine.single import TrainEngine, build_engine
from chatrlhf.errors import UserError
from chatrlhf.models.load import (
    load_causal_lm,
    load_tokenizer,
    load_value_model,
    resolve_model,
    save_model_dir,
)
from chatrlhf.models.rewards import Scorer, build_scorer
from chatrlhf.rlhf import (
    KL_ESTIMATORS,
    adaptive_kl_coef,
    aggregate_loss,
    masked_mean,
    policy_loss,
    value_loss,
)
from chatrlhf.train.algorithms import ALGORITHMS, AdvantageInputs, Advantages, Algorithm
from chatrlhf.train.common import (
    Stopwatch,
    checkpoint_if_due,
    convert,
    load_raw,
    open_loop,
    prepare_for_training,
    run_stage,
    save_trained,
    stage_records,
    write_json,
)
from chatrlhf.train.rollout import (
    Evaluated,
    Prompt,
    Rollout,
    all_empty,
    gather_rollout,
    generate_rollout,
    prompt_stream,
    response_logprobs,
    response_values,
    score_rollout,
    to_prompts,
    truncated,
)
from chatrlhf.train.sft import shifted_lm_loss


@torch.no_grad()
def evaluate_rollout(m: Models, rollout: Rollout, batch: list[Prompt], algo: Algorithm, t: RLTrainConfig) -> Evaluated:
    """3–4. Rewards, then one no-grad forward per model (and ReMax's greedy baseline)."""
    greedy_scores = None
    device = rollout.response.device
    if algo.needs_greedy:
        width = rollout.prompt_ids.shape[1]
        greedy = generate_rollout(m.actor, batch, t.group_size, m.tok, device, greedy=True, width=width)
        with m.resident(m.scorer.modules()):
            greedy_scores = score_rollout(m.scorer, greedy, m.tok).total
    with m.resident(m.scorer.modules()):
        scores = score_rollout(m.scorer, rollout, m.tok)
    with m.resident([m.reference]):
        ref_logprobs = response_logprobs(m.reference, rollout)
    return Evaluated(
        scores=scores,
        old_logprobs=response_logprobs(m.actor_engine.module, rollout),
        ref_logprobs=ref_logprobs,
        values=response_values(m.critic_engine.module, rollout) if m.critic_engine else None,
        greedy_scores=greedy_scores,
    )


def tis_weights(rollout: Rollout, ev: Evaluated, cap: float | None) -> torch.Tensor | None:
    """Truncated importance weights min(π_old / π_rollout, cap) per token (None when disabled)."""
    if cap is None:
        return None
    return torch.exp(ev.old_logprobs - rollout.rollout_logprobs).clamp(max=cap) * rollout.response_mask


def ppo_update(
    m: Models,
    rollout: Rollout,
    ev: Evaluated,
    adv: Advantages,
    t: RLTrainConfig,
    kl_coef: float,
    ptx_batches,
    ema,
    order_seed: int,
) -> dict[str, float]:
    """7. ppo_epochs × mini-batches; micro-batches accumulate with the mini-batch's token total. With W ranks each
    rank trains on its contiguous 1/W of every mini-batch (micro_batch_size is per rank); the shuffles come from a
    generator seeded by `order_seed`, the same on every rank."""
    p = t.ppo
    n = rollout.response.shape[0]
    world = dist.world_size()
    mini = p.mini_batch_size or n
    micro = p.micro_batch_size or mini // world
    shuffle = torch.Generator().manual_seed(order_seed)
    weights = tis_weights(rollout, ev, p.tis_cap)
    advantages = adv.advantages if weights is None else adv.advantages * weights
    kl_in_loss = p.kl_in == "loss"
    sums: dict[str, float] = {}  # this rank's shares of the losses and fractions: summed over ranks below
    norms: dict[str, float] = {}  # gradient norms: global already, the same on every rank
    updates = 0
    for _ in range(p.ppo_epochs):
        order = torch.randperm(n, generator=shuffle).to(rollout.response.device)
        for m0 in range(0, n, mini):
            mb_idx = order[m0 : m0 + mini]
            totals = {"total_tokens": float(rollout.response_mask[mb_idx].sum()), "total_seqs": len(mb_idx)}
            mine, _ = dist.shard(mb_idx)
            mine = torch.stack(mine)
            for u0 in range(0, len(mine), micro):
                idx = mine[u0 : u0 + micro]
                r, mask = rollout.select(idx), rollout.response_mask[idx]
                frac = float(mask.sum()) / totals["total_tokens"]  # the micro-batch's share of the tokens
                logp = response_logprobs(m.actor_engine.model, r)
                pg, stats = policy_loss(
                    logp, ev.old_logprobs[idx], advantages[idx], mask, p.clip_eps, p.loss_aggregation, **totals
                )
                loss = pg
                if kl_in_loss:
                    kl = KL_ESTIMATORS[p.kl_estimator](logp, ev.ref_logprobs[idx])
                    kl_loss = aggregate_loss(kl, mask, p.loss_aggregation, **totals)
                    loss = loss + kl_coef * kl_loss
                    _acc(sums, {"loss/kl": kl_loss.item()})
                m.actor_engine.backward(loss)
                _acc(sums, {"loss/policy": pg.item(), "policy/clipfrac": float(stats.clipfrac) * frac})
                _acc(sums, {"policy/approx_kl": float(stats.approx_kl) * frac})
                if m.critic_engine is not None:
                    vl, vstats = value_loss(
                        response_values(m.critic_engine.model, r), ev.values[idx], adv.returns[idx], mask,
                        p.value_clip, p.loss_aggregation, **totals,
                    )  # fmt: skip
                    m.critic_engine.backward(vl)
                    _acc(sums, {"loss/value": vl.item(), "value/clipfrac": float(vstats.clipfrac) * frac})
            if ptx_batches is not None:
                ids, attn, lmask = next(ptx_batches)
                ptx = shifted_lm_loss(m.actor_engine.model, ids, attn, lmask) / world  # the mean of the ranks' means
                m.actor_engine.backward(t.ptx_coef * ptx)
                _acc(sums, {"loss/ptx": ptx.item()})
            a_stats = m.actor_engine.step()
            _acc(norms, {"optim/actor_grad_norm": a_stats.grad_norm})
            if m.critic_engine is not None:
                c_stats = m.critic_engine.step()
                _acc(norms, {"optim/critic_grad_norm": c_stats.grad_norm})
            if ema is not None:
                ema_update(ema, m.actor_engine.module, t.ema_decay)
            updates += 1
    metrics = {k: v / updates for k, v in {**dist.sum_dict_across(sums), **norms}.items()}
    metrics["optim/actor_lr"] = a_stats.lr
    metrics["faults/skipped_steps"] = float(sum(e.bad_steps for e in (m.actor_engine, m.critic_engine) if e))
    if m.critic_engine is not None:
        metrics["optim/critic_lr"] = c_stats.lr
    if weights is not None:
        metrics["tis/weight_mean"] = float(masked_mean(weights, rollout.response_mask))
        metrics["tis/capped_frac"] = float(masked_mean((weights >= p.tis_cap).float(), rollout.response_mask))
    return metrics


def _acc(sums: dict[str, float], values: dict[str, float]) -> None:
    for k, v in values.items():
        sums[k] = sums.get(k, 0.0) + v


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """θ_ema ← d·θ_ema + (1 − d)·θ (DeepSpeed-Chat's `moving_average`, d = 0.992)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.device, e.dtype), 1.0 - decay)


def rollout_metrics(rollout: Rollout, ev: Evaluated, adv: Advantages, t: RLTrainConfig, eos_id: int) -> dict:
    """8. What the rollout looked like (docs/metrics.md)."""
    mask = rollout.response_mask
    scores = ev.scores.total
    clipped = scores.clamp(-t.ppo.reward_clip, t.ppo.reward_clip)
    metrics = {
        "reward/score_mean": float(scores.mean()),
        "reward/score_std": float(scores.std()) if len(scores) > 1 else 0.0,
        "reward/clipped_mean": float(clipped.mean()),
        "reward/total_mean": float(adv.rewards.sum(1).mean()),
        "kl/mean": float(adv.kl.sum(1).mean()),
        "kl/token_mean": float(masked_mean(adv.kl, mask)),
        "advantages/mean": float(masked_mean(adv.advantages, mask)),
        "response/length_mean": float(mask.sum(1).mean()),
        "response/truncated_frac": float(truncated(rollout, eos_id).float().mean()),
    }
    for name, part in ev.scores.parts.items():
        metrics[f"reward/{name}_mean"] = float(part.mean())
    if ev.values is not None:
        metrics["returns/mean"] = float(masked_mean(adv.returns, mask))
        metrics["values/mean"] = float(masked_mean(ev.values, mask))
    if ev.greedy_scores is not None:
        metrics["reward/greedy_mean"] = float(ev.greedy_scores.mean())
    return metrics


# ------------------------------------------------------------------------------------------------ the driver


@dataclass
class Models:
    tok: object
    actor: HybridEngine
    actor_engine: TrainEngine
    critic_engine: TrainEngine | None
    reference: torch.nn.Module
    scorer: Scorer
    device: torch.device
    offload_frozen: bool = False

    @contextmanager
    def resident(self, modules: list[torch.nn.Module]):
        """With `engine.offload_frozen`, the frozen `modules` are on the device only for the block (CPU otherwise)."""
        if not self.offload_frozen:
            yield
            return
        for module in modules:
            module.to(self.device)
        try:
            yield
        finally:
            for module in modules:
                module.to("cpu")


def trainable(model: torch.nn.Module, cfg: RLConfig) -> torch.nn.Module:
    """Actor and critic train with dropout off (so the first update's ratio is 1, as with DeepSpeed-Chat): in eval
    mode, or — with gradient checkpointing, which transformers applies only in train mode — in train mode with every
    dropout layer at p = 0."""
    model = prepare_for_training(model.eval(), cfg)
    if cfg.engine.gradient_checkpointing:
        model.train()
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    return model


def build_models(cfg: RLConfig, algo: Algorithm, out: Path, device) -> Models:
    """The trained actor (and critic for PPO), the frozen reference and the reward sources (on the CPU between
    uses with `engine.offload_frozen`)."""
    t = cfg.train
    actor_path = resolve_model(cfg.actor, out)
    tok = load_tokenizer(actor_path)
    dtype = cfg.run.dtype
    frozen_device = torch.device("cpu") if cfg.engine.offload_frozen else device
    actor = trainable(load_causal_lm(actor_path, tok, dtype, device), cfg)
    reference = load_causal_lm(resolve_model(cfg.reference or cfg.actor, out), tok, dtype, frozen_device).eval()
    reference.requires_grad_(False)
    rm = resolve_model(cfg.reward_model, out) if cfg.reward_model else None
    scorer = build_scorer(rm, cfg.reward_functions, cfg.reward_weights, tok, dtype, frozen_device)
    steps = t.iterations * t.ppo.ppo_epochs * updates_per_epoch(t)
    actor_engine = build_engine(actor, t.actor_optim, steps, "actor", cfg)
    critic_engine = None
    if algo.uses_critic:
        critic_path = resolve_model(cfg.critic or cfg.reward_model, out)
        if load_tokenizer(critic_path).get_vocab() != tok.get_vocab():
            raise UserError(f"critic '{critic_path}' must share the actor's tokenizer: it values the actor's tokens")
        critic = trainable(load_value_model(critic_path, tok, dtype, device), cfg)
        critic_engine = build_engine(critic, t.critic_optim, steps, "critic", cfg)
    actor_gen = HybridEngine(actor_engine, tok, t.generation, cfg.engine.gather_for_generation)
    return Models(
        tok, actor_gen, actor_engine, critic_engine, reference, scorer, device, cfg.engine.offload_frozen
    )  # fmt: skip


def updates_per_epoch(t: RLTrainConfig) -> int:
    samples = t.rollout_batch_size * t.group_size
    return samples // (t.ppo.mini_batch_size or samples)


def check_ranks(t: RLTrainConfig, world: int) -> None:
    """Every rank must run the same number of forwards (ZeRO-3 gathers in each): equal shares of every batch."""
    if world == 1:
        return
    samples = t.rollout_batch_size * t.group_size
    mini = t.ppo.mini_batch_size or samples
    micro = t.ppo.micro_batch_size or mini // world
    if t.rollout_batch_size % world or mini % world or (mini // world) % micro:
        raise UserError(
            f"with {world} ranks, train.rollout_batch_size ({t.rollout_batch_size}) and train.ppo.mini_batch_size "
            f"({mini}) must be multiples of {world}, and train.ppo.micro_batch_size ({micro}, per rank) must divide "
            f"the {mini // world} sequences of each rank's mini-batch share"
        )


def ptx_stream(cfg: RLConfig, tok, out: Path, device):
    """Endless batches of SFT-format records for the PTX loss, or None."""
    t = cfg.train
    if not t.ptx_paths:
        return None
    recs = convert(load_raw(t.ptx_paths, None, cfg.run.seed, out), to_sft, cfg.data.skip_invalid, "PTX")
    enc = encode_all(recs, lambda r: encode_sft(tok, r, t.max_prompt_len + t.generation.max_new_tokens, False))

    def stream():
        for epoch in itertools.count():
            order = np.random.default_rng(cfg.run.seed + 7919 + epoch).permutation(len(enc))
            for i in range(0, len(order), t.ptx_batch_size * dist.world_size()):
                mine, _ = dist.shard([enc[j] for j in order[i : i + t.ptx_batch_size * dist.world_size()]])
                yield (x.to(device) for x in collate_sft(mine, tok.pad_token_id))

    return stream()


@torch.no_grad()
def held_out_score(m: Models, prompts: list[Prompt], batch_size: int, device) -> float:
    """Mean summed reward of one sampled response per held-out prompt."""
    scores = []
    for i in range(0, len(prompts), batch_size):
        rollout = generate_rollout(m.actor, prompts[i : i + batch_size], 1, m.tok, device)
        with m.resident(m.scorer.modules()):
            scores.append(score_rollout(m.scorer, rollout, m.tok).total)
    return float(torch.cat(scores).mean())


def check_finite(metrics: dict[str, float], it: int, skipped_step: bool) -> None:
    """Stop before anything non-finite is saved. An optimizer step skipped under `run.max_bad_steps` leaves its
    losses and gradient norm non-finite in the iteration's averages; those are logged as null instead."""
    for k, v in metrics.items():
        if not math.isfinite(v) and not (skipped_step and k.startswith(("loss/", "policy/", "value/", "optim/"))):
            raise FloatingPointError(f"rl: metric {k} is {v} at iteration {it}; stopping before saving")


def save_models(m: Models, ema: torch.nn.Module | None, out: Path) -> None:
    """`model/` (the actor), `critic/` (PPO) and `model_ema/` (with `train.ema`); LoRA adds the adapters."""
    save_trained(m.actor_engine, m.tok, out)
    if m.critic_engine is not None:
        save_trained(m.critic_engine, m.tok, out, "critic")
    if ema is not None and dist.is_main():
        save_model_dir(ema, m.tok, out / "model_ema")


def run_rl(cfg: RLConfig, raws=None, eval_raws=None) -> dict:
    """Run RL; write `output_dir/model` (actor), `critic/` (PPO), optional `model_ema/`, metrics, config, summary."""
    return run_stage(cfg, cfg.output_dir, raws is None, lambda out, device: _run_rl(cfg, out, device, raws, eval_raws))


def _run_rl(cfg, out: Path, device: torch.device, raws, eval_raws) -> dict:
    clock = Stopwatch()
    t = cfg.train
    algo = ALGORITHMS[t.algo]
    world = dist.world_size()
    check_ranks(t, world)

    m = build_models(cfg, algo, out, device)
    tok = m.tok
    train_recs, eval_recs = stage_records(cfg.data, to_prompt, cfg.run.seed, out, "prompt", raws, eval_raws)
    prompts = to_prompts(tok, train_recs, t.max_prompt_len)
    if len(prompts) < t.rollout_batch_size:
        raise UserError(f"only {len(prompts)} RL prompts, fewer than train.rollout_batch_size={t.rollout_batch_size}")
    ptx = ptx_stream(cfg, tok, out, device)
    ema = copy.deepcopy(m.actor_engine.module).requires_grad_(False) if t.ema else None
    engines = [e for e in (m.actor_engine, m.critic_engine) if e is not None]
    torch.manual_seed(cfg.run.seed + dist.rank())  # each rank samples its own responses
    keys = ("reward/score_mean", "kl/mean", "loss/policy")
    resumed, start, log = open_loop(cfg, out, "rl", engines, t.iterations, keys)
    print(
        f"rl ({t.algo}): {len(prompts)} prompts, {t.iterations} iterations × {t.rollout_batch_size} prompts × "
        f"{t.group_size} samples on {world} rank(s) → {out / 'model'}"
    )

    stream = prompt_stream(prompts, t.rollout_batch_size, cfg.run.seed)
    kl_coef = t.ppo.kl_coef
    history: list[dict[str, float]] = []
    skipped_rollouts = 0
    if resumed:
        kl_coef, history, skipped_rollouts = resumed["kl_coef"], resumed["history"], resumed["skipped_rollouts"]
        if ema is not None:
            ema.load_state_dict(resumed["ema"])
        for _ in range(start):
            next(stream)
        for _ in range(start * t.ppo.ppo_epochs * updates_per_epoch(t) if ptx is not None else 0):
            next(ptx)
    for it in range(start + 1, t.iterations + 1):
        t0 = time.time()
        batch = next(stream)  # 1 (each rank samples for its share of the prompts)
        mine, _ = dist.shard(batch)
        width = max(len(p.ids) for p in batch)
        rollout = generate_rollout(m.actor, mine, t.group_size, tok, device, tis=t.ppo.tis_cap is not None, width=width)
        t1 = time.time()  # 2
        ev = evaluate_rollout(m, rollout, mine, algo, t)  # 3–4
        rollout, ev = gather_rollout(rollout, ev, batch, t.group_size, tok.pad_token_id)
        reward_kl = kl_coef if t.ppo.kl_in == "reward" else 0.0
        inputs = AdvantageInputs(
            ev.scores.total, ev.old_logprobs, ev.ref_logprobs, rollout.response_mask, reward_kl, ev.values,
            ev.greedy_scores,
        )  # fmt: skip
        adv = algo.advantages(inputs, t)  # 5–6
        t2 = time.time()
        metrics = rollout_metrics(rollout, ev, adv, t, tok.eos_token_id)
        bad_before = sum(e.bad_steps for e in engines)
        if all_empty(rollout, tok.eos_token_id):
            skipped_rollouts += 1
            print(f"warning: rl: iteration {it}: every response is empty (EOS first); no update from this batch")
        else:
            metrics.update(ppo_update(m, rollout, ev, adv, t, kl_coef, ptx, ema, cfg.run.seed * 100003 + it))  # 7
        t3 = time.time()
        metrics["faults/skipped_rollouts"] = float(skipped_rollouts)
        metrics["kl/coef"] = kl_coef
        if t.ppo.kl_target is not None:
            kl_coef = adaptive_kl_coef(kl_coef, metrics["kl/mean"], t.ppo.kl_target, t.ppo.kl_horizon, len(batch))
        metrics.update({"time/generate_s": t1 - t0, "time/score_s": t2 - t1, "time/train_s": t3 - t2})
        metrics["perf/tokens_per_s"] = float(rollout.attention_mask.sum()) / (t3 - t0)
        check_finite(metrics, it, skipped_step=sum(e.bad_steps for e in engines) > bad_before)
        history.append(metrics)
        log.log(it, metrics, write=it % cfg.run.log_every == 0 or it == t.iterations)  # 8
        log.advance()
        state = {"kl_coef": kl_coef, "history": history, "skipped_rollouts": skipped_rollouts}
        if ema is not None:
            state["ema"] = ema.state_dict()
        checkpoint_if_due(cfg, out, it, t.iterations, engines, state)
    log.close()
    save_models(m, ema, out)
    tail = history[-max(1, len(history) // 10) :]
    summary = {"stage": "rl", "algo": t.algo, "iterations": t.iterations, "prompts": len(prompts)}
    summary.update({f"final/{k}": sum(h[k] for h in tail if k in h) / len(tail) for k in tail[0]})
    if eval_recs:
        held_out = to_prompts(tok, eval_recs, t.max_prompt_len)
        summary["eval/prompts"] = len(held_out)
        summary["eval/score_mean"] = held_out_score(m, held_out, t.rollout_batch_size, device)
    summary["time/total_s"] = clock.elapsed()
    if dist.is_main():
        write_json(out / "summary.json", summary)
    print(
        f"rl: done in {summary['time/total_s']:.1f}s; final reward {summary['final/reward/score_mean']:.3f}, "
        f"KL {summary['final/kl/mean']:.3f}"
    )
    return summary
