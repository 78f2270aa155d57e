"""Checks of single fields of a `RawRecord`, shared by the record schemas (`records.py`) and the dataset adapters
(`adapters.py`). Each raises `DataError` naming the source, the record's position and the field."""

from __future__ import annotations

from chatrlhf.data.raw import RawRecord
from chatrlhf.errors import DataError

ROLES = ("system", "user", "assistant")


def describe(value: object) -> str:
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


def present(data: dict, field: str) -> bool:
    """A field counts as absent when it is null: Parquet and `datasets` fill a column missing from a row with null."""
    return data.get(field) is not None


def is_list(value: object) -> bool:
    return isinstance(value, (list, tuple))


def string(raw: RawRecord, label: str, value: object) -> str:
    """`value` as a non-blank string, else `DataError` naming `label`."""
    if not isinstance(value, str):
        raise DataError(raw.source, raw.where, label, f"expected a string, found {describe(value)}")
    if not value.strip():
        raise DataError(raw.source, raw.where, label, "is empty" if not value else "is only whitespace")
    return value


def fields_of(raw: RawRecord) -> str:
    """The record's field names (the first ten), to show next to a missing field."""
    names = list(raw.data)
    shown = ", ".join(f"'{k}'" for k in names[:10]) + (", ..." if len(names) > 10 else "")
    return shown or "none"


def required(raw: RawRecord, field: str) -> str:
    """The required field `field` of `raw` as a non-blank string."""
    if field not in raw.data:
        raise DataError(
            raw.source, raw.where, field, f"missing (expected a string); the record's fields are: {fields_of(raw)}"
        )
    return string(raw, field, raw.data[field])


def message_list(raw: RawRecord, label: str, value: object) -> tuple[dict, ...]:
    """`value` checked as a list of turns: roles in `ROLES`, non-blank string contents. Errors name `label[i]`.

    Each turn is copied, keeping any keys beyond "role" and "content".
    """
    if not is_list(value):
        raise DataError(
            raw.source, raw.where, label, f"expected a list of {{'role', 'content'}} objects, found {describe(value)}"
        )
    if not value:
        raise DataError(raw.source, raw.where, label, "is an empty list")
    turns = []
    for i, turn in enumerate(value):
        name = f"{label}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(
                raw.source, raw.where, name, f"expected an object with 'role' and 'content', found {describe(turn)}"
            )
        if "role" not in turn:
            raise DataError(raw.source, raw.where, f"{name}.role", f"missing (expected one of {', '.join(ROLES)})")
        if turn["role"] not in ROLES:
            raise DataError(
                raw.source,
                raw.where,
                f"{name}.role",
                f"expected one of {', '.join(ROLES)}, found {describe(turn['role'])}",
            )
        if "content" not in turn:
            raise DataError(raw.source, raw.where, f"{name}.content", "missing (expected a string)")
        string(raw, f"{name}.content", turn["content"])
        turns.append(dict(turn))
    return tuple(turns)
