"""Resumable checkpoints: `<run dir>/checkpoints/step-NNNNNNNN/`, complete or absent.

A checkpoint holds everything the run's future depends on: each engine's weights, optimizer, LR schedule and step
counter (`engine.save_state`), the RNG states of python, numpy and torch on every rank, and the driver's own state
(step, data position, KL controller, EMA weights, metrics history) together with the length of metrics.jsonl at
that step, so a resumed run rewrites the lines after it exactly as the uninterrupted run would.

Writing is atomic: everything goes into a hidden temp directory, is fsynced, and is renamed to `step-N` last; a
crash mid-write leaves a `.step-N.tmp` that is never read and is removed on the next start. Only after a new
checkpoint is complete are the oldest beyond `keep` deleted, and a checkpoint is deleted (or replaced) by first
renaming it to a hidden `.….tmp` name, so a crash mid-delete never leaves a visible, incomplete `step-N`. A save
that runs out of disk removes its temp directory and stops the run with a UserError; the checkpoints already
complete are kept.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chatrlhf import distributed as dist
from chatrlhf.errors import UserError

PREFIX = "step-"


def checkpoint_root(out: Path) -> Path:
    return out / "checkpoints"


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp directories of interrupted saves start with a dot)."""
    root = checkpoint_root(out)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest_checkpoint(out: Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def remove_partial(out: Path) -> None:
    """Delete temp directories of checkpoints whose writing was interrupted."""
    root = checkpoint_root(out)
    if root.is_dir() and dist.is_main():
        for p in root.glob(".*.tmp"):
            shutil.rmtree(p, ignore_errors=True)


def resolve_resume(resume: str, out: Path) -> Path | None:
    """`no` → None; `auto` → the newest complete checkpoint in `out` (None if there is none); else that directory."""
    if resume == "no":
        return None
    if resume == "auto":
        return latest_checkpoint(out)
    path = Path(resume)
    if not (path.is_dir() and (path / "trainer.pt").is_file()):
        raise UserError(f"resume: '{resume}' is not a complete checkpoint directory (no trainer.pt)")
    return path


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, step: int, engines: list, trainer: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `step` (every rank calls this) and prune to the newest `keep`."""
    root = checkpoint_root(out)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".{PREFIX}{step:08d}.tmp"
    try:
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        for engine in engines:
            engine.save_state(tmp)
        torch.save(rng_state(), tmp / f"rng-rank{dist.rank()}.pt")
        if dist.is_main():
            metrics = out / "metrics.jsonl"
            trainer = {**trainer, "step": step, "metrics_bytes": metrics.stat().st_size if metrics.exists() else 0}
            torch.save(trainer, tmp / "trainer.pt")
        _barrier()
        if dist.is_main():
            _fsync_tree(tmp)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        latest = latest_checkpoint(out)
        kept = f"the last complete checkpoint, {latest}, is kept" if latest else "no earlier checkpoint exists"
        raise UserError(f"checkpoint at step {step}: disk full writing {tmp}: {e}; {kept}") from None
    if dist.is_main():
        if final.exists():  # the same step saved by an earlier attempt of this run (resumed from an older step)
            _discard(final)
        tmp.rename(final)
        _fsync_dir(root)
        for old in list_checkpoints(out)[:-keep]:
            _discard(old)
    _barrier()
    return final


def _discard(checkpoint: Path) -> None:
    """Delete a complete checkpoint: hide it first (one atomic rename), so that no visible `step-N` is ever
    half-deleted; if the deletion is interrupted, `remove_partial` finishes it on the next start."""
    hidden = checkpoint.with_name(f".{checkpoint.name}.old.tmp")
    shutil.rmtree(hidden, ignore_errors=True)
    checkpoint.rename(hidden)
    shutil.rmtree(hidden)


def load_checkpoint(path: Path, engines: list) -> dict[str, Any]:
    """Restore every engine and this rank's RNGs from `path`; return the driver's state (and truncate
    metrics.jsonl back to its length at that step)."""
    for engine in engines:
        engine.load_state(path)
    rng = path / f"rng-rank{dist.rank()}.pt"
    if not rng.is_file():
        raise UserError(f"checkpoint {path} was written by fewer ranks: no {rng.name} for rank {dist.rank()}")
    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))
    return trainer


def truncate_metrics(out: Path, trainer: dict[str, Any]) -> None:
    """Cut metrics.jsonl back to what had been written when the checkpoint was taken (main rank)."""
    metrics = out / "metrics.jsonl"
    if dist.is_main() and metrics.exists():
        with open(metrics, "r+b") as f:
            f.truncate(trainer["metrics_bytes"])


def due(step: int, every: int, total: int) -> bool:
    """Whether to checkpoint after `step`: every `every` steps and at the last."""
    return step == total or (every > 0 and step % every == 0)


def _barrier() -> None:
    if dist.is_distributed():
        torch.distributed.barrier()


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
