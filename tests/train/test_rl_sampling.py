"""The sampling policies on hand-built rounds: DAPO's dynamic sampling keeps exactly the groups whose rewards
differ, in order, re-padded into one batch; the prompt stream counts what it hands out."""

from __future__ import annotations

import pytest
import torch

from chatrlhf.errors import UserError
from chatrlhf.models.rewards import Scores
from chatrlhf.train.rollout import Evaluated, Prompt, PromptStream, Rollout, sample_dynamic, sample_once

PAD = 0


def make_round(tag: int, prompt_len: int, resp_len: int, rewards: list[float]):
    """A round of len(rewards) / 2 groups of 2; every tensor entry encodes (round, sequence, position)."""
    b = len(rewards)
    prompts = [Prompt(ids=[tag] * prompt_len, text=f"round {tag} group {i // 2}", extra={}) for i in range(b)]
    value = torch.arange(b * resp_len, dtype=torch.float64).view(b, resp_len) + 100 * tag
    rollout = Rollout(
        prompts=prompts,
        prompt_ids=torch.full((b, prompt_len), tag),
        prompt_mask=torch.ones(b, prompt_len, dtype=torch.long),
        response=torch.full((b, resp_len), tag) + torch.arange(b).unsqueeze(1),
        response_mask=torch.ones(b, resp_len, dtype=torch.float64),
    )
    scores = torch.tensor(rewards, dtype=torch.float64)
    ev = Evaluated(Scores(scores, {"fn": scores * 2}), value, -value, None, None, entropy=value + 0.5)
    return rollout, ev


def drawer(rounds):
    it = iter(rounds)
    return lambda: next(it)


def test_dynamic_sampling_keeps_the_varied_groups_of_several_rounds():
    rounds = [
        make_round(1, prompt_len=2, resp_len=3, rewards=[0.5, 0.5, 1.0, 0.0, 0.2, 0.2]),  # keeps group 1
        make_round(2, prompt_len=4, resp_len=2, rewards=[1.0, 1.0, 0.0, 0.0, 0.0, 0.0]),  # keeps none
        make_round(3, prompt_len=1, resp_len=5, rewards=[0.1, 0.9, 0.3, 0.4, 0.6, 0.6]),  # keeps groups 0 and 1
        make_round(4, prompt_len=1, resp_len=1, rewards=[0.0, 1.0, 0.0, 1.0, 0.0, 1.0]),  # never drawn
    ]
    sampled = sample_dynamic(drawer(rounds), group_size=2, max_rounds=5, pad_id=PAD)
    r, ev = sampled.rollout, sampled.evaluated
    # a batch holds as many groups as a round has prompts (3): the first 3 whose rewards differ
    assert [p.text for p in r.prompts] == [f"round {t} group {g}" for t, g in ((1, 1), (3, 0), (3, 1)) for _ in "ab"]
    assert ev.scores.total.tolist() == [1.0, 0.0, 0.1, 0.9, 0.3, 0.4]
    assert ev.scores.parts["fn"].tolist() == [2.0, 0.0, 0.2, 1.8, 0.6, 0.8]
    # prompts left-padded to the widest kept (2), responses right-padded to the widest (5)
    assert r.prompt_ids.tolist() == [[1, 1], [1, 1]] + [[PAD, 3]] * 4
    assert r.prompt_mask.tolist() == [[1, 1], [1, 1]] + [[0, 1]] * 4
    assert r.response.tolist() == [[3, 3, 3, PAD, PAD], [4, 4, 4, PAD, PAD], [3] * 5, [4] * 5, [5] * 5, [6] * 5]
    assert r.response_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]] + [[1] * 5] * 4
    first = [106.0, 107.0, 108.0, 0.0, 0.0]  # round 1, sequence 2, positions 0–2
    assert ev.old_logprobs[0].tolist() == first and ev.ref_logprobs[0].tolist() == [-x for x in first]
    assert ev.old_logprobs[2].tolist() == [300.0 + t for t in range(5)]
    assert ev.entropy[1].tolist() == [109.5, 110.5, 111.5, 0.0, 0.0]
    assert sampled.metrics == {"sampling/rounds": 3.0, "sampling/groups_drawn": 9.0, "sampling/equal_frac": 6 / 9}


def test_dynamic_sampling_of_one_full_round_is_that_round():
    rollout, ev = make_round(1, 2, 3, [0.0, 1.0, 2.0, 3.0])
    sampled = sample_dynamic(drawer([(rollout, ev)]), group_size=2, max_rounds=1, pad_id=PAD)
    assert torch.equal(sampled.rollout.response, rollout.response)
    assert sampled.metrics["sampling/equal_frac"] == 0.0
    assert sample_once(drawer([(rollout, ev)]), 2, 1, PAD).metrics == {}


def test_dynamic_sampling_stops_after_max_rounds():
    rounds = [make_round(i, 2, 2, [0.0, 0.0, 1.0, 1.0]) for i in range(3)]
    with pytest.raises(UserError, match=r"max_rounds=2 rounds only 0 of the 2 prompt groups .* \(4 drawn\)"):
        sample_dynamic(drawer(rounds), group_size=2, max_rounds=2, pad_id=PAD)


def test_prompt_stream_counts_and_skips():
    prompts = [Prompt(ids=[i], text=str(i), extra={}) for i in range(10)]
    a, b = PromptStream(prompts, 3, seed=1), PromptStream(prompts, 3, seed=1)
    seen = [next(a) for _ in range(5)]
    assert a.drawn == 5
    b.skip_to(3)
    assert b.drawn == 3 and next(b) == seen[3]
