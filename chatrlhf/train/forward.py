"""Model forwards every driver shares: token log-probs of responses, sequence log-probs, the shifted LM loss,
per-token values and end scores. Each takes a model and tensors and returns tensors; the math itself is in
chatrlhf/rlhf/."""

from __future__ import annotations

import torch

from chatrlhf.data.collate import position_ids
from chatrlhf.models.load import ValueModel
from chatrlhf.rlhf import entropy_from_logits, last_token_index, lm_loss, masked_sum, token_logprobs


def shifted_lm_loss(model, ids, attn, loss_mask, total_tokens: float | None = None) -> torch.Tensor:
    """NLL of tokens 1..T given their prefixes, over `loss_mask` (token mean over `total_tokens`).

    ids, attn, loss_mask: (N, T) — right-padded sequences, their attention mask, 1 on the tokens to learn."""
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn), use_cache=False).logits
    return lm_loss(logits[:, :-1], ids[:, 1:], loss_mask[:, 1:].float(), total_tokens=total_tokens)


def response_logprobs(model, sequences: torch.Tensor, attention_mask: torch.Tensor, width: int) -> torch.Tensor:
    """(B, R) log π(a_t | s_t) of the last `width` tokens of each sequence (a left-padded prompt followed by an
    R = `width`-token response); logits are computed for the response positions only."""
    return token_logprobs(_response_logits(model, sequences, attention_mask, width), sequences[:, -width:])


def sequence_token_logprobs(model, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """(N, T) log π(ids_t | ids_<t) at every position t ≥ 1 of right-padded sequences (0 at t = 0, which nothing
    predicts): the log-probs of a multi-turn episode, whose policy tokens are spread over the whole sequence
    (envs/runner.py); multiply by its policy mask to keep only those."""
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn), use_cache=False).logits
    logp = token_logprobs(logits[:, :-1], ids[:, 1:])
    return torch.cat([torch.zeros_like(logp[:, :1]), logp], dim=1)


def response_logprobs_and_entropy(
    model, sequences: torch.Tensor, attention_mask: torch.Tensor, width: int, entropy_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """`response_logprobs` and, from the same forward, the entropy H_t (nats) of π(· | s_t) at each response
    position: (B, R) each. Without `entropy_grad` the entropy is a detached statistic (no (B, R, V) graph kept)."""
    logits = _response_logits(model, sequences, attention_mask, width)
    if entropy_grad:
        return token_logprobs(logits, sequences[:, -width:]), entropy_from_logits(logits)
    with torch.no_grad():
        entropy = entropy_from_logits(logits.detach())
    return token_logprobs(logits, sequences[:, -width:]), entropy


def _response_logits(model, sequences: torch.Tensor, attention_mask: torch.Tensor, width: int) -> torch.Tensor:
    """(B, R, V) the logits that predict the last `width` tokens."""
    return model(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
        logits_to_keep=width + 1,
    ).logits[:, :-1]


def sequence_logprobs(model, ids: torch.Tensor, attn: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """log π(y|x) = Σ_t log π(y_t | x, y_<t) over the response tokens of each right-padded sequence.

    Token t is scored by the logits at position t − 1. Only the positions from the batch's earliest response
    token on are projected to the vocabulary (`logits_to_keep`); the prompt before it needs no logits.

    Args:
        model: a causal LM.
        ids: (N, T) long — prompt + response, right-padded.
        attn: (N, T) long — attention mask.
        response_mask: (N, T) — 1 on the response tokens (EOS included), 0 on the prompt and the padding.

    Returns:
        (N,) float32 — the sequence log-probs.
    """
    first = int(response_mask.float().argmax(dim=1).min())  # the earliest response token of the batch
    if first == 0:
        raise ValueError("a response starts at position 0: no prompt token precedes it to predict it")
    logits = _response_logits(model, ids, attn, ids.shape[1] - first)
    # logits[:, j] sit at position first − 1 + j and predict token first + j
    logp = token_logprobs(logits, ids[:, first:])
    return masked_sum(logp, response_mask[:, first:].float(), dim=1)


def response_values(critic: ValueModel, sequences: torch.Tensor, attention_mask: torch.Tensor, width: int):
    """(B, R) V(s_t): the critic's value at the token before each of the last R = `width` tokens."""
    values = critic(sequences, attention_mask, position_ids(attention_mask))
    return values[:, -width - 1 : -1]


def end_scores(model: ValueModel, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """(N,) the value-head score of each right-padded sequence at its last real token (a reward model's r(x, y)).
    Runs through `model` itself: under DeepSpeed the engine's forward must see every training pass."""
    values = model(ids, attn, position_ids(attn))
    return values.gather(1, last_token_index(attn).unsqueeze(1)).squeeze(1)
