"""Step 2: a reward model — causal-LM backbone + scalar head — trained on prompt/chosen/rejected pairs.

Loss (InstructGPT eq. 1): L = mean_i −log σ(r(x_i, y_c) − r(x_i, y_r)), where r is the END score: the head's
value at the last real token of the response (its EOS). DeepSpeed-Chat instead averages a per-token loss over
the positions after the first differing token (docs/algorithms.md says why we score the end).
Reports held-out pairwise accuracy (r_c > r_r), mean chosen and rejected scores, and their gap. The loop is the
supervised stages' shared one (train/supervised.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from chatrlhf import distributed as dist
from chatrlhf.config import RewardConfig
from chatrlhf.data import to_pair
from chatrlhf.data.collate import encode_all, encode_pair, pad
from chatrlhf.engine.factory import trained_loading
from chatrlhf.eval.report import EVAL_SCORES
from chatrlhf.models.load import ValueModel, load_tokenizer, load_value_model, resolve_model
from chatrlhf.models.training import prepare_for_training
from chatrlhf.rlhf import pairwise_loss
from chatrlhf.train.data import stage_records
from chatrlhf.train.forward import end_scores
from chatrlhf.train.outputs import Stopwatch
from chatrlhf.train.stage import run_stage
from chatrlhf.train.supervised import SupervisedTask, train_supervised

EncodedPair = tuple[list[int], list[int]]
"""(prompt + chosen, prompt + rejected) token ids."""


def pair_scores(model: ValueModel, batch: list[EncodedPair], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected end scores of a batch of encoded pairs, in one forward."""
    ids, attn = (x.to(device) for x in pad([c for c, _ in batch] + [r for _, r in batch], pad_id))
    scores = end_scores(model, ids, attn)
    return scores[: len(batch)], scores[len(batch) :]


@torch.no_grad()
def all_pair_scores(model: ValueModel, pairs: list[EncodedPair], batch_size: int, pad_id: int, device):
    """(N,) chosen and (N,) rejected end scores of every pair, in eval mode."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for i in range(0, len(pairs), batch_size):
        c, r = pair_scores(model, pairs[i : i + batch_size], pad_id, device)
        chosen.append(c)
        rejected.append(r)
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def evaluate_pairs(model: ValueModel, pairs: list[EncodedPair], batch_size: int, pad_id: int, device) -> dict:
    c, r = all_pair_scores(model, pairs, batch_size, pad_id, device)
    return {
        "eval/accuracy": float((c > r).float().mean()),
        "eval/chosen_score": float(c.mean()),
        "eval/rejected_score": float(r.mean()),
        "eval/score_gap": float((c - r).mean()),
        "eval/loss": float(pairwise_loss(c, r)),
    }


def load_model(cfg: RewardConfig, path: str, tok, device: torch.device) -> ValueModel:
    """The reward model this stage trains, in train mode, with gradient checkpointing and LoRA as configured; it may
    start from a causal LM, whose scalar head is then new (announced). Under ZeRO-3 it is loaded partitioned, never
    whole on a rank."""
    with trained_loading(cfg.engine, cfg.run):
        model = load_value_model(path, tok, cfg.run.dtype, device, require_head=False, role="reward model").train()
    return prepare_for_training(model, cfg.engine, cfg.lora)


def run_reward(cfg: RewardConfig, raws=None, eval_raws=None) -> dict:
    """Train; write `output_dir/model` (1-label sequence-classification model), metrics, config, summary."""
    return run_stage(
        cfg, cfg.output_dir, raws is None, lambda out, device: _run_reward(cfg, out, device, raws, eval_raws)
    )


def _run_reward(cfg: RewardConfig, out: Path, device: torch.device, raws, eval_raws) -> dict:
    clock = Stopwatch()
    train = cfg.train

    # data: validate every pair before anything trains
    train_recs, eval_recs = stage_records(cfg.data, to_pair, cfg.run.seed, out, "preference-pair", raws, eval_raws)
    path = resolve_model(cfg.model, out)
    tok = load_tokenizer(path)
    train_pairs = encode_all(train_recs, encode_pair, tok, max_len=train.max_seq_len)
    eval_pairs = encode_all(eval_recs, encode_pair, tok, max_len=train.max_seq_len)
    model = load_model(cfg, path, tok, device)

    def loss(model, batch: list[EncodedPair], step_pairs: float):
        c, r = pair_scores(model, batch, tok.pad_token_id, device)
        # the batch's mean loss, weighted by its share of the step's pairs
        return pairwise_loss(c, r) * (len(batch) / step_pairs), {"train/accuracy": float((c > r).sum())}

    def write_scores(model, out: Path) -> None:
        """`eval_scores.jsonl`: each held-out pair's chosen and rejected score (the report's histograms)."""
        c, r = all_pair_scores(model, eval_pairs, train.batch_size, tok.pad_token_id, device)
        if dist.is_main():
            lines = (json.dumps({"chosen": float(a), "rejected": float(b)}) for a, b in zip(c, r))
            (out / EVAL_SCORES).write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    task = SupervisedTask(
        name="reward",
        items=train_pairs,
        eval_items=eval_pairs,
        unit="pairs",
        size=lambda pair: 1.0,
        loss=loss,
        evaluate=lambda model: evaluate_pairs(model, eval_pairs, train.batch_size, tok.pad_token_id, device),
        progress_keys=("loss/train", "train/accuracy"),
        done=lambda s: f"held-out accuracy {s.get('eval/accuracy')}, gap {s.get('eval/score_gap')}",
        finish=write_scores,
    )
    return train_supervised(cfg, out, task, model, tok, clock)
