"""Getting a loaded model ready to be trained: memory savers (gradient checkpointing), then LoRA adapters."""

from __future__ import annotations

from torch import nn

from chatrlhf.config import EngineConfig, LoRAConfig
from chatrlhf.models.load import ValueModel
from chatrlhf.models.lora import apply_lora


def prepare_for_training(model: nn.Module, engine: EngineConfig, lora: LoRAConfig) -> nn.Module:
    """Gradient checkpointing (`engine.gradient_checkpointing`), then LoRA (`lora.rank > 0`); returns the model."""
    if engine.gradient_checkpointing:
        hf = model.model if isinstance(model, ValueModel) else model
        kwargs = {"use_reentrant": False}
        if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.23 renamed it
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return apply_lora(model, lora)
