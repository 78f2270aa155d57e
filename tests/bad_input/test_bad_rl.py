"""Bad RL inputs: reward functions (and the evaluation's judge) that cannot be used or that fail, and too few prompts
for a rollout batch."""

from __future__ import annotations

import re
import sys

import pytest

from chatrlhf.cli import main

from .conftest import QUIET, jsonl, write

PROMPTS = [{"prompt": f"Name 2 words that begin with {letter}."} for letter in "abcd"]

REWARDS = """
import math

NOT_A_FUNCTION = 3

def word(prompt, response, **fields):
    return "good"

def nothing(prompt, response, **fields):
    return None

def not_a_number(prompt, response, **fields):
    return math.nan

def broken(prompt, response, **fields):
    raise ValueError("no score for this response")

CALLS = []

def third_call_fails(prompt, response, **fields):
    CALLS.append(prompt)
    if len(CALLS) == 3:
        return {"score": 1}["scor"]
    return 0.5
"""


@pytest.fixture()
def rewards_module(tmp_path, monkeypatch):
    """A module `catalog_rewards` of broken reward functions, importable for the run."""
    write(tmp_path / "catalog_rewards.py", REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "catalog_rewards", raising=False)  # a fresh import: third_call_fails counts anew
    return "catalog_rewards"


@pytest.mark.parametrize(
    "function, pattern",
    [
        ("no_such_module:fn", r"reward function 'no_such_module:fn': cannot import: No module named 'no_such_module'"),
        (
            "{module}:missing",
            r"reward function 'catalog_rewards:missing': cannot import: module 'catalog_rewards' has no attribute "
            r"'missing'",
        ),
        ("{module}", r"reward function 'catalog_rewards': expected module:function"),
        (
            "{module}:NOT_A_FUNCTION",
            r"reward function 'catalog_rewards:NOT_A_FUNCTION': 'NOT_A_FUNCTION' is not callable \(found int\); "
            r"expected a function f\(prompt, response, \*\*fields\) -> float",
        ),
        (
            "{module}:word",
            r"reward function 'catalog_rewards:word' returned str 'good' for prompt 'Name 2 words that begin with "
            r"[a-d]\.'; expected a number \(float\)",
        ),
        (
            "{module}:nothing",
            r"reward function 'catalog_rewards:nothing' returned None for prompt '.*'; expected a number",
        ),
        (
            "{module}:broken",
            r"reward function 'catalog_rewards:broken' raised ValueError: no score for this response \(at "
            r".*catalog_rewards\.py:\d+\) for prompt 'Name 2 words that begin with [a-d]\.'",
        ),
        (
            "{module}:third_call_fails",
            r"reward function 'catalog_rewards:third_call_fails' raised KeyError: 'scor' \(at "
            r".*catalog_rewards\.py:\d+\) for prompt 'Name 2 words that begin with [a-d]\.'",
        ),
    ],
    ids=[
        "module does not import",
        "no such function",
        "no function named",
        "not callable",
        "string",
        "None",
        "raises",
        "raises on the 3rd call",
    ],
)
def test_unusable_reward_function(function, pattern, rewards_module, tmp_path, rl, fail):
    data = jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    err = fail(rl(data, reward=function.format(module=rewards_module)))
    assert re.search(pattern, err), err


def test_reward_function_returning_nan_is_a_numerical_failure(rewards_module, tmp_path, rl, out, capsys):
    """NaN is not a user error but a numerical failure: exit 3, and still no run left behind."""
    data = jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    assert main(rl(data, reward=f"{rewards_module}:not_a_number")) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err and not out.exists()
    assert re.search(
        r"^chatrlhf rl: numerical failure: reward function 'catalog_rewards:not_a_number' returned nan for prompt", err
    )


def test_long_prompt_is_shortened_in_the_message(rewards_module, tmp_path, rl, fail):
    long = [{"prompt": "Name 2 words that begin with a, and " + "then some more words " * 6}] * 4
    err = fail(rl(jsonl(tmp_path / "prompts.jsonl", long), reward=f"{rewards_module}:broken"))
    assert re.search(r"for prompt 'Name 2 words that begin with a, and then some more words \.\.\.'$", err, re.M), err


def test_judge_that_raises(rewards_module, tiny_dirs, tmp_path, out, capsys):
    """The evaluation's judge is called like a reward function: an exception stops the pipeline with the judge and
    the prompt named (exit 2); the stages that finished keep their complete models, and no summary is written."""
    pairs = [{"prompt": f"Name 2 words that begin with {c}.", "chosen": "apt ant", "rejected": "x"} for c in "abcdefgh"]
    flags = ["--method", "dpo", "--sft.max_steps", "1", "--dpo.max_steps", "1", "--eval.num_prompts", "1"]
    flags += ["--eval.samples_per_prompt", "1", "--rl.generation.max_new_tokens", "2", "--data.eval_fraction", "0.25"]
    args = ["pipeline", "--model", str(tiny_dirs["llama"]), "--run_dir", str(out), "--data.paths"]
    args += [str(jsonl(tmp_path / "pairs.jsonl", pairs)), *flags, "--eval.judge", f"{rewards_module}:broken", *QUIET]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(
        r"^chatrlhf pipeline: error: judge 'catalog_rewards:broken' raised ValueError: no score for this response "
        r"\(at .*catalog_rewards\.py:\d+\) for prompt 'Name 2 words that begin with [a-h]\.'$",
        err,
        re.M,
    ), err
    assert (out / "dpo" / "model" / "config.json").is_file() and not (out / "summary.json").exists()


def test_fewer_prompts_than_the_rollout_batch(tmp_path, rl, fail):
    data = jsonl(tmp_path / "prompts.jsonl", PROMPTS[:3])
    err = fail(rl(data, "--train.rollout_batch_size", "4"))
    assert re.search(r"only 3 RL prompts, fewer than train\.rollout_batch_size=4", err), err


def test_responses_past_the_models_context_are_refused_up_front(tiny_dirs, tmp_path, rl, fail):
    """The tiny GPT-2 has 512 learned positions: its longest prompt plus 600 new tokens would index past them in the
    middle of the run (an IndexError inside the model); it is refused before anything trains, naming the prompt,
    the option and the most it could be. `chatrlhf eval` likewise, before it samples."""
    data = jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    args = rl(data, "--train.generation.max_new_tokens", "600")
    args[args.index("--actor") + 1] = str(tiny_dirs["gpt2"])
    err = fail(args)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dirs["gpt2"])  # the prompt as the chat template renders it
    chat = [tok.apply_chat_template([{"role": "user", "content": p["prompt"]}], add_generation_prompt=True,
                                    tokenize=True, return_dict=False) for p in PROMPTS]  # fmt: skip
    longest = max(len(ids) for ids in chat)
    assert re.search(
        rf"responses could grow past the model's context of 512 tokens \(max_position_embeddings\): the longest "
        rf"prompt \('Name 2 words that begin with [a-d]\.'\) is {longest} tokens, and max_new_tokens=600 "
        rf"\(train\.generation\.max_new_tokens\) more make {longest + 600}; lower train\.generation\.max_new_tokens "
        rf"to at most {512 - longest}, ",
        err,
    ), err
    # chatrlhf eval checks each model it samples, naming its own options
    eval_args = ["eval", "--models", str(tiny_dirs["gpt2"]), "--prompts", str(data), "--num_prompts", "4",
                 "--generation.max_new_tokens", "600", "--output_dir", str(tmp_path / "eval")]  # fmt: skip
    err = fail(eval_args)
    assert "responses could grow past the model's context of 512 tokens" in err, err
    assert f"lower generation.max_new_tokens to at most {512 - longest}, " in err and "(max_prompt_len refuses" in err
    assert not (tmp_path / "eval").exists()
