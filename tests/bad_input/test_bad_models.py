"""Bad models: paths that are not model directories, broken directories, and tokenizers that do not fit."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from chatrlhf.cli import main

from .conftest import QUIET, jsonl

GOOD = [{"prompt": "p", "response": "r"}] * 4


def sft_with(model, data, out) -> list[str]:
    where = ["--output_dir", str(out), "--data.paths", str(data), "--data.eval_fraction", "0"]
    return ["sft", "--model", str(model), *where, "--train.max_steps", "1", *QUIET]


@pytest.fixture(scope="module")
def variants(tiny_dirs, tmp_path_factory):
    """Copies of the tiny llama, each broken in one way."""
    root = tmp_path_factory.mktemp("variants")
    base = tiny_dirs["llama"]

    def copy(name):
        shutil.copytree(base, root / name)
        return root / name

    def drop_token(model, key):
        path = model / "tokenizer_config.json"
        config = json.loads(path.read_text())
        del config[key]
        path.write_text(json.dumps(config))

    drop_token(copy("no_pad"), "pad_token")
    drop_token(copy("no_eos"), "eos_token")
    (copy("no_weights") / "model.safetensors").unlink()
    (copy("broken_config") / "config.json").write_text('{"model_type": "llama",')

    # An embedding one row short of the tokenizer: 258 rows for 259 tokens.
    tok = AutoTokenizer.from_pretrained(base)
    config = AutoConfig.from_pretrained(base)
    config.vocab_size = len(tok) - 1
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "short_vocab")
    tok.save_pretrained(root / "short_vocab")
    return root


def test_missing_model_directory(tmp_path, out, fail):
    err = fail(sft_with(tmp_path / "nomodel", jsonl(tmp_path / "d.jsonl", GOOD), out))
    assert re.search(r"model '.*nomodel': no such directory", err), err


def test_directory_that_is_not_a_model(tmp_path, out, fail):
    (tmp_path / "empty").mkdir()
    err = fail(sft_with(tmp_path / "empty", jsonl(tmp_path / "d.jsonl", GOOD), out))
    assert re.search(r"model '.*empty': not a Hugging Face model directory \(no config\.json\)", err), err


def test_model_path_that_is_a_file(tmp_path, out, fail):
    data = jsonl(tmp_path / "d.jsonl", GOOD)
    err = fail(sft_with(data, data, out))
    assert re.search(r"model '.*d\.jsonl': is a file; expected a Hugging Face model directory", err), err


def test_model_directory_without_weights(variants, tmp_path, out, fail):
    err = fail(sft_with(variants / "no_weights", jsonl(tmp_path / "d.jsonl", GOOD), out))
    assert re.search(r"model '.*no_weights': cannot load as a causal LM: .*no file named model\.safetensors", err)


def test_model_with_broken_config(variants, tmp_path, out, fail):
    err = fail(sft_with(variants / "broken_config", jsonl(tmp_path / "d.jsonl", GOOD), out))
    assert re.search(r"model '.*broken_config': cannot load its tokenizer: .*config\.json.*not a valid JSON", err)


def test_tokenizer_without_pad_token_uses_eos(variants, tmp_path, out, capsys):
    """Documented fallback, announced: EOS pads (as DeepSpeed-Chat and TRL do); the run goes on."""
    assert main(sft_with(variants / "no_pad", jsonl(tmp_path / "d.jsonl", GOOD), out)) == 0
    printed = capsys.readouterr().out
    assert f"note: tokenizer of '{variants / 'no_pad'}' has no pad token; using EOS ('<|eos|>') as pad" in printed
    assert (out / "model" / "config.json").is_file()


def test_tokenizer_without_eos_token(variants, tmp_path, out, fail):
    err = fail(sft_with(variants / "no_eos", jsonl(tmp_path / "d.jsonl", GOOD), out))
    assert re.search(r"model '.*no_eos': the tokenizer has no EOS token; responses could never end", err), err


def test_embedding_smaller_than_the_vocabulary(variants, tmp_path, out, fail):
    err = fail(sft_with(variants / "short_vocab", jsonl(tmp_path / "d.jsonl", GOOD), out))
    assert re.search(
        r"model '.*short_vocab': embedding has 258 rows but the tokenizer has 259 tokens; "
        r"the model and tokenizer do not match",
        err,
    ), err
