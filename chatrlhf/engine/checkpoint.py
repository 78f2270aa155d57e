"""Resumable checkpoints: `<run dir>/checkpoints/step-NNNNNNNN/`, complete or absent.

A checkpoint holds everything the run's future depends on: each engine's weights, optimizer, LR schedule and step
counter (`engine.save_state`), the RNG states of python, numpy and torch on every rank, and the driver's own state
(step, data position, KL controller, EMA weights, metrics history) together with the length of metrics.jsonl at
that step, so a resumed run rewrites the lines after it exactly as the uninterrupted run would.

Writing is atomic: everything goes into a hidden temp directory, is fsynced, and is renamed to `step-N` last; a
crash mid-write leaves a `.step-N.tmp` that is never read and is removed on the next start. Only after a new
checkpoint is complete are the oldest beyond `keep` deleted.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chatrlhf.engine import distributed as dist
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
        if final.exists():  # the same step saved by an earlier attempt of this run
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_dir(root)
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old)
    _barrier()
    return final


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
