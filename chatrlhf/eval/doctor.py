"""The RL doctor: diagnostics of a running RL stage, computed from what each iteration already measures.

The RL driver calls `Doctor.observe` once per iteration with that iteration's metrics and decoded responses. The
doctor keeps the few series it watches, runs every diagnostic, and returns a `Checkup`: the response-text metrics it
computed (`response/repeat_<n>gram_frac`, `response/distinct_<n>`), a `doctor/<name>` flag per diagnostic (0 until
the diagnostic fires, 1 from then on), and the findings that fired at this iteration. Each diagnostic fires at most
once per run, with the iteration range of its evidence, the numbers and example responses.

Every rule compares windows of iterations, never a single noisy one (docs/report.md lists each rule, its default
thresholds and what to do when it fires):

  reward_vs_judge     the held-out judge fell from its best value while the reward rose over the same span
  reward_vs_total     the reward trends up while the KL-corrected reward (`reward/total_mean`) trends down
  length_drift        mean response length of the recent window vs the early window: ×length_max_ratio or more,
                      or ×length_min_ratio or less
  repetition          the fraction of responses that repeat a word n-gram rose (two-proportion z-test, early vs
                      recent window, with a minimum rise and count)
  entropy_collapse    policy entropy of the recent window at most entropy_min_ratio × the early window's
  kl_blowup           mean KL per response over the recent window at least kl_max
  clipfrac_high       mean policy clip fraction over the recent window at least clipfrac_max
  approx_kl_high      mean approximate KL within the update over the recent window at least approx_kl_max
  value_loss_rising   critic loss of the recent window at least value_loss_max_ratio × its lowest earlier window
  logprob_mismatch    the trainer/rollout log-prob mismatch of the recent window at least mismatch_max_ratio × the
                      early window's, and at least mismatch_min
  reward_dominance    one reward component's share of the weighted sum's spread at least dominance_max over the
                      recent window
  reward_at_clip      the fraction of scores at the reward clip at least clip_frac_max over the recent window

Significance tests are one-sided at `z` (3.0 by default, p ≈ 0.0013 per test under a normal approximation) because
every diagnostic is re-tested at every iteration: a looser threshold would fire on noise somewhere in a long run.

Everything here is plain Python (no torch), so the report can replay the doctor over a finished run's files.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from chatrlhf.config import DIAGNOSTICS, DoctorConfig
from chatrlhf.errors import UserError

# The metric keys the doctor reads (docs/metrics.md). `eval/judge_*` appear only on iterations where a held-out
# evaluation ran; `policy/entropy`, `policy/clipfrac`, `policy/approx_kl` and `loss/value` only where the driver
# logs them.
SCORE = "reward/score_mean"
TOTAL = "reward/total_mean"
JUDGE = "eval/judge_mean"
JUDGE_SEM = "eval/judge_sem"
LENGTH = "response/length_mean"
ENTROPY = "policy/entropy"
KL = "kl/mean"
CLIPFRAC = "policy/clipfrac"
APPROX_KL = "policy/approx_kl"
VALUE_LOSS = "loss/value"
MISMATCH = "rollout/logprob_diff"
AT_CLIP = "reward/clip_frac"
WATCHED = (SCORE, TOTAL, JUDGE, JUDGE_SEM, LENGTH, ENTROPY, KL, CLIPFRAC, APPROX_KL, VALUE_LOSS, MISMATCH, AT_CLIP)
SHARE = re.compile(r"reward/(.+)_share")
"""`reward/<component>_share`, logged per reward component when the reward is a weighted sum of several."""


# ------------------------------------------------------------------------------------------- statistics (pure)


def two_proportion_z(k1: int, n1: int, k2: int, n2: int) -> float:
    """z = (p̂₂ − p̂₁) / √(p̄(1 − p̄)(1/n₁ + 1/n₂)), p̂ᵢ = kᵢ/nᵢ, p̄ = (k₁ + k₂)/(n₁ + n₂): the pooled two-proportion
    test of H₀ p₁ = p₂ (positive when the second proportion is larger). 0 when p̄ is 0 or 1 (no variation)."""
    pooled = (k1 + k2) / (n1 + n2)
    var = pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)
    if var <= 0.0:
        return 0.0
    return (k2 / n2 - k1 / n1) / math.sqrt(var)


def welch_t(a: list[float], b: list[float]) -> float:
    """t = (mean b − mean a) / √(s²_a/n_a + s²_b/n_b) (Welch): positive when b is larger. Both need ≥ 2 values;
    with zero spread the difference is infinitely significant (±inf), or 0 when the means are equal."""
    diff = statistics.fmean(b) - statistics.fmean(a)
    se2 = statistics.variance(a) / len(a) + statistics.variance(b) / len(b)
    if se2 <= 0.0:
        return 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
    return diff / math.sqrt(se2)


def slope_t(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope b of y on x and its t statistic b / se(b), se(b)² = Σr²/(n − 2) / Σ(x − x̄)². Needs
    n ≥ 3 distinct x. A perfect fit gives t = ±inf (0 for a flat line)."""
    n = len(xs)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    ssr = sum((y - my - b * (x - mx)) ** 2 for x, y in zip(xs, ys))
    se2 = ssr / (n - 2) / sxx
    if se2 <= 1e-300:
        return b, 0.0 if b == 0.0 else math.copysign(math.inf, b)
    return b, b / math.sqrt(se2)


_WORD = re.compile(r"\w+(?:'\w+)*")


def words(text: str) -> list[str]:
    """Lower-cased words (runs of letters, digits and underscores, with inner apostrophes)."""
    return _WORD.findall(text.lower())


def ngrams(ws: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]


def repeats(text: str, n: int) -> bool:
    """Whether some word n-gram occurs at least twice in `text` ("hope hope" repeats at n = 1)."""
    grams = ngrams(words(text), n)
    return len(set(grams)) < len(grams)


def distinct_n(texts: list[str], n: int) -> float | None:
    """distinct-n (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation Models"):
    distinct word n-grams / all word n-grams over the batch. None when the batch has no n-gram."""
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else None


def text_metrics(responses: list[str], ns: list[int]) -> dict[str, float]:
    """`response/repeat_<n>gram_frac` (fraction of responses that repeat a word n-gram) for each n in `ns`, and
    `response/distinct_1`, `response/distinct_2` where the batch has n-grams."""
    out = {f"response/repeat_{n}gram_frac": sum(repeats(r, n) for r in responses) / len(responses) for n in ns}
    for n in (1, 2):
        d = distinct_n(responses, n)
        if d is not None:
            out[f"response/distinct_{n}"] = d
    return out


# ------------------------------------------------------------------------------------------- findings


@dataclass
class Finding:
    """One fired diagnostic."""

    name: str
    """The diagnostic (one of DIAGNOSTICS)."""
    iteration: int
    """Iteration at which it fired."""
    first: int
    """First iteration of the evidence (start of the early window, or of the compared span)."""
    last: int
    """Last iteration of the evidence."""
    message: str
    """One line: what happened, with the numbers and the threshold."""
    metrics: list[str]
    """Metric keys that show it (the report plots them)."""
    evidence: dict[str, float]
    """The numbers the rule compared (window means, statistics, thresholds)."""
    windows: list[list[int]] = field(default_factory=list)
    """The compared windows as [first, last] iteration ranges (early and recent, or the one recent window)."""
    examples: list[dict[str, str]] = field(default_factory=list)
    """Up to `examples` responses of the firing iteration, as {"prompt", "response"}."""
    stop: bool = False
    """The diagnostic is in `stop_on`: the run should stop."""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Finding:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


class Fired(NamedTuple):
    """What a rule returns when it fires; the doctor adds the iteration, examples and stop flag."""

    first: int
    last: int
    message: str
    metrics: list[str]
    evidence: dict[str, float]
    windows: list[list[int]]


def _span(points: list) -> list[int]:
    return [points[0][0], points[-1][0]]


class Checkup(NamedTuple):
    """What `Doctor.observe` returns for one iteration."""

    metrics: dict[str, float]
    """To merge into the iteration's metrics before logging: response-text metrics and `doctor/<name>` flags."""
    findings: list[Finding]
    """Findings that fired at this iteration (each diagnostic fires once per run)."""

    @property
    def stops(self) -> list[Finding]:
        """The new findings of diagnostics in `stop_on`."""
        return [f for f in self.findings if f.stop]


class DoctorStop(UserError):
    """A diagnostic in `doctor.stop_on` fired; the run stops (after its checkpoint, so it can be inspected)."""

    def __init__(self, findings: list[Finding]):
        self.findings = findings
        names = ", ".join(f.name for f in findings)
        super().__init__(
            f"stopped by the RL doctor ({names} is in doctor.stop_on): " + "; ".join(f.message for f in findings)
        )


# ------------------------------------------------------------------------------------------- history


Points = list[tuple[int, float]]
"""(iteration, value) in iteration order."""


@dataclass
class History:
    """What the rules read: each watched metric's finite values, and per-iteration repetition counts."""

    series: dict[str, Points] = field(default_factory=dict)
    repeat_counts: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)
    """n → (iteration, responses that repeat an n-gram, responses) per iteration with responses."""

    def get(self, key: str) -> Points:
        return self.series.get(key, [])


def _mean(points: Points) -> float:
    return statistics.fmean(v for _, v in points)


def _values(points: Points) -> list[float]:
    return [v for _, v in points]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def check_reward_vs_judge(h: History, c: DoctorConfig) -> Fired | None:
    """The latest judge evaluation is below the best earlier one by ≥ judge_min_drop (and ≥ z·√(se₁² + se₂²) when
    `eval/judge_sem` is logged), while the reward's mean over the `window` iterations up to the latest evaluation is
    above its mean over the `window` iterations up to the best one (Welch t ≥ z)."""
    judge = h.get(JUDGE)
    if len(judge) < 2:
        return None
    last_it, last = judge[-1]
    best_it, best = max(judge[:-1], key=lambda p: p[1])
    drop = best - last
    sems = dict(h.get(JUDGE_SEM))
    needed = c.judge_min_drop
    if best_it in sems and last_it in sems:
        needed = max(needed, c.z * math.sqrt(sems[best_it] ** 2 + sems[last_it] ** 2))
    if drop < needed or drop <= 0:
        return None
    score = h.get(SCORE)
    at_best = [p for p in score if p[0] <= best_it][-c.window :]
    at_last = [p for p in score if best_it < p[0] <= last_it][-c.window :]
    if len(at_best) < 2 or len(at_last) < 2:
        return None
    t = welch_t(_values(at_best), _values(at_last))
    if t < c.z:
        return None
    rb, rl = _mean(at_best), _mean(at_last)
    return Fired(
        best_it,
        last_it,
        f"reward_vs_judge: the held-out judge fell from {best:.3f} (iteration {best_it}) to {last:.3f} (iteration "
        f"{last_it}) while the reward rose from {rb:.3f} to {rl:.3f} (t = {t:.1f} ≥ {c.z:g}): the policy is "
        "optimising the reward at the expense of what the judge measures",
        [JUDGE, SCORE],
        {
            "judge_best": best,
            "judge_last": last,
            "judge_drop": drop,
            "drop_needed": needed,
            "reward_at_best": rb,
            "reward_at_last": rl,
            "t_reward": t,
        },
        [_span(at_best), _span(at_last)],
    )


def check_reward_vs_total(h: History, c: DoctorConfig) -> Fired | None:
    """Over the last `trend_window` iterations with both values, the least-squares slope of `reward/score_mean` has
    t ≥ z and that of `reward/total_mean` (the KL-corrected reward PPO maximises) has t ≤ −z."""
    total = dict(h.get(TOTAL)[-2 * c.trend_window :])
    both = [(it, v, total[it]) for it, v in h.get(SCORE)[-2 * c.trend_window :] if it in total][-c.trend_window :]
    if len(both) < c.trend_window:
        return None
    xs = [float(it) for it, _, _ in both]
    b_score, t_score = slope_t(xs, [s for _, s, _ in both])
    b_total, t_total = slope_t(xs, [t for _, _, t in both])
    if t_score < c.z or t_total > -c.z:
        return None
    first, last = both[0][0], both[-1][0]
    return Fired(
        first,
        last,
        f"reward_vs_total: over iterations {first}–{last} the reward rose ({b_score:+.3g}/iteration, t = "
        f"{t_score:.1f}) while the KL-corrected reward fell ({b_total:+.3g}/iteration, t = {t_total:.1f}): the KL "
        "penalty grows faster than the reward, the policy is moving away from the reference for little gain",
        [SCORE, TOTAL, KL],
        {"slope_reward": b_score, "t_reward": t_score, "slope_total": b_total, "t_total": t_total},
        [[first, last]],
    )


def _ratio_rule(points: Points, c: DoctorConfig) -> tuple[Points, Points, float, float] | None:
    """(early window, recent window, recent/early mean ratio, Welch t) once there are 2 × window points."""
    if len(points) < 2 * c.window:
        return None
    early, recent = points[: c.window], points[-c.window :]
    base = _mean(early)
    if base <= 0:
        return None
    return early, recent, _mean(recent) / base, welch_t(_values(early), _values(recent))


def check_length_drift(h: History, c: DoctorConfig) -> Fired | None:
    """Recent mean `response/length_mean` ≥ length_max_ratio × the early mean with t ≥ z, or ≤ length_min_ratio ×
    with t ≤ −z."""
    r = _ratio_rule(h.get(LENGTH), c)
    if r is None:
        return None
    early, recent, ratio, t = r
    rising = ratio >= c.length_max_ratio and t >= c.z
    falling = ratio <= c.length_min_ratio and t <= -c.z
    if not (rising or falling):
        return None
    bound = c.length_max_ratio if rising else c.length_min_ratio
    return Fired(
        early[0][0],
        recent[-1][0],
        f"length_drift: mean response length {'rose' if rising else 'fell'} from {_mean(early):.1f} tokens "
        f"(iterations {early[0][0]}–{early[-1][0]}) to {_mean(recent):.1f} (iterations {recent[0][0]}–"
        f"{recent[-1][0]}), ×{ratio:.2f} (bound ×{bound:g}, t = {t:.1f}): the reward may be paying for length",
        [LENGTH],
        {"early_mean": _mean(early), "recent_mean": _mean(recent), "ratio": ratio, "t": t, "bound": bound},
        [_span(early), _span(recent)],
    )


def _response_window(counts: list[tuple[int, int, int]], c: DoctorConfig, from_end: bool) -> list:
    """At least `window` iterations and `min_window_responses` responses, from the start or from the end."""
    seq = counts[::-1] if from_end else counts
    out, total = [], 0
    for row in seq:
        out.append(row)
        total += row[2]
        if len(out) >= c.window and total >= c.min_window_responses:
            return out[::-1] if from_end else out
    return []


def check_repetition(h: History, c: DoctorConfig) -> Fired | None:
    """For each n: the fraction of responses that repeat a word n-gram, early window vs recent window (each at least
    `window` iterations and `min_window_responses` responses, not overlapping): two-proportion z ≥ z, a rise of at
    least repeat_min_rise, and at least repeat_min_count repeating responses in the recent window."""
    for n in c.repeat_ngrams:
        counts = h.repeat_counts.get(n, [])
        early = _response_window(counts, c, from_end=False)
        recent = _response_window(counts, c, from_end=True)
        if not early or not recent or recent[0][0] <= early[-1][0]:
            continue
        k1, n1 = sum(r[1] for r in early), sum(r[2] for r in early)
        k2, n2 = sum(r[1] for r in recent), sum(r[2] for r in recent)
        z = two_proportion_z(k1, n1, k2, n2)
        rise = k2 / n2 - k1 / n1
        if z < c.z or rise < c.repeat_min_rise or k2 < c.repeat_min_count:
            continue
        what = "a word" if n == 1 else f"a {n}-word phrase"
        return Fired(
            early[0][0],
            recent[-1][0],
            f"repetition: responses that repeat {what} rose from {_pct(k1 / n1)} ({k1}/{n1}, iterations "
            f"{early[0][0]}–{early[-1][0]}) to {_pct(k2 / n2)} ({k2}/{n2}, iterations {recent[0][0]}–"
            f"{recent[-1][0]}); z = {z:.1f} ≥ {c.z:g}: the reward may be paying for repeats",
            [f"response/repeat_{n}gram_frac"],
            {
                "n": n,
                "early_frac": k1 / n1,
                "early_count": k1,
                "early_responses": n1,
                "recent_frac": k2 / n2,
                "recent_count": k2,
                "recent_responses": n2,
                "rise": rise,
                "z": z,
            },
            [_span(early), _span(recent)],
        )
    return None


def check_entropy_collapse(h: History, c: DoctorConfig) -> Fired | None:
    """Recent mean `policy/entropy` ≤ entropy_min_ratio × the early mean, with t ≤ −z."""
    r = _ratio_rule(h.get(ENTROPY), c)
    if r is None:
        return None
    early, recent, ratio, t = r
    if ratio > c.entropy_min_ratio or t > -c.z:
        return None
    return Fired(
        early[0][0],
        recent[-1][0],
        f"entropy_collapse: policy entropy fell from {_mean(early):.3f} nats/token (iterations {early[0][0]}–"
        f"{early[-1][0]}) to {_mean(recent):.3f} (iterations {recent[0][0]}–{recent[-1][0]}), ×{ratio:.2f} "
        f"(bound ×{c.entropy_min_ratio:g}): the policy has stopped exploring",
        [ENTROPY],
        {"early_mean": _mean(early), "recent_mean": _mean(recent), "ratio": ratio, "t": t},
        [_span(early), _span(recent)],
    )


def _bound_rule(points: Points, bound: float, c: DoctorConfig) -> tuple[Points, float] | None:
    if len(points) < c.window:
        return None
    recent = points[-c.window :]
    m = _mean(recent)
    return (recent, m) if m >= bound else None


def _bound_finding(h: History, key: str, bound: float, c: DoctorConfig, shown: list[str], say) -> Fired | None:
    """A finding when the recent window's mean of `key` is at least `bound`; `say(mean, first, last)` words it."""
    r = _bound_rule(h.get(key), bound, c)
    if r is None:
        return None
    recent, m = r
    first, last = recent[0][0], recent[-1][0]
    return Fired(first, last, say(m, first, last), shown, {"recent_mean": m, "bound": bound}, [_span(recent)])


def check_kl_blowup(h: History, c: DoctorConfig) -> Fired | None:
    """Mean `kl/mean` over the recent window ≥ kl_max."""
    return _bound_finding(
        h, KL, c.kl_max, c, [KL],
        lambda m, a, b: f"kl_blowup: KL to the reference averaged {m:.2f} nats per response over iterations {a}–{b} "
        f"(bound {c.kl_max:g}): the policy is running away from the reference",
    )  # fmt: skip


def check_clipfrac_high(h: History, c: DoctorConfig) -> Fired | None:
    """Mean `policy/clipfrac` over the recent window ≥ clipfrac_max."""
    return _bound_finding(
        h, CLIPFRAC, c.clipfrac_max, c, [CLIPFRAC],
        lambda m, a, b: f"clipfrac_high: the policy clip fraction averaged {m:.3f} over iterations {a}–{b} "
        f"(bound {c.clipfrac_max:g}): each rollout is overtrained",
    )  # fmt: skip


def check_approx_kl_high(h: History, c: DoctorConfig) -> Fired | None:
    """Mean `policy/approx_kl` over the recent window ≥ approx_kl_max."""
    return _bound_finding(
        h, APPROX_KL, c.approx_kl_max, c, [APPROX_KL, CLIPFRAC],
        lambda m, a, b: f"approx_kl_high: the policy moved {m:.4f} nats/token (approx. KL) within each update over "
        f"iterations {a}–{b} (bound {c.approx_kl_max:g}): the updates are too large",
    )  # fmt: skip


def check_value_loss_rising(h: History, c: DoctorConfig) -> Fired | None:
    """Mean `loss/value` over the recent window ≥ value_loss_max_ratio × the lowest mean of a `window`-iteration
    window that ends before the recent one starts."""
    points = h.get(VALUE_LOSS)
    if len(points) < 2 * c.window:
        return None
    recent = points[-c.window :]
    earlier = points[: -c.window]
    sums = [0.0, *itertools.accumulate(v for _, v in earlier)]  # window means from prefix sums: O(n) per check
    means = [((sums[i + c.window] - sums[i]) / c.window, i) for i in range(len(earlier) - c.window + 1)]
    low, i = min(means)
    m = _mean(recent)
    if low <= 0 or m < c.value_loss_max_ratio * low:
        return None
    low_first, low_last = earlier[i][0], earlier[i + c.window - 1][0]
    return Fired(
        low_first,
        recent[-1][0],
        f"value_loss_rising: the critic loss averaged {m:.4g} over iterations {recent[0][0]}–{recent[-1][0]}, "
        f"×{m / low:.1f} its lowest ({low:.4g}, iterations {low_first}–{low_last}; bound ×{c.value_loss_max_ratio:g}):"
        " the critic cannot keep up with the returns",
        [VALUE_LOSS],
        {"recent_mean": m, "lowest_mean": low, "ratio": m / low},
        [[low_first, low_last], _span(recent)],
    )


def check_logprob_mismatch(h: History, c: DoctorConfig) -> Fired | None:
    """Recent mean `rollout/logprob_diff` ≥ mismatch_min and ≥ mismatch_max_ratio × the early mean, with t ≥ z."""
    points = h.get(MISMATCH)
    if len(points) < 2 * c.window:
        return None
    early, recent = points[: c.window], points[-c.window :]
    base, m = _mean(early), _mean(recent)
    t = welch_t(_values(early), _values(recent))
    if m < c.mismatch_min or m < c.mismatch_max_ratio * base or t < c.z:
        return None
    ratio = m / base if base > 0 else math.inf
    return Fired(
        early[0][0],
        recent[-1][0],
        f"logprob_mismatch: the trainer and the rollout engine disagree by {m:.3g} nats/token (iterations "
        f"{recent[0][0]}–{recent[-1][0]}), up from {base:.3g} (iterations {early[0][0]}–{early[-1][0]}; bound "
        f"×{c.mismatch_max_ratio:g} and ≥ {c.mismatch_min:g}, t = {t:.1f}): the rollouts come from other weights or "
        "numerics than the ones trained — check the weight sync (docs/rollout.md)",
        [MISMATCH, "rollout/logprob_diff_max"],
        {"early_mean": base, "recent_mean": m, "ratio": ratio, "t": t},
        [_span(early), _span(recent)],
    )


def check_reward_dominance(h: History, c: DoctorConfig) -> Fired | None:
    """With two or more reward components: one component's mean `reward/<name>_share` over the recent window ≥
    dominance_max."""
    shares = {m.group(1): h.get(k) for k in h.series if (m := SHARE.fullmatch(k))}
    if len(shares) < 2:
        return None
    for name, points in shares.items():
        r = _bound_rule(points, c.dominance_max, c)
        if r is None:
            continue
        recent, m = r
        others = {n: _mean(p[-c.window :]) for n, p in shares.items() if n != name and p}
        rest = ", ".join(f"{n} {v:.2f}" for n, v in others.items())
        first, last = recent[0][0], recent[-1][0]
        return Fired(
            first,
            last,
            f"reward_dominance: reward component '{name}' makes {_pct(m)} of the weighted reward's spread over "
            f"iterations {first}–{last} (bound {_pct(c.dominance_max)}; the others: {rest}): the other components "
            "barely move the advantages — rescale the weights (reward_weights) or the component",
            [f"reward/{n}_share" for n in shares],
            {"share": m, "bound": c.dominance_max, **{f"share_{n}": v for n, v in others.items()}},
            [_span(recent)],
        )
    return None


def check_reward_at_clip(h: History, c: DoctorConfig) -> Fired | None:
    """Mean `reward/clip_frac` over the recent window ≥ clip_frac_max."""
    return _bound_finding(
        h, AT_CLIP, c.clip_frac_max, c, [AT_CLIP, SCORE],
        lambda m, a, b: f"reward_at_clip: {_pct(m)} of the responses scored at the reward clip over iterations "
        f"{a}–{b} (bound {_pct(c.clip_frac_max)}): the clip hides differences between them, and a policy pushing "
        "the reward model to its extremes is a sign of it being exploited",
    )  # fmt: skip


RULES = {
    "reward_vs_judge": check_reward_vs_judge,
    "reward_vs_total": check_reward_vs_total,
    "length_drift": check_length_drift,
    "repetition": check_repetition,
    "entropy_collapse": check_entropy_collapse,
    "kl_blowup": check_kl_blowup,
    "clipfrac_high": check_clipfrac_high,
    "approx_kl_high": check_approx_kl_high,
    "value_loss_rising": check_value_loss_rising,
    "logprob_mismatch": check_logprob_mismatch,
    "reward_dominance": check_reward_dominance,
    "reward_at_clip": check_reward_at_clip,
}
assert tuple(RULES) == DIAGNOSTICS


# ------------------------------------------------------------------------------------------- the doctor


class Doctor:
    """Runs the diagnostics once per RL iteration. Rank 0 (which holds the gathered rollout) calls `observe`;
    `state_dict` / `load_state_dict` carry it through checkpoints as plain JSON-safe data."""

    def __init__(self, cfg: DoctorConfig | None = None):
        self.cfg = cfg or DoctorConfig()
        self.history = History()
        self.findings: list[Finding] = []
        """Every finding so far, in firing order."""
        self.iteration = 0
        """The last observed iteration."""

    @property
    def active(self) -> list[str]:
        return [d for d in DIAGNOSTICS if d not in self.cfg.off] if self.cfg.enabled else []

    def observe(
        self,
        iteration: int,
        metrics: dict[str, float | None],
        responses: list[str] | None = None,
        prompts: list[str] | None = None,
    ) -> Checkup:
        """Record iteration `iteration` (its metrics, and its decoded responses with their prompts, one per
        response) and run the diagnostics. Re-observing an iteration (a resumed run, a duplicated metrics line)
        first forgets it and everything after it."""
        if not self.cfg.enabled:
            return Checkup({}, [])
        if prompts is not None and responses is not None and len(prompts) != len(responses):
            raise ValueError(f"doctor: {len(prompts)} prompts for {len(responses)} responses")
        if iteration <= self.iteration:
            self._forget_from(iteration)
        self.iteration = iteration
        for key in (*WATCHED, *(k for k in metrics if SHARE.fullmatch(k))):
            v = metrics.get(key)
            if v is not None and math.isfinite(v):
                self.history.series.setdefault(key, []).append((iteration, float(v)))
        out: dict[str, float] = {}
        if responses:
            out.update(text_metrics(responses, self.cfg.repeat_ngrams))
            for n in self.cfg.repeat_ngrams:
                k = sum(repeats(r, n) for r in responses)
                self.history.repeat_counts.setdefault(n, []).append((iteration, k, len(responses)))
        fired_names = {f.name for f in self.findings}
        new = []
        for name in self.active:
            if name in fired_names:
                continue
            hit = RULES[name](self.history, self.cfg)
            if hit is not None:
                new.append(self._finding(name, iteration, hit, responses, prompts))
        self.findings.extend(new)
        fired_names |= {f.name for f in new}
        out.update({f"doctor/{name}": float(name in fired_names) for name in self.active})
        return Checkup(out, new)

    def _finding(self, name, iteration, hit: Fired, responses, prompts) -> Finding:
        return Finding(
            name=name,
            iteration=iteration,
            first=hit.first,
            last=hit.last,
            message=hit.message,
            metrics=hit.metrics,
            evidence=hit.evidence,
            windows=hit.windows,
            examples=self._examples(name, hit, responses, prompts),
            stop=name in self.cfg.stop_on,
        )

    def _examples(self, name: str, hit: Fired, responses, prompts) -> list[dict[str, str]]:
        """Responses of the firing iteration that show the problem: repeating ones, the longest or shortest ones,
        otherwise the first ones."""
        if not responses or self.cfg.examples == 0:
            return []
        idx = list(range(len(responses)))
        if name == "repetition":
            idx = [i for i in idx if repeats(responses[i], int(hit.evidence["n"]))]
        elif name == "length_drift":
            idx.sort(key=lambda i: len(responses[i]), reverse=hit.evidence["ratio"] > 1)
        return [
            {"prompt": prompts[i] if prompts is not None else "", "response": responses[i]}
            for i in idx[: self.cfg.examples]
        ]

    def _forget_from(self, iteration: int) -> None:
        h = self.history
        for key, points in h.series.items():
            h.series[key] = [p for p in points if p[0] < iteration]
        for n, rows in h.repeat_counts.items():
            h.repeat_counts[n] = [r for r in rows if r[0] < iteration]
        self.findings = [f for f in self.findings if f.iteration < iteration]

    # ---- checkpoints and doctor.json

    def state_dict(self) -> dict:
        """Plain JSON-safe state: the watched series, the repetition counts and the findings."""
        return {
            "iteration": self.iteration,
            "series": {k: [list(p) for p in v] for k, v in self.history.series.items()},
            "repeat_counts": {str(n): [list(r) for r in rows] for n, rows in self.history.repeat_counts.items()},
            "findings": [f.as_dict() for f in self.findings],
        }

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self.history = History(
            {k: [(int(i), float(v)) for i, v in pts] for k, pts in state["series"].items()},
            {int(n): [(int(i), int(k), int(t)) for i, k, t in rows] for n, rows in state["repeat_counts"].items()},
        )
        self.findings = [Finding.from_dict(d) for d in state["findings"]]

    def to_json(self) -> dict:
        """The content of `rl/doctor.json` (docs/report.md): format version, config, findings and state."""
        return {
            "format": 1,
            "iteration": self.iteration,
            "config": dataclasses.asdict(self.cfg),
            "diagnostics": self.active,
            "findings": [f.as_dict() for f in self.findings],
            "state": self.state_dict(),
        }

    def write(self, path: Path) -> None:
        """Write `to_json()` to `path` (usually `<rl run dir>/doctor.json`) atomically."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n", encoding="utf-8")
        tmp.replace(path)


def replay(
    lines: list[dict],
    samples: dict[int, list[tuple[str, str]]] | None = None,
    cfg: DoctorConfig | None = None,
) -> Doctor:
    """A doctor fed after the fact: `lines` are metrics.jsonl lines (one per logged iteration, in step order),
    `samples` maps an iteration to its (prompt, response) pairs (e.g. rl/samples.jsonl). Windows then count logged
    lines rather than iterations, so the result approximates what the driver's doctor saw."""
    doctor = Doctor(cfg)
    samples = samples or {}
    for line in lines:
        it = int(line["step"])
        pairs = samples.get(it)
        doctor.observe(
            it,
            {k: v for k, v in line.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
            [r for _, r in pairs] if pairs else None,
            [p for p, _ in pairs] if pairs else None,
        )
    return doctor
