"""Reward shaping by length: DAPO's soft overlong punishment."""

from __future__ import annotations

import torch
from torch import Tensor


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, §3.4), added to the reward.

    With L_max = `max_len` and L_cache = `buffer`:

        R_length(y) = 0                                 if |y| ≤ L_max − L_cache
                    = ((L_max − L_cache) − |y|) / L_cache   if L_max − L_cache < |y| ≤ L_max
                    = −1                                if |y| > L_max

    times `factor`. The penalty grows linearly through the last L_cache tokens, so a response that runs to the
    length limit is pushed back before it is cut, without punishing a long but complete answer as hard as a cut one.

    Args:
        lengths: (B,) — |y|, the response lengths in tokens (EOS included).
        max_len: L_max, the longest response (generation's `max_new_tokens`).
        buffer: L_cache, 1 ≤ L_cache ≤ L_max.
        factor: the penalty at (and beyond) L_max.

    Returns:
        (B,) float — R_length · factor, in [−factor, 0].
    """
    if not 1 <= buffer <= max_len:
        raise ValueError(f"overlong buffer must be in [1, max_len={max_len}], got {buffer}")
    # (L_max − L_cache − |y|) / L_cache, capped at 0 from above and −1 from below
    excess = (max_len - buffer - lengths.to(torch.float32)) / buffer
    return factor * excess.clamp(min=-1.0, max=0.0)
