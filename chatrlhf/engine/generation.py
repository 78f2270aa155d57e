"""The one generation interface: "generate responses to these prompts with these sampling settings".

Everything that generates goes through a `Generator`: RL rollouts, ReMax's greedy baseline, the held-out score, the
evaluation (`chatrlhf eval` and the pipeline's SFT-vs-RLHF comparison), `chatrlhf chat` and `chatrlhf serve`. Two
backends implement it with the same sampling semantics:

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

A generator does two kinds of work:

- `generate(prompts)`: tensors for training — every prompt sampled with the generator's one `GenerationConfig`;
- `complete(requests, on_update)`: text for people — each request with its own `Sampling` (temperature, top-p,
  top-k, max_new_tokens, stop strings, seed), the new text of each request handed to `on_update` as it is produced
  (streaming), and a `Completion` (tokens, text, finish reason) per request. Semantics, both backends: temperature 0
  decodes greedily (the same tokens as `generate(greedy=True)`); temperature, then top-k, then top-p act on the
  logits as transformers' warpers do; a seeded request gives the same response every time; the response ends at
  EOS (finish reason `stop`), at the first stop string (`stop`; the text ends before it, the tokens end with the one
  that completed it) or after max_new_tokens (`length`). The text is the decoded response without special tokens;
  `TextStream` (one copy for both backends) holds back text that may still turn out to start a stop string, or an
  unfinished UTF-8 character, until it is decided, so streamed pieces always add up to the final text.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import GenerationConfig as HFGenerationConfig
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

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
    entropy: torch.Tensor | None = None
    """(B, R) float — entropy (nats) of the raw distribution each token was drawn from (0 outside the mask), with
    the log-probs, when the backend gives it (hf)."""


@dataclass(frozen=True)
class Sampling:
    """The sampling settings of one request to `Generator.complete` (the OpenAI API's names in brackets)."""

    max_new_tokens: int = 256
    """Most tokens to generate [max_tokens]."""
    temperature: float = 1.0
    """Softmax temperature; 0 decodes greedily."""
    top_p: float = 1.0
    """Nucleus sampling: keep the most likely tokens whose probability reaches top_p; 1 = off."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 = off."""
    stop: tuple[str, ...] = ()
    """The response ends before the first of these strings, which is not part of its text."""
    seed: int | None = None
    """The same request with the same seed gives the same response; None draws a seed from torch's RNG."""

    @classmethod
    def of(cls, generation: GenerationConfig) -> Sampling:
        """The settings a `GenerationConfig` names (greedy when it does not sample)."""
        return cls(
            max_new_tokens=generation.max_new_tokens,
            temperature=generation.temperature if generation.do_sample else 0.0,
            top_p=generation.top_p,
            top_k=generation.top_k,
        )


@dataclass
class Request:
    """One prompt to complete and how."""

    prompt: list[int]
    """Token ids of the rendered prompt (no padding)."""
    sampling: Sampling
    """Its sampling settings."""


@dataclass
class Completion:
    """The response to one `Request`."""

    tokens: list[int]
    """The generated token ids: up to and including EOS, or the token that completed a stop string."""
    text: str
    """The decoded response (special tokens skipped), ending before the first stop string."""
    finish_reason: str
    """`stop` (EOS or a stop string) or `length` (max_new_tokens reached)."""


OnUpdate = Callable[[int, str, "Completion | None"], None]
"""`on_update(i, text, done)`: request i produced the new `text` (may be empty); `done` is its `Completion` once it
has finished (the call that hands it over is the request's last)."""


class Generator(Protocol):
    """A backend that generates responses: with fixed sampling settings (`generate`) or per request (`complete`)."""

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

    def complete(self, requests: Sequence[Request], on_update: OnUpdate | None = None) -> list[Completion]:
        """One completion per request, all generated together (one batch), each with its own settings; the new text
        of each request goes to `on_update` as it is generated."""


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


# ------------------------------------------------------------------------------------ text of a response, stop strings


def stop_index(text: str, stop: Sequence[str]) -> int | None:
    """Where the earliest of the `stop` strings begins in `text`, or None."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stop: Sequence[str]) -> int:
    """How many characters at the end of `text` are not decided yet: the longest end of `text` that begins one of
    the `stop` strings (a later token may complete it), or a run of U+FFFD (a byte-level tokenizer's unfinished
    UTF-8 character, which the next token may complete)."""
    longest = max((len(s) for s in stop), default=0)
    ends = range(min(longest - 1, len(text)), 0, -1)
    partial = next((n for n in ends if any(s.startswith(text[-n:]) for s in stop)), 0)
    unfinished = len(text) - len(text.rstrip("\ufffd"))
    return max(partial, unfinished)


class TextStream:
    """One response's text while its tokens arrive: decoded with special tokens skipped and cut before the first
    stop string. `add` returns only text that no later token can change (see `held_back`); `finish` the rest.
    The pieces add up to `text`, the completion's text."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.tokens: list[int] = []
        self.text = ""
        """The text handed out so far."""
        self.stopped = False
        """A stop string ended the response; later tokens are not taken."""

    def add(self, tokens: Sequence[int]) -> str:
        """Take the next generated tokens (one at a time: those after the token completing a stop string are left
        out) and return the new decided text."""
        new = ""
        for t in tokens:
            if self.stopped:
                break
            self.tokens.append(int(t))
            new += self._advance(final=False)
        return new

    def finish(self) -> str:
        """The response has ended: the text still held back."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        full = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = stop_index(full, self.stop)
        if cut is not None:
            self.stopped, full = True, full[:cut]
        elif not final:
            full = full[: len(full) - held_back(full, self.stop)]
        # a tokenizer whose decoding of a longer prefix rewrites earlier text (rare) cannot take back what was sent
        if len(full) <= len(self.text) or not full.startswith(self.text):
            return ""
        new, self.text = full[len(self.text) :], full
        return new

    def completion(self, finish_reason: str) -> Completion:
        return Completion(list(self.tokens), self.text, finish_reason)


# ------------------------------------------------------------------------------------ per-row sampling (hf backend)


def warp_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor):
    """Each row's temperature, then top-k, then top-p, as transformers' TemperatureLogitsWarper, TopKLogitsWarper
    and TopPLogitsWarper apply them (and vLLM's sampler): logits / T; −inf outside the k largest; −inf outside the
    most likely tokens whose probability (after top-k) reaches top_p — token j is kept when the tokens more likely
    than it hold less than top_p — so the most likely token is always kept.

    logits: (B, V) float; temperature: (B,) float > 0; top_k: (B,) long, 0 = off; top_p: (B,) float in (0, 1].
    Returns (B, V) float."""
    vocab = logits.shape[1]
    scaled = logits / temperature[:, None]
    ordered, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)[None]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    ordered = ordered.masked_fill(rank >= k, -torch.inf)
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the tokens more likely than each
    outside = (before >= top_p[:, None]) & (rank > 0) & (top_p < 1)[:, None]  # top_p 1 is off, whatever the rounding
    ordered = ordered.masked_fill(outside, -torch.inf)
    return torch.full_like(scaled, -torch.inf).scatter(1, order, ordered)


def draw_tokens(warped: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """(B,) long: token i of each row by inverse-CDF sampling, the first token whose cumulative probability exceeds
    u·(total); `uniforms` (B,) in [0, 1) each come from the row's own generator, so a row's draw does not depend on
    the other rows of its batch."""
    cdf = warped.softmax(dim=-1).cumsum(dim=-1)
    target = (uniforms.to(cdf) * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=warped.shape[1] - 1)


class _RowSampler(LogitsProcessor):
    """Samples each row with its own settings and seeded generator, and hands transformers logits that are −inf
    everywhere but the chosen token, so that `generate` (run greedily) takes it. Greedy rows take the argmax of the
    raw logits, as `generate(greedy=True)` does."""

    def __init__(self, sampling: list[Sampling], seeds: list[int], device: torch.device):
        self.greedy = torch.tensor([s.temperature == 0 for s in sampling], device=device)
        self.temperature = torch.tensor([s.temperature or 1.0 for s in sampling], device=device)
        self.top_k = torch.tensor([s.top_k for s in sampling], device=device)
        self.top_p = torch.tensor([s.top_p for s in sampling], device=device)
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        uniforms = torch.stack([torch.rand((), generator=g) for g in self.generators])
        drawn = draw_tokens(warp_logits(scores, self.temperature, self.top_k, self.top_p), uniforms)
        chosen = torch.where(self.greedy, scores.argmax(dim=-1), drawn)
        return torch.full_like(scores, -torch.inf).scatter(1, chosen[:, None], 0.0)


class _RowWatch(StoppingCriteria):
    """After every step: each unfinished row's new token goes to its `TextStream`; a row ends at EOS, a stop string
    or its own max_new_tokens. `on_update` hears of every new piece of text and of every finished row."""

    def __init__(self, streams: list[TextStream], sampling: list[Sampling], eos_id: int, on_update: OnUpdate | None):
        self.streams, self.sampling, self.eos_id, self.on_update = streams, sampling, eos_id, on_update
        self.done: list[Completion | None] = [None] * len(streams)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        for i, token in enumerate(input_ids[:, -1].tolist()):
            if self.done[i] is None:
                stream = self.streams[i]
                text = stream.add([token])
                if token == self.eos_id or stream.stopped:
                    self.finish(i, text, "stop")
                elif len(stream.tokens) >= self.sampling[i].max_new_tokens:
                    self.finish(i, text, "length")
                elif text and self.on_update is not None:
                    self.on_update(i, text, None)
        return torch.tensor([d is not None for d in self.done], device=input_ids.device)

    def finish(self, i: int, text: str, reason: str) -> None:
        stream = self.streams[i]
        text += stream.finish()
        self.done[i] = stream.completion(reason)
        if self.on_update is not None:
            self.on_update(i, text, self.done[i])


def request_seeds(requests: Sequence[Request]) -> list[int]:
    """Each request's seed; a request without one gets a seed drawn from torch's RNG."""
    return [r.sampling.seed if r.sampling.seed is not None else int(torch.randint(2**31 - 1, ())) for r in requests]


class _SampledLogprobs(StoppingCriteria):
    """Records, at every decoding step, the raw log-prob of the token just drawn and the entropy of the raw
    distribution it was drawn from (the trainer's definitions: the log-softmax of the model's logits, before
    temperature and top-k/top-p). A forward hook on the model keeps the last position's logits of each forward;
    `generate` calls this criterion after it appends the drawn token, and it reads that token's log-prob. Only one
    step's (B, V) logits are ever held, where `output_logits` would keep (B, R, V). Never stops a row.

    With `synced_gpus`, a rank whose rows have all ended keeps running forwards without drawing tokens; those
    forwards overwrite the kept logits but are never read, since `generate` calls no criterion for them."""

    def __init__(self, model):
        self.logits: torch.Tensor | None = None
        self.logprobs: list[torch.Tensor] = []
        self.entropy: list[torch.Tensor] = []
        self.hook = model.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self.logits = output.logits[:, -1]

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        logp = torch.log_softmax(self.logits.float(), dim=-1)
        self.logprobs.append(logp.gather(1, input_ids[:, -1:].to(logp.device)).squeeze(1))
        self.entropy.append(-(logp.exp() * logp).sum(-1))  # H = −Σ p log p, from the same log-softmax
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def tensors(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, width) log-probs and entropies of the first `width` drawn tokens."""
        return torch.stack(self.logprobs[:width], dim=1), torch.stack(self.entropy[:width], dim=1)


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
        recorder = _SampledLogprobs(self.model) if logprobs else None
        try:
            with _generating(self.model, config):
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=attn,
                    generation_config=config,
                    return_dict_in_generate=True,
                    stopping_criteria=StoppingCriteriaList([recorder] if recorder else []),
                    synced_gpus=self.synced_gpus,
                )
        finally:
            if recorder is not None:
                recorder.hook.remove()
        tokens, mask = truncate_after_eos(out.sequences[:, ids.shape[1] :], tok.eos_token_id, tok.pad_token_id)
        sampled = entropy = None
        if recorder is not None:
            sampled, entropy = (t.to(mask.device) * mask for t in recorder.tensors(tokens.shape[1]))
        return Generated(tokens, mask, sampled, finished(tokens, mask, tok.eos_token_id), entropy)

    def complete(self, requests: Sequence[Request], on_update: OnUpdate | None = None) -> list[Completion]:
        """One `generate` call for the whole batch: `_RowSampler` samples each row with its own settings and
        generator, `_RowWatch` streams and ends each row; the call runs until the longest max_new_tokens or until
        every row has ended."""
        tok = self.tokenizer
        device = next(self.model.parameters()).device
        sampling = [r.sampling for r in requests]
        ids, attn = (x.to(device) for x in pad([r.prompt for r in requests], tok.pad_token_id, left=True))
        watch = _RowWatch([TextStream(tok, s.stop) for s in sampling], sampling, tok.eos_token_id, on_update)
        config = HFGenerationConfig(
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            max_new_tokens=max(s.max_new_tokens for s in sampling),
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            use_cache=True,
        )
        with _generating(self.model, config):
            self.model.generate(
                input_ids=ids,
                attention_mask=attn,
                generation_config=config,
                logits_processor=LogitsProcessorList([_RowSampler(sampling, request_seeds(requests), device)]),
                stopping_criteria=StoppingCriteriaList([watch]),
            )
        for i, done in enumerate(watch.done):
            if done is None:  # only if generate stopped on its own before a row's max_new_tokens
                watch.finish(i, "", "length")
        return list(watch.done)


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
