"""The pipeline's reward-model gate between steps 2 and 3: the held-out accuracy tested against chance (or a stricter
bar) with the one-sided exact binomial test, and what each action does. Expected p-values are summed here in exact
rational arithmetic (Σ C(n, i) pⁱ (1 − p)ⁿ⁻ⁱ), apart from the code under test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction
from math import comb
from pathlib import Path

import pytest

from chatrlhf.config import PipelineConfig, PipelineDataConfig, RewardGateConfig
from chatrlhf.errors import ConfigError, UserError
from chatrlhf.eval.stats import binomial_upper_tail
from chatrlhf.train.pipeline import reward_gate

ROOT = Path(__file__).resolve().parents[2]


def exact_tail(k: int, n: int, p: Fraction = Fraction(1, 2)) -> float:
    return float(sum(comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)))


@pytest.mark.parametrize("k, n", [(0, 1), (1, 1), (9, 10), (37, 64), (42, 64), (55, 64), (12, 30), (540, 1000)])
def test_binomial_upper_tail_is_the_binomial_tail(k, n):
    assert binomial_upper_tail(k, n) == pytest.approx(exact_tail(k, n), rel=1e-9)
    assert binomial_upper_tail(k, n, 0.6) == pytest.approx(exact_tail(k, n, Fraction(3, 5)), rel=1e-9)


def test_binomial_upper_tail_by_hand_and_refuses_impossible_counts():
    assert binomial_upper_tail(9, 10) == pytest.approx(11 / 1024)  # C(10,9) + C(10,10) = 11 of 1024 outcomes
    assert binomial_upper_tail(3, 3) == pytest.approx(0.125)
    assert binomial_upper_tail(2, 2, 0.9) == pytest.approx(0.81)
    for k, n, p in [(4, 3, 0.5), (-1, 3, 0.5), (0, 0, 0.5), (1, 3, 1.0), (1, 3, 0.0)]:
        with pytest.raises(ValueError):
            binomial_upper_tail(k, n, p)


def summary(correct: int, pairs: int) -> dict:
    """A reward stage's summary as train/supervised.py writes it."""
    return {"stage": "reward", "eval_pairs": pairs, "eval/accuracy": correct / pairs}


def test_a_reward_model_above_chance_passes(capsys):
    got = reward_gate(RewardGateConfig(), summary(55, 64), Path("run"))
    assert got["passed"] is True and (got["correct"], got["pairs"]) == (55, 64)
    assert got["p_value"] == pytest.approx(exact_tail(55, 64), rel=1e-9)
    assert "above chance" in capsys.readouterr().out


def test_a_reward_model_at_chance_stops_the_pipeline_and_says_how_to_go_on():
    # 37 of 64: p = 0.130 > 0.05
    with pytest.raises(UserError) as err:
        reward_gate(RewardGateConfig(), summary(37, 64), Path("runs") / "demo")
    msg = str(err.value)
    assert "37 of 64 pairs" in msg and f"p = {exact_tail(37, 64):.2g}" in msg and "better than chance" in msg
    assert str(Path("runs") / "demo" / "reward") in msg
    assert "--resume auto" in msg and "--reward_gate.action warn" in msg and "--reward.epochs" in msg


def test_the_significance_level_decides():
    # 42 of 64: p = 0.0084, above chance at 0.05 and 0.01, not at 0.001
    assert reward_gate(RewardGateConfig(p=0.01), summary(42, 64), Path("r"))["passed"] is True
    with pytest.raises(UserError):
        reward_gate(RewardGateConfig(p=0.001), summary(42, 64), Path("r"))


def test_a_stricter_bar_is_tested_against_its_own_rate():
    # 185 of 320 (0.578): above chance (p = 0.003) but not shown above 0.6 (p = 0.80)
    assert reward_gate(RewardGateConfig(), summary(185, 320), Path("r"))["passed"] is True
    with pytest.raises(UserError, match="better than reward_gate.min_accuracy 0.6") as err:
        reward_gate(RewardGateConfig(min_accuracy=0.6), summary(185, 320), Path("r"))
    assert f"p = {exact_tail(185, 320, Fraction(3, 5)):.2g}" in str(err.value)
    # 227 of 320 (0.709): above 0.6 too
    got = reward_gate(RewardGateConfig(min_accuracy=0.6), summary(227, 320), Path("r"))
    assert got["passed"] is True and got["p_value"] == pytest.approx(exact_tail(227, 320, Fraction(3, 5)), rel=1e-9)


def test_warn_goes_on_and_records_the_failure(capsys):
    got = reward_gate(RewardGateConfig(action="warn"), summary(30, 64), Path("r"))
    assert got["passed"] is False and got["p_value"] == pytest.approx(exact_tail(30, 64), rel=1e-9)
    out = capsys.readouterr().out
    assert "warning" in out and "30 of 64 pairs" in out and "RL runs anyway" in out


def test_off_tests_nothing(capsys):
    assert reward_gate(RewardGateConfig(action="off"), summary(0, 64), Path("r")) is None
    assert capsys.readouterr().out == ""


def test_without_held_out_pairs_it_warns_that_nothing_was_tested(capsys):
    got = reward_gate(RewardGateConfig(), {"stage": "reward", "eval_pairs": 0}, Path("r"))
    assert got == {"pairs": 0, "passed": None}
    assert "not tested before RL" in capsys.readouterr().out


def test_too_few_pairs_to_ever_pass_are_named():
    # 4 of 4 right: p = 1/16 > 0.05, so no reward model can pass on 4 pairs
    with pytest.raises(UserError, match=r"with 4 held-out pairs not even all right would pass: raise "
                                        r"data.eval_fraction"):  # fmt: skip
        reward_gate(RewardGateConfig(), summary(4, 4), Path("r"))
    # 5 of 5 right: p = 1/32 passes, so 4 of 5 fails without that note
    with pytest.raises(UserError) as err:
        reward_gate(RewardGateConfig(), summary(4, 5), Path("r"))
    assert "not even all right" not in str(err.value)


@pytest.mark.parametrize(
    "gate, field", [(RewardGateConfig(p=0.0), "reward_gate.p"), (RewardGateConfig(p=1.0), "reward_gate.p"),
                    (RewardGateConfig(min_accuracy=0.4), "reward_gate.min_accuracy"),
                    (RewardGateConfig(min_accuracy=1.0), "reward_gate.min_accuracy")],
)  # fmt: skip
def test_settings_out_of_range_are_refused_by_name(gate, field):
    cfg = PipelineConfig(model="tiny:llama", data=PipelineDataConfig(paths=["demo:pairs:100:0"]), reward_gate=gate)
    with pytest.raises(ConfigError, match=field):
        cfg.validate()


def pipeline(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "chatrlhf.cli", "pipeline", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)


def test_the_gate_stops_the_pipeline_before_rl_and_resume_goes_on(tmp_path):
    """Through the command line: a reward model that fails the gate ends the pipeline before RL (exit 2, one message,
    no traceback), keeping the SFT and reward models and writing no RL stage; rerun with `--resume auto
    --reward_gate.action warn`, the pipeline skips both finished stages, runs RL and records the failed test."""
    run = tmp_path / "gated"
    args = [
        "--recipe", "recipes/demo.yaml", "--run_dir", str(run), "--data.paths", "demo:pairs:200:0",
        "--model", "tiny:llama:hidden=32,layers=2,heads=4", "--sft.epochs", "1", "--reward.epochs", "1",
        "--rl.iterations", "1", "--rl.rollout_batch_size", "8", "--rl.update.mini_batch_size", "8",
        "--rl.generation.max_new_tokens", "8", "--eval.num_prompts", "4", "--eval.samples_per_prompt", "1",
        "--run.progress", "False",
        "--reward_gate.p", "1e-9",  # no count of the few held-out pairs can pass at this level
    ]  # fmt: skip
    stopped = pipeline(*args)
    assert stopped.returncode == 2, stopped.stdout + stopped.stderr
    assert "Traceback" not in stopped.stderr and "Stopped before RL" in stopped.stderr
    assert "--reward_gate.action warn" in stopped.stderr
    assert (run / "sft" / "model").is_dir() and (run / "reward" / "model").is_dir()
    assert not (run / "rl").exists() and not (run / "summary.json").exists()

    went_on = pipeline(*args, "--resume", "auto", "--reward_gate.action", "warn")
    assert went_on.returncode == 0, went_on.stdout + went_on.stderr
    assert went_on.stdout.count("finished earlier; nothing to resume") == 2  # SFT and the reward model
    assert "RL runs anyway" in went_on.stdout
    reward = json.loads((run / "reward" / "summary.json").read_text())
    n = reward["eval_pairs"]
    k = round(reward["eval/accuracy"] * n)
    gate = json.loads((run / "summary.json").read_text())["reward_model"]["gate"]
    assert (gate["correct"], gate["pairs"], gate["passed"]) == (k, n, False)
    assert gate["p_value"] == pytest.approx(exact_tail(k, n), rel=1e-9)
    assert (run / "rl" / "model" / "config.json").is_file()
    page = (run / "report.html").read_text()
    assert f"ranked {k} of {n} held-out pairs right" in page and "NOT shown above 0.5" in page
