"""A stage's records: read every source into Arrow (generating the bundled demo sources first), blend, validate
every record before anything trains, and hold out the evaluation share. Blending and holding out move index
arrays; validating is a cached `datasets.map` (data/prepare.py), so no list of every record is ever built."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from chatrlhf.config import DataConfig
from chatrlhf.data import resolve_generated
from chatrlhf.data.blend import blend_indices
from chatrlhf.data.cache import Prep
from chatrlhf.data.prepare import Records, Rows, validate_rows
from chatrlhf.data.sources import read_source
from chatrlhf.errors import UserError


def prep_of(data) -> Prep:
    """How a stage's `data` config (a `DataConfig` or `PipelineDataConfig`) prepares data."""
    return Prep(num_proc=data.num_proc, cache_dir=data.cache_dir)


def load_raw(
    paths: Sequence[str],
    weights: Sequence[float] | None,
    seed: int,
    workdir: Path,
    format: str = "auto",
    prep: Prep | None = None,
) -> Rows:
    """Read every source in `format` (`auto`: detected from its columns; generated sources are written into
    `workdir/data` first), then blend them: a seeded shuffle, weighted if `weights` are given (the counts are
    printed)."""
    prep = prep or Prep()
    sources = [read_source(resolve_generated(p, workdir / "data"), format, prep) for p in paths]
    part, unit, counts = blend_indices([len(s) for s in sources], list(weights) if weights is not None else None, seed)
    if weights is not None:
        for p, source, n in zip(paths, sources, counts):
            print(f"blend: {p}: {len(source)} records → {n}")
    return Rows(tuple(sources), part, unit, prep)


def read_all(paths: Sequence[str], workdir: Path, prep: Prep) -> Rows:
    """Every record of the sources, in their order, without a shuffle."""
    return Rows.every([read_source(resolve_generated(p, workdir / "data"), prep=prep) for p in paths], prep)


def convert(rows: Rows, to: Callable, skip_invalid: bool, what: str) -> Records:
    """Validate every record; with skip_invalid the count skipped is printed (never dropped silently)."""
    records, skipped = validate_rows(rows, to, skip_invalid=skip_invalid)
    if skipped.count:
        print(f"warning: skipped {skipped.count} invalid {what} records; first: {skipped.first}")
    if not records:
        raise UserError(f"no valid {what} records")
    return records


def train_eval_split(records, eval_records, eval_fraction: float, seed: int):
    """Given held-out records, use them; otherwise hold out `eval_fraction` of the records (seeded): the train
    records keep their order, the held-out ones are in the order they had. `records` is a `Rows` or a `Records`."""
    if len(eval_records) or eval_fraction == 0:
        return records, eval_records
    order = np.random.default_rng(seed).permutation(len(records))
    n_eval = max(1, round(len(records) * eval_fraction))
    if n_eval >= len(records):
        raise UserError(f"only {len(records)} records: too few to hold out {eval_fraction:.0%} for evaluation")
    held = np.zeros(len(records), dtype=bool)
    held[order[:n_eval]] = True
    return records.take(np.flatnonzero(~held)), records.take(np.flatnonzero(held))


def stage_records(data: DataConfig, to: Callable, seed: int, workdir: Path, what: str, raws=None, eval_raws=None):
    """Train and eval records of one stage, from `data` (or from records the pipeline already split)."""
    prep = prep_of(data)
    if raws is None:
        raws = load_raw(data.paths, data.weights, seed, workdir, data.format, prep)
    if eval_raws is None and data.eval_paths:
        eval_raws = load_raw(data.eval_paths, None, seed, workdir, data.format, prep)
    train = convert(raws, to, data.skip_invalid, what)
    held = convert(eval_raws, to, data.skip_invalid, what) if eval_raws else []
    return train_eval_split(train, held, data.eval_fraction, seed)
