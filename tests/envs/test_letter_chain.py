"""The multi-turn chat task (chatrlhf/envs/letter_chain.py): a second user turn built from the policy's first
answer, both turns judged; RL on it end to end through the CLI, and `chatrlhf eval --env` on it, every reported
number recomputed here from the conversations with the demo's judge (never with the environment's code)."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from chatrlhf.demo.task import judge, parse_prompt
from chatrlhf.envs.letter_chain import LetterChainEnv

ROOT = Path(__file__).resolve().parents[2]
CHAIN = "chatrlhf.envs.letter_chain:LetterChainEnv"


def chatrlhf(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "chatrlhf", *args], capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def test_the_second_request_follows_the_first_answer():
    env = LetterChainEnv()
    assert env.reset({"prompt": "Name 3 words that begin with m."}) == [
        {"role": "user", "content": "Name 3 words that begin with m."}
    ]
    first = env.step("mind meal tiger")
    assert first.reward == pytest.approx(2 / 3) and not first.done
    (follow_up,) = first.messages
    assert follow_up["role"] == "user" and follow_up["content"].startswith("Your last word was 'tiger'. ")
    n, letter = parse_prompt(follow_up["content"])
    assert letter == "t" and n in (2, 3, 4)
    answer = " ".join(["tea", "team", "tent", "test"][:n])
    last = env.step(answer)
    assert last.done and last.reward == 1.0 and last.messages == []
    # the same episode asks the same follow-up; another answer, another letter
    again = LetterChainEnv()
    again.reset({"prompt": "Name 3 words that begin with m."})
    assert again.step("mind meal tiger").messages == first.messages
    other = LetterChainEnv()
    other.reset({"prompt": "Name 3 words that begin with m."})
    assert parse_prompt(other.step("mind meal salt").messages[0]["content"])[1] == "s"


def test_an_answer_without_a_usable_last_word_ends_the_episode():
    for answer, reward in [("", 0.0), ("...", 0.0), ("mind zoo", 0.5)]:  # z: too few words for a request
        env = LetterChainEnv()
        env.reset({"prompt": "Give me 2 words beginning with m."})
        reply = env.step(answer)
        assert reply.done and reply.messages == [] and reply.reward == pytest.approx(reward)


def conversation_return(messages: list[dict]) -> float:
    """The episode's return recomputed from its conversation: each assistant turn judged against the user turn
    before it."""
    total = 0.0
    for before, turn in zip(messages, messages[1:]):
        if turn["role"] == "assistant":
            assert before["role"] == "user"
            total += judge(before["content"], turn["content"])
    return total


def test_rl_on_the_multi_turn_chat_task_through_the_cli(sft_llama, tmp_path):
    out = tmp_path / "chain"
    chatrlhf("rl", "--actor", str(sft_llama), "--env", CHAIN, "--output_dir", str(out),
             "--data.paths", "demo:prompts:40:2", "--data.eval_fraction", "0.2", "--train.algo", "grpo",
             "--train.group_size", "2", "--train.iterations", "2", "--train.rollout_batch_size", "4",
             "--train.generation.max_new_tokens", "24", "--train.episode.max_turns", "2",
             "--train.eval_prompts", "8", "--train.actor_optim.lr", "1e-3", "--run.progress", "False",
             "--run.log_every", "1", "--judge", "tests.envs.test_letter_chain:assistant_turns")  # fmt: skip
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        assert 1.0 < m["episode/turns_mean"] <= 2.0  # the demo SFT model's answers lead to second turns
        assert 0.0 <= m["reward/env_mean"] <= 2.0 and m["rollout/logprob_diff"] < 1e-4
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert rows and any(len(r["messages"]) == 4 for r in rows)
    for r in rows:
        assert r["messages"][0] == {"role": "user", "content": r["prompt"]}
        if len(r["messages"]) == 4:  # the follow-up names the first answer's last word
            last_word = r["messages"][1]["content"].split()[-1].lower().rstrip(",.")
            assert r["messages"][2]["content"].startswith(f"Your last word was '{last_word}'.")
        assert r["reward"] == pytest.approx(conversation_return(r["messages"]), abs=1e-6)
        # the held-out judge sees the episode as reward functions do: the conversation as `messages`
        assert r["judge"] == sum(m["role"] == "assistant" for m in r["messages"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval/judge_mean"] == pytest.approx(sum(r["judge"] for r in rows[-8:]) / 8)


def assistant_turns(prompt: str, response: str, messages: list[dict], **fields) -> float:
    """A judge that reads the conversation: the number of policy turns."""
    return float(sum(m["role"] == "assistant" for m in messages))


def test_eval_plays_episodes_side_by_side(sft_llama, tmp_path):
    """Two models each play 3 episodes per prompt; each sample's `env` score is its conversation's return and the
    judge sees the whole conversation; the report's means and paired difference are those of the samples."""
    from chatrlhf.models.tiny import build_tiny_model

    random = build_tiny_model(tmp_path / "random", arch="llama", hidden=64, layers=2, heads=2)
    out = tmp_path / "eval"
    chatrlhf("eval", "--models", str(random), str(sft_llama), "--names", "random", "sft", "--env", CHAIN,
             "--prompts", "demo:prompts:6:4", "--num_prompts", "6", "--samples_per_prompt", "3",
             "--judges", "tests.envs.test_letter_chain:assistant_turns", "--episode.max_turns", "2",
             "--generation.max_new_tokens", "24", "--episode.max_tokens", "488", "--batch_size", "8",
             "--output_dir", str(out))  # fmt: skip  # 488 + 24: the random model's 512 positions
    report = json.loads((out / "eval.json").read_text())["side_by_side"]
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 * 3
    per_prompt: dict[str, dict[str, list]] = {"random": {}, "sft": {}}
    for r in rows:
        for name in ("random", "sft"):
            messages = [{"role": "user", "content": r["prompt"]}]  # then "role: content" per message
            for role, content in re.findall(
                r"^(assistant|user): (.*?)(?=\n(?:assistant|user): |\Z)", r[name], re.M | re.S
            ):
                messages.append({"role": role, "content": content})
            scores = r["scores"][name]
            assert scores["env"] == pytest.approx(conversation_return(messages), abs=1e-6)
            assert scores["assistant_turns"] == sum(m["role"] == "assistant" for m in messages)
            per_prompt[name].setdefault(r["prompt"], []).append(scores["env"])
    means = {n: [statistics.fmean(v) for v in per_prompt[n].values()] for n in per_prompt}
    got = report["scores"]["env"]
    assert got["models"]["sft"]["mean"] == pytest.approx(statistics.fmean(means["sft"]), abs=1e-9)
    diff = statistics.fmean(b - a for a, b in zip(means["random"], means["sft"]))
    assert got["pairs"][0]["b_minus_a"]["mean"] == pytest.approx(diff, abs=1e-9)
