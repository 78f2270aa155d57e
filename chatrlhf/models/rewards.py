"""Sequence rewards: a learned reward model and/or Python reward functions, weighted and summed.

Three kinds of reward source, each with `score(batch) -> (B,) float tensor`:

- `PolicyVocabRewardModel`: a 1-label sequence-classification model that shares the policy's tokenizer (what
  `chatrlhf reward` trains); it scores the policy's own tokens at the last real response token. On a multi-turn
  episode that is the whole conversation as played (the environment's tokens included), scored at the episode's
  last real token; the only kind of reward model episodes take.
- `ForeignRewardModel`: any Hugging Face sequence-classification reward model with its own tokenizer (e.g. a
  DeBERTa or a Llama-based RM); prompt and response text are re-tokenized for it — with its chat template when it
  has one, else as a (prompt, response) text pair — and the model's own pooled logit is the score.
- `FunctionReward`: `module:function(prompt, response, **fields) -> float`, called on the prompt text, the decoded
  response and the RL record's extra fields (e.g. the demo judge `chatrlhf.demo.task:judge`); on a multi-turn
  episode, the response is the policy's last turn and `messages` (the whole conversation) joins the fields.
- `EnvironmentReward`: the return of each multi-turn episode, its environment's turn rewards summed
  (docs/episodes.md).

A reward model must hold a trained head: a causal LM given as one is refused (`load_value_model`). A Python function
that raises, or returns something other than a finite number, stops the run (`call_score`): its output is never
counted as a score. The evaluation's judge goes through the same `call_score`.

`Scorer` sums `weight × score` over the sources and keeps each part for logging.
"""

from __future__ import annotations

import importlib
import math
import numbers
import traceback
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

from chatrlhf.errors import UserError
from chatrlhf.models.load import (
    DTYPES,
    HEAD_ADVICE,
    ValueModel,
    load_tokenizer,
    load_value_model,
    loading,
    same_vocabulary,
)


@dataclass
class ScoringBatch:
    """What a reward source may look at, for B sampled responses."""

    sequences: torch.Tensor
    """(B, L) long — prompt + response in the policy's tokens (left-padded prompt, right-padded response)."""
    attention_mask: torch.Tensor
    """(B, L) long."""
    last_index: torch.Tensor
    """(B,) long — position in `sequences` of the last real response token."""
    prompts: list[str]
    """The prompt of each sample as the user wrote it (the last user turn for `messages` records)."""
    responses: list[str]
    """The decoded response, special tokens removed."""
    extras: list[dict] = field(default_factory=list)
    """The RL record's other fields, passed to reward functions."""
    episode_rewards: torch.Tensor | None = None
    """(B,) float — the environment's return of each episode (multi-turn episodes only)."""


class RewardSource(Protocol):
    name: str

    def score(self, batch: ScoringBatch) -> torch.Tensor: ...


class PolicyVocabRewardModel:
    def __init__(self, model: ValueModel, name: str = "reward_model"):
        self.model, self.name = model, name

    @torch.no_grad()
    def score(self, batch: ScoringBatch) -> torch.Tensor:
        return self.model.scores_at(batch.sequences, batch.attention_mask, batch.last_index)


class ForeignRewardModel:
    def __init__(self, model, tokenizer: PreTrainedTokenizerBase, max_length: int, name: str = "reward_model"):
        self.model, self.tok, self.max_length, self.name = model, tokenizer, max_length, name

    def _encode(self, prompts: list[str], responses: list[str]) -> dict:
        if self.tok.chat_template:
            texts = [
                self.tok.apply_chat_template(
                    [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
                )
                for p, r in zip(prompts, responses)
            ]
            return self.tok(texts, padding=True, add_special_tokens=False, return_tensors="pt")
        return self.tok(prompts, responses, padding=True, return_tensors="pt")

    @torch.no_grad()
    def score(self, batch: ScoringBatch) -> torch.Tensor:
        enc = self._encode(batch.prompts, batch.responses)
        too_long = int((enc["attention_mask"].sum(1) > self.max_length).sum())
        if too_long:
            raise UserError(
                f"{too_long} prompt+response pairs exceed the reward model's maximum length ({self.max_length} "
                "tokens); lower train.generation.max_new_tokens or train.max_prompt_len"
            )
        device = next(self.model.parameters()).device
        logits = self.model(**{k: v.to(device) for k, v in enc.items()}).logits
        return logits[:, 0].float().to(batch.sequences.device)


class FunctionReward:
    def __init__(self, fn: Callable[..., float], name: str, spec: str | None = None, role: str = "reward function"):
        self.fn, self.name = fn, name
        self.spec = spec or name
        """`module:function` as the user wrote it, for error messages (`name` is the metric key)."""
        self.role = role
        """What the function is to the run, in error messages: a reward function, or the evaluation's judge."""

    def score(self, batch: ScoringBatch) -> torch.Tensor:
        values = []
        for i, (p, r) in enumerate(zip(batch.prompts, batch.responses)):
            extra = batch.extras[i] if batch.extras else {}
            clash = {"prompt", "response"} & extra.keys()
            if clash:
                raise UserError(
                    f"{self.role} {self.name}: the record's field(s) {sorted(clash)} would shadow the "
                    "prompt/response arguments; rename them in the data"
                )
            values.append(call_score(self.fn, f"{self.role} '{self.spec}'", p, r, extra))
        return torch.tensor(values, dtype=torch.float32, device=batch.sequences.device)


class EnvironmentReward:
    """The environment's return of each episode: its turn rewards summed (envs/runner.py:Episode.reward)."""

    name = "env"

    def score(self, batch: ScoringBatch) -> torch.Tensor:
        if batch.episode_rewards is None:
            raise ValueError("EnvironmentReward scores episodes; this batch holds single responses")
        return batch.episode_rewards.to(batch.sequences.device)


def call_score(fn: Callable[..., object], what: str, prompt: str, response: str, extra: dict) -> float:
    """`fn(prompt, response, **extra)` as a float, for a reward function or a judge (`what` names it in messages).

    An exception in `fn` is the user's error, reported with its type, message and where it was raised, never
    counted as a score. The value must be a real number (bool, int, float, numpy scalar) or a one-element tensor:
    strings are refused even when they parse ("0.5" is a bug in the function), and a NaN or inf is a numerical
    failure (exit 3), as it is for every other tensor in a run."""
    try:
        value = fn(prompt, response, **extra)
    except Exception as e:
        raise UserError(f"{what} raised {_exception(e)} for prompt {_short(prompt)}") from None
    is_scalar_tensor = isinstance(value, torch.Tensor) and value.numel() == 1
    if not (isinstance(value, numbers.Real) or is_scalar_tensor):
        found = "None" if value is None else f"{type(value).__name__} {_short(value, 40)}"
        raise UserError(f"{what} returned {found} for prompt {_short(prompt)}; expected a number (float)")
    number = float(value)
    if not math.isfinite(number):
        raise FloatingPointError(f"{what} returned {number} for prompt {_short(prompt)}")
    return number


def _short(value: object, limit: int = 60) -> str:
    """repr(value) in about `limit` characters: a long string is cut (and ends in "..." inside its quotes)."""
    if isinstance(value, str):
        return repr(value if len(value) <= limit else value[: limit - 3] + "...")
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _exception(e: Exception) -> str:
    """`Type: message (at file:line)`, the line being the innermost frame of the traceback."""
    frames = traceback.extract_tb(e.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(e).__name__}: {e}{where}"


def load_function(spec: str, role: str = "reward function") -> Callable:
    """`package.module:function` → the function (`role` names it in messages: a reward function, a judge, ...)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise UserError(f"{role} '{spec}': expected module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"{role} '{spec}': cannot import: {e}") from None
    if not callable(fn):
        raise UserError(
            f"{role} '{spec}': '{name}' is not callable (found {type(fn).__name__}); expected a function "
            "f(prompt, response, **fields) -> float"
        )
    return fn


def load_reward_model(
    path: str,
    policy_tok: PreTrainedTokenizerBase,
    dtype: str,
    device: torch.device,
    episodes: bool = False,
    place: Place | None = None,
):
    """A reward model directory or hub id → the source that fits its tokenizer. On multi-turn `episodes` it must
    share the policy's: it scores the episode's tokens as played (the whole conversation, the end score at its last
    real token), never a re-rendered text. `place` readies the loaded model for scoring (the RL stage partitions it
    across the ranks under ZeRO-3); None keeps it as loaded."""
    place = place or _as_loaded
    rm_tok = load_tokenizer(path)
    if same_vocabulary(policy_tok, rm_tok):
        return PolicyVocabRewardModel(
            place(load_value_model(path, policy_tok, dtype, device).eval().requires_grad_(False))
        )
    if episodes:
        raise UserError(
            f"reward model '{path}' has a tokenizer other than the actor's: on episodes (env) the reward model scores "
            "the episode's tokens as played, so it must share the actor's tokenizer (a reward model trained with "
            "chatrlhf reward from the SFT model does)"
        )
    with loading(path, "as a reward model (a sequence-classification model)"):
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=DTYPES[dtype], output_loading_info=True
        )
    if info["missing_keys"]:
        missing = ", ".join(sorted(info["missing_keys"]))
        raise UserError(
            f"reward model '{path}' holds no trained score head ({missing} not in its checkpoint): it is not a "
            f"reward model, and its head would be random; {HEAD_ADVICE['reward model'].format(path=path)}"
        )
    if model.config.num_labels != 1:
        raise UserError(f"reward model '{path}' has {model.config.num_labels} labels; a reward model has one")
    if rm_tok.pad_token_id is not None:
        model.config.pad_token_id = rm_tok.pad_token_id
    max_length = min(rm_tok.model_max_length, getattr(model.config, "max_position_embeddings", 10**9))
    return ForeignRewardModel(place(model.to(device).eval().requires_grad_(False)), rm_tok, max_length)


Place = Callable[[torch.nn.Module], torch.nn.Module]
"""Readies a loaded, frozen reward model for scoring and returns what to call."""


def _as_loaded(model: torch.nn.Module) -> torch.nn.Module:
    return model


@dataclass
class Scores:
    total: torch.Tensor
    """(B,) Σ_k w_k · score_k."""
    parts: dict[str, torch.Tensor]
    """Each source's raw (B,) score, by name."""


class Scorer:
    """Weighted sum of reward sources."""

    def __init__(self, sources: list[RewardSource], weights: list[float]):
        if not sources:
            raise UserError("no reward source: give a reward model and/or reward functions")
        if len(weights) != len(sources):
            raise UserError(f"{len(weights)} reward weights for {len(sources)} reward sources")
        self.sources, self.weights = sources, weights

    def modules(self) -> list[torch.nn.Module]:
        """The reward models among the sources (to move between devices)."""
        return [s.model for s in self.sources if isinstance(getattr(s, "model", None), torch.nn.Module)]

    def __call__(self, batch: ScoringBatch) -> Scores:
        parts = {s.name: s.score(batch) for s in self.sources}
        total = sum(w * parts[s.name] for s, w in zip(self.sources, self.weights))
        return Scores(total=total, parts=parts)


def build_scorer(
    reward_model: str | None,
    reward_functions: list[str],
    weights: list[float] | None,
    policy_tok: PreTrainedTokenizerBase,
    dtype: str,
    device: torch.device,
    environment: bool = False,
    place: Place | None = None,
) -> Scorer:
    """Sources in a fixed order — the reward model (readied by `place`, see `load_reward_model`), the environment's
    episode return (`environment`), then the functions — with weights in that order (default 1 each)."""
    sources: list[RewardSource] = []
    if reward_model:
        sources.append(load_reward_model(reward_model, policy_tok, dtype, device, episodes=environment, place=place))
    if environment:
        sources.append(EnvironmentReward())
    for spec in reward_functions:
        sources.append(FunctionReward(load_function(spec), name=spec.rsplit(":", 1)[-1], spec=spec))
    return Scorer(sources, list(weights) if weights is not None else [1.0] * len(sources))


__all__ = [
    "EnvironmentReward",
    "ForeignRewardModel",
    "FunctionReward",
    "PolicyVocabRewardModel",
    "Scorer",
    "Scores",
    "ScoringBatch",
    "build_scorer",
    "load_function",
    "load_reward_model",
]
