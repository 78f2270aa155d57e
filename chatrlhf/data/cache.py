"""The cache of prepared data: where it lives, the keys of its entries, and how Python objects are stored in it.

Preparing a stage's data writes Arrow files here, one entry per step: a source as read (`sources.py`), its records
validated for a stage, and their tokenized items (`prepare.py`). An entry's key hashes everything its content
depends on — the bytes of the source file (or the fingerprint `datasets` gives a saved or downloaded dataset), the
source as written (records name it in their errors), the format, the function that converts or encodes and the
source code of this package, the tokenizer (vocabulary, rules, special tokens, chat template) and the settings
(maximum lengths, ...). A second run with the same inputs is therefore served from the cache, and any change makes
a new entry instead of reading a stale one. Entries are written to a temporary name and renamed into place, so an
interrupted run leaves no half-written entry and two processes preparing the same data do not clash.

Validated records and encoded items are Python objects (dataclasses, token-id lists) pickled into binary Arrow
columns: the cache is as trusted as the Python environment that wrote it.
"""

from __future__ import annotations

import errno
import functools
import inspect
import json
import os
import pickle
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import xxhash

from chatrlhf.errors import UserError

CACHE_SUBDIR = "chatrlhf"
"""The folder of chatrlhf's entries inside the `datasets` cache."""

BATCH = 1000
"""Records per batch of a `datasets.map` step, and per record batch of the Arrow files it writes."""

PROGRESS_FROM = 10_000
"""Show `datasets`' progress bars for steps over at least this many records (smaller ones finish at once)."""


@dataclass(frozen=True)
class Prep:
    """How data is prepared: processes and the cache (a stage's `data.num_proc` and `data.cache_dir`)."""

    num_proc: int = 1
    """Processes for validating and tokenizing (`datasets.map`'s `num_proc`); 1 = in this process."""
    cache_dir: str | None = None
    """The cache's folder; None = `chatrlhf/` in the `datasets` cache (`HF_DATASETS_CACHE`)."""

    def root(self) -> Path:
        """The cache's folder, read when it is used (so that `HF_DATASETS_CACHE` set at run time counts)."""
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        import datasets

        return Path(datasets.config.HF_DATASETS_CACHE) / CACHE_SUBDIR

    def folder(self, name: str) -> Path:
        """The cache's subfolder `name`, created if need be."""
        path = self.root() / name
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise self.unwritable(e) from None
        return path

    def unwritable(self, e: OSError) -> UserError:
        """The error for a cache that cannot be written (a file in the way, no permission, a full disk)."""
        where = f"data.cache_dir={self.cache_dir}" if self.cache_dir else f"the data cache {self.root()}"
        fix = "choose a writable folder with data.cache_dir" if not self.cache_dir else "choose a writable folder"
        return UserError(f"{where}: cannot write prepared data there ({e.strerror or e}); {fix}")


WRITE_ERRNOS = {errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EPERM}
"""The errors of a write that say the cache cannot be written (rather than a bug): full, not permitted, read-only."""


def digest(*parts: str | bytes) -> str:
    """A 128-bit hex key of `parts`; each part is length-prefixed, so ("ab", "c") and ("a", "bc") differ."""
    h = xxhash.xxh3_128()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def _file_digest(path: str) -> str:
    return xxhash.xxh3_128(Path(path).read_bytes()).hexdigest()


def code_digest(*functions: Any) -> str:
    """The key of the code that prepares data: every module of this package, and the modules of `functions` (a
    driver's encoding function, say). An edit to any of them makes new cache entries."""
    package = Path(__file__).parent
    files = sorted(str(p) for p in package.glob("*.py"))
    files += sorted({inspect.getsourcefile(f) for f in functions} - set(files))
    return digest(*(f"{Path(f).name}:{_file_digest(f)}" for f in files))


def function_name(f: Any) -> str:
    return f"{f.__module__}.{f.__qualname__}"


def tokenizer_digest(tok: Any) -> str:
    """The key of what a tokenizer does to text: its class, its backend (vocabulary, merges, normalizer,
    pre-tokenizer, post-processor, added tokens), its special tokens and its chat template."""
    backend = getattr(tok, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    specials = {name: getattr(tok, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    template = tok.chat_template if isinstance(tok.chat_template, (str, type(None))) else json.dumps(tok.chat_template)
    return digest(
        type(tok).__name__,
        rules,
        json.dumps(tok.special_tokens_map, sort_keys=True, default=str),
        json.dumps(specials, sort_keys=True),
        template or "",
    )


def setting_key(value: Any) -> str:
    """The key of one argument of a conversion or encoding: a tokenizer's digest, or a plain value's repr."""
    if hasattr(value, "apply_chat_template"):
        return "tokenizer:" + tokenizer_digest(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    raise TypeError(f"cannot key a cache entry on a {type(value).__name__}; pass a tokenizer or plain values")


def pack(value: Any) -> bytes:
    return pickle.dumps(value, protocol=5)


def unpack(data: bytes | memoryview) -> Any:
    return pickle.loads(data)


@contextmanager
def written(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed to `path` when the block succeeds, removed if not."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def progress(n: int) -> Iterator[None]:
    """`datasets`' progress bars on for a step over `n` records only if `n >= PROGRESS_FROM`."""
    import datasets

    if n < PROGRESS_FROM and not datasets.are_progress_bars_disabled():
        datasets.disable_progress_bars()
        try:
            yield
        finally:
            datasets.enable_progress_bars()
    else:
        yield


def cached_map(dataset, function, key: str, prep: Prep, desc: str, features):
    """`dataset.map(function)` in batches of Arrow tables with indices, its output cached under `key`: the files
    `maps/KEY.arrow` (or one per process) in the cache. A second call with the same key reads them back. With
    `prep.num_proc` > 1 the records are shared out among that many processes, at most one per batch."""
    path = prep.folder("maps") / f"{key}.arrow"
    num_proc = min(prep.num_proc, -(-len(dataset) // BATCH))
    try:
        with progress(len(dataset)):
            return dataset.with_format("arrow").map(
                function,
                with_indices=True,
                batched=True,
                batch_size=BATCH,
                writer_batch_size=BATCH,
                num_proc=num_proc if num_proc > 1 else None,
                remove_columns=dataset.column_names,
                features=features,
                cache_file_name=str(path),
                new_fingerprint=key,
                load_from_cache_file=True,
                desc=desc,
            )
    except OSError as e:
        if e.errno in WRITE_ERRNOS:
            raise prep.unwritable(e) from None
        raise
