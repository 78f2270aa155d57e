"""Tiny random models: byte tokenizer, configs, build/load with plain transformers, specs."""

from __future__ import annotations

import unicodedata

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatrlhf.models.tiny import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    TINY_ARCHS,
    build_tiny_model,
    byte_tokenizer,
    parse_tiny_spec,
    tiny_config,
)

TEXT = "Hello, wörld! 3+4=7"
TRICKY = "  two  spaces,\ttab\n\nnewlines 日本語 🙂 don't <|eos|> end "


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(root / arch, arch=arch, hidden=32, layers=2, heads=4) for arch in TINY_ARCHS}


def test_byte_tokenizer_ids_and_round_trip():
    tok = byte_tokenizer()
    assert tok.convert_tokens_to_ids(["<|pad|>", "<|bos|>", "<|eos|>"]) == [256, 257, 258] == [PAD_ID, BOS_ID, EOS_ID]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert len(tok) == 259
    assert tok.padding_side == "right" and tok.model_max_length == 512
    ids = tok(TEXT)["input_ids"]
    assert ids == list(TEXT.encode("utf-8")), "no BOS/EOS added; one token per byte"
    assert tok.decode(ids) == TEXT
    not_nfc = "e\u0301"
    assert tok.decode(tok(not_nfc)["input_ids"]) == not_nfc
    ids = tok(TRICKY)["input_ids"]
    assert ids.count(EOS_ID) == 1
    assert tok.decode(ids) == TRICKY
    assert tok.decode(ids, skip_special_tokens=True) == TRICKY.replace("<|eos|>", "")


def test_chat_template():
    tok = byte_tokenizer()
    user = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == "User: hi\nAssistant:"
    conversation = [{"role": "system", "content": "Be brief."}, *user, {"role": "assistant", "content": "hello"}]
    text = "System: Be brief.\nUser: hi\nAssistant: hello<|eos|>\n"
    assert tok.apply_chat_template(conversation, tokenize=False) == text
    out = tok.apply_chat_template(conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assistant = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert assistant == [*b"hello", EOS_ID]
    with pytest.raises(Exception, match="unknown chat role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
    assert byte_tokenizer(chat_template=False).chat_template is None


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_config(arch):
    cfg = tiny_config(
        arch, 259, hidden=64, layers=3, heads=4, max_positions=128, pad_token_id=256, bos_token_id=257, eos_token_id=258
    )
    assert cfg.vocab_size == 259
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (256, 257, 258)
    assert cfg.tie_word_embeddings is True
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 3, 4)
    assert cfg.max_position_embeddings == 128


def test_tiny_config_errors():
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with pytest.raises(ValueError, match="gpt2, opt, llama, qwen2"):
        tiny_config("mamba", 259, **ids)
    with pytest.raises(ValueError, match="divisible"):
        tiny_config("gpt2", 259, hidden=30, heads=4, **ids)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_build_load_forward_generate(model_dirs, arch):
    model = AutoModelForCausalLM.from_pretrained(model_dirs[arch])
    tok = AutoTokenizer.from_pretrained(model_dirs[arch])
    assert model.config.model_type == arch
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, len(tok)) == (PAD_ID, BOS_ID, EOS_ID, 259)
    gen = model.generation_config
    assert (gen.pad_token_id, gen.bos_token_id, gen.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert tok.decode(tok(TEXT)["input_ids"]) == TEXT
    # Every architecture keeps the byte ids for NFC text (qwen2 loads as Qwen2Tokenizer, which normalises NFC).
    assert tok(TRICKY)["input_ids"] == byte_tokenizer()(unicodedata.normalize("NFC", TRICKY))["input_ids"]
    assert (
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        == "User: hi\nAssistant:"
    )

    prompts = ["Write 3 words that start with b.", "hi"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, len(prompts[0]), 259)

    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert batch["input_ids"][1, 0].item() == PAD_ID and batch["attention_mask"][1, 0].item() == 0
    alone = tok(prompts[1:], return_tensors="pt")
    # Positions count real tokens only, so a left-padded row sees the same positions as the prompt alone.
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded_last = model(**batch, position_ids=position_ids).logits[1, -1]
        alone_last = model(**alone).logits[0, -1]
        generate = dict(max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        out = model.generate(**batch, **generate)
        out_alone = model.generate(**alone, **generate)
    torch.testing.assert_close(padded_last, alone_last, atol=1e-5, rtol=0)
    prompt_len, alone_len = batch["input_ids"].shape[1], alone["input_ids"].shape[1]
    assert out.shape[0] == 2 and prompt_len < out.shape[1] <= prompt_len + 5
    assert torch.equal(out[:, :prompt_len], batch["input_ids"])
    new_alone = out_alone[0, alone_len:]
    assert torch.equal(out[1, prompt_len : prompt_len + len(new_alone)], new_alone)


def test_build_is_seeded_and_atomic(tmp_path):
    a = build_tiny_model(tmp_path / "a", arch="gpt2", hidden=32, seed=0)
    b = build_tiny_model(tmp_path / "b", arch="gpt2", hidden=32, seed=0)
    c = build_tiny_model(tmp_path / "c", arch="gpt2", hidden=32, seed=1)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path / "e", arch="gpt2", hidden=32, seed=0)
    assert torch.equal(torch.rand(3), expected), "building leaves the caller's RNG alone"
    with pytest.raises(FileExistsError):
        build_tiny_model(a, arch="gpt2", hidden=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c", "e"], "no temp dirs left behind"
    with pytest.raises(ValueError):
        build_tiny_model(tmp_path / "d", arch="bert")
    assert not (tmp_path / "d").exists()


def test_parse_tiny_spec():
    assert parse_tiny_spec("gpt2") is None
    assert parse_tiny_spec("/models/llama") is None
    assert parse_tiny_spec("tiny:llama") == {"arch": "llama"}
    assert parse_tiny_spec("tiny:gpt2") == {"arch": "gpt2"}
    assert parse_tiny_spec("tiny:llama:hidden=192,layers=4,heads=4") == {
        "arch": "llama",
        "hidden": 192,
        "layers": 4,
        "heads": 4,
    }
    assert parse_tiny_spec("tiny:qwen2:seed=3") == {"arch": "qwen2", "seed": 3}
    assert parse_tiny_spec("tiny:gpt2:positions=1024") == {"arch": "gpt2", "positions": 1024}
    for bad in [
        "tiny:",
        "tiny:bert",
        "tiny:llama:",
        "tiny:llama:hidden",
        "tiny:llama:width=3",
        "tiny:llama:hidden=x",
        "tiny:llama:hidden=64,hidden=64",
        "tiny:llama:hidden=100,heads=3",
        "tiny:llama:layers=0",
        "tiny:llama:positions=0",
    ]:
        with pytest.raises(ValueError):
            parse_tiny_spec(bad)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_positions_sets_the_context_length(tmp_path, arch):
    out = build_tiny_model(tmp_path / arch, arch=arch, hidden=32, layers=1, heads=4, positions=1024)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.model_max_length == 1024
    positions = model.config.n_positions if arch == "gpt2" else model.config.max_position_embeddings
    assert positions == 1024
    ids = torch.randint(0, 256, (1, 900))  # past the default 512 positions
    assert model(ids).logits.shape == (1, 900, len(tok))
