"""Metrics: one JSON line per logged step in `metrics.jsonl`, and a progress bar showing the key ones.

Every key is documented in docs/metrics.md; keys are namespaced (`loss/policy`, `reward/mean`, `time/generate_s`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from tqdm.auto import tqdm


class MetricsLogger:
    def __init__(self, path: Path, stage: str, total: int, show: bool, keys: tuple[str, ...]):
        self.path = path
        self.stage = stage
        self.keys = keys
        self.start = time.time()
        self.file = open(path, "a", encoding="utf-8")
        self.bar = tqdm(total=total, desc=stage, disable=not show, dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float], write: bool = True) -> None:
        """Show the key metrics; append a line to metrics.jsonl when `write`."""
        shown = {k.split("/")[-1]: f"{metrics[k]:.4g}" for k in self.keys if k in metrics}
        self.bar.set_postfix(shown, refresh=False)
        if write:
            line = {"stage": self.stage, "step": step, "time/elapsed_s": round(time.time() - self.start, 3)}
            line.update({k: _plain(v) for k, v in metrics.items()})
            self.file.write(json.dumps(line) + "\n")
            self.file.flush()

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
        self.file.close()


def _plain(v: float) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None
