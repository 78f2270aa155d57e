"""The calculator demo: its questions, the tool, the judge, the generated data source."""

from __future__ import annotations

import json
import operator

import pytest
from transformers import AutoTokenizer

from chatrlhf.data.generated import resolve_generated
from chatrlhf.demo.calculator import calculator, judge, make_prompts, make_transcripts
from chatrlhf.envs.episode import load_environment
from chatrlhf.envs.runner import ChatFormat
from chatrlhf.errors import UserError

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
CALCULATOR = "chatrlhf.envs.calculator:CalculatorEnv"


def test_questions_carry_their_answers_and_are_seeded():
    records = make_prompts(200, seed=3)
    assert records == make_prompts(200, seed=3) and records != make_prompts(200, seed=4)
    for r in records:
        assert r["prompt"] == f"What is {r['a']} {r['op']} {r['b']}?"
        assert r["answer"] == OPS[r["op"]](r["a"], r["b"])
    assert {r["op"] for r in records} == set(OPS)


def test_the_tool_and_the_judge():
    assert calculator("408 + 5") == 413 and calculator("7 / 2") == 3.5 and calculator("-(3 - 5) * 4") == 8
    assert calculator(" 12 * (3 + 4) ") == 84
    for code in ("__import__('os').getcwd()", "2 ** 10", "x + 1", "True + 1", "'a' * 3"):
        with pytest.raises(ValueError, match="is not arithmetic"):
            calculator(code)
    with pytest.raises(ValueError, match="cannot read"):
        calculator("1 +")
    assert judge("q", "It is 413.", answer=413) == 1.0
    assert judge("q", "413 or maybe 412", answer=413) == 0.0  # the last number counts
    assert judge("q", "no idea", answer=413) == 0.0


def test_the_generated_source(tmp_path):
    path = resolve_generated("calculator:prompts:5:1", tmp_path)
    lines = [json.loads(x) for x in open(path, encoding="utf-8")]
    assert lines == make_prompts(5, 1)
    for bad in (
        "calculator:pairs:5:1",
        "calculator:prompts:x:1",
        "calculator:prompts:0:1",
        "calculator:prompts:5:1:50",
        "calculator:sft:5:1:101",
        "calculator:sft:5",
    ):
        with pytest.raises(UserError, match="calculator data source"):
            resolve_generated(bad, tmp_path)


def test_sft_transcripts_are_the_text_episodes_render(tmp_path, tiny_dirs):
    """Every SFT record, rendered by the tiny template, is the text an episode of CalculatorEnv renders for the same
    conversation (no tool description, as CalculatorEnv asks; the result as a <tool_response> turn): SFT learns
    exactly what RL samples. Tool demonstrations call the calculator on the question and answer with its result."""
    tok = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    env = load_environment(CALCULATOR)
    fmt = ChatFormat(tok, env.tools, env.describe_tools)
    path = resolve_generated("calculator:sft:40:3:50", tmp_path)
    records = [json.loads(x) for x in open(path, encoding="utf-8")]
    assert records == make_transcripts(40, 3, 50)
    questions = {q["prompt"]: q for q in make_prompts(40, 3)}
    calls = 0
    for rec in records:
        user, *rest = rec["messages"]
        assert user["role"] == "user"  # no system message: the tool is not described
        q = questions[user["content"]]
        conversation = [user]
        for m in rest:
            if m["content"].startswith("<tool_response>"):
                result = m["content"].removeprefix("<tool_response>\n").removesuffix("\n</tool_response>")
                assert float(result) == q["answer"]
                conversation.append({"role": "tool", "name": "calculator", "content": result})
            else:
                conversation.append(m)
        assert tok.apply_chat_template(rec["messages"], tokenize=False) == fmt.render(conversation, False)
        last = rest[-1]["content"]
        if last.startswith("<tool_call>"):
            calls += 1
            arguments = json.loads(last.removeprefix("<tool_call>").removesuffix("</tool_call>"))["arguments"]
            assert calculator(arguments["expression"]) == q["answer"]
        else:
            assert judge(q["prompt"], last, q["answer"]) == 1.0
    # 40 demonstrations, about half with the tool: one record per direct answer, two per tool demonstration
    assert len(records) == 40 + calls and 10 <= calls <= 30
    assert all(rec["messages"][-1]["role"] == "assistant" for rec in records)
    assert all(len(r["messages"]) == 2 for r in make_transcripts(20, 3, 0))  # no tool call: answers only
    assert len(make_transcripts(20, 3, 100)) == 40
