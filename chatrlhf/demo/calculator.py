"""The bundled tool-using demo task, "calculator": arithmetic a tiny model cannot do in its head, a calculator tool
it may call, and a programmatic judge of the final answer.

A record asks one question and keeps its answer:

    {"prompt": "What is 347 * 29?", "a": 347, "op": "*", "b": 29, "answer": 10063}

Its environment is `chatrlhf.envs.calculator:CalculatorEnv` (`chatrlhf rl --env ...`): the question as the user
turn; the policy may call `calculator` (answered with its result as a tool message, docs/episodes.md); its first
turn that calls no tool is its final answer, which ends the episode with reward `judge` (1 when its last number is
the answer, else 0). `judge` is also a reward function or a judge of single responses.

Data: `calculator:prompts:N:SEED` is a generated source (data/generated.py) of N records drawn with SEED.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from chatrlhf.demo.task import write_jsonl
from chatrlhf.errors import UserError

OPS = ("+", "-", "*")
SOURCE_PREFIX = "calculator:"
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def calculator(a: float, op: str, b: float) -> float:
    """Compute a op b.

    Args:
        a: the first number
        op: one of +, -, *, /
        b: the second number
    """
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        return a / b
    raise ValueError(f"unknown op {op!r}; use +, -, * or /")


def make_prompts(n: int, seed: int) -> list[dict]:
    """n questions "What is A OP B?" with A in [10, 999], B in [2, 99], OP in +, -, *."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        a, b, op = rng.randint(10, 999), rng.randint(2, 99), rng.choice(OPS)
        answer = int(calculator(a, op, b))
        records.append({"prompt": f"What is {a} {op} {b}?", "a": a, "op": op, "b": b, "answer": answer})
    return records


def final_number(text: str) -> float | None:
    """The last number written in `text`, or None."""
    found = _NUMBER.findall(text)
    return float(found[-1]) if found else None


def judge(prompt: str, response: str, answer: float, **fields) -> float:
    """1.0 when the last number of the response is the answer, else 0.0."""
    value = final_number(response)
    return float(value is not None and abs(value - float(answer)) < 1e-6)


def materialize(source: str, data_dir: str | Path) -> str:
    """`calculator:prompts:N:SEED` → `data_dir/calculator-prompts-N-SEED.jsonl` (written by make_prompts)."""
    parts = source.split(":")
    if len(parts) != 4 or parts[1] != "prompts" or not parts[2].isdigit() or not parts[3].lstrip("-").isdigit():
        raise UserError(f"bad calculator data source {source!r}: expected calculator:prompts:N:SEED")
    n, seed = int(parts[2]), int(parts[3])
    if n < 1:
        raise UserError(f"calculator data source {source!r}: N must be at least 1")
    return str(write_jsonl(make_prompts(n, seed), Path(data_dir) / f"calculator-prompts-{n}-{seed}.jsonl"))
