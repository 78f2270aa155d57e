"""Every CLI stage through the real command line (subprocess) on a tiny model: outputs, metrics, loadability."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from chatrlhf.demo.calculator import make_prompts as make_calculator_prompts

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--run.progress", "False", "--run.log_every", "1"]


def chatrlhf(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "chatrlhf.cli", *args], capture_output=True, text=True, cwd=cwd or ROOT, env=env
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dirs, pairs_file):
    """sft → reward → rl, each a separate CLI call, as a user would chain them."""
    root = tmp_path_factory.mktemp("cli")
    base = str(tiny_dirs["gpt2"])
    ok(
        chatrlhf(
            "sft",
            "--model",
            base,
            "--output_dir",
            str(root / "sft"),
            "--data.paths",
            str(pairs_file),
            "--train.max_steps",
            "4",
            "--train.batch_size",
            "8",
            "--train.max_seq_len",
            "96",
            *QUIET,
        )
    )
    ok(
        chatrlhf(
            "reward",
            "--model",
            str(root / "sft" / "model"),
            "--output_dir",
            str(root / "rm"),
            "--data.paths",
            str(pairs_file),
            "--train.max_steps",
            "3",
            "--train.batch_size",
            "8",
            "--train.max_seq_len",
            "96",
            *QUIET,
        )
    )
    ok(
        chatrlhf(
            "rl",
            "--actor",
            str(root / "sft" / "model"),
            "--reward_model",
            str(root / "rm" / "model"),
            "--output_dir",
            str(root / "rl"),
            "--data.paths",
            str(pairs_file),
            "--train.iterations",
            "2",
            "--train.rollout_batch_size",
            "8",
            "--train.update.mini_batch_size",
            "4",
            "--train.generation.max_new_tokens",
            "8",
            "--train.ema",
            "True",
            *QUIET,
        )
    )
    return root


def test_sft_outputs(runs):
    out = runs / "sft"
    lines = metrics(out)
    assert [m["step"] for m in lines if "loss/train" in m] == [1, 2, 3, 4]
    assert lines[-1]["eval/perplexity"] > 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["eval/perplexity"] == lines[-1]["eval/perplexity"]
    assert (out / "config.yaml").is_file() and (out / "model" / "model.safetensors").is_file()


def test_reward_outputs(runs):
    summary = json.loads((runs / "rm" / "summary.json").read_text())
    assert 0.0 <= summary["eval/accuracy"] <= 1.0
    assert summary["eval/score_gap"] == pytest.approx(
        summary["eval/chosen_score"] - summary["eval/rejected_score"], abs=1e-5
    )


def test_rl_outputs(runs):
    out = runs / "rl"
    lines = metrics(out)
    assert [m["step"] for m in lines] == [1, 2]
    for key in ("reward/score_mean", "kl/mean", "loss/policy", "loss/value", "time/generate_s", "response/length_mean"):
        assert key in lines[-1]
    assert lines[0]["kl/mean"] == pytest.approx(0.0, abs=1e-5), "actor == reference before the first update"
    for d in ("model", "critic", "model_ema"):
        assert (out / d / "config.json").is_file()


def test_outputs_load_in_plain_transformers(runs):
    """Every model directory loads with transformers alone; chatrlhf is never imported."""
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
root = {str(runs)!r}
for d in ("sft/model", "rl/model", "rl/model_ema"):
    tok = AutoTokenizer.from_pretrained(f"{{root}}/{{d}}")
    model = AutoModelForCausalLM.from_pretrained(f"{{root}}/{{d}}")
    out = model.generate(**tok(["User: hi"], return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] >= 9
for d in ("rm/model", "rl/critic"):
    tok = AutoTokenizer.from_pretrained(f"{{root}}/{{d}}")
    rm = AutoModelForSequenceClassification.from_pretrained(f"{{root}}/{{d}}")
    assert rm(**tok(["a b", "c"], return_tensors="pt", padding=True)).logits.shape == (2, 1)
assert "chatrlhf" not in sys.modules
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr


def test_resolved_config_repeats_the_run(runs, tmp_path, pairs_file, tiny_dirs):
    """config.yaml passed back as the recipe gives the same training metrics."""
    recipe = runs / "sft" / "config.yaml"
    ok(chatrlhf("sft", "--recipe", str(recipe), "--output_dir", str(tmp_path / "again")))
    first = [m["loss/train"] for m in metrics(runs / "sft") if "loss/train" in m]
    again = [m["loss/train"] for m in metrics(tmp_path / "again") if "loss/train" in m]
    assert first == again


def test_help_lists_documented_fields():
    proc = ok(chatrlhf("rl", "--help"))
    assert "--train.kl.coef" in proc.stdout and "per-token KL estimate" in proc.stdout


def test_pipeline_on_a_reduced_demo_budget(tmp_path):
    """The demo recipe end to end, on a budget of seconds: every stage runs and summary.json is complete."""
    run = tmp_path / "demo"
    ok(
        chatrlhf(
            "pipeline",
            "--recipe",
            "recipes/demo.yaml",
            "--run_dir",
            str(run),
            "--data.paths",
            "demo:pairs:600:0",
            "--model",
            "tiny:llama:hidden=32,layers=2,heads=4",
            "--sft.epochs",
            "1",
            "--reward.epochs",
            "1",
            "--rl.iterations",
            "2",
            "--rl.rollout_batch_size",
            "16",
            "--rl.update.mini_batch_size",
            "8",
            "--rl.generation.max_new_tokens",
            "12",
            "--eval.num_prompts",
            "8",
            "--eval.samples_per_prompt",
            "2",
            "--run.progress",
            "False",
            "--reward_gate.action",  # a reward model of a few seconds' training is at chance
            "warn",
        )
    )
    summary = json.loads((run / "summary.json").read_text())
    judge = summary["comparison"]["judge"]
    assert judge["sft"]["n"] == judge["rlhf"]["n"] == 8
    assert all(0.0 <= judge[m]["mean"] <= 1.0 for m in ("sft", "rlhf"))
    diff = judge["rlhf_minus_sft"]
    assert diff["mean"] == pytest.approx(judge["rlhf"]["mean"] - judge["sft"]["mean"], abs=1e-9)
    assert diff["ci95"][0] <= diff["mean"] <= diff["ci95"][1]
    assert set(summary["time_s"]) == {"sft", "reward", "rl", "eval"}
    assert 0.0 <= summary["reward_model"]["eval/accuracy"] <= 1.0
    # the gate tested the reward stage's 12 held-out pairs (5% of its 240) and let RL run (action warn)
    gate = summary["reward_model"]["gate"]
    assert gate["pairs"] == 12 and gate["correct"] == round(summary["reward_model"]["eval/accuracy"] * 12)
    assert "final/kl/mean" in summary["rl"]
    for stage in ("sft", "reward", "rl"):
        assert (run / stage / "model" / "config.json").is_file()
    assert (run / "data" / "demo-pairs-600-0.jsonl").is_file()
    # the comparison is `chatrlhf eval`'s side by side: its win rate, and every sample with its scores for the report
    win = judge["rlhf_win_rate"]
    assert 0.0 <= win["mean"] <= 1.0 and win["n"] == 8
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 8 * 2 and [r["sample"] for r in rows[:2]] == [0, 1]
    assert all(set(r["scores"]["sft"]) == set(r["scores"]["rlhf"]) == {"judge", "reward_model"} for r in rows)
    per_prompt = [sum(r["scores"]["rlhf"]["judge"] for r in rows[i : i + 2]) / 2 for i in range(0, 16, 2)]
    assert judge["rlhf"]["mean"] == pytest.approx(sum(per_prompt) / 8)
    assert rows[0]["sft"] == summary["comparison"]["examples"][0]["sft"]


def test_grpo_pipeline_rewarded_by_a_function(tmp_path):
    """The GRPO demo recipe on a budget of seconds, rewarded by the judge as a Python function: no reward model is
    trained."""
    run = tmp_path / "grpo"
    ok(chatrlhf(
        "pipeline", "--recipe", "recipes/demo-grpo.yaml", "--run_dir", str(run), "--data.paths", "demo:pairs:400:0",
        "--train_reward_model", "False", "--reward_functions", "chatrlhf.demo.task:judge", "--data.split", "2,0,8",
        "--model", "tiny:llama:hidden=32,layers=2,heads=4", "--sft.epochs", "1", "--rl.iterations", "2",
        "--rl.rollout_batch_size", "4", "--rl.update.mini_batch_size", "8", "--rl.generation.max_new_tokens", "12",
        "--eval.num_prompts", "6", "--eval.samples_per_prompt", "2", "--run.progress", "False",
    ))  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    assert not (run / "reward").exists() and "reward_model" not in summary
    assert set(summary["comparison"]) >= {"judge", "prompts"} and "reward_model" not in summary["comparison"]
    assert set(summary["time_s"]) == {"sft", "rl", "eval"}
    lines = [json.loads(x) for x in (run / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert all("reward/judge_mean" in m and "loss/value" not in m for m in lines)


def test_calculator_pipeline_plays_episodes(tmp_path):
    """The tool-using demo recipe on a budget of seconds: SFT on transcripts, RL on episodes rewarded by the
    environment alone, the final comparison on episodes; each sample's scores recomputed from its conversation."""
    run = tmp_path / "calc"
    ok(chatrlhf(
        "pipeline", "--recipe", "recipes/demo-calculator.yaml", "--run_dir", str(run),
        "--data.sft_paths", "calculator:sft:24:1:80", "--data.rl_paths", "calculator:prompts:40:2",
        "--model", "tiny:llama:hidden=32,layers=2,heads=4,positions=1024", "--sft.epochs", "1",
        "--rl.iterations", "1", "--rl.rollout_batch_size", "4", "--rl.update.mini_batch_size", "16",
        "--rl.eval_prompts", "2", "--eval.prompts", "calculator:prompts:4:9",
        "--eval.num_prompts", "4", "--eval.samples_per_prompt", "2", "--run.progress", "False",
    ))  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["time_s"]) == {"sft", "rl", "eval"} and not (run / "reward").exists()
    assert set(summary["comparison"]) >= {"env", "judge"} and summary["comparison"]["env"]["sft"]["n"] == 4
    lines = [json.loads(x) for x in (run / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert all("reward/env_mean" in m and "episode/turns_mean" in m for m in lines)
    answers = {q["prompt"]: q["answer"] for q in make_calculator_prompts(4, 9)}
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 2
    for r in rows:
        for model in ("sft", "rlhf"):
            last_turn = [line for line in r[model].split("\n") if line.startswith("assistant: ")][-1]
            numbers = re.findall(r"-?\d+(?:\.\d+)?", last_turn)
            right = float(bool(numbers) and float(numbers[-1]) == answers[r["prompt"]])
            assert r["scores"][model]["judge"] == right
            # the return is the judgement of the answer that ended the episode (0 when none did)
            assert r["scores"][model]["env"] in (0.0, right)


def test_ppo_pipeline_on_episodes_with_a_reward_model(tmp_path):
    """The demo recipe (PPO, a reward model trained on the pairs) with the multi-turn chat task as `env`: the reward
    model initialises the critic and scores every episode as played in RL and in the final comparison."""
    run = tmp_path / "chain"
    ok(chatrlhf(
        "pipeline", "--recipe", "recipes/demo.yaml", "--run_dir", str(run), "--data.paths", "demo:pairs:400:0",
        "--env", "chatrlhf.envs.letter_chain:LetterChainEnv", "--model", "tiny:llama:hidden=32,layers=2,heads=4",
        "--sft.epochs", "1", "--reward.epochs", "1", "--rl.iterations", "2", "--rl.rollout_batch_size", "8",
        "--rl.update.mini_batch_size", "8", "--rl.generation.max_new_tokens", "12", "--rl.episode.max_tokens", "160",
        "--eval.num_prompts", "4", "--eval.samples_per_prompt", "2", "--run.progress", "False",
        "--reward_gate.action", "warn",
    ))  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["time_s"]) == {"sft", "reward", "rl", "eval"}
    lines = [json.loads(x) for x in (run / "rl" / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in lines if "loss/value" in m]
    assert trained and trained[-1]["step"] == 2
    assert all({"reward/reward_model_mean", "reward/env_mean", "episode/turns_mean"} <= set(m) for m in trained)
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 2
    assert all(set(r["scores"]["rlhf"]) == {"judge", "env", "reward_model"} for r in rows)
    for name in ("env", "reward_model"):
        per_prompt = [sum(r["scores"]["rlhf"][name] for r in rows[i : i + 2]) / 2 for i in range(0, 8, 2)]
        assert summary["comparison"][name]["rlhf"]["mean"] == pytest.approx(sum(per_prompt) / 4)
    # the reward model's score depends on the episode: not one constant for every sample
    assert len({r["scores"]["sft"]["reward_model"] for r in rows}) > 1


def test_tensorboard_events_match_metrics(tmp_path, pairs_file, tiny_dirs):
    """With run.report_to tensorboard every logged scalar is also a TensorBoard event."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    ok(chatrlhf("sft", "--model", str(tiny_dirs["gpt2"]), "--output_dir", str(out), "--data.paths", str(pairs_file),
                "--train.max_steps", "3", "--train.batch_size", "8", "--train.max_seq_len", "96",
                "--run.report_to", "tensorboard", *QUIET))  # fmt: skip
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = [m["loss/train"] for m in metrics(out) if "loss/train" in m]
    assert [e.step for e in events.Scalars("loss/train")] == [1, 2, 3]
    assert [e.value for e in events.Scalars("loss/train")] == pytest.approx(logged, rel=1e-6)
