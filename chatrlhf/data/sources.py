"""Read a data source into raw records, each tagged with where it came from and its dataset format.

A source is a file (`.jsonl`, `.json`, `.parquet`, `.csv`), a directory written by `datasets`' `save_to_disk`
(`dir` or `dir:split`), or a dataset loaded by name with `datasets.load_dataset` (`hf:ID[:SPLIT][?options]`, see
`hub.py`). Every record keeps its source and position ("line N", "item N" or "row N") so that validation errors
can point at it, and its source's format (`formats.py`). Nothing here checks the fields of a record; `records.py`
does that.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from chatrlhf.data.formats import tag
from chatrlhf.data.hub import is_hub_spec, load_hub
from chatrlhf.data.raw import RawRecord
from chatrlhf.errors import DataError

__all__ = ["SUPPORTED", "RawRecord", "load_source"]

SUPPORTED = ".jsonl, .json, .parquet, .csv, or a directory written by datasets' save_to_disk"


def load_source(spec: str, format: str = "auto") -> list[RawRecord]:
    """Load every record of one source, tagged with its format.

    `spec` is a path; for a `DatasetDict` saved to disk it may be `path:split` (default split: "train"); `hf:...`
    loads a dataset with `datasets.load_dataset` (`hub.py`). `format` is "auto" (detected from the columns) or a
    format name (`formats.FORMATS`). Raises `DataError` for a missing path, an unsupported format, unreadable or
    malformed content, a source with no records, and columns that fit no format, or several.
    """
    if is_hub_spec(spec):
        records = load_hub(spec)
    else:
        records = _load_local(spec)
    if not records:
        raise DataError(spec, None, None, "no records")
    return tag(records, spec, format)


def _load_local(spec: str) -> list[RawRecord]:
    path, split = _resolve(spec)
    if path.is_dir():
        return _load_saved_dataset(spec, path, split)
    if split is not None:
        raise DataError(
            spec,
            None,
            None,
            f"a ':{split}' suffix only applies to a dataset directory written by save_to_disk, and this is a file",
        )
    suffix = path.suffix.lower()
    readers = {".jsonl": _load_jsonl_file, ".json": _load_json, ".parquet": _load_parquet, ".csv": _load_csv}
    if suffix not in readers:
        raise DataError(spec, None, None, f"unsupported file type '{suffix or path.name}'; supported: {SUPPORTED}")
    return readers[suffix](spec, path)


def _resolve(spec: str) -> tuple[Path, str | None]:
    """Split `spec` into a path and an optional split name; a path that exists as written wins."""
    path = Path(spec).expanduser()
    if path.exists():
        return path, None
    if ":" in spec:
        head, split = spec.rsplit(":", 1)
        head_path = Path(head).expanduser()
        if head and split and head_path.exists():
            return head_path, split
    raise DataError(spec, None, None, "no such file or directory")


WIDE_BOMS = {
    b"\xff\xfe\x00\x00": "UTF-32",
    b"\x00\x00\xfe\xff": "UTF-32",
    b"\xff\xfe": "UTF-16",
    b"\xfe\xff": "UTF-16",
}
"""Byte-order marks of encodings other than UTF-8, longest first (UTF-32 LE starts with UTF-16 LE's mark)."""


def _read_text(spec: str, path: Path) -> str:
    """The file decoded as UTF-8 (a leading byte-order mark is dropped); bad bytes name their line.

    UTF-16/UTF-32 files are named as such: a wide encoding's mark, or the NUL bytes of ASCII text in a wide
    encoding without one, would otherwise show up as a puzzling JSON or CSV error.
    """
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(spec, None, None, f"cannot read: {e.strerror or e}") from None
    for bom, encoding in WIDE_BOMS.items():
        if raw.startswith(bom):
            raise DataError(
                spec, None, None, f"is {encoding} text (it starts with a {encoding} byte-order mark); save it as UTF-8"
            )
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    nul = raw.find(b"\x00")
    if nul >= 0:
        line = raw.count(b"\n", 0, nul) + 1
        raise DataError(
            spec,
            f"line {line}",
            None,
            "contains NUL bytes (0x00), so it is not UTF-8 text: a UTF-16 file without a byte-order mark, or a "
            "binary file; save it as UTF-8",
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            spec, f"line {line}", None, f"invalid UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8"
        ) from None


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    names = {
        str: "a string",
        int: "a number",
        float: "a number",
        bool: "a boolean",
        list: "an array",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def _load_jsonl_file(spec: str, path: Path) -> list[RawRecord]:
    return _parse_jsonl(spec, _read_text(spec, path))


def _parse_jsonl(spec: str, text: str) -> list[RawRecord]:
    """One JSON object per non-blank line."""
    records = []
    loads = json.loads
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            value = loads(line)
        except json.JSONDecodeError as e:
            raise DataError(spec, where, None, f"invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(value, dict):
            raise DataError(spec, where, None, f"expected a JSON object, found {_json_type(value)}")
        records.append(RawRecord(value, spec, where))
    return records


def _load_json(spec: str, path: Path) -> list[RawRecord]:
    """A JSON array of objects; a `.json` file that is really JSON Lines is read as JSON Lines."""
    text = _read_text(spec, path)
    stripped = text.lstrip()
    if not stripped:
        return []
    if not stripped.startswith("["):
        # Not an array: JSON Lines saved as .json (common for exported datasets). A single multi-line
        # object (e.g. {"data": [...]}) is not a list of records; say so rather than guess.
        if stripped.startswith("{") and len([ln for ln in text.split("\n") if ln.strip()]) > 1:
            try:
                json.loads(text)
            except json.JSONDecodeError:
                return _parse_jsonl(spec, text)
            raise DataError(
                spec,
                None,
                None,
                "expected a JSON array of objects or one JSON object per line (JSON Lines), "
                "found a single JSON object spanning several lines",
            )
        return _parse_jsonl(spec, text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(spec, f"line {e.lineno}", None, f"invalid JSON: {e.msg} (column {e.colno})") from None
    records = []
    for number, item in enumerate(value, start=1):
        where = f"item {number}"
        if not isinstance(item, dict):
            raise DataError(spec, where, None, f"expected a JSON object, found {_json_type(item)}")
        records.append(RawRecord(item, spec, where))
    return records


def _load_parquet(spec: str, path: Path) -> list[RawRecord]:
    import pyarrow
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(spec, None, None, f"not a readable Parquet file: {e}") from None
    return [RawRecord(row, spec, f"row {number}") for number, row in enumerate(rows, start=1)]


def _load_csv(spec: str, path: Path) -> list[RawRecord]:
    """A header row names the columns; every value is a string. Blank lines are skipped."""
    reader = csv.reader(io.StringIO(_read_text(spec, path), newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return []
        for column in header:
            if header.count(column) > 1:
                raise DataError(spec, "line 1", None, f"duplicate column '{column}' in the header")
        records = []
        for values in reader:
            if not values:
                continue
            where = f"row {len(records) + 1}"
            if len(values) != len(header):
                raise DataError(
                    spec,
                    where,
                    None,
                    f"has {len(values)} values but the header has {len(header)} columns (line {reader.line_num})",
                )
            records.append(RawRecord(dict(zip(header, values)), spec, where))
    except csv.Error as e:
        raise DataError(spec, f"line {reader.line_num}", None, f"malformed CSV: {e}") from None
    return records


def _load_saved_dataset(spec: str, path: Path, split: str | None) -> list[RawRecord]:
    """A `Dataset` or `DatasetDict` directory written by `save_to_disk`."""
    is_dict = (path / "dataset_dict.json").is_file()
    is_dataset = (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    if not (is_dict or is_dataset):
        raise DataError(
            spec,
            None,
            None,
            "is a directory but not a dataset written by save_to_disk (it has neither "
            f"dataset_dict.json nor state.json + dataset_info.json); supported: {SUPPORTED}",
        )
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as e:
        raise DataError(spec, None, None, f"cannot load the saved dataset: {e}") from None
    if isinstance(loaded, datasets.DatasetDict):
        name = split or "train"
        if name not in loaded:
            raise DataError(
                spec, None, None, f"no split '{name}'; the splits are: {', '.join(loaded)} (choose one with path:split)"
            )
        loaded = loaded[name]
    elif split is not None:
        raise DataError(spec, None, None, f"this is a single Dataset without splits; drop ':{split}'")
    return [RawRecord(row, spec, f"row {number}") for number, row in enumerate(loaded.to_list(), start=1)]
