"""Metrics: one JSON line per logged step in `metrics.jsonl`, a progress bar showing the key ones, and — with
`run.report_to` — the same scalars (and the RL stage's held-out samples) sent to experiment trackers
(trackers.py).

Every key is documented in docs/metrics.md; keys are namespaced (`loss/policy`, `reward/score_mean`,
`time/generate_s`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from tqdm.auto import tqdm

from chatrlhf import distributed as dist
from chatrlhf.trackers import Tracker


class MetricsLogger:
    """Writes on the main rank only (other ranks' calls do nothing). `start`: the step a resumed run continues
    after (the progress bar starts there; metrics.jsonl was already cut back to it). `trackers` (main rank only)
    receive every line written to metrics.jsonl, without the non-finite values."""

    def __init__(
        self,
        path: Path,
        stage: str,
        total: int,
        show: bool,
        keys: tuple[str, ...],
        trackers: list[Tracker] | None = None,
        start: int = 0,
    ):
        self.path = path
        self.stage = stage
        self.keys = keys
        self.start = time.time()
        self.enabled = dist.is_main()
        self.trackers = list(trackers or []) if self.enabled else []
        self.file = open(path, "a", encoding="utf-8") if self.enabled else None
        self.bar = tqdm(total=total, initial=start, desc=stage, disable=not (show and self.enabled), dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float], write: bool = True) -> None:
        """Show the key metrics; append a line to metrics.jsonl when `write`."""
        shown = {k.split("/")[-1]: f"{metrics[k]:.4g}" for k in self.keys if k in metrics}
        self.bar.set_postfix(shown, refresh=False)
        if write and self.enabled:
            line = {"stage": self.stage, "step": step, "time/elapsed_s": round(time.time() - self.start, 3)}
            line.update({k: _plain(v) for k, v in metrics.items()})
            self.file.write(json.dumps(line) + "\n")
            self.file.flush()
            scalars = {k: v for k, v in line.items() if k not in ("stage", "step") and v is not None}
            for tracker in self.trackers:
                tracker.log(scalars, step)

    def log_samples(self, step: int, rows: list[dict]) -> None:
        """Send sample responses (dicts of `trackers.SAMPLE_COLUMNS`) to the trackers."""
        for tracker in self.trackers:
            tracker.log_samples(rows, step)

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def _plain(v: float) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None
