"""The single-process training engine: one model, AdamW, an LR schedule and gradient clipping, plain PyTorch
(the `TrainEngine` interface of engine/base.py)."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from transformers import get_scheduler

from chatrlhf.config import OptimConfig
from chatrlhf.engine.base import StepStats, adamw, non_finite_gradient, param_groups


class SingleEngine:
    """A model trained in this process. `model` and `module` are the same object here."""

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
        self.optimizer = adamw(param_groups(model, optim.weight_decay), optim)
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
            raise non_finite_gradient(self.name, grad_norm, self.steps + 1)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return StepStats(grad_norm=grad_norm, lr=lr)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's weights (for saving the model directory)."""
        return self.module.state_dict()

    @contextmanager
    def generation_weights(self) -> Iterator[nn.Module]:
        yield self.module

    @property
    def sharded_generation(self) -> bool:
        return False

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
