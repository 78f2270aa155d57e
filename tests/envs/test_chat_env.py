"""The Gymnasium chat environment on a tiny model: API conformance, episodes, rewards, bad arguments.

Expected rewards are computed without the environment: the demo judge called directly on the answer, and the reward
model's plain transformers forward (its pooled score at the last token) on token ids built from the prompt's bytes.
"""

from __future__ import annotations

import sys
import warnings

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import chatrlhf
from chatrlhf.demo.task import WORDS, judge, make_prompts, parse_prompt
from chatrlhf.envs import CHAT_ENV_ID, ChatEnv, escape_text, register_envs, unescape_text
from chatrlhf.envs.chat import ESCAPED_CHARSET
from chatrlhf.errors import DataError, UserError
from chatrlhf.models.tiny import EOS_ID

JUDGE = "chatrlhf.demo.task:judge"
PROMPTS = make_prompts(32, seed=0)


@pytest.fixture
def make_env(tiny_dirs):
    def make(**overrides) -> ChatEnv:
        kwargs = dict(tokenizer=str(tiny_dirs["llama"]), prompts=PROMPTS, reward_functions=[JUDGE])
        return ChatEnv(**{**kwargs, **overrides})

    return make


def rendered_prompt_bytes(prompt: str) -> list[int]:
    """The tiny chat template's generation prompt for one user turn, as byte-token ids (id = byte value)."""
    return list(f"User: {prompt}\nAssistant:".encode())


def answers(prompt: str) -> dict[str, str]:
    """A perfect answer (N words starting with the letter) and a wrong one (N words starting with others)."""
    n, letter = parse_prompt(prompt)
    return {
        "perfect": " ".join([w for w in WORDS if w[0] == letter][:n]),
        "wrong": " ".join([w for w in WORDS if w[0] != letter][:n]),
    }


def type_text(env: ChatEnv, text: str) -> list[tuple]:
    """Token mode: one step per byte of " " + text (the template puts a space before the answer), then EOS."""
    return [env.step(b) for b in (" " + text).encode()] + [env.step(EOS_ID)]


@pytest.mark.parametrize("mode", ["token", "response"])
def test_check_env_through_make(tiny_dirs, mode):
    env = gymnasium.make(
        CHAT_ENV_ID, tokenizer=str(tiny_dirs["llama"]), prompts=PROMPTS, reward_functions=[JUDGE], action_mode=mode
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # gymnasium reports every problem it finds as a warning
        check_env(env.unwrapped)


@pytest.mark.parametrize("mode", ["token", "response"])
def test_check_env_direct(make_env, mode):
    env = make_env(action_mode=mode, render_mode="ansi")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Only an environment made by gymnasium.make has a spec to re-make it with the other render modes.
        warnings.filterwarnings("ignore", message=".*Not able to test alternative render modes.*")
        check_env(env)


def test_registration_is_idempotent_and_make_imports_the_module(monkeypatch, tiny_dirs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        register_envs()
        register_envs()
    assert gymnasium.spec(CHAT_ENV_ID).entry_point == "chatrlhf.envs.chat:ChatEnv"
    # As in a fresh interpreter: nothing registered, chatrlhf.envs not imported; the "module:id" form imports it.
    monkeypatch.delitem(gymnasium.registry, CHAT_ENV_ID)
    monkeypatch.delitem(sys.modules, "chatrlhf.envs")
    monkeypatch.delitem(sys.modules, "chatrlhf.envs.chat")
    monkeypatch.delattr(chatrlhf, "envs")
    env = gymnasium.make(
        "chatrlhf.envs:chatrlhf/Chat-v0",
        tokenizer=str(tiny_dirs["llama"]),
        prompts=["Name 2 words that begin with b."],
        reward_functions=[JUDGE],
    )
    obs, info = env.reset(seed=0)
    assert info["prompt"] == "Name 2 words that begin with b."
    assert obs["text"] == "User: Name 2 words that begin with b.\nAssistant:"


def test_reset_seed_reproducible(make_env):
    def draws(env, seed):
        first = env.reset(seed=seed)[1]["prompt_index"]
        return [first] + [env.reset()[1]["prompt_index"] for _ in range(7)]

    a, b = make_env(), make_env()
    assert draws(a, 3) == draws(b, 3) == draws(a, 3)
    assert draws(a, 3) != draws(a, 4)
    obs_a, _ = a.reset(seed=11)
    obs_b, _ = b.reset(seed=11)
    assert np.array_equal(obs_a["token_ids"], obs_b["token_ids"]) and obs_a["text"] == obs_b["text"]


@pytest.mark.parametrize("kind", ["perfect", "wrong"])
def test_token_episode_reward_is_the_judge(make_env, kind):
    env = make_env(max_new_tokens=64)
    obs, info = env.reset(seed=1)
    prompt = info["prompt"]
    answer = answers(prompt)[kind]
    expected = judge(prompt, answer)
    assert expected == (1.0 if kind == "perfect" else 0.0)

    steps = type_text(env, answer)
    assert all(r == 0.0 and not term and not trunc for _, r, term, trunc, _ in steps[:-1])
    obs, reward, terminated, truncated, info = steps[-1]
    assert terminated and not truncated
    assert reward == expected
    assert info == {"reward_parts": {"judge": expected}, "response": answer}
    ids = rendered_prompt_bytes(prompt) + list((" " + answer).encode()) + [EOS_ID]
    assert obs["prompt_length"] == len(rendered_prompt_bytes(prompt)) and obs["length"] == len(ids)
    assert obs["token_ids"][: len(ids)].tolist() == ids
    assert (obs["token_ids"][len(ids) :] == env.tok.pad_token_id).all()
    with pytest.raises(RuntimeError, match="episode is over"):
        env.step(EOS_ID)


def test_token_episode_truncates_at_max_new_tokens(make_env):
    env = make_env(max_new_tokens=5, render_mode="ansi")
    _, info = env.reset(seed=2)
    prompt = info["prompt"]
    steps = [env.step(ord("x")) for _ in range(5)]
    assert [(term, trunc) for _, _, term, trunc, _ in steps] == [(False, False)] * 4 + [(False, True)]
    assert [r for _, r, *_ in steps[:-1]] == [0.0] * 4
    obs, reward, _, _, info = steps[-1]
    assert reward == judge(prompt, "xxxxx") and info == {"reward_parts": {"judge": reward}, "response": "xxxxx"}
    assert obs["length"] == obs["prompt_length"] + 5
    assert env.render().endswith("Assistant:xxxxx")


@pytest.mark.parametrize("kind", ["perfect", "wrong"])
def test_response_mode_matches_token_mode(make_env, kind):
    token_env, response_env = make_env(), make_env(action_mode="response")
    _, info = token_env.reset(seed=5)
    assert response_env.reset(seed=5)[1] == info
    prompt = info["prompt"]
    answer = answers(prompt)[kind]
    token_obs, token_reward, *_ = type_text(token_env, answer)[-1]
    obs, reward, terminated, truncated, info = response_env.step(answer)
    assert terminated and not truncated
    assert reward == token_reward == judge(prompt, answer)
    assert info == {"reward_parts": {"judge": reward}, "response": answer}
    assert np.array_equal(obs["token_ids"], token_obs["token_ids"]) and obs["text"] == token_obs["text"]


def test_response_mode_cuts_a_long_answer(make_env):
    env = make_env(action_mode="response", max_new_tokens=8)  # the template adds " " and EOS: 6 characters fit
    assert env.action_space.max_length == 6
    env.reset(seed=0)
    obs, _, terminated, truncated, info = env.step("abcdef")
    assert terminated and not truncated and obs["token_ids"][obs["length"] - 1] == EOS_ID
    env.reset(seed=0)
    with pytest.raises(ValueError, match="not in the response action space"):
        env.step("abcdefg")
    with pytest.raises(ValueError, match="escape_text"):
        env.step("café")


def test_response_mode_cuts_at_max_new_tokens(make_env):
    # The byte tokenizer never spends more tokens than characters, so no answer in the action space is cut; a
    # tokenizer that does spend more would need the cut. Widen the space to reach it.
    env = make_env(action_mode="response", max_new_tokens=8)
    env.action_space = gymnasium.spaces.Text(max_length=50, min_length=0, charset=ESCAPED_CHARSET)
    _, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info2 = env.step("abcdefghij")
    assert truncated and not terminated
    assert obs["token_ids"][obs["prompt_length"] : obs["length"]].tolist() == list(b" abcdefg")
    assert reward == judge(info["prompt"], "abcdefg") and info2["response"] == "abcdefg"


def test_reward_model_and_judge_weighted(make_env, tiny_dirs, tmp_path):
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_dirs["llama"], num_labels=1)
    rm.config.pad_token_id = 256
    rm.save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(tiny_dirs["llama"]).save_pretrained(tmp_path / "rm")
    w_rm, w_judge = 0.5, 2.0
    env = make_env(reward_model=str(tmp_path / "rm"), reward_weights=[w_rm, w_judge])
    _, info = env.reset(seed=7)
    prompt = info["prompt"]
    answer = answers(prompt)["perfect"]
    _, reward, terminated, _, info = type_text(env, answer)[-1]

    ids = rendered_prompt_bytes(prompt) + list((" " + answer).encode()) + [EOS_ID]
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        rm_score = plain(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert terminated
    assert info["reward_parts"]["judge"] == judge(prompt, answer) == 1.0
    assert info["reward_parts"]["reward_model"] == pytest.approx(rm_score, abs=1e-6)
    assert reward == pytest.approx(w_rm * rm_score + w_judge * 1.0, abs=1e-6)


def test_extra_fields_reach_reward_functions(make_env, tmp_path, monkeypatch):
    (tmp_path / "target_reward.py").write_text(
        "def exact(prompt, response, target):\n    return float(response == target)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    records = [
        {"prompt": "Say hi.", "target": "hi"},
        {"messages": [{"role": "user", "content": "Say yo."}], "target": "yo"},
    ]
    env = make_env(prompts=records, reward_functions=["target_reward:exact"], action_mode="response")
    for index, answer in ((0, "hi"), (1, "yo")):
        env.reset(options={"prompt_index": index})
        assert env.step(answer)[1] == 1.0
        env.reset(options={"prompt_index": index})
        assert env.step("no")[1] == 0.0


def test_text_escaping_is_lossless():
    samples = ["plain ASCII\n\twith tabs", "back\\slash \\x41 \\u00e9", "café ü", "😀 emoji", "\x00\r\x7f", "\ufffd"]
    for s in samples:
        escaped = escape_text(s)
        assert set(escaped) <= set(ESCAPED_CHARSET)
        assert unescape_text(escaped) == s
        assert len(escaped) <= 4 * len(s.encode("utf-8"))
    assert escape_text("é😀\\") == "\\xe9\\U0001f600\\\\"
    assert unescape_text("C:\\path \\ud800 end\\") == "C:\\path \\ud800 end\\"  # no escape: stands as is


def test_observation_text_of_invalid_utf8_stays_in_space(make_env):
    env = make_env()
    env.reset(seed=0)
    for byte in (0xE4, 0xFF, 0x00, 0x5C):  # a cut multi-byte character, invalid bytes, NUL, backslash
        obs, *_ = env.step(byte)
    assert obs in env.observation_space
    ids = obs["token_ids"][: obs["length"]].tolist()
    assert unescape_text(obs["text"]) == env.tok.decode(ids)
    assert obs["text"].endswith("Assistant:\\ufffd\\ufffd\\x00\\\\")


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(action_mode="words"), UserError, "action_mode='words': expected one of 'token', 'response'"),
        (dict(reward_functions=[]), UserError, "no reward source"),
        (dict(reward_functions=JUDGE), UserError, "expected a list of 'module:function' specs"),
        (dict(reward_weights=[1.0, 2.0]), UserError, "2 reward weights for 1 reward sources"),
        (dict(reward_functions=["chatrlhf.demo.task:nope"]), UserError, "cannot import"),
        (dict(max_new_tokens=0), UserError, "max_new_tokens=0: expected a positive integer"),
        (dict(max_prompt_tokens=10), DataError, "over max_prompt_len=10"),
        (dict(prompts=[]), UserError, "prompts: the list is empty"),
        (dict(prompts=["ok", " "]), DataError, "prompts:item 2: field 'prompt': is only whitespace"),
        (dict(prompts="/nonexistent/prompts.jsonl"), DataError, "no such file or directory"),
        (dict(action_mode="response", max_new_tokens=2), UserError, "leaves no room for an answer"),
        (dict(render_mode="human"), UserError, "render_mode='human'"),
    ],
)
def test_bad_arguments(make_env, overrides, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        make_env(**overrides)


def test_bad_steps(make_env):
    env = make_env()
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(1)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"not a token id in \[0, 259\)"):
        env.step(259)
    with pytest.raises(ValueError, match="unknown reset options"):
        env.reset(options={"prompt": 1})
    with pytest.raises(ValueError, match=r"prompt_index=32: expected an integer in \[0, 32\)"):
        env.reset(options={"prompt_index": len(PROMPTS)})


# ------------------------------------------------------------------------------------------------ multi-turn: env=


LETTER_CHAIN = "chatrlhf.envs.letter_chain:LetterChainEnv"
KNOWN_CALCULATOR = "tests.envs.test_episodes:KnownCalculator"


def test_token_mode_plays_the_episode_the_runner_plays(make_env, tiny_dirs):
    """Chat-v0 with env is a view on the RL episodes: typing the tokens a generator sampled, turn by turn, gives
    the runner's episode token for token, each turn's reward at the step that ends it, and the same end."""
    from chatrlhf.envs.episode import load_environment
    from chatrlhf.envs.runner import EpisodeLimits, EpisodeRunner
    from tests.envs.test_episodes import Scripted

    prompt = PROMPTS[0]["prompt"]
    first = answers(prompt)["perfect"]
    second = "bread bird"
    tok = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    runner = EpisodeRunner(load_environment(LETTER_CHAIN), tok, EpisodeLimits(max_tokens=256, max_new_tokens=48))
    played = runner.run(Scripted([" " + first, " " + second]), [{"prompt": prompt}])[0]
    assert played.turns == 2 and played.end == "done"

    env = make_env(env=LETTER_CHAIN, reward_functions=[], max_new_tokens=48, max_prompt_tokens=256)
    obs, info = env.reset(options={"prompt_index": 0})
    assert info["prompt"] == prompt and obs["prompt_length"] == obs["length"]
    rewards, turn_starts, mask = [], [], played.policy_mask
    for t, token in enumerate(played.ids):
        if not mask[t]:
            continue  # the environment's tokens: the view appends them itself
        if t == 0 or not mask[t - 1]:
            assert obs["length"] == t  # the conversation so far is the runner's, through the environment's reply
            turn_starts.append(t)
        obs, reward, terminated, truncated, info = env.step(token)
        if t + 1 == len(mask) or not mask[t + 1]:
            rewards.append(reward)
            assert (
                info["turn_reward"] == reward
                and info["messages"][: 2 * len(rewards)] == played.messages[: 2 * len(rewards)]
            )
        else:
            assert reward == 0.0 and info == {}
    assert terminated and not truncated and info["end"] == "done"
    assert obs["token_ids"][: obs["length"]].tolist() == played.ids and obs["prompt_length"] == turn_starts[-1]
    assert rewards == played.turn_rewards
    assert rewards[0] == judge(prompt, first) == 1.0  # the first turn judged as the demo judge judges it


def test_response_mode_calls_the_tools(make_env):
    """Text turns: a tool call is answered by the tool (reward 0, the result appended), the answer by the
    environment, which ends the episode with its reward."""
    env = make_env(env=KNOWN_CALCULATOR, reward_functions=[], action_mode="response", max_new_tokens=100)
    obs, _ = env.reset(seed=0)
    assert obs["text"] == "User: What is 408 + 5?\nAssistant:"  # the tools are not described (describe_tools)
    call = '<tool_call>{"name": "add", "arguments": {"a": 408, "b": 5}}</tool_call>'
    obs, reward, terminated, truncated, info = env.step(call)
    assert reward == 0.0 and not terminated and not truncated and info["tool_calls"] == 1 and info["end"] is None
    assert info["messages"][-1] == {"role": "tool", "name": "add", "content": "413"}
    assert obs["text"].endswith("User: <tool_response>\n413\n</tool_response>\nAssistant:")
    assert obs["prompt_length"] == obs["length"]
    obs, reward, terminated, truncated, info = env.step("413")
    assert reward == 1.0 and terminated and not truncated and info["end"] == "done"
    text = unescape_text(obs["text"])
    assert text.endswith("Assistant: 413<|eos|>") and obs["prompt_length"] == obs["length"] - len(" 413") - 1


def test_a_turn_cut_at_max_new_tokens_truncates_the_episode(make_env):
    env = make_env(env=LETTER_CHAIN, reward_functions=[], max_new_tokens=4, max_prompt_tokens=256)
    env.reset(seed=0)
    steps = [env.step(ord("a")) for _ in range(4)]
    assert all(not s[2] and not s[3] for s in steps[:3])
    obs, reward, terminated, truncated, info = steps[-1]
    assert truncated and not terminated and info["end"] == "length" and reward == 0.0


@pytest.mark.parametrize("mode", ["token", "response"])
def test_check_env_with_an_environment(make_env, mode):
    env = make_env(env=LETTER_CHAIN, reward_functions=[], action_mode=mode, render_mode="ansi", max_prompt_tokens=256)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*Not able to test alternative render modes.*")
        check_env(env)


def test_env_with_other_reward_sources_is_refused(make_env):
    with pytest.raises(UserError, match="with env the rewards are the environment's"):
        make_env(env=LETTER_CHAIN)
