"""The fallback tool format: how tools are described to a model, and how their results and calls are written, when
its chat template does not render tools itself (no `tools=` support or no role `tool`, like the tiny models'
template). It is the Hermes format that Qwen2.5's and many other templates render (docs/episodes.md, "Tools"):

    system:    You may call these tools:
               {JSON schema of each tool, one per line}
               To call one, write <tool_call>{"name": NAME, "arguments": {...}}</tool_call>; ...
    assistant: <tool_call>{"name": "add", "arguments": {"a": 408, "b": 5}}</tool_call>
    user:      <tool_response>
               413
               </tool_response>

Episodes render conversations this way (envs/runner.py:ChatFormat) and SFT transcripts written here train the same
text (the calculator demo's `calculator:sft:...` source), so a model learns in SFT the exact tokens RL samples.
"""

from __future__ import annotations

import json
from collections.abc import Sequence


def describe_tools(schemas: Sequence[dict]) -> str:
    """The system-message text that lists `schemas` (chat-template tool schemas) and says how to call them."""
    listed = "\n".join(json.dumps(s) for s in schemas)
    return (
        f"You may call these tools:\n{listed}\nTo call one, write "
        '<tool_call>{"name": NAME, "arguments": {...}}</tool_call>; '
        "its result comes back as <tool_response>...</tool_response>."
    )


def with_tool_prompt(messages: Sequence[dict], schemas: Sequence[dict]) -> list[dict]:
    """`messages` with the tool description as (or added to) the first system message."""
    text = describe_tools(schemas)
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def tool_call_text(name: str, arguments: dict) -> str:
    """One call as the policy writes it."""
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def tool_response_turn(content: str) -> dict:
    """A tool's result as the user turn that carries it."""
    return {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}
