"""The comparison statistics: Student-t quantiles, intervals and the paired difference."""

from __future__ import annotations

import math
import statistics

import pytest

from chatrlhf.eval.compare import PolicySamples, compare, mean_ci, t_quantile_975

# Standard table values of t_{0.975, df}.
T_TABLE = {1: 12.7062, 2: 4.3027, 5: 2.5706, 10: 2.2281, 24: 2.0639, 100: 1.9840}


@pytest.mark.parametrize("df, expected", sorted(T_TABLE.items()))
def test_t_quantile_matches_tables(df, expected):
    assert t_quantile_975(df) == pytest.approx(expected, abs=2e-4)


def test_mean_ci_by_hand():
    xs = [1.0, 2.0, 4.0, 7.0]
    ci = mean_ci(xs)
    half = 3.1824 * statistics.stdev(xs) / 2.0  # t_{0.975,3} = 3.1824
    assert (
        ci.mean == 3.5
        and ci.low == pytest.approx(3.5 - half, abs=1e-3)
        and ci.high == pytest.approx(3.5 + half, abs=1e-3)
    )
    single = mean_ci([2.0]).as_dict()
    assert single["ci95"] is None and single["mean"] == 2.0


def test_compare_pairs_prompts():
    base = PolicySamples(
        texts=[["a"], ["b"], ["c"]],
        rm_scores=[[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]],
        judge_scores=[[0.0, 0.5], [0.5, 0.5], [0.0, 1.0]],
    )
    new = PolicySamples(
        texts=[["a"], ["b"], ["c"]],
        rm_scores=[[1.0, 1.0], [2.0, 2.0], [1.0, 0.0]],
        judge_scores=[[1.0, 1.0], [1.0, 0.5], [0.5, 1.0]],
    )
    report = compare(base, new)
    diffs = [0.75, 0.25, 0.25]  # per-prompt judge means: new (1, .75, .75) − base (.25, .5, .5)
    d = report["judge"]["rlhf_minus_sft"]
    assert d["mean"] == pytest.approx(statistics.fmean(diffs)) and d["n"] == 3
    half = 4.3027 * statistics.stdev(diffs) / math.sqrt(3)
    assert d["ci95"][0] == pytest.approx(statistics.fmean(diffs) - half, abs=1e-3)
    assert report["judge"]["rlhf_better"] is (d["ci95"][0] > 0)
    assert report["reward_model"]["rlhf_minus_sft"]["mean"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)


def test_compare_without_a_reward_model_reports_the_judge_only():
    base = PolicySamples(texts=[["a"], ["b"]], rm_scores=None, judge_scores=[[0.0], [0.5]])
    new = PolicySamples(texts=[["a"], ["b"]], rm_scores=None, judge_scores=[[1.0], [0.5]])
    report = compare(base, new)
    assert set(report) == {"judge"}
    assert report["judge"]["rlhf_minus_sft"]["mean"] == pytest.approx(0.5)


def text_judge(prompt, response, **fields):
    return "0.5"


def nan_judge(prompt, response, **fields):
    return math.nan


@pytest.mark.parametrize(
    "judge, error, pattern",
    [
        (
            text_judge,
            "UserError",
            r"judge '(tests\.)?test_eval:text_judge' returned str '0\.5' for prompt 'Hi'; expected a",
        ),
        (nan_judge, "FloatingPointError", r"judge '(tests\.)?test_eval:nan_judge' returned nan for prompt 'Hi'"),
    ],
)
def test_judge_gets_the_checks_of_a_reward_function(judge, error, pattern, tiny_dirs):
    """A judge's value is never counted unless it is a finite number: the same checks as a reward function's."""
    import torch
    from transformers import AutoModelForCausalLM

    from chatrlhf.config import GenerationConfig
    from chatrlhf.engine.generation import HFGenerator
    from chatrlhf.errors import UserError
    from chatrlhf.eval.compare import sample_and_score
    from chatrlhf.models.load import load_tokenizer

    tok = load_tokenizer(str(tiny_dirs["llama"]))
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], dtype=torch.float32)
    expected = {"UserError": UserError, "FloatingPointError": FloatingPointError}[error]
    with pytest.raises(expected, match=pattern):
        sample_and_score(
            HFGenerator(model, tok, GenerationConfig(max_new_tokens=2)),
            tok,
            [[72, 105]],
            samples=1,
            batch_size=1,
            seed=0,
            judge=judge,
            texts=["Hi"],
            extras=[{}],
        )
