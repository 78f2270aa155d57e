"""Dataset formats: detection from the columns, each public dataset's adapter, and chatrlhf's own (TRL) layouts.

Expected records are written out by hand from the rows in `public_sets.py`."""

from __future__ import annotations

import pytest
from public_sets import (
    assistant,
    hh_rlhf,
    oasst1,
    oasst_message,
    rm_static,
    shp,
    ultrafeedback_argilla,
    ultrafeedback_h4,
    user,
    webgpt,
    write_jsonl,
    write_parquet,
)

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
from chatrlhf.data.adapters import transcript
from chatrlhf.data.formats import detect, tag
from chatrlhf.data.records import shared_prompt
from chatrlhf.errors import DataError

SRC = "set.parquet"


def records(rows: list[dict], format: str = "auto") -> list[RawRecord]:
    return tag([RawRecord(row, SRC, f"row {i}") for i, row in enumerate(rows, start=1)], SRC, format)


def one(rows: list[dict], convert):
    return convert(records(rows)[0])


def error_of(rows: list[dict], convert, index: int = 0) -> DataError:
    with pytest.raises(DataError) as info:
        convert(records(rows)[index])
    return info.value


# ---------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "rows, expected",
    [
        (hh_rlhf(2), "hh-rlhf"),
        (rm_static(2), "rm-static"),
        (shp(2), "shp"),
        (webgpt(2), "webgpt"),
        (ultrafeedback_h4(2), "ultrafeedback"),
        (ultrafeedback_argilla(2), "ultrafeedback"),
        (oasst1(1), "oasst"),
        ([{"prompt": "p", "chosen": "a", "rejected": "b"}], "trl"),
        ([{"chosen": "The sky is blue.", "rejected": "The sky is green."}], "trl"),
        ([{"prompt": [user("p")], "chosen": [assistant("a")], "rejected": [assistant("b")]}], "trl"),
        ([{"prompt": "p", "response": "r", "chosen": "a", "rejected": "b"}], "trl"),
        # DeepSpeed-Chat's single-line prompts are plain strings, not rm-static transcripts
        ([{"prompt": " Human: hi Assistant:", "response": "r", "chosen": "a", "rejected": "b"}], "trl"),
        ([{"messages": [user("p"), assistant("a")]}], "trl"),
        ([{"text": "t"}], "trl"),
    ],
)
def test_detected_from_the_columns(rows, expected):
    assert detect([RawRecord(r, SRC, "row 1") for r in rows], SRC) == expected


def test_detection_reads_every_record_of_json_lines(tmp_path):
    # the first record lacks `labels`, the second has it: the source's columns are SHP's
    rows = shp(2)
    del rows[0]["labels"]
    recs = load_source(str(write_jsonl(rows, tmp_path / "shp.jsonl")))
    assert {r.format for r in recs} == {"shp"}
    with pytest.raises(DataError, match=r"line 1: field 'labels': expected 1 \(human_ref_A preferred\)"):
        to_pair(recs[0])


def test_unknown_columns_list_the_columns_and_the_known_formats():
    with pytest.raises(DataError) as info:
        detect([RawRecord({"question": "q", "answer": "a"}, SRC, "row 1")], SRC)
    message = str(info.value)
    assert message.startswith("set.parquet: no known format has these columns: 'question', 'answer'; known formats")
    for name in ("trl", "hh-rlhf", "rm-static", "shp", "webgpt", "ultrafeedback", "oasst"):
        assert f"{name} (" in message


def test_columns_of_two_formats_are_ambiguous():
    row = {**shp(1)[0], **webgpt(1)[0]}
    with pytest.raises(DataError) as info:
        detect([RawRecord(row, SRC, "row 1")], SRC)
    assert "fit more than one format: shp, webgpt; choose one with --data.format" in str(info.value)
    assert "'history'" in str(info.value) and "'answer_0'" in str(info.value)
    assert detect([RawRecord(row, SRC, "row 1")], SRC, "webgpt") == "webgpt"


def test_chosen_format_needs_its_columns():
    with pytest.raises(DataError) as info:
        detect([RawRecord(r, SRC, "row 1") for r in hh_rlhf(1)], SRC, "shp")
    assert str(info.value) == (
        "set.parquet: format 'shp' (stanfordnlp/SHP, stanfordnlp/SHP-2) needs the columns history, human_ref_A, "
        "human_ref_B, labels, but 'history', 'human_ref_A', 'human_ref_B', 'labels' are missing; the columns are: "
        "'chosen', 'rejected'"
    )


def test_chosen_trl_format_overrides_detection():
    # rm-static's columns read as chatrlhf's own: the transcript is then the prompt string as it is
    rec = to_pair(records(rm_static(1), "trl")[0])
    assert rec.prompt.startswith("\n\nHuman: hi 0") and (rec.chosen, rec.rejected) == (" 0", " I can't")


def test_unknown_format_name():
    with pytest.raises(DataError, match="unknown format 'hh'; known: auto, trl, hh-rlhf"):
        detect([RawRecord({"prompt": "p"}, SRC, "row 1")], SRC, "hh")


# ---------------------------------------------------------------- Anthropic/hh-rlhf


def test_hh_rlhf_multi_turn_transcript():
    rows = hh_rlhf(1)  # row 0: two Human turns
    context = (user("what is 0+0?"), assistant("0."), user("and doubled?"))
    assert one(rows, to_pair) == PairRecord(None, "it is 0", "no idea", SRC, "row 1", context)
    assert one(rows, to_sft) == SFTRecord(None, None, (*context, assistant("it is 0")), SRC, "row 1")
    assert one(rows, to_prompt) == PromptRecord(None, context, {}, SRC, "row 1")


def test_transcript_turns():
    raw = RawRecord({"t": "\n\nHuman: a\nb \n\nAssistant:  c\n\nHuman: d\n\nAssistant:"}, SRC, "row 1")
    assert transcript(raw, "t", open_end=True) == [user("a\nb"), assistant("c"), user("d")]
    with pytest.raises(DataError, match=r"field 't': turn 4 \(Assistant\) is empty"):
        transcript(raw, "t")


@pytest.mark.parametrize(
    "chosen, rejected, field, problem",
    [
        (
            "\n\nHuman: a\n\nAssistant: b\n\nHuman: c",
            "\n\nHuman: a\n\nAssistant: x",
            "chosen",
            "the transcript does not end with an Assistant turn (the answer)",
        ),
        ("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: a\n\nAssistant:", "rejected", "turn 2 (Assistant) is empty"),
        (
            "\n\nHuman: a\n\nAssistant: b",
            "\n\nHuman: z\n\nAssistant: x",
            "rejected",
            "the conversation before its final Assistant turn differs from 'chosen''s",
        ),
        ("Hello\n\nHuman: a\n\nAssistant: b", "\n\nHuman: a\n\nAssistant: x", "chosen", "expected an Anthropic"),
        ("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: a\n\nAssistant: b ", "rejected", "is the same text as 'chosen'"),
    ],
)
def test_hh_rlhf_unconvertible(chosen, rejected, field, problem):
    e = error_of([*hh_rlhf(1), {"chosen": chosen, "rejected": rejected}], to_pair, index=1)
    assert (e.where, e.field) == ("row 2", field)
    assert str(e).startswith(f"set.parquet:row 2: field '{field}': {problem}")


# ---------------------------------------------------------------- Dahoas/rm-static


def test_rm_static():
    context = (user("hi 0"), assistant("hello"), user("count to 0?"))
    assert one(rm_static(1), to_pair) == PairRecord(None, "0", "I can't", SRC, "row 1", context)
    assert one(rm_static(1), to_sft).messages == (*context, assistant("0"))
    assert one(rm_static(1), to_prompt) == PromptRecord(None, context, {}, SRC, "row 1")


@pytest.mark.parametrize(
    "prompt, problem",
    [
        (
            "\n\nHuman: hi\n\nAssistant: hello\n\nAssistant:",
            "the transcript must end with a Human turn (then '\\n\\nAssistant:')",
        ),
        (
            "\n\nHuman: hi\n\nAssistant: hello",
            "expected a transcript ending with '\\n\\nAssistant:' (the slot for the answer)",
        ),
        # DeepSpeed-Chat's single-line form: its turns cannot be told apart from their text
        (" Human: hi Assistant:", "expected a transcript ending with '\\n\\nAssistant:' (the slot for the answer)"),
    ],
)
def test_rm_static_prompt_must_end_with_a_human_turn_and_the_answer_slot(prompt, problem):
    e = error_of([*rm_static(1), {**rm_static(1)[0], "prompt": prompt}], to_pair, index=1)
    assert (e.field, e.problem) == ("prompt", problem)


# ---------------------------------------------------------------- stanfordnlp/SHP


def test_shp_labels_choose_the_answer():
    rows = shp(2)  # row 1: labels 0 (B preferred); row 2: labels 1 (A preferred)
    recs = records(rows)
    assert to_pair(recs[0]) == PairRecord("why is dough 0 sticky?", "too much water", "it is the flour", SRC, "row 1")
    assert to_pair(recs[1]) == PairRecord("why is dough 1 sticky?", "too much water", "it is the flour", SRC, "row 2")
    assert to_sft(recs[0]) == SFTRecord("why is dough 0 sticky?", "too much water", None, SRC, "row 1")
    prompt = to_prompt(recs[0])
    assert prompt.prompt == "why is dough 0 sticky?"
    assert set(prompt.extra) == set(rows[0]) - {"history", "human_ref_A", "human_ref_B"}


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"score_A": 5, "score_B": 5}, "a tie: score_A and score_B are both 5, so neither answer is preferred"),
        ({"labels": 2}, "expected 1 (human_ref_A preferred) or 0 (human_ref_B preferred), found integer 2"),
        ({"labels": None}, "expected 1 (human_ref_A preferred) or 0 (human_ref_B preferred), found null"),
    ],
)
def test_shp_without_a_preference(change, problem):
    e = error_of([{**shp(1)[0], **change}], to_pair)
    assert (e.field, e.problem) == ("labels", problem)
    # the prompt alone is still a valid RL prompt
    assert to_prompt(records([{**shp(1)[0], **change}])[0]).prompt == "why is dough 0 sticky?"


def test_shp_empty_answer_names_its_column():
    e = error_of([{**shp(1)[0], "human_ref_B": ""}], to_pair)
    assert (e.field, e.problem) == ("human_ref_B", "is empty")


# ---------------------------------------------------------------- openai/webgpt_comparisons


def test_webgpt_higher_score_is_chosen():
    recs = records(webgpt(2))  # row 1: score_0 = -0.5; row 2: score_0 = 1.0
    assert to_pair(recs[0]) == PairRecord("why 0?", "no one knows", "because 0 [1]", SRC, "row 1")
    assert to_pair(recs[1]) == PairRecord("why 1?", "because 1 [1]", "no one knows", SRC, "row 2")
    assert to_sft(recs[1]) == SFTRecord("why 1?", "because 1 [1]", None, SRC, "row 2")
    assert to_prompt(recs[0]).prompt == "why 0?"


def test_webgpt_tie_and_bad_question():
    tie = {**webgpt(1)[0], "score_0": 0.0, "score_1": 0.0}
    e = error_of([tie], to_pair)
    assert (e.field, e.problem) == ("score_1", "equals score_0 (0.0): a tie, so neither answer is preferred")
    assert error_of([tie], to_sft).field == "score_1"
    assert to_prompt(records([tie])[0]).prompt == "why 0?"
    e = error_of([{**webgpt(1)[0], "question": {"id": "q"}}], to_prompt)
    assert (e.field, e.problem) == ("question.full_text", "missing (expected a string)")


# ---------------------------------------------------------------- UltraFeedback


@pytest.mark.parametrize("rows", [ultrafeedback_h4(1), ultrafeedback_argilla(1)], ids=["h4", "argilla"])
def test_ultrafeedback(rows):
    row = rows[0]
    question = row["chosen"][0]["content"]
    answers = row["chosen"][1]["content"], row["rejected"][1]["content"]
    assert one(rows, to_pair) == PairRecord(None, *answers, SRC, "row 1", (user(question),))
    assert one(rows, to_sft).messages == tuple(row["chosen"])
    prompt = one(rows, to_prompt)
    assert prompt.messages == (user(question),)
    assert "prompt" not in prompt.extra and "messages" not in prompt.extra


def test_ultrafeedback_conversations_must_share_the_prompt():
    row = {**ultrafeedback_h4(1)[0]}
    row["rejected"] = [user("another question"), assistant("x")]
    e = error_of([row], to_pair)
    assert (e.field, e.problem) == (
        "rejected[0]",
        "differs from 'chosen' before the final assistant turn; a pair compares two answers to one conversation",
    )


def test_ultrafeedback_turn_errors_name_the_column():
    row = {**ultrafeedback_h4(1)[0]}
    row["chosen"] = [user("q"), {"role": "assistant", "content": ""}]
    e = error_of([row], to_sft)
    assert (e.field, e.problem) == ("chosen[1].content", "is empty")


# ---------------------------------------------------------------- OpenAssistant/oasst1


def test_oasst_trees_follow_the_best_reply(tmp_path):
    recs = load_source(str(write_parquet(oasst1(2), tmp_path / "oasst.parquet")))
    assert [(r.format, r.where) for r in recs] == [("oasst", "row 1"), ("oasst", "row 7")]
    thread = (user("tell me about 1"), assistant("1 is a number"), user("is it even?"), assistant("no"))
    assert to_sft(recs[1]).messages == thread
    prompt = to_prompt(recs[1])
    assert prompt.messages == thread[:3]
    assert prompt.extra["message_id"] == "t1" and "text" not in prompt.extra


def test_oasst_thread_ending_with_a_prompter_turn():
    rows = oasst1(1)[:5]  # the follow-up question has no reply
    assert one(rows, to_sft).messages == (user("tell me about 0"), assistant("0 is a number"))
    assert one(rows, to_prompt).messages == (user("tell me about 0"), assistant("0 is a number"), user("is it even?"))


def test_oasst_broken_trees():
    rows = [
        oasst_message("r", None, "prompter", "q", "r"),
        oasst_message("x", "missing", "assistant", "orphan", "r"),
        oasst_message("s", None, "prompter", "alone", "s"),
        oasst_message("b", None, "assistant", "not a prompt", "b"),
    ]
    recs = records(rows)
    valid, errors = validate_all(recs, to_sft, skip_invalid=True)
    assert valid == []
    assert [str(e) for e in errors] == [
        "set.parquet:row 1: the message tree has no assistant reply to learn from",
        "set.parquet:row 2: field 'parent_id': 'missing' is not the message_id of any row of this source, so this "
        "message's tree has no root",
        "set.parquet:row 3: the message tree has no assistant reply to learn from",
        "set.parquet:row 4: field 'role': expected 'prompter' for a root message, found string 'assistant'",
    ]
    e = error_of(oasst1(1), to_pair)
    assert e.problem == (
        "format 'oasst' (OpenAssistant/oasst1, OpenAssistant/oasst2) has no preference pairs, only SFT records and "
        "RL prompts"
    )


def test_oasst_duplicate_message_id():
    rows = [oasst_message("r", None, "prompter", "q", "r"), oasst_message("r", None, "prompter", "q", "r")]
    with pytest.raises(DataError, match=r"row 2: field 'message_id': 'r' is also the message_id of row 1"):
        records(rows)


def test_oasst_reply_text_errors_name_its_row():
    rows = oasst1(1)
    rows[2]["text"] = " "  # the best reply
    e = error_of(rows, to_sft)
    assert (e.where, e.field, e.problem) == ("row 3", "text", "is only whitespace")


# ---------------------------------------------------------------- TRL's layouts


@pytest.mark.parametrize(
    "chosen, rejected, expected",
    [
        ("The sky is blue.", "The sky is green.", ("The sky is", "blue.", "green.")),
        ("The sky is blue.", "The sky is bright.", ("The sky is", "blue.", "bright.")),  # never split a word
        ("Hi there", "Hi there friend", ("Hi there", "", "friend")),
        ("abc", "abd", ("", "abc", "abd")),
        ("Q:\nyes", "Q:\nno", ("Q:", "yes", "no")),
    ],
)
def test_shared_prompt(chosen, rejected, expected):
    assert shared_prompt(chosen, rejected) == expected


def raw(data: dict) -> RawRecord:
    return RawRecord(data, "t.jsonl", "line 1")


def test_trl_standard_layouts():
    assert to_sft(raw({"prompt": "p", "completion": "c"})) == SFTRecord("p", "c", None, "t.jsonl", "line 1")
    assert to_sft(raw({"text": "plain text"})) == SFTRecord(None, None, None, "t.jsonl", "line 1", text="plain text")
    implicit = raw({"chosen": "The sky is blue.", "rejected": "The sky is green."})
    assert to_pair(implicit) == PairRecord("The sky is", "blue.", "green.", "t.jsonl", "line 1")
    assert to_sft(implicit) == SFTRecord("The sky is", "blue.", None, "t.jsonl", "line 1")
    assert to_prompt(implicit).prompt == "The sky is"


def test_trl_conversational_layouts():
    prompt = [{"role": "system", "content": "be kind"}, user("hi")]
    pair = raw({"prompt": prompt, "chosen": [assistant("hello")], "rejected": [assistant("go away")]})
    assert to_pair(pair) == PairRecord(None, "hello", "go away", "t.jsonl", "line 1", tuple(prompt))
    assert to_sft(pair).messages == (*prompt, assistant("hello"))
    assert to_prompt(pair).messages == tuple(prompt)
    implicit = raw({"chosen": [*prompt, assistant("hello")], "rejected": [*prompt, assistant("go away")]})
    assert to_pair(implicit) == to_pair(pair)
    assert to_sft(implicit).messages == (*prompt, assistant("hello"))
    assert to_prompt(implicit).messages == tuple(prompt)
    completion = raw({"prompt": prompt, "completion": [assistant("hello")]})
    assert to_sft(completion).messages == (*prompt, assistant("hello"))
    assert to_prompt(raw({"prompt": prompt})) == PromptRecord(None, tuple(prompt), {}, "t.jsonl", "line 1")


@pytest.mark.parametrize(
    "data, field, problem",
    [
        (
            {"prompt": [user("q")], "chosen": "a", "rejected": [assistant("b")]},
            "chosen",
            "expected a list of {'role', 'content'} objects, found string 'a'",
        ),
        (
            {"prompt": [user("q")], "chosen": [assistant("a")]},
            "rejected",
            "missing (expected a list of {'role', 'content'} objects, like 'prompt'); the record's fields are: "
            "'prompt', 'chosen'",
        ),
        (
            {"prompt": [user("q")], "chosen": [assistant("a"), user("b")], "rejected": [assistant("b")]},
            "chosen[1].role",
            "the last turn must be 'assistant' (the answer being compared), found 'user'",
        ),
        (
            {"chosen": [assistant("a")], "rejected": [assistant("b")]},
            "chosen",
            "the conversation before the final assistant turn must end with a 'user' turn, found no turns",
        ),
        (
            {"chosen": "abc", "rejected": "xyz"},
            "prompt",
            "missing (expected a string), and 'chosen' and 'rejected' do not start with the same words, which would "
            "be the prompt of an implicit-prompt pair; the record's fields are: 'chosen', 'rejected'",
        ),
        (
            {"chosen": "Hi there", "rejected": "Hi there friend"},
            "chosen",
            "has no answer after the prompt it shares with the other side (an implicit-prompt pair)",
        ),
    ],
)
def test_trl_bad_pairs(data, field, problem):
    with pytest.raises(DataError) as info:
        to_pair(raw(data))
    assert (info.value.field, info.value.problem) == (field, problem)


def test_trl_bad_sft_conversations():
    with pytest.raises(DataError) as info:
        to_sft(raw({"prompt": [user("q")], "completion": [user("a")]}))
    assert (info.value.field, info.value.problem) == (
        "completion[0].role",
        "the last turn must be 'assistant' (the response to learn), found 'user'",
    )
    with pytest.raises(DataError) as info:
        to_sft(raw({"text": "  "}))
    assert (info.value.field, info.value.problem) == ("text", "is only whitespace")
