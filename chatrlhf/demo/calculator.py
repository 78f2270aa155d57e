"""The bundled tool-using demo task, "calculator": arithmetic a tiny model cannot do in its head, a calculator tool
it may call, and a programmatic judge of the final answer.

A record asks one question and keeps its answer:

    {"prompt": "What is 347 * 29?", "a": 347, "op": "*", "b": 29, "answer": 10063}

Its environment is `chatrlhf.envs.calculator:CalculatorEnv` (`chatrlhf rl --env ...`): the question as the user
turn; the policy may call `calculator` (answered with its result as a tool message, docs/episodes.md); its first
turn that calls no tool is its final answer, which ends the episode with reward `judge` (1 when its last number is
the answer, else 0). `judge` is also a reward function or a judge of single responses.

Data (generated sources, data/generated.py):

- `calculator:prompts:N:SEED` — N questions drawn with SEED, for RL and evaluation.
- `calculator:sft:N:SEED[:PCT]` — SFT records from N demonstrations (`make_transcripts`): PCT% of them (default
  50) call the calculator and then give its result, the others answer at once (with the right answer, which a
  tiny model cannot compute). Each assistant turn is one record, written in the fallback tool format
  (data/tool_format.py: the call in `<tool_call>` tags, the result as a `<tool_response>` user turn), which is how
  episodes render the calculator for a chat template without tool support, such as the tiny models'. So SFT learns
  exactly the text RL samples; a model whose template renders tools natively would need transcripts in its own
  format.

The tool is not described in the prompt (`CalculatorEnv.describe_tools = False`): SFT on these transcripts teaches
the call, as a model fine-tuned on its tools knows them. The description would be ~450 tokens in every sequence;
with it, the tiny models tried did not learn to copy numbers into the call within ~1000 SFT steps, and each step
cost 10–20× more (docs/episodes.md, "The calculator demo").
"""

from __future__ import annotations

import ast
import json
import operator
import random
import re
from pathlib import Path

from chatrlhf.data.tool_format import tool_call_text, tool_response_turn
from chatrlhf.demo.task import write_jsonl
from chatrlhf.errors import UserError

OPS = ("+", "-", "*")
SOURCE_PREFIX = "calculator:"
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_SOURCE = re.compile(r"calculator:(?P<kind>prompts|sft):(?P<n>\d+):(?P<seed>-?\d+)(?::(?P<pct>\d+))?")


def calculator(expression: str) -> float:
    """Evaluate arithmetic.

    Args:
        expression: numbers with + - * / and parentheses, e.g. 12 * (3 + 4)
    """
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot read {expression!r} as arithmetic") from None
    return _evaluate(tree.body, expression)


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _evaluate(node: ast.AST, expression: str) -> float:
    """Numbers, + - * /, unary minus and parentheses only: nothing of the expression is run as code."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_evaluate(node.left, expression), _evaluate(node.right, expression))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand, expression)
        return -value if isinstance(node.op, ast.USub) else value
    raise ValueError(f"{expression!r} is not arithmetic: use numbers, + - * / and parentheses")


def make_prompts(n: int, seed: int) -> list[dict]:
    """n questions "What is A OP B?" with A in [10, 999], B in [2, 99], OP in +, -, *."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        a, b, op = rng.randint(10, 999), rng.randint(2, 99), rng.choice(OPS)
        answer = int(calculator(f"{a} {op} {b}"))
        records.append({"prompt": f"What is {a} {op} {b}?", "a": a, "op": op, "b": b, "answer": answer})
    return records


def make_transcripts(n: int, seed: int, tool_percent: int = 50) -> list[dict]:
    """SFT records of n demonstrations on the questions `make_prompts(n, seed)` would draw: `tool_percent`% of
    them (chosen with the same seed) call the calculator and then answer with its result, two records (one per
    assistant turn); the others answer at once, one record."""
    rng = random.Random(seed + 1)
    records = []
    for q in make_prompts(n, seed):
        start = [{"role": "user", "content": q["prompt"]}]
        if rng.random() * 100 >= tool_percent:
            records.append({"messages": [*start, _assistant(f"It is {q['answer']}.")]})
            continue
        call = _assistant(tool_call_text("calculator", {"expression": f"{q['a']} {q['op']} {q['b']}"}))
        result = tool_response_turn(json.dumps(q["answer"]))
        records.append({"messages": [*start, call]})
        records.append({"messages": [*start, call, result, _assistant(f"It is {q['answer']}.")]})
    return records


def _assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def final_number(text: str) -> float | None:
    """The last number written in `text`, or None."""
    found = _NUMBER.findall(text)
    return float(found[-1]) if found else None


def judge(prompt: str, response: str, answer: float, **fields) -> float:
    """1.0 when the last number of the response is the answer, else 0.0."""
    value = final_number(response)
    return float(value is not None and abs(value - float(answer)) < 1e-6)


def materialize(source: str, data_dir: str | Path) -> str:
    """`calculator:prompts:N:SEED` → `data_dir/calculator-prompts-N-SEED.jsonl` (make_prompts);
    `calculator:sft:N:SEED[:PCT]` → `data_dir/calculator-sft-N-SEED-PCT.jsonl` (make_transcripts)."""
    match = _SOURCE.fullmatch(source)
    if match is None or (match["kind"] == "prompts" and match["pct"] is not None):
        raise UserError(
            f"bad calculator data source {source!r}: expected calculator:prompts:N:SEED or calculator:sft:N:SEED[:PCT]"
        )
    kind, n, seed, percent = match["kind"], int(match["n"]), int(match["seed"]), match["pct"]
    if n < 1:
        raise UserError(f"calculator data source {source!r}: N must be at least 1")
    if kind == "prompts":
        return str(write_jsonl(make_prompts(n, seed), Path(data_dir) / f"calculator-prompts-{n}-{seed}.jsonl"))
    percent = int(percent) if percent is not None else 50
    if percent > 100:
        raise UserError(f"calculator data source {source!r}: PCT is a percentage, at most 100")
    path = Path(data_dir) / f"calculator-sft-{n}-{seed}-{percent}.jsonl"
    return str(write_jsonl(make_transcripts(n, seed, percent), path))
