"""`RawRecord`: one record as read from a source, before validation (its own module so that sources, formats and
records can all use it)."""

from __future__ import annotations

from dataclasses import dataclass

NATIVE_FORMAT = "trl"
"""The format of records in chatrlhf's own schema (a superset of TRL's dataset formats); see `formats.py`."""


@dataclass(frozen=True)
class RawRecord:
    """One record as read from a source, before validation."""

    data: dict
    """The record's fields, as parsed (JSON object, Parquet/datasets row, or CSV row of strings)."""
    source: str
    """The source spec the record came from, as the user wrote it."""
    where: str
    """Position in the source: "line N" (JSONL, 1-based physical line), "item N" (JSON array, 1-based) or
    "row N" (Parquet, CSV, datasets on disk or from the hub; 1-based data rows)."""
    format: str = NATIVE_FORMAT
    """The dataset format the record is in (`formats.FORMATS`), detected or chosen per source by `load_source`;
    `to_sft`, `to_pair` and `to_prompt` convert it to chatrlhf's schema with that format's adapter."""
