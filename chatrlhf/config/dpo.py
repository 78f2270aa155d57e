"""`chatrlhf dpo`: direct preference optimisation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from chatrlhf.config.common import DataConfig, OptimConfig, StageOptions, check_data, check_optim, check_types, require
from chatrlhf.config.supervised import check_loop
from chatrlhf.errors import ConfigError


@dataclass
class DPOTrainConfig:
    """How DPO trains: an offline alternative to steps 2+3, with no reward model and no sampling."""

    epochs: int = 1
    """Passes over the training pairs."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run all epochs)."""
    batch_size: int = 4
    """Pairs per micro-batch (each pair is two sequences, scored by the policy and by the reference)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_seq_len: int = 512
    """Longest prompt+response in tokens; a longer record is an error naming it."""
    beta: float = 0.1
    """β: how strongly the policy is held to the reference (the implicit KL constraint); larger stays closer.
    The DPO paper's and TRL's default 0.1. With loss_type ipo it is IPO's τ."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """`sigmoid`: DPO, −log σ(β·h); `ipo`: IPO, (h − 1/(2β))². h is the log-ratio margin (docs/algorithms.md)."""
    label_smoothing: float = 0.0
    """ε of conservative DPO: the assumed rate of flipped preference labels, in [0, 0.5); sigmoid only."""
    eval_every: int = 0
    """Evaluate the held-out pairs every this many steps (0 = only at the end)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6))
    """Optimizer. The DPO paper trains with lr 1e-6 (RMSprop, batch 64, 150 warm-up steps) and TRL's default is
    1e-6; 5e-7 is common for 7B models. Small models trained from scratch want far more (recipes/demo-dpo.yaml)."""

    def validate(self, prefix: str = "train") -> None:
        check_loop(self, prefix)
        check_optim(self.optim, f"{prefix}.optim")
        if self.loss_type not in ("sigmoid", "ipo"):
            raise ConfigError(f"{prefix}.loss_type must be sigmoid or ipo, got {self.loss_type!r}")
        if self.beta <= 0:
            raise ConfigError(f"{prefix}.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"{prefix}.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing > 0 and self.loss_type != "sigmoid":
            raise ConfigError(
                f"{prefix}.label_smoothing is {self.label_smoothing} but {prefix}.loss_type is {self.loss_type}: "
                "label smoothing (conservative DPO) applies to the sigmoid loss only"
            )


@dataclass
class DPOConfig(StageOptions):
    """`chatrlhf dpo`: direct preference optimisation of a causal LM on preference pairs (no reward model)."""

    model: str = ""
    """The policy to train: usually the SFT output directory (or any causal LM)."""
    reference: str | None = None
    """Frozen reference policy π_ref; None = the model's starting weights (the DPO paper's π_SFT). It must use the
    model's tokenizer."""
    output_dir: str = "runs/dpo"
    """Run directory: `model/` (the trained policy, a HF causal LM), metrics.jsonl, config.yaml, summary.json."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training pairs: {prompt, chosen, rejected}."""
    train: DPOTrainConfig = field(default_factory=DPOTrainConfig)
    """Training loop and the DPO loss."""

    def validate(self, need_data: bool = True) -> None:
        check_types(self)
        require(self.model, "model", "the SFT model directory, or any causal LM")
        if need_data:
            require(self.data.paths, "data.paths", "at least one pair source")
        check_data(self.data)
        self.train.validate("train")
