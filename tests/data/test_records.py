"""Validating records per stage: accepted layouts and the exact errors for bad ones."""

from __future__ import annotations

import pytest

from chatrlhf.data import (
    PairRecord,
    PromptRecord,
    RawRecord,
    SFTRecord,
    load_source,
    to_pair,
    to_prompt,
    to_sft,
    validate_all,
)
from chatrlhf.errors import DataError

SRC = "train.jsonl"


def raw(data: dict, where: str = "line 3") -> RawRecord:
    return RawRecord(data, SRC, where)


def error_of(convert, data: dict) -> DataError:
    with pytest.raises(DataError) as info:
        convert(raw(data))
    return info.value


# ---------------------------------------------------------------- SFT


def test_sft_prompt_response():
    assert to_sft(raw({"prompt": "Hi", "response": "Hello", "id": 7})) == SFTRecord("Hi", "Hello", None, SRC, "line 3")


def test_sft_messages():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    record = to_sft(raw({"messages": messages}))
    assert record == SFTRecord(None, None, tuple(messages), SRC, "line 3")


def test_sft_from_pair_uses_chosen():
    record = to_sft(raw({"prompt": "Q", "chosen": "good", "rejected": "bad"}))
    assert (record.prompt, record.response, record.messages) == ("Q", "good", None)


def test_sft_null_messages_column_falls_back_to_prompt_response():
    # Parquet/datasets rows from a mixed file carry null for a column that the row lacks.
    record = to_sft(raw({"prompt": "Q", "response": "A", "messages": None}))
    assert (record.prompt, record.response, record.messages) == ("Q", "A", None)


def test_sft_missing_response():
    e = error_of(to_sft, {"prompt": "Q"})
    assert (e.source, e.where, e.field) == (SRC, "line 3", "response")
    assert str(e) == (
        "train.jsonl:line 3: field 'response': missing (expected a string); the record's fields are: 'prompt'"
    )


def test_sft_no_known_layout():
    e = error_of(to_sft, {"body": "x"})
    assert e.field == "prompt"
    assert "'prompt' and 'response'" in str(e) and "'messages'" in str(e) and "'text'" in str(e)
    assert str(e).endswith("the record's fields are: 'body'")


def test_sft_prompt_is_a_number():
    e = error_of(to_sft, {"prompt": 42, "response": "A"})
    assert str(e) == "train.jsonl:line 3: field 'prompt': expected a string, found integer 42"


@pytest.mark.parametrize("value, problem", [("", "is empty"), ("  \n\t", "is only whitespace")])
def test_sft_blank_response(value, problem):
    e = error_of(to_sft, {"prompt": "Q", "response": value})
    assert str(e) == f"train.jsonl:line 3: field 'response': {problem}"


def test_sft_null_prompt():
    e = error_of(to_sft, {"prompt": None, "response": "A"})
    assert str(e) == "train.jsonl:line 3: field 'prompt': expected a string, found null"


@pytest.mark.parametrize(
    "messages, field, fragment",
    [
        (
            [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}],
            "messages[1].role",
            "expected one of system, user, assistant, found string 'bot'",
        ),
        ([{"role": "user", "content": "Hi"}], "messages[0].role", "the last turn must be 'assistant'"),
        (
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 5}],
            "messages[1].content",
            "expected a string, found integer 5",
        ),
        (
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}],
            "messages[1].content",
            "is only whitespace",
        ),
        ([{"role": "user"}, {"role": "assistant", "content": "A"}], "messages[0].content", "missing"),
        ([{"content": "Hi"}, {"role": "assistant", "content": "A"}], "messages[0].role", "missing"),
        ([{"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}], "messages", "no 'user' turn"),
        (["Hi", "Hello"], "messages[0]", "expected an object with 'role' and 'content', found string 'Hi'"),
        ([], "messages", "is an empty list"),
        ("Hi", "messages", "found string 'Hi'"),
    ],
)
def test_sft_bad_messages(messages, field, fragment):
    e = error_of(to_sft, {"messages": messages})
    assert (e.source, e.where, e.field) == (SRC, "line 3", field)
    assert fragment in str(e)
    assert str(e).startswith(f"train.jsonl:line 3: field '{field}': ")


# ---------------------------------------------------------------- pairs


def test_pair_ok_and_extra_fields_ignored():
    record = to_pair(raw({"prompt": "Q", "chosen": "good", "rejected": "bad", "margin": 2}))
    assert record == PairRecord("Q", "good", "bad", SRC, "line 3")


@pytest.mark.parametrize("missing", ["prompt", "chosen", "rejected"])
def test_pair_missing_field(missing):
    data = {"prompt": "Q", "chosen": "good", "rejected": "bad"}
    del data[missing]
    e = error_of(to_pair, data)
    assert e.field == missing
    assert str(e).startswith(f"train.jsonl:line 3: field '{missing}': missing (expected a string)")


def test_pair_chosen_equals_rejected():
    e = error_of(to_pair, {"prompt": "Q", "chosen": "same", "rejected": "same "})
    assert e.field == "rejected"
    assert "same text as 'chosen'" in str(e)


def test_pair_wrong_type():
    e = error_of(to_pair, {"prompt": "Q", "chosen": ["a"], "rejected": "b"})
    assert str(e) == "train.jsonl:line 3: field 'chosen': expected a string, found list ['a']"


# ---------------------------------------------------------------- prompts


def test_prompt_keeps_other_fields_in_extra():
    record = to_prompt(raw({"prompt": "2+2?", "answer": "4", "response": "four", "level": 1}))
    assert record == PromptRecord("2+2?", None, {"answer": "4", "response": "four", "level": 1}, SRC, "line 3")


def test_prompt_from_messages_drops_final_assistant_turn():
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
    ]
    record = to_prompt(raw({"messages": messages, "prompt": "U", "id": 1}))
    assert record.prompt is None
    assert record.messages == ({"role": "system", "content": "S"}, {"role": "user", "content": "U"})
    assert record.extra == {"prompt": "U", "id": 1}


def test_prompt_from_messages_ending_with_user():
    messages = [
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
    ]
    assert to_prompt(raw({"messages": messages})).messages == tuple(messages)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": "S"}],
        [
            {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"},
            {"role": "assistant", "content": "B"},
        ],
        [{"role": "assistant", "content": "A"}],
    ],
)
def test_prompt_messages_must_end_with_user(messages):
    e = error_of(to_prompt, {"messages": messages})
    assert e.field == "messages"
    assert "must end with a 'user' turn" in str(e)


def test_prompt_missing():
    e = error_of(to_prompt, {"question": "Q"})
    assert e.field == "prompt"
    assert str(e).startswith("train.jsonl:line 3: field 'prompt': missing")
    assert "'question'" in str(e)


def test_prompt_wrong_type():
    e = error_of(to_prompt, {"prompt": 3.5})
    assert str(e) == "train.jsonl:line 3: field 'prompt': expected a string, found number 3.5"


# ---------------------------------------------------------------- validate_all


def bad_file(tmp_path) -> str:
    lines = [
        '{"prompt": "a", "response": "b"}',  # line 1 ok
        '{"prompt": "c"}',  # line 2 bad: no response
        '{"prompt": "d", "response": "e"}',  # line 3 ok
        '{"prompt": 4, "response": "f"}',  # line 4 bad: number
        '{"prompt": "g", "response": "  "}',  # line 5 bad: blank
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_validate_all_raises_first_error_with_count(tmp_path):
    spec = bad_file(tmp_path)
    with pytest.raises(DataError) as info:
        validate_all(load_source(spec), to_sft)
    e = info.value
    assert (e.source, e.where, e.field) == (spec, "line 2", "response")
    assert str(e).startswith(f"{spec}:line 2: field 'response': missing")
    assert str(e).endswith("(and 2 more invalid records in this dataset)")


def test_validate_all_single_error_has_no_count(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(DataError) as info:
        validate_all(load_source(str(path)), to_sft)
    assert "more invalid" not in str(info.value)


def test_validate_all_skip_invalid(tmp_path):
    spec = bad_file(tmp_path)
    valid, errors = validate_all(load_source(spec), to_sft, skip_invalid=True)
    assert [(r.prompt, r.response, r.where) for r in valid] == [("a", "b", "line 1"), ("d", "e", "line 3")]
    assert [(e.where, e.field) for e in errors] == [
        ("line 2", "response"),
        ("line 4", "prompt"),
        ("line 5", "response"),
    ]


def test_validate_all_clean():
    raws = [raw({"prompt": "p", "chosen": "c", "rejected": "r"}, f"line {i}") for i in (1, 2)]
    valid, errors = validate_all(raws, to_pair)
    assert errors == [] and [r.where for r in valid] == ["line 1", "line 2"]
