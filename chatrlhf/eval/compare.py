"""Side-by-side evaluation of two policies (SFT vs RLHF) on the same held-out prompts.

For each prompt, each model samples `k` responses with the rollout sampling settings; every response is scored
by the reward model and, if given, by a programmatic judge. Per-prompt means are compared pairwise:
d_i = mean_judge(RLHF, prompt i) − mean_judge(SFT, prompt i); the report gives mean(d) with a 95% confidence
interval mean ± t_{0.975, n−1}·sd(d)/√n. "RLHF beats SFT" means that interval lies above zero.
"""

from __future__ import annotations

import importlib
import math
import statistics
from dataclasses import dataclass
from typing import Callable

import torch

from chatrlhf.config import GenerationConfig
from chatrlhf.data.collate import pad
from chatrlhf.engine.hybrid import sampling_config
from chatrlhf.errors import UserError
from chatrlhf.rlhf import truncate_after_eos


def load_function(spec: str) -> Callable:
    """`package.module:function` → the function."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise UserError(f"'{spec}': expected module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"'{spec}': cannot import: {e}") from None
    if not callable(fn):
        raise UserError(f"'{spec}': not a function")
    return fn


def t_quantile_975(df: int) -> float:
    """Student-t 0.975 quantile (Cornish–Fisher expansion around the normal; error < 1e-3 for df ≥ 5)."""
    z = statistics.NormalDist().inv_cdf(0.975)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / df + g2 / df**2 + g3 / df**3


@dataclass
class MeanCI:
    mean: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict:
        return {"mean": self.mean, "ci95": [self.low, self.high], "n": self.n}


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
    rm_scores: list[list[float]]
    judge_scores: list[list[float]] | None


@torch.no_grad()
def sample_and_score(
    model, tok, reward_model, prompts: list[list[int]], k: int, gen: GenerationConfig, batch_size: int, seed: int,
    judge: Callable | None, prompt_texts: list[str], extras: list[dict],
) -> PolicySamples:
    """k sampled responses per prompt, scored by the reward model and the judge."""
    from chatrlhf.train.rl import Rollout, end_scores  # the same end score the RL stage optimises

    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    config = sampling_config(tok, gen)
    device = next(model.parameters()).device
    texts: list[list[str]] = [[] for _ in prompts]
    rm: list[list[float]] = [[] for _ in prompts]
    flat = [i for i in range(len(prompts)) for _ in range(k)]
    for b0 in range(0, len(flat), batch_size):
        idx = flat[b0 : b0 + batch_size]
        ids, mask = (x.to(device) for x in pad([prompts[i] for i in idx], tok.pad_token_id, left=True))
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1] :]
        response, rmask = truncate_after_eos(out, tok.eos_token_id, tok.pad_token_id)
        scores = end_scores(reward_model, Rollout(ids, mask, response, rmask))
        for j, i in enumerate(idx):
            n = int(rmask[j].sum())
            texts[i].append(tok.decode(response[j, :n], skip_special_tokens=True).strip())
            rm[i].append(float(scores[j]))
    model.train(was_training)
    judged = None
    if judge is not None:
        judged = [[float(judge(prompt_texts[i], r, **extras[i])) for r in texts[i]] for i in range(len(prompts))]
    return PolicySamples(texts, rm, judged)


def compare(base: PolicySamples, new: PolicySamples) -> dict:
    """Per-model means with CIs and the paired difference (new − base), for the RM score and the judge."""
    report: dict = {}
    kinds = [("reward_model", "rm_scores")] + ([("judge", "judge_scores")] if base.judge_scores else [])
    for name, attr in kinds:
        b = [statistics.fmean(x) for x in getattr(base, attr)]
        n = [statistics.fmean(x) for x in getattr(new, attr)]
        diff = mean_ci([y - x for x, y in zip(b, n)])
        report[name] = {
            "sft": mean_ci(b).as_dict(),
            "rlhf": mean_ci(n).as_dict(),
            "rlhf_minus_sft": diff.as_dict(),
            "rlhf_better": diff.low > 0,
        }
    return report
