"""Step 3: RLHF — PPO (actor, critic, frozen reference, reward) or a critic-free algorithm (GRPO, Dr. GRPO, RLOO,
REINFORCE++, ReMax, DAPO, GSPO, CISPO), all on the same loop, the same update and the same hybrid engine.

One iteration (docs/architecture.md), each a named function below:
  1. sample a batch of prompts (left-padded), each repeated `group_size` times;
  2. generation mode: sample responses, truncate after EOS, build the response mask (with `env`: play multi-turn
     episodes, the mask on the policy's tokens, the attention on all of them; docs/episodes.md);
  3. score: reward model end score and/or Python reward functions, weighted and summed;
  4. log-probs of the actor (old) and the reference, values of the critic (PPO) — one no-grad forward each;
     steps 1–4 are one round; the algorithm's sampling policy draws one round, or (DAPO) more until the batch is
     full of groups whose rewards differ;
  5–6. the algorithm's advantages (train/algorithms.py): KL-shaped rewards → GAE, or a group / leave-one-out /
     greedy / batch baseline;
  7. the update (train/update.py): epochs × mini-batches; the algorithm's policy loss (+ KL loss, − entropy bonus,
     + PTX loss) and, for PPO, the clipped value loss; optimizer steps; EMA of the actor;
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
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from chatrlhf import distributed as dist
from chatrlhf.config import RLConfig, RLTrainConfig
from chatrlhf.data import to_prompt
from chatrlhf.engine.base import device_memory_metrics
from chatrlhf.engine.checkpoint import save_checkpoint
from chatrlhf.errors import UserError
from chatrlhf.eval.doctor import Checkup, Doctor, DoctorStop
from chatrlhf.eval.report import write_report
from chatrlhf.models.load import check_fits_context, save_model_dir
from chatrlhf.rlhf import KL_ESTIMATORS, adaptive_kl_coef, masked_mean
from chatrlhf.train.algorithms import ALGORITHMS, AdvantageInputs, Advantages, Algorithm
from chatrlhf.train.data import stage_records
from chatrlhf.train.outputs import Stopwatch, save_trained, write_summary
from chatrlhf.train.resume import checkpoint_if_due, open_loop
from chatrlhf.train.rl_eval import HeldOut, append_samples, evaluate_held_out, held_out
from chatrlhf.train.rl_models import (
    Models,
    PTXBatches,
    build_models,
    check_ranks,
    ptx_batches,
    updates_per_epoch,
)
from chatrlhf.train.rollout import (
    Evaluated,
    Prompt,
    PromptStream,
    Rollout,
    all_empty,
    episode_metrics,
    gather_rollout,
    generate_rollout,
    play_rollout,
    response_texts,
    rollout_logprobs,
    rollout_logprobs_and_entropy,
    rollout_values,
    score_rollout,
    to_prompts,
    truncated,
    turn_scores,
)
from chatrlhf.train.stage import run_stage
from chatrlhf.train.update import (
    Objective,
    Schedule,
    TrainBatch,
    ema_update,
    objective,
    reuses_update_forward,
    tis_metrics,
    tis_weights,
    update,
)


@torch.no_grad()
def evaluate_rollout(
    m: Models, rollout: Rollout, batch: list[Prompt], algo: Algorithm, train: RLTrainConfig, times: dict[str, float]
) -> Evaluated:
    """3–4. Rewards (and ReMax's greedy baseline), then one no-grad forward per model; the seconds of each part
    are added to `times` (`score`, `forward`)."""
    started = time.perf_counter()
    greedy_scores = None
    device = rollout.response.device
    if algo.needs_greedy:
        if m.runner is not None:  # a greedy episode of each prompt, played against a new environment instance
            greedy = play_rollout(m.runner, m.actor, batch, train.group_size, m.tok, device, greedy=True)
        else:
            width = rollout.prompt_ids.shape[1]
            greedy = generate_rollout(m.actor, batch, train.group_size, m.tok, device, greedy=True, width=width)
        with m.resident(m.scorer.modules()):
            greedy_scores = score_rollout(m.scorer, greedy, m.tok).total
    with m.resident(m.scorer.modules()):
        scores = score_rollout(m.scorer, rollout, m.tok)
    scored = time.perf_counter()
    with m.resident([m.reference]):
        ref_logprobs = rollout_logprobs(m.reference, rollout)
    old_logprobs = entropy = None  # exactly on-policy: the update's own forward gives them (update.py)
    if train.update.old_logprobs == "sampler":  # recorded as the tokens were drawn, with the same weights
        old_logprobs, entropy = rollout.rollout_logprobs, rollout.rollout_entropy
    elif not reuses_update_forward(train, m.actor.backend):
        old_logprobs, entropy = rollout_logprobs_and_entropy(m.actor_engine.module, rollout)
    values = rollout_values(m.critic_engine.module, rollout) if m.critic_engine else None
    _add(times, score=scored - started, forward=time.perf_counter() - scored)
    return Evaluated(
        scores=scores,
        old_logprobs=old_logprobs,
        entropy=entropy,
        ref_logprobs=ref_logprobs,
        values=values,
        greedy_scores=greedy_scores,
    )


def _add(times: dict[str, float], **seconds: float) -> None:
    for k, v in seconds.items():
        times[k] = times.get(k, 0.0) + v


def draw_round(
    m: Models, algo: Algorithm, train: RLTrainConfig, batch: list[Prompt], times: dict[str, float]
) -> tuple[Rollout, Evaluated]:
    """1–4 on the global prompt `batch`: each rank generates, scores and evaluates its share, then the shares are
    gathered, so that the sampling policy and steps 5–7 see the whole batch on every rank, as one process would."""
    started = time.perf_counter()
    mine, _ = dist.shard(batch)  # 1. each rank samples for its share of the prompts
    width = max(len(p.ids) for p in batch)
    # vLLM's log-probs cost nothing; hf records them per step (engine/generation.py:_SampledLogprobs)
    logprobs = train.rollout.tis_cap is not None or train.update.old_logprobs == "sampler" or m.actor.backend != "hf"
    if m.runner is not None:  # 2, multi-turn episodes
        rollout = play_rollout(m.runner, m.actor, mine, train.group_size, m.tok, m.device)
    else:  # 2
        rollout = generate_rollout(m.actor, mine, train.group_size, m.tok, m.device, logprobs=logprobs, width=width)
    _add(times, generate=time.perf_counter() - started, sync=m.actor.setup_s)
    ev = evaluate_rollout(m, rollout, mine, algo, train, times)  # 3–4
    return gather_rollout(rollout, ev, batch, train.group_size, m.tok.pad_token_id)


def train_batch(
    rollout: Rollout, ev: Evaluated, adv: Advantages, weights: torch.Tensor | None, train: RLTrainConfig, eos_id: int
) -> TrainBatch:
    """What the update trains on: the advantages (times the TIS `weights`, if any), and the loss mask (the response
    mask, less the truncated responses with `loss.mask_truncated`)."""
    loss_mask = rollout.response_mask
    if train.loss.mask_truncated:
        loss_mask = loss_mask * (~truncated(rollout, eos_id)).float().unsqueeze(1)
    return TrainBatch(
        rollout=rollout,
        old_logprobs=ev.old_logprobs,
        ref_logprobs=ev.ref_logprobs,
        advantages=adv.advantages if weights is None else adv.advantages * weights,
        loss_mask=loss_mask,
        old_values=ev.values,
        returns=adv.returns,
    )


def rollout_metrics(
    rollout: Rollout, ev: Evaluated, adv: Advantages, train: RLTrainConfig, eos_id: int, weights: dict[str, float]
) -> dict:
    """8. What the rollout looked like (docs/metrics.md). `weights`: each reward source's weight, by name."""
    mask = rollout.response_mask
    scores = ev.scores.total
    clipped = scores.clamp(-train.reward.clip, train.reward.clip)
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
    metrics["reward/clip_frac"] = float((clipped != scores).float().mean())
    for name, part in ev.scores.parts.items():
        metrics[f"reward/{name}_mean"] = float(part.mean())
    metrics.update(reward_shares(ev.scores.parts, weights))
    if ev.values is not None:
        metrics["returns/mean"] = float(masked_mean(adv.returns, mask))
        metrics["values/mean"] = float(masked_mean(ev.values, mask))
    if ev.greedy_scores is not None:
        metrics["reward/greedy_mean"] = float(ev.greedy_scores.mean())
    if adv.length_penalty is not None:
        metrics["reward/overlong_penalty_mean"] = float(adv.length_penalty.mean())
    if ev.entropy is not None:
        metrics["policy/entropy"] = float(masked_mean(ev.entropy, mask))
    if rollout.episodes is not None:
        metrics.update(episode_metrics(rollout.episodes, rollout))
    if rollout.rollout_logprobs is not None and train.update.old_logprobs != "sampler":
        # the engine mismatch: the same tokens, the same definition of log π, the trainer's weights vs the rollout's
        diff = (ev.old_logprobs - rollout.rollout_logprobs).abs()
        metrics["rollout/logprob_diff"] = float(masked_mean(diff, mask))
        metrics["rollout/logprob_diff_max"] = float((diff * mask).max())
    return metrics


def reward_shares(parts: dict[str, torch.Tensor], weights: dict[str, float]) -> dict[str, float]:
    """`reward/<name>_share` of each source of a weighted sum of two or more: |w|·std(score) over the sum of those
    across sources — how much of the spread of the total, which is what the advantages see, each one makes
    (the RL doctor's `reward_dominance`). Nothing when there is one source or no spread at all."""
    if len(parts) < 2 or len(next(iter(parts.values()))) < 2:
        return {}
    spread = {name: abs(weights[name]) * float(part.float().std()) for name, part in parts.items()}
    total = sum(spread.values())
    return {f"reward/{name}_share": s / total for name, s in spread.items()} if total > 0 else {}


def check_rollout_freshness(metrics: dict[str, float], bound: float | None, it: int) -> None:
    """Refuse to train on rollouts whose log-probs disagree with the trainer's by more than `bound`."""
    diff = metrics.get("rollout/logprob_diff")
    if bound is not None and diff is not None and diff > bound:
        raise UserError(
            f"rl: iteration {it}: rollout/logprob_diff is {diff:.3g}, over train.rollout.max_logprob_diff={bound}: "
            "the rollout engine samples from other weights or numerics than the trainer's. Check the weight sync "
            "(docs/rollout.md), run the rollout engine in the trainer's dtype, or raise the bound"
        )


# ------------------------------------------------------------------------------------------------ the driver


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


@dataclass
class LoopState:
    """What the iterations carry from one to the next, saved with every checkpoint."""

    kl_coef: float
    """β now (it moves with an adaptive KL controller)."""
    history: list[dict[str, float]]
    """Every iteration's metrics (the summary averages the last tenth)."""
    skipped_rollouts: int = 0
    """Iterations that trained nothing: every response empty, or (`loss.mask_truncated`) every one cut
    (`faults/skipped_rollouts`)."""


def run_rl(cfg: RLConfig, raws=None, eval_raws=None) -> dict:
    """Run RL; write `output_dir/model` (actor), `critic/` (PPO), optional `model_ema/`, metrics, config, summary."""
    return run_stage(cfg, cfg.output_dir, raws is None, lambda out, device: _run_rl(cfg, out, device, raws, eval_raws))


def rl_prompts(cfg: RLConfig, m: Models, out: Path, raws, eval_raws) -> tuple[Sequence[Prompt], HeldOut | None]:
    """The training prompts (at least a rollout batch of them) and the held-out set-up, encoded with the actor's
    tokenizer; single responses that could grow past the models' context are refused here (episodes were checked
    by their runner when it was built)."""
    train = cfg.train
    train_recs, eval_recs = stage_records(cfg.data, to_prompt, cfg.run.seed, out, "prompt", raws, eval_raws)
    prompts = to_prompts(m.tok, train_recs, train.max_prompt_len)
    if len(prompts) < train.rollout_batch_size:
        raise UserError(
            f"only {len(prompts)} RL prompts, fewer than train.rollout_batch_size={train.rollout_batch_size}"
        )
    held = held_out(
        to_prompts(m.tok, eval_recs, train.max_prompt_len), cfg.judge, train.eval_prompts, train.rollout_batch_size,
        cfg.run.seed + 7,
    )  # fmt: skip
    if m.runner is None:
        every = itertools.chain(prompts, held.prompts if held else [])
        max_new = train.generation.max_new_tokens
        check_fits_context(((p.ids, p.text) for p in every), train.max_prompt_len, max_new, m.context)
    return prompts, held


def _run_rl(cfg: RLConfig, out: Path, device: torch.device, raws, eval_raws) -> dict:
    clock = Stopwatch()
    train = cfg.train
    algo = ALGORITHMS[train.algo]
    obj = objective(algo.policy_loss, train)
    world = dist.world_size()
    check_ranks(train, world)

    m = build_models(cfg, algo, out, device)
    tok = m.tok
    prompts, held = rl_prompts(cfg, m, out, raws, eval_raws)
    ptx = ptx_batches(cfg, tok, out, device)
    ema = copy.deepcopy(m.actor_engine.module).requires_grad_(False) if train.ema else None
    torch.manual_seed(cfg.run.seed + dist.rank())  # each rank samples its own responses
    keys = ("reward/score_mean", "kl/mean", "loss/policy")
    resumed, start, log = open_loop(cfg, out, "rl", m.engines, train.iterations, keys)
    print(
        f"rl ({train.algo}): {len(prompts)} prompts, {train.iterations} iterations × {train.rollout_batch_size} "
        f"prompts × {train.group_size} samples on {world} rank(s) → {out / 'model'}"
    )

    stream = PromptStream(prompts, train.rollout_batch_size, cfg.run.seed)
    state = LoopState(kl_coef=train.kl.coef, history=[])
    doctor = Doctor(train.doctor)
    if resumed:
        state = LoopState(
            kl_coef=resumed["kl_coef"], history=resumed["history"], skipped_rollouts=resumed["skipped_rollouts"]
        )
        if ema is not None:
            ema.load_state_dict(resumed["ema"])
        if "doctor" in resumed:  # checkpoints of earlier versions have no doctor state
            doctor.load_state_dict(resumed["doctor"])
        stream.skip_to(resumed.get("prompts_drawn", start))  # earlier versions drew one batch per iteration
        if ptx is not None:  # checkpoints of earlier versions did not count the PTX batches: one per update
            ptx.skip_to(resumed.get("ptx_drawn", start * train.update.epochs * updates_per_epoch(train)))
    samples = out / "samples.jsonl"
    append_samples(samples, [], resumed_at=start)  # a fresh or resumed run: no rows after its starting point
    for it in range(start + 1, train.iterations + 1):
        metrics, rollout = iteration(m, algo, obj, cfg, it, stream, state, ptx, ema)
        evaluated = held is not None and train.eval_every > 0 and it % train.eval_every == 0
        if evaluated:  # 8. the held-out evaluation (the doctor compares the judge with the reward)
            scores, rows = evaluate_held_out(m, held, it)
            metrics.update(scores)
            append_samples(samples, rows)
            log.log_samples(it, rows)
        checkup = check_up(doctor, it, metrics, rollout, tok)
        written = evaluated or it % cfg.run.log_every == 0 or it == train.iterations or bool(checkup.findings)
        log.log(it, metrics, write=written)  # 8
        log.advance()
        saved = {"kl_coef": state.kl_coef, "history": state.history, "skipped_rollouts": state.skipped_rollouts}
        saved["ptx_drawn"] = ptx.drawn if ptx is not None else 0
        saved["prompts_drawn"] = stream.drawn
        saved["doctor"] = doctor.state_dict()
        if ema is not None:
            saved["ema"] = ema.state_dict()
        if checkup.stops:
            save_checkpoint(out, it, m.engines, saved, cfg.checkpoint.keep)  # the run can be resumed from here
        else:
            checkpoint_if_due(cfg, out, it, train.iterations, m.engines, saved)
        if dist.is_main() and (written or checkup.findings):
            doctor.write(out / "doctor.json")
        if checkup.stops:
            log.close()
            if dist.is_main():
                write_report(out)
            raise DoctorStop(checkup.stops)
    log.close()
    save_models(m, ema, out)
    tail = state.history[-max(1, len(state.history) // 10) :]
    summary = {"stage": "rl", "algo": train.algo, "iterations": train.iterations, "prompts": len(prompts)}
    summary.update({f"final/{k}": sum(h[k] for h in tail if k in h) / len(tail) for k in tail[0]})
    if held is not None:
        scores, rows = evaluate_held_out(m, held, train.iterations)
        summary["eval/prompts"] = len(held.prompts)
        summary.update(scores)
        if not (train.eval_every > 0 and train.iterations % train.eval_every == 0):
            append_samples(samples, rows)  # the last evaluation, unless the loop's was already at this iteration
    summary["doctor/findings"] = [f.name for f in doctor.findings]
    summary["time/total_s"] = clock.elapsed()
    write_summary(out / "summary.json", summary)
    if dist.is_main():
        doctor.write(out / "doctor.json")
        write_report(out)
    print(
        f"rl: done in {summary['time/total_s']:.1f}s; final reward {summary['final/reward/score_mean']:.3f}, "
        f"KL {summary['final/kl/mean']:.3f}"
    )
    return summary


def iteration(
    m: Models,
    algo: Algorithm,
    obj: Objective,
    cfg: RLConfig,
    it: int,
    stream: PromptStream,
    state: LoopState,
    ptx: PTXBatches | None,
    ema: torch.nn.Module | None,
) -> tuple[dict[str, float], Rollout]:
    """Steps 1–7 of iteration `it` on prompt batches from `stream`; updates `state` and returns the metrics and the
    (gathered) rollout it trained on."""
    train = cfg.train
    tok = m.tok
    started = time.time()
    times: dict[str, float] = {}
    sampled = algo.sample(
        lambda: draw_round(m, algo, train, next(stream), times), train.group_size, train.sampling.max_rounds,
        tok.pad_token_id,
    )  # fmt: skip  # 1–4
    rollout, ev = sampled.rollout, sampled.evaluated
    sampled_at = time.time()
    source_weights = {source.name: w for source, w in zip(m.scorer.sources, m.scorer.weights)}
    scores, per_turn = ev.scores.total, None
    if train.episode.credit == "turn" and rollout.episodes is not None:  # the turn rewards go to their turns
        per_turn = turn_scores(rollout, source_weights["env"])
        scores = scores - source_weights["env"] * ev.scores.parts["env"]
    inputs = AdvantageInputs(
        scores=scores,
        old_logprobs=ev.old_logprobs,
        ref_logprobs=ev.ref_logprobs,
        mask=rollout.response_mask,
        kl_coef=state.kl_coef if train.kl.placement == "reward" else 0.0,
        values=ev.values,
        greedy_scores=ev.greedy_scores,
        turn_scores=per_turn,
    )
    adv = algo.advantages(inputs, train)  # 5–6
    metrics: dict[str, float] = {}
    measured = ev.old_logprobs is not None  # else the update's forward gives π_old, and the metrics follow it
    if measured:
        metrics.update(rollout_metrics(rollout, ev, adv, train, tok.eos_token_id, source_weights))
        check_rollout_freshness(metrics, train.rollout.max_logprob_diff, it)
    weights = tis_weights(ev.old_logprobs, rollout, train.rollout.tis_cap)
    if weights is not None:
        metrics.update(tis_metrics(weights, rollout.response_mask, train.rollout.tis_cap))
    batch = train_batch(rollout, ev, adv, weights, train, tok.eos_token_id)
    bad_before = sum(e.bad_steps for e in m.engines)
    if all_empty(rollout, tok.eos_token_id) or not batch.loss_mask.any():
        state.skipped_rollouts += 1
        why = "every response is empty (EOS first)" if all_empty(rollout, tok.eos_token_id) else "every response is cut"
        print(f"warning: rl: iteration {it}: {why}; no update from this batch")
    else:
        schedule = Schedule(train.update.epochs, train.update.mini_batch_size, train.update.micro_batch_size,
                            order_seed=cfg.run.seed * 100003 + it, trim_padding=train.update.trim_padding)  # fmt: skip
        after_step = None if ema is None else lambda: ema_update(ema, m.actor_engine.module, train.ema_decay)
        critic = m.critic_engine
        updated = update(m.actor_engine, critic, batch, obj, schedule, state.kl_coef, ptx, train.ptx_coef,
                         after_step)  # fmt: skip  # 7
        metrics.update(updated.metrics)
        metrics["faults/skipped_steps"] = float(sum(e.bad_steps for e in m.engines))
        if updated.old_logprobs is not None:
            ev, adv = with_old_logprobs(ev, adv, updated.old_logprobs, updated.entropy, rollout, train)
    if not measured:
        if ev.old_logprobs is None:  # no update took place: the forward it would have made, for the metrics
            with torch.no_grad():
                old, entropy = rollout_logprobs_and_entropy(m.actor_engine.module, rollout)
            ev, adv = with_old_logprobs(ev, adv, old, entropy, rollout, train)
        metrics.update(rollout_metrics(rollout, ev, adv, train, tok.eos_token_id, source_weights))
    metrics.update(sampled.metrics)
    trained = time.time()
    metrics["faults/skipped_rollouts"] = float(state.skipped_rollouts)
    metrics["kl/coef"] = state.kl_coef
    kl = train.kl
    if kl.target is not None:
        # n: the responses of the batch (Ziegler et al. 2019 count samples, so a group of n counts n)
        state.kl_coef = adaptive_kl_coef(state.kl_coef, metrics["kl/mean"], kl.target, kl.horizon, len(rollout.prompts))
    metrics.update(
        {
            "time/generate_s": times["generate"],
            "time/sync_s": times["sync"],
            "time/score_s": times["score"],
            "time/forward_s": times["forward"],
            "time/train_s": trained - sampled_at,
            **device_memory_metrics(),
        }
    )
    metrics["perf/tokens_per_s"] = float(rollout.attention_mask.sum()) / (trained - started)
    check_finite(metrics, it, skipped_step=sum(e.bad_steps for e in m.engines) > bad_before)
    state.history.append(metrics)  # the doctor's and the evaluation's metrics join this dict afterwards
    return metrics, rollout


def with_old_logprobs(
    ev: Evaluated, adv: Advantages, old: torch.Tensor, entropy: torch.Tensor, rollout: Rollout, train: RLTrainConfig
) -> tuple[Evaluated, Advantages]:
    """The evaluation and advantages of an on-policy update once π_old's log-probs are known (from the update's
    forward): the per-token KL estimate against the reference, which the advantages did not need (β = 0 in the
    reward), for the metrics."""
    kl = KL_ESTIMATORS[train.kl.estimator](old, ev.ref_logprobs) * rollout.response_mask
    return replace(ev, old_logprobs=old, entropy=entropy), replace(adv, kl=kl)


def check_up(doctor: Doctor, it: int, metrics: dict[str, float], rollout: Rollout, tok) -> Checkup:
    """The RL doctor's look at iteration `it` (eval/doctor.py): its metrics join `metrics`, and each finding that
    fires is printed once. Every rank sees the same gathered rollout, so every rank's doctor agrees."""
    checkup = doctor.observe(it, metrics, response_texts(rollout, tok), [p.text for p in rollout.prompts])
    metrics.update(checkup.metrics)
    for finding in checkup.findings:
        print(f"warning: rl: doctor: {finding.message}")
    return checkup
