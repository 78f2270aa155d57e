"""Step 1: supervised fine-tuning of a causal LM on prompt/response records.

Loss: mean negative log-likelihood of the response tokens (plus the prompt's with `train.loss_on_prompt`),
averaged over all target tokens of the optimizer step (micro-batches × accumulation = one big batch).
Reports train loss and held-out perplexity exp(mean NLL).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from chatrlhf.config import SFTConfig
from chatrlhf.data import to_sft
from chatrlhf.data.collate import collate_sft, encode_all, encode_sft, position_ids
from chatrlhf.engine import distributed as dist
from chatrlhf.engine.single import build_engine
from chatrlhf.models.load import load_causal_lm, load_tokenizer, resolve_model
from chatrlhf.rlhf import lm_loss
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


def shifted_lm_loss(model, ids, attn, loss_mask, total_tokens: float | None = None) -> torch.Tensor:
    """NLL of tokens 1..T given their prefixes, over `loss_mask` (token mean over `total_tokens`)."""
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn), use_cache=False).logits
    return lm_loss(logits[:, :-1], ids[:, 1:], loss_mask[:, 1:].float(), total_tokens=total_tokens)


@torch.no_grad()
def perplexity(model, encoded, batch_size: int, pad_id: int) -> float:
    """exp of the mean NLL per target token over `encoded`."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0.0
    for i in range(0, len(encoded), batch_size):
        ids, attn, mask = (t.to(model.device) for t in collate_sft(encoded[i : i + batch_size], pad_id))
        n = float(mask[:, 1:].sum())
        nll += float(shifted_lm_loss(model, ids, attn, mask)) * n
        count += n
    model.train(was_training)
    return math.exp(nll / count)


def run_sft(cfg: SFTConfig, raws=None, eval_raws=None) -> dict:
    """Train; write `output_dir/model` (HF causal LM), metrics.jsonl, config.yaml, summary.json."""
    return run_stage(cfg, cfg.output_dir, raws is None, lambda out, device: _run_sft(cfg, out, device, raws, eval_raws))


def _run_sft(cfg, out: Path, device: torch.device, raws, eval_raws) -> dict:
    clock = Stopwatch()
    t = cfg.train

    # 1. data: validate every record before anything trains
    train_recs, eval_recs = stage_records(cfg.data, to_sft, cfg.run.seed, out, "SFT", raws, eval_raws)
    path = resolve_model(cfg.model, out)
    tok = load_tokenizer(path)
    train_enc = encode_all(train_recs, lambda r: encode_sft(tok, r, t.max_seq_len, t.loss_on_prompt))
    eval_enc = encode_all(eval_recs, lambda r: encode_sft(tok, r, t.max_seq_len, t.loss_on_prompt))

    # 2. model and engine (the global micro-batch is batch_size × ranks; each rank trains on its share)
    model = prepare_for_training(load_causal_lm(path, tok, cfg.run.dtype, device).train(), cfg)
    world = dist.world_size()
    total = planned_steps(len(train_enc), t.batch_size * world, t.grad_accum, t.epochs, t.max_steps)
    engine = build_engine(model, t.optim, total, "sft", cfg)
    resumed, start, log = open_loop(cfg, out, "sft", [engine], total, ("loss/train", "eval/perplexity"))
    print(f"sft: {len(train_enc)} train / {len(eval_enc)} eval records, {total} steps on {world} rank(s) → {out}/model")

    # 3. train: grad_accum micro-batches per step, each loss scaled by the step's total target tokens
    metrics: dict[str, float] = resumed["metrics"] if resumed else {}
    step = start
    groups = step_groups(train_enc, t.batch_size * world, t.grad_accum, t.epochs, total, cfg.run.seed)
    for step, group in groups:
        if step <= start:
            continue
        step_tokens = sum(float(sum(e.loss_mask[1:])) for b in group for e in b)
        loss_sum = 0.0
        for b in group:
            mine, weight = dist.shard(b)
            ids, attn, mask = (x.to(device) for x in collate_sft(mine, tok.pad_token_id))
            loss = shifted_lm_loss(engine.model, ids, attn, mask, total_tokens=step_tokens) * weight
            engine.backward(loss)
            loss_sum += loss.item()
        stats = engine.step()
        metrics = {"loss/train": dist.sum_across(loss_sum), "optim/grad_norm": stats.grad_norm, "optim/lr": stats.lr}
        metrics["faults/skipped_steps"] = float(engine.bad_steps)
        if eval_enc and t.eval_every and step % t.eval_every == 0:
            metrics["eval/perplexity"] = perplexity(engine.model, eval_enc, t.batch_size, tok.pad_token_id)
        log.log(step, metrics, write=step % cfg.run.log_every == 0 or step == total or "eval/perplexity" in metrics)
        log.advance()
        checkpoint_if_due(cfg, out, step, total, [engine], {"metrics": metrics})

    # 4. evaluate, save, summarise
    summary = {"stage": "sft", "steps": step, "train_records": len(train_enc), "eval_records": len(eval_enc)}
    summary["loss/train"] = metrics.get("loss/train")
    if eval_enc:
        summary["eval/perplexity"] = perplexity(engine.model, eval_enc, t.batch_size, tok.pad_token_id)
        log.log(step, {"eval/perplexity": summary["eval/perplexity"]})
    log.close()
    save_trained(engine, tok, out)
    summary["time/total_s"] = clock.elapsed()
    if dist.is_main():
        write_json(out / "summary.json", summary)
    print(f"sft: done in {summary['time/total_s']:.1f}s; held-out perplexity {summary.get('eval/perplexity')}")
    return summary
