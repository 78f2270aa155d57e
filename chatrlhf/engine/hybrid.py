"""The hybrid engine: the actor is trained and also generates the rollouts.

Switching is explicit and scoped (docs/architecture.md):

    with actor.generation_mode():
        responses = actor.generate(prompt_ids, prompt_mask)

Inside the block the model is in eval mode with the KV cache on and autograd off; leaving it restores the
training state exactly (train/eval flags of every module, grad mode, the cache flag, the model's generation
config), also when generation raises.
Backend `hf` is Hugging Face `generate`. A LoRA actor generates on merged weights (unmerged again on leaving).
The weights to generate with come from the training engine (`TrainEngine.generation_weights`): under ZeRO-3 they
are gathered once per rollout batch into a whole copy (`engine.gather_for_generation`, the default); without it,
generation runs on the sharded model with `synced_gpus`, so a rank whose responses end early keeps joining the
other ranks' per-layer gathers instead of leaving them waiting forever.
"""

from __future__ import annotations

import copy
from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch
from transformers import GenerationConfig as HFGenerationConfig
from transformers import PreTrainedTokenizerBase

from chatrlhf.config import GenerationConfig
from chatrlhf.engine.base import TrainEngine
from chatrlhf.models.lora import is_lora, merged


def sampling_config(tokenizer: PreTrainedTokenizerBase, generation: GenerationConfig) -> HFGenerationConfig:
    """Hugging Face sampling settings built from ours alone. transformers fills every field a passed config leaves
    at its default from the model's `generation_config.json` (top_k=50, repetition_penalty, min_new_tokens, ...),
    so generation must also run with this object installed as the model's `generation_config`
    (`generation_mode` does that) — otherwise a checkpoint's settings would silently change the rollouts."""
    sampling = {"temperature": generation.temperature, "top_p": generation.top_p, "top_k": generation.top_k}
    if not generation.do_sample:
        sampling = {"temperature": None, "top_p": None, "top_k": None}
    return HFGenerationConfig(
        do_sample=generation.do_sample,
        **sampling,
        max_new_tokens=generation.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )


class HybridEngine:
    """Wraps the actor's training engine with a generation mode."""

    def __init__(
        self,
        engine: TrainEngine,
        tokenizer: PreTrainedTokenizerBase,
        generation: GenerationConfig,
    ):
        self.engine = engine
        self.model = engine.module
        self.tokenizer = tokenizer
        self.hf_generation = sampling_config(tokenizer, generation)
        self.synced_gpus = engine.sharded_generation
        self._generating = False
        self._generator = self.model

    @contextmanager
    def generation_mode(self) -> Iterator[HybridEngine]:
        model = self.model
        modes = {m: m.training for m in model.modules()}
        use_cache = model.config.use_cache
        generation_config = model.generation_config
        grad_enabled = torch.is_grad_enabled()
        model.eval()
        model.config.use_cache = True
        model.generation_config = self.hf_generation
        torch.set_grad_enabled(False)
        self._generating = True
        try:
            with ExitStack() as stack:
                if is_lora(model):
                    stack.enter_context(merged(model))
                self._generator = stack.enter_context(self.engine.generation_weights())
                yield self
        finally:
            self._generator = model
            self._generating = False
            torch.set_grad_enabled(grad_enabled)
            model.config.use_cache = use_cache
            model.generation_config = generation_config
            for m, training in modes.items():
                m.training = training

    def generate(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, greedy: bool = False, return_logprobs: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sample (or, with `greedy`, decode greedily) one response per left-padded prompt.

        prompt_ids, prompt_mask: (B, P) long — left-padded prompts.
        Returns:
            tokens: (B, R) long — the generated tokens (R ≤ max_new_tokens), padded after EOS.
            logprobs: (B, R) float or None — with `return_logprobs`, log-probability of each sampled token under
                the distribution the sampler actually drew from (after temperature/top-k/top-p), as the
                rollout engine computed it; for truncated importance sampling.
        """
        if not self._generating:
            raise RuntimeError("HybridEngine.generate() must be called inside `with engine.generation_mode():`")
        config = self.hf_generation
        if greedy:
            config = copy.deepcopy(config)
            config.do_sample, config.temperature, config.top_p, config.top_k = False, None, None, None
        out = self._generator.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            generation_config=config,
            return_dict_in_generate=True,
            output_scores=return_logprobs,
            synced_gpus=self.synced_gpus,
        )
        tokens = out.sequences[:, prompt_ids.shape[1] :]
        if not return_logprobs:
            return tokens, None
        scores = torch.stack(out.scores, dim=1).float()  # (B, R, V), processed by the sampler's warpers
        logprobs = torch.log_softmax(scores, dim=-1).gather(2, tokens.unsqueeze(2)).squeeze(2)
        return tokens, logprobs
