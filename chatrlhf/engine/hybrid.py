"""The hybrid engine: the actor is trained and also generates the rollouts.

Switching is explicit and scoped (docs/architecture.md):

    with actor.generation_mode():
        out = actor.generate(prompts)           # a `Generated` (engine/generation.py)

Inside the block the model is in eval mode with the KV cache on and autograd off; leaving it restores the
training state exactly (train/eval flags of every module, grad mode, the cache flag), also when generation raises.
The weights to generate with come from the training engine (`TrainEngine.generation_weights`): a LoRA actor's
adapters are merged first (unmerged, bit-exact, on leaving); under ZeRO-3 the weights are gathered once per rollout
batch into a whole copy (`engine.gather_for_generation`, the default), or generation runs on the sharded model with
`synced_gpus`, so a rank whose responses end early keeps joining the other ranks' per-layer gathers.

Backends (`rollout.backend`): `hf` generates with Hugging Face `generate` on those weights (`HFGenerator`); `vllm`
wakes the colocated vLLM engine, loads those weights into it in place and checks that they arrived
(engine/vllm.py), generates there, and puts it back to sleep on leaving.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch
from transformers import PreTrainedTokenizerBase

from chatrlhf.config import GenerationConfig
from chatrlhf.engine.base import TrainEngine
from chatrlhf.engine.generation import Generated, Generator, HFGenerator
from chatrlhf.models.lora import is_lora, merged, plain_state_dict


class HybridEngine:
    """The actor's training engine with a generation mode; `rollout_engine` is a vLLM engine, or None for `hf`."""

    def __init__(
        self,
        engine: TrainEngine,
        tokenizer: PreTrainedTokenizerBase,
        generation: GenerationConfig,
        rollout_engine=None,
    ):
        self.engine = engine
        self.model = engine.module
        self.tokenizer = tokenizer
        self.generation = generation
        self.rollout_engine = rollout_engine
        self._generator: Generator | None = None
        self.setup_s = 0.0
        """Seconds the last `generation_mode()` took to get ready: LoRA merge, ZeRO-3 gather, and for vLLM the
        wake-up and the weight sync (`time/sync_s`)."""

    @property
    def backend(self) -> str:
        return "hf" if self.rollout_engine is None else "vllm"

    @contextmanager
    def generation_mode(self) -> Iterator[HybridEngine]:
        model = self.model
        modes = {m: m.training for m in model.modules()}
        use_cache = model.config.use_cache
        grad_enabled = torch.is_grad_enabled()
        model.eval()
        model.config.use_cache = True
        torch.set_grad_enabled(False)
        started = time.perf_counter()
        try:
            with ExitStack() as stack:
                if is_lora(model):
                    stack.enter_context(merged(model))
                weights = stack.enter_context(self.engine.generation_weights())
                if self.rollout_engine is None:
                    self._generator = HFGenerator(
                        weights, self.tokenizer, self.generation, synced_gpus=self.engine.sharded_generation
                    )
                else:
                    stack.enter_context(self.rollout_engine.awake())
                    self.rollout_engine.sync(plain_state_dict(weights), reference=weights)
                    self._generator = self.rollout_engine
                self.setup_s = time.perf_counter() - started
                yield self
        finally:
            self._generator = None
            torch.set_grad_enabled(grad_enabled)
            model.config.use_cache = use_cache
            for m, training in modes.items():
                m.training = training

    def generate(
        self, prompts: list[list[int]], *, greedy: bool = False, logprobs: bool = False, width: int | None = None
    ) -> Generated:
        """One response per prompt with the rollout's sampling settings (`Generator.generate`)."""
        if self._generator is None:
            raise RuntimeError("HybridEngine.generate() must be called inside `with engine.generation_mode():`")
        return self._generator.generate(prompts, greedy=greedy, logprobs=logprobs, width=width)
