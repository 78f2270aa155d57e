"""A `Generator` for a saved model directory, for the commands that only generate (`chatrlhf chat`, `serve`, `eval`):
the `hf` backend on the model loaded in this process, or a vLLM engine on the directory itself.

The context length is the model's own (`max_position_embeddings` in its config, which transformers also maps for
architectures that name it otherwise), unless a smaller one is asked for; a model whose config does not give one
needs it set.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, PreTrainedTokenizerBase

from chatrlhf.config import BackendOptions, GenerationConfig, RolloutConfig
from chatrlhf.engine.generation import Generator, HFGenerator
from chatrlhf.errors import UserError
from chatrlhf.models.load import load_causal_lm, load_tokenizer, loading, pick_device


@dataclass
class Opened:
    """A model directory ready to generate."""

    generator: Generator
    tokenizer: PreTrainedTokenizerBase
    context: int
    """Most tokens (prompt + response) a request may hold."""

    def close(self) -> None:
        """Release the engine: a vLLM engine shuts down (`VLLMGenerator.close`) so that another may start; a model
        loaded for `hf` is freed with this object."""
        close = getattr(self.generator, "close", None)
        if close is not None:
            close()


def model_context(path: str, asked: int) -> int:
    """The context length to serve `path` with: `asked` (0 = the model's own), never more than the model's."""
    with loading(path, "its config"):
        config = AutoConfig.from_pretrained(path)
    own = getattr(config, "max_position_embeddings", None)
    if own is None and asked == 0:
        raise UserError(
            f"model '{path}': its config gives no context length (max_position_embeddings); set max_model_len"
        )
    if own is not None and asked > own:
        raise UserError(f"max_model_len={asked} is over the context length of model '{path}' ({own} tokens)")
    return asked or own


def open_model(
    path: str,
    backend: str,
    *,
    option: str,
    dtype: str,
    device: torch.device,
    max_model_len: int = 0,
    cpu_kv_cache_gib: float = 1.0,
    gpu_memory_utilization: float = 0.9,
    enforce_eager: bool = True,
    generation: GenerationConfig | None = None,
) -> Opened:
    """The model directory `path` behind a generator of `backend` (`hf` or `vllm`); `generation` is its fixed
    sampling for `generate` (default: GenerationConfig()), `complete` takes each request's own. `option` names the
    setting that chose vLLM in error messages (e.g. `backend=vllm`)."""
    if not Path(path).is_dir():
        raise UserError(f"model '{path}': not a directory (give a model directory written by chatrlhf or transformers)")
    tok = load_tokenizer(path)
    context = model_context(path, max_model_len)
    generation = generation or GenerationConfig()
    if backend == "hf":
        model = load_causal_lm(path, tok, dtype, device).eval().requires_grad_(False)
        return Opened(HFGenerator(model, tok, generation), tok, context)
    from chatrlhf.engine.vllm import VLLMGenerator, check_vllm_support

    check_vllm_support(path, option)
    # a server keeps its memory: no sleep mode between requests
    rollout = RolloutConfig(
        backend="vllm",
        cpu_kv_cache_gib=cpu_kv_cache_gib,
        gpu_memory_utilization=gpu_memory_utilization,
        enforce_eager=enforce_eager,
        sleep=False,
    )
    return Opened(VLLMGenerator(path, tok, generation, rollout, dtype, context, device, option), tok, context)


def start(cfg: BackendOptions) -> torch.device:
    """Seed the RNGs, set the threads and pick the device of a command that only runs models (`cfg.run`)."""
    device = pick_device(cfg.run.device, cfg.run.dtype)
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    return device


def open_configured(
    cfg: BackendOptions,
    path: str,
    device: torch.device,
    max_model_len: int = 0,
    generation: GenerationConfig | None = None,
) -> Opened:
    """`open_model` with the backend settings of `cfg`."""
    return open_model(
        path,
        cfg.backend,
        option="backend=vllm",
        dtype=cfg.run.dtype,
        device=device,
        max_model_len=max_model_len,
        cpu_kv_cache_gib=cfg.cpu_kv_cache_gib,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        enforce_eager=cfg.enforce_eager,
        generation=generation,
    )
