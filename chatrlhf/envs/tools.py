"""Tools an episode's policy may call: plain Python functions with JSON-schema arguments.

A tool is a function with type hints and a Google-style docstring (`Args:`); its JSON schema is transformers'
`get_json_schema` of it, the format chat templates take as `tools=`:

    def add(a: float, b: float) -> float:
        \"\"\"Add two numbers.

        Args:
            a: the first number
            b: the second number
        \"\"\"
        return a + b

How a policy calls a tool. A tokenizer with a `response_template` (transformers' response parsing) is parsed with
`tokenizer.parse_response`; any other is parsed in the fallback format, the Hermes format that Qwen2.5's and many
other templates use, one call per tag, anywhere in the turn:

    <tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>

Calls are bounded and never crash a run: a call whose JSON does not parse, that names an unknown tool, gives
arguments its schema does not have (or lacks required ones), raises, or runs past its timeout returns an error
message to the model (`ToolResult.error`), which the episode counts. A timed-out call's thread cannot be stopped
from outside; it is left to finish as a daemon thread and its result is discarded.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from transformers.utils import get_json_schema
from transformers.utils.chat_template_utils import DocstringParsingException, TypeHintParsingException

from chatrlhf.errors import UserError

TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
"""The fallback tool-call format: a JSON object {"name": ..., "arguments": {...}} inside <tool_call> tags."""


@dataclass(frozen=True)
class Tool:
    """A function the policy may call, with its JSON schema."""

    fn: Callable
    name: str
    schema: dict
    """{"type": "function", "function": {"name", "description", "parameters"}}, as chat templates take it."""

    @classmethod
    def of(cls, fn: Callable, owner: str) -> Tool:
        """The tool for `fn`; `owner` (the environment's spec) names it in the message when its schema cannot be
        made (no type hints, or a docstring without an `Args:` entry for an argument)."""
        try:
            schema = get_json_schema(fn)
        except (DocstringParsingException, TypeHintParsingException) as e:
            raise UserError(f"environment '{owner}': tool {getattr(fn, '__name__', fn)!r}: {e}") from None
        return cls(fn, schema["function"]["name"], schema)

    def check_arguments(self, arguments: object) -> str | None:
        """What is wrong with `arguments` for this tool's schema (not an object, unknown or missing names), or
        None. Values are not type-checked: the function itself decides, and its exception becomes the message."""
        if not isinstance(arguments, dict):
            return f"arguments must be a JSON object, got {type(arguments).__name__}"
        params = self.schema["function"].get("parameters", {})
        known, required = set(params.get("properties", {})), set(params.get("required", []))
        unknown, missing = sorted(set(arguments) - known), sorted(required - set(arguments))
        if unknown:
            return f"unknown argument(s) {unknown} for tool '{self.name}'; it takes {sorted(known)}"
        if missing:
            return f"missing argument(s) {missing} for tool '{self.name}'"
        return None


@dataclass(frozen=True)
class ToolCall:
    """One call the policy wrote: the tool's name and its arguments (None where they did not parse)."""

    name: str
    arguments: dict | None
    problem: str | None = None
    """Why the call cannot be made as written (bad JSON, no name), or None."""


@dataclass(frozen=True)
class ToolResult:
    call: ToolCall
    content: str
    """What the model is told: the function's return value (str, or JSON of anything else), or the error."""
    error: str | None = None
    """The kind of failure (`parse`, `unknown_tool`, `arguments`, `exception`, `timeout`), or None."""


def parse_tool_calls(text: str, tokenizer=None, prefix: str = "", tools: Sequence[Tool] = ()) -> list[ToolCall]:
    """The tool calls in one policy turn (`prefix`: the rendered conversation before it): by the tokenizer's
    `response_template` when it has one (`tokenizer.parse_response`), else in the fallback
    `<tool_call>{...}</tool_call>` format. A turn whose calls do not parse gives one call with a `problem`."""
    if tokenizer is None or getattr(tokenizer, "response_template", None) is None:
        return [_parse_fallback(body) for body in TOOL_CALL_RE.findall(text)]
    try:
        parsed = tokenizer.parse_response(text, prefix=prefix, tools=[t.schema for t in tools] or None)
    except ValueError as e:  # transformers' parsers raise ValueError on a region they cannot read
        return [ToolCall("", None, f"the tool calls do not parse: {str(e).splitlines()[0]}")]
    calls = []
    for call in parsed.get("tool_calls") or []:
        fn = call.get("function", call) if isinstance(call, dict) else {}
        calls.append(_call_of(fn.get("name"), fn.get("arguments", {})))
    return calls


def _parse_fallback(body: str) -> ToolCall:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCall("", None, f"the tool call is not valid JSON: {e.msg} at character {e.pos}")
    if not isinstance(obj, dict):
        return ToolCall("", None, 'a tool call is a JSON object {"name": ..., "arguments": {...}}')
    return _call_of(obj.get("name"), obj.get("arguments", {}))


def _call_of(name: object, arguments: object) -> ToolCall:
    if not isinstance(name, str) or not name:
        return ToolCall("", None, 'a tool call is a JSON object {"name": ..., "arguments": {...}}')
    if isinstance(arguments, str):  # some models write the arguments as a JSON string, as the OpenAI API does
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return ToolCall(name, None, "the tool call's arguments are not valid JSON")
    return ToolCall(name, arguments)


def call_tool(tools: dict[str, Tool], call: ToolCall, timeout_s: float) -> ToolResult:
    """Run one call within `timeout_s` seconds; every failure becomes a `ToolResult` with an error message."""
    if call.problem is not None:
        return ToolResult(call, f"error: {call.problem}", "parse")
    tool = tools.get(call.name)
    if tool is None:
        return ToolResult(call, f"error: unknown tool '{call.name}'; the tools are {sorted(tools)}", "unknown_tool")
    problem = tool.check_arguments(call.arguments)
    if problem is not None:
        return ToolResult(call, f"error: {problem}", "arguments")
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = tool.fn(**call.arguments)
        except Exception as e:  # the model's call failed: it is told why, the run goes on
            outcome["error"] = f"{type(e).__name__}: {e}"

    thread = threading.Thread(target=run, name=f"tool-{tool.name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return ToolResult(call, f"error: tool '{tool.name}' did not finish within {timeout_s:g} s", "timeout")
    if "error" in outcome:
        return ToolResult(call, f"error: {outcome['error']}", "exception")
    value = outcome["value"]
    return ToolResult(call, value if isinstance(value, str) else json.dumps(value, default=str))
