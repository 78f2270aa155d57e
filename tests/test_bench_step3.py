"""bench/step3.py, DeepSpeed-Chat's step-3 setting, on its tiny preset: the models it builds, the prompts it writes,
and one whole run of the script on the CPU (the GPU figures it exists for are measured on a GPU machine)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import BENCH, load_bench


@pytest.fixture(scope="module")
def step3():
    with load_bench("step3") as module:
        yield module


def test_the_actor_keeps_opts_vocabulary_but_samples_only_byte_tokens(step3, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatrlhf.models.tiny import EOS_ID, TINY_VOCAB_SIZE

    path = step3.build_actor(tmp_path, "tiny", 2048, "float32")
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.lm_head.weight.shape[0] == step3.ACTORS["tiny"]["vocab_size"] > TINY_VOCAB_SIZE
    assert not torch.equal(model.lm_head.weight, model.model.decoder.embed_tokens.weight)
    prompt = tok("User: hello\nAssistant:", return_tensors="pt")
    torch.manual_seed(0)
    out = model.generate(**prompt, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=200,
                         num_return_sequences=8, pad_token_id=tok.pad_token_id)  # fmt: skip
    new = out[:, prompt["input_ids"].shape[1] :]
    assert new.shape == (8, 200)  # no sequence ended
    assert int(new.max()) < TINY_VOCAB_SIZE and not (new == EOS_ID).any()
    assert len(set(new.flatten().tolist())) > 50  # it still samples widely among the bytes


def test_every_prompt_renders_to_exactly_the_token_count(step3, tmp_path):
    from transformers import AutoTokenizer

    rm = step3.build_reward_model(tmp_path, "tiny", 2048, "float32")
    path = step3.write_prompts(tmp_path / "prompts.jsonl", rm, 12, 96)
    tok = AutoTokenizer.from_pretrained(rm)
    texts = [json.loads(line)["prompt"] for line in path.read_text().splitlines()]
    assert len(texts) == 12 and len(set(texts)) > 1
    for text in texts:  # the chat template as TRL and the serving path apply it
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]  # fmt: skip
        assert len(ids) == 96, text


def test_a_whole_run_of_the_tiny_preset(tmp_path):
    out = tmp_path / "step3.json"
    cmd = [sys.executable, str(BENCH / "step3.py"), "--preset", "tiny", "--device", "cpu", "--dtype", "float32",
           "--backends", "hf", "--iterations", "2", "--warmup", "1", "--workdir", str(tmp_path / "w"),
           "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    got = json.loads(out.read_text())
    (row,) = got["rows"]
    assert (row["actor"], row["backend"], row["exit"]) == ("tiny", "hf", 0)
    med = row["median_s"]
    assert row["samples_per_s"] == pytest.approx(got["batch"] / med["iteration"])
    assert row["tokens_per_s"] == pytest.approx(got["batch"] * (96 + 16) / med["iteration"])
    assert 0 < med["generate"] < med["iteration"]
    assert row["device_peak_gib"] is None  # no CUDA here
    assert "--train.rollout_batch_size 4" in row["command"] and "--train.max_prompt_len 96" in row["command"]
