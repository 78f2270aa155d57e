"""Response masks and masked reductions.

Every response-side tensor in chatrlhf is (B, T) over response positions only: position 0 is the first
generated token. A response mask is 1 for real response tokens, which form a contiguous prefix (the tokens up to
and including the first EOS), and 0 after it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def response_mask(tokens: Tensor, eos_token_id: int) -> Tensor:
    """Mask of the real tokens of each response: 1 up to and including the first EOS, 0 after.

    A row with no EOS (generation stopped at the length limit) is all 1.

    Args:
        tokens: (B, T) long — generated response tokens.
        eos_token_id: id of the end-of-sequence token.

    Returns:
        (B, T) float — m_t = 1 if no EOS occurs strictly before t, else 0.
    """
    is_eos = (tokens == eos_token_id).long()
    # number of EOS tokens strictly before t: cumsum includes position t itself, so subtract it
    eos_before = is_eos.cumsum(dim=1) - is_eos
    return (eos_before == 0).float()


def truncate_after_eos(tokens: Tensor, eos_token_id: int, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Replace every token after the first EOS by padding, and return the response mask.

    The mask is computed before padding is written, so this works when `pad_token_id == eos_token_id`.

    Args:
        tokens: (B, T) long — generated response tokens.
        eos_token_id: id of the end-of-sequence token.
        pad_token_id: id written at every position after the first EOS.

    Returns:
        tokens: (B, T) long — a new tensor; positions after the first EOS hold `pad_token_id`.
        mask: (B, T) float — `response_mask(tokens, eos_token_id)`.
    """
    mask = response_mask(tokens, eos_token_id)
    return tokens.masked_fill(mask == 0, pad_token_id), mask


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last nonzero entry of each row.

    For a response mask this is the last real token: the EOS, or position T−1 when the response was cut at the
    length limit.

    Args:
        mask: (B, T) — nonzero for real tokens.

    Returns:
        (B,) long — max{t : mask[b, t] ≠ 0}.

    Raises:
        ValueError: a row of `mask` is all zero (it has no last token).
    """
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask != 0, positions, -1).amax(dim=1)
    empty = (last < 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"mask rows {empty} are all zero; every row needs at least one token")
    return last


def run_lengths(mask: Tensor) -> Tensor:
    """Lengths of the runs of nonzero entries of each row, in order: a single response's mask is one run (its
    length), a multi-turn episode's policy mask one run per policy turn (docs/episodes.md).

    Args:
        mask: (B, T) — nonzero for the tokens counted.

    Returns:
        (B, K) float — the k-th run's length in row b, 0 past the row's runs; K = the most runs in a row (0 when
        `mask` is all zero).
    """
    on = mask != 0
    starts = on & ~torch.nn.functional.pad(on, (1, 0))[:, :-1]
    run = starts.long().cumsum(dim=1) * on  # 1..K on a run's tokens, 0 elsewhere
    out = torch.zeros(mask.shape[0], int(run.max()) if run.numel() else 0, device=mask.device)
    return out.scatter_add_(1, (run - 1).clamp(min=0), on.float()) if out.shape[1] else out


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ x·m, over all entries (`dim=None`, a scalar) or along `dim`.

    Args:
        x: (B, T) float — values.
        mask: (B, T) float — 1 for entries to include, 0 otherwise.
        dim: dimension to reduce; None reduces everything.
    """
    if dim is None:
        return (x * mask).sum()
    return (x * mask).sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ x·m / Σ m, over all entries (`dim=None`, a scalar) or along `dim`.

    Args:
        x: (B, T) float — values.
        mask: (B, T) float — 1 for entries to include, 0 otherwise.
        dim: dimension to reduce; None reduces everything. Along a dim, a slice with an empty mask gives NaN.

    Raises:
        ValueError: `dim` is None and the mask is all zero.
    """
    if dim is None:
        count = mask.sum()
        if count == 0:
            raise ValueError("masked_mean of an empty mask: no entries to average")
        return masked_sum(x, mask) / count
    return masked_sum(x, mask, dim) / mask.sum(dim=dim)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked entries of `x`, a scalar.

    var = Σ m·(x − μ)² / (n − 1) if unbiased, else / n; with μ = masked_mean(x, mask) and n = Σ m.

    Args:
        x: (B, T) float — values.
        mask: (B, T) float — 1 for entries to include, 0 otherwise.
        unbiased: apply Bessel's correction n/(n − 1).

    Raises:
        ValueError: the mask is empty, or holds a single entry with `unbiased=True`.
    """
    count = mask.sum()
    if unbiased and count == 1:
        raise ValueError("unbiased masked_var needs at least 2 entries; the mask holds 1")
    mean = masked_mean(x, mask)
    # Σ m·(x − μ)² / n
    variance = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        # Bessel's correction: × n/(n − 1)
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalize the masked entries of `x` to zero mean and unit variance; zero outside the mask.

    x̂ = (x − μ) / sqrt(σ² + eps), plus μ again when `shift_mean` is False (only the scale changes). μ and σ² are
    the mean and the population variance (divided by n, not n − 1) of the masked entries, so the whitened entries
    have exactly unit variance over the mask, and a single entry whitens to 0 instead of raising.

    Args:
        x: (B, T) float — values, e.g. advantages.
        mask: (B, T) float — 1 for entries to include, 0 otherwise.
        shift_mean: subtract the mean; when False the result keeps the mean of `x`.
        eps: added to the variance before the square root.

    Returns:
        (B, T) float — whitened values, 0 where mask is 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=False)
    # x̂ = (x − μ) / sqrt(σ² + eps)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask
