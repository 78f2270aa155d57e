"""The environment of a multi-turn episode: what answers the policy between its turns (docs/episodes.md).

An episode is a conversation in which the policy's turns alternate with the environment's: a scripted or
model-driven user, or the results of the tools the policy calls. An environment is any class with this interface,
given as `module:Class` (like reward functions); one instance plays one episode:

    class Env:
        tools = [add]                              # optional: functions the policy may call (envs/tools.py)
        describe_tools = True                      # optional: False leaves the tools out of the prompt

        def reset(self, record: dict) -> list[dict]:
            # the conversation before the policy's first turn, e.g. [{"role": "user", "content": ...}]
        def step(self, turn: str) -> Reply:
            # the policy's turn (its text) → the next messages, the turn's reward, and whether the episode is over

`describe_tools = False` is for a policy trained on its tools (as SFT on the environment's own transcripts trains
it): their description, hundreds of tokens in every episode, is then left out of the prompt (no `tools=` for the
template, no system message in the fallback format); the policy's calls are parsed and answered all the same.

`step` is called after every policy turn that calls no tool; turns that call tools are answered by the tools
(envs/runner.py) without asking the environment. A `Reply`'s reward belongs to the policy turn it answers, so an
environment that rewards only the end returns 0 until its last reply; the episode's return is the sum.

A class that cannot be imported, lacks a method, or raises in its constructor, `reset` or `step` stops the run with
a `UserError` naming the class and the method (exit 2, no traceback), as a reward function that raises does.
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from chatrlhf.envs.tools import Tool
from chatrlhf.errors import UserError

ENV_ROLES = ("system", "user", "tool")
"""Roles an environment's messages may have (the assistant is the policy)."""


@dataclass
class Reply:
    """The environment's answer to one policy turn."""

    messages: list[dict] = field(default_factory=list)
    """The next messages ({"role": "user" | "tool" | "system", "content": str}); none when `done`."""
    reward: float = 0.0
    """The reward of the policy turn just taken (0 until the end for an end-of-episode reward)."""
    done: bool = False
    """The episode is over."""


@runtime_checkable
class Environment(Protocol):
    """One episode's environment (see the module docstring); `tools` is optional."""

    def reset(self, record: dict) -> list[dict]: ...

    def step(self, turn: str) -> Reply: ...


class LoadedEnvironment:
    """An environment class given as `module:Class`, with its tools' schemas made once; `new()` builds the
    instance for one episode, and `reset`/`step` call it with every failure turned into a `UserError`."""

    def __init__(self, spec: str, cls: Callable):
        self.spec, self.cls = spec, cls
        self.tools = [Tool.of(fn, spec) for fn in getattr(cls, "tools", ())]
        self.describe_tools = getattr(cls, "describe_tools", True)
        if not isinstance(self.describe_tools, bool):
            raise UserError(f"environment '{spec}': describe_tools is {self.describe_tools!r}; expected True or False")
        names = [t.name for t in self.tools]
        if len(set(names)) != len(names):
            raise UserError(f"environment '{spec}': two tools have the same name ({names})")

    def new(self) -> Environment:
        try:
            env = self.cls()
        except Exception as e:
            raise UserError(
                f"environment '{self.spec}': {self.cls.__name__}() raised {type(e).__name__}: {e}"
            ) from None
        return env

    def reset(self, env: Environment, record: dict) -> list[dict]:
        messages = self._call(env, "reset", record)
        problem = message_problem(messages, allow_empty=False)
        if problem:
            raise UserError(f"environment '{self.spec}': reset() returned {problem}")
        return messages

    def step(self, env: Environment, turn: str) -> Reply:
        reply = self._call(env, "step", turn)
        if not isinstance(reply, Reply):
            raise UserError(
                f"environment '{self.spec}': step() returned {type(reply).__name__}; expected a "
                "chatrlhf.envs.episode.Reply(messages, reward, done)"
            )
        problem = message_problem(reply.messages, allow_empty=reply.done)
        is_number = isinstance(reply.reward, numbers.Real) and not isinstance(reply.reward, bool)
        if problem is None and not (is_number and math.isfinite(reply.reward)):
            problem = f"reward {reply.reward!r}; expected a finite number"
        if problem:
            raise UserError(f"environment '{self.spec}': step() returned {problem}")
        return reply

    def _call(self, env: Environment, method: str, arg):
        try:
            return getattr(env, method)(arg)
        except Exception as e:
            raise UserError(f"environment '{self.spec}': {method}() raised {type(e).__name__}: {e}") from None


def message_problem(messages: object, allow_empty: bool) -> str | None:
    """What is wrong with an environment's messages, or None: a list of {"role", "content": str} dicts whose
    roles are in ENV_ROLES."""
    if not isinstance(messages, list):
        return f"{type(messages).__name__}; expected a list of messages"
    if not messages and not allow_empty:
        return "no messages; the policy needs something to answer"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            return f"message {i} {m!r}; expected {{'role': ..., 'content': str}}"
        if m.get("role") not in ENV_ROLES:
            return f"message {i} with role {m.get('role')!r}; an environment's roles are {', '.join(ENV_ROLES)}"
    return None


def load_environment(spec: str) -> LoadedEnvironment:
    """`package.module:Class` → the loaded environment; any problem is a `UserError` naming the spec."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise UserError(f"environment '{spec}': expected module:Class")
    try:
        cls = getattr(importlib.import_module(module), name)
    except Exception as e:  # ImportError, AttributeError, or the module itself raising on import
        raise UserError(f"environment '{spec}': cannot import: {type(e).__name__}: {e}") from None
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if not isinstance(cls, type) or missing:
        what = f"lacks {', '.join(missing)}" if isinstance(cls, type) else f"is a {type(cls).__name__}, not a class"
        raise UserError(
            f"environment '{spec}': '{name}' {what}; expected a class with reset(record) -> messages and "
            "step(turn) -> Reply"
        )
    return LoadedEnvironment(spec, cls)
