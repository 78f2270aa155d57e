"""A stage's records: load every source (generating the bundled demo sources first), blend, validate every
record before anything trains, and hold out the evaluation share."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np

from chatrlhf.config import DataConfig
from chatrlhf.data import RawRecord, blend, load_source, resolve_generated, validate_all
from chatrlhf.errors import UserError

T = TypeVar("T")


def load_raw(
    paths: Sequence[str], weights: Sequence[float] | None, seed: int, workdir: Path, format: str = "auto"
) -> list[RawRecord]:
    """Load every source in `format` (`auto`: detected from its columns; generated sources are written into
    `workdir/data` first), then blend them."""
    parts = [load_source(resolve_generated(p, workdir / "data"), format=format) for p in paths]
    blended, counts = blend(parts, list(weights) if weights is not None else None, seed)
    if weights is not None:
        for p, part, n in zip(paths, parts, counts):
            print(f"blend: {p}: {len(part)} records → {n}")
    return blended


def convert(raws: Sequence[RawRecord], to: Callable[[RawRecord], T], skip_invalid: bool, what: str) -> list[T]:
    """Validate every record; with skip_invalid the count skipped is printed (never dropped silently)."""
    records, errors = validate_all(list(raws), to, skip_invalid=skip_invalid)
    if errors:
        print(f"warning: skipped {len(errors)} invalid {what} records; first: {errors[0]}")
    if not records:
        raise UserError(f"no valid {what} records")
    return records


def train_eval_split(
    records: list[T], eval_records: list[T], eval_fraction: float, seed: int
) -> tuple[list[T], list[T]]:
    """Given held-out records, use them; otherwise hold out `eval_fraction` of the records (seeded)."""
    if eval_records or eval_fraction == 0:
        return records, eval_records
    order = np.random.default_rng(seed).permutation(len(records))
    n_eval = max(1, round(len(records) * eval_fraction))
    if n_eval >= len(records):
        raise UserError(f"only {len(records)} records: too few to hold out {eval_fraction:.0%} for evaluation")
    held = set(order[:n_eval].tolist())
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def stage_records(data: DataConfig, to: Callable, seed: int, workdir: Path, what: str, raws=None, eval_raws=None):
    """Train and eval records of one stage, from `data` (or from records the pipeline already split)."""
    if raws is None:
        raws = load_raw(data.paths, data.weights, seed, workdir, data.format)
    if eval_raws is None and data.eval_paths:
        eval_raws = load_raw(data.eval_paths, None, seed, workdir, data.format)
    train = convert(raws, to, data.skip_invalid, what)
    held = convert(eval_raws, to, data.skip_invalid, what) if eval_raws else []
    return train_eval_split(train, held, data.eval_fraction, seed)
