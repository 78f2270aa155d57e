"""The fits and the points of bench/cost_growth.py (the bench itself runs chatrlhf for minutes; not tested here)."""

from __future__ import annotations

import math

import pytest

from tests.conftest import load_bench


@pytest.fixture(scope="module")
def cost_growth():
    with load_bench("cost_growth") as module:
        yield module


@pytest.mark.parametrize("k", [0.0, 1.0, 2.0, 0.37])
def test_loglog_slope_recovers_the_exponent_of_a_power_law(cost_growth, k):
    xs = [2.0, 4.0, 8.0, 16.0]
    ys = [3.5 * x**k for x in xs]
    assert cost_growth.loglog_slope(xs, ys) == pytest.approx(k, abs=1e-12)


def test_loglog_slope_of_a_line_with_an_intercept_is_below_one(cost_growth):
    # y = 10 + x on x = 1, 2, 4, 8: by hand, the log-log least-squares slope of these four points
    xs = [1.0, 2.0, 4.0, 8.0]
    lx = [math.log(x) for x in xs]
    ly = [math.log(10 + x) for x in xs]
    mx, my = sum(lx) / 4, sum(ly) / 4
    expected = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)
    assert 0 < expected < 1
    assert cost_growth.loglog_slope(xs, [10 + x for x in xs]) == pytest.approx(expected, abs=1e-12)


def test_linear_fit_recovers_intercept_and_slope(cost_growth):
    xs = [16.0, 32.0, 64.0, 128.0]
    a, b = cost_growth.linear_fit(xs, [700.0 + 0.25 * x for x in xs])
    assert a == pytest.approx(700.0, abs=1e-9)
    assert b == pytest.approx(0.25, abs=1e-12)


def test_sweep_points_double_one_axis_at_a_time(cost_growth):
    base = {"new_tokens": 32, "batch": 4, "group": 4, "layers": 4}
    points = cost_growth.sweep_points(base, [-1, 0, 1])
    assert len(points) == 8  # 4 axes × the two k ≠ 0; the base itself is not repeated
    assert ("new_tokens", {**base, "new_tokens": 16}) in points
    assert ("layers", {**base, "layers": 8}) in points
    for axis, p in points:
        assert [name for name in base if p[name] != base[name]] == [axis]


def test_sweep_points_refuse_a_fraction(cost_growth):
    with pytest.raises(SystemExit, match="not a whole number"):
        cost_growth.sweep_points({"new_tokens": 32, "batch": 1, "group": 4, "layers": 4}, [-1, 0])
