"""The one training loop of the supervised stages (SFT, reward model, DPO): each gives it its items and its loss.

One optimizer step:
  1. take the step's `grad_accum` micro-batches (each epoch a new seeded order; a global micro-batch is
     `batch_size × ranks` items, and each rank trains on its contiguous share);
  2. per micro-batch, the stage's loss — its items' summed loss divided by the step's global `size` total (target
     tokens, or pairs), so that micro-batches × accumulation × ranks give the gradient of one big batch — backward;
  3. the optimizer step; the logged metrics are summed over ranks (per-item sums become means over the step);
  4. a held-out evaluation every `eval_every` steps, the metrics line, a checkpoint on schedule.
After the last step: the final evaluation, the model directory, summary.json.

A resumed run skips the steps its checkpoint already holds, drawing the same batches as the uninterrupted run.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, Iterator, Sequence, TypeVar

import numpy as np
import torch
from torch import nn

from chatrlhf import distributed as dist
from chatrlhf.engine.factory import build_engine
from chatrlhf.eval.report import write_report
from chatrlhf.train.outputs import Stopwatch, save_trained, write_summary
from chatrlhf.train.resume import checkpoint_if_due, open_loop

T = TypeVar("T")


@dataclass
class SupervisedTask(Generic[T]):
    """What a supervised stage gives the loop."""

    name: str
    """The stage (`sft`, `reward`, `dpo`): the metrics' stage, the engine's name, the messages' prefix."""
    items: Sequence[T]
    """The encoded training items."""
    eval_items: Sequence[T]
    """The encoded held-out items (may be empty)."""
    unit: str
    """What an item is, for the summary's counts (`records`, `pairs`)."""
    size: Callable[[T], float]
    """An item's share of the step's loss normaliser: its target tokens (token mean), or 1 (mean over pairs)."""
    loss: Callable[[nn.Module, list[T], float], tuple[torch.Tensor, dict[str, float]]]
    """`loss(model, items, step_size)` → (the items' summed loss / `step_size`, sums over the items of every
    other logged quantity). `model` is the engine's training model."""
    evaluate: Callable[[nn.Module], dict[str, float]]
    """Held-out metrics (`eval/*`) of the model."""
    progress_keys: tuple[str, ...]
    """Metrics shown on the progress bar."""
    done: Callable[[dict], str]
    """The closing message from the summary."""
    finish: Callable[[nn.Module, Path], None] | None = None
    """Called on every rank after the final evaluation with the model and the run directory, to write what the
    stage leaves beside its summary (the reward model's held-out scores); the main rank writes."""


def train_supervised(cfg, out: Path, task: SupervisedTask, model: nn.Module, tok, clock: Stopwatch) -> dict:
    """Train `model` on `task` (steps 1–4 above) with `cfg.train`'s loop settings; save and summarise."""
    loop = cfg.train
    world = dist.world_size()
    global_batch = loop.batch_size * world
    total = planned_steps(len(task.items), global_batch, loop.grad_accum, loop.epochs, loop.max_steps)
    engine = build_engine(model, loop.optim, total, task.name, cfg.engine, cfg.run)
    resumed, start, log = open_loop(cfg, out, task.name, [engine], total, task.progress_keys)
    print(
        f"{task.name}: {len(task.items)} train / {len(task.eval_items)} eval {task.unit}, {total} steps on {world} "
        f"rank(s) → {out / 'model'}"
    )

    step, metrics = start, resumed["metrics"] if resumed else {}
    for step, group in step_groups(task.items, global_batch, loop.grad_accum, loop.epochs, total, cfg.run.seed):
        if step <= start:
            continue
        step_size = sum(task.size(item) for batch in group for item in batch)
        sums = {"loss/train": 0.0}
        for batch in group:
            mine, weight = dist.shard(batch)
            loss, part = task.loss(engine.model, mine, step_size)
            engine.backward(loss * weight)
            _add(sums, {"loss/train": loss.item() * weight, **{k: v * weight for k, v in part.items()}})
        stats = engine.step()
        sums = dist.sum_dict_across(sums)
        n_items = sum(len(batch) for batch in group)
        metrics = {"loss/train": sums.pop("loss/train"), **{k: v / n_items for k, v in sums.items()}}
        metrics.update({"optim/grad_norm": stats.grad_norm, "optim/lr": stats.lr})
        metrics["faults/skipped_steps"] = float(engine.bad_steps)
        evaluated = bool(task.eval_items) and loop.eval_every > 0 and step % loop.eval_every == 0
        if evaluated:
            metrics.update(task.evaluate(engine.model))
        log.log(step, metrics, write=step % cfg.run.log_every == 0 or step == total or evaluated)
        log.advance()
        checkpoint_if_due(cfg, out, step, total, [engine], {"metrics": metrics})

    summary = {"stage": task.name, "steps": step}
    summary[f"train_{task.unit}"] = len(task.items)
    summary[f"eval_{task.unit}"] = len(task.eval_items)
    summary["loss/train"] = metrics.get("loss/train")
    if task.eval_items:
        final = task.evaluate(engine.model)
        summary.update(final)
        log.log(step, final)
        if task.finish is not None:
            task.finish(engine.model, out)
    log.close()
    save_trained(engine, tok, out)
    summary["time/total_s"] = clock.elapsed()
    write_summary(out / "summary.json", summary)
    if dist.is_main():
        write_report(out)
    print(f"{task.name}: done in {summary['time/total_s']:.1f}s; {task.done(summary)}")
    return summary


def _add(total: dict[str, float], part: dict[str, float]) -> None:
    for k, v in part.items():
        total[k] = total.get(k, 0.0) + v


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
    order — until `total` steps; an epoch's last step may have fewer micro-batches. Only the current step's items
    are read (`items` may be a lazily read dataset)."""
    step = 0
    for epoch in range(epochs):
        micro = batches(items, batch_size, seed, epoch)
        while group := list(itertools.islice(micro, grad_accum)):
            step += 1
            yield step, group
            if step >= total:
                return
