"""The letter-words demo task: prompts, judge, noisy demonstrator, pairs and JSONL output."""

from __future__ import annotations

import importlib
import json
import math
import random
import re

import pytest

from chatrlhf.demo.task import (
    LETTERS,
    PHRASINGS,
    WORDS,
    demo_response,
    judge,
    make_demos,
    make_pairs,
    make_prompt,
    make_prompts,
    materialize,
    parse_prompt,
    write_jsonl,
)
from chatrlhf.errors import UserError

B3 = "Write 3 words that start with b."


def test_word_list():
    assert len(WORDS) == len(set(WORDS))
    assert 200 <= len(WORDS) <= 300
    assert all(re.fullmatch(r"[a-z]{3,6}", w) for w in WORDS)
    assert len(LETTERS) >= 15
    for letter in LETTERS:
        assert sum(w[0] == letter for w in WORDS) >= 10
    assert {w[0] for w in WORDS} - set(LETTERS), "some letters supply wrong words only"


@pytest.mark.parametrize("phrasing", PHRASINGS)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_parse_prompt_every_phrasing(phrasing, n):
    for letter in LETTERS:
        prompt = phrasing.format(n=n, letter=letter)
        assert len(prompt) <= 45
        assert parse_prompt(prompt) == (n, letter)


def test_parse_prompt_variants():
    assert parse_prompt("Write three words that start with B.") == (3, "b")
    assert parse_prompt("User: List 2 words starting with the letter s.\nAssistant:") == (2, "s")
    for bad in ["", "hello", "Write 3 words.", "Write 0 words that start with b.", "Write 3 words that start with 7."]:
        with pytest.raises(ValueError):
            parse_prompt(bad)
    with pytest.raises(ValueError, match="ambiguous"):
        parse_prompt("Write 3 words that start with b. Write 2 words that start with c.")


def test_make_prompt_covers_the_prompt_space():
    rng = random.Random(0)
    seen = {parse_prompt(make_prompt(rng)) for _ in range(2000)}
    assert seen == {(n, letter) for n in (2, 3, 4) for letter in LETTERS}


def test_judge_exact_answer_scores_one():
    assert judge(B3, "bag ball bed") == 1.0
    assert judge("Give me 2 words beginning with t.", "tea tree") == 1.0


def test_judge_wrong_missing_and_extra_words():
    assert judge(B3, "bag ball cat") == pytest.approx(2 / 3, abs=1e-12)
    assert judge(B3, "bag ball") == pytest.approx(2 / 3, abs=1e-12)
    assert judge(B3, "bag ball bed bell") == pytest.approx(3 / 4, abs=1e-12)
    assert judge(B3, "bag ball bed cat dog car") == pytest.approx(3 / 6, abs=1e-12)
    assert judge(B3, "") == 0.0


def test_judge_duplicates_count_once():
    assert judge(B3, "bag bag bag") == pytest.approx(1 / 3, abs=1e-12)
    assert judge(B3, "bag Bag ball") == pytest.approx(2 / 3, abs=1e-12)


def test_judge_non_words_score_zero():
    assert judge(B3, "bxq bzz brr") == 0.0
    assert judge(B3, "cat dog car") == 0.0
    assert judge(B3, "!!! ??? ###") == 0.0
    assert judge(B3, "bagball bed") == pytest.approx(1 / 3, abs=1e-12)


def test_judge_punctuation_and_case():
    assert judge(B3, "Bag, BALL, bed.") == 1.0
    assert judge(B3, "  bag,\nball ,\tbed . ") == 1.0
    assert judge(B3, "bag; ball bed") == pytest.approx(2 / 3, abs=1e-12)


def test_judge_as_reward_function_ignores_fields():
    assert judge(prompt=B3, response="bag ball bed", answer="x", source="demo") == 1.0


def test_demo_response_shape_and_extremes():
    rng = random.Random(1)
    for _ in range(300):
        prompt = make_prompt(rng)
        n, letter = parse_prompt(prompt)
        for p, expected in [(1.0, 1.0), (0.0, 0.0)]:
            response = demo_response(rng, prompt, p)
            words = response.split(" ")
            assert len(words) == n == len(set(words))
            assert all(w in WORDS for w in words)
            assert judge(prompt, response) == expected
    with pytest.raises(ValueError):
        demo_response(rng, B3, 1.5)


def test_demonstrator_mean_score_is_p_correct():
    # Each of N words is correct with probability p, so judge = Binomial(N, p)/N: mean p, variance p(1−p)/N ≤
    # p(1−p)/2. The mean of M samples is within 4 standard deviations with probability > 0.9999.
    p, m = 0.5, 4000
    rng = random.Random(2)
    scores = []
    for _ in range(m):
        prompt = make_prompt(rng)
        scores.append(judge(prompt, demo_response(rng, prompt, p)))
    tolerance = 4 * math.sqrt(p * (1 - p) / 2 / m)
    assert abs(sum(scores) / m - p) < tolerance
    p = 0.8
    rng = random.Random(3)
    scores = [judge(B3, demo_response(rng, B3, p)) for _ in range(m)]
    assert abs(sum(scores) / m - p) < 4 * math.sqrt(p * (1 - p) / 3 / m)


def test_make_pairs_chosen_beats_rejected():
    records = make_pairs(500, seed=0)
    assert len(records) == 500
    for r in records:
        assert set(r) == {"prompt", "chosen", "rejected"}
        assert judge(r["prompt"], r["chosen"]) > judge(r["prompt"], r["rejected"])
        n, _ = parse_prompt(r["prompt"])
        assert len(r["chosen"].split()) == len(r["rejected"].split()) == n


def test_make_pairs_deterministic_and_seeded():
    assert make_pairs(50, seed=7) == make_pairs(50, seed=7)
    assert make_pairs(50, seed=7) != make_pairs(50, seed=8)
    with pytest.raises(ValueError):
        make_pairs(1, seed=0, p_correct=1.0)


def test_make_prompts_and_demos():
    prompts = make_prompts(100, seed=1)
    assert prompts == make_prompts(100, seed=1) != make_prompts(100, seed=2)
    assert all(set(r) == {"prompt"} and parse_prompt(r["prompt"]) for r in prompts)
    demos = make_demos(100, seed=1)
    assert demos == make_demos(100, seed=1)
    assert all(set(r) == {"prompt", "response"} for r in demos)


def test_write_jsonl_is_atomic_and_round_trips(tmp_path, monkeypatch):
    records = make_pairs(5, seed=0) + [{"prompt": "wörld"}]
    path = write_jsonl(records, tmp_path / "sub" / "pairs.jsonl")
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == records

    def broken_records():
        yield {"prompt": "a"}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl(broken_records(), path)
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == records
    assert sorted(p.name for p in path.parent.iterdir()) == ["pairs.jsonl"]


def test_judge_resolves_as_module_function_spec():
    module, _, name = "chatrlhf.demo.task:judge".partition(":")
    assert getattr(importlib.import_module(module), name) is judge


def test_materialize_demo_sources(tmp_path):
    assert materialize("data/train.jsonl", tmp_path) == "data/train.jsonl"
    path = materialize("demo:pairs:20:3", tmp_path / "data")
    assert [json.loads(line) for line in open(path, encoding="utf-8")] == make_pairs(20, seed=3)
    path = materialize("demo:prompts:10:4", tmp_path / "data")
    assert [json.loads(line) for line in open(path, encoding="utf-8")] == make_prompts(10, seed=4)
    for bad in ["demo:", "demo:pairs", "demo:pairs:10", "demo:sft:10:0", "demo:pairs:x:0", "demo:pairs:0:0"]:
        with pytest.raises(UserError, match="demo"):
            materialize(bad, tmp_path)
