"""Stage split and weighted blending; expected sizes are worked out by hand."""

from __future__ import annotations

from collections import Counter

import pytest

from chatrlhf.data import blend, blend_counts, parse_split, split_for_stages
from chatrlhf.errors import ConfigError

# ---------------------------------------------------------------- parse_split


def test_parse_split_normalises():
    assert parse_split("2,4,4") == pytest.approx((0.2, 0.4, 0.4), abs=1e-12)
    assert parse_split(" 6, 2 ,2") == pytest.approx((0.6, 0.2, 0.2), abs=1e-12)
    assert parse_split([1, 0, 0]) == (1.0, 0.0, 0.0)
    assert parse_split((0.5, 0.25, 0.25)) == (0.5, 0.25, 0.25)


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("2,4", "expected three"),
        ("1,1,1,1", "expected three"),
        ([1, 2], "expected three"),
        ("2,-1,4", "must be finite and >= 0"),
        ("0,0,0", "at least one weight must be > 0"),
        ("2,x,4", "expected numbers, found 'x'"),
        ("2,,4", "expected numbers"),
        ("1,nan,1", "must be finite"),
        ([1, None, 1], "expected numbers, found None"),
        ([True, 1, 1], "expected numbers"),
    ],
)
def test_parse_split_errors(spec, fragment):
    with pytest.raises(ConfigError) as info:
        parse_split(spec)
    assert str(info.value).startswith("data.split: ")
    assert fragment in str(info.value)


# ---------------------------------------------------------------- split_for_stages


@pytest.mark.parametrize(
    "n, spec, sizes",
    [
        (10, "2,4,4", (2, 4, 4)),
        # cuts at round(7·0.2) = round(1.4) = 1 and round(7·0.6) = round(4.2) = 4
        (7, "2,4,4", (1, 3, 3)),
        # cuts at round(5·1/3) = round(1.67) = 2 and round(5·2/3) = round(3.33) = 3
        (5, "1,1,1", (2, 1, 2)),
        # half rounds up: round(5·0.5) = 3
        (5, "1,0,1", (3, 0, 2)),
        (4, "1,0,0", (4, 0, 0)),
        (0, "2,4,4", (0, 0, 0)),
    ],
)
def test_split_sizes(n, spec, sizes):
    parts = split_for_stages(list(range(n)), parse_split(spec), seed=0)
    assert tuple(len(p) for p in parts) == sizes


def test_split_is_disjoint_covers_everything_and_keeps_identity():
    records = [object() for _ in range(23)]
    parts = split_for_stages(records, parse_split("2,4,4"), seed=3)
    ids = [id(r) for part in parts for r in part]
    assert len(ids) == 23 and set(ids) == {id(r) for r in records}


def test_split_is_deterministic_and_seeded():
    records = list(range(100))
    a = split_for_stages(records, (0.2, 0.4, 0.4), seed=1)
    b = split_for_stages(records, (0.2, 0.4, 0.4), seed=1)
    c = split_for_stages(records, (0.2, 0.4, 0.4), seed=2)
    assert a == b
    assert a != c


def test_split_follows_the_seeded_permutation():
    import numpy as np

    order = np.random.default_rng(5).permutation(10).tolist()
    letters = list("abcdefghij")
    sft, reward, rl = split_for_stages(letters, (0.2, 0.4, 0.4), seed=5)
    assert sft == [letters[i] for i in order[:2]]
    assert reward == [letters[i] for i in order[2:6]]
    assert rl == [letters[i] for i in order[6:]]


# ---------------------------------------------------------------- blend


def test_blend_without_weights_uses_every_record_once():
    a, b = [("a", i) for i in range(3)], [("b", i) for i in range(5)]
    blended, counts = blend([a, b], None, seed=0)
    assert counts == [3, 5]
    assert sorted(blended) == sorted(a + b)
    assert blend([a, b], None, seed=0) == (blended, counts)


def test_blend_equal_weights_resamples():
    small, large = [("s", i) for i in range(10)], [("l", i) for i in range(30)]
    blended, counts = blend([small, large], [1, 1], seed=0)
    assert counts == [20, 20]
    assert len(blended) == 40
    seen = Counter(blended)
    # 20 draws from 10 records: two whole permutations, every record exactly twice.
    assert all(seen[r] == 2 for r in small)
    # 20 draws from 30 records: 20 distinct records, none repeated.
    assert sum(seen[r] for r in large) == 20 and all(seen[r] <= 1 for r in large)


def test_blend_upsampling_repeats_whole_permutations():
    small, large = [("s", i) for i in range(4)], [("l", i) for i in range(16)]
    # N = 20, weights 1:1 → 10 each; 10 draws from 4 records = 2 permutations + 2 → counts 2 or 3.
    blended, counts = blend([small, large], [1.0, 1.0], seed=7)
    assert counts == [10, 10]
    per_record = Counter(r for r in blended if r[0] == "s")
    assert sorted(per_record.values()) == [2, 2, 3, 3]


def test_blend_counts_rounding_sums_to_total():
    # N = 10, exact shares 10/3 each = 3.33: floors 3,3,3; the one left over goes to the first on ties.
    assert blend_counts([3, 3, 4], [1, 1, 1]) == [4, 3, 3]
    # N = 7, shares 7·2/7 = 2 and 7·5/7 = 5 exactly.
    assert blend_counts([2, 5], [2, 5]) == [2, 5]
    # N = 11, shares 11·0.25 = 2.75 and 11·0.75 = 8.25 → 3 and 8.
    assert blend_counts([5, 6], [1, 3]) == [3, 8]


def test_blend_is_seeded():
    parts = [list(range(5)), list(range(100, 120))]
    assert blend(parts, [2, 1], seed=4) == blend(parts, [2, 1], seed=4)
    assert blend(parts, [2, 1], seed=4)[0] != blend(parts, [2, 1], seed=5)[0]


@pytest.mark.parametrize(
    "weights, fragment",
    [
        ([1], "one weight per dataset (2), got 1"),
        ([1, 0], "> 0"),
        ([1, -2], "> 0"),
        ([1, float("inf")], "finite"),
    ],
)
def test_blend_weight_errors(weights, fragment):
    with pytest.raises(ConfigError) as info:
        blend([[1, 2], [3]], weights, seed=0)
    assert str(info.value).startswith("data.weights: ")
    assert fragment in str(info.value)


def test_blend_weighted_empty_part_is_an_error():
    with pytest.raises(ConfigError) as info:
        blend([[1, 2], []], [1, 1], seed=0)
    assert "data.weights: dataset 2 has no records" in str(info.value)
