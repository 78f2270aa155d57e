"""Side-by-side evaluation of two policies (SFT vs RLHF, or SFT vs DPO) on the same held-out prompts.

For each prompt, each model samples `k` responses with the rollout sampling settings; every response is scored
by the reward model (where there is one: the DPO pipeline has none) and, if given, by a programmatic judge (a
judge that raises or returns no finite number stops the evaluation, as a reward function stops RL: `call_score`).
Per-prompt means are compared pairwise: d_i = mean_judge(RLHF, prompt i) − mean_judge(SFT, prompt i); the report
gives mean(d) with a 95% confidence interval mean ± t_{0.975, n−1}·sd(d)/√n. "RLHF beats SFT" means that
interval lies above zero.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable

import torch

from chatrlhf.data.collate import pad
from chatrlhf.engine.generation import Generator
from chatrlhf.models.rewards import call_score
from chatrlhf.rlhf import last_token_index


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
    """Mean with a 95% t-interval."""
    n = len(xs)
    mean = statistics.fmean(xs)
    if n < 2:
        return MeanCI(mean, -math.inf, math.inf, n)
    half = t_quantile_975(n - 1) * statistics.stdev(xs) / math.sqrt(n)
    return MeanCI(mean, mean - half, mean + half, n)


@dataclass
class PolicySamples:
    texts: list[list[str]]
    """[prompt][sample] decoded responses."""
    rm_scores: list[list[float]] | None
    """[prompt][sample] reward-model end scores; None without a reward model (the DPO pipeline)."""
    judge_scores: list[list[float]] | None


@torch.no_grad()
def sample_and_score(
    generator: Generator,
    tok,
    prompts: list[list[int]],
    *,
    samples: int,
    batch_size: int,
    seed: int,
    reward_model=None,
    judge: Callable | None = None,
    texts: list[str],
    extras: list[dict],
) -> PolicySamples:
    """`samples` responses per prompt (token ids `prompts`, text `texts`, record fields `extras`) sampled by
    `generator`, scored by the reward model and the judge (each optional: None skips it)."""
    torch.manual_seed(seed)
    responses: list[list[str]] = [[] for _ in prompts]
    rm: list[list[float]] | None = [[] for _ in prompts] if reward_model is not None else None
    flat = [i for i in range(len(prompts)) for _ in range(samples)]
    for b0 in range(0, len(flat), batch_size):
        idx = flat[b0 : b0 + batch_size]
        out = generator.generate([prompts[i] for i in idx])
        response, rmask = out.tokens, out.mask
        for j, i in enumerate(idx):
            n = int(rmask[j].sum())
            responses[i].append(tok.decode(response[j, :n], skip_special_tokens=True).strip())
        if rm is not None:
            # the reward model's end score at the last real response token, as the RL stage scores it
            device = next(reward_model.parameters()).device
            ids, mask = (x.to(device) for x in pad([prompts[i] for i in idx], tok.pad_token_id, left=True))
            response, rmask = response.to(device), rmask.to(device)
            seqs, attn = torch.cat([ids, response], 1), torch.cat([mask, rmask.long()], 1)
            scores = reward_model.scores_at(seqs, attn, ids.shape[1] + last_token_index(rmask))
            for j, i in enumerate(idx):
                rm[i].append(float(scores[j]))
    judged = None
    if judge is not None:
        what = f"judge '{judge.__module__}:{getattr(judge, '__qualname__', type(judge).__name__)}'"
        judged = [[call_score(judge, what, texts[i], r, extras[i]) for r in responses[i]] for i in range(len(prompts))]
    return PolicySamples(responses, rm, judged)


def compare(base: PolicySamples, new: PolicySamples) -> dict:
    """Per-model means with CIs and the paired difference (new − base), for the RM score and the judge (each
    where both samples have it)."""
    report: dict = {}
    kinds = [
        (name, attr)
        for name, attr in (("reward_model", "rm_scores"), ("judge", "judge_scores"))
        if getattr(base, attr) is not None and getattr(new, attr) is not None
    ]
    for name, attr in kinds:
        b = [statistics.fmean(x) for x in getattr(base, attr)]
        n = [statistics.fmean(x) for x in getattr(new, attr)]
        diff = mean_ci([y - x for x, y in zip(b, n)])
        report[name] = {
            "sft": mean_ci(b).as_dict(),
            "rlhf": mean_ci(n).as_dict(),
            "rlhf_minus_sft": diff.as_dict(),
            "rlhf_better": math.isfinite(diff.low) and diff.low > 0,
        }
    return report
