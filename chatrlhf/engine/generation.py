"""The one generation interface: "generate responses to these prompts with these sampling settings".

Everything that generates goes through a `Generator`: RL rollouts, ReMax's greedy baseline, the held-out score, the
pipeline's SFT-vs-RLHF evaluation. Two backends implement it with the same sampling semantics:

- `hf` — Hugging Face `generate` on a model in this process (`HFGenerator`);
- `vllm` — a vLLM engine colocated with training (`engine/vllm.py:VLLMGenerator`).

Semantics, both backends: temperature, top-p and top-k as in `GenerationConfig` (top_k 0 = off), or greedy
decoding; at most `max_new_tokens` tokens; a response ends at its first EOS, which is kept, and everything after it
is padding outside the response mask. Only our settings apply: a checkpoint's own `generation_config.json`
(repetition penalty, a default top_k, extra EOS ids) never changes the rollouts.

The log-probs a generator returns are log π(a_t | s_t) of each sampled token under the engine's *raw* distribution
— the log-softmax of the logits at temperature 1, before top-k/top-p — which is the trainer's definition
(`train/forward.py:response_logprobs`). Their difference from the trainer's is then the engine mismatch alone
(`rollout/logprob_diff`: stale weights, kernels, KV-cache numerics), at any sampling temperature.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import GenerationConfig as HFGenerationConfig
from transformers import PreTrainedTokenizerBase

from chatrlhf.config import GenerationConfig
from chatrlhf.data.collate import pad
from chatrlhf.rlhf import truncate_after_eos


@dataclass
class Generated:
    """Responses to B prompts; R = the longest response."""

    tokens: torch.Tensor
    """(B, R) long — response tokens; pad after the first EOS."""
    mask: torch.Tensor
    """(B, R) float — 1 up to and including the first EOS (all 1 for a response cut at max_new_tokens)."""
    logprobs: torch.Tensor | None
    """(B, R) float — raw log-prob of each sampled token (0 outside the mask), when asked for."""
    finish_reasons: list[str]
    """Per response: `stop` (it ended with EOS) or `length` (cut at max_new_tokens)."""


class Generator(Protocol):
    """A backend that generates responses with fixed sampling settings."""

    def generate(
        self,
        prompts: list[list[int]],
        *,
        greedy: bool = False,
        logprobs: bool = False,
        width: int | None = None,
    ) -> Generated:
        """One response per prompt (token ids, no padding). `greedy` decodes greedily whatever the settings;
        `logprobs` also returns the raw log-probs of the sampled tokens; `width` (hf) left-pads the prompts to
        this width instead of the batch's longest, so that every rank's shard runs the same shapes."""


def finished(tokens: torch.Tensor, mask: torch.Tensor, eos_id: int) -> list[str]:
    """`stop` where the response's last real token is EOS, else `length`."""
    last = (mask.sum(1).long() - 1).clamp(min=0)
    ends = tokens.gather(1, last.unsqueeze(1)).squeeze(1)
    return ["stop" if int(t) == eos_id else "length" for t in ends]


def sampling_config(
    tokenizer: PreTrainedTokenizerBase, generation: GenerationConfig, greedy: bool = False
) -> HFGenerationConfig:
    """Hugging Face sampling settings built from ours alone. transformers fills every field a passed config leaves
    at its default from the model's `generation_config.json` (top_k=50, repetition_penalty, min_new_tokens, ...),
    so generation must also run with this object installed as the model's `generation_config` (`HFGenerator`
    does that) — otherwise a checkpoint's settings would silently change the rollouts."""
    sample = generation.do_sample and not greedy
    sampling = {"temperature": generation.temperature, "top_p": generation.top_p, "top_k": generation.top_k}
    if not sample:
        sampling = {"temperature": None, "top_p": None, "top_k": None}
    return HFGenerationConfig(
        do_sample=sample,
        **sampling,
        max_new_tokens=generation.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )


class HFGenerator:
    """Hugging Face `generate` on `model`. Each call runs in a scoped state — eval mode, KV cache on, autograd
    off, our sampling settings installed as the model's generation config — and restores the model's own state
    exactly afterwards (train/eval flags of every module, grad mode, the cache flag, the generation config), also
    when generation raises. `synced_gpus` is for a ZeRO-3 model generating sharded."""

    def __init__(
        self, model, tokenizer: PreTrainedTokenizerBase, generation: GenerationConfig, synced_gpus: bool = False
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = sampling_config(tokenizer, generation)
        self.greedy_sampling = sampling_config(tokenizer, generation, greedy=True)
        self.synced_gpus = synced_gpus

    def generate(
        self, prompts: list[list[int]], *, greedy: bool = False, logprobs: bool = False, width: int | None = None
    ) -> Generated:
        tok = self.tokenizer
        device = next(self.model.parameters()).device
        ids, attn = (x.to(device) for x in pad(prompts, tok.pad_token_id, left=True, width=width))
        config = self.greedy_sampling if greedy else self.sampling
        with _generating(self.model, config):
            out = self.model.generate(
                input_ids=ids,
                attention_mask=attn,
                generation_config=config,
                return_dict_in_generate=True,
                output_logits=logprobs,
                synced_gpus=self.synced_gpus,
            )
        tokens, mask = truncate_after_eos(out.sequences[:, ids.shape[1] :], tok.eos_token_id, tok.pad_token_id)
        sampled = None
        if logprobs:
            logits = torch.stack(out.logits, dim=1).float()  # (B, R, V), raw: before temperature/top-k/top-p
            sampled = torch.log_softmax(logits, dim=-1).gather(2, tokens.unsqueeze(2)).squeeze(2) * mask
        return Generated(tokens, mask, sampled, finished(tokens, mask, tok.eos_token_id))


class _generating:
    """The scoped generation state of `HFGenerator`."""

    def __init__(self, model, config: HFGenerationConfig):
        self.model, self.config = model, config

    def __enter__(self) -> None:
        model = self.model
        self.modes = {m: m.training for m in model.modules()}
        self.use_cache = model.config.use_cache
        self.generation_config = model.generation_config
        self.grad_enabled = torch.is_grad_enabled()
        model.eval()
        model.config.use_cache = True
        model.generation_config = copy.copy(self.config)
        torch.set_grad_enabled(False)

    def __exit__(self, *exc) -> None:
        model = self.model
        torch.set_grad_enabled(self.grad_enabled)
        model.config.use_cache = self.use_cache
        model.generation_config = self.generation_config
        for m, training in self.modes.items():
            m.training = training
