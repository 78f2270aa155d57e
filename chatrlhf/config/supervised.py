"""Steps 1 and 2: `chatrlhf sft` and `chatrlhf reward`."""

from __future__ import annotations

from dataclasses import dataclass, field

from chatrlhf.config.common import DataConfig, OptimConfig, StageOptions, check_data, check_optim, check_types, require
from chatrlhf.errors import ConfigError


@dataclass
class SFTTrainConfig:
    """How step 1 (supervised fine-tuning) trains."""

    epochs: int = 1
    """Passes over the training records."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run all epochs)."""
    batch_size: int = 8
    """Sequences per micro-batch (DeepSpeed-Chat's per-device default)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_seq_len: int = 512
    """Longest prompt+response in tokens; a longer record is an error naming it."""
    loss_on_prompt: bool = False
    """Also train on prompt tokens (DeepSpeed-Chat does; the default trains on response tokens only)."""
    eval_every: int = 0
    """Evaluate held-out perplexity every this many steps (0 = only at the end)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4))
    """Optimizer. DeepSpeed-Chat's OPT-1.3B script uses lr 9.65e-6; small models want more."""


@dataclass
class RewardTrainConfig:
    """How step 2 (reward model) trains."""

    epochs: int = 1
    """Passes over the training pairs (DeepSpeed-Chat: 1)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run all epochs)."""
    batch_size: int = 4
    """Pairs per micro-batch (each pair is two sequences; DeepSpeed-Chat: 4)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_seq_len: int = 512
    """Longest prompt+response in tokens; a longer record is an error naming it."""
    eval_every: int = 0
    """Evaluate held-out accuracy every this many steps (0 = only at the end)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, weight_decay=0.1))
    """Optimizer (DeepSpeed-Chat's OPT-350M reward model: lr 5e-5, weight decay 0.1)."""


@dataclass
class SFTConfig(StageOptions):
    """`chatrlhf sft`: fine-tune a causal LM on prompt/response records."""

    model: str = ""
    """Base model: a Hugging Face id, a local HF model directory, or a tiny random preset (`tiny:llama`)."""
    output_dir: str = "runs/sft"
    """Run directory: `model/` (HF model), `metrics.jsonl`, `config.yaml`, `summary.json`."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training records: {prompt, response}, {messages} or {prompt, chosen, rejected} (uses chosen)."""
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    """Training loop."""

    def validate(self, need_data: bool = True) -> None:
        _validate_supervised(self, need_data)


@dataclass
class RewardConfig(StageOptions):
    """`chatrlhf reward`: train a reward model (causal-LM backbone + scalar head) on preference pairs."""

    model: str = ""
    """Backbone: usually the SFT output (InstructGPT), or any causal LM (DeepSpeed-Chat uses a smaller one)."""
    output_dir: str = "runs/reward"
    """Run directory: `model/` (HF sequence-classification model, 1 label), metrics, config, summary."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training pairs: {prompt, chosen, rejected}."""
    train: RewardTrainConfig = field(default_factory=RewardTrainConfig)
    """Training loop."""

    def validate(self, need_data: bool = True) -> None:
        _validate_supervised(self, need_data)


def _validate_supervised(cfg: SFTConfig | RewardConfig, need_data: bool) -> None:
    check_types(cfg)
    require(cfg.model, "model", "a model id, directory or tiny:ARCH preset")
    if need_data:
        require(cfg.data.paths, "data.paths", "at least one data source")
    check_data(cfg.data)
    check_loop(cfg.train, "train")
    check_optim(cfg.train.optim, "train.optim")


def check_loop(t: SFTTrainConfig | RewardTrainConfig, prefix: str) -> None:
    for name in ("epochs", "batch_size", "grad_accum", "max_seq_len"):
        if getattr(t, name) < 1:
            raise ConfigError(f"{prefix}.{name} must be >= 1, got {getattr(t, name)}")
    if t.max_steps < 0 or t.eval_every < 0:
        raise ConfigError(f"{prefix}.max_steps and {prefix}.eval_every must be >= 0")
