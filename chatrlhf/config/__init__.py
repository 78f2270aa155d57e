"""Typed configs, one per stage; every field documented where it is declared.

Values come from three layers, later ones winning: the defaults (DeepSpeed-Chat's where it has one, see
docs/algorithms.md), a YAML recipe (`--recipe recipes/demo.yaml`), and command-line flags (`--optim.lr 1e-5`).
Each run directory stores the fully resolved config as `config.yaml`; passing that file back as `--recipe`
repeats the run exactly.

`validate()` on each config raises `ConfigError` naming the fields in conflict; nothing here rewrites a user's value.

One module per stage, each with its options and their checks:

- `common`: what every stage shares (run settings, engine, LoRA, checkpoints, optimizer, data) and the type checks;
- `supervised`: `sft` and `reward`;
- `rl`: `rl` (generation, rollouts, KL, rewards, advantages, losses, the update, the algorithms' rules, the
  diagnostics, episodes);
- `dpo`: `dpo`;
- `pipeline`: `pipeline`, the stages in one command;
- `inference`: the commands that only run models (`chat`, `serve`, `eval`);
- `recipes`: YAML in and out, and the fields renamed since earlier versions.
"""

from chatrlhf.config.common import (
    CheckpointConfig,
    DataConfig,
    EngineConfig,
    LoRAConfig,
    OptimConfig,
    RunConfig,
    StageOptions,
)
from chatrlhf.config.dpo import DPOConfig, DPOTrainConfig
from chatrlhf.config.inference import BackendOptions, ChatConfig, EvaluateConfig, RunOptions, ServeConfig
from chatrlhf.config.pipeline import EvalConfig, PipelineConfig, PipelineDataConfig, RewardGateConfig
from chatrlhf.config.recipes import (
    RENAMED,
    check_renamed_flags,
    from_dict,
    load_recipe,
    renamed_error,
    save_config,
    to_dict,
)
from chatrlhf.config.rl import (
    ALGORITHM_RULES,
    DIAGNOSTICS,
    AdvantageConfig,
    Algo,
    AlgorithmRules,
    Diagnostic,
    DoctorConfig,
    EpisodeConfig,
    GenerationConfig,
    KLConfig,
    LossConfig,
    RewardShapingConfig,
    RLConfig,
    RLTrainConfig,
    RolloutConfig,
    SamplingConfig,
    UpdateConfig,
)
from chatrlhf.config.supervised import RewardConfig, RewardTrainConfig, SFTConfig, SFTTrainConfig
from chatrlhf.errors import ConfigError

__all__ = [
    "ALGORITHM_RULES",
    "DIAGNOSTICS",
    "RENAMED",
    "AdvantageConfig",
    "Algo",
    "AlgorithmRules",
    "BackendOptions",
    "ChatConfig",
    "CheckpointConfig",
    "ConfigError",
    "DPOConfig",
    "DPOTrainConfig",
    "DataConfig",
    "Diagnostic",
    "DoctorConfig",
    "EngineConfig",
    "EpisodeConfig",
    "EvalConfig",
    "EvaluateConfig",
    "GenerationConfig",
    "KLConfig",
    "LoRAConfig",
    "LossConfig",
    "OptimConfig",
    "PipelineConfig",
    "PipelineDataConfig",
    "RLConfig",
    "RLTrainConfig",
    "RewardConfig",
    "RewardGateConfig",
    "RewardShapingConfig",
    "RewardTrainConfig",
    "RolloutConfig",
    "RunConfig",
    "RunOptions",
    "SFTConfig",
    "SFTTrainConfig",
    "SamplingConfig",
    "ServeConfig",
    "StageOptions",
    "UpdateConfig",
    "check_renamed_flags",
    "from_dict",
    "load_recipe",
    "renamed_error",
    "save_config",
    "to_dict",
]
