"""Step 2: a reward model — causal-LM backbone + scalar head — trained on prompt/chosen/rejected pairs.

Loss (InstructGPT eq. 1): L = mean_i −log σ(r(x_i, y_c) − r(x_i, y_r)), where r is the END score: the head's
value at the last real token of the response (its EOS). DeepSpeed-Chat instead averages a per-token loss over
the positions after the first differing token (docs/algorithms.md says why we score the end).
Reports held-out pairwise accuracy (r_c > r_r), mean chosen and rejected scores, and their gap.
"""

from __future__ import annotations

from pathlib import Path

import torch

from chatrlhf.config import RewardConfig
from chatrlhf.data import to_pair
from chatrlhf.data.collate import encode_all, encode_pair, pad, position_ids
from chatrlhf.engine import distributed as dist
from chatrlhf.engine.single import build_engine
from chatrlhf.models.load import (
    ValueModel,
    load_tokenizer,
    load_value_model,
    resolve_model,
)
from chatrlhf.rlhf import last_token_index, pairwise_loss
from chatrlhf.train.common import (
    Stopwatch,
    checkpoint_if_due,
    open_loop,
    planned_steps,
    prepare_for_training,
    run_stage,
    save_trained,
    stage_records,
    step_groups,
    write_json,
)


def end_scores(model: ValueModel, seqs: list[list[int]], pad_id: int, device) -> torch.Tensor:
    """(N,) score of each right-padded sequence at its last real token."""
    ids, attn = (x.to(device) for x in pad(seqs, pad_id))
    # through `model` itself (not `scores_at`): under DeepSpeed the engine's forward must see every training pass
    values = model(ids, attn, position_ids(attn))
    return values.gather(1, last_token_index(attn).unsqueeze(1)).squeeze(1)


def pair_scores(model: ValueModel, batch, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected end scores of a batch of encoded pairs, in one forward."""
    seqs = [c for c, _ in batch] + [r for _, r in batch]
    scores = end_scores(model, seqs, pad_id, device)
    return scores[: len(batch)], scores[len(batch) :]


@torch.no_grad()
def evaluate_pairs(model: ValueModel, pairs, batch_size: int, pad_id: int, device) -> dict[str, float]:
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for i in range(0, len(pairs), batch_size):
        c, r = pair_scores(model, pairs[i : i + batch_size], pad_id, device)
        chosen.append(c)
        rejected.append(r)
    model.train(was_training)
    c, r = torch.cat(chosen), torch.cat(rejected)
    return {
        "eval/accuracy": float((c > r).float().mean()),
        "eval/chosen_score": float(c.mean()),
        "eval/rejected_score": float(r.mean()),
        "eval/score_gap": float((c - r).mean()),
        "eval/loss": float(pairwise_loss(c, r)),
    }


def run_reward(cfg: RewardConfig, raws=None, eval_raws=None) -> dict:
    """Train; write `output_dir/model` (1-label sequence-classification model), metrics, config, summary."""
    return run_stage(
        cfg, cfg.output_dir, raws is None, lambda out, device: _run_reward(cfg, out, device, raws, eval_raws)
    )


def _run_reward(cfg, out: Path, device: torch.device, raws, eval_raws) -> dict:
    clock = Stopwatch()
    t = cfg.train

    # 1. data
    train_recs, eval_recs = stage_records(cfg.data, to_pair, cfg.run.seed, out, "preference-pair", raws, eval_raws)
    path = resolve_model(cfg.model, out)
    tok = load_tokenizer(path)
    train_pairs = encode_all(train_recs, lambda r: encode_pair(tok, r, t.max_seq_len))
    eval_pairs = encode_all(eval_recs, lambda r: encode_pair(tok, r, t.max_seq_len))

    # 2. model and engine
    model = prepare_for_training(load_value_model(path, tok, cfg.run.dtype, device).train(), cfg)
    world = dist.world_size()
    total = planned_steps(len(train_pairs), t.batch_size * world, t.grad_accum, t.epochs, t.max_steps)
    engine = build_engine(model, t.optim, total, "reward", cfg)
    model = engine.model
    resumed, start, log = open_loop(cfg, out, "reward", [engine], total, ("loss/train", "train/accuracy"))
    print(f"reward: {len(train_pairs)} train / {len(eval_pairs)} eval pairs, {total} steps → {out / 'model'}")

    # 3. train: each micro-batch's mean loss is weighted by its share of the step's pairs (global micro-batch =
    # batch_size × ranks, each rank scoring its share)
    step, metrics = start, resumed["metrics"] if resumed else {}
    for step, group in step_groups(train_pairs, t.batch_size * world, t.grad_accum, t.epochs, total, cfg.run.seed):
        if step <= start:
            continue
        n_pairs = sum(len(b) for b in group)
        loss_sum, correct = 0.0, 0.0
        for b in group:
            mine, weight = dist.shard(b)
            c, r = pair_scores(model, mine, tok.pad_token_id, device)
            loss = pairwise_loss(c, r) * (len(mine) / n_pairs * weight)
            engine.backward(loss)
            loss_sum += loss.item()
            correct += float((c > r).sum()) * weight
        stats = engine.step()
        sums = dist.sum_dict_across({"loss": loss_sum, "correct": correct})
        metrics = {
            "loss/train": sums["loss"],
            "train/accuracy": sums["correct"] / n_pairs,
            "optim/grad_norm": stats.grad_norm,
            "optim/lr": stats.lr,
            "faults/skipped_steps": float(engine.bad_steps),
        }
        if eval_pairs and t.eval_every and step % t.eval_every == 0:
            metrics.update(evaluate_pairs(model, eval_pairs, t.batch_size, tok.pad_token_id, device))
        log.log(step, metrics, write=step % cfg.run.log_every == 0 or step == total or "eval/accuracy" in metrics)
        log.advance()
        checkpoint_if_due(cfg, out, step, total, [engine], {"metrics": metrics})

    # 4. evaluate, save, summarise
    summary = {"stage": "reward", "steps": step, "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs)}
    summary["loss/train"] = metrics.get("loss/train")
    if eval_pairs:
        final = evaluate_pairs(model, eval_pairs, t.batch_size, tok.pad_token_id, device)
        summary.update(final)
        log.log(step, final)
    log.close()
    save_trained(engine, tok, out)
    summary["time/total_s"] = clock.elapsed()
    if dist.is_main():
        write_json(out / "summary.json", summary)
    print(
        f"reward: done in {summary['time/total_s']:.1f}s; held-out accuracy {summary.get('eval/accuracy')}, "
        f"gap {summary.get('eval/score_gap')}"
    )
    return summary
