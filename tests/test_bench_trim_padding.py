"""bench/trim_padding.py's commands (the bench itself runs chatrlhf for minutes; not tested here)."""

from __future__ import annotations

import argparse

import pytest

from tests.conftest import load_bench


@pytest.fixture(scope="module")
def trim():
    with load_bench("trim_padding") as module:
        yield module


def options(**kw) -> argparse.Namespace:
    base = {"group": 4, "prompts": 16, "warmup": 2, "iterations": 6, "new_tokens": 64, "mini": 32, "micro": 4}
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("flag", [True, False])
def test_the_two_commands_differ_only_in_trim_padding(trim, tmp_path, flag):
    from chatrlhf.cli import parse

    cmd = trim.rl_command(tmp_path / "model", tmp_path / "out", flag, options())
    cfg = parse(cmd[3], cmd[4:])
    cfg.validate(need_data=False)
    u = cfg.train.update
    assert (u.trim_padding, u.mini_batch_size, u.micro_batch_size) == (flag, 32, 4)
    t = cfg.train
    assert (t.algo, t.group_size, t.rollout_batch_size, t.iterations) == ("grpo", 4, 16, 8)
    other = trim.rl_command(tmp_path / "model", tmp_path / "out", not flag, options())
    assert [x for x in cmd if x not in ("True", "False")] == [x for x in other if x not in ("True", "False")]


def test_text_hash_tells_responses_apart_within_zero_and_one(trim):
    values = {trim.text_hash("p", r) for r in ("a", "ab", "abc", "xyz")}
    assert len(values) == 4 and all(0 <= v < 1 for v in values)
