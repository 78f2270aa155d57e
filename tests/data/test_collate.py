"""Rendering, tokenizing and padding: templates, EOS handling, positions, length errors."""

from __future__ import annotations

import pytest
import torch

from chatrlhf.data import RawRecord, to_pair, to_prompt, to_sft
from chatrlhf.data.collate import (
    PLAIN_TEMPLATE,
    encode_pair,
    encode_pair_responses,
    encode_prompt,
    encode_sft,
    pad,
    position_ids,
    render_prompt,
)
from chatrlhf.errors import DataError
from chatrlhf.models.tiny import EOS_ID, byte_tokenizer


def raw(**data):
    return RawRecord(data=data, source="mem.jsonl", where="line 1")


def test_chat_template_prompt_and_response_tokens():
    tok = byte_tokenizer()
    enc = encode_sft(tok, to_sft(raw(prompt="hi", response="yo")), max_len=64, loss_on_prompt=False)
    prompt = list(b"User: hi\nAssistant:")
    assert enc.input_ids == prompt + list(b" yo") + [EOS_ID]
    assert enc.loss_mask == [0] * len(prompt) + [1, 1, 1, 1]
    with_prompt = encode_sft(tok, to_sft(raw(prompt="hi", response="yo")), max_len=64, loss_on_prompt=True)
    assert with_prompt.loss_mask == [1] * len(with_prompt.input_ids)


def test_plain_template_without_chat_template():
    tok = byte_tokenizer(chat_template=False)
    assert render_prompt(tok, "hi") == PLAIN_TEMPLATE.format(prompt="hi") == "Human: hi\n\nAssistant:"
    enc = encode_sft(tok, to_sft(raw(prompt="hi", response="yo")), max_len=64, loss_on_prompt=False)
    assert enc.input_ids == list(b"Human: hi\n\nAssistant: yo") + [EOS_ID]


def test_messages_use_the_whole_conversation():
    tok = byte_tokenizer()
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    enc = encode_sft(tok, to_sft(raw(messages=msgs)), max_len=128, loss_on_prompt=False)
    context = list(b"System: S\nUser: a\nAssistant: b") + [EOS_ID] + list(b"\nUser: c\nAssistant:")
    assert enc.input_ids == context + list(b" d") + [EOS_ID]
    assert sum(enc.loss_mask) == 3


def test_pair_and_prompt_encoding():
    tok = byte_tokenizer()
    c, r = encode_pair(tok, to_pair(raw(prompt="p", chosen="good", rejected="bad")), max_len=64)
    prefix = list(b"User: p\nAssistant:")
    assert c == prefix + list(b" good") + [EOS_ID] and r == prefix + list(b" bad") + [EOS_ID]
    assert encode_prompt(tok, to_prompt(raw(prompt="p", extra=1)), max_len=64) == prefix


def test_pair_responses_mark_the_response_tokens():
    tok = byte_tokenizer()
    rec = to_pair(raw(prompt="p", chosen="good", rejected="bad"))
    chosen, rejected = encode_pair_responses(tok, rec, max_len=64)
    assert (chosen.input_ids, rejected.input_ids) == encode_pair(tok, rec, max_len=64)
    n_prompt = len(b"User: p\nAssistant:")
    assert chosen.loss_mask == [0] * n_prompt + [1] * len(b" good") + [1]  # EOS included
    assert rejected.loss_mask == [0] * n_prompt + [1] * len(b" bad") + [1]
    with pytest.raises(DataError, match=r"field 'chosen'.*max_seq_len=20"):
        encode_pair_responses(tok, to_pair(raw(prompt="p", chosen="a long answer", rejected="b")), max_len=20)


def test_too_long_is_an_error_naming_the_record():
    tok = byte_tokenizer()
    with pytest.raises(DataError, match=r"mem.jsonl:line 1: .*over max_seq_len=10"):
        encode_sft(tok, to_sft(raw(prompt="hello", response="world")), max_len=10, loss_on_prompt=False)
    with pytest.raises(DataError, match=r"field 'rejected'.*max_seq_len=25"):
        encode_pair(tok, to_pair(raw(prompt="p", chosen="a", rejected="a much longer answer")), max_len=25)
    with pytest.raises(DataError, match=r"field 'prompt'.*max_prompt_len=5"):
        encode_prompt(tok, to_prompt(raw(prompt="long prompt")), max_len=5)


def test_pad_left_right_and_positions():
    ids, mask = pad([[1, 2, 3], [4]], value=0, left=True)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    ids, mask = pad([[1, 2, 3], [4]], value=9)
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert position_ids(torch.tensor([[0, 1, 1, 0]])).tolist() == [[0, 0, 1, 1]]


def turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


CONTEXT = [turn("user", "a"), turn("assistant", "b"), turn("user", "c")]


def conversational_pair():
    return to_pair(raw(prompt=CONTEXT, chosen=[turn("assistant", "d")], rejected=[turn("assistant", "e")]))


def test_conversational_pair_is_encoded_as_its_sft_conversation():
    """The template is applied once, the same way in every stage: a pair's chosen sequence is the SFT sequence of
    prompt + chosen, its prompt is the RL prompt, and the answer tokens are those after that prompt."""
    tok = byte_tokenizer()
    chosen, rejected = encode_pair_responses(tok, conversational_pair(), max_len=128)
    rendered = list(b"User: a\nAssistant: b") + [EOS_ID] + list(b"\nUser: c\nAssistant:")
    assert chosen.input_ids == rendered + list(b" d") + [EOS_ID]
    assert rejected.input_ids == rendered + list(b" e") + [EOS_ID]
    assert chosen.loss_mask == [0] * len(rendered) + [1, 1, 1]
    sft = encode_sft(tok, to_sft(raw(messages=[*CONTEXT, turn("assistant", "d")])), 128, False)
    assert (sft.input_ids, sft.loss_mask) == (chosen.input_ids, chosen.loss_mask)
    assert encode_prompt(tok, to_prompt(raw(prompt=CONTEXT)), max_len=128) == rendered


def test_plain_template_renders_a_conversation_as_a_transcript():
    chosen, _ = encode_pair(byte_tokenizer(chat_template=False), conversational_pair(), 128)
    assert chosen == list(b"Human: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d") + [EOS_ID]


def test_text_is_learned_whole_without_the_template():
    tok = byte_tokenizer()
    enc = encode_sft(tok, to_sft(raw(text="once upon")), max_len=64, loss_on_prompt=False)
    assert enc.input_ids == list(b"once upon") + [EOS_ID]
    assert enc.loss_mask == [1] * 10
    with pytest.raises(DataError, match=r"mem.jsonl:line 1: field 'text': the text is 10 tokens, over max_seq_len=9"):
        encode_sft(tok, to_sft(raw(text="once upon")), max_len=9, loss_on_prompt=False)
