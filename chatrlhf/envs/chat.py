"""`chatrlhf/Chat-v0`: answering a prompt as a Gymnasium environment, scored by chatrlhf's reward sources.

An episode is one prompt and one answer. `reset()` draws a prompt (with `self.np_random`, so a seed fixes the
sequence of prompts) and renders it with the tokenizer's chat template, as the RL stage does. The agent then
writes the assistant's answer:

- `action_mode="token"`: one token id per step, `Discrete(vocab)`. The episode terminates when the agent emits
  the tokenizer's EOS, or is truncated after `max_new_tokens` tokens. The reward is 0 until the last step.
- `action_mode="response"`: the whole answer as text in one step, `Text` (escaped, see below). It is encoded as
  the chat template's assistant turn ending with EOS — the same tokens an agent would type in token mode — and
  terminates; an answer longer than `max_new_tokens` tokens is cut there and the step reports truncated instead.

At the end of an episode the reward is the `Scorer`'s Σ_k w_k·score_k of (prompt, response): a reward model
scores the policy tokens (prompt + response) at the last response token, reward functions get the prompt as the
user wrote it, the decoded response (special tokens removed, surrounding whitespace stripped) and the record's
extra fields. `info["reward_parts"]` holds each source's unweighted score by name, `info["response"]` the text.

Observation, a `Dict` of fixed shape (W = max_prompt_tokens + max_new_tokens):

- `token_ids`: (W,) int64, the conversation so far (rendered prompt + response), right-padded with the pad id;
- `prompt_length`: number of prompt tokens at the front of `token_ids` (the response starts there);
- `length`: number of real tokens in `token_ids`;
- `text`: those tokens decoded (special tokens kept), escaped with `escape_text`.

**Multi-turn episodes** (`env="module:Class"`, docs/episodes.md): the same environments RL plays, seen through
Gymnasium. `reset()` draws a record and starts the environment's episode (its first messages, and its tools'
description where it gives one); the agent writes one policy turn at a time — token by token, or as text in one
step — and each finished turn is answered as in RL (envs/runner.py: a tool call by the tools, any other turn by the
environment's `step`), its reply appended as tokens. A step that finishes a turn returns that turn's reward (the
environment's); the episode terminates when the environment says it is done, and is truncated at `max_turns`, at
a turn cut at `max_new_tokens`, or when the next messages would pass `max_prompt_tokens` (the most an episode may
hold before a policy turn). `prompt_length` is then the length of the conversation before the current turn, and
`info` at the end of a turn holds `messages` (the conversation so far), `end` (why it ended, or None),
`turn_reward`, `tool_calls` and `tool_errors`. The rewards are the environment's alone: reward functions and a
reward model are refused with `env`.

Text in the spaces is escaped because a Gymnasium `Text` space needs a finite charset, while a tokenizer can
decode to any Unicode character (and a byte-level tokenizer to U+FFFD for bytes that are not valid UTF-8).
`escape_text` keeps printable ASCII, newline and tab, doubles backslashes and writes every other character as
`\\xHH`, `\\uHHHH` or `\\UHHHHHHHH`: lossless, `unescape_text` inverts it, and plain ASCII answers need no change.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from transformers import PreTrainedTokenizerBase

from chatrlhf.data import RawRecord, load_source, resolve_generated, to_prompt, validate_all
from chatrlhf.data.collate import encode_prompt, render_prompt, response_ids
from chatrlhf.envs.episode import load_environment
from chatrlhf.envs.runner import EpisodeLimits, EpisodeRunner
from chatrlhf.errors import ConfigError, UserError
from chatrlhf.models.load import load_tokenizer, pick_device, resolve_model
from chatrlhf.models.rewards import ScoringBatch, build_scorer

ACTION_MODES = ("token", "response")

ESCAPED_CHARSET = "".join(chr(c) for c in range(0x20, 0x7F)) + "\n\t"
"""Characters of escaped text: printable ASCII, newline and tab."""

_KEPT = frozenset(ESCAPED_CHARSET) - {"\\"}
_ESCAPE = re.compile(r"\\(\\|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8})")

# Escaped text is at most 4 characters per UTF-8 byte of the raw text: a control byte becomes "\xHH" (4), a
# backslash "\\" (2), a 2-byte character at most "\uHHHH" (6), a 3-byte one "\uHHHH" (6), a 4-byte one
# "\UHHHHHHHH" (10).
_ESCAPED_CHARS_PER_BYTE = 4


def escape_text(text: str) -> str:
    """`text` in ESCAPED_CHARSET: printable ASCII, newline and tab kept, backslash doubled, any other character
    written as \\xHH, \\uHHHH or \\UHHHHHHHH. `unescape_text` inverts it."""
    out = []
    for ch in text:
        if ch in _KEPT:
            out.append(ch)
        elif ch == "\\":
            out.append("\\\\")
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def _unescape_one(m: re.Match) -> str:
    body = m.group(1)
    if body == "\\":
        return "\\"
    code = int(body[1:], 16)
    if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
        return m.group(0)  # not a Unicode scalar value, so escape_text never wrote it: the text stands as is
    return chr(code)


def unescape_text(text: str) -> str:
    """Inverse of `escape_text`. A backslash that starts no escape escape_text writes stands for itself."""
    return _ESCAPE.sub(_unescape_one, text)


@dataclass(frozen=True)
class EncodedPrompt:
    """One prompt, validated and rendered once when the environment is built."""

    ids: tuple[int, ...]
    """The rendered prompt's token ids (what the model sees before it answers)."""
    text: str
    """The prompt as the user wrote it (the last user turn of a conversation): reward functions' `prompt`."""
    rendered: str
    """The chat-template text of the prompt, ending with the generation prompt."""
    context: tuple[dict, ...]
    """The conversation before the answer, to render a text answer as the template's assistant turn."""
    extra: dict
    """The record's other fields, passed to reward functions."""


def load_prompts(
    prompts: str | Sequence[str] | Sequence[dict], tok: PreTrainedTokenizerBase, max_prompt_tokens: int, data_dir: Path
) -> list[EncodedPrompt]:
    """A data source (anything `load_source` reads, or a `demo:prompts:N:SEED` source) or in-memory prompts
    (strings, or records as in an RL data file) → validated, rendered and tokenized prompts."""
    if isinstance(prompts, (str, Path)):
        raws = load_source(resolve_generated(str(prompts), data_dir))
    elif isinstance(prompts, dict):
        raise UserError("prompts: expected a data source path or a list of prompts, found one record (dict)")
    else:
        raws = []
        for i, item in enumerate(prompts):
            if isinstance(item, str):
                item = {"prompt": item}
            if not isinstance(item, dict):
                raise UserError(f"prompts[{i}]: expected a string or a record (dict), found {type(item).__name__}")
            raws.append(RawRecord(dict(item), "prompts", f"item {i + 1}"))
        if not raws:
            raise UserError("prompts: the list is empty")
    records, _ = validate_all(raws, to_prompt)
    out = []
    for rec in records:
        context = tuple(rec.messages) if rec.messages is not None else ({"role": "user", "content": rec.prompt},)
        out.append(
            EncodedPrompt(
                ids=tuple(encode_prompt(tok, rec, max_prompt_tokens)),
                text=rec.prompt if rec.prompt is not None else rec.messages[-1]["content"],
                rendered=render_prompt(tok, rec.prompt, rec.messages),
                context=context,
                extra=dict(rec.extra),
            )
        )
    return out


def max_token_bytes(tok: PreTrainedTokenizerBase) -> int:
    """The most UTF-8 bytes any single token decodes to (special tokens included)."""
    pieces = tok.batch_decode(
        [[i] for i in range(len(tok))], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    return max(len(p.encode("utf-8")) for p in pieces)


class ChatEnv(gym.Env):
    """Chat as an RL environment: the agent answers prompts, chatrlhf's reward sources score the answer.

    Args:
        tokenizer: a model directory, hub id or `tiny:` spec whose tokenizer (and chat template) is used.
        prompts: a data source path (.jsonl/.json/.parquet/.csv, a `datasets` directory, `demo:prompts:N:SEED`),
            or a list of prompt strings or RL records (`{"prompt": ...}` or `{"messages": [...]}`; other fields
            are passed to reward functions).
        reward_functions: `module:function` specs, called as `function(prompt, response, **extra_fields)`.
        reward_model: a reward model directory or hub id (a 1-label sequence-classification model).
        reward_weights: w_k per source, the reward model first, then the functions (default 1 each).
        action_mode: "token" (one token id per step) or "response" (the whole answer as text in one step).
        max_new_tokens: the longest response in tokens; a token-mode episode is truncated there.
        max_prompt_tokens: the longest rendered prompt in tokens; a longer prompt is an error when loading.
        device: where the reward model runs ("cpu", "cuda", "auto").
        render_mode: None or "ansi" (`render()` returns the conversation text).
        env: an environment `module:Class` (docs/episodes.md): multi-turn episodes rewarded by it (see the module
            docstring); `max_new_tokens` then bounds each policy turn and `max_prompt_tokens` the conversation
            before one.
        max_turns, max_tool_calls, tool_timeout_s: the episode's bounds with `env` (as `train.episode.*` in RL).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}  # gymnasium asks for an fps; text has no frame rate

    def __init__(
        self,
        tokenizer: str,
        prompts: str | Sequence[str] | Sequence[dict],
        reward_functions: Sequence[str] = (),
        reward_model: str | None = None,
        reward_weights: Sequence[float] | None = None,
        action_mode: str = "token",
        max_new_tokens: int = 64,
        max_prompt_tokens: int = 256,
        device: str = "cpu",
        render_mode: str | None = None,
        env: str | None = None,
        max_turns: int = 4,
        max_tool_calls: int = 4,
        tool_timeout_s: float = 10.0,
    ):
        _check_arguments(
            reward_functions, reward_model, action_mode, max_new_tokens, max_prompt_tokens, render_mode, env
        )
        self.action_mode, self.render_mode = action_mode, render_mode
        self.max_new_tokens, self.max_prompt_tokens = max_new_tokens, max_prompt_tokens
        self.device = pick_device(device)
        with tempfile.TemporaryDirectory(prefix="chatrlhf-env-") as tmp:
            tmp = Path(tmp)  # tiny models and demo data are built here, loaded into memory, then removed
            self.tok = load_tokenizer(resolve_model(tokenizer, tmp / "tokenizer"))
            self.prompts = load_prompts(prompts, self.tok, max_prompt_tokens, tmp / "data")
            rm_path = resolve_model(reward_model, tmp / "reward_model") if reward_model else None
            self.scorer = (
                None
                if env
                else build_scorer(
                    reward_model=rm_path,
                    reward_functions=list(reward_functions),
                    weights=reward_weights,
                    policy_tok=self.tok,
                    dtype="float32",
                    device=self.device,
                )
            )

        self.runner = None
        if env:
            limits = EpisodeLimits(
                max_turns, max_tool_calls, tool_timeout_s, max_prompt_tokens, max_new_tokens, options=""
            )
            self.runner = EpisodeRunner(load_environment(env), self.tok, limits)
        vocab, width = len(self.tok), max_prompt_tokens + max_new_tokens
        self._width = width
        # An upper bound on the escaped text of `width` tokens (see _ESCAPED_CHARS_PER_BYTE); +1 byte per token
        # allows for a separator some decoders put between tokens.
        self._max_text = _ESCAPED_CHARS_PER_BYTE * width * (max_token_bytes(self.tok) + 1)
        self.observation_space = spaces.Dict(
            {
                "token_ids": spaces.Box(low=0, high=vocab - 1, shape=(width,), dtype=np.int64),
                "prompt_length": spaces.Discrete(max_prompt_tokens, start=1),
                "length": spaces.Discrete(width, start=1),
                "text": spaces.Text(max_length=self._max_text, min_length=0, charset=ESCAPED_CHARSET),
            }
        )
        if action_mode == "token":
            self.action_space = spaces.Discrete(vocab)
            self._act = self._type_token
        else:
            self.action_space = spaces.Text(max_length=self._response_chars(), min_length=0, charset=ESCAPED_CHARSET)
            self._act = self._write_response
        self._prompt: EncodedPrompt | None = None
        self._response: list[int] = []  # the current policy turn's tokens
        self._done = False
        self._episode = self._instance = None  # with env: the episode being played, and its environment
        self._turn_start = 0  # with env: where the last policy turn began in the episode's tokens

    def _response_chars(self) -> int:
        """Longest text answer in response mode: what fits in max_new_tokens beside the template's own tokens
        around the answer (measured on an empty answer), at one token per ASCII character (a byte-level
        tokenizer's worst case). Denser tokenizers fit more; a longer answer is cut and reported truncated."""
        p = self.prompts[0]
        if self.runner is not None:
            overhead = len(self.runner.fmt.turn_ids(list(p.context), ""))
        else:
            overhead = len(response_ids(self.tok, p.rendered, list(p.context), ""))
        if self.max_new_tokens <= overhead:
            raise ConfigError(
                f"max_new_tokens={self.max_new_tokens} leaves no room for an answer in response mode: the chat "
                f"template's assistant turn takes {overhead} tokens around the text"
            )
        return self.max_new_tokens - overhead

    # ------------------------------------------------------------------------------------------ Gymnasium API

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        """Start an episode with a prompt drawn by `self.np_random`, or `options={"prompt_index": i}`."""
        super().reset(seed=seed)
        options = dict(options or {})
        index = options.pop("prompt_index", None)
        if options:
            raise ValueError(f"unknown reset options {sorted(options)}; the only option is 'prompt_index'")
        if index is None:
            index = int(self.np_random.integers(len(self.prompts)))
        elif isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < len(self.prompts):
            raise ValueError(f"prompt_index={index!r}: expected an integer in [0, {len(self.prompts)})")
        self._prompt, self._response, self._done = self.prompts[index], [], False
        if self.runner is not None:
            self._instance = self.runner.env.new()
            self._episode = self.runner.start(self._instance, {"prompt": self._prompt.text, **self._prompt.extra})
        return self._observation(), {"prompt_index": int(index), "prompt": self._prompt.text}

    def step(self, action) -> tuple[dict, float, bool, bool, dict]:
        if self._prompt is None:
            raise RuntimeError("call reset() before step()")
        if self._done:
            raise RuntimeError("the episode is over; call reset() to start the next one")
        if action not in self.action_space:
            raise ValueError(self._bad_action(action))
        terminated, truncated = self._act(action)
        reward, info = 0.0, {}
        if self.runner is not None:
            if terminated or truncated:  # the turn is over: answer it
                reward, info = self._answer_turn(finish="stop" if terminated else "length")
                end = self._episode.end
                terminated, truncated = end == "done", end not in (None, "done")
            self._done = terminated or truncated
            return self._observation(), reward, terminated, truncated, info
        if terminated or truncated:
            self._done = True
            reward, info = self._score()
        return self._observation(), reward, terminated, truncated, info

    def render(self) -> str | None:
        if self.render_mode is None:
            return None
        if self._prompt is None:
            raise RuntimeError("call reset() before render()")
        return self._decode(self._ids())

    # ------------------------------------------------------------------------------------------ the two modes

    def _type_token(self, action) -> tuple[bool, bool]:
        """Token mode: append one token; EOS ends the answer, max_new_tokens truncates it."""
        token = int(action)
        self._response.append(token)
        terminated = token == self.tok.eos_token_id
        truncated = not terminated and len(self._response) >= self.max_new_tokens
        return terminated, truncated

    def _write_response(self, action: str) -> tuple[bool, bool]:
        """Response mode: the answer as the template's assistant turn (ending with EOS), cut at max_new_tokens."""
        text = unescape_text(action)
        if self.tok.eos_token in text:
            raise ValueError(
                f"the response contains the EOS token's text {self.tok.eos_token!r}; the tokenizer would end the "
                "answer there and drop the rest"
            )
        p = self._prompt
        if self.runner is not None:
            ids = self.runner.fmt.turn_ids(self._episode.messages, text)
        else:
            ids = response_ids(self.tok, p.rendered, list(p.context), text)
        truncated = len(ids) > self.max_new_tokens
        self._response = ids[: self.max_new_tokens]
        return not truncated, truncated

    def _bad_action(self, action) -> str:
        if self.action_mode == "token":
            return f"action {action!r} is not a token id in [0, {self.action_space.n})"
        return (
            f"action {action!r:.80} is not in the response action space: a str of at most "
            f"{self.action_space.max_length} characters of printable ASCII, newline and tab (write any other "
            "character with chatrlhf.envs.escape_text; raise max_new_tokens for longer answers)"
        )

    # ------------------------------------------------------------------------------------------ observation, reward

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _ids(self) -> tuple[int, ...]:
        """The conversation so far: the prompt (or the episode up to the current turn), then the turn's tokens."""
        before = self._prompt.ids if self._episode is None else tuple(self._episode.ids)
        return before + tuple(self._response)

    def _observation(self) -> dict[str, Any]:
        ids = self._ids()
        token_ids = np.full(self._width, self.tok.pad_token_id, dtype=np.int64)
        token_ids[: len(ids)] = ids
        text = escape_text(self._decode(ids))
        if len(text) > self._max_text:
            raise RuntimeError(
                f"escaped conversation text is {len(text)} characters, over the observation bound "
                f"{self._max_text}; the tokenizer decodes {len(ids)} tokens to more text than the bound allows"
            )
        prompt_length = len(ids) - len(self._response)
        if self._episode is not None and self._episode.end is not None:
            prompt_length = self._turn_start  # the episode ended with the last turn: that turn is the response
        return {"token_ids": token_ids, "prompt_length": prompt_length, "length": len(ids), "text": text}

    def _answer_turn(self, finish: str) -> tuple[float, dict]:
        """With env: the policy turn just written is answered as in RL (envs/runner.py); its reward and what the
        episode looks like now."""
        ep = self._episode
        self._turn_start = len(ep.ids)
        self.runner.advance(self._instance, ep, self._response, [0.0] * len(self._response), finish)
        self._response = []
        info = {
            "messages": [dict(m) for m in ep.messages],
            "end": ep.end,
            "turn_reward": ep.turn_rewards[-1],
            "tool_calls": len(ep.tool_results),
            "tool_errors": ep.tool_errors,
        }
        return ep.turn_rewards[-1], info

    def _score(self) -> tuple[float, dict]:
        """The Scorer's weighted reward of (prompt, response), and each source's score."""
        p = self._prompt
        sequences = torch.tensor([p.ids + tuple(self._response)], dtype=torch.long, device=self.device)
        response = self.tok.decode(self._response, skip_special_tokens=True).strip()
        batch = ScoringBatch(
            sequences=sequences,
            attention_mask=torch.ones_like(sequences),
            # the last response token (EOS when the answer ended): where the RL stage reads the end score
            last_index=torch.tensor([sequences.shape[1] - 1], device=self.device),
            prompts=[p.text],
            responses=[response],
            extras=[dict(p.extra)],
        )
        scores = self.scorer(batch)
        parts = {name: float(v[0]) for name, v in scores.parts.items()}
        return float(scores.total[0]), {"reward_parts": parts, "response": response}


def _check_arguments(
    reward_functions, reward_model, action_mode, max_new_tokens, max_prompt_tokens, render_mode, env=None
):
    """Fail before loading anything."""
    if env and (reward_functions or reward_model):
        raise ConfigError(
            "env is set with reward_functions or reward_model: with env the rewards are the environment's (score "
            "in its step()); leave the others out"
        )
    if action_mode not in ACTION_MODES:
        raise ConfigError(f"action_mode={action_mode!r}: expected one of {', '.join(map(repr, ACTION_MODES))}")
    if isinstance(reward_functions, str):
        raise ConfigError(f"reward_functions={reward_functions!r}: expected a list of 'module:function' specs")
    if not reward_functions and not reward_model and not env:
        raise ConfigError("no reward source: pass reward_model=... and/or reward_functions=[...] (or env=...)")
    for name, value in (("max_new_tokens", max_new_tokens), ("max_prompt_tokens", max_prompt_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r}: expected a positive integer")
    if render_mode is not None and render_mode not in ChatEnv.metadata["render_modes"]:
        raise ConfigError(f"render_mode={render_mode!r}: expected None or one of {ChatEnv.metadata['render_modes']}")
