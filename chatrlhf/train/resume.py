"""The resume and checkpoint glue every driver shares: restore the engines from the checkpoint `resume` names,
cut metrics.jsonl back to it, open the metrics logger there, and checkpoint on schedule."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from chatrlhf import distributed as dist
from chatrlhf.engine.base import TrainEngine
from chatrlhf.engine.checkpoint import due, load_checkpoint, resolve_resume, save_checkpoint, truncate_metrics
from chatrlhf.metrics import MetricsLogger
from chatrlhf.trackers import open_trackers


def resume_state(cfg, out: Path, engines: list[TrainEngine]) -> dict | None:
    """Restore `engines` and the RNGs from the checkpoint `cfg.resume` names (None: start fresh); metrics.jsonl is
    cut back to that step. Returns the driver's state saved with it (`step`, ...)."""
    path = resolve_resume(cfg.resume, out)
    if path is None:
        return None
    trainer = load_checkpoint(path, engines)
    truncate_metrics(out, trainer)
    print(f"resuming from {path} (step {trainer['step']})")
    return trainer


def open_loop(cfg, out: Path, stage: str, engines: list[TrainEngine], total: int, keys: tuple[str, ...]):
    """Resume the engines if `cfg.resume` says so, and open the metrics logger there (with the trackers of
    `run.report_to`, continuing a resumed stage's tracker runs).
    Returns (the checkpoint's driver state or None, the step to continue after, the logger)."""
    resumed = resume_state(cfg, out, engines)
    start = resumed["step"] if resumed else 0
    trackers = []
    if cfg.run.report_to and dist.is_main():
        name = cfg.run.name or out.name
        config = dataclasses.asdict(cfg)
        trackers = open_trackers(cfg.run.report_to, out, name, stage, cfg.run.project, config, resumed is not None)
    log = MetricsLogger(out / "metrics.jsonl", stage, total, cfg.run.progress, keys, trackers=trackers, start=start)
    return resumed, start, log


def checkpoint_if_due(cfg, out: Path, step: int, total: int, engines: list[TrainEngine], trainer: dict) -> None:
    if due(step, cfg.checkpoint.every, total):
        save_checkpoint(out, step, engines, trainer, cfg.checkpoint.keep)
