"""The single-process training engine: one model, AdamW, an LR schedule and gradient clipping, plain PyTorch."""

from __future__ import annotations

import math
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


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; biases and norm scales (1-D tensors) are not decayed (DeepSpeed-Chat does
    the same by name; the dimension rule needs no names)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class TrainEngine:
    """Owns a trainable model's optimizer and schedule. The driver calls `backward(loss)` per micro-batch and
    `step()` per optimizer step; nothing else happens behind its back."""

    def __init__(self, model: nn.Module, optim: OptimConfig, total_steps: int, name: str = "model"):
        self.model = model
        self.name = name
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
        """Clip, refuse a non-finite gradient (nothing is applied), step optimizer and schedule, zero grads."""
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"{self.name}: non-finite gradient norm ({grad_norm}) at step {self.steps + 1}")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return StepStats(grad_norm=grad_norm, lr=lr)
