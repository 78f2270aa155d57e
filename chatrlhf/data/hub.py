"""Datasets by name through `datasets.load_dataset`: the Hugging Face Hub (and its cache), or a local directory of
data files laid out as a Hub dataset repository.

A source written `hf:PATH[:SPLIT][?OPTION=VALUE&...]` is loaded with
`datasets.load_dataset(PATH, config, split=SPLIT, data_dir=..., data_files=[...], revision=...)`:

- PATH: a Hub dataset id (`Anthropic/hh-rlhf`) or a local directory (a clone of a Hub repository); it cannot
  contain ':' or '?'.
- SPLIT: default "train"; anything `load_dataset` takes, slices included (`train[:1000]`, `test[10%:]`).
- options: `config` (the configuration name, `load_dataset`'s `name`), `data_dir`, `data_files` (comma-separated;
  the files make up the "train" split), `revision` (a branch, tag or commit).

The `hf:` prefix always means this, so no local path is ever mistaken for a dataset id or the reverse (to read a
local file whose name starts with "hf:", write it as "./hf:..."). Downloads go to the Hugging Face cache
(`HF_HOME`, `HF_DATASETS_CACHE`); with `HF_HUB_OFFLINE=1` (or `HF_DATASETS_OFFLINE=1`) only the cache is used, and a
dataset that is not there is an error naming it. Errors name the source as written; a record's position is
"row N" (1-based, within the split as loaded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from chatrlhf.errors import DataError

if TYPE_CHECKING:
    import datasets

HUB_PREFIX = "hf:"
SYNTAX = "hf:DATASET_ID[:SPLIT][?config=NAME&data_dir=DIR&data_files=FILE,...&revision=REV]"
OPTIONS = ("config", "data_dir", "data_files", "revision")


@dataclass(frozen=True)
class HubSpec:
    """A parsed `hf:` source: the arguments of `datasets.load_dataset`."""

    path: str
    """Hub dataset id, or a local directory laid out as a Hub dataset repository."""
    split: str = "train"
    config: str | None = None
    """The dataset's configuration (`load_dataset`'s `name`)."""
    data_dir: str | None = None
    data_files: tuple[str, ...] | None = None
    revision: str | None = None

    def describe(self) -> str:
        """The dataset and the options given, for messages: "dataset 'ID' (data_dir=DIR, ...)"."""
        files = ",".join(self.data_files) if self.data_files is not None else None
        values = {"config": self.config, "data_dir": self.data_dir, "data_files": files, "revision": self.revision}
        given = ", ".join(f"{k}={v}" for k, v in values.items() if v is not None)
        return f"dataset '{self.path}'" + (f" ({given})" if given else "")


def is_hub_spec(spec: str) -> bool:
    return spec.startswith(HUB_PREFIX)


def parse_hub_spec(spec: str) -> HubSpec:
    """`hf:PATH[:SPLIT][?OPTION=VALUE&...]` → `HubSpec`; `DataError` for a malformed spec."""

    def bad(problem: str) -> DataError:
        return DataError(spec, None, None, f"{problem}; expected {SYNTAX}")

    body, has_query, query = spec[len(HUB_PREFIX) :].partition("?")
    path, has_split, split = body.partition(":")
    if not path:
        raise bad("no dataset id after 'hf:'")
    if has_split and not split:
        raise bad("empty split after ':'")
    options: dict[str, str] = {}
    if has_query:
        for item in query.split("&"):
            key, has_value, value = item.partition("=")
            if key not in OPTIONS:
                raise bad(f"unknown option '{key}' (known: {', '.join(OPTIONS)})")
            if not has_value or not value:
                raise bad(f"option '{key}' has no value")
            if key in options:
                raise bad(f"option '{key}' is given twice")
            options[key] = value
    files = None
    if "data_files" in options:
        files = tuple(f for f in options.pop("data_files").split(",") if f)
        if not files:
            raise bad("option 'data_files' names no file")
    return HubSpec(path, split or "train", data_files=files, **options)


def load_hub(spec: str) -> datasets.Dataset:
    """One split of a dataset loaded with `datasets.load_dataset`: memory-mapped from the cache, row N of the split
    being row N-1 of the dataset."""
    import datasets

    hub = parse_hub_spec(spec)
    try:
        loaded = datasets.load_dataset(
            hub.path,
            hub.config,
            split=hub.split,
            data_dir=hub.data_dir,
            data_files=list(hub.data_files) if hub.data_files else None,
            revision=hub.revision,
        )
    except (OSError, ValueError, RuntimeError, datasets.exceptions.DatasetsError) as e:
        raise DataError(spec, None, None, _explain(hub, e)) from None
    return loaded


def _explain(hub: HubSpec, e: Exception) -> str:
    """What went wrong loading `hub`, in the user's terms."""
    import datasets

    message = str(e).strip()
    what = hub.describe()
    if datasets.config.HF_HUB_OFFLINE and (isinstance(e, ConnectionError) or message.startswith("Couldn't find cache")):
        cached = message.partition("Available configs in the cache:")[2].strip()
        return (
            f"{what} is not in the Hugging Face datasets cache ({datasets.config.HF_DATASETS_CACHE}) and offline "
            "mode is on (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE): run once with network access to download it, or "
            "turn offline mode off" + (f"; the cache holds its configurations {cached}" if cached else "")
        )
    if isinstance(e, ConnectionError):
        return (
            f"cannot reach the Hugging Face Hub to download {what} ({message}); with HF_HUB_OFFLINE=1 a copy in "
            "the cache is used"
        )
    if isinstance(e, ValueError) and message.startswith("Unknown split"):
        return f"{what} has no split '{hub.split}': {message} (choose one with hf:ID:SPLIT)"
    return f"cannot load {what} with datasets.load_dataset: {type(e).__name__}: {message}"
