"""Running one stage: validate its config, start the engine (process group, device), open its run directory,
seed, and run the driver's body in it — leaving nothing half-written when it fails."""

from __future__ import annotations

import json
import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from chatrlhf import distributed as dist
from chatrlhf.config import save_config
from chatrlhf.engine import factory
from chatrlhf.engine.checkpoint import list_checkpoints, remove_partial
from chatrlhf.errors import UserError

MIN_FREE_BYTES = 64 * 2**20
"""Refuse to start with less free disk than this in the output directory (a tiny model's checkpoint is a few MiB;
a real one's size is checked again by each save, which fails with a clear error and leaves the last checkpoint)."""


def run_stage(cfg, output_dir: str, need_data: bool, body: Callable[[Path, torch.device], dict]) -> dict:
    """Validate the config, start the engine (DeepSpeed joins the process group), open the run directory, seed and
    set threads, then run `body(out, device)` — or, with `resume` and a finished run there, return its summary."""
    cfg.validate(need_data=need_data)
    cfg.validate_options()
    device = factory.start(cfg.engine, cfg.run)
    out = Path(output_dir)
    if cfg.resume != "no" and (out / "summary.json").is_file() and (out / "model").is_dir():
        print(f"{out}: finished earlier; nothing to resume")
        return json.loads((out / "summary.json").read_text(encoding="utf-8"))
    with run_directory(output_dir, cfg, cfg.run.overwrite, cfg.resume) as out:
        seed_everything(cfg.run.seed)
        set_threads(cfg.run.threads)
        return body(out, device)


@contextmanager
def run_directory(output_dir: str, cfg, overwrite: bool, resume: str = "no") -> Iterator[Path]:
    """The stage's run directory for the duration of the stage.

    If the stage fails, temp directories of interrupted saves are removed, and so is the run directory itself
    when this stage created it and it holds neither a finished model nor a checkpoint — a failed run leaves
    nothing half-written, and never loses a complete checkpoint.
    """
    out = Path(output_dir)
    existed = out.exists()
    try:
        if dist.is_main():
            prepare_run_dir(out, cfg, overwrite, resume)
        dist.barrier()
        yield out
    except BaseException:
        if dist.is_main():
            clean_failed_run(out)
            if not existed and not any(out.glob("**/model/config.json")) and not any(out.glob("**/checkpoints/step-*")):
                shutil.rmtree(out, ignore_errors=True)
        raise


def prepare_run_dir(out: Path, cfg, overwrite: bool, resume: str = "no") -> Path:
    """Create the run directory, refuse one that holds another run (a finished model, or checkpoints of an
    unfinished one unless resuming), check it is writable, store the resolved config."""
    has_checkpoints = bool(list_checkpoints(out))
    # a run killed between writing model/ and summary.json is still unfinished: resuming it is allowed
    if (out / "model").exists() and not overwrite and not (resume != "no" and has_checkpoints):
        raise UserError(
            f"output directory '{out}' already holds a finished run (model/); choose another directory or pass "
            "--run.overwrite"
        )
    if has_checkpoints and resume == "no" and not overwrite:
        raise UserError(
            f"output directory '{out}' holds checkpoints of an unfinished run; pass --resume auto to continue it, "
            "or --run.overwrite to start over"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output directory '{out}' is not writable: {e}") from None
    free = shutil.disk_usage(out).free
    if free < MIN_FREE_BYTES:
        raise UserError(
            f"output directory '{out}': only {free / 2**20:.0f} MiB free on its disk; need at least "
            f"{MIN_FREE_BYTES / 2**20:.0f} MiB for checkpoints and the model"
        )
    remove_partial(out)
    clean_failed_run(out)
    if resume == "no" or (resume == "auto" and not has_checkpoints):  # a fresh start
        if has_checkpoints:
            shutil.rmtree(out / "checkpoints")
        (out / "metrics.jsonl").unlink(missing_ok=True)
    save_config(cfg, out / "config.yaml")
    return out


def clean_failed_run(out: Path) -> None:
    """Remove temp directories a crashed save left behind: of model directories and of checkpoints (a complete
    `model/` or `checkpoints/step-N/` is never touched)."""
    for p in [*out.glob("**/.*.tmp-*"), *out.glob("**/checkpoints/.*.tmp")]:
        shutil.rmtree(p, ignore_errors=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)
