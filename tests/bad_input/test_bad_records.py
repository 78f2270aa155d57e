"""Bad records: files that parse but hold records a stage cannot use. Each error names the file, the record's line,
the field and what was expected; nothing is dropped or truncated silently."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from chatrlhf.cli import main
from chatrlhf.data import to_sft
from chatrlhf.data.collate import encode_all, encode_sft
from chatrlhf.data.sources import load_source
from chatrlhf.errors import DataError
from chatrlhf.models.load import load_tokenizer

from .conftest import jsonl, write

GOOD = {"prompt": "p", "response": "r"}
PAIR = {"prompt": "p", "chosen": "good", "rejected": "bad"}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# Each bad record is line 2 of its file, after a good one.
SFT_CASES = {
    "missing field": ({"prompt": "p"}, r"line 2: field 'response': missing \(expected a string\)"),
    "misspelled (extra) field": (
        {"prompt": "p", "respnse": "r"},
        r"line 2: field 'response': missing \(expected a string\); the record's fields are: 'prompt', 'respnse'",
    ),
    "wrong type": ({"prompt": 3, "response": "r"}, r"line 2: field 'prompt': expected a string, found integer 3"),
    "null value": ({"prompt": None, "response": "r"}, r"line 2: field 'prompt': expected a string, found null"),
    "empty string": ({"prompt": "p", "response": ""}, r"line 2: field 'response': is empty"),
    "whitespace only": ({"prompt": " \n", "response": "r"}, r"line 2: field 'prompt': is only whitespace"),
    "messages: unknown role": (
        {"messages": [user("hi"), {"role": "bot", "content": "hello"}]},
        r"line 2: field 'messages\[1\]\.role': expected one of system, user, assistant, found string 'bot'",
    ),
    "messages: last turn not the assistant's": (
        {"messages": [assistant("hello"), user("hi")]},
        r"line 2: field 'messages\[1\]\.role': the last turn must be 'assistant' \(the response to learn\), "
        r"found 'user'",
    ),
    "messages: no user turn": (
        {"messages": [{"role": "system", "content": "be brief"}, assistant("ok")]},
        r"line 2: field 'messages': has no 'user' turn",
    ),
    "messages: missing content": (
        {"messages": [{"role": "user"}, assistant("hello")]},
        r"line 2: field 'messages\[0\]\.content': missing \(expected a string\)",
    ),
    "messages: not a list": (
        {"messages": "hi"},
        r"line 2: field 'messages': expected a list of \{'role', 'content'\} objects, found string 'hi'",
    ),
}


@pytest.mark.parametrize("case", list(SFT_CASES))
def test_bad_sft_record(case, tmp_path, sft, fail):
    bad, pattern = SFT_CASES[case]
    err = fail(sft(jsonl(tmp_path / "data.jsonl", [GOOD, bad])))
    assert re.search(r"data\.jsonl:" + pattern, err), err


@pytest.mark.parametrize(
    "bad, pattern",
    [
        ({"prompt": "p", "chosen": "same", "rejected": "same "}, r"field 'rejected': is the same text as 'chosen'"),
        ({"prompt": "p", "chosen": "good"}, r"field 'rejected': missing \(expected a string\)"),
    ],
    ids=["chosen identical to rejected", "pair without rejected"],
)
def test_bad_pair(bad, pattern, tmp_path, reward, fail):
    err = fail(reward(jsonl(tmp_path / "pairs.jsonl", [PAIR, bad])))
    assert re.search(r"pairs\.jsonl:line 2: " + pattern, err), err


def test_rl_conversation_not_ending_with_user(tmp_path, rl, fail):
    bad = {"messages": [user("hi"), assistant("hello"), assistant("again")]}
    err = fail(rl(jsonl(tmp_path / "prompts.jsonl", [{"prompt": "p"}, bad])))
    assert re.search(r"prompts\.jsonl:line 2: field 'messages': .*must end with a 'user' turn, found 'assistant'", err)


@pytest.fixture(scope="module")
def alternating_model(tiny_dirs, tmp_path_factory):
    """The tiny llama with a chat template that, like Llama-2's and Mistral's, refuses turns that do not alternate."""
    model = tmp_path_factory.mktemp("strict") / "llama"
    shutil.copytree(tiny_dirs["llama"], model)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}"
        "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    return model


def test_conversation_the_chat_template_refuses(alternating_model, tmp_path, out, fail):
    ok = {"messages": [user("a"), assistant("b")]}
    repeated_user = {"messages": [user("a"), user("a again"), assistant("b")]}
    data = jsonl(tmp_path / "chat.jsonl", [ok, repeated_user])
    args = ["sft", "--model", str(alternating_model), "--output_dir", str(out), "--data.paths", str(data)]
    err = fail(args + ["--data.eval_fraction", "0", "--train.max_steps", "1", "--run.progress", "False"])
    assert re.search(
        r"chat\.jsonl:line 2: field 'messages': the model's chat template cannot render this record: "
        r"Conversation roles must alternate",
        err,
    ), err


def plain_length(prompt: str, response: str) -> int:
    """Tokens of prompt + response in the tiny models: one per byte of the template's text, plus EOS."""
    return len(f"User: {prompt}\nAssistant:".encode()) + len(f" {response}".encode()) + 1


def test_sft_record_over_max_seq_len(tmp_path, sft, fail):
    long = {"prompt": "p" * 80, "response": "r"}
    err = fail(sft(jsonl(tmp_path / "data.jsonl", [GOOD, long]), "--train.max_seq_len", "40"))
    n = plain_length("p" * 80, "r")
    assert re.search(rf"data\.jsonl:line 2: prompt \+ response is {n} tokens, over max_seq_len=40", err), err


def test_pair_over_max_seq_len(tmp_path, reward, fail):
    long = {"prompt": "p", "chosen": "c" * 100, "rejected": "r"}
    err = fail(reward(jsonl(tmp_path / "pairs.jsonl", [PAIR, long]), "--train.max_seq_len", "60"))
    n = plain_length("p", "c" * 100)
    assert re.search(rf"pairs\.jsonl:line 2: field 'chosen': prompt \+ chosen is {n} tokens, over max_seq_len=60", err)


def test_rl_prompt_over_max_prompt_len(tmp_path, rl, fail):
    prompts = [{"prompt": "p"}] * 2 + [{"prompt": "x" * 300}]
    err = fail(rl(jsonl(tmp_path / "prompts.jsonl", prompts)))
    n = len(f"User: {'x' * 300}\nAssistant:")
    assert re.search(rf"prompts\.jsonl:line 3: field 'prompt': prompt is {n} tokens, over max_prompt_len=256", err)


def test_over_length_records_are_counted(tiny_dirs, tmp_path):
    """Every record is encoded before the error, so it says how many are over the limit."""
    records = [GOOD, {"prompt": "p" * 50, "response": "r"}, GOOD, {"prompt": "q" * 60, "response": "r"}]
    raws = load_source(str(jsonl(tmp_path / "data.jsonl", records)))
    tok = load_tokenizer(str(tiny_dirs["llama"]))
    with pytest.raises(DataError) as info:
        encode_all([to_sft(r) for r in raws], lambda rec: encode_sft(tok, rec, 40, False))
    n = plain_length("p" * 50, "r")
    assert str(info.value) == (
        f"{tmp_path / 'data.jsonl'}:line 2: prompt + response is {n} tokens, over max_seq_len=40 "
        "(and 1 more of the 4 records)"
    )


def test_every_record_invalid_with_skip_invalid(tmp_path, sft, out, capsys):
    data = jsonl(tmp_path / "data.jsonl", [{"prompt": "p"}, {"prompt": "q"}])
    code = main(sft(data, "--data.skip_invalid", "True"))
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err and not out.exists()
    assert captured.err.strip() == "chatrlhf sft: error: no valid SFT records"
    assert re.search(
        r"skipped 2 invalid SFT records; first: .*data\.jsonl:line [12]: field 'response': missing", captured.out
    )


def test_too_few_records_to_hold_out(tmp_path, sft, fail):
    err = fail(sft(write(tmp_path / "data.jsonl", json.dumps(GOOD) + "\n")))
    # The default data.eval_fraction 0.05 holds out max(1, round(0.05)) = 1 record: all there is.
    assert re.search(r"only 1 records: too few to hold out 5% for evaluation", err), err


def test_every_record_invalid_names_the_first_of_the_file(tmp_path, sft, fail):
    """Records are validated after the blend's shuffle; the message still names the file's first record."""
    data = jsonl(tmp_path / "data.jsonl", [{"prompt": f"p{i}", "answer": "r"} for i in range(40)])
    err = fail(sft(data))
    assert re.search(r"data\.jsonl:line 1: .*\(and 39 more invalid records in this dataset\)", err), err


def test_every_record_over_length_names_the_first_of_the_file(tmp_path, sft, fail):
    data = jsonl(tmp_path / "data.jsonl", [{"prompt": "p" * (100 + i), "response": "r"} for i in range(30)])
    err = fail(sft(data, "--train.max_seq_len", "64"))
    assert re.search(r"data\.jsonl:line 1: prompt \+ response is \d+ tokens, over max_seq_len=64 \(and \d+ more", err)
