"""`chatrlhf serve` (hf backend) through the stock `openai` client — sync, streaming, async and threaded concurrency —
and raw HTTP (httpx) for what a client library would not send: malformed JSON, wrong types, unknown fields. The
server is the real command in a subprocess on the tiny llama after a 300-step SFT."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import threading
import time

import httpx
import openai
import pytest

from chatrlhf.data.collate import render_prompt
from chatrlhf.models.load import load_tokenizer
from tests.serve.conftest import start_server

NAME = "tiny-chat"
CONTEXT = 128
QUESTION = [{"role": "user", "content": "Name 3 words that begin with m."}]


@pytest.fixture(scope="module")
def server(sft_llama):
    s = start_server(str(sft_llama), "--served_model_name", NAME, "--max_model_len", str(CONTEXT))
    yield s
    assert s.stop() == 0, s.output()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def chat(client, messages=QUESTION, **kw):
    return client.chat.completions.create(model=NAME, messages=messages, **{"temperature": 0, "max_tokens": 24, **kw})


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok"


def test_binds_loopback_by_default(server):
    assert server.url.startswith("http://127.0.0.1:")


def test_chat_is_the_completion_of_the_rendered_conversation(client, sft_llama):
    """The chat endpoint renders the messages with the model's template, as training does."""
    r = chat(client)
    text = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion" and r.model == NAME
    assert len(text.split()) >= 2 and r.choices[0].finish_reason == "stop"
    tok = load_tokenizer(str(sft_llama))
    prompt = render_prompt(tok, QUESTION[0]["content"])
    same = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=24)
    assert same.choices[0].text == text
    assert r.usage.prompt_tokens == len(tok(prompt)["input_ids"]) == same.usage.prompt_tokens
    assert r.usage.completion_tokens == same.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_chat_adds_up_to_the_whole_answer(client):
    whole = chat(client)
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == whole.choices[0].message.content
    assert len([p for p in pieces if p]) > 1
    ends = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert ends == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_streamed_completions(client):
    whole = client.completions.create(model=NAME, prompt="User: hi\nAssistant:", temperature=0, max_tokens=12)
    chunks = list(
        client.completions.create(model=NAME, prompt="User: hi\nAssistant:", temperature=0, max_tokens=12, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_n_seed_stop_and_max_tokens(client):
    sampled = dict(temperature=1.0, top_p=0.95, seed=11, n=3)
    a, b = chat(client, **sampled), chat(client, **sampled)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in b.choices]  # the same seed, the same choices
    assert len(set(texts)) > 1  # the choices are seeded apart
    assert a.usage.completion_tokens == sum(
        len(c.message.content.encode()) + (c.finish_reason == "stop") for c in a.choices
    )  # byte tokenizer: one token per byte, plus EOS
    whole = chat(client).choices[0].message.content
    word = whole.split()[1]
    cut = chat(client, stop=[word, "zzz"]).choices[0]
    assert cut.message.content == whole[: whole.index(word)] and cut.finish_reason == "stop"
    short = chat(client, max_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    assert short.choices[0].message.content == whole[:3]
    several = client.completions.create(model=NAME, prompt=["User: a\nAssistant:", "User: b\nAssistant:"], n=2,
                                        max_tokens=4, temperature=0)  # fmt: skip
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    assert several.choices[0].text == several.choices[1].text  # greedy: the choices of one prompt agree


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server, client):
    questions = [f"Name {k} words that begin with {c}." for k, c in zip((2, 3, 4, 2, 3, 4, 2, 3), "mstbpgwl")]
    alone = [chat(client, [{"role": "user", "content": q}]).choices[0].message.content for q in questions]
    before = httpx.get(server.url + "/health").json()

    with concurrent.futures.ThreadPoolExecutor(len(questions)) as pool:
        threaded = list(pool.map(lambda q: chat(client, [{"role": "user", "content": q}]), questions))
    assert [r.choices[0].message.content for r in threaded] == alone

    async def together():
        aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        calls = [
            aclient.chat.completions.create(
                model=NAME, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=24, stream=i % 2 == 1
            )
            for i, q in enumerate(questions)
        ]
        out = []
        for i, r in enumerate(await asyncio.gather(*calls)):
            if i % 2:
                out.append("".join([c.choices[0].delta.content or "" async for c in r if c.choices]))
            else:
                out.append(r.choices[0].message.content)
        await aclient.close()
        return out

    assert asyncio.run(together()) == alone
    after = httpx.get(server.url + "/health").json()
    assert after["largest_batch"] > 1
    assert after["batches"] - before["batches"] < 2 * len(questions)


BAD = [
    # (what, body or raw bytes, status, param, message part)
    ("malformed JSON", b'{"model": "tiny-chat", "messages": [', 400, None, "could not parse the JSON body"),
    ("not an object", b"[1, 2]", 400, None, "must be a JSON object"),
    ("no messages", {"model": NAME}, 400, "messages", "Missing required parameter: 'messages'"),
    ("no model", {"messages": QUESTION}, 400, "model", "Missing required parameter: 'model'"),
    ("unknown model", {"model": "gpt-9", "messages": QUESTION}, 404, "model", "The model 'gpt-9' does not exist"),
    ("messages not a list", {"model": NAME, "messages": "hi"}, 400, "messages", "expected an array"),
    ("bad role", {"model": NAME, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0]", "robot"),
    ("content a number", {"model": NAME, "messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content",
     "got integer"),
    ("temperature a string", {"model": NAME, "messages": QUESTION, "temperature": "hot"}, 400, "temperature",
     "expected a number, but got string"),
    ("temperature too high", {"model": NAME, "messages": QUESTION, "temperature": 2.5}, 400, "temperature",
     "2.5 is not in [0.0, 2.0]"),
    ("top_p zero", {"model": NAME, "messages": QUESTION, "top_p": 0}, 400, "top_p", "not in (0.0, 1.0]"),
    ("n zero", {"model": NAME, "messages": QUESTION, "n": 0}, 400, "n", "must be in [1, 16]"),
    ("n a float", {"model": NAME, "messages": QUESTION, "n": 1.5}, 400, "n", "expected an integer"),
    ("max_tokens zero", {"model": NAME, "messages": QUESTION, "max_tokens": 0}, 400, "max_tokens", "must be >= 1"),
    ("five stops", {"model": NAME, "messages": QUESTION, "stop": list("abcde")}, 400, "stop", "up to 4"),
    ("seed negative", {"model": NAME, "messages": QUESTION, "seed": -1}, 400, "seed", "must be in"),
    ("stream not a bool", {"model": NAME, "messages": QUESTION, "stream": "yes"}, 400, "stream", "boolean"),
    ("unknown field", {"model": NAME, "messages": QUESTION, "foo": 1}, 400, "foo", "Unrecognized request argument"),
    ("logprobs", {"model": NAME, "messages": QUESTION, "logprobs": True}, 400, "logprobs", "not supported"),
    ("over the context", {"model": NAME, "messages": [{"role": "user", "content": "x" * 200}]}, 400, "messages",
     "maximum context length is 128 tokens"),
    ("prompt + max_tokens over the context", {"model": NAME, "messages": QUESTION, "max_tokens": 120}, 400,
     "messages", "maximum context length"),
]  # fmt: skip


@pytest.mark.parametrize("what, body, status, param, message", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(
    server, client, what, body, status, param, message
):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.base_url + "/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and message in error["message"], error
    assert chat(client, max_tokens=2).choices[0].finish_reason == "length"  # still serving


def test_the_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="other", messages=QUESTION)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="x" * 300)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="hi", temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.get("/nothing-here", cast_to=dict)


def test_api_key(sft_llama):
    s = start_server(str(sft_llama), "--api_key", "s3cret", "--max_model_len", str(CONTEXT))
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=s.base_url, api_key="wrong", max_retries=0).models.list()
        assert e.value.body["code"] == "invalid_api_key"
        assert httpx.get(s.base_url + "/models").status_code == 401
        assert httpx.get(s.url + "/health").status_code == 200
        ok = openai.OpenAI(base_url=s.base_url, api_key="s3cret", max_retries=0)
        assert ok.completions.create(model=str(sft_llama), prompt="hi", max_tokens=2).usage.completion_tokens <= 2
        assert "API key required" in s.output()
    finally:
        assert s.stop() == 0


def test_sigterm_finishes_the_requests_in_flight(random_llama):
    """Stopped while it generates a long answer and streams another, the server finishes both, refuses new
    connections, and exits 0."""
    s = start_server(str(random_llama))
    client = openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0)
    results: dict = {}

    def whole():
        r = client.completions.create(model=str(random_llama), prompt="hi", max_tokens=400, temperature=0)
        results["whole"] = r.usage.completion_tokens, r.choices[0].finish_reason

    def streamed():
        chunks = list(client.chat.completions.create(model=str(random_llama), messages=QUESTION, max_tokens=400,
                                                     temperature=0, stream=True))  # fmt: skip
        results["streamed"] = "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0]

    threads = [threading.Thread(target=whole), threading.Thread(target=streamed)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # both are generating
    s.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    assert s.proc.wait(60) == 0, s.output()
    assert results["whole"] == (400, "length")
    text, last = results["streamed"]
    assert len(text) == 400 and last.finish_reason == "length"  # greedy repeats one ASCII character
    assert "stopped by SIGTERM" in s.output()
    with pytest.raises(httpx.ConnectError):
        httpx.get(s.url + "/health")
