"""Typed, validated records for each stage, converted from `RawRecord`s.

Schemas (extra fields are allowed: ignored for SFT and pairs, kept in `PromptRecord.extra` for RL):

- SFT: `{"prompt", "response"}`, or `{"messages": [{"role", "content"}, ...]}` ending with an assistant turn,
  or a pair record `{"prompt", "chosen", "rejected"}` whose `chosen` is the response (as DeepSpeed-Chat does).
- Pairs (reward model, DPO): `{"prompt", "chosen", "rejected"}` with `chosen` != `rejected`.
- Prompts (RL): `{"prompt"}` or `{"messages"}`; a final assistant turn of `messages` is dropped.

When a record has `messages` it is read as a conversation, whatever other fields it has. A field whose value
is null counts as absent when choosing between these layouts, because Parquet and `datasets` fill a column
missing from some rows with null.

Every problem raises `DataError` naming the source, the record's position and the field.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from chatrlhf.data.sources import RawRecord
from chatrlhf.errors import DataError, first_in_file

ROLES = ("system", "user", "assistant")

R = TypeVar("R")


@dataclass(frozen=True)
class SFTRecord:
    """A supervised example: exactly one of (`prompt` and `response`) or `messages` is set."""

    prompt: str | None
    response: str | None
    messages: tuple[dict, ...] | None
    """The conversation, ending with an assistant turn; each dict has "role" and "content"."""
    source: str
    where: str


@dataclass(frozen=True)
class PairRecord:
    """A preference pair: `chosen` is the better response to `prompt` than `rejected`."""

    prompt: str
    chosen: str
    rejected: str
    source: str
    where: str


@dataclass(frozen=True)
class PromptRecord:
    """An RL prompt: exactly one of `prompt` or `messages` (ending with a user turn) is set."""

    prompt: str | None
    messages: tuple[dict, ...] | None
    extra: dict
    """Every other field of the record, passed to reward functions."""
    source: str
    where: str


def _describe(value: object) -> str:
    """Type and a short preview of a value, for "found ..." in error messages."""
    names = {
        str: "string",
        int: "integer",
        float: "number",
        bool: "boolean",
        list: "list",
        tuple: "list",
        dict: "object",
    }
    if value is None:
        return "null"
    name = names.get(type(value), type(value).__name__)
    preview = repr(value)
    return f"{name} {preview if len(preview) <= 40 else preview[:37] + '...'}"


def _present(data: dict, field: str) -> bool:
    return data.get(field) is not None


def _string(raw: RawRecord, label: str, value: object) -> str:
    """`value` as a non-blank string, else `DataError` naming `label`."""
    if not isinstance(value, str):
        raise DataError(raw.source, raw.where, label, f"expected a string, found {_describe(value)}")
    if not value.strip():
        raise DataError(raw.source, raw.where, label, "is empty" if not value else "is only whitespace")
    return value


def _fields_of(raw: RawRecord) -> str:
    """The record's field names (the first ten), to show next to a missing field."""
    names = list(raw.data)
    shown = ", ".join(f"'{k}'" for k in names[:10]) + (", ..." if len(names) > 10 else "")
    return shown or "none"


def _field(raw: RawRecord, field: str) -> str:
    """The required field `field` of `raw` as a non-blank string."""
    if field not in raw.data:
        raise DataError(
            raw.source, raw.where, field, f"missing (expected a string); the record's fields are: {_fields_of(raw)}"
        )
    return _string(raw, field, raw.data[field])


def _messages(raw: RawRecord) -> tuple[dict, ...]:
    """`raw.data["messages"]` checked turn by turn: roles in `ROLES`, non-blank string contents.

    Each turn is copied, keeping any keys beyond "role" and "content".
    """
    value = raw.data["messages"]
    if not isinstance(value, (list, tuple)):
        raise DataError(
            raw.source,
            raw.where,
            "messages",
            f"expected a list of {{'role', 'content'}} objects, found {_describe(value)}",
        )
    if not value:
        raise DataError(raw.source, raw.where, "messages", "is an empty list")
    turns = []
    for i, turn in enumerate(value):
        name = f"messages[{i}]"
        if not isinstance(turn, dict):
            raise DataError(
                raw.source, raw.where, name, f"expected an object with 'role' and 'content', found {_describe(turn)}"
            )
        if "role" not in turn:
            raise DataError(raw.source, raw.where, f"{name}.role", f"missing (expected one of {', '.join(ROLES)})")
        if turn["role"] not in ROLES:
            raise DataError(
                raw.source,
                raw.where,
                f"{name}.role",
                f"expected one of {', '.join(ROLES)}, found {_describe(turn['role'])}",
            )
        if "content" not in turn:
            raise DataError(raw.source, raw.where, f"{name}.content", "missing (expected a string)")
        _string(raw, f"{name}.content", turn["content"])
        turns.append(dict(turn))
    return tuple(turns)


def _no_layout(raw: RawRecord, layouts: str) -> DataError:
    """The error for a record that matches none of a stage's layouts."""
    problem = "missing" if "prompt" not in raw.data else "is null"
    return DataError(
        raw.source, raw.where, "prompt", f"{problem}; expected {layouts}; the record's fields are: {_fields_of(raw)}"
    )


def to_sft(raw: RawRecord) -> SFTRecord:
    """Validate an SFT record: messages, prompt+response, or a pair (its `chosen` is the response)."""
    data = raw.data
    if _present(data, "messages"):
        messages = _messages(raw)
        if messages[-1]["role"] != "assistant":
            raise DataError(
                raw.source,
                raw.where,
                f"messages[{len(messages) - 1}].role",
                f"the last turn must be 'assistant' (the response to learn), found '{messages[-1]['role']}'",
            )
        if not any(turn["role"] == "user" for turn in messages):
            raise DataError(raw.source, raw.where, "messages", "has no 'user' turn")
        return SFTRecord(None, None, messages, raw.source, raw.where)
    if _present(data, "response"):
        return SFTRecord(_field(raw, "prompt"), _field(raw, "response"), None, raw.source, raw.where)
    if _present(data, "chosen"):
        # DeepSpeed-Chat trains SFT on the chosen side of pair datasets (get_prompt_and_chosen).
        return SFTRecord(_field(raw, "prompt"), _field(raw, "chosen"), None, raw.source, raw.where)
    if _present(data, "prompt"):
        _field(raw, "response")  # raises: the prompt has no response
    raise _no_layout(raw, "'prompt' and 'response', or 'messages', or 'prompt', 'chosen' and 'rejected'")


def to_pair(raw: RawRecord) -> PairRecord:
    """Validate a preference pair; `chosen` and `rejected` must differ beyond surrounding whitespace."""
    prompt, chosen, rejected = _field(raw, "prompt"), _field(raw, "chosen"), _field(raw, "rejected")
    if chosen.strip() == rejected.strip():
        raise DataError(
            raw.source, raw.where, "rejected", "is the same text as 'chosen'; a pair needs two different responses"
        )
    return PairRecord(prompt, chosen, rejected, raw.source, raw.where)


def to_prompt(raw: RawRecord) -> PromptRecord:
    """Validate an RL prompt from `prompt` or `messages`; every other field goes to `extra`.

    From `messages`, the prompt conversation is every turn before a final assistant turn: that turn (the
    dataset's own answer) is dropped, and what is left must end with a user turn.
    """
    data = raw.data
    if _present(data, "messages"):
        messages = _messages(raw)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise DataError(
                raw.source,
                raw.where,
                "messages",
                "the prompt conversation (all turns before a final assistant turn) must end with "
                f"a 'user' turn, found {'no turns' if not messages else repr(messages[-1]['role'])}",
            )
        extra = {k: v for k, v in data.items() if k != "messages"}
        return PromptRecord(None, messages, extra, raw.source, raw.where)
    if "prompt" not in data:
        raise _no_layout(raw, "'prompt' or 'messages'")
    prompt = _field(raw, "prompt")
    extra = {k: v for k, v in data.items() if k != "prompt"}
    return PromptRecord(prompt, None, extra, raw.source, raw.where)


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
