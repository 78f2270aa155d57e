"""Bad RL inputs: reward functions that cannot be used, and too few prompts for a rollout batch."""

from __future__ import annotations

import re

import pytest

from chatrlhf.cli import main

from .conftest import jsonl, write

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
"""


@pytest.fixture()
def rewards_module(tmp_path, monkeypatch):
    """A module `catalog_rewards` of broken reward functions, importable for the run."""
    write(tmp_path / "catalog_rewards.py", REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
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
    ],
    ids=["module does not import", "no such function", "no function named", "not callable", "string", "None"],
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
    assert re.search(r"^chatrlhf rl: numerical failure: reward function not_a_number returned nan for prompt", err)


def test_fewer_prompts_than_the_rollout_batch(tmp_path, rl, fail):
    data = jsonl(tmp_path / "prompts.jsonl", PROMPTS[:3])
    err = fail(rl(data, "--train.rollout_batch_size", "4"))
    assert re.search(r"only 3 RL prompts, fewer than train\.rollout_batch_size=4", err), err
