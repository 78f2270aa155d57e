"""The single-process training engine: one model, AdamW, an LR schedule and gradient clipping, plain PyTorch."""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from transformers import get_scheduler

from chatrlhf.config import OptimConfig


class StepStats(NamedTuple):
    grad_norm: float
    """Global L2 norm of the gradient before clipping."""
    lr: float
    """Learning rate used for this step."""
    skipped: bool = False
    """The gradient was not finite and the step was skipped (`run.max_bad_steps`); nothing was applied."""


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; biases and norm scales (1-D tensors) are not decayed (DeepSpeed-Chat does
    the same by name; the dimension rule needs no names)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class TrainEngine:
    """Owns a trainable model's optimizer and schedule. The driver calls `backward(loss)` per micro-batch and
    `step()` per optimizer step; nothing else happens behind its back. `model` is what training forwards call and
    `module` the Hugging Face model itself (the same object here; a DeepSpeed engine and its module there)."""

    def __init__(
        self, model: nn.Module, optim: OptimConfig, total_steps: int, name: str = "model", max_bad_steps: int = 0
    ):
        self.model = model
        self.module = model
        self.name = name
        self.max_bad_steps = max_bad_steps
        self.bad_steps = 0
        self.cfg = optim
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            param_groups(model, optim.weight_decay), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps
        )
        self.scheduler = get_scheduler(
            optim.schedule, self.optimizer, num_warmup_steps=optim.warmup_steps, num_training_steps=max(total_steps, 1)
        )
        self.steps = 0

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> StepStats:
        """Clip, refuse a non-finite gradient (nothing is applied), step optimizer and schedule, zero grads.

        A refused step raises FloatingPointError, or, while fewer than `max_bad_steps` were skipped, is skipped:
        the LR schedule and the step counter do not advance; the driver goes on with the next batch."""
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        lr = self.scheduler.get_last_lr()[0]
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            if self.bad_steps < self.max_bad_steps:
                self.bad_steps += 1
                print(
                    f"warning: {self.name}: non-finite gradient norm ({grad_norm}); step skipped "
                    f"({self.bad_steps} of at most {self.max_bad_steps})"
                )
                return StepStats(grad_norm=grad_norm, lr=lr, skipped=True)
            raise FloatingPointError(
                f"{self.name}: metric optim/grad_norm is {grad_norm} (non-finite gradient) at optimizer step "
                f"{self.steps + 1}; the step was not applied"
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return StepStats(grad_norm=grad_norm, lr=lr)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's weights (for saving the model directory)."""
        return self.module.state_dict()

    def save_state(self, directory: Path) -> None:
        """Weights, optimizer, schedule and counters into `directory/<name>.pt`."""
        state = {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "steps": self.steps,
            "bad_steps": self.bad_steps,
        }
        torch.save(state, directory / f"{self.name}.pt")

    def load_state(self, directory: Path) -> None:
        state = torch.load(directory / f"{self.name}.pt", map_location="cpu", weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps, self.bad_steps = state["steps"], state["bad_steps"]


def build_engine(model: nn.Module, optim: OptimConfig, total_steps: int, name: str, cfg) -> TrainEngine:
    """The engine `cfg.engine.kind` names, for a stage config `cfg` (engine, run)."""
    if cfg.engine.kind == "deepspeed":
        from chatrlhf.engine.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model, optim, total_steps, name, cfg.engine, cfg.run.dtype)
    return TrainEngine(model, optim, total_steps, name, cfg.run.max_bad_steps)
