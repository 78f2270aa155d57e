"""A stage's data as Arrow tables and index arrays: the records chosen from read sources (`Rows`), validated
(`Records`) and encoded into the items a training loop iterates over (`Items`).

Validating and encoding are `datasets.map` steps over a source's records, in batches, in `Prep.num_proc`
processes, each cached under a key of everything it depends on (`cache.py`). Their outputs are binary columns of
pickled Python objects (a `PairRecord`, a tuple of token-id lists) next to the error of each record that failed.
Blending, the stages' split and the held-out share only ever move index arrays: (which source, which record of it)
for every chosen record, in order. So nothing holds every record in memory; `Items` reads an item from the
memory-mapped cache file when the loop asks for it.

Errors stay those of the list-based functions (`records.validate_all`, `collate.encode_all`): the first invalid
record by file and position, with the number of the others; and with `skip_invalid`, the count that was skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from chatrlhf.data.cache import Prep, cached_map, code_digest, digest, function_name, pack, setting_key, unpack
from chatrlhf.data.raw import RawRecord
from chatrlhf.data.sources import Source
from chatrlhf.errors import DataError

R = TypeVar("R")
E = TypeVar("E")


def _position(where: str | None) -> int:
    """The number in a position ("line 12" → 12), as `errors.first_in_file` orders errors within a file."""
    number = (where or "").rpartition(" ")[2]
    return int(number) if number.isdigit() else 0


def _outputs(name: str):
    """The columns of a map step: `name` (the packed result), `error` (the packed error), `error_at` (its
    position's number)."""
    import datasets

    return datasets.Features(
        {name: datasets.Value("binary"), "error": datasets.Value("binary"), "error_at": datasets.Value("int64")}
    )


def _run(function: Callable[[Any], Any], inputs: list, name: str) -> dict[str, list]:
    """`function` on each input; a `DataError` is kept, packed, in place of the result."""
    out: dict[str, list] = {name: [], "error": [], "error_at": []}
    for value in inputs:
        try:
            out[name].append(pack(function(value)))
            out["error"].append(None)
            out["error_at"].append(0)
        except DataError as e:
            out[name].append(None)
            out["error"].append(pack((e.source, e.where, e.field, e.problem)))
            out["error_at"].append(_position(e.where))
    return out


class _Column:
    """Fast reads of one binary column of a memory-mapped table, by row: the bytes of row i, without copying the
    column (each Arrow chunk's offsets and data buffers are viewed as numpy arrays)."""

    def __init__(self, column: pa.ChunkedArray):
        self.chunks = []
        starts = [0]
        for chunk in column.chunks:
            _, offsets, data = chunk.buffers()
            offsets = np.frombuffer(offsets, dtype=np.int32)[chunk.offset : chunk.offset + len(chunk) + 1]
            self.chunks.append((offsets, memoryview(data) if data is not None else memoryview(b"")))
            starts.append(starts[-1] + len(chunk))
        self.starts = np.asarray(starts)

    def __getitem__(self, row: int) -> memoryview:
        c = int(np.searchsorted(self.starts, row, side="right")) - 1
        offsets, data = self.chunks[c]
        j = row - self.starts[c]
        return data[offsets[j] : offsets[j + 1]]


@dataclass(frozen=True, eq=False)
class _Table:
    """The output of one map step over a part's records: `dataset` (columns NAME, `error`, `error_at`), row k for
    the part's record `units[k]`, and the key it is cached under."""

    dataset: Any
    units: np.ndarray
    key: str
    name: str

    def rows_of(self, units: np.ndarray) -> np.ndarray:
        """The table rows of the part's records `units` (each one of `self.units`)."""
        return np.searchsorted(self.units, units)

    def valid(self) -> np.ndarray:
        """(K,) bool — whether each row succeeded."""
        return pc.is_valid(self.dataset.data.column(self.name)).to_numpy(zero_copy_only=False)

    def first_error(self, rows: np.ndarray) -> tuple[int, DataError]:
        """The earliest error by position among the failed `rows`: (its position's number, the error)."""
        at = self.dataset.data.column("error_at").to_numpy()[rows]
        row = int(rows[int(np.argmin(at))])
        source, where, field, problem = unpack(self.dataset.data.column("error")[row].as_py())
        return int(at.min()), DataError(source, where, field, problem)


def _failures(tables: Sequence[_Table | None], part: np.ndarray, row: np.ndarray, ok: np.ndarray):
    """(how many of the chosen records failed, the first failure by file and position, as
    `errors.first_in_file` orders them) — counting a record chosen twice (an up-sampled blend) twice, as the
    list-based functions do. Every error of one part names the same source."""
    count = int((~ok).sum())
    if not count:
        return 0, None
    candidates = []
    for p in np.unique(part[~ok]).tolist():
        at, error = tables[p].first_error(np.unique(row[(part == p) & ~ok]))
        candidates.append(((error.source, at), error))
    return count, min(candidates, key=lambda c: c[0])[1]


def _select(dataset, needed: np.ndarray):
    """The rows `needed` (sorted, unique) of `dataset`, or the whole of it when they are all of it."""
    if len(needed) == len(dataset):
        return dataset
    return dataset.select(needed)


def _map_parts(n_parts: int, part: np.ndarray, units: np.ndarray, step: Callable[[int, np.ndarray], _Table]):
    """`step(p, needed)` for each part p with chosen records, `needed` being their sorted unique `units` →
    (the tables, each chosen record's row in its part's table, whether it succeeded)."""
    tables: list[_Table | None] = []
    rows, ok = np.zeros(len(part), dtype=np.int64), np.ones(len(part), dtype=bool)
    for p in range(n_parts):
        mine = part == p
        needed = np.unique(units[mine])
        if not len(needed):
            tables.append(None)
            continue
        table = step(p, needed)
        tables.append(table)
        rows[mine] = table.rows_of(units[mine])
        ok[mine] = table.valid()[rows[mine]]
    return tables, rows, ok


# ---------------------------------------------------------------- rows: the records chosen from read sources


@dataclass(frozen=True, eq=False)
class Rows:
    """Records of read sources chosen by index, in order: record k is record `unit[k]` of `sources[part[k]]`. A
    record may be chosen more than once (an up-sampled blend)."""

    sources: tuple[Source, ...]
    part: np.ndarray
    """(N,) int — the source of each chosen record."""
    unit: np.ndarray
    """(N,) int — its index among that source's records."""
    prep: Prep

    @classmethod
    def every(cls, sources: Sequence[Source], prep: Prep) -> Rows:
        """Every record of each source, source after source, in their order."""
        sizes = [len(s) for s in sources]
        part = np.repeat(np.arange(len(sources), dtype=np.int64), sizes)
        unit = np.concatenate([np.arange(n, dtype=np.int64) for n in sizes]) if sizes else np.zeros(0, np.int64)
        return cls(tuple(sources), part, unit, prep)

    def __len__(self) -> int:
        return len(self.part)

    def take(self, positions: np.ndarray | Sequence[int]) -> Rows:
        """The chosen records at `positions`, in that order."""
        positions = np.asarray(positions, dtype=np.int64)
        return Rows(self.sources, self.part[positions], self.unit[positions], self.prep)

    def __add__(self, other: Rows | list) -> Rows:
        """These records, then `other`'s (an empty list adds nothing)."""
        if isinstance(other, list) and not other:
            return self
        unit = np.concatenate([self.unit, other.unit])
        if other.sources is self.sources:
            return Rows(self.sources, np.concatenate([self.part, other.part]), unit, self.prep)
        part = np.concatenate([self.part, other.part + len(self.sources)])
        return Rows(self.sources + other.sources, part, unit, self.prep)

    def __radd__(self, other: list) -> Rows:
        if isinstance(other, list) and not other:
            return self
        return NotImplemented


class _Validate:
    """The map function that converts a batch of a source's records (`convert`: `to_sft`, `to_pair`,
    `to_prompt`); `units` maps the batch's indices to the source's record indices."""

    def __init__(self, source: Source, convert: Callable[[RawRecord], Any], units: np.ndarray):
        self.source, self.convert, self.units = source, convert, units

    def __call__(self, batch: pa.Table, indices: list[int]) -> dict[str, list]:
        return _run(self.convert, self.source.records(batch, self.units[indices]), "record")


def _validated(source: Source, convert: Callable[[RawRecord], Any], units: np.ndarray, prep: Prep) -> _Table:
    """`convert` of the source's records `units` (sorted, unique), cached."""
    key = digest(
        "validate",
        source.fingerprint,
        source.spec,
        source.format,
        function_name(convert),
        code_digest(convert),
        units.tobytes(),
    )
    dataset = cached_map(
        _select(source.units, units),
        _Validate(source, convert, units),
        key,
        prep,
        f"validate {source.spec}",
        _outputs("record"),
    )
    return _Table(dataset, units, key, "record")


@dataclass(frozen=True)
class Skipped:
    """What validation left out with `skip_invalid`: the count (a record chosen twice counts twice) and the first
    invalid record by file and position."""

    count: int
    first: DataError | None


def validate_rows(
    rows: Rows, convert: Callable[[RawRecord], R], skip_invalid: bool = False
) -> tuple[Records[R], Skipped]:
    """Convert every chosen record with `convert` (`to_sft`, `to_pair` or `to_prompt`), as `records.validate_all`
    does for a list: by default raise the error of the first invalid record (by file and position), saying how
    many other chosen records are invalid too; with `skip_invalid`, return the valid ones and what was skipped."""

    def step(p: int, needed: np.ndarray) -> _Table:
        return _validated(rows.sources[p], convert, needed, rows.prep)

    tables, table_rows, ok = _map_parts(len(rows.sources), rows.part, rows.unit, step)
    count, first = _failures(tables, rows.part, table_rows, ok)
    if count and not skip_invalid:
        if count == 1:
            raise first
        more = count - 1
        raise DataError(
            first.source,
            first.where,
            first.field,
            f"{first.problem} (and {more} more invalid record{'s' if more > 1 else ''} in this dataset)",
        )
    return Records(tuple(tables), rows.part[ok], table_rows[ok], rows.prep), Skipped(count, first)


# ---------------------------------------------------------------- records: validated, by index


class _Reader(Generic[E]):
    """A sequence of packed objects in the tables of several parts, chosen by (part, row)."""

    tables: tuple
    part: np.ndarray
    row: np.ndarray

    def _columns(self) -> list[_Column | None]:
        if getattr(self, "_cache", None) is None:
            columns = [_Column(t.dataset.data.column(t.name)) if t is not None else None for t in self.tables]
            object.__setattr__(self, "_cache", columns)
        return self._cache

    def __len__(self) -> int:
        return len(self.part)

    def _get(self, i: int) -> E:
        return unpack(self._columns()[self.part[i]][int(self.row[i])])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._get(j) for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._get(i)

    def __iter__(self) -> Iterator[E]:
        for i in range(len(self)):
            yield self._get(i)

    def __bool__(self) -> bool:
        return len(self) > 0


@dataclass(frozen=True, eq=False)
class Records(_Reader[R], Sequence):
    """A stage's validated records (`SFTRecord`, `PairRecord` or `PromptRecord`), read from the cache on access;
    record k is row `row[k]` of `tables[part[k]]`. Slicing gives a list; `take` another `Records`."""

    tables: tuple
    part: np.ndarray
    row: np.ndarray
    prep: Prep

    def take(self, positions: np.ndarray | Sequence[int]) -> Records[R]:
        """The records at `positions`, in that order."""
        positions = np.asarray(positions, dtype=np.int64)
        return Records(self.tables, self.part[positions], self.row[positions], self.prep)

    def head(self, n: int) -> Records[R]:
        """The first `n` records."""
        return self.take(np.arange(min(n, len(self))))


class _Encode:
    """The map function that encodes a batch of validated records: `encode(*args, record, **settings)`."""

    def __init__(self, encode: Callable[..., Any], args: tuple, settings: dict):
        self.encode, self.args, self.settings = encode, args, settings

    def __call__(self, batch: pa.Table, indices: list[int]) -> dict[str, list]:
        records = [unpack(data) for data in batch.column("record").to_pylist()]
        return _run(lambda rec: self.encode(*self.args, rec, **self.settings), records, "item")


def encode_records(records: Records, encode: Callable[..., E], args: tuple, settings: dict) -> Items[E]:
    """`encode(*args, record, **settings)` of every record (e.g. `encode_pair(tok, rec, max_len=512)`), cached
    under the records, the function and its module's code, the tokenizer and the settings. If any fail, raise the
    error of the first failing record (by file and position) with the number of the others, as
    `collate.encode_all` does."""
    keys = [setting_key(a) for a in args] + [f"{k}={setting_key(v)}" for k, v in sorted(settings.items())]
    name = function_name(encode)

    def step(p: int, needed: np.ndarray) -> _Table:
        validated = records.tables[p]
        key = digest("encode", validated.key, needed.tobytes(), name, code_digest(encode), *keys)
        dataset = cached_map(
            _select(validated.dataset, needed),
            _Encode(encode, args, settings),
            key,
            records.prep,
            f"encode ({name})",
            _outputs("item"),
        )
        return _Table(dataset, needed, key, "item")

    tables, table_rows, ok = _map_parts(len(records.tables), records.part, records.row, step)
    count, first = _failures(tables, records.part, table_rows, ok)
    if count == 1:
        raise first
    if count:
        problem = f"{first.problem} (and {count - 1} more of the {len(records)} records)"
        raise DataError(first.source, first.where, first.field, problem)
    return Items(tuple(tables), records.part, table_rows)


@dataclass(frozen=True, eq=False)
class Items(_Reader[E], Sequence):
    """The encoded items of a stage (what `encode` returned for each record), read from the cache on access, in
    the records' order. Indexing with an int (numpy ints too) gives an item, with a slice a list."""

    tables: tuple
    part: np.ndarray
    row: np.ndarray
