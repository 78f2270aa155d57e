"""`chatrlhf serve MODEL_DIR`: an OpenAI-compatible HTTP server on FastAPI and uvicorn (docs/serve.md).

    POST /v1/chat/completions   a conversation, rendered with the model's chat template (or the training template)
    POST /v1/completions        raw prompts
    GET  /v1/models             the one model served (and GET /v1/models/{name})
    GET  /health                200 {"status": "ok", ...} once the model is loaded, with batching counts

Both POST endpoints answer whole (JSON) or streamed (`stream: true`: server-sent events, `data: [DONE]` last).
Requests are parsed and checked in serve/api.py; refused ones get a 4xx in OpenAI's error shape and the server
goes on. Generation runs in one model thread (serve/batcher.py) that batches concurrent requests, each with its own
sampling settings, through the shared generation interface — so `--backend vllm` serves with vLLM.

The server binds 127.0.0.1 unless told otherwise; with an API key (`api_key`, or CHATRLHF_API_KEY) every /v1/
request needs `Authorization: Bearer KEY`. On SIGTERM or Ctrl-C it stops accepting connections, finishes the
requests in flight (uvicorn's graceful shutdown), stops the model thread and exits 0.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import signal
import socket
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from chatrlhf.config import ServeConfig
from chatrlhf.engine.backends import Opened, open_configured, start
from chatrlhf.engine.generation import Completion
from chatrlhf.errors import UserError
from chatrlhf.serve import api
from chatrlhf.serve.batcher import Batcher, Work

API_KEY_ENV = "CHATRLHF_API_KEY"


class Failed(Exception):
    """Generation failed for this request's batch."""


async def generate(batcher: Batcher, job: api.Job) -> AsyncIterator[tuple[int, str, Completion | None]]:
    """The job's updates as the model thread produces them: (choice index, new text, its Completion when done)."""
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue = asyncio.Queue()
    requests = job.requests()

    def on_update(i: int, text: str, done: Completion | None) -> None:
        loop.call_soon_threadsafe(updates.put_nowait, (i, text, done))

    def on_error(e: BaseException) -> None:
        loop.call_soon_threadsafe(updates.put_nowait, e)

    batcher.submit(Work(requests, on_update, on_error))
    left = len(requests)
    while left:
        update = await updates.get()
        if isinstance(update, BaseException):
            raise Failed(f"generation failed: {type(update).__name__}: {update}")
        left -= update[2] is not None
        yield update


async def answer(batcher: Batcher, job: api.Job, reply: api.Reply) -> dict:
    completions: list[Completion | None] = [None] * (len(job.prompts) * job.n)
    async for i, _, done in generate(batcher, job):
        if done is not None:
            completions[i] = done
    return api.response(job, reply, completions)


async def stream(batcher: Batcher, job: api.Job, reply: api.Reply) -> AsyncIterator[str]:
    """Server-sent events: (chat) a role chunk per choice, then text chunks, a chunk with each choice's
    finish_reason, the usage chunk if asked for, `[DONE]`. A generation failure is an `error` event, then `[DONE]`."""
    choices = len(job.prompts) * job.n
    completions: list[Completion | None] = [None] * choices
    if job.chat:
        for i in range(choices):
            yield api.sse(api.chunk(reply, i, None, role=True))
    try:
        async for i, text, done in generate(batcher, job):
            if text:
                yield api.sse(api.chunk(reply, i, text))
            if done is not None:
                completions[i] = done
                yield api.sse(api.chunk(reply, i, None, done.finish_reason))
        if job.include_usage:
            yield api.sse(api.usage_chunk(reply, job, completions))
    except Failed as e:
        yield api.sse(api.ApiError(500, str(e), kind="server_error").body())
    yield api.sse("[DONE]")


def error(e: api.ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def errors_in_openai_shape(app: FastAPI) -> None:
    """Every error the app answers — ours, routing's (404, 405), anything unexpected (500) — in OpenAI's shape."""

    @app.exception_handler(api.ApiError)
    async def api_error(request: Request, e: api.ApiError):
        return error(e)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return error(api.ApiError(e.status_code, f"{e.detail}: {request.method} {request.url.path}"))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return error(api.ApiError(400, str(e)))

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        return error(api.ApiError(500, f"{type(e).__name__}: {e}", kind="server_error"))


def require_api_key(app: FastAPI, api_key: str) -> None:
    """`Authorization: Bearer KEY` on every /v1/ request (compared in constant time); /health stays open."""

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not given.startswith("Bearer "):
                message = "You didn't provide an API key: send the header 'Authorization: Bearer KEY'."
                return error(api.ApiError(401, message, code="invalid_api_key"))
            if not hmac.compare_digest(given[len("Bearer ") :].encode(), api_key.encode()):
                return error(api.ApiError(401, "Incorrect API key provided.", code="invalid_api_key"))
        return await call_next(request)


def build_app(opened: Opened, name: str, api_key: str, cfg: ServeConfig):
    """The FastAPI application serving `opened` as model `name`."""
    served = api.Served(name, opened.tokenizer, opened.context, cfg.max_n)
    batcher = Batcher(opened.generator, cfg.max_batch_size, cfg.batch_wait_ms / 1000)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.close()  # after uvicorn has finished the requests in flight

    app = FastAPI(title="chatrlhf serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher

    errors_in_openai_shape(app)
    if api_key:
        require_api_key(app, api_key)

    @app.get("/health")
    async def health():
        s = batcher.stats
        return {"status": "ok", "requests": s.requests, "batches": s.batches, "largest_batch": s.largest_batch}

    def model_card() -> dict:
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "chatrlhf",
            "max_model_len": opened.context,
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        if model != name:
            raise api.ApiError(404, f"The model '{model}' does not exist.", "model", code="model_not_found")
        return model_card()

    async def complete(request: Request, parse):
        job = parse(api.parse_body(await request.body()), served)
        reply = api.Reply.new(job, name)
        if job.stream:
            return StreamingResponse(stream(batcher, job, reply), media_type="text/event-stream")
        try:
            return await answer(batcher, job, reply)
        except Failed as e:
            raise api.ApiError(500, str(e), kind="server_error") from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, api.parse_chat)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, api.parse_completion)

    return app


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: a free one), or a UserError naming the address."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def run_serve(cfg: ServeConfig) -> None:
    import uvicorn

    cfg.validate()
    api_key = cfg.api_key or os.environ.get(API_KEY_ENV, "")
    sock = listen(cfg.host, cfg.port)  # before loading the model: a taken port fails at once
    device = start(cfg)
    opened = open_configured(cfg, cfg.model, device, cfg.max_model_len)
    name = cfg.served_model_name or cfg.model
    app = build_app(opened, name, api_key, cfg)
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    print(
        f"chatrlhf serve: '{name}' ({cfg.backend} on {device}, context {opened.context} tokens) at "
        f"http://{url_host}:{port}/v1" + (" (API key required)" if api_key else ""),
        flush=True,
    )
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=None, access_log=True)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal to the handler it found; this
    # one notes it, so that a stopped server exits 0 after its in-flight requests instead of dying by the signal
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda number, frame: received.append(number))
    uvicorn.Server(config).run(sockets=[sock])
    why = f" by {signal.Signals(received[0]).name}" if received else ""
    print(f"chatrlhf serve: stopped{why} after {app.state.batcher.stats.requests} completions", flush=True)
