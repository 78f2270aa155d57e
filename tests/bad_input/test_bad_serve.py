"""Bad input to the commands that use a trained model — `chatrlhf chat`, `serve` and `eval`: one message, exit 2,
nothing left behind. (Bad requests to a running server are 4xx responses instead: tests/serve/test_server.py.)"""

from __future__ import annotations

import socket
import sys

import pytest

from .conftest import jsonl, write

JUDGES = """
def word(prompt, response, **fields):
    return "good"

def broken(prompt, response, **fields):
    raise ValueError("no score for this response")
"""


@pytest.fixture()
def judges_module(tmp_path, monkeypatch):
    write(tmp_path / "catalog_judges.py", JUDGES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "catalog_judges", raising=False)
    return "catalog_judges"


@pytest.mark.parametrize(
    "flags, message",
    [
        ([], "model is required: give a model directory (chatrlhf chat MODEL_DIR)"),
        (["{missing}"], "model '{missing}': not a directory"),
        (["{model}", "--temperature", "-1"], "temperature must be >= 0 (0 = greedy), got -1.0"),
        (["{model}", "--top_p", "0"], "top_p must be in (0, 1], got 0.0"),
        (["{model}", "--max_new_tokens", "0"], "max_new_tokens must be >= 1, got 0"),
        (["{model}", "--max_model_len", "100000"], "max_model_len=100000 is over the context length of model"),
        (["{model}", "--run.dtype", "float16", "--run.device", "cpu"], "run.dtype=float16 on the CPU"),
        (["{model}", "--run.device", "cuda:7"], "run.device"),
    ],
    ids=["no model", "not a directory", "temperature", "top_p", "max_new_tokens", "max_model_len", "float16", "device"],
)
def test_bad_chat(flags, message, fail, tiny_dirs, tmp_path):
    values = {"model": str(tiny_dirs["llama"]), "missing": str(tmp_path / "nope")}
    err = fail(["chat", *(f.format(**values) for f in flags)])
    assert message.format(**values) in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--port", "70000"], "port must be in 0..65535 (0 = any free port), got 70000"),
        (["--max_batch_size", "0"], "max_batch_size and max_n must be >= 1, got 0 and 16"),
        (["--batch_wait_ms", "-1"], "batch_wait_ms must be >= 0, got -1.0"),
        (["--host", ""], "host is empty"),
        (["--host", "no.such.host.invalid"], "cannot listen on no.such.host.invalid:8000: Name or service not known"),
        (["--cpu_kv_cache_gib", "0"], "cpu_kv_cache_gib must be > 0, got 0.0"),
        (["--backend", "vllm", "--run.threads", "1"], "run.threads=1 applies to backend hf"),
    ],
    ids=["port", "batch size", "batch wait", "empty host", "unknown host", "kv cache", "vllm threads"],
)
def test_bad_serve(flags, message, fail, tiny_dirs):
    assert message in fail(["serve", str(tiny_dirs["llama"]), *flags])


def test_serve_on_a_port_in_use(fail, tiny_dirs):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = fail(["serve", str(tiny_dirs["llama"]), "--port", str(port)])
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in err


def test_serve_a_model_that_is_not_a_directory(fail, tmp_path):
    file = write(tmp_path / "model.bin", "not a model")
    assert f"model '{file}': not a directory" in fail(["serve", str(file), "--port", "0"])


@pytest.fixture()
def eval_args(tiny_dirs, out, tmp_path):
    """`eval_args(*flags)`: an evaluation of the tiny llama on two demo prompts, into `out`."""
    prompts = jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Name 2 words that begin with a."}] * 2)

    def args(*flags: str, prompts_path=prompts) -> list[str]:
        where = ["--output_dir", str(out), "--generation.max_new_tokens", "4", "--samples_per_prompt", "2"]
        return ["eval", "--models", str(tiny_dirs["llama"]), "--prompts", str(prompts_path), *where, *flags]

    return args


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prompts"], "nothing to evaluate: give models and prompts (side by side), models and perplexity_data"),
        (["--names", "a", "b"], "names has 2 values for 1 models; give one per model"),
        (["--pass_at", "1", "3"], "pass_at [3]: each k must be in 1..samples_per_prompt (2)"),
        (["--pairs", "pairs.jsonl"], "pairs is set but reward_model is empty"),
        (["--judges", "a:f", "a:f"], "judges names a:f more than once"),
        (["--generation.temperature", "0"], "generation: temperature must be > 0"),
        (["--num_prompts", "0"], "num_prompts must be >= 1, got 0"),
        (["--judges", "no_such_module:f"], "judge 'no_such_module:f': cannot import: No module named 'no_such_module'"),
        (["--verifiers", "chatrlhf.demo.task"], "verifier 'chatrlhf.demo.task': expected module:function"),
        (["--reward_model", "{missing}"], "model '{missing}': not a directory"),
    ],
    ids=[
        "nothing",
        "names",
        "pass_at",
        "pairs without rm",
        "judge twice",
        "temperature",
        "num_prompts",
        "judge import",
        "verifier spec",
        "missing rm",
    ],  # fmt: skip
)
def test_bad_eval(flags, message, fail, eval_args, tmp_path):
    missing = str(tmp_path / "nope")
    err = fail(eval_args(*(f.format(missing=missing) for f in flags)))
    assert message.format(missing=missing) in err


def test_eval_judge_that_fails(fail, eval_args, judges_module):
    err = fail(eval_args("--judges", f"{judges_module}:word"))
    assert "judge 'catalog_judges:word' returned str 'good' for prompt 'Name 2 words that begin with a.'" in err
    err = fail(eval_args("--verifiers", f"{judges_module}:broken"))
    assert "verifier 'catalog_judges:broken' raised ValueError: no score for this response" in err


def test_eval_bad_prompt_record(fail, eval_args, tmp_path):
    bad = jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, {"prompt": ""}])
    err = fail(eval_args(prompts_path=bad))
    assert "bad.jsonl:line 2: field 'prompt'" in err


def test_eval_into_an_earlier_evaluation(fail, eval_args, out):
    out.mkdir()
    write(out / "eval.json", "{}")
    err = fail(eval_args())
    assert "already holds an evaluation (eval.json); set overwrite or another output_dir" in err
