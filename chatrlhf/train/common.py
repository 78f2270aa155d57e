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

from chatrlhf.config import DataConfig, OptimConfig, save_config
from chatrlhf.data import RawRecord, blend, load_source, validate_all
from chatrlhf.demo.task import materialize
from chatrlhf.engine import distributed as dist
from chatrlhf.engine.checkpoint import (
    due,
    list_checkpoints,
    load_checkpoint,
    remove_partial,
    resolve_resume,
    save_checkpoint,
    truncate_metrics,
)
from chatrlhf.errors import UserError
from chatrlhf.metrics import MetricsLogger

T = TypeVar("T")


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
        _barrier()
        yield out
    except BaseException:
        if dist.is_main():
            clean_failed_run(out)
            if not existed and not any(out.glob("**/model/config.json")) and not any(out.glob("**/checkpoints/step-*")):
                shutil.rmtree(out, ignore_errors=True)
        raise


def run_stage(cfg, output_dir: str, need_data: bool, body: Callable[[Path, torch.device], dict]) -> dict:
    """Validate the config, join the process group (DeepSpeed), open the run directory, seed and set threads, then
    run `body(out, device)` — or, with `resume` and a finished run there, return its summary."""
    cfg.validate(need_data=need_data)
    cfg.validate_options()
    device = stage_device(cfg)
    out = Path(output_dir)
    if cfg.resume != "no" and (out / "summary.json").is_file() and (out / "model").is_dir():
        print(f"{out}: finished earlier; nothing to resume")
        return json.loads((out / "summary.json").read_text(encoding="utf-8"))
    with run_directory(output_dir, cfg, cfg.run.overwrite, cfg.resume) as out:
        seed_everything(cfg.run.seed)
        set_threads(cfg.run.threads)
        return body(out, device)


def stage_device(cfg) -> torch.device:
    """The device this process trains on; under DeepSpeed, the process group is joined first and each rank takes
    the GPU of its local rank."""
    from chatrlhf.models.load import pick_device

    device = pick_device(cfg.run.device)
    if cfg.engine.kind != "deepspeed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            raise UserError(
                f"launched as {world} processes (WORLD_SIZE={world}, set by torchrun/deepspeed) but engine.kind is "
                "single: every process would run the whole stage on its own and write the same run directory; pass "
                "--engine.kind deepspeed, or run without a launcher"
            )
        return device
    from chatrlhf.engine.deepspeed import deepspeed_config

    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise UserError("engine.kind=deepspeed needs DeepSpeed: pip install 'chatrlhf[deepspeed]'") from None
    deepspeed_config(cfg.engine, OptimConfig(), cfg.run.dtype)  # a bad --engine.deepspeed_config fails here, early
    dist.init(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank())
        torch.cuda.set_device(device)
    return device


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


MIN_FREE_BYTES = 64 * 2**20
"""Refuse to start with less free disk than this in the output directory (a tiny model's checkpoint is a few MiB;
a real one's size is checked again by each save, which fails with a clear error and leaves the last checkpoint)."""


def _barrier() -> None:
    if dist.is_distributed():
        torch.distributed.barrier()


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
    """Write strict JSON atomically; a non-finite number (e.g. the loss of a skipped step) is written as null."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def _finite(value):
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def clean_failed_run(out: Path) -> None:
    """Remove temp directories a crashed save left behind: of model directories and of checkpoints (a complete
    `model/` or `checkpoints/step-N/` is never touched)."""
    for p in [*out.glob("**/.*.tmp-*"), *out.glob("**/checkpoints/.*.tmp")]:
        shutil.rmtree(p, ignore_errors=True)


def resume_state(cfg, out: Path, engines: list) -> dict | None:
    """Restore `engines` and the RNGs from the checkpoint `cfg.resume` names (None: start fresh); metrics.jsonl is
    cut back to that step. Returns the driver's state saved with it (`step`, ...)."""
    path = resolve_resume(cfg.resume, out)
    if path is None:
        return None
    trainer = load_checkpoint(path, engines)
    truncate_metrics(out, trainer)
    print(f"resuming from {path} (step {trainer['step']})")
    return trainer


def open_loop(cfg, out: Path, stage: str, engines: list, total: int, keys: tuple[str, ...]):
    """Resume the engines if `cfg.resume` says so, and open the metrics logger there.
    Returns (the checkpoint's driver state or None, the step to continue after, the logger)."""
    resumed = resume_state(cfg, out, engines)
    start = resumed["step"] if resumed else 0
    log = MetricsLogger(
        out / "metrics.jsonl", stage, total, cfg.run.progress, keys, tensorboard=cfg.run.tensorboard, start=start
    )
    return resumed, start, log


def checkpoint_if_due(cfg, out: Path, step: int, total: int, engines: list, trainer: dict) -> None:
    if due(step, cfg.checkpoint.every, total):
        save_checkpoint(out, step, engines, trainer, cfg.checkpoint.keep)


def prepare_for_training(model, cfg):
    """Memory savers and adapters on a model about to be trained: gradient checkpointing, then LoRA."""
    from chatrlhf.models.load import ValueModel

    if cfg.engine.gradient_checkpointing:
        hf = model.model if isinstance(model, ValueModel) else model
        kwargs = {"use_reentrant": False}
        if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.23 renamed it
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if cfg.lora.rank > 0:
        from chatrlhf.models.lora import apply_lora

        model = apply_lora(model, cfg.lora)
    return model


def save_trained(engine, tok, out: Path, name: str = "model") -> None:
    """Write the engine's model as a Hugging Face directory `out/<name>` (LoRA: merged, plus `<name>_adapter/`);
    under ZeRO-3 every rank takes part in gathering the weights, the main rank writes."""
    from chatrlhf.models.load import ValueModel, save_model_dir

    if engine.module is not None and _is_lora(engine.module):
        if dist.is_main():
            from chatrlhf.models.lora import save_trained as save_lora

            save_lora(engine.module, tok, out, name)
    else:
        state = engine.full_state_dict()
        if dist.is_main():
            module = engine.module.model if isinstance(engine.module, ValueModel) else engine.module
            if isinstance(engine.module, ValueModel):
                state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
            save_model_dir(module, tok, out / name, state_dict=state)
    _barrier()


def _is_lora(model) -> bool:
    from chatrlhf.models.lora import is_lora

    return is_lora(model)
