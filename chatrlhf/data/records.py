"""Typed, validated records for each stage, converted from `RawRecord`s.

A record in a public dataset's format (`RawRecord.format`, see `formats.py`) is first mapped to chatrlhf's own
schema by that format's adapter; then every record is validated against that schema, which is a superset of TRL's
dataset formats (standard = strings, conversational = lists of {"role", "content"} turns). Extra fields are allowed:
ignored for SFT and pairs, kept in `PromptRecord.extra` for RL.

- SFT, tried in this order: `{"messages"}` ending with an assistant turn; `{"prompt", "completion"}`;
  `{"prompt", "response"}`; a pair (its `chosen` side is the response, as DeepSpeed-Chat does); `{"text"}` (plain
  language modelling: every token is learned, no chat template).
- Pairs (reward model, DPO): `{"prompt", "chosen", "rejected"}`, or `{"chosen", "rejected"}` with the prompt
  implicit (the text, or the turns, that both start with). `chosen` != `rejected`.
- Prompts (RL): `{"prompt"}`, `{"messages"}`, or a pair's prompt; a final assistant turn is dropped.

A `prompt` that is a list of turns makes the record conversational: `completion`, `chosen` and `rejected` are then
lists too, continuing the prompt conversation. Without a prompt, `chosen` decides. A pair's two conversations must be
the same up to their final assistant turns: that shared part is the prompt (`PairRecord.messages`).

When a record has `messages` it is read as a conversation, whatever other fields it has. A field whose value
is null counts as absent when choosing between these layouts, because Parquet and `datasets` fill a column
missing from some rows with null.

Every problem raises `DataError` naming the source, the record's position and the field.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from chatrlhf.data.fields import ROLES, fields_of, is_list, message_list, present, required, string
from chatrlhf.data.formats import adapt
from chatrlhf.data.raw import RawRecord
from chatrlhf.errors import DataError, first_in_file

__all__ = ["ROLES", "PairRecord", "PromptRecord", "SFTRecord", "to_pair", "to_prompt", "to_sft", "validate_all"]

R = TypeVar("R")


@dataclass(frozen=True)
class SFTRecord:
    """A supervised example: exactly one of (`prompt` and `response`), `messages` or `text` is set."""

    prompt: str | None
    response: str | None
    messages: tuple[dict, ...] | None
    """The conversation, ending with an assistant turn; each dict has "role" and "content"."""
    source: str
    where: str
    text: str | None = None
    """Plain text to learn whole (TRL's language-modelling format): no chat template, loss on every token."""


@dataclass(frozen=True)
class PairRecord:
    """A preference pair: `chosen` is the better final answer than `rejected` to one prompt, which is either the
    string `prompt` (one user turn) or the conversation `messages` (ending with a user turn)."""

    prompt: str | None
    chosen: str
    rejected: str
    source: str
    where: str
    messages: tuple[dict, ...] | None = None
    """The prompt conversation both answers follow; None when `prompt` is set."""


@dataclass(frozen=True)
class PromptRecord:
    """An RL prompt: exactly one of `prompt` or `messages` (ending with a user turn) is set."""

    prompt: str | None
    messages: tuple[dict, ...] | None
    extra: dict
    """Every other field of the record, passed to reward functions."""
    source: str
    where: str


def _no_layout(raw: RawRecord, layouts: str) -> DataError:
    """The error for a record that matches none of a stage's layouts."""
    problem = "missing" if "prompt" not in raw.data else "is null"
    return DataError(
        raw.source, raw.where, "prompt", f"{problem}; expected {layouts}; the record's fields are: {fields_of(raw)}"
    )


def _turns(raw: RawRecord, field: str, like: str) -> tuple[dict, ...]:
    """The required list-of-turns field `field`; `like` names the field that made the record conversational."""
    if field not in raw.data:
        raise DataError(
            raw.source,
            raw.where,
            field,
            f"missing (expected a list of {{'role', 'content'}} objects, like '{like}'); "
            f"the record's fields are: {fields_of(raw)}",
        )
    return message_list(raw, field, raw.data[field])


# ---------------------------------------------------------------- SFT


def to_sft(raw: RawRecord) -> SFTRecord:
    """Validate an SFT record: messages, prompt+completion, prompt+response, a pair (its `chosen` is the response)
    or text."""
    raw = adapt(raw, "sft")
    data = raw.data
    if present(data, "messages"):
        return _sft_conversation(raw, [("messages", message_list(raw, "messages", data["messages"]))])
    if present(data, "completion"):
        return _sft_answer(raw, "completion")
    if present(data, "response"):
        return SFTRecord(required(raw, "prompt"), required(raw, "response"), None, raw.source, raw.where)
    if present(data, "chosen"):
        # DeepSpeed-Chat trains SFT on the chosen side of pair datasets (get_prompt_and_chosen).
        if present(data, "prompt") or is_list(data["chosen"]):
            return _sft_answer(raw, "chosen")
        prompt, chosen, _ = _implicit_string_pair(raw)
        return SFTRecord(prompt, chosen, None, raw.source, raw.where)
    if present(data, "text"):
        return SFTRecord(None, None, None, raw.source, raw.where, text=string(raw, "text", data["text"]))
    if present(data, "prompt"):
        required(raw, "response")  # raises: the prompt has no response
    raise _no_layout(
        raw,
        "'prompt' and 'response', 'prompt' and 'completion', 'messages', a pair ('prompt', 'chosen', 'rejected', "
        "or 'chosen' and 'rejected'), or 'text'",
    )


def _sft_answer(raw: RawRecord, answer: str) -> SFTRecord:
    """prompt + `answer` ("completion" or "chosen"): two strings, or the prompt's turns (none for an implicit-prompt
    pair) continued by the answer's."""
    data = raw.data
    if present(data, "prompt") and not is_list(data["prompt"]):
        return SFTRecord(required(raw, "prompt"), required(raw, answer), None, raw.source, raw.where)
    if not present(data, "prompt") and answer == "completion":
        required(raw, "prompt")  # raises: a completion needs its prompt
    parts = [("prompt", message_list(raw, "prompt", data["prompt"]))] if present(data, "prompt") else []
    return _sft_conversation(raw, [*parts, (answer, _turns(raw, answer, "prompt"))])


def _sft_conversation(raw: RawRecord, parts: list[tuple[str, tuple[dict, ...]]]) -> SFTRecord:
    """The turns of `parts` ((field, turns), in order) as one conversation: it must end with an assistant turn
    (the response to learn) and have a user turn."""
    turns = tuple(turn for _, part in parts for turn in part)
    last_field, last_part = parts[-1]
    if turns[-1]["role"] != "assistant":
        raise DataError(
            raw.source,
            raw.where,
            f"{last_field}[{len(last_part) - 1}].role",
            f"the last turn must be 'assistant' (the response to learn), found '{turns[-1]['role']}'",
        )
    if not any(turn["role"] == "user" for turn in turns):
        raise DataError(raw.source, raw.where, parts[0][0], "has no 'user' turn")
    return SFTRecord(None, None, turns, raw.source, raw.where)


# ---------------------------------------------------------------- pairs


def to_pair(raw: RawRecord) -> PairRecord:
    """Validate a preference pair; `chosen` and `rejected` must differ beyond surrounding whitespace."""
    raw = adapt(raw, "pair")
    data = raw.data
    conversational = is_list(data["prompt"]) if present(data, "prompt") else is_list(data.get("chosen"))
    if conversational:
        messages, chosen, rejected = _conversational_pair(raw)
        prompt = None
    elif present(data, "prompt"):
        prompt, chosen, rejected = required(raw, "prompt"), required(raw, "chosen"), required(raw, "rejected")
        messages = None
    else:
        prompt, chosen, rejected = _implicit_string_pair(raw)
        messages = None
    if chosen.strip() == rejected.strip():
        raise DataError(
            raw.source, raw.where, "rejected", "is the same text as 'chosen'; a pair needs two different responses"
        )
    return PairRecord(prompt, chosen, rejected, raw.source, raw.where, messages)


def shared_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen answer, rejected answer) of an implicit-prompt string pair: the prompt is the longest common
    prefix of the two texts, cut back to a whitespace boundary so that no word is split (TRL's `extract_prompt` cuts
    at the first differing character). Surrounding whitespace is stripped from each part; a part may be empty."""
    n = len(os.path.commonprefix([chosen, rejected]))
    if not all(n == len(text) or text[n].isspace() for text in (chosen, rejected)):
        while n > 0 and not chosen[n - 1].isspace():
            n -= 1
    return chosen[:n].strip(), chosen[n:].strip(), rejected[n:].strip()


def _implicit_string_pair(raw: RawRecord) -> tuple[str, str, str]:
    """A pair without a prompt, of two strings: the prompt is the text both start with (`shared_prompt`)."""
    chosen, rejected = required(raw, "chosen"), required(raw, "rejected")
    prompt, chosen_answer, rejected_answer = shared_prompt(chosen, rejected)
    if not prompt:
        raise DataError(
            raw.source,
            raw.where,
            "prompt",
            "missing (expected a string), and 'chosen' and 'rejected' do not start with the same words, which would "
            f"be the prompt of an implicit-prompt pair; the record's fields are: {fields_of(raw)}",
        )
    for name, answer in (("chosen", chosen_answer), ("rejected", rejected_answer)):
        if not answer:
            raise DataError(
                raw.source,
                raw.where,
                name,
                "has no answer after the prompt it shares with the other side (an implicit-prompt pair)",
            )
    return prompt, chosen_answer, rejected_answer


def _conversational_pair(raw: RawRecord) -> tuple[tuple[dict, ...], str, str]:
    """(prompt conversation, chosen answer, rejected answer): `prompt` + `chosen` and `prompt` + `rejected` are two
    conversations that must be the same up to their final assistant turns."""
    data = raw.data
    prompt = message_list(raw, "prompt", data["prompt"]) if present(data, "prompt") else ()
    like = "prompt" if prompt else "chosen"
    sides = {name: _turns(raw, name, like) for name in ("chosen", "rejected")}
    contexts, answers = {}, {}
    for name, turns in sides.items():
        if turns[-1]["role"] != "assistant":
            raise DataError(
                raw.source,
                raw.where,
                f"{name}[{len(turns) - 1}].role",
                f"the last turn must be 'assistant' (the answer being compared), found '{turns[-1]['role']}'",
            )
        contexts[name], answers[name] = prompt + turns[:-1], turns[-1]["content"]
    keys = {name: [(t["role"], t["content"]) for t in context] for name, context in contexts.items()}
    if keys["chosen"] != keys["rejected"]:
        first = next(
            (i for i, (a, b) in enumerate(zip(keys["chosen"], keys["rejected"])) if a != b),
            min(len(keys["chosen"]), len(keys["rejected"])),
        )
        raise DataError(
            raw.source,
            raw.where,
            f"rejected[{first - len(prompt)}]",
            "differs from 'chosen' before the final assistant turn; a pair compares two answers to one conversation",
        )
    context = contexts["chosen"]
    if not context or context[-1]["role"] != "user":
        raise DataError(
            raw.source,
            raw.where,
            like,
            "the conversation before the final assistant turn must end with a 'user' turn, found "
            f"{'no turns' if not context else repr(context[-1]['role'])}",
        )
    return context, answers["chosen"], answers["rejected"]


# ---------------------------------------------------------------- prompts


def to_prompt(raw: RawRecord) -> PromptRecord:
    """Validate an RL prompt from `prompt` (a string or turns), `messages`, or a pair without a prompt; every other
    field goes to `extra`.

    From turns, the prompt conversation is every turn before a final assistant turn: that turn (the
    dataset's own answer) is dropped, and what is left must end with a user turn.
    """
    raw = adapt(raw, "prompt")
    data = raw.data
    for field in ("messages", "prompt"):
        if present(data, field) and (field == "messages" or is_list(data[field])):
            messages = _prompt_conversation(raw, field, message_list(raw, field, data[field]))
            return PromptRecord(None, messages, _without(data, field), raw.source, raw.where)
    if not present(data, "prompt") and present(data, "chosen"):
        if is_list(data["chosen"]):
            messages = _prompt_conversation(raw, "chosen", message_list(raw, "chosen", data["chosen"]))
            return PromptRecord(None, messages, dict(data), raw.source, raw.where)
        prompt, _, _ = _implicit_string_pair(raw)
        return PromptRecord(prompt, None, dict(data), raw.source, raw.where)
    if "prompt" not in data:
        raise _no_layout(raw, "'prompt' or 'messages' (or a pair)")
    return PromptRecord(required(raw, "prompt"), None, _without(data, "prompt"), raw.source, raw.where)


def _prompt_conversation(raw: RawRecord, field: str, turns: tuple[dict, ...]) -> tuple[dict, ...]:
    if turns[-1]["role"] == "assistant":
        turns = turns[:-1]
    if not turns or turns[-1]["role"] != "user":
        raise DataError(
            raw.source,
            raw.where,
            field,
            "the prompt conversation (all turns before a final assistant turn) must end with "
            f"a 'user' turn, found {'no turns' if not turns else repr(turns[-1]['role'])}",
        )
    return turns


def _without(data: dict, field: str) -> dict:
    return {k: v for k, v in data.items() if k != field}


# ---------------------------------------------------------------- every record


def validate_all(
    raws: Iterable[RawRecord], convert: Callable[[RawRecord], R], skip_invalid: bool = False
) -> tuple[list[R], list[DataError]]:
    """Convert every record with `convert` (`to_sft`, `to_pair` or `to_prompt`).

    By default raise the error of the first invalid record (by file and position), saying how many other records
    are invalid too. With `skip_invalid`,
    return the valid records and every error; the caller reports the count, so nothing is dropped silently.
    """
    valid: list[R] = []
    errors: list[DataError] = []
    for raw in raws:
        try:
            valid.append(convert(raw))
        except DataError as e:
            errors.append(e)
    if errors and not skip_invalid:
        first = first_in_file(errors)
        if len(errors) == 1:
            raise first
        more = len(errors) - 1
        raise DataError(
            first.source,
            first.where,
            first.field,
            f"{first.problem} (and {more} more invalid record{'s' if more > 1 else ''} in this dataset)",
        )
    return valid, errors
