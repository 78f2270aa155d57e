"""DPO: direct preference optimisation of a causal LM on prompt/chosen/rejected pairs, an offline alternative to
steps 2+3 (no reward model, no sampling).

Loss (Rafailov et al. 2023, eq. 7; `rlhf/losses.py:dpo_loss`). With sequence log-probs log π(y|x) summed over
the response tokens (EOS included) and a frozen reference π_ref (the model's starting weights unless `reference`
is set):

    h = (log π_θ(y_c|x) − log π_ref(y_c|x)) − (log π_θ(y_r|x) − log π_ref(y_r|x))
    L = mean −log σ(β·h)            (or IPO's (h − 1/(2β))², or conservative DPO with label smoothing)

One optimizer step:
  1. take `grad_accum` micro-batches of pairs; each is chosen + rejected sequences, right-padded together;
  2. the reference's sequence log-probs, no grad;
  3. the policy's sequence log-probs, one forward over chosen + rejected;
  4. `dpo_loss`, weighted by the micro-batch's share of the step's pairs, backward; then the optimizer step;
  5. log the implicit rewards β·(log π_θ − log π_ref) of chosen and rejected, their margin and accuracy.

Dropout is off in the policy throughout (eval mode; gradients still flow), as in the RL stage. DPO's implicit
reward compares the policy's log-probs with the reference's, which are computed without dropout; a policy forward
with dropout would compare a perturbed model with an unperturbed one, so h would not even be 0 at the first step,
where π_θ = π_ref. TRL's DPO trainer also turns dropout off by default.

The loop is the supervised stages' shared one (train/supervised.py).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import torch

from chatrlhf.config import DPOConfig
from chatrlhf.data import to_pair
from chatrlhf.data.collate import Encoded, collate_sft, encode_all, encode_pair_responses
from chatrlhf.engine.factory import frozen_loading, frozen_model, trained_loading
from chatrlhf.errors import UserError
from chatrlhf.models.load import load_causal_lm, load_tokenizer, resolve_model, same_vocabulary
from chatrlhf.models.lora import AdapterFree
from chatrlhf.models.training import prepare_for_training
from chatrlhf.rlhf import dpo_loss
from chatrlhf.train.data import stage_records
from chatrlhf.train.forward import sequence_logprobs
from chatrlhf.train.outputs import Stopwatch
from chatrlhf.train.stage import run_stage
from chatrlhf.train.supervised import SupervisedTask, train_supervised

Pair = tuple[Encoded, Encoded]
"""(chosen, rejected): prompt + response token ids, with loss_mask 1 on the response tokens."""

LossFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""`dpo_loss` with β, the loss type and the label smoothing bound once."""


def pair_logprobs(model, batch: list[Pair], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) chosen and (B,) rejected sequence log-probs of a batch of pairs, in one forward."""
    ids, attn, mask = (x.to(device) for x in collate_sft([c for c, _ in batch] + [r for _, r in batch], pad_id))
    logps = sequence_logprobs(model, ids, attn, mask)
    return logps[: len(batch)], logps[len(batch) :]


def pair_loss(
    policy, reference, batch: list[Pair], loss_fn: LossFn, pad_id: int, device
) -> tuple[torch.Tensor, dict[str, float]]:
    """2–4. The DPO loss of a micro-batch and the sums over its pairs of every logged quantity."""
    with torch.no_grad():
        ref_chosen, ref_rejected = pair_logprobs(reference, batch, pad_id, device)
    chosen, rejected = pair_logprobs(policy, batch, pad_id, device)
    loss, chosen_rewards, rejected_rewards = loss_fn(chosen, rejected, ref_chosen, ref_rejected)
    sums = {
        "rewards/chosen": float(chosen_rewards.sum()),
        "rewards/rejected": float(rejected_rewards.sum()),
        "rewards/margin": float((chosen_rewards - rejected_rewards).sum()),
        "rewards/accuracy": float((chosen_rewards > rejected_rewards).sum()),  # ties count as wrong
        "logps/chosen": float(chosen.detach().sum()),
        "logps/rejected": float(rejected.detach().sum()),
    }
    return loss, sums


def _add(total: dict[str, float], part: dict[str, float]) -> None:
    for k, v in part.items():
        total[k] = total.get(k, 0.0) + v


@torch.no_grad()
def evaluate_pairs(
    policy, reference, pairs: list[Pair], batch_size: int, loss_fn: LossFn, pad_id: int, device
) -> dict[str, float]:
    """Held-out `eval/loss` and `eval/<metric>` for every logged pair metric, averaged over the pairs."""
    sums: dict[str, float] = {}
    loss_sum = 0.0
    for i in range(0, len(pairs), batch_size):
        batch = pairs[i : i + batch_size]
        loss, part = pair_loss(policy, reference, batch, loss_fn, pad_id, device)
        loss_sum += float(loss) * len(batch)
        _add(sums, part)
    return {"eval/loss": loss_sum / len(pairs), **{f"eval/{k}": v / len(pairs) for k, v in sums.items()}}


def load_models(cfg: DPOConfig, path: str, tok, out: Path, device):
    """The policy, ready for training (gradient checkpointing and LoRA as configured), and its frozen reference (the
    policy's starting weights unless `reference` is set), in eval mode. With LoRA and no `reference`, the reference
    is the policy without its adapters (`lora.AdapterFree`: its starting weights, no second copy); under ZeRO-3
    both are loaded partitioned and the reference is scored by its own inference engine (`factory.frozen_model`).
    Every rank calls it for every batch: a rank without a record of an epoch's last batch scores a weight-0
    stand-in, and every rank evaluates every held-out pair."""
    with trained_loading(cfg.engine, cfg.run):  # under ZeRO-3 both load partitioned: never whole on a rank
        policy = load_causal_lm(path, tok, cfg.run.dtype, device).eval()
    policy = prepare_for_training(policy, cfg.engine, cfg.lora)
    if cfg.lora.rank > 0 and not cfg.reference:
        print("dpo: reference = the policy without its LoRA adapters (its starting weights; no second copy)")
        return policy, AdapterFree(policy)
    ref_path = resolve_model(cfg.reference, out) if cfg.reference else path
    if cfg.reference and not same_vocabulary(tok, load_tokenizer(ref_path)):
        raise UserError(
            f"reference '{cfg.reference}' has another vocabulary than model '{cfg.model}': DPO compares the two "
            "models' log-probs of the same token ids, so they must share a tokenizer"
        )
    with frozen_loading(cfg.engine, cfg.run):
        reference = load_causal_lm(ref_path, tok, cfg.run.dtype, device).eval().requires_grad_(False)
        return policy, frozen_model(reference, cfg.engine, cfg.run)


def run_dpo(cfg: DPOConfig, raws=None, eval_raws=None) -> dict:
    """Train; write `output_dir/model` (HF causal LM), metrics.jsonl, config.yaml, summary.json."""
    return run_stage(cfg, cfg.output_dir, raws is None, lambda out, device: _run_dpo(cfg, out, device, raws, eval_raws))


def _run_dpo(cfg: DPOConfig, out: Path, device: torch.device, raws, eval_raws) -> dict:
    clock = Stopwatch()
    train = cfg.train

    # data: validate and encode every pair before anything trains
    train_recs, eval_recs = stage_records(cfg.data, to_pair, cfg.run.seed, out, "preference-pair", raws, eval_raws)
    path = resolve_model(cfg.model, out)
    tok = load_tokenizer(path)
    train_pairs = encode_all(train_recs, encode_pair_responses, tok, max_len=train.max_seq_len)
    eval_pairs = encode_all(eval_recs, encode_pair_responses, tok, max_len=train.max_seq_len)

    # models, and the loss variant, chosen once
    policy, reference = load_models(cfg, path, tok, out, device)
    loss_fn = functools.partial(
        dpo_loss, beta=train.beta, loss_type=train.loss_type, label_smoothing=train.label_smoothing
    )

    def loss(model, batch: list[Pair], step_pairs: float):
        value, sums = pair_loss(model, reference, batch, loss_fn, tok.pad_token_id, device)
        # the batch's mean loss, weighted by its share of the step's pairs
        return value * (len(batch) / step_pairs), sums

    def evaluate(model) -> dict[str, float]:
        return evaluate_pairs(model, reference, eval_pairs, train.batch_size, loss_fn, tok.pad_token_id, device)

    task = SupervisedTask(
        name="dpo",
        items=train_pairs,
        eval_items=eval_pairs,
        unit="pairs",
        size=lambda pair: 1.0,
        loss=loss,
        evaluate=evaluate,
        progress_keys=("loss/train", "rewards/margin"),
        done=lambda s: (
            f"held-out implicit-reward accuracy {s.get('eval/rewards/accuracy')}, margin {s.get('eval/rewards/margin')}"
        ),
    )
    return train_supervised(cfg, out, task, policy, tok, clock)
