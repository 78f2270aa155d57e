"""The training-engine interface every engine implements, and the pieces they share.

An engine owns one trainable model's optimizer, LR schedule and gradient clipping. The driver owns the loop: it
calls `backward(loss)` once per micro-batch and `step()` once per optimizer step; nothing happens behind its back.
Two implementations: `SingleEngine` (engine/single.py, plain PyTorch, one process) and `DeepSpeedEngine`
(engine/deepspeed.py, ZeRO 0–3 across ranks). `engine/factory.py:build_engine` picks one from `engine.kind`;
drivers only ever see this interface (docs/architecture.md, "Add a training engine").
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
from torch import nn

from chatrlhf.config import OptimConfig


class StepStats(NamedTuple):
    """What one optimizer step reports."""

    grad_norm: float
    """Global L2 norm of the gradient before clipping (NaN when the step was skipped on an fp16 overflow)."""
    lr: float
    """Learning rate used for this step."""
    skipped: bool = False
    """The step was skipped (a non-finite gradient under `run.max_bad_steps`, or an fp16 overflow); nothing was
    applied and the schedule did not advance."""


class TrainEngine(Protocol):
    """One trainable model behind an optimizer."""

    name: str
    """The model's role (`sft`, `actor`, `critic`, ...): names its checkpoint files and its error messages."""
    model: nn.Module
    """What training forwards call (the DeepSpeed engine under DeepSpeed: ZeRO hooks live there)."""
    module: nn.Module
    """The underlying Hugging Face model (or ValueModel); no-grad forwards may call it directly."""
    steps: int
    """Optimizer steps applied so far."""
    bad_steps: int
    """Steps skipped so far (`faults/skipped_steps`)."""

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of `loss`, this rank's share of the step's global loss."""

    def step(self) -> StepStats:
        """Clip, step optimizer and schedule, zero the gradients; refuse a non-finite gradient."""

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on the main rank (None on the others); every rank must call it."""

    def generation_weights(self) -> AbstractContextManager[nn.Module]:
        """A model with whole weights to generate with, for the duration of the block (the module itself, or under
        ZeRO-3 a gathered copy)."""

    @property
    def sharded_generation(self) -> bool:
        """Whether `generation_weights()` yields a sharded model, so `generate` must run with `synced_gpus`."""

    def save_state(self, directory: Path) -> None:
        """Weights, optimizer, schedule and counters into `directory` (every rank calls it)."""

    def load_state(self, directory: Path) -> None:
        """Restore what `save_state` wrote."""


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; biases and norm scales (1-D tensors) are not decayed (DeepSpeed-Chat does
    the same by name; the dimension rule needs no names). A ZeRO-3 partitioned parameter holds an empty 1-D
    placeholder; its own shape is in `ds_shape`."""
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if len(getattr(p, "ds_shape", p.shape)) >= 2]
    no_decay = [p for p in trained if len(getattr(p, "ds_shape", p.shape)) < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(groups: list[dict], optim: OptimConfig) -> torch.optim.AdamW:
    """The AdamW of `optim` over `groups` (`param_groups`), fused unless `optim.fused` is False."""
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=optim.fused)


def device_memory_metrics() -> dict[str, float]:
    """`memory/device_peak_gib`: the most memory torch's allocator held on this process's CUDA device since the last
    call, which then starts the next interval, so each iteration logs its own peak. Empty when the process has not
    used CUDA (a CPU run)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return {"memory/device_peak_gib": peak}


def non_finite_gradient(name: str, grad_norm: float, step: int) -> FloatingPointError:
    """The error a refused step raises (the CLI exits 3 on it)."""
    return FloatingPointError(
        f"{name}: metric optim/grad_norm is {grad_norm} (non-finite gradient) at optimizer step {step}; the step "
        "was not applied"
    )
