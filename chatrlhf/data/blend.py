"""Split a dataset between the three stages, and blend several datasets into one.

The split follows DeepSpeed-Chat (`data_utils.get_raw_dataset_split_index`): one seeded shuffle of a
dataset's indices, cut at the cumulative stage fractions, so that SFT, reward model and RL each see a
disjoint part of a dataset that is shared between stages ("2,4,4" gives 20% / 40% / 40%).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from chatrlhf.errors import ConfigError

T = TypeVar("T")


def parse_split(spec: str | Sequence[float]) -> tuple[float, float, float]:
    """Stage fractions (SFT, reward, RL) from "2,4,4" or [2, 4, 4], normalised to sum to 1."""
    if isinstance(spec, str):
        items: Sequence[object] = [part.strip() for part in spec.split(",")]
    else:
        items = list(spec)
    if len(items) != 3:
        raise ConfigError(
            f"data.split: expected three comma-separated weights for SFT, reward and RL "
            f"(e.g. '2,4,4'), got {len(items)}: {spec!r}"
        )
    values = []
    for item in items:
        if isinstance(item, bool):
            raise ConfigError(f"data.split: expected numbers, found {item!r} in {spec!r}")
        try:
            value = float(item)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ConfigError(f"data.split: expected numbers, found {item!r} in {spec!r}") from None
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"data.split: weights must be finite and >= 0, found {item!r} in {spec!r}")
        values.append(value)
    total = sum(values)
    if total == 0:
        raise ConfigError(f"data.split: at least one weight must be > 0, got {spec!r}")
    return values[0] / total, values[1] / total, values[2] / total


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def split_indices(n: int, fractions: tuple[float, float, float] | Sequence[float], seed: int):
    """The SFT, reward and RL parts of n records, as three index arrays: disjoint, together 0..n-1, deterministic in
    `seed`.

    Indices are shuffled with `numpy.random.default_rng(seed).permutation(n)` and cut at
    round(n·(f_1)) and round(n·(f_1 + f_2)) (half up), so the sizes always sum to n. Each part is in shuffled
    order.
    """
    f_sft, f_reward, _ = parse_split(fractions)
    order = np.random.default_rng(seed).permutation(n)
    cut1 = _round_half_up(n * f_sft)
    cut2 = _round_half_up(n * (f_sft + f_reward))
    return order[:cut1], order[cut1:cut2], order[cut2:]


def split_for_stages(
    records: list[T], fractions: tuple[float, float, float] | Sequence[float], seed: int
) -> tuple[list[T], list[T], list[T]]:
    """`split_indices` applied to a list: its SFT, reward and RL parts, holding the same objects as `records`."""
    sft, reward, rl = split_indices(len(records), fractions, seed)
    return [records[i] for i in sft], [records[i] for i in reward], [records[i] for i in rl]


def blend_counts(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """How many records each part contributes to a weighted blend of sum(sizes) records.

    n_i = round(N·w_i/Σw) with N = Σ sizes, by largest remainder: each n_i is floor(N·w_i/Σw) or one more,
    the extra ones going to the largest fractional parts (earlier parts first on ties), so Σ n_i = N.
    """
    if len(weights) != len(sizes):
        raise ConfigError(f"data.weights: expected one weight per dataset ({len(sizes)}), got {len(weights)}")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w <= 0:
            raise ConfigError(f"data.weights: every weight must be a finite number > 0, found {w!r}")
    for i, size in enumerate(sizes):
        if size == 0:
            raise ConfigError(
                f"data.weights: dataset {i + 1} has no records for this stage, so it cannot be "
                "sampled; remove it or give it records"
            )
    total, weight_sum = sum(sizes), sum(weights)
    exact = [total * w / weight_sum for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def blend_indices(
    sizes: Sequence[int], weights: Sequence[float] | None, seed: int
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """A shuffled weighted blend of datasets of `sizes` records, as indices: (part, index in that part) of each
    blended record, and counts[i] drawn from part i.

    Without weights every record is used once. With weights (one per part, > 0) the blend keeps the total size
    N = Σ|part_i| but part i contributes n_i ≈ N·w_i/Σw records (see `blend_counts`): weights up-sample a
    small dataset (its records repeat) and down-sample a large one. Part i is drawn as ⌊n_i/|part_i|⌋ whole
    seeded permutations plus the head of one more, so each of its records appears ⌊n_i/|part_i|⌋ or
    ⌈n_i/|part_i|⌉ times. The caller reports the counts to the user, since they differ from the part sizes.
    """
    rng = np.random.default_rng(seed)
    parts, units = [], []
    if weights is None:
        counts = list(sizes)
        for i, size in enumerate(sizes):
            parts.append(np.full(size, i, dtype=np.int64))
            units.append(np.arange(size, dtype=np.int64))
    else:
        counts = blend_counts(sizes, weights)
        for i, (size, count) in enumerate(zip(sizes, counts)):
            repeats, rest = divmod(count, size)
            draws = [rng.permutation(size) for _ in range(repeats)]
            if rest:
                draws.append(rng.permutation(size)[:rest])
            parts.append(np.full(count, i, dtype=np.int64))
            units.append(np.concatenate(draws) if draws else np.zeros(0, dtype=np.int64))
    part, unit = np.concatenate(parts), np.concatenate(units)
    order = rng.permutation(len(part))
    return part[order], unit[order], counts


def blend(parts: list[list[T]], weights: Sequence[float] | None, seed: int) -> tuple[list[T], list[int]]:
    """`blend_indices` applied to lists: (the blended records, counts[i] from part i)."""
    part, unit, counts = blend_indices([len(p) for p in parts], weights, seed)
    return [parts[p][u] for p, u in zip(part.tolist(), unit.tolist())], counts
