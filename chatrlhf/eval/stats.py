"""The evaluation's statistics as pure functions over floats: Student-t intervals, the paired win rate, pass@k and
score distributions. Prompts are the independent units: every interval is over per-prompt values, never over the
samples of one prompt (which are correlated)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np


def t_cdf(x: float, df: int) -> float:
    """P(T ≤ x) for Student's t with `df` degrees of freedom, by Simpson's rule on the density over [0, |x|]."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(t: float) -> float:
        return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))

    a, steps = abs(x), 2000
    h = a / steps
    area = density(0.0) + density(a) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
    half = area * h / 3
    return 0.5 + half if x >= 0 else 0.5 - half


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t (bisection on `t_cdf`; 12.706 for df=1, 1.960 as df → ∞)."""
    lo, hi = 0.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < 0.975 else (lo, mid)
    return (lo + hi) / 2


@dataclass
class MeanCI:
    mean: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict:
        """JSON-safe: an undefined interval (n < 2) is null."""
        ci = [self.low, self.high] if math.isfinite(self.low) else None
        return {"mean": self.mean, "ci95": ci, "n": self.n}


def mean_ci(xs: list[float]) -> MeanCI:
    """Mean with a 95% t-interval: mean ± t_{0.975, n−1}·sd/√n."""
    n = len(xs)
    mean = statistics.fmean(xs)
    if n < 2:
        return MeanCI(mean, -math.inf, math.inf, n)
    half = t_quantile_975(n - 1) * statistics.stdev(xs) / math.sqrt(n)
    return MeanCI(mean, mean - half, mean + half, n)


def win_probability(a: list[float], b: list[float]) -> float:
    """For one prompt: the probability that a random sample of A scores above a random sample of B, ties counted
    half — (1 / (|a|·|b|)) Σ_j Σ_l ([a_j > b_l] + ½[a_j = b_l]), over every pair of the two models' samples."""
    wins = sum((x > y) + 0.5 * (x == y) for x in a for y in b)
    return wins / (len(a) * len(b))


def win_rate(a: list[list[float]], b: list[list[float]]) -> MeanCI:
    """Win rate of A over B on the same prompts, `a`/`b` [prompt][sample]: the mean over prompts of
    `win_probability`, with a 95% t-interval over prompts (paired: each prompt's value compares both models on it).
    0.5 = no difference."""
    return mean_ci([win_probability(x, y) for x, y in zip(a, b)])


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from n samples of which c pass (Chen et al. 2021, "Evaluating Large Language
    Models Trained on Code", eq. 1): 1 − C(n−c, k) / C(n, k), the chance that k of the n samples drawn without
    replacement hold at least one pass; computed as 1 − Π_{i=n−c+1}^{n} (1 − k/i), which does not overflow."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n = {n} samples")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def binomial_upper_tail(k: int, n: int, p: float = 0.5) -> float:
    """P(X ≥ k) for X ~ Binomial(n, p): the p-value of the one-sided exact binomial test of H₀ "success rate ≤ p"
    after k successes in n trials. Σ_{i=k}^{n} C(n, i) pⁱ (1 − p)ⁿ⁻ⁱ, summed in log space (log C(n, i) from lgamma)
    so that large n neither overflows nor underflows before the end; 1.0 for k ≤ 0."""
    if not 0 <= k <= n or n < 1 or not 0.0 < p < 1.0:
        raise ValueError(f"binomial_upper_tail needs 0 <= k <= n, n >= 1 and 0 < p < 1, got k={k}, n={n}, p={p}")
    if k == 0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    logs = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
        for i in range(k, n + 1)
    ]
    top = max(logs)
    return min(1.0, math.exp(top + math.log(sum(math.exp(x - top) for x in logs))))


def distribution(xs: list[float], bins: int = 20) -> dict:
    """Summary of a score distribution: n, mean, std, min, the 5/25/50/75/95% quantiles (linear interpolation),
    max, and a histogram on `bins` equal bins from min to max (`edges` has bins + 1 values)."""
    a = np.asarray(xs, dtype=float)
    lo, hi = float(a.min()), float(a.max())
    counts, edges = np.histogram(a, bins=bins, range=(lo, hi) if hi > lo else (lo - 0.5, hi + 0.5))
    quantiles = {f"{q:.2f}": float(np.quantile(a, q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95)}
    return {
        "n": int(a.size),
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "min": lo,
        "quantiles": quantiles,
        "max": hi,
        "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
    }
