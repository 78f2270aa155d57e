"""The hybrid engine: the actor is trained and also generates the rollouts.

Switching is explicit and scoped (DESIGN.md):

    with actor.generation_mode():
        responses = actor.generate(prompt_ids, prompt_mask)

Inside the block the model is in eval mode with the KV cache on and autograd off; leaving it restores the
training state exactly (train/eval flags of every module, grad mode, the cache flag), also when generation raises.
Backend `hf` is Hugging Face `generate`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from transformers import GenerationConfig as HFGenerationConfig
from transformers import PreTrainedTokenizerBase

from chatrlhf.config import GenerationConfig
from chatrlhf.engine.single import TrainEngine


def sampling_config(tokenizer: PreTrainedTokenizerBase, generation: GenerationConfig) -> HFGenerationConfig:
    """Hugging Face sampling settings built from ours alone — not from the model's generation_config, so no
    hidden default (such as top_k=50) changes the sampling distribution behind the user's back."""
    return HFGenerationConfig(
        do_sample=True,
        temperature=generation.temperature,
        top_p=generation.top_p,
        top_k=generation.top_k,
        max_new_tokens=generation.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )


class HybridEngine:
    """Wraps the actor's `TrainEngine` with a generation mode."""

    def __init__(self, engine: TrainEngine, tokenizer: PreTrainedTokenizerBase, generation: GenerationConfig):
        self.engine = engine
        self.model = engine.model
        self.tokenizer = tokenizer
        self.hf_generation = sampling_config(tokenizer, generation)
        self._generating = False

    @contextmanager
    def generation_mode(self) -> Iterator[HybridEngine]:
        model = self.model
        modes = {m: m.training for m in model.modules()}
        use_cache = model.config.use_cache
        grad_enabled = torch.is_grad_enabled()
        model.eval()
        model.config.use_cache = True
        torch.set_grad_enabled(False)
        self._generating = True
        try:
            yield self
        finally:
            self._generating = False
            torch.set_grad_enabled(grad_enabled)
            model.config.use_cache = use_cache
            for m, training in modes.items():
                m.training = training

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """Sample one response per left-padded prompt.

        prompt_ids, prompt_mask: (B, P) long — left-padded prompts.
        Returns (B, R) long: the generated tokens (R ≤ max_new_tokens), padded after EOS.
        """
        if not self._generating:
            raise RuntimeError("HybridEngine.generate() must be called inside `with engine.generation_mode():`")
        out = self.model.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=self.hf_generation
        )
        return out[:, prompt_ids.shape[1] :]
