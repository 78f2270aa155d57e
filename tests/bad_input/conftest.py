"""Shared pieces of the bad-input catalog (docs/bad-input.md): every case runs the real CLI entry point in-process
and checks the exit code, that stderr has one message and no traceback, and that no half-written run is left."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from chatrlhf.cli import main

QUIET = ["--run.progress", "False"]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, records: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture()
def out(tmp_path) -> Path:
    """The run directory every case points its stage at."""
    return tmp_path / "out"


@pytest.fixture()
def fail(out, capsys):
    """`fail(args)` runs `chatrlhf.cli.main(args)` and returns stderr, after checking: exit status 2; one
    "chatrlhf STAGE: error: ..." message and no traceback; no run left behind (`out` does not exist afterwards,
    or, if it existed before, has no `model/` it did not have)."""

    def run(args: list[str]) -> str:
        existed, had_model = out.exists(), (out / "model").exists()
        capsys.readouterr()
        code = main(args)
        captured = capsys.readouterr()
        assert code == 2, f"exit {code}\nstdout:\n{captured.out}\nstderr:\n{captured.err}"
        assert "Traceback" not in captured.err
        assert len(re.findall(rf"^chatrlhf {args[0]}: error: ", captured.err, re.M)) == 1, captured.err
        if existed:
            assert (out / "model").exists() == had_model
        else:
            assert not out.exists(), f"left behind: {sorted(p.name for p in out.iterdir())}"
        return captured.err

    return run


@pytest.fixture()
def sft(tiny_dirs, out):
    """`sft(data, *flags)`: arguments of a one-step SFT run of the tiny llama on `data`."""

    def args(data, *flags: str) -> list[str]:
        where = ["--output_dir", str(out), "--data.paths", str(data)]
        return ["sft", "--model", str(tiny_dirs["llama"]), *where, "--train.max_steps", "1", *QUIET, *flags]

    return args


@pytest.fixture()
def reward(tiny_dirs, out):
    """`reward(data, *flags)`: arguments of a one-step reward-model run of the tiny llama on `data`."""

    def args(data, *flags: str) -> list[str]:
        where = ["--output_dir", str(out), "--data.paths", str(data)]
        return ["reward", "--model", str(tiny_dirs["llama"]), *where, "--train.max_steps", "1", *QUIET, *flags]

    return args


@pytest.fixture()
def rl(tiny_dirs, out):
    """`rl(data, *flags, reward=SPEC)`: arguments of a one-iteration GRPO run of the tiny llama on the prompts in
    `data`, rewarded by the Python function SPEC (the demo judge by default), nothing held out."""

    def args(data, *flags: str, reward: str = "chatrlhf.demo.task:judge") -> list[str]:
        where = ["--output_dir", str(out), "--data.paths", str(data)]
        grpo = ["--train.algo", "grpo", "--train.group_size", "2", "--train.rollout_batch_size", "2"]
        short = ["--train.iterations", "1", "--train.generation.max_new_tokens", "4", "--data.eval_fraction", "0"]
        actor = ["--actor", str(tiny_dirs["llama"]), "--reward_functions", reward]
        return ["rl", *actor, *where, *grpo, *short, *QUIET, *flags]

    return args
