"""Dataset formats: which schema a source's records are in, detected from its columns or chosen by name.

`trl` is chatrlhf's own schema (`records.py`), which takes TRL's standard and conversational dataset formats as
they are. Every other format is a public dataset's schema with an adapter (`adapters.py`) that maps its records to
chatrlhf's. `load_source` tags each record with its source's format (`detect`); `to_sft`, `to_pair` and
`to_prompt` then convert it with `adapt`. docs/data.md documents every format's source schema.

Detection looks at the columns of the whole source (for JSON Lines, every key of every record) and, where a
format shares columns with `trl`, at the first non-null value of a column: a source fits a public format when it has
all of that format's columns and looks like it; a source that fits none is `trl` if it has one of `trl`'s fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import chatrlhf.data.adapters as adapters
from chatrlhf.data.raw import NATIVE_FORMAT, RawRecord
from chatrlhf.errors import DataError

Sample = dict[str, Any]
"""The first non-null value of each column of a source."""

KINDS = {"sft": "SFT records", "pair": "preference pairs", "prompt": "RL prompts"}

TRL_FIELDS = ("prompt", "response", "completion", "messages", "text", "chosen", "rejected")
"""The fields of chatrlhf's own schema; a source with one of them, and that fits no public format, is `trl`."""


def _is_transcript(value: object) -> bool:
    """An Anthropic transcript: "Human: ..." first, and "\\n\\nAssistant:" turns (so not DeepSpeed-Chat's
    single-line " Human: ... Assistant:" prompts, which stay plain `trl` strings)."""
    return isinstance(value, str) and value.lstrip().startswith("Human:") and "\n\nAssistant:" in value


@dataclass(frozen=True)
class Format:
    """A dataset schema: how to recognise it and how to convert its records to chatrlhf's."""

    name: str
    """What `--data.format` calls it."""
    datasets: str
    """The public datasets in this format, for messages and docs."""
    columns: tuple[str, ...]
    """Columns every source in this format has."""
    looks_like: Callable[[Sample], bool] | None = None
    """A check on the first values, for a format whose columns alone would also fit `trl`."""
    sft: Callable[[RawRecord], dict] | None = None
    """Record → chatrlhf SFT record; None when the format has no SFT data."""
    pair: Callable[[RawRecord], dict] | None = None
    """Record → chatrlhf preference pair; None when it has no pairs."""
    prompt: Callable[[RawRecord], dict] | None = None
    """Record → chatrlhf RL prompt."""
    group: Callable[[Callable[[str], list], Callable[[int], str], str], list[list[int]]] | None = None
    """For a format whose record is made of several rows (a message tree): `group(column, where, source)` → the
    rows of each record, its top row first; `column(name)` is every row's value of a column, `where(i)` row i's
    position. `tree_record` then makes the record of those rows."""


PUBLIC = (
    Format(
        "hh-rlhf",
        "Anthropic/hh-rlhf",
        ("chosen", "rejected"),
        looks_like=lambda s: "prompt" not in s and _is_transcript(s.get("chosen")),
        sft=adapters.hh_sft,
        pair=adapters.hh_pair,
        prompt=adapters.hh_prompt,
    ),
    Format(
        "rm-static",
        "Dahoas/rm-static, Dahoas/full-hh-rlhf",
        ("prompt", "response", "chosen", "rejected"),
        looks_like=lambda s: _is_transcript(s.get("prompt")),
        sft=adapters.rm_static_sft,
        pair=adapters.rm_static_pair,
        prompt=adapters.rm_static_prompt,
    ),
    Format(
        "shp",
        "stanfordnlp/SHP, stanfordnlp/SHP-2",
        ("history", "human_ref_A", "human_ref_B", "labels"),
        sft=adapters.shp_sft,
        pair=adapters.shp_pair,
        prompt=adapters.shp_prompt,
    ),
    Format(
        "webgpt",
        "openai/webgpt_comparisons",
        ("question", "answer_0", "answer_1", "score_0", "score_1"),
        sft=adapters.webgpt_sft,
        pair=adapters.webgpt_pair,
        prompt=adapters.webgpt_prompt,
    ),
    Format(
        "ultrafeedback",
        "HuggingFaceH4/ultrafeedback_binarized, argilla/ultrafeedback-binarized-preferences-cleaned",
        ("prompt", "chosen", "rejected"),
        looks_like=lambda s: isinstance(s.get("prompt"), str) and isinstance(s.get("chosen"), (list, tuple)),
        sft=adapters.ultrafeedback_sft,
        pair=adapters.ultrafeedback_pair,
        prompt=adapters.ultrafeedback_prompt,
    ),
    Format(
        "oasst",
        "OpenAssistant/oasst1, OpenAssistant/oasst2",
        ("message_id", "parent_id", "role", "text"),
        sft=adapters.oasst_sft,
        prompt=adapters.oasst_prompt,
        group=adapters.oasst_trees,
    ),
)

TRL = Format(NATIVE_FORMAT, "chatrlhf's own schema: TRL's standard and conversational formats", TRL_FIELDS)

FORMATS: dict[str, Format] = {f.name: f for f in (TRL, *PUBLIC)}
FORMAT_CHOICES = ("auto", *FORMATS)
"""The values of `data.format`."""


def _known() -> str:
    return "; ".join(f"{f.name} ({f.datasets}: {', '.join(f.columns)})" for f in FORMATS.values())


def columns_of(records: list[RawRecord]) -> tuple[list[str], Sample]:
    """Every column of the records, in order of first appearance, and the first non-null value of each."""
    columns: dict[str, None] = {}
    sample: Sample = {}
    for record in records:
        for key, value in record.data.items():
            columns.setdefault(key)
            if value is not None and key not in sample:
                sample[key] = value
    return list(columns), sample


def _shown(columns: list[str]) -> str:
    return ", ".join(f"'{c}'" for c in columns) or "none"


def detect(records: list[RawRecord], spec: str, choice: str = "auto") -> str:
    """The format of one source's records (`detect_columns` of their columns)."""
    return detect_columns(*columns_of(records), spec, choice)


def detect_columns(columns: list[str], sample: Sample, spec: str, choice: str = "auto") -> str:
    """The format of a source with these columns (in order of first appearance) and first non-null values:
    `choice`, checked against the columns, or (`auto`) the one format they fit. Raises `DataError` for an unknown
    name, a chosen format whose columns are missing, and columns that fit several public formats or none."""
    if choice != "auto" and choice not in FORMATS:
        raise DataError(spec, None, None, f"unknown format '{choice}'; known: {', '.join(FORMAT_CHOICES)}")
    if choice != "auto":
        missing = [c for c in FORMATS[choice].columns if c not in columns]
        if choice != NATIVE_FORMAT and missing:
            raise DataError(
                spec,
                None,
                None,
                f"format '{choice}' ({FORMATS[choice].datasets}) needs the columns {', '.join(FORMATS[choice].columns)}"
                f", but {_shown(missing)} {'is' if len(missing) == 1 else 'are'} missing; the columns are: "
                f"{_shown(columns)}",
            )
        return choice
    fits = [
        f.name
        for f in PUBLIC
        if all(c in columns for c in f.columns) and (f.looks_like is None or f.looks_like(sample))
    ]
    if len(fits) > 1:
        raise DataError(
            spec,
            None,
            None,
            f"the columns ({_shown(columns)}) fit more than one format: {', '.join(fits)}; choose one with "
            "--data.format",
        )
    if fits:
        return fits[0]
    if any(c in columns for c in TRL_FIELDS):
        return NATIVE_FORMAT
    raise DataError(
        spec,
        None,
        None,
        f"no known format has these columns: {_shown(columns)}; known formats (columns): {_known()}; see docs/data.md",
    )


def tree_record(rows: list[RawRecord], format: str) -> RawRecord:
    """The record made of several rows (a multi-row format's `group`), at the position of its top row."""
    return RawRecord({"tree": rows}, rows[0].source, rows[0].where, format)


def tag(records: list[RawRecord], spec: str, choice: str = "auto") -> list[RawRecord]:
    """The records of one source in its format (`detect`); a multi-row format's rows are grouped into records."""
    name = detect(records, spec, choice)
    fmt = FORMATS[name]
    if fmt.group is not None:
        trees = fmt.group(lambda column: [r.data.get(column) for r in records], lambda i: records[i].where, spec)
        return [tree_record([records[i] for i in rows], name) for rows in trees]
    if name == NATIVE_FORMAT:
        return records
    return [replace(record, format=name) for record in records]


def adapt(raw: RawRecord, kind: str) -> RawRecord:
    """`raw` in chatrlhf's schema for `kind` ("sft", "pair" or "prompt"), through its format's adapter; a record
    already in chatrlhf's schema is returned as it is."""
    if raw.format == NATIVE_FORMAT:
        return raw
    fmt = FORMATS[raw.format]
    convert = getattr(fmt, kind)
    if convert is None:
        offers = " and ".join(KINDS[k] for k in KINDS if getattr(fmt, k) is not None)
        raise DataError(
            raw.source, raw.where, None, f"format '{fmt.name}' ({fmt.datasets}) has no {KINDS[kind]}, only {offers}"
        )
    return RawRecord(convert(raw), raw.source, raw.where)
