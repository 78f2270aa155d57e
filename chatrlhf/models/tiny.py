"""Tiny randomly initialised models of real architectures, for the demo and the tests.

They are ordinary Hugging Face model directories (config.json, safetensors weights, tokenizer files,
generation_config.json) built offline: nothing is downloaded. The tokenizer is byte-level with no merges, so any
UTF-8 text round-trips and the token id of a byte is its value (0–255); three special tokens follow:

    <|pad|> = 256, <|bos|> = 257, <|eos|> = 258        (vocabulary size 259)

A preset is named by a spec string, e.g. "tiny:llama" or "tiny:qwen2:hidden=192,layers=4,heads=4"
(see `parse_tiny_spec`); `positions=N` sets the context length (position embeddings and the tokenizer's
`model_max_length`, 512 by default).

`AutoTokenizer` loads the tokenizer of a qwen2 directory as `Qwen2Tokenizer`, which rebuilds the backend with an
NFC normalizer: ids are the same for NFC text (all of the demo), but text that is not NFC is normalised first.
The other architectures load the saved tokenizer.json unchanged.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    GPT2Config,
    GraniteConfig,
    LlamaConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|pad|>", "<|bos|>", "<|eos|>"
PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
"""Ids of the special tokens: they follow the 256 byte tokens, whose ids are the byte values."""
TINY_VOCAB_SIZE = EOS_ID + 1
MODEL_MAX_LENGTH = 512

# User turns "User: {content}\n", assistant turns "Assistant: {content}<|eos|>\n", system "System: {content}\n";
# the generation prompt is "Assistant:". The {% generation %} block marks assistant content (and its EOS) for
# `apply_chat_template(..., return_assistant_tokens_mask=True)`.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ 'System: ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ 'User: ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'Assistant: ' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)

TINY_PRESET_PREFIX = "tiny:"
TINY_ARCHS = ("gpt2", "opt", "llama", "qwen2", "granite")
"""granite has a causal LM but no sequence-classification class in transformers: its reward model and critic are
the base model plus a separate head (the backbone+head value-model format, docs/models.md)."""
ROTARY_ARCHS = ("llama", "qwen2", "granite")
DEFAULT_HIDDEN, DEFAULT_LAYERS, DEFAULT_HEADS = 128, 2, 4
_SPEC_INT_KEYS = ("hidden", "layers", "heads", "positions", "seed")


def _byte_symbols() -> list[str]:
    """The printable symbol ByteLevel uses for each byte value 0..255 (GPT-2's bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, shifted = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            # Bytes that are not printable (controls, space, ...) map to code points from 256 on, in byte order.
            symbols[b] = chr(256 + shifted)
            shifted += 1
    return [symbols[b] for b in range(256)]


def byte_tokenizer(chat_template: bool = True, max_length: int = MODEL_MAX_LENGTH) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with no merges: token id = byte value, then <|pad|>, <|bos|>, <|eos|> (256, 257, 258).

    No BOS or EOS is added on encoding (no post-processor); padding is on the right by default; its
    `model_max_length` is `max_length`. With `chat_template`, it carries the simple CHAT_TEMPLATE.
    """
    vocab = {symbol: i for i, symbol in enumerate(_byte_symbols())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([PAD_TOKEN, BOS_TOKEN, EOS_TOKEN])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        # Saved as null: a byte tokenizer has no unknown token, and without it Qwen2Tokenizer (which transformers
        # uses to load a qwen2 model directory) would add "<|endoftext|>" as a 260th token.
        unk_token=None,
        model_max_length=max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    ids = tokenizer.convert_tokens_to_ids([PAD_TOKEN, BOS_TOKEN, EOS_TOKEN])
    if ids != [PAD_ID, BOS_ID, EOS_ID] or len(tokenizer) != EOS_ID + 1:
        raise RuntimeError(f"byte tokenizer special ids {ids} (size {len(tokenizer)}), expected 256, 257, 258")
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _check_sizes(arch: str, hidden: int, layers: int, heads: int, positions: int = MODEL_MAX_LENGTH) -> None:
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {', '.join(TINY_ARCHS)}")
    for name, value in (("hidden", hidden), ("layers", layers), ("heads", heads), ("positions", positions)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"tiny model {name} must be a positive integer, got {value!r}")
    if hidden % heads:
        raise ValueError(f"tiny model hidden={hidden} must be divisible by heads={heads}")
    if arch in ROTARY_ARCHS and (hidden // heads) % 2:
        raise ValueError(f"{arch} head size hidden/heads = {hidden // heads} must be even for rotary embeddings")


def _gated_ffn_size(hidden: int) -> int:
    """≈ (8/3)·hidden rounded up to a multiple of 32: the SwiGLU FFN width of LLaMA (Touvron et al. 2023, §2)."""
    return -(-8 * hidden // (3 * 32)) * 32


def tiny_config(
    arch: str,
    vocab_size: int,
    hidden: int = DEFAULT_HIDDEN,
    layers: int = DEFAULT_LAYERS,
    heads: int = DEFAULT_HEADS,
    max_positions: int = MODEL_MAX_LENGTH,
    *,
    pad_token_id: int,
    bos_token_id: int,
    eos_token_id: int,
) -> PretrainedConfig:
    """A small config of `arch` (one of TINY_ARCHS) with no dropout and tied input/output embeddings."""
    _check_sizes(arch, hidden, layers, heads)
    ids = dict(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=max_positions,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_inner=4 * hidden,
            attn_pdrop=0.0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            summary_first_dropout=0.0,
            tie_word_embeddings=True,
            **ids,
        )
    if arch == "opt":
        return OPTConfig(
            vocab_size=vocab_size,
            max_position_embeddings=max_positions,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            ffn_dim=4 * hidden,
            word_embed_proj_dim=hidden,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            layerdrop=0.0,
            tie_word_embeddings=True,
            **ids,
        )
    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config, "granite": GraniteConfig}[arch]
    return config_class(
        vocab_size=vocab_size,
        max_position_embeddings=max_positions,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=_gated_ffn_size(hidden),
        attention_dropout=0.0,
        tie_word_embeddings=True,
        **ids,
    )


def build_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    hidden: int = DEFAULT_HIDDEN,
    layers: int = DEFAULT_LAYERS,
    heads: int = DEFAULT_HEADS,
    seed: int = 0,
    chat_template: bool = True,
    positions: int = MODEL_MAX_LENGTH,
) -> Path:
    """Build a randomly initialised `arch` model with the byte tokenizer and save both to `out_dir`.

    The directory is written beside `out_dir` under a temporary name and renamed when complete, so a crash never
    leaves a half-written model. Raises FileExistsError if `out_dir` exists and is not empty.
    """
    out_dir = Path(out_dir)
    _check_sizes(arch, hidden, layers, heads, positions)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not an empty directory")
    tokenizer = byte_tokenizer(chat_template=chat_template, max_length=positions)
    ids = dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    config = tiny_config(arch, len(tokenizer), hidden, layers, heads, tokenizer.model_max_length, **ids)
    with torch.random.fork_rng(devices=[]):  # seeded init without resetting the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(**ids)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        model.save_pretrained(tmp_dir, safe_serialization=True)
        tokenizer.save_pretrained(tmp_dir)
        os.replace(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def parse_tiny_spec(spec: str) -> dict | None:
    """Keyword arguments of `build_tiny_model` (all but out_dir) for a spec "tiny:ARCH[:key=int,...]".

    Keys: hidden, layers, heads, positions (the context length), seed. Returns None when `spec` does not start
    with "tiny:" (it names something else, e.g. a model directory); raises ValueError on a malformed tiny spec.
    """
    if not spec.startswith(TINY_PRESET_PREFIX):
        return None
    arch, has_options, options = spec[len(TINY_PRESET_PREFIX) :].partition(":")
    kwargs: dict = {"arch": arch}
    for item in options.split(",") if has_options else ():
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in _SPEC_INT_KEYS:
            raise ValueError(
                f"bad tiny model option {item!r} in {spec!r}; expected key=int with key in {', '.join(_SPEC_INT_KEYS)}"
            )
        if key in kwargs:
            raise ValueError(f"tiny model option {key!r} given twice in {spec!r}")
        try:
            kwargs[key] = int(value)
        except ValueError:
            raise ValueError(f"tiny model option {key}={value!r} in {spec!r} is not an integer") from None
    hidden = kwargs.get("hidden", DEFAULT_HIDDEN)
    layers = kwargs.get("layers", DEFAULT_LAYERS)
    heads = kwargs.get("heads", DEFAULT_HEADS)
    try:
        _check_sizes(arch, hidden, layers, heads, kwargs.get("positions", MODEL_MAX_LENGTH))
    except ValueError as e:
        raise ValueError(f"bad tiny model spec {spec!r}: {e}") from None
    return kwargs
