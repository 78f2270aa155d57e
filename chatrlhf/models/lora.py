"""LoRA adapters (PEFT) on the trained models: train r·(d_in + d_out) numbers per adapted matrix instead of all of it.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3) freezes each adapted weight W
(d_out × d_in) and learns a low-rank update beside it:

    h = W·x + (α / r)·B·A·x        A: (r, d_in), B: (d_out, r), B = 0 at init, so the model starts unchanged

The adapters are injected into the model in place (`peft.inject_adapter_in_model`): the model keeps its own class,
so a causal LM is still a transformers `PreTrainedModel` (forward, `generate`, `config`, `generation_config`,
`get_input_embeddings` all work as before) and a `ValueModel` keeps its `backbone` and `head` references. For a
ValueModel the backbone is adapted and the scalar head stays fully trainable, in either value-model format (inside a
sequence-classification model, or beside a base model: `chatrlhf.models.load`).

For rollouts, `merged(model)` folds B·A into W so generation runs at the speed of the plain model, and puts the
exact original weights back afterwards. `AdapterFree(model)` is the model without its adapters — the weights it
started from — which stands for the frozen reference (RL, DPO) when the reference is those weights, so that no
second copy of the model is loaded. `save_trained` writes the merged model as a plain HF directory (a value model
in its own format) plus the adapter alone in PEFT's format.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer, cast_adapter_dtype
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from chatrlhf.config import LoRAConfig
from chatrlhf.models.load import VALUE_HEAD_FILE, ValueModel, atomic_dir, save_model_dir, save_value_model

ADAPTER = "default"
"""PEFT's adapter name; we only ever have one adapter."""
ALL_LINEAR = "all-linear"
"""PEFT's shorthand target: every linear (and Conv1D) layer except the output layer / classification head."""
PEFT_PREFIX = "base_model.model."
"""Key prefix of the weights in a PEFT adapter file (what `PeftModel.save_pretrained` writes)."""


def _hf_model(model: nn.Module) -> PreTrainedModel:
    """The transformers model that carries the adapters: the model itself, or a ValueModel's `.model`."""
    return model.model if isinstance(model, ValueModel) else model


def _head_name(value_model: ValueModel) -> str | None:
    """Attribute name of the scalar head inside `value_model.model` (`score` for most architectures); None when the
    head lives beside a base model, out of PEFT's sight."""
    return next((name for name, child in value_model.model.named_children() if child is value_model.head), None)


def _lora_layers(model: nn.Module) -> list[BaseTunerLayer]:
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def is_lora(model: nn.Module) -> bool:
    """True when the model (or a ValueModel's backbone) carries LoRA adapters."""
    return bool(_lora_layers(model))


def _target_modules(names: list[str]) -> list[str] | str | None:
    """LoRAConfig.target_modules → PEFT's `target_modules`: None = PEFT's default for the architecture."""
    if not names:
        return None
    if ALL_LINEAR in names:
        if len(names) > 1:
            raise ValueError(f"lora.target_modules: '{ALL_LINEAR}' cannot be combined with other names, got {names}")
        return ALL_LINEAR
    return list(names)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Inject LoRA adapters into a causal LM or a ValueModel, in place, and freeze everything but the adapters
    (and a ValueModel's head). Returns the same model object; with `cfg.rank == 0` it is returned untouched.

    Adapter weights of a bfloat16/float16 model are kept in float32, as `peft.get_peft_model` does by default:
    the frozen base stays in low precision, the few trained numbers do not lose updates to rounding.
    """
    if cfg.rank == 0:
        return model
    hf_model = _hf_model(model)
    if is_lora(hf_model):
        raise ValueError(f"{type(hf_model).__name__} already has LoRA adapters; apply_lora was called twice")
    head = _head_name(model) if isinstance(model, ValueModel) else None
    task_type = "CAUSAL_LM" if not isinstance(model, ValueModel) else "SEQ_CLS" if head else "FEATURE_EXTRACTION"
    peft_config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=_target_modules(cfg.target_modules),
        # The value head is trained in full, never adapted (also under all-linear).
        exclude_modules=[head] if head else None,
        task_type=task_type,
    )
    # Freezes every non-adapter parameter (PEFT's `_mark_only_adapters_as_trainable`).
    inject_adapter_in_model(peft_config, hf_model, adapter_name=ADAPTER)
    cast_adapter_dtype(hf_model, adapter_name=ADAPTER, autocast_adapter_dtype=True)
    if not is_lora(hf_model):
        raise ValueError(f"lora.target_modules={cfg.target_modules}: no layer of {type(hf_model).__name__} matched")
    if isinstance(model, ValueModel):
        model.head.requires_grad_(True)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(
        f"lora: rank {cfg.rank}, alpha {cfg.alpha:g} on {len(_lora_layers(hf_model))} layers of "
        f"{type(hf_model).__name__}; trainable {trainable:,} / {total:,} parameters ({100 * trainable / total:.2f}%)"
    )
    return model


@contextmanager
def merged(model: nn.Module) -> Iterator[nn.Module]:
    """Fold the adapters into the base weights, W ← W + (α/r)·B·A, for the duration of the block (generation).

    On exit (also on an exception) the adapters are unmerged and the base weights are overwritten with a copy
    taken before merging: subtracting B·A again is not exact in floating point, and in bfloat16 the rounding
    error of every merge/unmerge cycle would accumulate in the frozen weights over a run. The copy is kept on
    the CPU. Inside the block the adapters are bypassed, so no gradient reaches them: generate only.
    A model without LoRA is yielded unchanged.
    """
    layers = _lora_layers(model)
    originals: list[tuple[nn.Parameter, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for layer in layers:
                for p in layer.get_base_layer().parameters():
                    if p.numel() == 0:
                        raise RuntimeError(
                            "merged(): a base weight is empty (sharded by DeepSpeed ZeRO-3?); gather the full "
                            "weights before merging"
                        )
                    originals.append((p, p.detach().to("cpu", copy=True)))
                layer.merge(adapter_names=[ADAPTER])
        yield model
    finally:
        with torch.no_grad():
            for layer in layers:
                if layer.merged:
                    layer.unmerge()
            for p, original in originals:
                p.copy_(original)


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` without its adapters for the duration of the block (PEFT's `enable_adapters(False)` on every
    LoRA layer, as `PeftModel.disable_adapter` does): every adapted layer computes W·x alone, which is the model
    the adapters started from, since the base weights never train (B = 0 at init). The adapters are enabled
    again on exit, also on an exception. For no-grad forwards only: PEFT turns the adapters' `requires_grad`
    off while they are disabled (and back on after)."""
    layers = _lora_layers(model)
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class AdapterFree:
    """A LoRA-adapted causal LM seen without its adapters: its starting weights, used as the frozen reference
    π_ref (RL) or DPO's reference instead of a second copy of the model, as TRL does with PEFT. Calling it
    runs the adapted model inside `adapters_disabled`; `config` is the model's. It holds no weights of its own, so
    nothing moves it between devices (`engine.offload_frozen` leaves it where the actor is)."""

    def __init__(self, model: nn.Module):
        if not is_lora(model):
            raise ValueError(f"{type(model).__name__} has no LoRA adapters to leave out")
        self.model = model

    @property
    def config(self):
        return self.model.config

    def __call__(self, *args, **kwargs):
        with torch.no_grad(), adapters_disabled(self.model):
            return self.model(*args, **kwargs)


@contextmanager
def _plain_modules(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily put each LoRA layer's base layer back in its place, so the model has exactly the module tree
    (and state-dict keys) of the plain model; the LoRA layers (and their parameter objects, which the optimizer
    holds) are restored on exit."""
    swapped = []
    try:
        for name, layer in list(model.named_modules()):
            if isinstance(layer, BaseTunerLayer):
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name)
                setattr(parent, child, layer.get_base_layer())
                swapped.append((parent, child, layer))
        yield model
    finally:
        for parent, child, layer in reversed(swapped):
            setattr(parent, child, layer)


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the plain model's names (no tensor is copied). For a LoRA model inside `merged`,
    these are the merged weights W + (α/r)·B·A, named as in the model without adapters: what a rollout engine that
    knows nothing of LoRA loads."""
    if not is_lora(model):
        return model.state_dict()
    with _plain_modules(model):
        return model.state_dict()


def _adapter_files(model: nn.Module) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The adapter config and weights as `PeftModel.save_pretrained` writes them (keys `base_model.model.*`); the
    head of a sequence-classification value model is among them (a backbone+head one saves it beside them)."""
    hf_model = _hf_model(model)
    config = copy.deepcopy(hf_model.peft_config[ADAPTER])
    config.base_model_name_or_path = hf_model.config.name_or_path
    config.inference_mode = True
    state = {PEFT_PREFIX + k: v for k, v in get_peft_model_state_dict(hf_model, adapter_name=ADAPTER).items()}
    if isinstance(model, ValueModel) and model.head_in_model:
        # PEFT stores a fully trained module (`modules_to_save`) under its plain name: base_model.model.score.weight.
        head = _head_name(model)
        config.modules_to_save = [head]
        state.update({f"{PEFT_PREFIX}{head}.{k}": v for k, v in model.head.state_dict().items()})
    return config, {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _save_adapter_dir(model: nn.Module, tok: PreTrainedTokenizerBase, out: Path) -> None:
    """Write adapter_config.json, adapter_model.safetensors and the tokenizer atomically, as `save_model_dir`
    writes a model: a temp dir beside `out`, fsync, then rename. A backbone+head value model's head goes beside
    them in VALUE_HEAD_FILE, as in its model directory."""
    config, state = _adapter_files(model)
    with atomic_dir(out) as tmp:
        config.save_pretrained(str(tmp))
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        if isinstance(model, ValueModel) and not model.head_in_model:
            head = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
            save_file(head, str(tmp / VALUE_HEAD_FILE), metadata={"format": "pt"})


def save_trained(model: nn.Module, tok: PreTrainedTokenizerBase, out_dir: Path, name: str = "model") -> None:
    """Save a trained causal LM or ValueModel under `out_dir`.

    Without LoRA: `out_dir/<name>/`, the full model. With LoRA, two directories, each written atomically:
      - `out_dir/<name>_adapter/`: the adapter (and a ValueModel's head) in PEFT's format, plus the tokenizer;
      - `out_dir/<name>/`: the merged weights W + (α/r)·B·A as a plain HF model directory (a ValueModel in its
        format, `save_value_model`).
    The live model keeps its unmerged adapters and its exact base weights.
    """
    hf_model = _hf_model(model)
    save = save_value_model if isinstance(model, ValueModel) else save_model_dir
    if not is_lora(hf_model):
        save(model, tok, out_dir / name)
        return
    _save_adapter_dir(model, tok, out_dir / f"{name}_adapter")
    with merged(hf_model), _plain_modules(hf_model):
        save(model, tok, out_dir / name)
