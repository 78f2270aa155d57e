"""Critic-free advantages and the adaptive KL controller, against values computed by hand."""

from __future__ import annotations

import statistics

import pytest
import torch

from chatrlhf.rlhf import (
    adaptive_kl_coef,
    discounted_returns,
    grpo_advantages,
    remax_advantages,
    rloo_advantages,
    sequence_to_tokens,
)

SCORES = [1.0, 2.0, 4.0, 0.0, -1.0, 3.0]  # two prompts × three samples


def test_grpo_by_hand():
    out = grpo_advantages(torch.tensor(SCORES), group_size=3, eps=0.0).tolist()
    expected = []
    for g in (SCORES[:3], SCORES[3:]):
        mean, std = statistics.fmean(g), statistics.stdev(g)
        expected += [(x - mean) / std for x in g]
    assert out == pytest.approx(expected, abs=1e-6)


def test_dr_grpo_only_centres():
    out = grpo_advantages(torch.tensor(SCORES), group_size=3, scale_by_std=False).tolist()
    assert out == pytest.approx([1 - 7 / 3, 2 - 7 / 3, 4 - 7 / 3, 0 - 2 / 3, -1 - 2 / 3, 3 - 2 / 3], abs=1e-6)


def test_grpo_identical_rewards_give_zero_advantage():
    out = grpo_advantages(torch.tensor([0.7] * 4 + [2.0, 3.0, 2.0, 3.0]), group_size=4)
    assert out[:4].tolist() == [0.0] * 4
    assert out[4:].abs().min() > 0.5


def test_rloo_baseline_excludes_the_sample():
    out = rloo_advantages(torch.tensor(SCORES), group_size=3).tolist()
    expected = []
    for g in (SCORES[:3], SCORES[3:]):
        for i, x in enumerate(g):
            others = [y for j, y in enumerate(g) if j != i]
            expected.append(x - sum(others) / len(others))
    assert out == pytest.approx(expected, abs=1e-6)
    # the baseline of sample 0 does not move when sample 0's own reward changes
    bumped = rloo_advantages(torch.tensor([11.0] + SCORES[1:]), group_size=3)
    assert float(bumped[0]) - out[0] == pytest.approx(10.0, abs=1e-5)


def test_group_size_errors():
    with pytest.raises(ValueError, match="groups of 4"):
        grpo_advantages(torch.tensor(SCORES), group_size=4)
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(torch.tensor(SCORES), group_size=1)


def test_remax():
    assert remax_advantages(torch.tensor([1.0, 0.5]), torch.tensor([0.25, 0.5])).tolist() == [0.75, 0.0]


def test_discounted_returns_by_hand():
    rewards = torch.tensor([[0.1, -0.2, 0.3, 9.0], [1.0, 2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    gamma = 0.9
    out = discounted_returns(rewards, mask, gamma)
    for b in range(2):
        n = int(mask[b].sum())
        r = rewards[b, :n].tolist()
        for t in range(4):
            expected = sum(gamma ** (k - t) * r[k] for k in range(t, n)) if t < n else 0.0
            assert float(out[b, t]) == pytest.approx(expected, abs=1e-6)


def test_discounted_returns_skip_the_gaps_of_the_mask():
    """An episode's environment tokens (mask 0 between the policy's turns) are not discount steps: the returns are
    those of the masked tokens alone, by the explicit sum over the compressed row."""
    rewards = torch.tensor([[0.1, 5.0, 5.0, -0.2, 0.3, 9.0]])
    mask = torch.tensor([[1.0, 0, 0, 1, 1, 0]])
    gamma = 0.9
    out = discounted_returns(rewards, mask, gamma)
    r = [0.1, -0.2, 0.3]  # the masked tokens' rewards, in order
    expected = [sum(gamma ** (k - t) * r[k] for k in range(t, 3)) for t in range(3)]
    assert out[0].tolist() == pytest.approx([expected[0], 0.0, 0.0, expected[1], expected[2], 0.0], abs=1e-6)


def test_sequence_to_tokens():
    out = sequence_to_tokens(torch.tensor([2.0, -1.0]), torch.tensor([[1.0, 1, 0], [1, 0, 0]]))
    assert out.tolist() == [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]


@pytest.mark.parametrize(
    "kl, expected",
    [(6.0, 0.1 * (1 + 0.2 * 64 / 1000)), (3.3, 0.1 * (1 + 0.1 * 64 / 1000)), (0.0, 0.1 * (1 - 0.2 * 64 / 1000))],
)
def test_adaptive_kl_controller(kl, expected):
    # target 3: a KL of 6 is clipped to +20%, 3.3 is +10%, 0 is clipped to −20%; scaled by n / horizon
    assert adaptive_kl_coef(0.1, kl, target_kl=3.0, horizon=1000, n_steps=64) == pytest.approx(expected, rel=1e-12)
