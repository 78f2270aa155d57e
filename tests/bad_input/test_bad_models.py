"""Bad models: paths that are not model directories, broken directories, files damaged by an interrupted download or
copy, tokenizers that do not fit, and models of the wrong kind as reward model or critic."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from chatrlhf.cli import main
from chatrlhf.models.load import add_value_head

from .conftest import QUIET, jsonl

GOOD = [{"prompt": "p", "response": "r"}] * 4
PAIRS = [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"} for i in range(4)]
PROMPTS = [{"prompt": f"Name 2 words that begin with {letter}."} for letter in "abcd"]
DAMAGED = r"; the file is damaged or incomplete \(an interrupted download or copy\?\): download or copy it again"


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

    # Files cut short or overwritten, as an interrupted download or copy leaves them.
    weights = base / "model.safetensors"
    size = weights.stat().st_size
    os.truncate(copy("truncated_weights") / "model.safetensors", size // 2)
    os.truncate(copy("empty_weights") / "model.safetensors", 0)
    (copy("garbage_weights") / "model.safetensors").write_bytes(b"<html>502 Bad Gateway</html>" * 100)
    bin_model = copy("truncated_bin")
    (bin_model / "model.safetensors").unlink()
    torch.save(load_file(weights), bin_model / "pytorch_model.bin")
    os.truncate(bin_model / "pytorch_model.bin", (bin_model / "pytorch_model.bin").stat().st_size // 2)
    tokenizer = copy("truncated_tokenizer") / "tokenizer.json"
    os.truncate(tokenizer, tokenizer.stat().st_size // 2)
    (copy("not_a_tokenizer") / "tokenizer.json").write_text('{"version": "1.0"}')
    (copy("broken_tokenizer_config") / "tokenizer_config.json").write_text('{"eos_token": ')

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
    assert re.search(
        r"model '.*broken_config': config\.json is not valid JSON \(Expecting property name enclosed in double "
        r"quotes: line 1 column 24 \(char 23\)\)" + DAMAGED,
        err,
    ), err


@pytest.mark.parametrize(
    "variant, problem",
    [
        (
            "truncated_weights",
            r"model\.safetensors is not a complete safetensors file \(Error while deserializing header: incomplete "
            r"metadata, file not fully covered\)",
        ),
        (
            "empty_weights",
            r"model\.safetensors is not a complete safetensors file \(Error while deserializing header: header too "
            r"small\)",
        ),
        (
            "garbage_weights",
            r"model\.safetensors is not a complete safetensors file \(Error while deserializing header: header too "
            r"large\)",
        ),
        ("truncated_bin", r"pytorch_model\.bin is not a complete PyTorch checkpoint \(not a zip archive\)"),
        ("truncated_tokenizer", r"tokenizer\.json is not valid JSON \(Expecting .*: line \d+ column \d+ .*\)"),
        (
            "not_a_tokenizer",
            r"tokenizer\.json is not a tokenizer the tokenizers library can read \(Model missing\. at line 1 "
            r"column 18\)",
        ),
        (
            "broken_tokenizer_config",
            r"tokenizer_config\.json is not valid JSON \(Expecting value: line 1 column 15 \(char 14\)\)",
        ),
    ],
)
def test_damaged_model_file(variant, problem, variants, tmp_path, out, fail):
    """An interrupted download or copy: the message names the directory and the damaged file."""
    err = fail(sft_with(variants / variant, jsonl(tmp_path / "d.jsonl", GOOD), out))
    assert re.search(rf"model '.*{variant}': {problem}{DAMAGED}", err), err


def test_damaged_reward_model_file(variants, tmp_path, reward, fail):
    """The reward stage loads its model as a value model: the same message."""
    err = fail(reward(jsonl(tmp_path / "pairs.jsonl", PAIRS)) + ["--model", str(variants / "truncated_weights")])
    assert re.search(r"model '.*truncated_weights': model\.safetensors is not a complete safetensors file", err), err


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


# ---------------------------------------------------------------------------------------- the wrong kind of model


@pytest.fixture(scope="module")
def value_models(tiny_dirs, tmp_path_factory):
    """A reward model with a (random, untrained) head, a 2-label classifier, and a causal LM with another tokenizer."""
    root = tmp_path_factory.mktemp("value-models")
    add_value_head(tiny_dirs["llama"], root / "rm")
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_dirs["llama"], num_labels=2)
    classifier.save_pretrained(root / "classifier")
    AutoTokenizer.from_pretrained(tiny_dirs["llama"]).save_pretrained(root / "classifier")
    shutil.copytree(tiny_dirs["llama"], root / "other_vocab")
    tok = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(root / "other_vocab")
    return root


def ppo(actor, *flags: str) -> list[str]:
    """A one-iteration PPO run of `actor`; the reward model and critic come in `flags`."""
    short = ["--train.iterations", "1", "--train.rollout_batch_size", "2", "--train.generation.max_new_tokens", "4"]
    return ["rl", "--actor", str(actor), *short, "--data.eval_fraction", "0", *QUIET, *flags]


NO_HEAD = (
    r"holds no trained value head \({why}\): it is a causal LM, not a reward model or critic, and its head would be "
    r"random; "
)
REWARD_ADVICE = r"train a reward model from it with `chatrlhf reward --model .*`, or reward with Python functions"


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_causal_lm_as_reward_model(algo, tiny_dirs, tmp_path, out, fail):
    """Transformers would give the causal LM a random score head and RL would train against noise."""
    prompts = jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    flags = ["--reward_model", str(tiny_dirs["llama"]), "--train.algo", algo, "--train.group_size", "2"]
    err = fail(ppo(tiny_dirs["llama"], *flags, "--data.paths", str(prompts), "--output_dir", str(out)))
    why = NO_HEAD.format(why=r"score\.weight not in its checkpoint")
    assert re.search(rf"reward model '.*llama' {why}{REWARD_ADVICE}", err), err


def test_causal_lm_without_a_classification_class_as_reward_model(tiny_dirs, tmp_path, out, fail):
    """granite has no sequence-classification class: its value models are backbone + value_head.safetensors."""
    prompts = jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    flags = ["--reward_model", str(tiny_dirs["granite"]), "--data.paths", str(prompts), "--output_dir", str(out)]
    err = fail(ppo(tiny_dirs["granite"], *flags))
    why = NO_HEAD.format(why=r"it has no value_head\.safetensors")
    assert re.search(rf"reward model '.*granite' {why}{REWARD_ADVICE}", err), err


def test_causal_lm_with_another_tokenizer_as_reward_model(value_models, tiny_dirs, tmp_path, out, fail):
    """A reward model with its own tokenizer is loaded as transformers' classifier: the same check."""
    prompts = jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    flags = ["--reward_model", str(value_models / "other_vocab"), "--train.algo", "grpo", "--train.group_size", "2"]
    err = fail(ppo(tiny_dirs["llama"], *flags, "--data.paths", str(prompts), "--output_dir", str(out)))
    assert re.search(
        r"reward model '.*other_vocab' holds no trained score head \(score\.weight not in its checkpoint\): it is "
        rf"not a reward model, and its head would be random; {REWARD_ADVICE}",
        err,
    ), err


def test_classifier_with_several_labels_as_reward_model(value_models, tiny_dirs, tmp_path, out, fail):
    prompts = jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    flags = ["--reward_model", str(value_models / "classifier"), "--data.paths", str(prompts), "--output_dir", str(out)]
    err = fail(ppo(tiny_dirs["llama"], *flags))
    assert re.search(
        r"reward model '.*classifier': its checkpoint does not fit a 1-label value model \(mismatched: "
        r"score\.weight\); a reward model has one scalar output",
        err,
    ), err


def test_causal_lm_as_critic(value_models, tiny_dirs, tmp_path, out, fail):
    """A critic from a causal LM would start from a random head: refused unless critic_fresh_head is set."""
    prompts = jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    flags = ["--reward_model", str(value_models / "rm"), "--critic", str(tiny_dirs["llama"])]
    err = fail(ppo(tiny_dirs["llama"], *flags, "--data.paths", str(prompts), "--output_dir", str(out)))
    why = NO_HEAD.format(why=r"score\.weight not in its checkpoint")
    assert re.search(rf"critic '.*llama' {why}.*or set critic_fresh_head true to start its value head", err), err


def test_causal_lm_as_critic_with_a_fresh_head(value_models, tiny_dirs, tmp_path, out, capsys):
    """Opted in: accepted (exit 0), announced."""
    prompts = jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    flags = ["--reward_model", str(value_models / "rm"), "--critic", str(tiny_dirs["llama"])]
    args = ppo(tiny_dirs["llama"], *flags, "--critic_fresh_head", "True", "--data.paths", str(prompts))
    assert main([*args, "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (
        f"note: '{tiny_dirs['llama']}' has no trained value head; the critic's scalar head starts from random"
        in printed
    )
    assert (out / "critic" / "config.json").is_file()


def test_reward_stage_starts_from_a_causal_lm(tiny_dirs, tmp_path, reward, out, capsys):
    """The reward stage trains the head: a causal LM is the usual start (exit 0), and a note says the head is new."""
    assert main(reward(jsonl(tmp_path / "pairs.jsonl", PAIRS), "--data.eval_fraction", "0")) == 0
    printed = capsys.readouterr().out
    note = f"note: '{tiny_dirs['llama']}' has no trained value head; the reward model's scalar head starts from random"
    assert note in printed
    assert (out / "model" / "config.json").is_file()
