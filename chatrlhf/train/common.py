"""What every stage driver needs: the run directory, seeding, records, and batches."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch

from chatrlhf.config import DataConfig, save_config
from chatrlhf.data import RawRecord, blend, load_source, validate_all
from chatrlhf.demo.task import materialize
from chatrlhf.errors import UserError

T = TypeVar("T")


@contextmanager
def run_directory(output_dir: str, cfg, overwrite: bool) -> Iterator[Path]:
    """The stage's run directory for the duration of the stage.

    If the stage fails, temp directories of interrupted saves are removed, and so is the run directory itself
    when this stage created it and it holds no finished model — a failed run leaves nothing half-written.
    """
    out = Path(output_dir)
    existed = out.exists()
    prepare_run_dir(out, cfg, overwrite)
    try:
        yield out
    except BaseException:
        clean_failed_run(out)
        if not existed and not any(out.glob("**/model/config.json")):
            shutil.rmtree(out, ignore_errors=True)
        raise


def run_stage(cfg, output_dir: str, need_data: bool, body: Callable[[Path, torch.device], dict]) -> dict:
    """Validate the config, open the run directory, seed and set threads, then run `body(out, device)`."""
    from chatrlhf.models.load import pick_device

    cfg.validate(need_data=need_data)
    with run_directory(output_dir, cfg, cfg.run.overwrite) as out:
        seed_everything(cfg.run.seed)
        set_threads(cfg.run.threads)
        return body(out, pick_device(cfg.run.device))


def prepare_run_dir(out: Path, cfg, overwrite: bool) -> Path:
    """Create the run directory, refuse one that holds another finished run, store the resolved config."""
    if (out / "model").exists() and not overwrite:
        raise UserError(
            f"output directory '{out}' already holds a finished run (model/); choose another directory or pass "
            "--run.overwrite"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output directory '{out}' is not writable: {e}") from None
    save_config(cfg, out / "config.yaml")
    (out / "metrics.jsonl").unlink(missing_ok=True)
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def load_raw(paths: Sequence[str], weights: Sequence[float] | None, seed: int, workdir: Path) -> list[RawRecord]:
    """Load every source (generating demo sources into `workdir/data`), then blend them."""
    parts = [load_source(materialize(p, workdir / "data")) for p in paths]
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
        raws = load_raw(data.paths, data.weights, seed, workdir)
    if eval_raws is None and data.eval_paths:
        eval_raws = load_raw(data.eval_paths, None, seed, workdir)
    train = convert(raws, to, data.skip_invalid, what)
    held = convert(eval_raws, to, data.skip_invalid, what) if eval_raws else []
    return train_eval_split(train, held, data.eval_fraction, seed)


def batches(items: Sequence[T], batch_size: int, seed: int, epoch: int) -> Iterator[list[T]]:
    """Shuffled batches for one epoch (seed + epoch decide the order); the last short batch is kept."""
    order = np.random.default_rng(seed + epoch).permutation(len(items))
    for i in range(0, len(items), batch_size):
        yield [items[j] for j in order[i : i + batch_size]]


def planned_steps(n_items: int, batch_size: int, grad_accum: int, epochs: int, max_steps: int) -> int:
    """Optimizer steps of a supervised stage: all epochs, or `max_steps` if that is fewer (0 = no cap)."""
    per_epoch = math.ceil(math.ceil(n_items / batch_size) / grad_accum)
    return per_epoch * epochs if max_steps == 0 else min(max_steps, per_epoch * epochs)


def step_groups(
    items: Sequence[T], batch_size: int, grad_accum: int, epochs: int, total: int, seed: int
) -> Iterator[tuple[int, list[list[T]]]]:
    """(step number from 1, the step's `grad_accum` micro-batches), epoch after epoch — each epoch a new seeded
    order — until `total` steps; an epoch's last step may have fewer micro-batches."""
    step = 0
    for epoch in range(epochs):
        micro = list(batches(items, batch_size, seed, epoch))
        for start in range(0, len(micro), grad_accum):
            step += 1
            yield step, micro[start : start + grad_accum]
            if step >= total:
                return


@dataclass
class Stopwatch:
    start: float = 0.0

    def __post_init__(self) -> None:
        self.start = time.time()

    def elapsed(self) -> float:
        return time.time() - self.start


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def clean_failed_run(out: Path) -> None:
    """Remove temp directories a crashed save left behind (a complete `model/` is never touched)."""
    for p in out.glob("**/.*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
