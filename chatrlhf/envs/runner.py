"""Running multi-turn episodes token in, token out (docs/episodes.md).

An episode is one token sequence: the rendered initial conversation, then for every turn the tokens the policy
sampled — kept exactly as the generator returned them, never decoded and encoded again — and the environment's
answer, rendered with the chat template and appended as tokens. A per-token mask is 1 only on the policy's tokens,
so a loss over it trains on exactly what was sampled, and the sampler's log-probs of those tokens come with it.

How the environment's messages become tokens. With H the conversation before the policy's turn, a its turn (the
decoded text, only for rendering) and E the environment's messages, the template renders
`before = render(H + [a])` and `after = render(H + [a] + E, add_generation_prompt=True)`; the appended tokens are
those of `tail + after[len(before):]`, where `tail` is what the template writes after EOS in the assistant turn
(e.g. the newline of `...<eos>\\n`), since the policy's own tokens end at EOS. This needs `after` to begin with
`before`: a template that rewrites earlier turns when later ones follow (e.g. one that drops the reasoning of
earlier assistant turns) would make the episode's tokens differ from the conversation the model is later served;
such a template is refused with `TemplateRewrite` — up front by `check_template` on a probe conversation, and at
every turn of every episode.

Every episode ends, with `Episode.end`:

- `done`: the environment said so;
- `max_turns`: the policy has taken `max_turns` turns;
- `length`: a policy turn was cut at the generator's max_new_tokens (it has no EOS to close the turn);
- `max_tokens`: the environment's next messages would take the episode past `max_tokens` tokens.

So an episode is at most `max_tokens` tokens before each policy turn and `max_tokens + max_new_tokens` in all. The
runner refuses limits under which that is more than the model's context (`EpisodeLimits.context`), and first
messages that cannot fit in `max_tokens` (checked up front on the environment's tools' description, and on every
episode's first messages), so no episode ever reaches positions the model does not have.

A policy turn that calls tools (envs/tools.py) is answered by the tools, not the environment; after
`max_tool_calls` calls, further calls are answered with an error message. Tool failures are counted in
`Episode.tool_errors` and told to the model; they never stop the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jinja2.exceptions import TemplateError

from chatrlhf.data.collate import pad
from chatrlhf.data.tool_format import tool_response_turn, with_tool_prompt
from chatrlhf.envs.episode import LoadedEnvironment
from chatrlhf.envs.tools import Tool, ToolResult, call_tool, parse_tool_calls
from chatrlhf.errors import UserError

END_REASONS = ("done", "max_turns", "length", "max_tokens")


class TemplateRewrite(UserError):
    """The chat template renders earlier turns differently once later turns follow them."""


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int = 4
    """Most policy turns in an episode (tool-calling turns included)."""
    max_tool_calls: int = 4
    """Most tool calls in an episode; later calls are answered with an error message."""
    tool_timeout_s: float = 5.0
    """A tool call running longer is answered with a timeout error."""
    max_tokens: int = 512
    """Most tokens of an episode before a policy turn (the turn may add the generator's max_new_tokens)."""
    max_new_tokens: int = 0
    """Most tokens of one policy turn: the generator's max_new_tokens (checked against `context`)."""
    context: int | None = None
    """The model's context length (models/load.py:context_length): `max_tokens + max_new_tokens`, the longest an
    episode can grow, must fit in it, which the runner checks when it is built. None = not checked (a generator
    without a model, in tests)."""
    options: str = "train."
    """Where the command's `episode.*` and `generation.*` options sit, for messages: "train." (chatrlhf rl) or ""
    (chatrlhf eval)."""


@dataclass
class Episode:
    """One played episode. T = its length in tokens."""

    record: dict
    messages: list[dict]
    """The conversation as text (the policy's turns decoded, tool results as {"role": "tool", ...})."""
    ids: list[int]
    """(T) the episode's tokens: the policy's exactly as sampled, the environment's as rendered."""
    policy_mask: list[int]
    """(T) 1 on the tokens the policy sampled, 0 on the environment's."""
    logprobs: list[float]
    """(T) the sampler's raw log-prob of each policy token; 0 elsewhere."""
    entropy: list[float] | None = None
    """(T) the entropy of the raw distribution each policy token was drawn from, 0 elsewhere; None when the
    generator of a turn gave none (vLLM)."""
    turn_rewards: list[float] = field(default_factory=list)
    """The environment's reward of each policy turn (0 for turns answered by tools)."""
    tool_results: list[ToolResult] = field(default_factory=list)
    tool_errors: int = 0
    """Tool calls answered with an error (bad call, exception, timeout, over the limit)."""
    end: str | None = None
    """Why the episode ended (END_REASONS); None while it runs."""

    @property
    def turns(self) -> int:
        return len(self.turn_rewards)

    @property
    def reward(self) -> float:
        """The episode's return: the sum of its turn rewards."""
        return sum(self.turn_rewards)


class ChatFormat:
    """How a conversation is rendered with the tokenizer's chat template, tools included: passed as `tools=` and
    answered in role `tool` where the template supports both; otherwise described in a system message (the
    fallback format of data/tool_format.py) and answered as a user turn `<tool_response>...</tool_response>`.
    Without `describe`, the tools are not described at all (envs/episode.py, `describe_tools`)."""

    def __init__(self, tok, tools: Sequence[Tool] = (), describe: bool = True):
        if not tok.chat_template:
            raise UserError("episodes need a tokenizer with a chat template; this one has none")
        self.tok, self.tools, self.describe = tok, list(tools), describe
        self.schemas = [t.schema for t in self.tools] or None
        self.native_tools = bool(self.tools) and _supports_tools(tok, self.tools[0].schema)

    def render(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        messages = [self._renderable(m) for m in messages]
        if self.tools and self.describe and not self.native_tools:
            messages = with_tool_prompt(messages, self.schemas)
        tools = self.schemas if self.native_tools and self.describe else None
        try:
            return self.tok.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except TemplateError as e:
            raise UserError(f"the model's chat template cannot render the episode's conversation: {e}") from None

    def _renderable(self, m: dict) -> dict:
        if m["role"] == "tool" and not self.native_tools:
            return tool_response_turn(m["content"])
        return {k: v for k, v in m.items() if k in ("role", "content", "name")}

    def encode(self, text: str, first: bool) -> list[int]:
        """Tokens of rendered text; special tokens (BOS) as the tokenizer adds them for the episode's start only."""
        return self.tok(text, add_special_tokens=first)["input_ids"]

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        return self.encode(self.render(messages, add_generation_prompt=True), first=True)

    def turn_ids(self, history: Sequence[dict], text: str) -> list[int]:
        """Tokens of `text` written as the assistant's turn after `history`, through exactly one EOS: what a policy
        that wrote it would have sampled."""
        prompt = self.render(history, add_generation_prompt=True)
        full = self.render([*history, {"role": "assistant", "content": text}], add_generation_prompt=False)
        _check_prefix(prompt, full, f"the assistant turn after {len(history)} messages")
        ids = self.encode(full[len(prompt) :], first=False)
        eos = self.tok.eos_token_id
        return ids[: ids.index(eos) + 1] if eos in ids else [*ids, eos]

    def continuation_ids(self, history: Sequence[dict], turn: dict, new: Sequence[dict]) -> list[int]:
        """Tokens of the environment's messages `new` after the policy's `turn` (which follows `history`), through
        the next generation prompt (see the module docstring); raises `TemplateRewrite` where the template rewrites
        what came before."""
        prompt = self.render(history, add_generation_prompt=True)
        before = self.render([*history, turn], add_generation_prompt=False)
        after = self.render([*history, turn, *new], add_generation_prompt=True)
        _check_prefix(prompt, before, f"the assistant turn after {len(history)} messages")
        _check_prefix(before, after, f"the {new[0]['role']} message after turn {len(history) + 1}")
        answer = before[len(prompt) :]
        eos = self.tok.eos_token
        tail = answer[answer.find(eos) + len(eos) :] if eos and eos in answer else ""
        return self.encode(tail + after[len(before) :], first=False)


def _supports_tools(tok, schema: dict) -> bool:
    """The template renders tool schemas given as `tools=` and messages of role `tool`."""
    marker = "tool-result-7f3a"
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    try:
        shown = tok.apply_chat_template(probe[:1], tools=[schema], tokenize=False)
        answered = tok.apply_chat_template([*probe, {"role": "tool", "content": marker}], tokenize=False)
    except TemplateError:
        return False
    return schema["function"]["name"] in shown and marker in answered


def _check_prefix(earlier: str, later: str, what: str) -> None:
    if later.startswith(earlier):
        return
    i = next((j for j, (a, b) in enumerate(zip(earlier, later)) if a != b), min(len(earlier), len(later)))
    raise TemplateRewrite(
        f"the chat template rewrites earlier turns: adding {what} changes the text before it at character {i} "
        f"({earlier[i : i + 40]!r} becomes {later[i : i + 40]!r}); token-in/token-out episodes need a template "
        "that renders a conversation's earlier turns the same whatever follows them (one that drops or reformats "
        "earlier assistant turns cannot be used)"
    )


PROBE_CONVERSATION = (
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 12 times 34?"},
    {"role": "assistant", "content": "<think>12 times 34 is 408.</think>It is 408."},
    {"role": "user", "content": "Now add 5 to it."},
    {"role": "assistant", "content": '<tool_call>{"name": "add", "arguments": {"a": 408, "b": 5}}</tool_call>'},
    {"role": "tool", "name": "add", "content": "413"},
    {"role": "assistant", "content": "<think>The tool says 413.</think>413."},
    {"role": "user", "content": "Thanks."},
)
"""A conversation with reasoning in earlier assistant turns, a tool call and its result: what templates that
rewrite history (dropping earlier reasoning, reformatting tool calls) change."""


def check_template(fmt: ChatFormat, conversation: Sequence[dict] = PROBE_CONVERSATION) -> int:
    """Render every prefix of `conversation` as the episode runner would at that point (ending with the generation
    prompt before each assistant turn) and check that its tokens begin the next prefix's tokens; raises
    `TemplateRewrite` naming the first turn that rewrites what came before. Returns the number of turn boundaries
    checked. Tool messages are left out when `fmt` has no tools."""
    msgs = [m for m in conversation if fmt.tools or m["role"] != "tool"]
    checked = 0
    for k in range(1, len(msgs)):
        gen = msgs[k]["role"] == "assistant"
        earlier = fmt.render(msgs[:k], add_generation_prompt=gen)
        later = fmt.render(msgs[: k + 1], add_generation_prompt=False)
        what = f"message {k + 1} ({msgs[k]['role']})"
        _check_prefix(earlier, later, what)
        a, b = fmt.encode(earlier, first=True), fmt.encode(later, first=True)
        if b[: len(a)] != a:
            raise TemplateRewrite(
                f"the tokenizer encodes the conversation before {what} differently once it follows: the tokens at "
                "the turn boundary merge; token-in/token-out episodes need turn boundaries that tokens do not cross"
            )
        checked += 1
    return checked


def check_lengths(fmt: ChatFormat, limits: EpisodeLimits) -> None:
    """Refuse limits under which an episode could grow past the model's context (`max_tokens + max_new_tokens` over
    `limits.context`), and first messages that could never fit in `max_tokens`: the template's rendering of an
    empty user turn (with the tools' description, where the environment has tools) is the least any episode starts
    with. Raises `UserError` naming the command's options (`limits.options`)."""
    longest = limits.max_tokens + limits.max_new_tokens
    o = limits.options
    if limits.context is not None and longest > limits.context:
        raise UserError(
            f"episodes could grow past the model's context of {limits.context} tokens (max_position_embeddings): "
            f"max_tokens={limits.max_tokens} ({o}episode.max_tokens) before a policy turn plus "
            f"max_new_tokens={limits.max_new_tokens} ({o}generation.max_new_tokens) of the turn is {longest} "
            f"tokens; lower them so that their sum is at most {limits.context}, or use a model with a longer context"
        )
    least = len(fmt.prompt_ids([{"role": "user", "content": ""}]))
    if least > limits.max_tokens:
        what, fix = ("the tools' description and an empty user turn", "raise it or describe fewer tools")
        if not (fmt.tools and fmt.describe):
            what, fix = "an empty user turn", "raise it"
        raise UserError(
            f"every episode's first messages take at least {least} tokens ({what}, rendered with the chat "
            f"template), over max_tokens={limits.max_tokens} ({o}episode.max_tokens), the most an episode may "
            f"hold before a policy turn; {fix}"
        )


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------ the runner


class EpisodeRunner:
    """Plays episodes of an environment with a generator (engine/generation.py's `generate`, or a
    `HybridEngine` in generation mode), all of a batch's active episodes generating their next turn together."""

    def __init__(self, env: LoadedEnvironment, tok, limits: EpisodeLimits = EpisodeLimits()):
        self.env, self.tok, self.limits = env, tok, limits
        self.fmt = ChatFormat(tok, env.tools, env.describe_tools)
        self.tools = {t.name: t for t in env.tools}
        check_template(self.fmt)
        check_lengths(self.fmt, limits)

    def run(self, generator, records: Sequence[dict], greedy: bool = False) -> list[Episode]:
        envs = [self.env.new() for _ in records]
        episodes = [self.start(env, dict(rec)) for env, rec in zip(envs, records)]
        while active := [i for i, ep in enumerate(episodes) if ep.end is None]:
            out = generator.generate([episodes[i].ids for i in active], greedy=greedy, logprobs=True)
            for row, i in enumerate(active):
                n = int(out.mask[row].sum())
                tokens, logprobs = out.tokens[row, :n].tolist(), out.logprobs[row, :n].tolist()
                entropy = out.entropy[row, :n].tolist() if out.entropy is not None else None
                self.advance(envs[i], episodes[i], tokens, logprobs, out.finish_reasons[row], entropy)
        return episodes

    def start(self, env, record: dict) -> Episode:
        """A new episode of the environment instance `env` on `record`: its first messages as tokens."""
        messages = self.env.reset(env, record)
        ids = self.fmt.prompt_ids(messages)
        if len(ids) > self.limits.max_tokens:
            option = f"{self.limits.options}episode.max_tokens"
            raise UserError(
                f"environment '{self.env.spec}': the first messages of the episode of record {_short(record)} are "
                f"{len(ids)} tokens, over max_tokens={self.limits.max_tokens} ({option}), the most an episode may hold "
                "before a policy turn; raise it (within the model's context) or shorten the messages"
            )
        return Episode(record, list(messages), ids, [0] * len(ids), [0.0] * len(ids), [0.0] * len(ids))

    def advance(
        self,
        env,
        ep: Episode,
        tokens: list[int],
        logprobs: list[float],
        finish: str,
        entropy: list[float] | None = None,
    ) -> None:
        """One policy turn: keep its tokens (with the sampler's log-probs and entropies), answer it (tools or the
        environment), append the answer's tokens. `finish` is the generator's: "length" (cut at max_new_tokens)
        ends the episode."""
        ep.ids += tokens
        ep.policy_mask += [1] * len(tokens)
        ep.logprobs += logprobs
        ep.entropy = ep.entropy + entropy if ep.entropy is not None and entropy is not None else None
        history = list(ep.messages)
        turn = {"role": "assistant", "content": self.tok.decode(tokens, skip_special_tokens=True).strip()}
        ep.messages.append(turn)
        ep.turn_rewards.append(0.0)
        if finish == "length":
            ep.end = "length"
            return
        calls = []
        if self.tools:
            prefix = self.fmt.render(history, add_generation_prompt=True)
            calls = parse_tool_calls(
                self.tok.decode(tokens, skip_special_tokens=True), self.tok, prefix, self.env.tools
            )
        if calls:
            new = [self._answer_call(ep, call) for call in calls]
        else:
            reply = self.env.step(env, turn["content"])
            ep.turn_rewards[-1] = float(reply.reward)
            if reply.done:
                ep.end = "done"
                return
            new = reply.messages
        if ep.turns >= self.limits.max_turns:
            ep.end = "max_turns"
            return
        ids = self.fmt.continuation_ids(history, turn, new)
        if len(ep.ids) + len(ids) > self.limits.max_tokens:
            ep.end = "max_tokens"
            return
        ep.ids += ids
        ep.policy_mask += [0] * len(ids)
        ep.logprobs += [0.0] * len(ids)
        if ep.entropy is not None:
            ep.entropy += [0.0] * len(ids)
        ep.messages += new

    def _answer_call(self, ep: Episode, call) -> dict:
        if len(ep.tool_results) >= self.limits.max_tool_calls:
            limit = f"error: the limit of {self.limits.max_tool_calls} tool calls is reached; answer without tools"
            result = ToolResult(call, limit, "limit")
        else:
            result = call_tool(self.tools, call, self.limits.tool_timeout_s)
        ep.tool_results.append(result)
        ep.tool_errors += result.error is not None
        return {"role": "tool", "name": call.name, "content": result.content}


@dataclass
class EpisodeBatch:
    """Episodes as right-padded tensors for the trainer; N = episodes, T = the longest episode."""

    ids: torch.Tensor
    """(N, T) long — every episode's tokens."""
    attention_mask: torch.Tensor
    """(N, T) long."""
    policy_mask: torch.Tensor
    """(N, T) float — 1 on the policy's sampled tokens only: what a loss sums over."""
    logprobs: torch.Tensor
    """(N, T) float — the sampler's log-probs of the policy tokens, 0 elsewhere."""


def collate_episodes(episodes: Sequence[Episode], pad_id: int) -> EpisodeBatch:
    ids, attn = pad([e.ids for e in episodes], pad_id)
    mask, _ = pad([e.policy_mask for e in episodes], 0)
    width = ids.shape[1]
    logprobs = torch.tensor([e.logprobs + [0.0] * (width - len(e.logprobs)) for e in episodes])
    return EpisodeBatch(ids, attn, mask.float(), logprobs)
