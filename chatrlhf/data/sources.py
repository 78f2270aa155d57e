"""Read a data source into an Arrow dataset whose records know where they came from and which format they are in.

A source is a file (`.jsonl`, `.json`, `.parquet`, `.csv`), a directory written by `datasets`' `save_to_disk`
(`dir` or `dir:split`), or a dataset loaded by name with `datasets.load_dataset` (`hf:ID[:SPLIT][?options]`, see
`hub.py`). `read_source` gives a `Source`: its rows as a memory-mapped `datasets.Dataset`, never a Python list of
every record. A file is read once, streaming, into the cache (`cache.py`) under the hash of its bytes; a second run
reads that copy. JSON, JSON Lines and CSV records are kept as JSON text with their line, item or row number, so that
a record is the same Python dict that `json.loads` gives (types included: Arrow would make one type of a column
that holds a string here and a list there) and errors name its exact position. Parquet files are copied as they
are; saved and downloaded datasets are used in place. Nothing here checks the fields of a record; `records.py` does
that.

`load_source` is the small-data form: every record of a source as a list of `RawRecord`s.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from chatrlhf.data.cache import BATCH, WRITE_ERRNOS, Prep, code_digest, digest, written
from chatrlhf.data.formats import FORMATS, detect_columns, tree_record
from chatrlhf.data.hub import is_hub_spec, load_hub
from chatrlhf.data.raw import NATIVE_FORMAT, RawRecord
from chatrlhf.errors import DataError

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa

__all__ = ["SUPPORTED", "RawRecord", "Source", "load_source", "read_source"]

SUPPORTED = ".jsonl, .json, .parquet, .csv, or a directory written by datasets' save_to_disk"

CHUNK = 1 << 20
"""Bytes read at a time when a file is checked and hashed."""
TEXT_BATCH_BYTES = 1 << 26
"""A record batch of JSON text is written once it holds this much, even before BATCH records."""


@dataclass(frozen=True, eq=False)
class Source:
    """One source as read: its rows in Arrow, how they are numbered, its format and the key of its content."""

    spec: str
    """The source as the user wrote it; every record and error names it."""
    rows: datasets.Dataset
    """With `position` set: the columns `number` and `json` (each record as JSON text). Otherwise the source's own
    columns."""
    position: str | None
    """"line", "item" or "row": a record's position is "POSITION NUMBER" (JSON Lines: the physical line; JSON
    array: the item; CSV: the data row). None: row i of `rows` is "row i+1" (Parquet, datasets)."""
    fingerprint: str
    """The key of the rows' content: the hash of the file's bytes, or the dataset's `datasets` fingerprint."""
    format: str = NATIVE_FORMAT
    """The dataset format (`formats.FORMATS`), detected from the columns or chosen."""
    trees: datasets.Dataset | None = field(default=None)
    """For a format whose record is several rows (oasst): one row per record, `rows` = the indices of its rows,
    the top row first. None: one row per record."""

    @property
    def units(self) -> datasets.Dataset:
        """One row per record: `trees`, or `rows`."""
        return self.trees if self.trees is not None else self.rows

    def __len__(self) -> int:
        return len(self.units)

    def records(self, batch: pa.Table, units: np.ndarray) -> list[RawRecord]:
        """The `RawRecord`s of a batch of `units` rows (`units`: their indices in `units`)."""
        if self.trees is None:
            return self._rows_as_records(batch, units, self.format)
        members = batch.column("rows").to_pylist()
        flat = [row for rows in members for row in rows]
        rows = self._rows_as_records(self.rows.with_format("arrow")[flat], np.asarray(flat), NATIVE_FORMAT)
        out, start = [], 0
        for m in members:
            out.append(tree_record(rows[start : start + len(m)], self.format))
            start += len(m)
        return out

    def _rows_as_records(self, table: pa.Table, rows: np.ndarray, format: str) -> list[RawRecord]:
        if self.position is None:
            return [
                RawRecord(data, self.spec, f"row {i + 1}", format) for i, data in zip(rows.tolist(), table.to_pylist())
            ]
        loads, label = json.loads, self.position
        numbers, texts = table.column("number").to_pylist(), table.column("json").to_pylist()
        return [RawRecord(loads(text), self.spec, f"{label} {n}", format) for n, text in zip(numbers, texts)]

    def __iter__(self) -> Iterator[RawRecord]:
        """Every record, in order, a batch at a time."""
        units = self.units.with_format("arrow")
        for start in range(0, len(units), BATCH):
            stop = min(start + BATCH, len(units))
            yield from self.records(units[start:stop], np.arange(start, stop))

    def column(self, name: str) -> list:
        """Every row's value of the column `name` (None where a row lacks it)."""
        if self.position is None:
            if name not in self.rows.column_names:
                return [None] * len(self.rows)
            return self.rows.data.column(name).to_pylist()
        values = []
        for batch in self.rows.with_format("arrow").iter(batch_size=BATCH):
            values.extend(json.loads(text).get(name) for text in batch.column("json").to_pylist())
        return values

    def where(self, row: int) -> str:
        """The position of row `row` of `rows`."""
        if self.position is None:
            return f"row {row + 1}"
        return f"{self.position} {self.rows.data.column('number')[row].as_py()}"


def read_source(spec: str, format: str = "auto", prep: Prep | None = None) -> Source:
    """Read one source into Arrow and find its format.

    `spec` is a path; for a `DatasetDict` saved to disk it may be `path:split` (default split: "train"); `hf:...`
    loads a dataset with `datasets.load_dataset` (`hub.py`). `format` is "auto" (detected from the columns) or a
    format name (`formats.FORMATS`); a format whose records are several rows is grouped here. Raises `DataError`
    for a missing path, an unsupported format, unreadable or malformed content, a source with no records, and
    columns that fit no format, or several.
    """
    prep = prep or Prep()
    if is_hub_spec(spec):
        rows = load_hub(spec)
        source = Source(spec, rows, None, rows._fingerprint)
        columns, sample = _arrow_columns(rows)
    else:
        source, columns, sample = _read_local(spec, prep)
    if len(source.rows) == 0:
        raise DataError(spec, None, None, "no records")
    name = detect_columns(columns, sample, spec, format)
    source = replace(source, format=name)
    group = FORMATS[name].group
    if group is not None:
        import datasets

        trees = group(source.column, source.where, spec)
        source = replace(source, trees=datasets.Dataset.from_dict({"rows": trees}))
    return source


def load_source(spec: str, format: str = "auto", prep: Prep | None = None) -> list[RawRecord]:
    """Every record of one source (`read_source`), tagged with its format, as a list: for small data."""
    return list(read_source(spec, format, prep))


def _read_local(spec: str, prep: Prep) -> tuple[Source, list[str], dict]:
    path, split = _resolve(spec)
    if path.is_dir():
        rows = _load_saved_dataset(spec, path, split)
        return Source(spec, rows, None, rows._fingerprint), *_arrow_columns(rows)
    if split is not None:
        raise DataError(
            spec,
            None,
            None,
            f"a ':{split}' suffix only applies to a dataset directory written by save_to_disk, and this is a file",
        )
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".parquet", ".csv"):
        raise DataError(spec, None, None, f"unsupported file type '{suffix or path.name}'; supported: {SUPPORTED}")
    return _cached_file(spec, path, suffix, prep)


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


# ---------------------------------------------------------------- the cached copy of a file


def _cached_file(spec: str, path: Path, suffix: str, prep: Prep) -> tuple[Source, list[str], dict]:
    """The file's rows from the cache, read into it first if they are not there (keyed by the file's bytes)."""
    import datasets

    key = digest("source", suffix, _content_digest(spec, path), code_digest())
    entry = prep.folder("sources") / key
    if not (entry / "meta.json").is_file():
        try:
            if suffix == ".parquet":
                meta = _copy_parquet(spec, path, entry / "rows.arrow")
            else:
                _check_text(spec, path)
                readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows}
                meta = _write_text_rows(entry / "rows.arrow", *readers[suffix](spec, path))
            with written(entry / "meta.json") as tmp:
                tmp.write_text(json.dumps(meta))
        except OSError as e:
            if e.errno in WRITE_ERRNOS:
                raise prep.unwritable(e) from None
            raise
    meta = json.loads((entry / "meta.json").read_text())
    rows = datasets.Dataset.from_file(str(entry / "rows.arrow"))
    if meta["position"] is None:
        return Source(spec, rows, None, key), *_arrow_columns(rows)
    return Source(spec, rows, meta["position"], key), meta["columns"], meta["sample"]


def _content_digest(spec: str, path: Path) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    try:
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
    except OSError as e:
        raise DataError(spec, None, None, f"cannot read: {e.strerror or e}") from None
    return h.hexdigest()


def _write_text_rows(path: Path, position: str, rows: Iterator[tuple[int, str, dict]]) -> dict:
    """Write (number, JSON text, parsed record) rows as an Arrow stream file; → the entry's metadata: the
    position label, every column in order of first appearance and its first non-null value (for `detect`)."""
    import pyarrow as pa

    schema = pa.schema([("number", pa.int64()), ("json", pa.string())])
    columns: dict[str, None] = {}
    sample: dict[str, Any] = {}
    with written(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            numbers: list[int] = []
            texts: list[str] = []
            size = 0
            for number, text, record in rows:
                numbers.append(number)
                texts.append(text)
                size += len(text)
                for key, value in record.items():
                    if key not in columns:
                        columns[key] = None
                    if value is not None and key not in sample:
                        sample[key] = value
                if len(numbers) >= BATCH or size >= TEXT_BATCH_BYTES:
                    writer.write_batch(pa.record_batch([numbers, texts], schema=schema))
                    numbers, texts, size = [], [], 0
            if numbers:
                writer.write_batch(pa.record_batch([numbers, texts], schema=schema))
    return {"position": position, "columns": list(columns), "sample": sample}


def _copy_parquet(spec: str, path: Path, out: Path) -> dict:
    """Copy the Parquet file's rows into an Arrow stream file as they are; → the entry's metadata (no position:
    row i is "row i+1"; the columns are read from the copy)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        with written(out) as tmp:
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, parquet.schema_arrow) as writer:
                for batch in parquet.iter_batches(batch_size=BATCH):
                    writer.write_batch(batch)
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            raise  # writing the copy failed, not reading the file
        raise DataError(spec, None, None, f"not a readable Parquet file: {e}") from None
    return {"position": None}


def _arrow_columns(rows: datasets.Dataset) -> tuple[list[str], dict]:
    """The dataset's columns and the first non-null value of each, found a batch at a time."""
    import pyarrow.compute as pc

    columns = list(rows.column_names)
    sample: dict[str, Any] = {}
    table = rows.with_format("arrow")
    for start in range(0, len(rows), 10 * BATCH):
        batch = table[start : start + 10 * BATCH]
        for name in columns:
            if name in sample:
                continue
            column = batch.column(name)
            first = pc.index(pc.is_valid(column), True).as_py()
            if first >= 0:
                sample[name] = column[first].as_py()
        if len(sample) == len(columns):
            break
    return columns, sample


# ---------------------------------------------------------------- text files: JSON Lines, JSON, CSV


WIDE_BOMS = {
    b"\xff\xfe\x00\x00": "UTF-32",
    b"\x00\x00\xfe\xff": "UTF-32",
    b"\xff\xfe": "UTF-16",
    b"\xfe\xff": "UTF-16",
}
"""Byte-order marks of encodings other than UTF-8, longest first (UTF-32 LE starts with UTF-16 LE's mark)."""
UTF8_BOM = b"\xef\xbb\xbf"


def _check_text(spec: str, path: Path) -> None:
    """The file must be UTF-8 (a leading byte-order mark is allowed): checked streaming, a chunk of whole lines at a
    time. A wide encoding's mark, or NUL bytes anywhere (ASCII text in a wide encoding without a mark), are named
    as such before any invalid UTF-8, which would otherwise show up as a puzzling JSON or CSV error; bad bytes
    name their line."""
    try:
        with path.open("rb") as f:
            head = f.read(4)
            for bom, encoding in WIDE_BOMS.items():
                if head.startswith(bom):
                    raise DataError(
                        spec,
                        None,
                        None,
                        f"is {encoding} text (it starts with a {encoding} byte-order mark); save it as UTF-8",
                    )
            f.seek(len(UTF8_BOM) if head.startswith(UTF8_BOM) else 0)
            lines_before, bad, carry = 0, None, b""
            while True:
                chunk = f.read(CHUNK)
                data = carry + chunk
                cut = data.rfind(b"\n") + 1 if chunk else len(data)
                piece, carry = data[:cut], data[cut:]
                nul = piece.find(b"\x00")
                if nul >= 0:
                    line = lines_before + piece.count(b"\n", 0, nul) + 1
                    raise DataError(
                        spec,
                        f"line {line}",
                        None,
                        "contains NUL bytes (0x00), so it is not UTF-8 text: a UTF-16 file without a byte-order "
                        "mark, or a binary file; save it as UTF-8",
                    )
                if bad is None:
                    try:
                        piece.decode("utf-8")
                    except UnicodeDecodeError as e:
                        bad = (lines_before + piece.count(b"\n", 0, e.start) + 1, piece[e.start])
                lines_before += piece.count(b"\n")
                if not chunk:
                    break
    except OSError as e:
        raise DataError(spec, None, None, f"cannot read: {e.strerror or e}") from None
    if bad is not None:
        line, byte = bad
        raise DataError(spec, f"line {line}", None, f"invalid UTF-8 (byte 0x{byte:02x}); save the file as UTF-8")


def _read_text(spec: str, path: Path) -> str:
    """The whole file as text (checked by `_check_text` first), without a byte-order mark."""
    try:
        with path.open("rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(spec, None, None, f"cannot read: {e.strerror or e}") from None
    return raw[len(UTF8_BOM) :].decode("utf-8") if raw.startswith(UTF8_BOM) else raw.decode("utf-8")


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


def _jsonl_rows(spec: str, path: Path) -> tuple[str, Iterator[tuple[int, str, dict]]]:
    """One JSON object per non-blank line, streamed from the file."""

    def lines() -> Iterator[str]:
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                text = raw.decode("utf-8")
                yield text[1:] if number == 1 and text.startswith("\ufeff") else text

    return "line", _parse_lines(spec, lines())


def _parse_lines(spec: str, lines: Iterator[str]) -> Iterator[tuple[int, str, dict]]:
    """(line number, text, object) of each non-blank line; `lines` are physical lines, "\\n" included."""
    loads = json.loads
    for number, line in enumerate(lines, start=1):
        line = line[:-1] if line.endswith("\n") else line
        if not line.strip():
            continue
        try:
            value = loads(line)
        except json.JSONDecodeError as e:
            raise DataError(spec, f"line {number}", None, f"invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(value, dict):
            raise DataError(spec, f"line {number}", None, f"expected a JSON object, found {_json_type(value)}")
        yield number, line, value


def _text_lines(text: str) -> Iterator[str]:
    """The physical lines of `text`, "\\n" included, without splitting it into a list."""
    start = 0
    while start < len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


JSON_SPACE = re.compile(r"[ \t\n\r]*")
"""Whitespace between JSON tokens."""


def _json_rows(spec: str, path: Path) -> tuple[str, Iterator[tuple[int, str, dict]]]:
    """A JSON array of objects; a `.json` file that is really JSON Lines is read as JSON Lines. The array is held
    as text while it is read (a `.json` file is one document), its items parsed one at a time."""
    text = _read_text(spec, path)
    stripped = text.lstrip()
    if not stripped.startswith("["):
        if stripped.startswith("{") and sum(1 for line in _first_lines(text, 2) if line.strip()) > 1:
            # Not an array: JSON Lines saved as .json (common for exported datasets). A single multi-line
            # object (e.g. {"data": [...]}) is not a list of records; say so rather than guess.
            try:
                json.loads(text)
            except json.JSONDecodeError:
                return "line", _parse_lines(spec, _text_lines(text))
            raise DataError(
                spec,
                None,
                None,
                "expected a JSON array of objects or one JSON object per line (JSON Lines), "
                "found a single JSON object spanning several lines",
            )
        return "line", _parse_lines(spec, _text_lines(text))
    return "item", _array_items(spec, text)


def _first_lines(text: str, n: int) -> Iterator[str]:
    """The non-blank lines of `text`, up to `n` of them."""
    found = 0
    for line in _text_lines(text):
        if line.strip():
            found += 1
            yield line
            if found == n:
                return


def _array_items(spec: str, text: str) -> Iterator[tuple[int, str, dict]]:
    """(item number, text, object) of each item of the JSON array `text`, parsed one at a time. A syntax error
    anywhere is reported as `json.loads` of the whole text reports it, and before any item that is not an object,
    as when the whole array is parsed first."""
    decoder = json.JSONDecoder()
    start = JSON_SPACE.match(text).end()
    if not text.startswith("[", start):
        _syntax_error(spec, text)  # whitespace that JSON does not allow before the "["
    pos = JSON_SPACE.match(text, start + 1).end()
    not_object = None
    number = 0
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError:
                _syntax_error(spec, text)
            number += 1
            if isinstance(value, dict):
                yield number, text[pos:end], value
            elif not_object is None:
                not_object = (number, value)
            pos = JSON_SPACE.match(text, end).end()
            if text.startswith(",", pos):
                pos = JSON_SPACE.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                _syntax_error(spec, text)
    if JSON_SPACE.match(text, pos).end() != len(text):
        _syntax_error(spec, text)
    if not_object is not None:
        n, value = not_object
        raise DataError(spec, f"item {n}", None, f"expected a JSON object, found {_json_type(value)}")


def _syntax_error(spec: str, text: str) -> NoReturn:
    """Raise the error `json.loads` gives for `text`, which has a syntax error."""
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(spec, f"line {e.lineno}", None, f"invalid JSON: {e.msg} (column {e.colno})") from None
    raise AssertionError("the streaming JSON array parser found an error that json.loads does not")


def _csv_rows(spec: str, path: Path) -> tuple[str, Iterator[tuple[int, str, dict]]]:
    """A header row names the columns; every value is a string. Blank lines are skipped."""

    def rows() -> Iterator[tuple[int, str, dict]]:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            try:
                header = next(reader, None)
                if header is None:
                    return
                for column in header:
                    if header.count(column) > 1:
                        raise DataError(spec, "line 1", None, f"duplicate column '{column}' in the header")
                number = 0
                for values in reader:
                    if not values:
                        continue
                    number += 1
                    if len(values) != len(header):
                        raise DataError(
                            spec,
                            f"row {number}",
                            None,
                            f"has {len(values)} values but the header has {len(header)} columns "
                            f"(line {reader.line_num})",
                        )
                    record = dict(zip(header, values))
                    yield number, json.dumps(record, ensure_ascii=False), record
            except csv.Error as e:
                raise DataError(spec, f"line {reader.line_num}", None, f"malformed CSV: {e}") from None

    return "row", rows()


# ---------------------------------------------------------------- datasets saved to disk


def _load_saved_dataset(spec: str, path: Path, split: str | None) -> datasets.Dataset:
    """A `Dataset` or `DatasetDict` directory written by `save_to_disk`, memory-mapped where it lies."""
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
    return loaded
