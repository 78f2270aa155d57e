"""RL on multi-turn episodes (`env`): the rollout attends to the environment's tokens but trains only on the
policy's, episode rewards and reward functions on the conversation, the calculator demo through the CLI, and the
combinations that are refused.

Expected values never come from the code under test: the policy's tokens are the scripted replies' bytes (byte
tokenizer: id = byte), the episode's tokens the runner's own record of them, the log-probs a plain forward over the
collated episodes (envs/runner.py:collate_episodes, train/forward.py:sequence_token_logprobs)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatrlhf.config import (
    ALGORITHM_RULES,
    AdvantageConfig,
    Algo,
    ConfigError,
    EngineConfig,
    GenerationConfig,
    RewardShapingConfig,
    RLConfig,
    RLTrainConfig,
)
from chatrlhf.data.collate import position_ids
from chatrlhf.demo.calculator import judge
from chatrlhf.engine.generation import Generated
from chatrlhf.envs.calculator import CalculatorEnv
from chatrlhf.envs.episode import LoadedEnvironment, Reply
from chatrlhf.envs.runner import ChatFormat, EpisodeLimits, EpisodeRunner, collate_episodes
from chatrlhf.errors import UserError
from chatrlhf.models.load import add_value_head, load_value_model
from chatrlhf.models.rewards import build_scorer
from chatrlhf.models.tiny import EOS_ID
from chatrlhf.rlhf import run_lengths
from chatrlhf.train.algorithms import ALGORITHMS, AdvantageInputs
from chatrlhf.train.forward import sequence_token_logprobs
from chatrlhf.train.rollout import (
    Prompt,
    episode_metrics,
    episode_rollout,
    rollout_logprobs,
    rollout_values,
    score_rollout,
    turn_scores,
)

ROOT = Path(__file__).resolve().parents[2]
CALCULATOR = "chatrlhf.envs.calculator:CalculatorEnv"
HERE = "tests.train.test_rl_episodes"
QUESTION = {"prompt": "What is 408 + 5?", "a": 408, "op": "+", "b": 5, "answer": 413}


class AreYouSure:
    """The calculator question, then "Are you sure?" after the first answer; the second answer is judged."""

    def reset(self, record: dict) -> list[dict]:
        self.record = record
        return [{"role": "user", "content": record["prompt"]}]

    def step(self, turn: str) -> Reply:
        if not hasattr(self, "asked"):
            self.asked = True
            return Reply([{"role": "user", "content": "Are you sure? Answer again."}])
        return Reply(reward=judge(self.record["prompt"], turn, self.record["answer"]), done=True)


class DescribedCalculator(CalculatorEnv):
    """The demo's environment with its tool described in the prompt (~450 byte tokens)."""

    describe_tools = True


def assistant_turns(prompt: str, response: str, messages: list[dict], **fields) -> float:
    """A reward function that reads the conversation: the number of policy turns."""
    return float(sum(m["role"] == "assistant" for m in messages))


class PerRow:
    """A generator whose n-th call answers active row r with `replies[n][r]` + EOS (byte tokens, log-prob 0)."""

    def __init__(self, replies: list[list[str]]):
        self.replies, self.calls = replies, 0

    def generate(self, prompts, *, greedy=False, logprobs=False, width=None) -> Generated:
        rows = [list(r.encode()) + [EOS_ID] for r in self.replies[self.calls]]
        self.calls += 1
        width = max(map(len, rows))
        tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in rows])
        return Generated(tokens, mask, torch.zeros(tokens.shape), ["stop"] * len(rows))


def call(**arguments) -> str:
    return f"<tool_call>{json.dumps({'name': 'calculator', 'arguments': arguments})}</tool_call>"


@pytest.fixture(scope="module")
def played(tiny_dirs):
    """Two calculator episodes: row 0 calls the tool, then answers 413 (two turns, the tool result between);
    row 1 answers 36 at once. Returns (tokenizer, the policy tokens of each row, episodes, rollout)."""
    tok = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    runner = EpisodeRunner(LoadedEnvironment(CALCULATOR, CalculatorEnv), tok, EpisodeLimits(max_tokens=4096))
    replies = [[" " + call(expression="408 + 5"), " 36"], [" 413"]]
    episodes = runner.run(PerRow(replies), [QUESTION, QUESTION])
    policy = [list(replies[0][0].encode()) + [EOS_ID] + list(replies[1][0].encode()) + [EOS_ID]]
    policy.append(list(replies[0][1].encode()) + [EOS_ID])
    prompts = [Prompt(ids=[], text=QUESTION["prompt"], extra={k: v for k, v in QUESTION.items() if k != "prompt"})] * 2
    return tok, policy, episodes, episode_rollout(episodes, prompts, tok.pad_token_id, torch.device("cpu"))


def test_the_loss_mask_covers_the_policy_tokens_and_the_attention_every_token(played):
    tok, policy, episodes, rollout = played
    assert [e.end for e in episodes] == ["done", "done"] and episodes[0].tool_results[0].content == "413"
    for i, ep in enumerate(episodes):
        assert rollout.response[i][rollout.response_mask[i] > 0].tolist() == policy[i]
        assert rollout.sequences[i][rollout.attention_mask[i] > 0].tolist() == ep.ids
    # row 0's response holds the tool result: attended to, not trained on
    env_part = (rollout.response_attention[0] > 0) & (rollout.response_mask[0] == 0)
    assert "<tool_response>\n413\n</tool_response>" in tok.decode(rollout.response[0][env_part])
    assert not ((rollout.response_attention[1] > 0) & (rollout.response_mask[1] == 0)).any()


def test_trainer_logprobs_attend_to_the_environments_tokens(played, tiny_dirs):
    tok, _, episodes, rollout = played
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], dtype=torch.float32).eval()
    batch = collate_episodes(episodes, tok.pad_token_id)
    with torch.no_grad():
        expected = sequence_token_logprobs(model, batch.ids, batch.attention_mask)[batch.policy_mask.bool()]
        got = rollout_logprobs(model, rollout)[rollout.response_mask.bool()]
        # the old rollout's attention (the loss mask) would hide the tool result from the answer after it
        blind = dataclasses.replace(rollout, response_attention=None)
        wrong = rollout_logprobs(model, blind)[rollout.response_mask.bool()]
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(wrong, expected, atol=1e-3)


def test_critic_values_attend_to_the_environments_tokens(played, tiny_dirs):
    """PPO's V(s_t) at each policy token is the critic's value at the token before it in the whole episode (the
    tool result included), as a plain forward over the collated episodes gives it."""
    tok, _, episodes, rollout = played
    critic = load_value_model(tiny_dirs["llama"], tok, "float32", torch.device("cpu"), require_head=False).eval()
    torch.manual_seed(0)
    torch.nn.init.normal_(critic.head.weight, std=1.0)  # values of order 1 (a fresh head's are near 0)
    batch = collate_episodes(episodes, tok.pad_token_id)
    policy = batch.policy_mask.bool()
    with torch.no_grad():
        direct = critic(batch.ids, batch.attention_mask, position_ids(batch.attention_mask))
        expected = direct[:, :-1][policy[:, 1:]]  # the value of the state before token t sits at t − 1
        got = rollout_values(critic, rollout)[rollout.response_mask.bool()]
        blind = rollout_values(critic, dataclasses.replace(rollout, response_attention=None))
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(blind[rollout.response_mask.bool()], expected, atol=1e-3)


def test_the_reward_model_scores_the_whole_episode_as_played(played, tiny_dirs, tmp_path):
    """The reward model's score of an episode is its value at the episode's last token, from a forward over the
    episode's own ids alone (unpadded): the whole conversation, the tool result included, token in."""
    tok, _, episodes, rollout = played
    rm_dir = add_value_head(tiny_dirs["llama"], tmp_path / "rm")
    scorer = build_scorer(str(rm_dir), [], None, tok, "float32", torch.device("cpu"), environment=True)
    rm = scorer.modules()[0]
    torch.manual_seed(0)
    torch.nn.init.normal_(rm.head.weight, std=1.0)  # scores of order 1 (a fresh head's are near 0)
    with torch.no_grad():
        scores = score_rollout(scorer, rollout, tok)
        expected = []
        for ep in episodes:
            ids = torch.tensor([ep.ids])
            expected.append(float(rm(ids, torch.ones_like(ids), torch.arange(len(ep.ids))[None])[0, -1]))
        blind = score_rollout(scorer, dataclasses.replace(rollout, response_attention=None), tok)
    assert sorted(scores.parts) == ["env", "reward_model"]
    assert torch.allclose(scores.parts["reward_model"], torch.tensor(expected), atol=1e-5)
    assert torch.allclose(scores.total, scores.parts["reward_model"] + scores.parts["env"])
    # without the environment's tokens in view, the episode that called the tool would score otherwise
    assert abs(float(blind.parts["reward_model"][0]) - expected[0]) > 1e-3


def test_a_reward_model_with_another_tokenizer_is_refused_on_episodes(tiny_dirs, tmp_path):
    rm_dir = add_value_head(tiny_dirs["llama"], tmp_path / "rm")
    other = AutoTokenizer.from_pretrained(rm_dir)
    other.add_tokens(["<|extra|>"])
    other.save_pretrained(rm_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    with pytest.raises(UserError, match="has a tokenizer other than the actor's: on episodes"):
        build_scorer(str(rm_dir), [], None, tok, "float32", torch.device("cpu"), environment=True)


def test_episode_rewards_and_reward_functions_on_the_conversation(played):
    tok, policy, episodes, rollout = played
    spec = f"{HERE}:assistant_turns"
    scorer = build_scorer(None, [spec], [1.0, 0.5], tok, "float32", torch.device("cpu"), environment=True)
    scores = score_rollout(scorer, rollout, tok)
    assert scores.parts["env"].tolist() == [1.0, 0.0]  # 413 is right, 36 is not
    assert scores.parts["assistant_turns"].tolist() == [2.0, 1.0]
    assert scores.total.tolist() == [1.0 + 0.5 * 2.0, 0.5 * 1.0]
    metrics = episode_metrics(episodes, rollout)
    calc = LoadedEnvironment(CALCULATOR, CalculatorEnv)
    first = ChatFormat(tok, calc.tools, calc.describe_tools).prompt_ids(episodes[0].messages[:1])
    env_tokens = len(episodes[0].ids) - len(first) - len(policy[0])  # row 0's tokens after the question, not sampled
    assert metrics["episode/turns_mean"] == 1.5 and metrics["episode/tool_calls_mean"] == 0.5
    assert metrics["episode/tool_errors_mean"] == 0.0 and metrics["episode/end_done_frac"] == 1.0
    assert metrics["episode/env_tokens_mean"] == env_tokens / 2 and env_tokens > 10


# ------------------------------------------------------------------------------------------------ through the CLI


def chatrlhf(*args: str, code: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "chatrlhf.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == code, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def rl_args(actor, out, env: str, algo: str, group_size: int, *extra: str, prompts: int = 4) -> list[str]:
    return ["rl", "--actor", str(actor), "--env", env, "--output_dir", str(out), "--data.paths",
            "calculator:prompts:48:1", "--data.eval_fraction", "0.1", "--train.algo", algo, "--train.group_size",
            str(group_size), "--train.iterations", "2", "--train.rollout_batch_size", str(prompts),
            "--train.generation.max_new_tokens", "40", "--train.episode.max_tokens", "1024",
            "--train.eval_prompts", "2", "--train.actor_optim.lr", "1e-3", "--run.progress", "False",
            "--run.log_every", "1", *extra]  # fmt: skip


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


EPISODE_KEYS = ("episode/turns_mean", "episode/tool_calls_mean", "episode/tool_errors_mean", "episode/tokens_mean",
                "episode/env_tokens_mean", "episode/end_done_frac", "reward/env_mean")  # fmt: skip


def test_rl_on_calculator_episodes_through_the_cli(sft_llama, tmp_path):
    out = tmp_path / "calc"
    chatrlhf(*rl_args(sft_llama, out, CALCULATOR, "grpo", 2))
    lines = metrics(out)
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        assert all(k in m for k in EPISODE_KEYS)
        assert 0.0 <= m["reward/env_mean"] <= 1.0 and m["episode/turns_mean"] >= 1.0
        assert m["rollout/logprob_diff"] < 1e-4  # the trainer scores the sampled ids, as the sampler did
    summary = json.loads((out / "summary.json").read_text())
    assert "eval/score_mean" in summary and (out / "model" / "config.json").is_file()
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert rows and all(r["messages"][0] == {"role": "user", "content": r["prompt"]} for r in rows)


def policy_words(prompt: str, response: str, messages: list[dict], **fields) -> float:
    """A reward function that reads the conversation and tells almost any two samples apart: the words of the
    policy's turns."""
    return float(sum(len(m["content"].split()) for m in messages if m["role"] == "assistant"))


def policy_text(prompt: str, response: str, messages: list[dict], **fields) -> float:
    """A hash of the policy's turns' text in [0, 1): different for almost any two samples."""
    return sum(ord(c) for m in messages if m["role"] == "assistant" for c in m["content"]) % 97 / 97


ALGOS = [("grpo", 2), ("rloo", 2), ("reinforce_pp", 1), ("remax", 1), ("dapo", 2), ("gspo", 2), ("cispo", 2)]


@pytest.mark.parametrize("algo, group_size", ALGOS)
def test_multi_turn_episodes_train_on_policy_tokens_only(algo, group_size, sft_llama, tmp_path):
    """A follow-up user turn inside every episode that reaches it: its tokens are in the sequence (attended to:
    the trainer's log-probs still equal the sampler's) but not in the loss (`response/length_mean` counts the
    policy's tokens only); reward functions see the whole conversation. ReMax's baseline is a greedy episode (its
    reward counts that episode's turns), DAPO's dynamic sampling draws rounds of episodes, GSPO's sequence ratio and
    CISPO's weights run over the policy's tokens. Every algorithm draws 8 episodes an iteration (4 prompts × 2, or 8
    × 1): the SFT model's first answer to a calculator prompt often runs to the 40-token limit, which ends the
    episode before the follow-up, and 4 episodes alone can all end that way."""
    out = tmp_path / algo
    env, turns, words = f"{HERE}:AreYouSure", f"{HERE}:assistant_turns", f"{HERE}:policy_words"
    chatrlhf(*rl_args(sft_llama, out, env, algo, group_size, "--reward_functions", turns, words,
                      "--reward_weights", "1", "1", "0.01", "--train.episode.max_turns", "3",
                      prompts=8 // group_size))  # fmt: skip
    lines = metrics(out)
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        assert m["episode/turns_mean"] > 1.0 and m["episode/env_tokens_mean"] > 0
        assert m["reward/assistant_turns_mean"] == pytest.approx(m["episode/turns_mean"], abs=1e-6)
        assert m["rollout/logprob_diff"] < 1e-4
        assert m["response/length_mean"] + m["episode/env_tokens_mean"] < m["episode/tokens_mean"]
        assert math.isfinite(m["loss/policy"]) and m["optim/actor_grad_norm"] > 0
        if algo == "remax":  # env + turns + 0.01 · words of the greedy episode; it has at least one turn
            assert m["reward/greedy_mean"] >= 1.0
        if algo == "dapo":
            assert m["sampling/rounds"] >= 1 and m["reward/score_std"] > 0


def test_sampler_logprobs_on_multi_turn_episodes(sft_llama, tmp_path):
    """`--train.update.old_logprobs sampler` on two-turn episodes: π_old's log-probs and entropies are those the
    generator recorded turn by turn (the environment's tokens between the turns hold none), and the run is the
    one that makes the trainer's forward over the whole episode, up to rounding; no engine mismatch is logged. The
    sampler run also trims its micro-batches' padding (`--train.update.trim_padding`: an episode's columns run to
    its last attended token, the environment's included)."""
    env, turns, text = f"{HERE}:AreYouSure", f"{HERE}:assistant_turns", f"{HERE}:policy_text"
    runs = {}
    for mode in ("sampler", "forward"):
        out = tmp_path / mode
        # the text tells the episodes apart: with tied rewards the whitened advantages would be rounding noise
        chatrlhf(*rl_args(sft_llama, out, env, "reinforce_pp", 1, "--reward_functions", turns, text,
                          "--train.episode.max_turns", "3", "--train.kl.placement", "reward",
                          "--train.update.old_logprobs", mode, "--train.update.micro_batch_size", "2",
                          "--train.update.trim_padding", str(mode == "sampler")))  # fmt: skip
        runs[mode] = metrics(out)
    for s, f in zip(runs["sampler"], runs["forward"]):
        assert "rollout/logprob_diff" not in s and f["rollout/logprob_diff"] < 1e-4
        assert s["episode/turns_mean"] == f["episode/turns_mean"] > 1.0
        for key in ("policy/entropy", "kl/mean", "loss/policy", "reward/total_mean"):
            # kl/mean sums an episode's per-token differences: at the first iteration 0 from the same forward,
            # ~1e-6 from the sampler's KV-cached decoding against the reference's forward
            assert s[key] == pytest.approx(f[key], rel=1e-4, abs=1e-5), key


def test_ppo_with_a_reward_model_on_multi_turn_episodes(sft_llama, tmp_path):
    """InstructGPT's setting on the two-turn environment: PPO with a reward model that scores the whole episode
    and initialises the critic (DeepSpeed-Chat's default). The critic's values and GAE cover the policy's tokens (the
    values attend to the follow-up question; tests/rlhf/test_advantages.py checks GAE across it), the value loss
    trains, and the trainer's log-probs equal the sampler's."""
    out = tmp_path / "ppo"
    rm = add_value_head(sft_llama, tmp_path / "rm")
    chatrlhf(*rl_args(sft_llama, out, f"{HERE}:AreYouSure", "ppo", 1, "--reward_model", str(rm),
                      "--train.episode.max_turns", "3"))  # fmt: skip
    lines = metrics(out)
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        assert m["episode/turns_mean"] > 1.0 and m["episode/env_tokens_mean"] > 0
        assert m["rollout/logprob_diff"] < 1e-4
        for key in ("values/mean", "returns/mean", "loss/value", "optim/critic_grad_norm", "reward/reward_model_mean"):
            assert math.isfinite(m[key]), key
        assert m["reward/score_mean"] == pytest.approx(m["reward/reward_model_mean"] + m["reward/env_mean"], abs=1e-5)
    assert lines[0]["loss/value"] > 0 and (out / "critic" / "config.json").is_file()


def test_a_resumed_episode_run_continues_as_the_uninterrupted_one(sft_llama, tmp_path):
    """4 GRPO iterations on the two-turn environment, checkpointed every 2, with a held-out evaluation every 2. The
    interrupted run is the finished one with its last checkpoint, models and summary deleted (killed after
    iteration 4, before its checkpoint); `--resume auto` continues from iteration 2, and every metric line, the
    summary, the held-out episodes (samples.jsonl) and every saved weight equal the uninterrupted run's, exactly."""
    from tests.train.test_resume import RESUMING, assert_same_results

    def args(out: Path, *extra: str) -> list[str]:
        a = rl_args(sft_llama, out, f"{HERE}:AreYouSure", "grpo", 2, "--reward_functions", f"{HERE}:assistant_turns",
                    "--train.episode.max_turns", "3", "--checkpoint.every", "2", "--checkpoint.keep", "2",
                    "--train.eval_every", "2", *extra)  # fmt: skip
        a[a.index("--train.iterations") + 1] = "4"
        return a

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    chatrlhf(*args(reference))
    assert [m["step"] for m in metrics(reference)] == [1, 2, 3, 4]
    shutil.copytree(reference, killed)
    shutil.rmtree(killed / "checkpoints" / "step-00000004")
    shutil.rmtree(killed / "model")
    (killed / "summary.json").unlink()
    out = chatrlhf(*args(killed, "--resume", "auto")).stdout
    assert RESUMING.findall(out) == [(str(killed / "checkpoints" / "step-00000002"), "2")], out
    assert_same_results(reference, killed)
    assert all(m["episode/turns_mean"] > 1.0 for m in metrics(killed))


# ------------------------------------------------------------------------------------------------ refused


def test_overlong_shaping_on_episodes_sums_each_turns_penalty():
    """DAPO's overlong punishment (max_new_tokens 8, buffer 4) on a two-turn episode of 3 + 8 policy tokens: the
    first turn is short (0), the second runs to the limit (−1), so the episode's penalty is −1; a single response of
    7 tokens gets overlong_penalty(7) as before, (4 − 7) / 4."""
    mask = torch.tensor([[1.0] * 3 + [0.0] * 2 + [1.0] * 8, [1.0] * 7 + [0.0] * 6])
    assert run_lengths(mask).tolist() == [[3, 8], [7, 0]]
    train = RLTrainConfig(algo="dapo", group_size=2, generation=GenerationConfig(max_new_tokens=8),
                          reward=RewardShapingConfig(overlong_buffer=4))  # fmt: skip
    zeros = torch.zeros_like(mask)
    adv = ALGORITHMS["dapo"].advantages(AdvantageInputs(torch.zeros(2), zeros, zeros, mask, 0.0), train)
    assert adv.length_penalty.tolist() == [-1.0, -0.75]
    RLConfig(actor="a", env=CALCULATOR, train=train).validate(need_data=False)  # accepted on episodes


def test_episodes_on_a_sharded_zero3_generation_are_refused():
    engine = EngineConfig(kind="deepspeed", zero_stage=3, gather_for_generation=False)
    cfg = RLConfig(actor="a", env=CALCULATOR, engine=engine, train=RLTrainConfig(algo="grpo", group_size=2))
    with pytest.raises(ConfigError, match="engine.zero_stage=3 and engine.gather_for_generation=False"):
        cfg.validate(need_data=False)
    cfg.engine = EngineConfig(kind="deepspeed", zero_stage=3)
    cfg.validate(need_data=False)


def test_an_environment_that_does_not_import_stops_the_run_with_exit_2(tiny_dirs, tmp_path):
    proc = chatrlhf(*rl_args(tiny_dirs["llama"], tmp_path / "bad", "no_such_module:Env", "grpo", 2), code=2)
    assert "environment 'no_such_module:Env': cannot import" in proc.stderr and "Traceback" not in proc.stderr


def test_episodes_past_the_models_context_are_refused_up_front(tiny_dirs, tmp_path):
    """The tiny GPT-2 has 512 learned positions: 1024 + 40 tokens would index past them. The calculator's first
    messages alone, with its tool described, are more than 472 tokens."""
    proc = chatrlhf(*rl_args(tiny_dirs["gpt2"], tmp_path / "long", CALCULATOR, "grpo", 2), code=2)
    assert "past the model's context of 512 tokens" in proc.stderr and "Traceback" not in proc.stderr
    assert "max_tokens=1024 (train.episode.max_tokens)" in proc.stderr
    assert "max_new_tokens=40 (train.generation.max_new_tokens)" in proc.stderr
    args = rl_args(tiny_dirs["gpt2"], tmp_path / "tools", f"{HERE}:DescribedCalculator", "grpo", 2)
    args[args.index("--train.episode.max_tokens") + 1] = "472"
    proc = chatrlhf(*args, code=2)
    assert "first messages take at least" in proc.stderr and "over max_tokens=472" in proc.stderr
    assert not (tmp_path / "long").exists() and not (tmp_path / "tools").exists()
    # chatrlhf eval --env checks each model it plays, naming its own options
    proc = chatrlhf("eval", "--models", str(tiny_dirs["gpt2"]), "--env", f"{HERE}:AreYouSure", "--prompts",
                    "calculator:prompts:4:9", "--num_prompts", "4", "--generation.max_new_tokens", "40",
                    "--episode.max_tokens", "480", "--output_dir", str(tmp_path / "eval"), code=2)  # fmt: skip
    assert "past the model's context of 512 tokens" in proc.stderr and "Traceback" not in proc.stderr
    assert "max_tokens=480 (episode.max_tokens)" in proc.stderr
    assert "max_new_tokens=40 (generation.max_new_tokens)" in proc.stderr


@pytest.mark.parametrize("algo", get_args(Algo))
def test_every_algorithm_is_accepted_on_episodes(algo):
    rules = ALGORITHM_RULES[algo]
    group = 1 if rules.max_group == 1 else 2
    cfg = RLConfig(actor="a", env=CALCULATOR, train=RLTrainConfig(algo=algo, group_size=group))
    cfg.critic = "c" if rules.critic else None
    cfg.validate(need_data=False)


def test_an_environment_is_a_reward_source():
    RLConfig(actor="a", env=CALCULATOR, train=RLTrainConfig(algo="grpo", group_size=2)).validate(need_data=False)
    cfg = RLConfig(actor="a", env=CALCULATOR, reward_weights=[1.0], reward_functions=["m:f"],
                   train=RLTrainConfig(algo="grpo", group_size=2))  # fmt: skip
    with pytest.raises(ConfigError, match="1 values for 2 reward sources"):
        cfg.validate(need_data=False)


# ------------------------------------------------------------------------------------------------ per-turn credit


def test_turn_scores_sit_at_the_last_token_of_each_turn():
    """Two policy turns (response positions 0–1 and 4–6, the environment's tokens between): each turn's reward,
    times the environment's weight, at its turn's last policy token."""
    from types import SimpleNamespace

    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    episodes = [SimpleNamespace(turn_rewards=[0.5, 2.0], turns=2), SimpleNamespace(turn_rewards=[1.0], turns=1)]
    got = turn_scores(SimpleNamespace(response_mask=mask, episodes=episodes), weight=0.5)
    assert got.tolist() == [[0, 0.25, 0, 0, 0, 0, 1.0, 0], [0, 0, 0.5, 0, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="2 policy turns in the mask, 1 played"):
        turn_scores(SimpleNamespace(response_mask=mask[:1], episodes=episodes[1:]), weight=1.0)


def test_per_turn_credit_leaves_earlier_rewards_out_of_later_turns_returns():
    """PPO's returns at γ = λ = 1 with zero values: with the episode's return at its end (credit end) every policy
    token's return is 0.5 + 2.0; with each turn's reward at its turn (credit turn) the second turn's tokens get
    only their own 2.0, the first turn's both."""
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    zeros = torch.zeros_like(mask)
    train = RLTrainConfig(algo="ppo", advantage=AdvantageConfig(gamma=1.0, lam=1.0, whiten=False))
    end = ALGORITHMS["ppo"].advantages(AdvantageInputs(torch.tensor([2.5]), zeros, zeros, mask, 0.0, zeros), train)
    placed = torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0]])
    turn = ALGORITHMS["ppo"].advantages(
        AdvantageInputs(torch.tensor([0.0]), zeros, zeros, mask, 0.0, zeros, turn_scores=placed), train
    )
    assert end.returns.tolist() == [[2.5, 2.5, 0, 0, 2.5, 2.5, 2.5, 0]]
    assert turn.returns.tolist() == [[2.5, 2.5, 0, 0, 2.0, 2.0, 2.0, 0]]
    assert turn.rewards.sum().item() == end.rewards.sum().item() == 2.5  # the same total reward, placed otherwise


def test_reinforce_pp_with_per_turn_credit_on_the_multi_turn_chat_task(sft_llama, tmp_path):
    """Through the CLI on LetterChainEnv (both turns judged): the run trains, and its total reward is the episodes'
    return, as with credit at the end; a sequence-level algorithm is refused."""
    out = tmp_path / "turns"
    args = ["rl", "--actor", str(sft_llama), "--env", "chatrlhf.envs.letter_chain:LetterChainEnv",
            "--data.paths", "demo:prompts:24:2", "--data.eval_fraction", "0", "--train.algo", "reinforce_pp",
            "--train.group_size", "2", "--train.iterations", "2", "--train.rollout_batch_size", "4",
            "--train.generation.max_new_tokens", "24", "--train.episode.max_turns", "2",
            "--train.episode.credit", "turn", "--train.kl.coef", "0", "--run.progress", "False",
            "--run.log_every", "1", "--output_dir", str(out)]  # fmt: skip
    chatrlhf(*args)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        assert m["episode/turns_mean"] > 1.0 and math.isfinite(m["loss/policy"])
        assert m["reward/total_mean"] == pytest.approx(m["reward/env_mean"], abs=1e-6)
    args[args.index("reinforce_pp")] = "grpo"
    proc = chatrlhf(*args[:-1], str(tmp_path / "refused"), code=2)
    assert "train.episode.credit=turn" in proc.stderr and "Traceback" not in proc.stderr
