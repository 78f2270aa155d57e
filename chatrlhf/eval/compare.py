"""Models side by side on the same prompts: the one evaluation path of `chatrlhf eval` and of the pipeline's final
SFT-vs-RLHF comparison.

For each prompt, each model samples `k` responses through its `Generator` (its fixed sampling settings); every
response is scored by each score source — a reward model and Python judge or verifier functions, the same sources
RL rewards with (models/rewards.py), so a function that raises or returns no finite number stops the evaluation
as it stops RL (`call_score`). Scores are compared per prompt, prompts being the independent units:

- per model: the mean over prompts of the per-prompt mean score, with a 95% t-interval;
- per pair of models (A, B), in the order given: d_i = mean(B, prompt i) − mean(A, prompt i), reported as mean(d)
  ± t_{0.975, n−1}·sd(d)/√n ("B better" when that interval lies above zero), and B's win rate over A, the mean over
  prompts of P(a random sample of B scores above one of A), ties half (eval/stats.py);
- per model and verifier: pass@k for each k, the unbiased estimate of Chen et al. (2021) per prompt, averaged.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from chatrlhf.data.collate import pad
from chatrlhf.engine.generation import Generator
from chatrlhf.eval.stats import MeanCI, mean_ci, pass_at_k, t_quantile_975, win_rate
from chatrlhf.models.rewards import RewardSource, ScoringBatch
from chatrlhf.rlhf import last_token_index

__all__ = [
    "MeanCI",
    "ModelSamples",
    "compare",
    "compare_models",
    "mean_ci",
    "pipeline_view",
    "sample_and_score",
    "t_quantile_975",
]


@dataclass
class ModelSamples:
    """One model's responses to the prompts, and their scores."""

    texts: list[list[str]]
    """[prompt][sample] decoded responses."""
    scores: dict[str, list[list[float]]]
    """Score source name → [prompt][sample] scores."""


@torch.no_grad()
def sample_and_score(
    generator: Generator,
    tok,
    prompts: list[list[int]],
    *,
    samples: int,
    batch_size: int,
    seed: int,
    sources: list[RewardSource],
    texts: list[str],
    extras: list[dict],
    device: torch.device,
) -> ModelSamples:
    """`samples` responses per prompt (token ids `prompts` in `tok`'s vocabulary, text `texts`, record fields
    `extras`) from `generator`, each scored by every source, as RL scores rollouts: a reward model on the prompt +
    response tokens at the last response token (or on the text, with its own tokenizer), functions on the text."""
    torch.manual_seed(seed)
    responses: list[list[str]] = [[] for _ in prompts]
    scores: dict[str, list[list[float]]] = {s.name: [[] for _ in prompts] for s in sources}
    flat = [i for i in range(len(prompts)) for _ in range(samples)]
    for b0 in range(0, len(flat), batch_size):
        idx = flat[b0 : b0 + batch_size]
        out = generator.generate([prompts[i] for i in idx])
        lengths = out.mask.sum(1).long().tolist()
        decoded = [tok.decode(r[:n], skip_special_tokens=True).strip() for r, n in zip(out.tokens, lengths)]
        for i, text in zip(idx, decoded):
            responses[i].append(text)
        if not sources:
            continue
        ids, mask = (x.to(device) for x in pad([prompts[i] for i in idx], tok.pad_token_id, left=True))
        response, rmask = out.tokens.to(device), out.mask.to(device)
        batch = ScoringBatch(
            sequences=torch.cat([ids, response], 1),
            attention_mask=torch.cat([mask, rmask.long()], 1),
            last_index=ids.shape[1] + last_token_index(rmask),
            prompts=[texts[i] for i in idx],
            responses=decoded,
            extras=[extras[i] for i in idx],
        )
        for source in sources:
            for i, value in zip(idx, source.score(batch).tolist()):
                scores[source.name][i].append(float(value))
    return ModelSamples(responses, scores)


def compare_models(models: dict[str, ModelSamples], verifiers: dict[str, float] | None = None, ks=()) -> dict:
    """Means with intervals per model and score, each pair's paired difference and win rate, and pass@k of the
    `verifiers` (name → pass threshold) for each k in `ks`. `models` in the order pairs are formed: (A, B) for A
    before B."""
    names = list(models)
    report: dict = {"scores": {}, "pass_at_k": {}}
    for score in next(iter(models.values())).scores:
        per_prompt = {m: [statistics.fmean(x) for x in models[m].scores[score]] for m in names}
        pairs = []
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                diff = mean_ci([y - x for x, y in zip(per_prompt[a], per_prompt[b])])
                pairs.append(
                    {
                        "a": a,
                        "b": b,
                        "b_minus_a": diff.as_dict(),
                        "b_better": diff.n > 1 and diff.low > 0,
                        "b_win_rate": win_rate(models[b].scores[score], models[a].scores[score]).as_dict(),
                    }
                )
        report["scores"][score] = {"models": {m: mean_ci(per_prompt[m]).as_dict() for m in names}, "pairs": pairs}
    for verifier, threshold in (verifiers or {}).items():
        report["pass_at_k"][verifier] = {
            m: {
                f"pass@{k}": mean_ci(
                    [pass_at_k(len(x), sum(v >= threshold for v in x), k) for x in models[m].scores[verifier]]
                ).as_dict()
                for k in ks
            }
            for m in names
        }
    return report


def pipeline_view(report: dict) -> dict:
    """`compare_models`' report of two models named `sft` and `rlhf` in the pipeline summary's shape: per score
    source, `sft` and `rlhf` means, the paired `rlhf_minus_sft`, `rlhf_better`, and `rlhf_win_rate` (over SFT)."""
    out = {}
    for score, r in report["scores"].items():
        pair = r["pairs"][0]
        out[score] = {
            "sft": r["models"]["sft"],
            "rlhf": r["models"]["rlhf"],
            "rlhf_minus_sft": pair["b_minus_a"],
            "rlhf_better": pair["b_better"],
            "rlhf_win_rate": pair["b_win_rate"],
        }
    return out


def compare(base: ModelSamples, new: ModelSamples) -> dict:
    """Two models (the pipeline's SFT and tuned policy) compared, in the pipeline summary's shape."""
    return pipeline_view(compare_models({"sft": base, "rlhf": new}))


def write_samples(path: Path, texts: list[str], models: dict[str, ModelSamples]) -> None:
    """samples.jsonl: one row per prompt i and sample k, {"prompt", "sample": k, <model>: response, ...,
    "scores": {<model>: {<source>: score, ...}, ...}} (the run report's side-by-side table reads it)."""
    rows = []
    for i, prompt in enumerate(texts):
        for k in range(len(next(iter(models.values())).texts[i])):
            row: dict = {"prompt": prompt, "sample": k}
            row.update({m: s.texts[i][k] for m, s in models.items()})
            row["scores"] = {m: {name: v[i][k] for name, v in s.scores.items()} for m, s in models.items()}
            rows.append(row)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
