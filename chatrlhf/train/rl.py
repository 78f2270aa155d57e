"""Step 3: RLHF with PPO — actor, critic, frozen reference and frozen reward model.

One iteration (DESIGN.md), each a named function below:
  1. sample a batch of prompts (left-padded);
  2. generation mode: sample responses, truncate after EOS, build the response mask;
  3. score: the reward model's end score (the value at the last real response token);
  4. log-probs of the actor (old) and the reference, values of the critic — one no-grad forward each;
  5. per-token rewards r_t = −β·(log π_old − log π_ref), plus clip(score, ±c) at the last response token;
  6. advantages by GAE (γ, λ), optionally whitened;
  7. ppo_epochs × mini-batches: clipped policy loss (+ PTX loss) and clipped value loss, optimizer steps, EMA;
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from chatrlhf.config import RLConfig, RLTrainConfig
from chatrlhf.data import to_prompt, to_sft
from chatrlhf.data.collate import collate_sft, encode_prompt, encode_sft, pad, position_ids
from chatrlhf.engine.hybrid import HybridEngine
from chatrlhf.engine.single import TrainEngine
from chatrlhf.errors import UserError
from chatrlhf.metrics import MetricsLogger
from chatrlhf.models.load import (
    ValueModel,
    load_causal_lm,
    load_tokenizer,
    load_value_model,
    resolve_model,
    same_vocabulary,
    save_model_dir,
)
from chatrlhf.rlhf import (
    gae_advantages,
    kl_penalized_rewards,
    last_token_index,
    masked_mean,
    masked_whiten,
    policy_loss,
    token_logprobs,
    truncate_after_eos,
    value_loss,
)
from chatrlhf.train.common import (
    Stopwatch,
    convert,
    load_raw,
    run_stage,
    stage_records,
    write_json,
)
from chatrlhf.train.sft import shifted_lm_loss


@dataclass
class Rollout:
    """One batch of prompts and sampled responses. B = batch, P = prompt width, R = response width."""

    prompt_ids: torch.Tensor
    """(B, P) long — left-padded prompts."""
    prompt_mask: torch.Tensor
    """(B, P) long — 1 for real prompt tokens."""
    response: torch.Tensor
    """(B, R) long — sampled tokens, pad after the first EOS."""
    response_mask: torch.Tensor
    """(B, R) float — 1 up to and including the first EOS."""

    @property
    def sequences(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask.long()], dim=1)

    def select(self, idx: torch.Tensor) -> Rollout:
        return Rollout(self.prompt_ids[idx], self.prompt_mask[idx], self.response[idx], self.response_mask[idx])


@dataclass
class Evaluated:
    """No-grad forwards over a rollout, all (B, R) over response positions."""

    old_logprobs: torch.Tensor
    """log π_old(a_t | s_t) — the actor that sampled."""
    ref_logprobs: torch.Tensor
    """log π_ref(a_t | s_t) — the frozen reference."""
    values: torch.Tensor
    """V_old(s_t) — the critic's value of the state before token t."""
    scores: torch.Tensor
    """(B,) the reward model's end score."""


@dataclass
class Advantages:
    rewards: torch.Tensor
    """(B, R) KL-shaped per-token rewards."""
    kl: torch.Tensor
    """(B, R) per-token KL estimate log π_old − log π_ref (masked)."""
    advantages: torch.Tensor
    """(B, R) GAE advantages (whitened if configured)."""
    returns: torch.Tensor
    """(B, R) value targets G_t = A_t + V_t (before whitening)."""


# ------------------------------------------------------------------------------------------------ the steps


def prompt_stream(prompts: list[list[int]], batch_size: int, seed: int):
    """1. Endless shuffled batches of encoded prompts: each pass is a new permutation, cut into full batches (the
    last `len % batch_size` prompts of a pass wait for a later pass's shuffle)."""
    for epoch in itertools.count():
        order = np.random.default_rng(seed + epoch).permutation(len(prompts))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [prompts[j] for j in order[i : i + batch_size]]


def generate_rollout(actor: HybridEngine, batch: list[list[int]], pad_id: int, eos_id: int, device) -> Rollout:
    """2. Sample one response per prompt in generation mode; everything after the first EOS becomes pad."""
    prompt_ids, prompt_mask = (t.to(device) for t in pad(batch, pad_id, left=True))
    with actor.generation_mode():
        response = actor.generate(prompt_ids, prompt_mask)
    response, mask = truncate_after_eos(response, eos_id, pad_id)
    return Rollout(prompt_ids, prompt_mask, response, mask)


def response_logprobs(model, rollout: Rollout) -> torch.Tensor:
    """(B, R) log π(a_t | s_t) of the response tokens; logits are computed for response positions only."""
    attn = rollout.attention_mask
    width = rollout.response.shape[1]
    logits = model(
        input_ids=rollout.sequences,
        attention_mask=attn,
        position_ids=position_ids(attn),
        use_cache=False,
        logits_to_keep=width + 1,
    ).logits[:, :-1]
    return token_logprobs(logits, rollout.response)


def response_values(critic: ValueModel, rollout: Rollout) -> torch.Tensor:
    """(B, R) V(s_t): the value at the token before each response token."""
    attn = rollout.attention_mask
    values = critic(rollout.sequences, attn, position_ids(attn))
    return values[:, rollout.prompt_ids.shape[1] - 1 : -1]


def end_scores(reward_model: ValueModel, rollout: Rollout) -> torch.Tensor:
    """3. (B,) the reward model's value at the last real response token."""
    last = rollout.prompt_ids.shape[1] + last_token_index(rollout.response_mask)
    return reward_model.scores_at(rollout.sequences, rollout.attention_mask, last)


@torch.no_grad()
def evaluate_rollout(actor, reference, critic: ValueModel, reward_model: ValueModel, rollout: Rollout) -> Evaluated:
    """3–4. One no-grad forward per model."""
    return Evaluated(
        old_logprobs=response_logprobs(actor, rollout),
        ref_logprobs=response_logprobs(reference, rollout),
        values=response_values(critic, rollout),
        scores=end_scores(reward_model, rollout),
    )


def compute_advantages(ev: Evaluated, mask: torch.Tensor, t: RLTrainConfig) -> Advantages:
    """5–6. KL-shaped rewards, GAE, optional whitening."""
    p = t.ppo
    rewards, kl = kl_penalized_rewards(ev.scores, ev.old_logprobs, ev.ref_logprobs, mask, p.kl_coef, p.reward_clip)
    advantages, returns = gae_advantages(rewards, ev.values, mask, p.gamma, p.lam)
    if p.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return Advantages(rewards, kl, advantages, returns)


def ppo_update(
    actor: TrainEngine,
    critic: TrainEngine,
    rollout: Rollout,
    ev: Evaluated,
    adv: Advantages,
    t: RLTrainConfig,
    ptx_batches,
    ema: torch.nn.Module | None,
) -> dict[str, float]:
    """7. ppo_epochs × mini-batches; micro-batches accumulate with the mini-batch's token total."""
    p = t.ppo
    n = rollout.response.shape[0]
    mini = p.mini_batch_size or n
    micro = p.micro_batch_size or mini
    sums: dict[str, float] = {}
    updates = 0
    for _ in range(p.ppo_epochs):
        order = torch.randperm(n, device=rollout.response.device)
        for m0 in range(0, n, mini):
            mb_idx = order[m0 : m0 + mini]
            total_tokens = float(rollout.response_mask[mb_idx].sum())
            for u0 in range(0, len(mb_idx), micro):
                idx = mb_idx[u0 : u0 + micro]
                r, mask = rollout.select(idx), rollout.response_mask[idx]
                pg, pstats = policy_loss(
                    response_logprobs(actor.model, r),
                    ev.old_logprobs[idx],
                    adv.advantages[idx],
                    mask,
                    p.clip_eps,
                    p.loss_aggregation,
                    total_tokens=total_tokens,
                    total_seqs=len(mb_idx),
                )
                vl, vstats = value_loss(
                    response_values(critic.model, r),
                    ev.values[idx],
                    adv.returns[idx],
                    mask,
                    p.value_clip,
                    p.loss_aggregation,
                    total_tokens=total_tokens,
                    total_seqs=len(mb_idx),
                )
                actor.backward(pg)
                critic.backward(vl)
                frac = float(mask.sum()) / total_tokens  # the micro-batch's share of the mini-batch's tokens
                _acc(sums, {"loss/policy": pg.item(), "loss/value": vl.item()})
                _acc(
                    sums,
                    {
                        "policy/clipfrac": float(pstats.clipfrac) * frac,
                        "policy/approx_kl": float(pstats.approx_kl) * frac,
                    },
                )
                _acc(sums, {"value/clipfrac": float(vstats.clipfrac) * frac})
            if ptx_batches is not None:
                ids, attn, lmask = next(ptx_batches)
                ptx = shifted_lm_loss(actor.model, ids, attn, lmask)
                actor.backward(t.ptx_coef * ptx)
                _acc(sums, {"loss/ptx": ptx.item()})
            a_stats, c_stats = actor.step(), critic.step()
            _acc(sums, {"optim/actor_grad_norm": a_stats.grad_norm, "optim/critic_grad_norm": c_stats.grad_norm})
            if ema is not None:
                ema_update(ema, actor.model, t.ema_decay)
            updates += 1
    metrics = {k: v / updates for k, v in sums.items()}
    metrics["optim/actor_lr"], metrics["optim/critic_lr"] = a_stats.lr, c_stats.lr
    return metrics


def _acc(sums: dict[str, float], values: dict[str, float]) -> None:
    for k, v in values.items():
        sums[k] = sums.get(k, 0.0) + v


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """θ_ema ← d·θ_ema + (1 − d)·θ (DeepSpeed-Chat's `moving_average`, d = 0.992)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.device, e.dtype), 1.0 - decay)


def rollout_metrics(
    rollout: Rollout, ev: Evaluated, adv: Advantages, t: RLTrainConfig, eos_id: int
) -> dict[str, float]:
    """8. What the rollout looked like (docs/metrics.md)."""
    mask = rollout.response_mask
    lengths = mask.sum(1)
    clipped = ev.scores.clamp(-t.ppo.reward_clip, t.ppo.reward_clip)
    seq_kl = adv.kl.sum(1)
    return {
        "reward/score_mean": float(ev.scores.mean()),
        "reward/score_std": float(ev.scores.std()) if len(ev.scores) > 1 else 0.0,
        "reward/clipped_mean": float(clipped.mean()),
        "reward/total_mean": float(adv.rewards.sum(1).mean()),
        "kl/mean": float(seq_kl.mean()),
        "kl/token_mean": float(masked_mean(adv.kl, mask)),
        "advantages/mean": float(masked_mean(adv.advantages, mask)),
        "returns/mean": float(masked_mean(adv.returns, mask)),
        "values/mean": float(masked_mean(ev.values, mask)),
        "response/length_mean": float(lengths.mean()),
        "response/truncated_frac": float(truncated(rollout, eos_id).float().mean()),
    }


def truncated(rollout: Rollout, eos_id: int) -> torch.Tensor:
    """(B,) True where the response has no EOS: it filled max_new_tokens and was cut."""
    last = last_token_index(rollout.response_mask)
    return rollout.response.gather(1, last.unsqueeze(1)).squeeze(1) != eos_id


@torch.no_grad()
def held_out_score(m: Models, prompts: list[list[int]], batch_size: int, device) -> float:
    """Mean reward-model end score of one sampled response per held-out prompt."""
    scores = []
    for i in range(0, len(prompts), batch_size):
        rollout = generate_rollout(m.actor, prompts[i : i + batch_size], m.tok.pad_token_id, m.tok.eos_token_id, device)
        scores.append(end_scores(m.reward_model, rollout))
    return float(torch.cat(scores).mean())


# ------------------------------------------------------------------------------------------------ the driver


@dataclass
class Models:
    tok: object
    actor: HybridEngine
    actor_engine: TrainEngine
    critic_engine: TrainEngine
    reference: torch.nn.Module
    reward_model: ValueModel


def build_models(cfg: RLConfig, out: Path, device) -> Models:
    """Four models: the trained actor and critic, the frozen reference and reward model."""
    t = cfg.train
    actor_path = resolve_model(cfg.actor, out)
    rm_path = resolve_model(cfg.reward_model, out)
    tok = load_tokenizer(actor_path)
    rm_tok = load_tokenizer(rm_path)
    if not same_vocabulary(tok, rm_tok):
        raise UserError(
            f"reward_model '{cfg.reward_model}' uses a different tokenizer than actor '{cfg.actor}'; "
            "PPO scores the actor's tokens directly, so they must share a vocabulary"
        )
    dtype = cfg.run.dtype
    actor = load_causal_lm(actor_path, tok, dtype, device).eval()
    reference = load_causal_lm(resolve_model(cfg.reference or cfg.actor, out), tok, dtype, device).eval()
    critic = load_value_model(resolve_model(cfg.critic or cfg.reward_model, out), tok, dtype, device).eval()
    reward_model = load_value_model(rm_path, tok, dtype, device).eval()
    for frozen in (reference, reward_model):
        frozen.requires_grad_(False)
    steps = t.iterations * t.ppo.ppo_epochs * (t.rollout_batch_size // (t.ppo.mini_batch_size or t.rollout_batch_size))
    actor_engine = TrainEngine(actor, t.actor_optim, steps, name="actor")
    critic_engine = TrainEngine(critic, t.critic_optim, steps, name="critic")
    hybrid = HybridEngine(actor_engine, tok, t.generation)
    return Models(tok, hybrid, actor_engine, critic_engine, reference, reward_model)


def ptx_stream(cfg: RLConfig, tok, out: Path, device):
    """Endless batches of SFT-format records for the PTX loss, or None."""
    t = cfg.train
    if not t.ptx_paths:
        return None
    recs = convert(load_raw(t.ptx_paths, None, cfg.run.seed, out), to_sft, cfg.data.skip_invalid, "PTX")
    enc = [encode_sft(tok, r, t.max_prompt_len + t.generation.max_new_tokens, False) for r in recs]

    def stream():
        for epoch in itertools.count():
            order = np.random.default_rng(cfg.run.seed + 7919 + epoch).permutation(len(enc))
            for i in range(0, len(order), t.ptx_batch_size):
                yield (
                    x.to(device)
                    for x in collate_sft([enc[j] for j in order[i : i + t.ptx_batch_size]], tok.pad_token_id)
                )

    return stream()


def run_rl(cfg: RLConfig, raws=None, eval_raws=None) -> dict:
    """Run PPO; write `output_dir/model` (actor), `critic/`, optional `model_ema/`, metrics, config, summary."""
    return run_stage(cfg, cfg.output_dir, raws is None, lambda out, device: _run_rl(cfg, out, device, raws, eval_raws))


def _run_rl(cfg, out: Path, device: torch.device, raws, eval_raws) -> dict:
    clock = Stopwatch()
    t = cfg.train

    m = build_models(cfg, out, device)
    tok = m.tok
    train_recs, eval_recs = stage_records(cfg.data, to_prompt, cfg.run.seed, out, "prompt", raws, eval_raws)
    prompts = [encode_prompt(tok, r, t.max_prompt_len) for r in train_recs]
    if len(prompts) < t.rollout_batch_size:
        raise UserError(f"only {len(prompts)} RL prompts, fewer than train.rollout_batch_size={t.rollout_batch_size}")
    ptx = ptx_stream(cfg, tok, out, device)
    ema = copy.deepcopy(m.actor_engine.model).requires_grad_(False) if t.ema else None
    log = MetricsLogger(
        out / "metrics.jsonl", "rl", t.iterations, cfg.run.progress, ("reward/score_mean", "kl/mean", "loss/policy")
    )
    print(f"rl: {len(prompts)} prompts, {t.iterations} iterations × {t.rollout_batch_size} rollouts → {out / 'model'}")

    stream = prompt_stream(prompts, t.rollout_batch_size, cfg.run.seed)
    history: list[dict[str, float]] = []
    for it in range(1, t.iterations + 1):
        t0 = time.time()
        rollout = generate_rollout(m.actor, next(stream), tok.pad_token_id, tok.eos_token_id, device)  # 1–2
        t1 = time.time()
        ev = evaluate_rollout(m.actor_engine.model, m.reference, m.critic_engine.model, m.reward_model, rollout)  # 3–4
        adv = compute_advantages(ev, rollout.response_mask, t)  # 5–6
        t2 = time.time()
        metrics = rollout_metrics(rollout, ev, adv, t, tok.eos_token_id)
        metrics.update(ppo_update(m.actor_engine, m.critic_engine, rollout, ev, adv, t, ptx, ema))  # 7
        t3 = time.time()
        n_tokens = float(rollout.attention_mask.sum())
        metrics.update({"time/generate_s": t1 - t0, "time/score_s": t2 - t1, "time/train_s": t3 - t2})
        metrics["perf/tokens_per_s"] = n_tokens / (t3 - t0)
        for k, v in metrics.items():
            if not math.isfinite(v):
                raise FloatingPointError(f"rl: metric {k} is {v} at iteration {it}; stopping before saving")
        history.append(metrics)
        log.log(it, metrics, write=it % cfg.run.log_every == 0 or it == t.iterations)  # 8
        log.advance()
    log.close()

    save_model_dir(m.actor_engine.model, tok, out / "model")
    save_model_dir(m.critic_engine.model.model, tok, out / "critic")
    if ema is not None:
        save_model_dir(ema, tok, out / "model_ema")
    tail = history[-max(1, len(history) // 10) :]
    summary = {"stage": "rl", "algo": t.algo, "iterations": t.iterations, "prompts": len(prompts)}
    summary.update({f"final/{k}": sum(h[k] for h in tail) / len(tail) for k in tail[0]})
    if eval_recs:
        held_out = [encode_prompt(tok, r, t.max_prompt_len) for r in eval_recs]
        summary["eval/prompts"] = len(held_out)
        summary["eval/score_mean"] = held_out_score(m, held_out, t.rollout_batch_size, device)
    summary["time/total_s"] = clock.elapsed()
    write_json(out / "summary.json", summary)
    print(
        f"rl: done in {summary['time/total_s']:.1f}s; final reward {summary['final/reward/score_mean']:.3f}, "
        f"KL {summary['final/kl/mean']:.3f}"
    )
    return summary
