"""The OpenAI API's request and response shapes for `chatrlhf serve`: parsing a request body into a `Job` (or an
`ApiError` in OpenAI's error shape), and building responses and stream chunks. Plain data in and out, no HTTP.

Request fields (docs/serve.md has the table): `model`, `messages` (chat) or `prompt` (completions: a string, a list
of strings, a list of token ids, or a list of such lists), `max_tokens` (chat also `max_completion_tokens`),
`temperature`, `top_p`, `n`, `stop`, `seed`, `stream`, `stream_options.include_usage`, `user`, and vLLM's
extension `top_k`. Fields the server cannot honour are refused when set to anything but their neutral value
(`logprobs`, penalties, `logit_bias`, tools, ...), never silently ignored; fields OpenAI does not know are refused
as OpenAI refuses them.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass

from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase

from chatrlhf.data.collate import prompt_ids, render_prompt
from chatrlhf.engine.generation import Completion, Request, Sampling

ROLES = ("system", "user", "assistant")
SEED_LIMIT = 2**63
"""Seeds are in [0, 2^63); choice j of a request seeded s is seeded (s + j) mod 2^63."""


class ApiError(Exception):
    """A request the server refuses, as OpenAI reports it: HTTP `status` and
    `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Served:
    """What requests are checked against: the model's name, tokenizer and context, and the server's limits."""

    name: str
    tokenizer: PreTrainedTokenizerBase
    context: int
    max_n: int


@dataclass
class Job:
    """One parsed API request: its prompts, how to sample, how to answer."""

    chat: bool
    """/v1/chat/completions (else /v1/completions)."""
    prompts: list[list[int]]
    """Token ids of each prompt (chat: one, the rendered conversation)."""
    sampling: list[Sampling]
    """Per prompt (its max_tokens may be the room its own length leaves)."""
    n: int
    """Choices per prompt."""
    stream: bool
    include_usage: bool
    """Streaming: a last chunk with the usage counts (`stream_options.include_usage`)."""

    def requests(self) -> list[Request]:
        """One request per choice, in the order of the choices' `index` (prompt-major); choice j of a seeded request
        is seeded seed + j, so the choices differ and the response repeats."""
        out = []
        for prompt, sampling in zip(self.prompts, self.sampling):
            for j in range(self.n):
                seed = None if sampling.seed is None else (sampling.seed + j) % SEED_LIMIT
                out.append(Request(prompt, Sampling(**{**sampling.__dict__, "seed": seed})))
        return out


# ------------------------------------------------------------------------------------------------------ fields

NEUTRAL = {
    "logprobs": (None, False),  # chat: a boolean; completions: a count (null asks for none)
    "top_logprobs": (None, 0),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "store": (None, False),
    "metadata": (None, {}),
    "service_tier": (None, "auto", "default"),
}
"""Fields this server cannot honour, with the values that ask for nothing (accepted)."""

COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "user",
}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens"} | (NEUTRAL.keys() - {"echo", "suffix", "best_of"})
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs", "presence_penalty", "frequency_penalty", "logit_bias"}
COMPLETION_FIELDS |= {"echo", "suffix", "best_of"}


def parse_body(raw: bytes) -> dict:
    """The JSON object of a request body."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(
            400,
            f"We could not parse the JSON body of your request: {e}. (HINT: send the body as JSON; this server "
            "expects a JSON object.)",
        ) from None
    if not isinstance(body, dict):
        raise ApiError(400, f"The request body must be a JSON object, got {type(body).__name__}")
    return body


def _type_name(value) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def _wrong(name: str, value, expected: str) -> ApiError:
    return ApiError(400, f"Invalid type for '{name}': expected {expected}, but got {_type_name(value)}.", name)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not (_is_int(v) or isinstance(v, float)) or not math.isfinite(v):
        raise _wrong(name, v, "a number")
    if v > high or v < low or (low_open and v == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ApiError(400, f"Invalid value for '{name}': {v} is not in {bound}.", name, code="invalid_value")
    return float(v)


def _integer(body: dict, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v):
        raise _wrong(name, v, "an integer")
    if v < low or (high is not None and v > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ApiError(400, f"Invalid value for '{name}': {v}; it must be {bound}.", name, code="invalid_value")
    return v


def _boolean(body: dict, name: str) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _wrong(name, v, "a boolean")
    return v


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _wrong("stop", v, "a string or an array of strings")
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, "Invalid value for 'stop': give up to 4 non-empty strings.", "stop", code="invalid_value")
    return tuple(stops)


def _check_fields(body: dict, known: set[str]) -> None:
    """Every field is one the endpoint knows, and an unsupported one asks for nothing."""
    for name, value in body.items():
        if name not in known:
            raise ApiError(400, f"Unrecognized request argument supplied: {name}", name)
        neutral = NEUTRAL.get(name)
        if neutral is not None and not any(value == n and type(value) is type(n) for n in neutral):
            raise ApiError(400, f"'{name}' is not supported by this server.", name, code="unsupported_parameter")


def _model(body: dict, served: Served) -> None:
    v = body.get("model")
    if v is None:
        raise ApiError(400, "Missing required parameter: 'model'.", "model", code="missing_required_parameter")
    if not isinstance(v, str):
        raise _wrong("model", v, "a string")
    if v != served.name:
        raise ApiError(
            404,
            f"The model '{v}' does not exist; this server serves '{served.name}' (GET /v1/models).",
            "model",
            code="model_not_found",
        )


def _stream_options(body: dict, stream: bool) -> bool:
    v = body.get("stream_options")
    if v is None:
        return False
    if not isinstance(v, dict) or set(v) - {"include_usage"}:
        raise _wrong("stream_options", v, "an object with the field include_usage")
    if not stream:
        raise ApiError(400, "'stream_options' is only allowed when 'stream' is true.", "stream_options")
    return _boolean(v, "include_usage")


def _sampling(body: dict, max_tokens: int | None, prompt_tokens: int, served: Served, what: str) -> Sampling:
    """The request's sampling for one prompt of `prompt_tokens` tokens; max_tokens None = the room the context
    leaves."""
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    top_k = _integer(body, "top_k", 0, -1)
    stop, seed = _stop(body), _integer(body, "seed", None, 0, SEED_LIMIT - 1)
    if prompt_tokens >= served.context or (max_tokens is not None and prompt_tokens + max_tokens > served.context):
        asked = prompt_tokens + (max_tokens or 0)
        detail = f"{prompt_tokens} in the {what}" + (f", {max_tokens} in the completion" if max_tokens else "")
        raise ApiError(
            400,
            f"This model's maximum context length is {served.context} tokens. However, you requested {asked} tokens "
            f"({detail}). Please reduce the length of the {what} or completion.",
            "messages" if what == "messages" else "prompt",
            code="context_length_exceeded",
        )
    return Sampling(
        max_new_tokens=max_tokens if max_tokens is not None else served.context - prompt_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=max(top_k, 0),  # vLLM's convention: -1 and 0 both turn top-k off
        stop=stop,
        seed=seed,
    )


# ------------------------------------------------------------------------------------------------------ requests


def _messages(body: dict) -> list[dict]:
    v = body.get("messages")
    if v is None:
        raise ApiError(400, "Missing required parameter: 'messages'.", "messages", code="missing_required_parameter")
    if not isinstance(v, list):
        raise _wrong("messages", v, "an array")
    if not v:
        raise ApiError(400, "Invalid 'messages': empty array. Expected an array with at least one message.", "messages")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _wrong(where, m, "an object")
        unknown = set(m) - {"role", "content", "name"}
        if unknown:
            raise ApiError(400, f"Unrecognized field in '{where}': {sorted(unknown)[0]}", where)
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(
                400, f"Invalid value for '{where}.role': {role!r}; supported roles: {', '.join(ROLES)}.", where
            )
        out.append({"role": role, "content": _content(m.get("content"), f"{where}.content")})
    return out


def _content(v, where: str) -> str:
    """A message's text: a string, or an array of text parts."""
    if isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(p, dict) for p in v):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in v):
            raise ApiError(
                400, f"Invalid '{where}': only text parts ({{'type': 'text', 'text': ...}}) are served.", where
            )
        return "".join(p["text"] for p in v)
    raise _wrong(where, v, "a string or an array of text parts")


def parse_chat(body: dict, served: Served) -> Job:
    _check_fields(body, CHAT_FIELDS)
    _model(body, served)
    messages = _messages(body)
    try:
        ids = prompt_ids(served.tokenizer, render_prompt(served.tokenizer, None, messages))
    except TemplateError as e:
        raise ApiError(400, f"The model's chat template cannot render these messages: {e}", "messages") from None
    max_tokens = _integer(body, "max_completion_tokens", None, 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", None, 1)
    stream = _boolean(body, "stream")
    return Job(
        chat=True,
        prompts=[ids],
        sampling=[_sampling(body, max_tokens, len(ids), served, "messages")],
        n=_integer(body, "n", 1, 1, served.max_n),
        stream=stream,
        include_usage=_stream_options(body, stream),
    )


def _token_list(v) -> bool:
    return isinstance(v, list) and all(_is_int(t) for t in v)


def _prompts(body: dict, tok: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of the `prompt` field: a string, strings, token ids, or lists of token ids."""
    v = body.get("prompt")
    if v is None:
        raise ApiError(400, "Missing required parameter: 'prompt'.", "prompt", code="missing_required_parameter")
    if isinstance(v, str):
        items = [v]
    elif isinstance(v, list) and v and _token_list(v):
        items = [v]
    elif (
        isinstance(v, list)
        and v
        and all(isinstance(p, str) or (isinstance(p, list) and all(map(_is_int, p))) for p in v)
    ):
        items = v
    else:
        raise _wrong("prompt", v, "a string, an array of strings, an array of token ids, or an array of those")
    out = []
    for item in items:
        ids = prompt_ids(tok, item) if isinstance(item, str) else list(item)
        if not ids:
            raise ApiError(400, "Invalid 'prompt': it has no tokens.", "prompt")
        if any(not 0 <= t < len(tok) for t in ids):
            raise ApiError(400, f"Invalid 'prompt': token ids must be in [0, {len(tok)}).", "prompt")
        out.append(ids)
    return out


def parse_completion(body: dict, served: Served) -> Job:
    _check_fields(body, COMPLETION_FIELDS)
    _model(body, served)
    prompts = _prompts(body, served.tokenizer)
    max_tokens = _integer(body, "max_tokens", 16, 1)  # OpenAI's default for completions
    stream = _boolean(body, "stream")
    return Job(
        chat=False,
        prompts=prompts,
        sampling=[_sampling(body, max_tokens, len(p), served, "prompt") for p in prompts],
        n=_integer(body, "n", 1, 1, served.max_n),
        stream=stream,
        include_usage=_stream_options(body, stream),
    )


# ------------------------------------------------------------------------------------------------------ responses


@dataclass
class Reply:
    """The identity every response and chunk of one request shares."""

    id: str
    created: int
    model: str
    chat: bool

    @classmethod
    def new(cls, job: Job, model: str) -> Reply:
        prefix = "chatcmpl" if job.chat else "cmpl"
        return cls(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model, job.chat)

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


def usage(job: Job, completions: list[Completion]) -> dict:
    """Prompt tokens count each prompt once (not once per choice), as OpenAI counts them."""
    prompt = sum(len(p) for p in job.prompts)
    completion = sum(len(c.tokens) for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def response(job: Job, reply: Reply, completions: list[Completion]) -> dict:
    """The whole (non-streamed) response; `completions` in choice order."""
    if job.chat:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": None,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(completions)
        ]
    else:
        choices = [
            {"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
            for i, c in enumerate(completions)
        ]
    return {**reply.head(reply.object), "choices": choices, "usage": usage(job, completions)}


def chunk(reply: Reply, index: int, text: str | None, finish_reason: str | None = None, role: bool = False) -> dict:
    """One stream chunk of choice `index`: new text, or (text None) its end with `finish_reason`; `role` opens a
    chat choice."""
    if reply.chat:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**reply.head("chat.completion.chunk"), "choices": [choice]}
    choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    return {**reply.head("text_completion"), "choices": [choice]}


def usage_chunk(reply: Reply, job: Job, completions: list[Completion]) -> dict:
    obj = "chat.completion.chunk" if reply.chat else "text_completion"
    return {**reply.head(obj), "choices": [], "usage": usage(job, completions)}


def sse(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
