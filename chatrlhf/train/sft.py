"""Step 1: supervised fine-tuning of a causal LM on prompt/response records.

Loss: mean negative log-likelihood of the response tokens (plus the prompt's with `train.loss_on_prompt`),
averaged over all target tokens of the optimizer step (micro-batches × accumulation = one big batch).
Reports train loss and held-out perplexity exp(mean NLL). The loop is the supervised stages' shared one
(train/supervised.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from chatrlhf.config import SFTConfig
from chatrlhf.data import to_sft
from chatrlhf.data.collate import Encoded, collate_sft, encode_all, encode_sft
from chatrlhf.engine.factory import trained_loading
from chatrlhf.models.load import load_causal_lm, load_tokenizer, resolve_model
from chatrlhf.models.training import prepare_for_training
from chatrlhf.train.data import stage_records
from chatrlhf.train.forward import shifted_lm_loss
from chatrlhf.train.outputs import Stopwatch
from chatrlhf.train.stage import run_stage
from chatrlhf.train.supervised import SupervisedTask, train_supervised


@torch.no_grad()
def perplexity(model, encoded: Sequence[Encoded], batch_size: int, pad_id: int) -> float:
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


def target_tokens(item: Encoded) -> float:
    """The tokens an item's loss is over (its first token has no prefix to predict it from)."""
    return float(sum(item.loss_mask[1:]))


def load_model(cfg: SFTConfig, path: str, tok, device: torch.device) -> torch.nn.Module:
    """The model SFT trains, in train mode, with gradient checkpointing and LoRA as configured; under ZeRO-3 it is
    loaded partitioned, never whole on a rank."""
    with trained_loading(cfg.engine, cfg.run):
        model = load_causal_lm(path, tok, cfg.run.dtype, device).train()
    return prepare_for_training(model, cfg.engine, cfg.lora)


def run_sft(cfg: SFTConfig, raws=None, eval_raws=None) -> dict:
    """Train; write `output_dir/model` (HF causal LM), metrics.jsonl, config.yaml, summary.json."""
    return run_stage(cfg, cfg.output_dir, raws is None, lambda out, device: _run_sft(cfg, out, device, raws, eval_raws))


def _run_sft(cfg: SFTConfig, out: Path, device: torch.device, raws, eval_raws) -> dict:
    clock = Stopwatch()
    train = cfg.train

    # data: validate every record before anything trains
    train_recs, eval_recs = stage_records(cfg.data, to_sft, cfg.run.seed, out, "SFT", raws, eval_raws)
    path = resolve_model(cfg.model, out)
    tok = load_tokenizer(path)
    lengths = {"max_len": train.max_seq_len, "loss_on_prompt": train.loss_on_prompt}
    train_enc = encode_all(train_recs, encode_sft, tok, **lengths)
    eval_enc = encode_all(eval_recs, encode_sft, tok, **lengths)
    model = load_model(cfg, path, tok, device)

    def loss(model, batch: list[Encoded], step_tokens: float):
        ids, attn, mask = (x.to(device) for x in collate_sft(batch, tok.pad_token_id))
        return shifted_lm_loss(model, ids, attn, mask, total_tokens=step_tokens), {}

    task = SupervisedTask(
        name="sft",
        items=train_enc,
        eval_items=eval_enc,
        unit="records",
        size=target_tokens,
        loss=loss,
        evaluate=lambda model: {"eval/perplexity": perplexity(model, eval_enc, train.batch_size, tok.pad_token_id)},
        progress_keys=("loss/train", "eval/perplexity"),
        done=lambda summary: f"held-out perplexity {summary.get('eval/perplexity')}",
    )
    return train_supervised(cfg, out, task, model, tok, clock)
