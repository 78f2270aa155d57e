"""Losses and their aggregation against per-element Python math, plus the gradient-accumulation equivalence."""

from __future__ import annotations

import math

import pytest
import torch

from chatrlhf.rlhf import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    entropy_from_logits,
    lm_loss,
    pairwise_loss,
    ppo_policy_loss,
    token_logprobs,
    value_loss,
)

F64 = torch.float64


def policy_loss(logp, old_logp, advantages, mask, clip_eps, mode="token_mean", total_tokens=None, total_seqs=None):
    """PPO's symmetric clipped surrogate, aggregated as the update does."""
    per_token, stats = ppo_policy_loss(logp, old_logp, advantages, mask, clip_eps, clip_eps)
    return aggregate_loss(per_token, mask, mode, total_tokens, total_seqs), stats


def _mask(lengths, num_steps):
    return torch.tensor([[1.0 if t < n else 0.0 for t in range(num_steps)] for n in lengths], dtype=F64)


# ---------------------------------------------------------------- token log-probs and entropy


def _log_softmax_at(row, index):
    return row[index] - math.log(sum(math.exp(z) for z in row))


def test_token_logprobs_matches_manual_loop():
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(2, 3, 5, generator=gen)
    labels = torch.randint(0, 5, (2, 3), generator=gen)
    result = token_logprobs(logits, labels)
    assert result.dtype == torch.float32 and result.shape == (2, 3)
    expected = [[_log_softmax_at(logits[b, t].tolist(), labels[b, t].item()) for t in range(3)] for b in range(2)]
    torch.testing.assert_close(result, torch.tensor(expected), atol=1e-6, rtol=0)


def test_token_logprobs_of_half_precision_is_float32():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 11, generator=gen).to(torch.bfloat16)
    labels = torch.randint(0, 11, (2, 3), generator=gen)
    result = token_logprobs(logits, labels)
    assert result.dtype == torch.float32
    expected = [
        [_log_softmax_at(logits[b, t].float().tolist(), labels[b, t].item()) for t in range(3)] for b in range(2)
    ]
    torch.testing.assert_close(result, torch.tensor(expected), atol=1e-6, rtol=0)


def test_token_logprobs_gradient_is_onehot_minus_softmax():
    logits = torch.randn(1, 1, 4, dtype=F64, requires_grad=True)
    token_logprobs(logits, torch.tensor([[2]])).sum().backward()
    probs = [math.exp(z) / sum(math.exp(w) for w in logits[0, 0].tolist()) for z in logits[0, 0].tolist()]
    expected = [(1.0 if v == 2 else 0.0) - probs[v] for v in range(4)]
    torch.testing.assert_close(logits.grad[0, 0], torch.tensor(expected, dtype=F64), atol=1e-12, rtol=0)


def test_entropy_from_logits():
    gen = torch.Generator().manual_seed(2)
    logits = 2 * torch.randn(2, 3, 6, generator=gen)
    expected = []
    for b in range(2):
        row = []
        for t in range(3):
            z = logits[b, t].tolist()
            total = sum(math.exp(v) for v in z)
            row.append(-sum(math.exp(v) / total * math.log(math.exp(v) / total) for v in z))
        expected.append(row)
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor(expected), atol=1e-6, rtol=0)
    uniform = torch.zeros(1, 2, 8)
    torch.testing.assert_close(entropy_from_logits(uniform), torch.full((1, 2), math.log(8)), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- aggregation

PER_TOKEN = [[1.0, 2.0, 3.0, 50.0], [4.0, 50.0, 50.0, 50.0], [-1.0, 0.5, 2.0, 6.0]]
LENGTHS = [3, 1, 4]


def test_aggregate_loss_modes_by_hand():
    per_token, mask = torch.tensor(PER_TOKEN, dtype=F64), _mask(LENGTHS, 4)
    row_sums = [sum(PER_TOKEN[b][:n]) for b, n in enumerate(LENGTHS)]
    expected = {
        "token_mean": sum(row_sums) / sum(LENGTHS),
        "seq_mean_token_mean": sum(s / n for s, n in zip(row_sums, LENGTHS)) / len(LENGTHS),
        "seq_mean_token_sum": sum(row_sums) / len(LENGTHS),
    }
    assert set(expected) == set(LOSS_AGGREGATIONS)
    for mode, value in expected.items():
        assert aggregate_loss(per_token, mask, mode).item() == pytest.approx(value, abs=1e-12)
    assert aggregate_loss(per_token, mask).item() == pytest.approx(expected["token_mean"], abs=1e-12)
    # Explicit totals replace the batch's own counts.
    assert aggregate_loss(per_token, mask, "token_mean", total_tokens=20.0).item() == pytest.approx(
        sum(row_sums) / 20, abs=1e-12
    )
    assert aggregate_loss(per_token, mask, "seq_mean_token_sum", total_seqs=10).item() == pytest.approx(
        sum(row_sums) / 10, abs=1e-12
    )


def test_aggregate_loss_rejects_unknown_mode():
    with pytest.raises(ValueError) as error:
        aggregate_loss(torch.ones(2, 3), torch.ones(2, 3), "mean")
    for mode in LOSS_AGGREGATIONS:
        assert mode in str(error.value)


def test_aggregate_loss_rejects_zero_denominators():
    per_token, mask = torch.ones(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="total_tokens"):
        aggregate_loss(per_token, mask, "token_mean", total_tokens=0)
    with pytest.raises(ValueError, match="total_tokens"):
        aggregate_loss(per_token, torch.zeros(2, 3), "token_mean")
    with pytest.raises(ValueError, match="total_seqs"):
        aggregate_loss(per_token, mask, "seq_mean_token_sum", total_seqs=0)
    with pytest.raises(ValueError, match="total_seqs == 0"):
        aggregate_loss(per_token, torch.zeros(2, 3), "seq_mean_token_mean")


def test_rows_without_tokens_add_nothing():
    """A sequence left out of the loss (its mask row all 0, e.g. DAPO's overlong filtering) adds nothing and is
    not counted among the sequences."""
    per_token = torch.tensor([[1.0, 2.0, 3.0], [7.0, 8.0, 9.0], [4.0, 5.0, 6.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=F64)
    assert aggregate_loss(per_token, mask, "seq_mean_token_mean").item() == pytest.approx((1.5 + 5.0) / 2, abs=1e-12)
    assert aggregate_loss(per_token, mask, "seq_mean_token_sum").item() == pytest.approx((3 + 15) / 2, abs=1e-12)
    assert aggregate_loss(per_token, mask, "token_mean").item() == pytest.approx(18 / 5, abs=1e-12)


# ---------------------------------------------------------------- gradient accumulation

B, T, H, V = 6, 5, 4, 7
BATCH_LENGTHS = [5, 1, 3, 2, 4, 5]
MICRO_BATCHES = [slice(0, 1), slice(1, 3), slice(3, 6)]  # unequal sizes and token counts on purpose


class _Batch:
    """A fixed rollout plus a tiny linear policy/critic whose parameters receive the gradients."""

    def __init__(self):
        gen = torch.Generator().manual_seed(3)
        self.features = torch.randn(B, T, H, generator=gen, dtype=F64)
        self.labels = torch.randint(0, V, (B, T), generator=gen)
        self.mask = _mask(BATCH_LENGTHS, T)
        self.policy_weight = torch.randn(H, V, generator=gen, dtype=F64, requires_grad=True)
        self.value_weight = torch.randn(H, generator=gen, dtype=F64, requires_grad=True)
        with torch.no_grad():
            # Old log-probs/values off the current ones so that some tokens clip and some do not.
            self.old_logp = self.logp(slice(None)) + 0.3 * torch.randn(B, T, generator=gen, dtype=F64)
            self.old_values = self.values(slice(None)) + 0.5 * torch.randn(B, T, generator=gen, dtype=F64)
        self.advantages = torch.randn(B, T, generator=gen, dtype=F64)
        self.returns = torch.randn(B, T, generator=gen, dtype=F64)

    def logits(self, rows):
        return self.features[rows] @ self.policy_weight

    def logp(self, rows):
        return token_logprobs(self.logits(rows), self.labels[rows])

    def values(self, rows):
        return self.features[rows] @ self.value_weight

    def loss(self, kind, rows, mode, total_tokens=None, total_seqs=None):
        totals = dict(mode=mode, total_tokens=total_tokens, total_seqs=total_seqs)
        mask = self.mask[rows]
        if kind == "policy":
            args = (self.logp(rows), self.old_logp[rows], self.advantages[rows], mask, 0.2)
            return policy_loss(*args, **totals)[0]
        if kind == "value":
            args = (self.values(rows), self.old_values[rows], self.returns[rows], mask, 0.2)
            return value_loss(*args, **totals)[0]
        return lm_loss(self.logits(rows), self.labels[rows], mask, **totals)

    def gradients(self, loss):
        params = [self.policy_weight, self.value_weight]
        return torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("kind", ["policy", "value", "lm"])
@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_micro_batches_with_global_totals_equal_one_batch(mode, kind):
    batch = _Batch()
    full_loss = batch.loss(kind, slice(None), mode)
    full_grads = batch.gradients(full_loss)
    assert any(g.abs().sum() > 0 for g in full_grads)

    # Gradient accumulation: the micro-batch losses, each divided by the totals of the whole batch, are summed.
    total_tokens, total_seqs = batch.mask.sum().item(), B
    micro_losses = [batch.loss(kind, rows, mode, total_tokens, total_seqs) for rows in MICRO_BATCHES]
    accumulated_loss = torch.stack(micro_losses).sum()
    accumulated_grads = batch.gradients(accumulated_loss)

    assert accumulated_loss.item() == pytest.approx(full_loss.item(), abs=1e-12)
    for accumulated, full in zip(accumulated_grads, full_grads):
        torch.testing.assert_close(accumulated, full, atol=1e-12, rtol=0)

    # Without the global totals each micro-batch normalises by its own counts, and the gradient is different.
    local_loss = torch.stack([batch.loss(kind, rows, mode) for rows in MICRO_BATCHES]).sum()
    local_grads = batch.gradients(local_loss)
    assert not all(torch.allclose(local, full) for local, full in zip(local_grads, full_grads))


# ---------------------------------------------------------------- PPO policy loss


def _ppo_token(logp, old_logp, advantage, eps):
    ratio = math.exp(logp - old_logp)
    return max(-advantage * ratio, -advantage * min(max(ratio, 1 - eps), 1 + eps))


def test_policy_loss_at_ratio_one_is_the_surrogate():
    advantages = torch.tensor([[1.0, -2.0, 0.5], [3.0, 9.0, 9.0]], dtype=F64)
    mask = _mask([3, 1], 3)
    logp = torch.tensor([[-1.0, -2.0, -0.3], [-0.7, -1.0, -1.0]], dtype=F64, requires_grad=True)
    loss, stats = policy_loss(logp, logp.detach().clone(), advantages, mask, clip_eps=0.2)
    # L = −Σ A·m / Σ m
    assert loss.item() == pytest.approx(-(1.0 - 2.0 + 0.5 + 3.0) / 4, abs=1e-12)
    (grad,) = torch.autograd.grad(loss, logp)
    # ∂L/∂log π = −A·ρ·m / N with ρ = 1
    torch.testing.assert_close(grad, -advantages * mask / 4, atol=1e-12, rtol=0)
    assert stats.clipfrac.item() == 0.0
    assert stats.approx_kl.item() == 0.0
    assert stats.ratio_mean.item() == pytest.approx(1.0, abs=1e-12)


# (advantage, ratio, clipped?): clipping matters only where it removes the incentive to move further.
CLIP_CASES = [
    (1.0, 1.5, True),  # A > 0, ratio above 1 + ε: gain capped
    (1.0, 0.5, False),  # A > 0, ratio below 1 − ε: the unclipped term is the larger loss
    (-1.0, 0.5, True),  # A < 0, ratio below 1 − ε: gain capped
    (-1.0, 1.5, False),  # A < 0, ratio above 1 + ε: the unclipped term is the larger loss
    (2.0, 1.1, False),  # inside the range
    (-2.0, 0.9, False),  # inside the range
]


def test_policy_loss_clips_in_the_direction_that_matters():
    eps = 0.2
    old_logp = [-1.0] * len(CLIP_CASES)
    logp_values = [o + math.log(ratio) for o, (_, ratio, _) in zip(old_logp, CLIP_CASES)]
    # Column 1 is padding, with log-probs far apart: masking keeps it out of the loss and out of exp overflow.
    logp = torch.tensor([[lp, 500.0] for lp in logp_values], dtype=F64, requires_grad=True)
    old = torch.tensor([[o, -500.0] for o in old_logp], dtype=F64)
    advantages = torch.tensor([[a, 0.0] for a, _, _ in CLIP_CASES], dtype=F64)
    mask = _mask([1] * len(CLIP_CASES), 2)

    loss, stats = policy_loss(logp, old, advantages, mask, clip_eps=eps)
    expected_tokens = [_ppo_token(lp, o, a, eps) for lp, o, (a, _, _) in zip(logp_values, old_logp, CLIP_CASES)]
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(sum(expected_tokens) / len(CLIP_CASES), abs=1e-12)

    num_clipped = sum(clipped for _, _, clipped in CLIP_CASES)
    assert stats.clipfrac.item() == pytest.approx(num_clipped / len(CLIP_CASES), abs=1e-12)
    ratios = [ratio for _, ratio, _ in CLIP_CASES]
    assert stats.ratio_mean.item() == pytest.approx(sum(ratios) / len(ratios), abs=1e-12)
    approx_kl = sum(0.5 * math.log(r) ** 2 for r in ratios) / len(ratios)
    assert stats.approx_kl.item() == pytest.approx(approx_kl, abs=1e-12)
    assert not stats.clipfrac.requires_grad and not stats.approx_kl.requires_grad

    (grad,) = torch.autograd.grad(loss, logp)
    for row, (advantage, ratio, clipped) in enumerate(CLIP_CASES):
        # A clipped token gives no gradient; an unclipped one gives ∂(−A·ρ)/∂log π / N = −A·ρ / N.
        expected = 0.0 if clipped else -advantage * ratio / len(CLIP_CASES)
        assert grad[row, 0].item() == pytest.approx(expected, abs=1e-12)
        assert grad[row, 1].item() == 0.0


def test_policy_loss_random_against_per_element_math():
    gen = torch.Generator().manual_seed(4)
    logp = -torch.rand(3, 6, generator=gen, dtype=F64)
    old_logp = logp + 0.4 * torch.randn(3, 6, generator=gen, dtype=F64)
    advantages = torch.randn(3, 6, generator=gen, dtype=F64)
    lengths = [6, 2, 4]
    mask = _mask(lengths, 6)
    for mode in LOSS_AGGREGATIONS:
        loss, _ = policy_loss(logp, old_logp, advantages, mask, 0.2, mode=mode)
        rows = [
            [_ppo_token(logp[b, t].item(), old_logp[b, t].item(), advantages[b, t].item(), 0.2) for t in range(n)]
            for b, n in enumerate(lengths)
        ]
        expected = {
            "token_mean": sum(map(sum, rows)) / sum(lengths),
            "seq_mean_token_mean": sum(sum(r) / len(r) for r in rows) / 3,
            "seq_mean_token_sum": sum(map(sum, rows)) / 3,
        }[mode]
        assert loss.item() == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------- PPO value loss


def test_value_loss_clipping():
    eps = 0.2
    # (old value, new value, return, clipped error selected?)
    cases = [
        (0.0, 1.0, 0.0, False),  # moved past the clip, away from the return: unclipped error is larger
        (0.0, 1.0, 1.0, True),  # moved past the clip, onto the return: clipped error is larger
        (0.0, -0.5, -2.0, True),  # moved past the clip toward the return: clipped error is larger
        (0.0, 0.1, 1.0, False),  # inside the clip range: both errors equal
    ]
    old = torch.tensor([[c[0], 0.0] for c in cases], dtype=F64)
    values = torch.tensor([[c[1], 7.0] for c in cases], dtype=F64, requires_grad=True)
    returns = torch.tensor([[c[2], -7.0] for c in cases], dtype=F64)
    mask = _mask([1] * len(cases), 2)

    loss, stats = value_loss(values, old, returns, mask, clip_eps=eps)
    per_token = []
    for o, v, g, _ in cases:
        v_clipped = o + min(max(v - o, -eps), eps)
        per_token.append(0.5 * max((v - g) ** 2, (v_clipped - g) ** 2))
    assert loss.item() == pytest.approx(sum(per_token) / len(cases), abs=1e-12)
    assert stats.clipfrac.item() == pytest.approx(sum(c[3] for c in cases) / len(cases), abs=1e-12)
    assert stats.mean_value.item() == pytest.approx(sum(c[1] for c in cases) / len(cases), abs=1e-12)
    assert stats.mean_return.item() == pytest.approx(sum(c[2] for c in cases) / len(cases), abs=1e-12)
    assert not stats.clipfrac.requires_grad and not stats.mean_value.requires_grad

    (grad,) = torch.autograd.grad(loss, values)
    for row, (_old, v, g, clipped) in enumerate(cases):
        # Where the clipped error is selected the gradient is 0; otherwise ∂½(V−G)²/∂V / N = (V − G) / N.
        expected = 0.0 if clipped else (v - g) / len(cases)
        assert grad[row, 0].item() == pytest.approx(expected, abs=1e-12)
        assert grad[row, 1].item() == 0.0


# ---------------------------------------------------------------- reward model and LM losses


def test_pairwise_loss():
    equal = torch.tensor([0.3, -2.0, 5.0])
    assert pairwise_loss(equal, equal.clone()).item() == pytest.approx(math.log(2), abs=1e-6)
    chosen = torch.tensor([1.0, 0.0, 3.0], dtype=F64)
    rejected = torch.tensor([0.0, 2.0, -1.0], dtype=F64)
    # −log σ(d) = log(1 + e^(−d))
    expected = sum(math.log(1 + math.exp(-(c - r))) for c, r in zip(chosen.tolist(), rejected.tolist())) / 3
    assert pairwise_loss(chosen, rejected).item() == pytest.approx(expected, abs=1e-12)


def test_pairwise_loss_is_stable_for_large_margins():
    loss = pairwise_loss(torch.tensor([-1000.0, 1000.0]), torch.tensor([0.0, 0.0]))
    # Row 0: −log σ(−1000) ≈ 1000; row 1: −log σ(1000) ≈ 0.
    assert loss.item() == pytest.approx(500.0, abs=1e-3)


def test_pairwise_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        pairwise_loss(torch.zeros(3), torch.zeros(2))


def test_lm_loss_is_masked_negative_log_likelihood():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 4, 6, generator=gen, dtype=F64)
    labels = torch.randint(0, 6, (2, 4), generator=gen)
    lengths = [4, 2]
    nll = [
        [-_log_softmax_at(logits[b, t].tolist(), labels[b, t].item()) for t in range(n)] for b, n in enumerate(lengths)
    ]
    loss = lm_loss(logits, labels, _mask(lengths, 4))
    assert loss.item() == pytest.approx(sum(map(sum, nll)) / sum(lengths), abs=1e-12)
    loss = lm_loss(logits, labels, _mask(lengths, 4), mode="seq_mean_token_mean")
    assert loss.item() == pytest.approx(sum(sum(r) / len(r) for r in nll) / 2, abs=1e-12)
