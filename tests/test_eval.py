"""The comparison statistics: Student-t quantiles, intervals, the paired difference and win rate, pass@k, score
distributions — each against a hand computation or a brute-force count."""

from __future__ import annotations

import math
import statistics

import pytest

from chatrlhf.eval.compare import ModelSamples, compare, compare_models, mean_ci, t_quantile_975
from chatrlhf.eval.stats import distribution, pass_at_k, win_probability

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
    base = ModelSamples(
        texts=[["a"], ["b"], ["c"]],
        scores={"reward_model": [[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]], "judge": [[0.0, 0.5], [0.5, 0.5], [0.0, 1.0]]},
    )
    new = ModelSamples(
        texts=[["a"], ["b"], ["c"]],
        scores={"reward_model": [[1.0, 1.0], [2.0, 2.0], [1.0, 0.0]], "judge": [[1.0, 1.0], [1.0, 0.5], [0.5, 1.0]]},
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
    base = ModelSamples(texts=[["a"], ["b"]], scores={"judge": [[0.0], [0.5]]})
    new = ModelSamples(texts=[["a"], ["b"]], scores={"judge": [[1.0], [0.5]]})
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
    from chatrlhf.models.rewards import FunctionReward

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
            sources=[FunctionReward(judge, "judge", f"{judge.__module__}:{judge.__name__}", role="judge")],
            texts=["Hi"],
            extras=[{}],
            device=torch.device("cpu"),
        )


def test_win_rate_counts_every_pair_of_samples_ties_half():
    # a = (1, 2) vs b = (0, 2): 1 > 0 wins, 1 < 2 loses, 2 > 0 wins, 2 = 2 ties → (1 + 0 + 1 + 0.5) / 4
    assert win_probability([1.0, 2.0], [0.0, 2.0]) == 0.625
    assert win_probability([3.0], [3.0]) == 0.5
    a = ModelSamples([["x"]] * 3, {"s": [[1.0, 2.0], [5.0, 5.0], [0.0, 0.0]]})
    b = ModelSamples([["x"]] * 3, {"s": [[0.0, 2.0], [1.0, 1.0], [1.0, 1.0]]})
    pair = compare_models({"a": a, "b": b})["scores"]["s"]["pairs"][0]
    assert (pair["a"], pair["b"]) == ("a", "b")
    wins = [1 - 0.625, 0.0, 1.0]  # b over a, per prompt
    assert pair["b_win_rate"]["mean"] == pytest.approx(statistics.fmean(wins))
    half = 4.3027 * statistics.stdev(wins) / math.sqrt(3)
    assert pair["b_win_rate"]["ci95"][1] == pytest.approx(statistics.fmean(wins) + half, abs=1e-3)


def test_three_models_give_every_pair_in_order():
    models = {m: ModelSamples([["x"]] * 2, {"s": [[float(i)], [float(i) + 1]]}) for i, m in enumerate("pqr")}
    pairs = compare_models(models)["scores"]["s"]["pairs"]
    assert [(p["a"], p["b"]) for p in pairs] == [("p", "q"), ("p", "r"), ("q", "r")]
    assert [p["b_minus_a"]["mean"] for p in pairs] == [1.0, 2.0, 1.0]


@pytest.mark.parametrize("n, c, k", [(4, 0, 1), (4, 1, 1), (4, 1, 2), (5, 2, 3), (6, 3, 4), (3, 3, 2), (6, 1, 6)])
def test_pass_at_k_is_the_share_of_k_subsets_with_a_pass(n, c, k):
    from itertools import combinations

    passes = [True] * c + [False] * (n - c)
    subsets = list(combinations(range(n), k))
    brute = sum(any(passes[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_in_the_comparison_uses_the_threshold():
    m = ModelSamples([["x"]] * 2, {"exact": [[1.0, 0.0], [0.5, 0.9]]})
    got = compare_models({"m": m}, {"exact": 0.9}, [1, 2])["pass_at_k"]["exact"]["m"]
    assert got["pass@1"]["mean"] == pytest.approx((0.5 + 0.5) / 2)  # prompt 1: 1 of 2 pass; prompt 2: 0.9 passes
    assert got["pass@2"]["mean"] == pytest.approx(1.0)


def test_distribution_by_hand():
    d = distribution([1.0, 2.0, 3.0, 4.0, 10.0], bins=3)
    assert d["n"] == 5 and d["mean"] == 4.0 and d["min"] == 1.0 and d["max"] == 10.0
    assert d["std"] == pytest.approx(statistics.stdev([1.0, 2.0, 3.0, 4.0, 10.0]))
    assert d["quantiles"]["0.50"] == 3.0 and d["quantiles"]["0.25"] == 2.0  # linear interpolation, 5 points
    assert d["histogram"]["edges"] == [1.0, 4.0, 7.0, 10.0] and d["histogram"]["counts"] == [3, 1, 1]
