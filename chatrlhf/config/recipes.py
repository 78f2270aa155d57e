"""YAML in and out: recipes, the resolved `config.yaml` of a run, and the fields renamed since earlier versions."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

from chatrlhf.config.common import RunConfig, check_types
from chatrlhf.config.rl import RLTrainConfig
from chatrlhf.errors import ConfigError

C = TypeVar("C")

RENAMED: dict[type, dict[str, str]] = {
    RLTrainConfig: {
        "ppo.kl_coef": "kl.coef",
        "ppo.kl_estimator": "kl.estimator",
        "ppo.kl_in": "kl.placement",
        "ppo.kl_target": "kl.target",
        "ppo.kl_horizon": "kl.horizon",
        "ppo.reward_clip": "reward.clip",
        "ppo.clip_eps": "loss.clip_low",
        "ppo.value_clip": "loss.value_clip",
        "ppo.loss_aggregation": "loss.aggregation",
        "ppo.gamma": "advantage.gamma",
        "ppo.lam": "advantage.lam",
        "ppo.whiten_advantages": "advantage.whiten",
        "ppo.ppo_epochs": "update.epochs",
        "ppo.mini_batch_size": "update.mini_batch_size",
        "ppo.micro_batch_size": "update.micro_batch_size",
        "ppo.tis_cap": "rollout.tis_cap",
        "group_baseline": "advantage.group_baseline",
        "grpo_scale_by_std": "algo",
    },
    RunConfig: {"tensorboard": "report_to"},
}
"""Fields of earlier versions → their name now, within the config class that holds them. The settings every RL
algorithm shares were under `ppo.*`; `grpo_scale_by_std: false` is now `algo: dr_grpo`. An old name in a recipe or
on the command line is an error that gives the new one (`renamed_error`)."""

_RENAME_NOTES = {
    "ppo.clip_eps": " (and loss.clip_high, which follows clip_low unless set)",
    "grpo_scale_by_std": " (grpo_scale_by_std false is algo dr_grpo; true is algo grpo)",
    "tensorboard": " (tensorboard true is report_to [tensorboard]; W&B, MLflow and Trackio are there too)",
}


def renamed_error(cls: type, key: str, prefix: str, given: list[str] | None = None) -> ConfigError | None:
    """The error for an old field name `key` (dotted, inside `cls`, whose own path is `prefix`, e.g. `train.` or
    `--train.`), or None when `key` was never a field. A section that is gone (`ppo`) says where each of its
    fields in `given` went (all of them when `given` is None)."""
    table = RENAMED.get(cls, {})
    if key in table:
        listed = " (docs/algorithms.md §4 lists every setting)" if cls is RLTrainConfig else ""
        note = _RENAME_NOTES.get(key, "")
        return ConfigError(f"'{prefix}{key}' was renamed: use '{prefix}{table[key]}'{note}{listed}")
    moved = [(old, new) for old, new in table.items() if old.startswith(key + ".")]
    if given is not None:
        moved = [(old, new) for old, new in moved if old.split(".")[-1] in given]
    if key + "." in {old[: len(key) + 1] for old in table}:
        pairs = "; ".join(f"{prefix}{old} → {prefix}{new}" for old, new in moved)
        return ConfigError(
            f"'{prefix}{key}' is gone: its settings apply to every RL algorithm and moved by what they are "
            f"about{': ' + pairs if pairs else ''} (docs/algorithms.md §4)"
        )
    return None


def check_renamed_flags(cls: type, args: list[str]) -> None:
    """Refuse command-line flags (`--train.ppo.kl_coef`) that name a field of an earlier version, with the new name."""
    for arg in args:
        if not arg.startswith("--"):
            continue
        parts = arg[2:].split("=", 1)[0].replace("-", "_").split(".")
        holder = cls
        for i, part in enumerate(parts):
            fields = {f.name for f in dataclasses.fields(holder)}  # type: ignore[arg-type]
            if part not in fields:
                error = renamed_error(holder, ".".join(parts[i:]), "--" + "".join(p + "." for p in parts[:i]))
                if error is not None:
                    raise error
                break
            inner = getattr(holder(), part)
            if not dataclasses.is_dataclass(inner):
                break
            holder = type(inner)


def from_dict(cls: type[C], data: dict, where: str = "") -> C:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys with the dotted key path (and old names with
    the new one)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    defaults = cls()
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            given = list(value) if isinstance(value, dict) else None
            error = renamed_error(cls, key, f"{where}." if where else "", given)
            if error is not None:
                raise error
            raise ConfigError(f"unknown config key '{path}' (known: {', '.join(sorted(fields))})")
        current = getattr(defaults, key)
        if dataclasses.is_dataclass(current):
            kwargs[key] = from_dict(type(current), value, path)
        elif isinstance(current, tuple) and isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def load_recipe(cls: type[C], path: str | Path) -> C:
    """Read a YAML recipe into config class `cls`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe {p}: file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {p}: invalid YAML: {e}") from None
    try:
        cfg = from_dict(cls, data)
        check_types(cfg)
        return cfg
    except TypeError as e:
        raise ConfigError(f"recipe {p}: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"recipe {p}: {e}") from None


def to_dict(cfg: Any) -> dict:
    """The config as plain YAML-safe data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Any, path: Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    tmp.replace(path)
