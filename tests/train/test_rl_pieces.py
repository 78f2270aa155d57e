"""RL step functions on a real tiny model: left padding must not change log-probs, values or scores."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatrlhf.models.load import load_value_model
from chatrlhf.models.tiny import TINY_ARCHS
from chatrlhf.train.rollout import Rollout, rollout_logprobs, rollout_values, truncated


def manual_logprobs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log π of each response token, from one unpadded sequence, by a plain loop over positions."""
    seq = torch.tensor([prompt + response])
    logits = model(input_ids=seq).logits[0].double()
    out = []
    for i, tok in enumerate(response):
        row = logits[len(prompt) + i - 1]
        out.append(float(row[tok] - torch.logsumexp(row, 0)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_padded_batch_matches_single_sequences(arch, tiny_dirs):
    path = tiny_dirs[arch]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    critic = load_value_model(str(path), tok, "float32", torch.device("cpu"), require_head=False).eval()
    pad, eos = tok.pad_token_id, tok.eos_token_id
    prompts = [[72, 101, 108, 108, 111], [65, 66]]
    responses = [[120, 121, eos], [122, 123, 124, 125]]
    # left-padded prompts, right-padded responses, as a rollout has them
    prompt_ids = torch.tensor([prompts[0], [pad, pad, pad] + prompts[1]])
    prompt_mask = torch.tensor([[1] * 5, [0, 0, 0, 1, 1]])
    response = torch.tensor([responses[0] + [pad], responses[1]])
    response_mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1]])
    rollout = Rollout([], prompt_ids, prompt_mask, response, response_mask)
    with torch.no_grad():
        logp = rollout_logprobs(model, rollout)
        values = rollout_values(critic, rollout)
        scores = critic.scores_at(rollout.sequences, rollout.attention_mask, rollout.last_index)
        for b in range(2):
            n = len(responses[b])
            assert torch.allclose(logp[b, :n].double(), manual_logprobs(model, prompts[b], responses[b]), atol=1e-4)
            seq = torch.tensor([prompts[b] + responses[b]])
            alone = critic(seq, torch.ones_like(seq), torch.arange(seq.shape[1]).unsqueeze(0))[0]
            # V(s_t) is the value at the token before response token t; the score is at the last real token
            assert torch.allclose(values[b, :n], alone[len(prompts[b]) - 1 : -1], atol=1e-4)
            assert torch.allclose(scores[b], alone[-1], atol=1e-4)
    assert truncated(rollout, eos).tolist() == [False, True]


def test_reward_shares_by_hand():
    from chatrlhf.train.rl import reward_shares

    rm = torch.tensor([0.0, 2.0, 4.0])  # sample std 2
    judge = torch.tensor([1.0, 1.0, 4.0])  # sample std √3
    shares = reward_shares({"rm": rm, "judge": judge}, {"rm": 0.5, "judge": -2.0})
    spread_rm, spread_judge = 0.5 * 2.0, 2.0 * 3**0.5  # |w|·std
    total = spread_rm + spread_judge
    assert shares == pytest.approx({"reward/rm_share": spread_rm / total, "reward/judge_share": spread_judge / total})
    assert reward_shares({"rm": rm}, {"rm": 1.0}) == {}  # one source: nothing to compare
    assert reward_shares({"a": torch.ones(3), "b": torch.ones(3)}, {"a": 1.0, "b": 1.0}) == {}  # no spread
