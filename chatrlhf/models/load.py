"""Loading models and tokenizers, and the value-head model used as critic and reward model.

Any causal LM that transformers can load works: a hub id, a local HF directory, or a tiny random preset
(`tiny:llama`, built once into the run directory and then loaded through the same `from_pretrained` path).
Nothing here is special-cased by architecture name.

The reward model and the critic are transformers' `AutoModelForSequenceClassification` with one label: the
causal-LM backbone plus a scalar linear head. Saved that way, they load in plain transformers (and in vLLM) as a
reward model. For per-token values we run the backbone and apply the head to every position ourselves
(`ValueModel`), since the library's forward only returns the pooled score.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from chatrlhf import distributed as dist
from chatrlhf.data.collate import position_ids
from chatrlhf.errors import UserError
from chatrlhf.models.tiny import build_tiny_model, parse_tiny_spec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model(spec: str, workdir: Path) -> str:
    """A model spec → something `from_pretrained` accepts.

    `tiny:ARCH[:k=v,...]` is built (random init, fixed seed) into `workdir/base_model` once and that directory is
    returned; a local path must be a model directory; anything else is passed on as a hub id.
    """
    tiny = parse_tiny_spec(spec)
    if tiny is not None:
        out = workdir / "base_model"
        if dist.is_main() and not (out / "config.json").is_file():  # one writer when several ranks run
            build_tiny_model(out, **tiny)
        dist.barrier()
        return str(out)
    p = Path(spec).expanduser()
    looks_local = p.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if looks_local:
        if p.exists() and not p.is_dir():
            raise UserError(f"model '{spec}': is a file; expected a Hugging Face model directory (with config.json)")
        if not p.is_dir():
            raise UserError(f"model '{spec}': no such directory")
        if not (p / "config.json").is_file():
            raise UserError(f"model '{spec}': not a Hugging Face model directory (no config.json)")
    return str(p) if looks_local else spec


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer. Without a pad token, EOS doubles as pad (as DeepSpeed-Chat and TRL do)."""
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"model '{path}': cannot load its tokenizer: {e}") from None
    if tok.eos_token_id is None:
        raise UserError(f"model '{path}': the tokenizer has no EOS token; responses could never end")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
        print(f"note: tokenizer of '{path}' has no pad token; using EOS ({tok.eos_token!r}) as pad")
    return tok


def _check_vocab(model: PreTrainedModel, tok: PreTrainedTokenizerBase, path: str) -> None:
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < len(tok):
        raise UserError(
            f"model '{path}': embedding has {rows} rows but the tokenizer has {len(tok)} tokens; "
            "the model and tokenizer do not match"
        )


def load_causal_lm(path: str, tok: PreTrainedTokenizerBase, dtype: str, device: torch.device) -> PreTrainedModel:
    """A causal LM ready for training (dropout off is the caller's choice; we keep the model's config)."""
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except (OSError, ValueError) as e:
        raise UserError(f"model '{path}': cannot load as a causal LM: {e}") from None
    _check_vocab(model, tok, path)
    model.config.pad_token_id = tok.pad_token_id
    return model.to(device)


class ValueModel(nn.Module):
    """Per-token scalar values from a 1-label sequence-classification model: V(s_t) = w·h_t.

    `forward` returns (B, T) values for every position; the reward model's score of a sequence is the value at
    its last real token (`end_scores`). `self.model` is the underlying transformers model, saved as is.
    """

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model
        self.backbone = model.base_model
        heads = [m for m in model.children() if m is not self.backbone and isinstance(m, nn.Linear)]
        if len(heads) != 1 or heads[0].out_features != 1:
            raise UserError(
                f"{type(model).__name__}: expected one scalar linear head beside the backbone, found "
                f"{[type(m).__name__ for m in model.children()]}"
            )
        self.head = heads[0]

    @property
    def config(self):
        return self.model.config

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return self.head(hidden).squeeze(-1).float()

    def scores_at(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(B,) the value at position `index[b]` of each sequence — at the last real response token, the reward
        model's end score r(x, y)."""
        values = self(input_ids, attention_mask, position_ids(attention_mask))
        return values.gather(1, index.unsqueeze(1)).squeeze(1)


def load_value_model(path: str, tok: PreTrainedTokenizerBase, dtype: str, device: torch.device) -> ValueModel:
    """Load a reward model / critic; from a causal LM the scalar head is freshly initialised by transformers."""
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=DTYPES[dtype])
    except (OSError, ValueError) as e:
        raise UserError(f"model '{path}': cannot load as a sequence-classification (value) model: {e}") from None
    _check_vocab(model, tok, path)
    model.config.pad_token_id = tok.pad_token_id
    return ValueModel(model).to(device)


def same_vocabulary(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    return a.get_vocab() == b.get_vocab()


def save_model_dir(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, out: Path, state_dict: dict | None = None
) -> None:
    """Write a complete HF model directory atomically (`atomic_dir`). `state_dict` (weights gathered from a
    sharded engine) replaces the model's own tensors when given."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tok.save_pretrained(tmp)


def save_value_model(
    model: ValueModel, tok: PreTrainedTokenizerBase, out: Path, state_dict: dict | None = None
) -> None:
    """Write a ValueModel as its transformers model's directory, atomically. `state_dict` (weights gathered from a
    sharded engine) has the keys of `ValueModel.state_dict()`."""
    if state_dict is not None:
        state_dict = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
    save_model_dir(model.model, tok, out, state_dict=state_dict)


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """A directory that appears at `out` complete or not at all: the block writes into a temp dir beside it, whose
    files are then fsynced, and which is renamed to `out` (replacing an older `out`) last."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    yield tmp
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)
