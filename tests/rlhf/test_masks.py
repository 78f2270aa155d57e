"""Response masks, EOS truncation and masked reductions against hand-written expectations."""

from __future__ import annotations

import statistics

import pytest
import torch

from chatrlhf.rlhf import (
    last_token_index,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    response_mask,
    truncate_after_eos,
)

EOS, PAD = 2, 0


def test_response_mask_includes_first_eos_and_nothing_after():
    tokens = torch.tensor(
        [
            [5, 6, EOS, 7, EOS],  # EOS in the middle, another later
            [EOS, 5, 6, 7, 8],  # EOS at the first position
            [5, 6, 7, 8, 9],  # no EOS: cut at the length limit
            [5, 6, 7, 8, EOS],  # EOS at the last position
        ]
    )
    expected = torch.tensor(
        [
            [1, 1, 1, 0, 0],
            [1, 0, 0, 0, 0],
            [1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1],
        ],
        dtype=torch.float32,
    )
    mask = response_mask(tokens, EOS)
    assert mask.dtype == torch.float32
    assert torch.equal(mask, expected)


def test_truncate_after_eos_pads_after_first_eos():
    tokens = torch.tensor([[5, EOS, 7, 8], [EOS, 9, EOS, 9], [5, 6, 7, 8]])
    truncated, mask = truncate_after_eos(tokens, EOS, PAD)
    assert torch.equal(truncated, torch.tensor([[5, EOS, PAD, PAD], [EOS, PAD, PAD, PAD], [5, 6, 7, 8]]))
    assert torch.equal(mask, torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float32))
    assert torch.equal(tokens, torch.tensor([[5, EOS, 7, 8], [EOS, 9, EOS, 9], [5, 6, 7, 8]])), "input modified"


def test_truncate_after_eos_when_pad_is_eos():
    tokens = torch.tensor([[5, EOS, 7, 8], [5, 6, 7, EOS]])
    truncated, mask = truncate_after_eos(tokens, eos_token_id=EOS, pad_token_id=EOS)
    assert torch.equal(truncated, torch.tensor([[5, EOS, EOS, EOS], [5, 6, 7, EOS]]))
    # The mask still ends at the first EOS: the padding EOS tokens after it are not response tokens.
    assert torch.equal(mask, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float32))
    assert torch.equal(response_mask(truncated, EOS), mask)


def test_last_token_index():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    assert last_token_index(mask).tolist() == [2, 0, 4]
    assert last_token_index(mask).dtype == torch.long


def test_last_token_index_raises_on_empty_row():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.float32)
    with pytest.raises(ValueError, match=r"\[1\]"):
        last_token_index(mask)


X = [[1.0, 2.0, 4.0, 100.0], [-3.0, 0.5, 100.0, 100.0], [7.0, -1.0, 2.5, 6.0]]
M = [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]


def _kept(x=X, m=M):
    return [v for row, mrow in zip(x, m) for v, keep in zip(row, mrow) if keep]


def _tensors():
    return torch.tensor(X, dtype=torch.float64), torch.tensor(M, dtype=torch.float64)


def test_masked_sum_and_mean():
    x, m = _tensors()
    assert masked_sum(x, m).item() == pytest.approx(sum(_kept()), abs=1e-12)
    assert masked_mean(x, m).item() == pytest.approx(statistics.mean(_kept()), abs=1e-12)
    row_sums = [sum(v for v, keep in zip(row, mrow) if keep) for row, mrow in zip(X, M)]
    row_means = [statistics.mean([v for v, keep in zip(row, mrow) if keep]) for row, mrow in zip(X, M)]
    torch.testing.assert_close(masked_sum(x, m, dim=1), torch.tensor(row_sums, dtype=torch.float64))
    torch.testing.assert_close(masked_mean(x, m, dim=1), torch.tensor(row_means, dtype=torch.float64))


def test_masked_mean_raises_on_empty_mask():
    x, m = _tensors()
    with pytest.raises(ValueError, match="empty mask"):
        masked_mean(x, torch.zeros_like(m))


def test_masked_var():
    x, m = _tensors()
    assert masked_var(x, m).item() == pytest.approx(statistics.variance(_kept()), abs=1e-12)
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(statistics.pvariance(_kept()), abs=1e-12)


def test_masked_var_unbiased_needs_two_entries():
    x, _ = _tensors()
    one = torch.zeros_like(x)
    one[0, 0] = 1
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, one)
    assert masked_var(x, one, unbiased=False).item() == 0.0


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten(shift_mean):
    x, m = _tensors()
    eps = 1e-8
    mean, var = statistics.mean(_kept()), statistics.pvariance(_kept())
    expected = [
        [
            ((v - mean) / (var + eps) ** 0.5 + (0.0 if shift_mean else mean)) if keep else 0.0
            for v, keep in zip(row, mrow)
        ]
        for row, mrow in zip(X, M)
    ]
    whitened = masked_whiten(x, m, shift_mean=shift_mean, eps=eps)
    torch.testing.assert_close(whitened, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)
    # The large values outside the mask played no part and are zero in the output.
    assert masked_mean(whitened, m).item() == pytest.approx(0.0 if shift_mean else mean, abs=1e-12)
    assert masked_var(whitened, m, unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
