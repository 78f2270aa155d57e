"""What every stage shares: run settings, the engine (one process or DeepSpeed ZeRO), LoRA, checkpoints,
the optimizer, the data sources, and the checks of their values and types."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from chatrlhf.data.formats import FORMAT_CHOICES
from chatrlhf.errors import ConfigError
from chatrlhf.trackers import TRACKERS

if TYPE_CHECKING:
    from chatrlhf.config.pipeline import PipelineDataConfig


@dataclass
class RunConfig:
    """Settings shared by every stage: where, on what device, how reproducibly, how loudly."""

    seed: int = 1234
    """Seed for python, numpy and torch RNGs and for the data order (DeepSpeed-Chat's default)."""
    device: str = "auto"
    """Torch device: `auto` (cuda if available, else cpu), `cpu`, `cuda`, `cuda:1`, `mps`, `xpu`, ... A device this
    machine does not have is refused when the stage starts, before anything is written."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the models are loaded in. float32 or bfloat16 on CPU (float16 is refused there: sampling in float16 fails
    on the CPU); bfloat16 is the usual choice on recent GPUs."""
    threads: int = 0
    """torch intra-op threads on CPU; 0 keeps torch's default (one per core)."""
    log_every: int = 10
    """Write a metrics line (metrics.jsonl) every this many optimizer steps / RL iterations."""
    progress: bool = True
    """Show a progress bar with the key metrics."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that also receive every logged metric and the RL stage's held-out samples: any of
    `tensorboard` (events in `<stage dir>/tensorboard/`), `wandb`, `mlflow`, `trackio`; each is an optional extra
    (`pip install 'chatrlhf[wandb]'`) configured by its own environment variables (docs/metrics.md#trackers)."""
    project: str = "chatrlhf"
    """The trackers' project (W&B and Trackio project, MLflow experiment)."""
    name: str = ""
    """The run's name in the trackers; empty: the run directory's name (a pipeline's stages: `NAME/sft`, ...)."""
    overwrite: bool = False
    """Allow writing into an output directory that already holds a finished run (its model is replaced)."""
    max_bad_steps: int = 0
    """Skip up to this many optimizer steps whose loss or gradient is NaN/inf (counted in `faults/skipped_steps`);
    the next one stops the run. 0 = the first stops it."""


@dataclass
class EngineConfig:
    """How the trained models are held and stepped: one process, or DeepSpeed ZeRO across processes."""

    kind: Literal["single", "deepspeed"] = "single"
    """`single`: plain PyTorch in one process (the default). `deepspeed`: DeepSpeed ZeRO; launch with
    `torchrun --nproc_per_node N -m chatrlhf ...` or
    `deepspeed --num_gpus N --module --no_local_rank chatrlhf ...` (docs/scale.md)."""
    zero_stage: int = 2
    """ZeRO stage 0–3: 1 shards optimizer states, 2 also gradients, 3 also parameters."""
    offload_optimizer: bool = False
    """Keep optimizer states on the CPU and step there (DeepSpeedCPUAdam); ZeRO stage >= 1."""
    offload_params: bool = False
    """Keep parameters on the CPU between uses; ZeRO stage 3 only."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON config merged over the one built from these settings (its values win), for anything not
    exposed here (bucket sizes, stage-3 prefetch, ...)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them (less memory, ~30% more compute)."""
    offload_frozen: bool = False
    """RL: keep the reference and reward models on the CPU and move each to the device only while it scores. Under
    ZeRO-3 (which shards the frozen models, the DPO reference too) their partitions stay on the CPU and DeepSpeed
    fetches each layer to the device while it runs (docs/scale.md)."""
    gather_for_generation: bool = True
    """ZeRO-3 rollouts: gather the actor's full weights once per rollout batch and generate on a whole copy.
    False generates on the sharded model (`synced_gpus`), which gathers every layer for every token."""


@dataclass
class LoRAConfig:
    """Low-rank adapters (PEFT) on the trained models instead of training every weight."""

    rank: int = 0
    """Adapter rank r; 0 = no LoRA (train all weights)."""
    alpha: float = 16.0
    """Scaling α; the update is (α / r)·B·A."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=list)
    """Module names to adapt (e.g. q_proj v_proj, or all-linear); empty = PEFT's default for the architecture."""


@dataclass
class CheckpointConfig:
    """Resumable checkpoints in `<run dir>/checkpoints/step-N/` (docs/reliability.md)."""

    every: int = 50
    """Save a checkpoint every this many optimizer steps (RL: iterations) and at the end; 0 = only at the end."""
    keep: int = 2
    """Keep the newest this many checkpoints (older ones are deleted after a newer one is complete)."""


@dataclass
class OptimConfig:
    """AdamW with a warm-up + decay schedule and gradient clipping."""

    lr: float = 1e-5
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam (β1, β2); DeepSpeed-Chat uses (0.9, 0.95)."""
    eps: float = 1e-8
    """Adam ε."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warm-up (cosine is DeepSpeed-Chat's default)."""
    warmup_steps: int = 0
    """Linear warm-up steps (optimizer steps)."""
    fused: bool = True
    """torch's fused AdamW kernel (CPU and GPU), which updates every parameter in one pass: the same update as the
    default implementation up to float rounding, 2–5× faster per step on the CPU (docs/benchmarks.md §11). False:
    torch's default implementation (a loop over the parameters on the CPU, `foreach` on a GPU). DeepSpeed's CPU
    Adam under `engine.offload_optimizer` is used either way."""


@dataclass
class DataConfig:
    """Where a stage's records come from (README, "Data formats")."""

    paths: list[str] = field(default_factory=list)
    """Sources: .jsonl/.json/.parquet/.csv files, `datasets` directories saved to disk (`dir` or `dir:split`),
    datasets by name through `datasets.load_dataset` (`hf:ID[:SPLIT][?config=..&data_dir=..&data_files=..]`, e.g.
    `hf:Anthropic/hh-rlhf:train`), or generated demo data (`demo:pairs:N:SEED`, `demo:prompts:N:SEED`). See
    docs/data.md."""
    format: str = "auto"
    """Dataset format of every source: `auto` detects each source's from its columns; or one of trl (chatrlhf's own
    schema, TRL's formats), hh-rlhf, rm-static, shp, webgpt, ultrafeedback, oasst (docs/data.md)."""
    weights: list[float] | None = None
    """Blend weights, one per path (up- or down-samples each source; counts are printed). None = concatenate."""
    eval_paths: list[str] = field(default_factory=list)
    """Held-out sources for evaluation. Empty = hold out `eval_fraction` of the training records."""
    eval_fraction: float = 0.05
    """Fraction of the records held out for evaluation when `eval_paths` is empty."""
    skip_invalid: bool = False
    """Skip invalid records (an adapter's unconvertible ones included) instead of stopping at the first one; the
    number skipped is printed and logged."""
    num_proc: int = 1
    """Processes that validate and tokenize the records (`datasets.map`'s `num_proc`); 1 = this process."""
    cache_dir: str | None = None
    """Where prepared data is cached (Arrow files: each source as read, its validated records, their tokens); a
    second run with the same files, format, tokenizer and lengths reads them back. None = `chatrlhf/` in the
    `datasets` cache (`HF_DATASETS_CACHE`, default ~/.cache/huggingface/datasets). See docs/data.md."""


@dataclass
class StageOptions:
    """Options every stage shares: engine, LoRA, checkpoints, resume, and the run settings."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    """Single process or DeepSpeed ZeRO; memory savers."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters on the trained model(s)."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Resumable checkpoints."""
    resume: str = "no"
    """`no`; `auto` = continue from the newest complete checkpoint in the run directory (start fresh if there is
    none); or a checkpoint directory."""
    run: RunConfig = field(default_factory=RunConfig)
    """Device, seed, logging."""

    def validate_options(self) -> None:
        check_options(self)


def check_options(o: StageOptions) -> None:
    e = o.engine
    if not 0 <= e.zero_stage <= 3:
        raise ConfigError(f"engine.zero_stage must be 0, 1, 2 or 3, got {e.zero_stage}")
    if e.kind == "single" and (e.offload_optimizer or e.offload_params or e.deepspeed_config):
        named = [f"engine.{k}" for k in ("offload_optimizer", "offload_params", "deepspeed_config") if getattr(e, k)]
        verb = "needs" if len(named) == 1 else "need"
        raise ConfigError(f"{' and '.join(named)} {verb} engine.kind=deepspeed, but engine.kind is single")
    if e.offload_params and e.zero_stage != 3:
        raise ConfigError(f"engine.offload_params needs engine.zero_stage=3, got {e.zero_stage}")
    if e.offload_optimizer and e.zero_stage == 0:
        raise ConfigError("engine.offload_optimizer needs engine.zero_stage >= 1 (stage 0 has no optimizer sharding)")
    if o.lora.rank < 0:
        raise ConfigError(f"lora.rank must be >= 0 (0 = no LoRA), got {o.lora.rank}")
    if o.lora.alpha <= 0:
        raise ConfigError(f"lora.alpha must be > 0, got {o.lora.alpha}")
    if not 0.0 <= o.lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {o.lora.dropout}")
    if o.checkpoint.every < 0 or o.checkpoint.keep < 1:
        raise ConfigError("checkpoint.every must be >= 0 and checkpoint.keep >= 1")
    unknown = [t for t in o.run.report_to if t not in TRACKERS]
    if unknown or len(set(o.run.report_to)) != len(o.run.report_to):
        raise ConfigError(f"run.report_to: {o.run.report_to} — give each of {', '.join(TRACKERS)} at most once")
    if o.run.max_bad_steps < 0:
        raise ConfigError(f"run.max_bad_steps must be >= 0, got {o.run.max_bad_steps}")
    if e.kind == "deepspeed" and o.run.max_bad_steps > 0:
        raise ConfigError(
            "run.max_bad_steps > 0 needs engine.kind=single: DeepSpeed cannot discard gradients already reduced "
            "into ZeRO partitions, so a bad step stops a DeepSpeed run"
        )
    train = getattr(o, "train", None) or getattr(o, "rl", None)
    if e.kind == "deepspeed" and e.zero_stage == 3 and getattr(train, "ema", False):
        raise ConfigError("ema with engine.zero_stage=3 is not supported (the EMA copy would need the whole actor)")
    rollout = getattr(train, "rollout", None)
    if rollout is not None and rollout.backend == "vllm" and e.zero_stage == 3 and not e.gather_for_generation:
        raise ConfigError(
            "train.rollout.backend=vllm with engine.gather_for_generation=False: vLLM needs the whole weights, which "
            "ZeRO-3 gathers once per rollout only with engine.gather_for_generation=True"
        )
    if e.kind == "deepspeed" and e.zero_stage == 3 and o.lora.rank > 0:
        raise ConfigError("lora.rank > 0 with engine.zero_stage=3 is not supported; use ZeRO stage 0-2 with LoRA")


def check_types(cfg: Any, prefix: str = "") -> None:
    """Every field of the (nested) config `cfg` holds a value of its declared type. Flags are typed by the CLI
    parser, but a recipe's values are whatever YAML made of them (`lr: 1e-5` is a string in YAML 1.1), and a
    wrong type would otherwise surface as a TypeError deep inside a run."""
    import typing

    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, hint, name = getattr(cfg, f.name), hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, hint):
                raise ConfigError(f"{name}: expected a mapping of {name}.* fields, found {_yaml_value(value)}")
            check_types(value, f"{name}.")
        elif not _has_type(value, hint):
            advice = ""
            if isinstance(value, str) and "e" in value.lower() and _has_type(1.0, hint) and _parses_as_float(value):
                advice = " (YAML reads an exponent without a decimal point as a string: write 1.0e-5, not 1e-5)"
            raise ConfigError(f"{name}: expected {_type_words(hint)}, found {_yaml_value(value)}{advice}")


_TYPE_WORDS = {
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    bool: ("true or false", "booleans"),
    str: ("a string", "strings"),
}
"""How messages name a scalar annotation: (singular, plural)."""


def _has_type(value: Any, hint: Any) -> bool:
    """Whether `value` fits the annotation `hint` (ints fit floats; bools fit neither)."""
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        items = args if origin is tuple else (args[0],) * len(value)
        return len(items) == len(value) and all(_has_type(v, a) for v, a in zip(value, items))
    if hint in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if hint is float else hint)


def _type_words(hint: Any) -> str:
    """The annotation `hint` in words, for "expected ..." in messages."""
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        words = [_type_words(a) for a in args if a is not type(None)]
        return " or ".join(words) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"a list of {_TYPE_WORDS[args[0]][1]}"
    if origin is tuple:
        return f"a list of {len(args)} {_TYPE_WORDS[args[0]][1]}"
    return _TYPE_WORDS.get(hint, (getattr(hint, "__name__", str(hint)),))[0]


def _yaml_value(value: Any) -> str:
    """A value with its YAML type name, e.g. "string 'fast'", for "found ..." in messages."""
    names = {str: "string", int: "integer", float: "number", bool: "boolean", list: "list", dict: "mapping"}
    if value is None:
        return "null"
    preview = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    return f"{names.get(type(value), type(value).__name__)} {preview}"


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def require(value: Any, name: str, what: str) -> None:
    if not value:
        raise ConfigError(f"{name} is required: give {what} (--{name} or in the recipe)")


def check_fraction(value: float, name: str) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} must be in [0, 1), got {value}")


def check_format(value: str) -> None:
    if value not in FORMAT_CHOICES:
        raise ConfigError(f"data.format must be one of {', '.join(FORMAT_CHOICES)}, got {value!r}")


def check_data(d: DataConfig | PipelineDataConfig) -> None:
    """A stage's data settings, or the pipeline's (the same fields)."""
    check_format(d.format)
    if d.weights is not None and len(d.weights) != len(d.paths):
        raise ConfigError(
            f"data.weights has {len(d.weights)} values but data.paths has {len(d.paths)} source(s); "
            "give one weight per path"
        )
    check_fraction(d.eval_fraction, "data.eval_fraction")
    check_num_proc(d.num_proc)


def check_num_proc(value: int) -> None:
    if value < 1:
        raise ConfigError(f"data.num_proc must be >= 1, got {value}")


def check_optim(o: OptimConfig, prefix: str) -> None:
    if o.lr <= 0:
        raise ConfigError(f"{prefix}.lr must be > 0, got {o.lr}")
    if o.warmup_steps < 0 or o.grad_clip < 0 or o.weight_decay < 0:
        raise ConfigError(f"{prefix}.warmup_steps, {prefix}.grad_clip and {prefix}.weight_decay must be >= 0")
    if not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"{prefix}.betas must be in [0, 1), got {o.betas}")
