"""Metrics: one JSON line per logged step in `metrics.jsonl`, a progress bar showing the key ones, and — with
`run.tensorboard` — the same scalars as TensorBoard events in `<run dir>/tensorboard/`.

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
from chatrlhf.errors import UserError


class MetricsLogger:
    """Writes on the main rank only (other ranks' calls do nothing). `start`: the step a resumed run continues
    after (the progress bar starts there; metrics.jsonl was already cut back to it)."""

    def __init__(
        self,
        path: Path,
        stage: str,
        total: int,
        show: bool,
        keys: tuple[str, ...],
        tensorboard: bool = False,
        start: int = 0,
    ):
        self.path = path
        self.stage = stage
        self.keys = keys
        self.start = time.time()
        self.enabled = dist.is_main()
        self.writer = _tensorboard_writer(path.parent / "tensorboard") if tensorboard and self.enabled else None
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
            if self.writer is not None:
                for k, v in metrics.items():
                    self.writer.add_scalar(k, float(v), step)
                self.writer.flush()

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def _tensorboard_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(
            "run.tensorboard is true but the tensorboard package is not installed: pip install 'chatrlhf[tensorboard]'"
        ) from None
    return SummaryWriter(log_dir=str(log_dir))


def _plain(v: float) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None
