"""The calculator demo: its questions, the tool, the judge, the generated data source."""

from __future__ import annotations

import json
import operator

import pytest

from chatrlhf.data.generated import resolve_generated
from chatrlhf.demo.calculator import calculator, judge, make_prompts
from chatrlhf.errors import UserError

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def test_questions_carry_their_answers_and_are_seeded():
    records = make_prompts(200, seed=3)
    assert records == make_prompts(200, seed=3) and records != make_prompts(200, seed=4)
    for r in records:
        assert r["prompt"] == f"What is {r['a']} {r['op']} {r['b']}?"
        assert r["answer"] == OPS[r["op"]](r["a"], r["b"])
    assert {r["op"] for r in records} == set(OPS)


def test_the_tool_and_the_judge():
    assert calculator(408, "+", 5) == 413 and calculator(7, "/", 2) == 3.5
    with pytest.raises(ValueError, match="unknown op"):
        calculator(1, "^", 2)
    assert judge("q", "It is 413.", answer=413) == 1.0
    assert judge("q", "413 or maybe 412", answer=413) == 0.0  # the last number counts
    assert judge("q", "no idea", answer=413) == 0.0


def test_the_generated_source(tmp_path):
    path = resolve_generated("calculator:prompts:5:1", tmp_path)
    lines = [json.loads(x) for x in open(path, encoding="utf-8")]
    assert lines == make_prompts(5, 1)
    for bad in ("calculator:pairs:5:1", "calculator:prompts:x:1", "calculator:prompts:0:1"):
        with pytest.raises(UserError, match="calculator data source"):
            resolve_generated(bad, tmp_path)
