"""`chatrlhf pipeline`: the three steps (or SFT then DPO) in one command, and the evaluation after them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from chatrlhf.config.common import (
    StageOptions,
    check_data,
    check_optim,
    check_options,
    check_types,
    require,
)
from chatrlhf.config.dpo import DPOTrainConfig
from chatrlhf.config.rl import ALGORITHM_RULES, RLTrainConfig, check_rl
from chatrlhf.config.supervised import RewardTrainConfig, SFTTrainConfig, check_loop
from chatrlhf.data.blend import parse_split
from chatrlhf.errors import ConfigError


@dataclass
class PipelineDataConfig:
    """Data for the three-step pipeline: one pool split across the stages, or a dataset per stage."""

    paths: list[str] = field(default_factory=list)
    """Pair sources (any source and format that `data.paths` of a stage takes, e.g. {prompt, chosen, rejected}
    files or `hf:Anthropic/hh-rlhf`) blended and then split across SFT / reward / RL by `split`."""
    format: str = "auto"
    """Dataset format of every source (the pool's and each stage's): `auto` detects each source's from its columns,
    or a format name (docs/data.md)."""
    weights: list[float] | None = None
    """Blend weights, one per path; None = concatenate."""
    split: str = "2,4,4"
    """Shares of the pool for SFT, reward model and RL (DeepSpeed-Chat's `data_split`)."""
    sft_paths: list[str] = field(default_factory=list)
    """If set, SFT trains on these sources instead of its share of the pool."""
    reward_paths: list[str] = field(default_factory=list)
    """If set, the reward model trains on these instead of its share of the pool."""
    rl_paths: list[str] = field(default_factory=list)
    """If set, RL draws prompts from these instead of its share of the pool."""
    eval_fraction: float = 0.05
    """Fraction of each stage's records held out for its evaluation."""
    skip_invalid: bool = False
    """Skip invalid records (counted and printed) instead of stopping."""
    num_proc: int = 1
    """Processes that validate and tokenize the records (`datasets.map`'s `num_proc`); 1 = this process."""
    cache_dir: str | None = None
    """Where prepared data is cached; None = `chatrlhf/` in the `datasets` cache (`HF_DATASETS_CACHE`)."""


@dataclass
class RewardGateConfig:
    """Between steps 2 and 3: does the reward model rank held-out pairs better than chance (or than `min_accuracy`)?
    RL on a reward model that does not would optimise noise (docs/report.md, "The reward-model gate")."""

    action: Literal["stop", "warn", "off"] = "stop"
    """stop: end the pipeline before RL when the reward model fails the test (SFT and the reward model are kept; the
    message says how to go on); warn: print the finding and run RL anyway; off: no test."""
    min_accuracy: float = 0.5
    """The held-out accuracy the reward model must be shown to exceed: 0.5 is chance; 0.6 is a stricter bar."""
    p: float = 0.05
    """Significance level of the one-sided exact binomial test of H₀ "accuracy ≤ min_accuracy": the reward model
    passes when P(at least its correct pairs | accuracy = min_accuracy) is at most this."""


@dataclass
class EvalConfig:
    """The final comparison of the SFT and the RLHF (or DPO) policies on held-out prompts."""

    prompts: list[str] = field(default_factory=list)
    """Held-out prompt sources; empty = the RL stage's held-out prompts (the DPO stage's held-out pairs' prompts
    with method dpo)."""
    num_prompts: int = 256
    """Prompts to evaluate (the first N of the source)."""
    samples_per_prompt: int = 4
    """Sampled responses per prompt and model; per-prompt means are compared pairwise."""
    judge: str | None = None
    """Optional programmatic judge `module:function(prompt, response, **fields) -> float` (never seen by RL)."""
    batch_size: int = 64
    """Sequences (prompt × sample) per generation batch."""


@dataclass
class PipelineConfig(StageOptions):
    """`chatrlhf pipeline`: SFT → reward model → RLHF (or SFT → DPO) → evaluation, in one run directory."""

    model: str = ""
    """Actor base model: a Hugging Face id, a local HF model directory, or a tiny random preset."""
    reward_base: str | None = None
    """Reward-model backbone; None = the SFT output (InstructGPT). DeepSpeed-Chat uses a separate smaller LM."""
    train_reward_model: bool = True
    """Step 2. False skips it: RL is then rewarded by `reward_functions` alone (e.g. a verifiable reward)."""
    reward_functions: list[str] = field(default_factory=list)
    """Python rewards `module:function(prompt, response, **fields) -> float` for RL, alone or with the reward model."""
    reward_weights: list[float] | None = None
    """Weights of [reward model (if trained), environment (with env), *reward_functions] in RL's summed reward;
    None = 1 each."""
    env: str = ""
    """An environment `module:Class`: RL plays multi-turn episodes (docs/episodes.md), rewarded by their return (and
    `reward_functions`, and the reward model, if trained, which scores each episode as played), and the final
    comparison plays episodes too."""
    run_dir: str = "runs/pipeline"
    """Everything goes here: `sft/`, `reward/`, `rl/` (or `dpo/`), `summary.json`, `config.yaml`."""
    method: Literal["rlhf", "dpo"] = "rlhf"
    """rlhf: SFT → reward model → RL; dpo: SFT → DPO on the pairs of the reward and RL shares (steps 2+3
    replaced; `data.reward_paths`, when set, instead of both shares)."""
    data: PipelineDataConfig = field(default_factory=PipelineDataConfig)
    """Data pool and per-stage split."""
    sft: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    """Step 1 training."""
    reward: RewardTrainConfig = field(default_factory=RewardTrainConfig)
    """Step 2 training."""
    reward_gate: RewardGateConfig = field(default_factory=RewardGateConfig)
    """The test of the reward model's held-out accuracy against chance before RL."""
    rl: RLTrainConfig = field(default_factory=RLTrainConfig)
    """Step 3 training. With method dpo only `max_prompt_len` and `generation` are used: by the final comparison."""
    dpo: DPOTrainConfig = field(default_factory=DPOTrainConfig)
    """DPO training, in place of steps 2+3 (method dpo)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Final evaluation."""

    def validate(self) -> None:
        check_types(self)
        check_options(self)
        require(self.model, "model", "a model id, directory or tiny:ARCH preset")
        d = self.data
        parse_split(d.split)
        if self.method not in ("rlhf", "dpo"):
            raise ConfigError(f"method must be rlhf or dpo, got {self.method!r}")
        if self.method == "dpo":
            self._validate_dpo()
        elif not d.paths and not (d.sft_paths and (d.reward_paths or not self.train_reward_model) and d.rl_paths):
            raise ConfigError(
                "data.paths is empty and not every stage has its own data (data.sft_paths, data.reward_paths, "
                "data.rl_paths): give a pool to split, or per-stage sources"
            )
        check_data(d)
        check_loop(self.sft, "sft")
        check_optim(self.sft.optim, "sft.optim")
        check_loop(self.reward, "reward")
        check_optim(self.reward.optim, "reward.optim")
        if not 0.0 < self.reward_gate.p < 1.0:
            raise ConfigError(f"reward_gate.p must be in (0, 1), got {self.reward_gate.p}")
        if not 0.5 <= self.reward_gate.min_accuracy < 1.0:
            raise ConfigError(
                f"reward_gate.min_accuracy must be in [0.5, 1) (0.5 is chance), got {self.reward_gate.min_accuracy}"
            )
        check_rl(self.rl, "rl")
        if self.method == "rlhf":
            self._validate_rl_rewards()
        if self.eval.num_prompts < 1 or self.eval.samples_per_prompt < 1:
            raise ConfigError("eval.num_prompts and eval.samples_per_prompt must be >= 1")

    def _validate_dpo(self) -> None:
        d = self.data
        if not d.paths and not (d.sft_paths and d.reward_paths):
            raise ConfigError(
                "data.paths is empty and not both DPO-pipeline stages have their own data (data.sft_paths, "
                "data.reward_paths): give a pool to split, or both per-stage sources"
            )
        if d.rl_paths:
            raise ConfigError(
                "data.rl_paths is set but method is dpo: DPO trains on pairs (data.reward_paths, or the pool's "
                "reward and RL shares), not on RL prompts; unset data.rl_paths or use method rlhf"
            )
        if self.reward_base:
            raise ConfigError("reward_base is set but method is dpo, which trains no reward model; unset one of them")
        self.dpo.validate("dpo")

    def _validate_rl_rewards(self) -> None:
        if not self.train_reward_model and not self.reward_functions and not self.env:
            raise ConfigError("train_reward_model is false and reward_functions is empty: RL would have no reward")
        n_sources = int(self.train_reward_model) + bool(self.env) + len(self.reward_functions)
        if self.reward_weights is not None and len(self.reward_weights) != n_sources:
            raise ConfigError(f"reward_weights has {len(self.reward_weights)} values for {n_sources} reward sources")
        if ALGORITHM_RULES[self.rl.algo].critic and not self.train_reward_model:
            raise ConfigError(
                f"rl.algo={self.rl.algo} initialises its critic from the reward model: keep train_reward_model"
            )
