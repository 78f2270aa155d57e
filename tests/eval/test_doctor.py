"""The RL doctor: its statistics in closed form, a healthy history that must stay silent, and for each diagnostic a
synthetic history that must fire it, at an iteration and over windows computed by hand."""

from __future__ import annotations

import json
import math
import random

import pytest

from chatrlhf.errors import ConfigError, UserError
from chatrlhf.eval.doctor import (
    DIAGNOSTICS,
    Doctor,
    DoctorConfig,
    DoctorStop,
    distinct_n,
    repeats,
    replay,
    slope_t,
    text_metrics,
    two_proportion_z,
    welch_t,
)

# ------------------------------------------------------------------------------------------- statistics


def test_two_proportion_z_by_hand():
    # p̂₁ = 0.1, p̂₂ = 0.2, p̄ = 0.15: z = 0.1 / √(0.15·0.85·(1/100 + 1/100)) = 0.1 / 0.0504975
    assert two_proportion_z(10, 100, 20, 100) == pytest.approx(1.9802951, abs=1e-6)
    assert two_proportion_z(20, 100, 10, 100) == pytest.approx(-1.9802951, abs=1e-6)
    assert two_proportion_z(0, 50, 0, 50) == 0.0 and two_proportion_z(50, 50, 50, 50) == 0.0


def test_welch_t_by_hand():
    # means 2 and 5, variances 1 and 1, n = 3 each: t = 3 / √(2/3)
    assert welch_t([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(3.6742346, abs=1e-6)
    assert welch_t([1.0, 1.0], [2.0, 2.0]) == math.inf and welch_t([1.0, 1.0], [1.0, 1.0]) == 0.0


def test_slope_t_by_hand():
    # x̄ = 2.5, ȳ = 2.75, Sxx = 5, Sxy = 5.5 → b = 1.1; residuals −0.1, 0.8, −1.3, 0.6 → SSR = 2.7;
    # se(b)² = 2.7 / 2 / 5 = 0.27 → t = 1.1 / √0.27
    b, t = slope_t([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 5.0])
    assert b == pytest.approx(1.1, abs=1e-12) and t == pytest.approx(2.1169509, abs=1e-6)
    assert slope_t([0.0, 1.0, 2.0], [1.0, 3.0, 5.0]) == (pytest.approx(2.0), math.inf)


def test_repeats_and_distinct_n():
    assert repeats("hope hope", 1) and repeats("Sand, sand star.", 1) and not repeats("sand ship star", 1)
    assert repeats("I think so, I think", 2) and not repeats("I think so", 2) and not repeats("", 1)
    assert distinct_n(["a b", "a c"], 1) == 3 / 4 and distinct_n(["a b", "a c"], 2) == 1.0
    assert distinct_n(["", "x"], 2) is None
    assert text_metrics(["hope hope", "a b c", "a b c a b c d e"], [1, 4]) == {
        "response/repeat_1gram_frac": 2 / 3,
        "response/repeat_4gram_frac": 0.0,  # "a b c a b c d e" repeats 3-grams, no 4-gram
        "response/distinct_1": 6 / 13,
        "response/distinct_2": 6 / 10,
    }


# ------------------------------------------------------------------------------------------- histories


def healthy_metrics(it: int, rng: random.Random) -> dict[str, float]:
    """A run that learns: reward and KL-corrected reward rise, KL grows slowly, length, clip fraction, approx KL and
    value loss stay in range, entropy declines gently; every value carries noise."""
    m = {
        "reward/score_mean": 0.015 * it + rng.gauss(0, 0.05),
        "reward/total_mean": 0.012 * it + rng.gauss(0, 0.05),
        "kl/mean": 0.02 * it + abs(rng.gauss(0, 0.05)),
        "response/length_mean": 14.0 + 0.02 * it + rng.gauss(0, 0.6),
        "policy/entropy": 2.0 - 0.004 * it + rng.gauss(0, 0.05),
        "policy/clipfrac": abs(rng.gauss(0.05, 0.02)),
        "policy/approx_kl": abs(rng.gauss(0.004, 0.002)),
        "loss/value": 0.5 * math.exp(-it / 10) + 0.05 + abs(rng.gauss(0, 0.01)),
        "rollout/logprob_diff": abs(rng.gauss(3e-7, 1e-7)),  # a float32 vLLM engine's rounding
        "reward/clip_frac": sum(abs(rng.gauss(0, 1.5)) >= 5 for _ in range(64)) / 64,
        "reward/rm_share": min(0.85, max(0.4, rng.gauss(0.6, 0.05))),
    }
    m["reward/judge_share"] = 1.0 - m["reward/rm_share"]
    if it % 10 == 0:
        m["eval/judge_mean"] = 0.66 + 0.0015 * it + rng.gauss(0, 0.01)
        m["eval/judge_sem"] = 0.012
    return m


def batch(rng: random.Random, p: float, n: int = 64) -> list[str]:
    """n responses, each repeating a word with probability p (the demo's kind of answer otherwise)."""
    others = ["hat home", "sand ship star", "moon map"]
    return ["hope hope" if rng.random() < p else rng.choice(others) for _ in range(n)]


def test_healthy_history_fires_nothing():
    rng = random.Random(0)
    doctor = Doctor()
    for it in range(1, 101):
        checkup = doctor.observe(it, healthy_metrics(it, rng), batch(rng, 0.10), None)
        assert checkup.findings == [], checkup.findings[0].message
    assert doctor.findings == []
    assert checkup.metrics["doctor/repetition"] == 0.0 and set(checkup.metrics) >= {f"doctor/{d}" for d in DIAGNOSTICS}


def run(history: dict[str, list[float]], cfg: DoctorConfig | None = None, responses=None):
    """Feed the metric lists (index 0 = iteration 1; None = not logged that iteration); return the findings."""
    doctor = Doctor(cfg)
    n = max(len(v) for v in history.values()) if history else len(responses)
    for i in range(n):
        metrics = {k: v[i] for k, v in history.items() if i < len(v) and v[i] is not None}
        doctor.observe(i + 1, metrics, responses[i] if responses else None)
    return doctor.findings


def wiggle(values: list[float], eps: float) -> list[float]:
    """Alternating ±eps, so a window has spread."""
    return [v + (eps if i % 2 else -eps) for i, v in enumerate(values)]


def test_repetition_fires_when_the_windows_differ_significantly():
    # 6 of 64 repeat at iterations 1-10, 11 of 64 from 11 on. Windows need ≥ 512 responses: 8 iterations.
    # Early = 1-8: 48/512. At iteration 16 the recent window 9-16 holds 2·6 + 6·11 = 78/512: p̄ = 126/1024,
    # z = (78 − 48)/512 / √(p̄(1 − p̄)·2/512) = 2.85 < 3. At 17 (window 10-17): 6 + 7·11 = 83, z = 3.27 ≥ 3,
    # rise 0.068 ≥ 0.05, 83 ≥ 10 repeating: fires.
    responses = [["hope hope"] * k + ["hat home"] * (64 - k) for k in [6] * 10 + [11] * 20]
    (f,) = run({}, responses=responses)
    assert (f.name, f.iteration, f.first, f.last, f.windows) == ("repetition", 17, 1, 17, [[1, 8], [10, 17]])
    pbar = (48 + 83) / 1024
    assert f.evidence["z"] == pytest.approx((83 - 48) / 512 / math.sqrt(pbar * (1 - pbar) * 2 / 512), abs=1e-9)
    assert (f.evidence["early_count"], f.evidence["recent_count"], f.evidence["n"]) == (48, 83, 1)
    assert f.examples and all(e["response"] == "hope hope" for e in f.examples)
    assert "9.4%" in f.message and "16.2%" in f.message


def test_repetition_ignores_one_noisy_iteration():
    responses = [["hope hope"] * k + ["hat home"] * (64 - k) for k in [6] * 19 + [32] + [6] * 20]
    assert run({}, responses=responses) == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_repetition_catches_the_demo_drift(seed):
    """The PPO demo: held-out answers that repeat a word go from about 10% to about 20% over 100 iterations of 64."""
    rng = random.Random(seed)
    responses = [batch(rng, 0.10 + 0.10 * (it - 1) / 99) for it in range(1, 101)]
    findings = run({}, responses=responses)
    assert [f.name for f in findings] == ["repetition"]


@pytest.mark.parametrize("falling", [False, True])
def test_length_drift(falling):
    # 10 tokens at 1-5, then 16 (or 4): at iteration 10 the windows 1-5 and 6-10 differ ×1.6 (×0.4)
    later = 4.0 if falling else 16.0
    (f,) = run({"response/length_mean": wiggle([10.0] * 5 + [later] * 10, 0.2)})
    assert (f.name, f.iteration, f.windows) == ("length_drift", 10, [[1, 5], [6, 10]])
    assert f.evidence["ratio"] == pytest.approx(later / 10.0, abs=0.02)


def test_length_within_bounds_is_quiet():
    assert run({"response/length_mean": wiggle([10.0] * 5 + [14.0] * 20, 0.2)}) == []  # ×1.4 < 1.5


def test_entropy_collapse():
    # 2.0 nats at 1-5, 0.5 after: ×0.25 ≤ 0.3 at iteration 10; a fall to 0.8 (×0.4) is left alone
    (f,) = run({"policy/entropy": wiggle([2.0] * 5 + [0.5] * 10, 0.05)})
    assert (f.name, f.iteration, f.windows) == ("entropy_collapse", 10, [[1, 5], [6, 10]])
    assert run({"policy/entropy": wiggle([2.0] * 5 + [0.8] * 10, 0.05)}) == []


def test_kl_blowup():
    # kl/mean = iteration: the mean of the last 5 is t − 2, ≥ 10 first at t = 12
    (f,) = run({"kl/mean": [float(i) for i in range(1, 31)]})
    assert (f.name, f.iteration, f.windows, f.evidence["recent_mean"]) == ("kl_blowup", 12, [[8, 12]], 10.0)


def test_clipfrac_high():
    # 0.1 at 1-10, 0.3 after: last-5 means 0.18 at 12, (3·0.3 + 2·0.1)/5 = 0.22 ≥ 0.2 at 13
    (f,) = run({"policy/clipfrac": [0.1] * 10 + [0.3] * 10})
    assert (f.name, f.iteration, f.windows) == ("clipfrac_high", 13, [[9, 13]])


def test_approx_kl_high():
    # 0.01 at 1-10, 0.1 after: last-5 means 0.046 at 12, 0.064 ≥ 0.05 at 13
    (f,) = run({"policy/approx_kl": [0.01] * 10 + [0.1] * 10})
    assert (f.name, f.iteration, f.windows) == ("approx_kl_high", 13, [[9, 13]])


def test_value_loss_rising():
    # 1.0 at 1-5, 0.1 at 6-15, 2.0 from 16: the lowest earlier window is 6-10 (0.1); the last-5 mean reaches
    # 10 × 0.1 once 3 of the 5 are 2.0: (3·2 + 2·0.1)/5 = 1.24 at 18 (at 17: 0.86)
    (f,) = run({"loss/value": [1.0] * 5 + [0.1] * 10 + [2.0] * 10})
    assert (f.name, f.iteration, f.windows) == ("value_loss_rising", 18, [[6, 10], [14, 18]])
    assert f.evidence["lowest_mean"] == pytest.approx(0.1, abs=1e-12)


def test_logprob_mismatch():
    # 1e-4 at 1-5, then 2e-3: at iteration 10 the windows 1-5 and 6-10 differ ×20 ≥ 10 and 2e-3 ≥ 1e-3
    (f,) = run({"rollout/logprob_diff": wiggle([1e-4] * 5 + [2e-3] * 10, 1e-5)})
    assert (f.name, f.iteration, f.windows) == ("logprob_mismatch", 10, [[1, 5], [6, 10]])
    # wiggle's ±1e-5 alternates from −: the early window's mean is 1e-4 − 1e-5/5, the recent one's 2e-3 + 1e-5/5
    assert f.evidence["ratio"] == pytest.approx((2e-3 + 2e-6) / (1e-4 - 2e-6), rel=1e-9)


def test_logprob_mismatch_quiet_when_small_or_steady():
    assert run({"rollout/logprob_diff": wiggle([1e-7] * 5 + [5e-4] * 10, 1e-8)}) == []  # ×5000 but below 1e-3
    assert run({"rollout/logprob_diff": wiggle([2e-2] * 20, 1e-3)}) == []  # large but not growing (bfloat16-like)
    assert run({"rollout/logprob_diff": wiggle([1e-3] * 5 + [5e-3] * 10, 1e-4)}) == []  # grew ×5 < ×10


def test_reward_dominance():
    # rm's share 0.6 at 1-10, then 0.98: last-5 means 0.6 + k·0.38/5 for k of the 5 at 0.98 — 0.904 ≥ 0.9 at k = 4
    rm = [0.6] * 10 + [0.98] * 10
    (f,) = run({"reward/rm_share": rm, "reward/judge_share": [1 - x for x in rm]})
    assert (f.name, f.iteration, f.windows) == ("reward_dominance", 14, [[10, 14]])
    assert f.evidence["share"] == pytest.approx(0.6 + 4 * 0.38 / 5, abs=1e-12) and "'rm'" in f.message


def test_reward_dominance_needs_two_components():
    assert run({"reward/rm_share": [1.0] * 20}) == []


def test_reward_at_clip():
    # 2% at the clip at 1-10, 30% after: last-5 means 0.02 + k·0.28/5 — 0.132 ≥ 0.1 at k = 2 (iteration 12)
    (f,) = run({"reward/clip_frac": [0.02] * 10 + [0.3] * 10})
    assert (f.name, f.iteration, f.windows) == ("reward_at_clip", 12, [[8, 12]])
    assert run({"reward/clip_frac": [0.05] * 30}) == []


def test_reward_vs_total():
    # over the 20 iterations 1-20 the reward rises 0.1/iteration and the KL-corrected reward falls 0.05/iteration
    its = range(1, 31)
    (f,) = run(
        {
            "reward/score_mean": wiggle([0.1 * i for i in its], 0.01),
            "reward/total_mean": wiggle([-0.05 * i for i in its], 0.01),
        }
    )
    assert (f.name, f.iteration, f.windows) == ("reward_vs_total", 20, [[1, 20]])
    assert f.evidence["slope_reward"] == pytest.approx(0.1, abs=2e-3)
    healthy = run(
        {
            "reward/score_mean": wiggle([0.1 * i for i in its], 0.01),
            "reward/total_mean": wiggle([0.08 * i for i in its], 0.01),
        }
    )
    assert healthy == []


def judge_history(last_judge: float, reward_slope: float) -> dict[str, list]:
    judge = {10: 0.70, 20: 0.80, 30: last_judge}
    return {
        "reward/score_mean": wiggle([reward_slope * i for i in range(1, 31)], 0.01),
        "eval/judge_mean": [judge.get(i) for i in range(1, 31)],
        "eval/judge_sem": [0.01 if i in judge else None for i in range(1, 31)],
    }


def test_reward_vs_judge():
    # best judge 0.80 at 20, 0.70 at 30: a drop of 0.1 ≥ max(0.02, 3·√2·0.01 = 0.042); the reward over 26-30 is
    # above its level over 16-20
    (f,) = run(judge_history(0.70, 0.1))
    assert (f.name, f.iteration, f.first, f.last, f.windows) == ("reward_vs_judge", 30, 20, 30, [[16, 20], [26, 30]])
    assert f.evidence["judge_drop"] == pytest.approx(0.1, abs=1e-12)
    assert run(judge_history(0.77, 0.1)) == []  # 0.03 < 0.042: within the judge's noise
    assert run(judge_history(0.70, -0.1)) == []  # the reward fell too: not a divergence


# ------------------------------------------------------------------------------------------- the doctor object


def test_fires_once_flags_stay_on_and_stop_on():
    cfg = DoctorConfig(stop_on=["kl_blowup"])
    doctor = Doctor(cfg)
    fired = []
    for it in range(1, 31):
        checkup = doctor.observe(it, {"kl/mean": float(it)})
        fired += checkup.findings
        assert checkup.metrics["doctor/kl_blowup"] == float(it >= 12)
        if it == 12:
            assert checkup.stops == checkup.findings and checkup.stops[0].stop
    assert [f.name for f in fired] == ["kl_blowup"] and doctor.findings == fired
    with pytest.raises(UserError, match="stopped by the RL doctor \\(kl_blowup is in doctor.stop_on\\)"):
        raise DoctorStop(fired)


def test_off_and_disabled():
    history = {"kl/mean": [float(i) for i in range(1, 31)]}
    assert run(history, DoctorConfig(off=["kl_blowup"])) == []
    doctor = Doctor(DoctorConfig(enabled=False))
    assert doctor.observe(1, {"kl/mean": 100.0}, ["a a"]) == ({}, [])


def test_state_round_trip_resumes_identically():
    rng = random.Random(5)
    its = list(range(1, 41))
    metrics = [healthy_metrics(i, rng) | {"kl/mean": 0.5 * i} for i in its]
    responses = [batch(rng, 0.1 if i < 20 else 0.3) for i in its]
    straight = Doctor()
    for i in its:
        straight.observe(i, metrics[i - 1], responses[i - 1])
        if i == 15:
            saved = json.loads(json.dumps(straight.state_dict()))  # a checkpoint is plain JSON-safe data
    resumed = Doctor()
    resumed.load_state_dict(saved)
    for i in its[15:]:
        resumed.observe(i, metrics[i - 1], responses[i - 1])
    assert [f.as_dict() for f in resumed.findings] == [f.as_dict() for f in straight.findings]
    assert {f.name for f in straight.findings} == {"kl_blowup", "repetition"}
    # re-observing iterations (a resumed run rewrote them) forgets them first
    again = Doctor()
    again.load_state_dict(straight.state_dict())
    for i in its[10:]:
        again.observe(i, metrics[i - 1], responses[i - 1])
    assert [f.as_dict() for f in again.findings] == [f.as_dict() for f in straight.findings]


def test_write_and_replay(tmp_path):
    doctor = Doctor()
    for i in range(1, 21):
        doctor.observe(i, {"kl/mean": float(i)}, ["hat home"], ["Name 2 words that begin with h."])
    doctor.write(tmp_path / "doctor.json")
    data = json.loads((tmp_path / "doctor.json").read_text())
    assert data["format"] == 1 and data["iteration"] == 20 and data["findings"][0]["name"] == "kl_blowup"
    assert data["findings"][0]["examples"] == [{"prompt": "Name 2 words that begin with h.", "response": "hat home"}]
    lines = [{"stage": "rl", "step": i, "kl/mean": float(i)} for i in range(1, 21)]
    assert [f.name for f in replay(lines).findings] == ["kl_blowup"]


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("window", 1, "window must be >= 2"),
        ("repeat_ngrams", [], "repeat_ngrams"),
        ("length_min_ratio", 1.2, "length_min_ratio"),
        ("stop_on", ["nope"], "unknown diagnostics"),
        ("kl_max", 0.0, "kl_max must be > 0"),
    ],
)
def test_config_validation(field, value, words):
    with pytest.raises(ConfigError, match=words):
        DoctorConfig(**{field: value}).validate()


def test_config_conflict_names_both_fields():
    with pytest.raises(ConfigError, match="both off and stop_on"):
        DoctorConfig(off=["kl_blowup"], stop_on=["kl_blowup"]).validate()
    DoctorConfig().validate()
