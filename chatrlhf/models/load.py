"""Loading models and tokenizers, and the value-head model used as critic and reward model.

Any causal LM that transformers can load works: a hub id, a local HF directory, or a tiny random preset
(`tiny:llama`, built once into the run directory and then loaded through the same `from_pretrained` path).
Nothing here is special-cased by architecture name.

The reward model and the critic are a causal LM's backbone plus a scalar linear head, V(s_t) = w·h_t (`ValueModel`),
in one of two formats (docs/models.md):

- where transformers provides `AutoModelForSequenceClassification` for the architecture, that class with one label.
  Saved that way, it loads in plain transformers (and in vLLM) as a reward model. For per-token values we run its
  backbone and apply its head to every position ourselves, since the library's forward only returns the pooled score;
- otherwise the base model (`AutoModel`) and a head beside it, as DeepSpeed-Chat's RewardModel has them; saved as the
  base model's directory plus the head in `value_head.safetensors`.

A directory that fails to load because one of its files is damaged or cut short (an interrupted download or copy)
is refused with the file named (`damaged_file`).
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import zipfile
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from chatrlhf import distributed as dist
from chatrlhf.data.collate import position_ids
from chatrlhf.errors import UserError
from chatrlhf.models.tiny import TINY_VOCAB_SIZE, build_tiny_model, parse_tiny_spec, tiny_config

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


ACCELERATORS = ("cuda", "mps", "xpu")
"""Device types chatrlhf trains on besides the CPU."""


def pick_device(device: str, dtype: str | None = None) -> torch.device:
    """`run.device` → the torch device, checked against this machine before a stage writes anything: a string torch
    cannot parse, an accelerator PyTorch does not see, or an index past the last device is refused, naming the
    option. With `dtype` (`run.dtype`), float16 on the CPU is refused too: sampling in float16 on the CPU fails
    (NaN probabilities in `generate`), so RL and the evaluation could not run; bfloat16 and float32 work there."""
    if device == "auto":
        chosen = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            chosen = torch.device(device)
        except RuntimeError:
            raise UserError(
                f"run.device: {device!r} is not a device; expected auto, cpu, or an accelerator with an optional "
                "index: cuda, cuda:N, mps, xpu, xpu:N"
            ) from None
        _check_available(chosen, device)
    if dtype == "float16" and chosen.type == "cpu":
        raise UserError(
            f"run.dtype=float16 on the CPU (run.device={device}): sampling in float16 fails on the CPU (NaN "
            "probabilities), so RL and the evaluation cannot run; use --run.dtype bfloat16 or float32 there"
        )
    return chosen


def _check_available(chosen: torch.device, device: str) -> None:
    if chosen.type == "cpu":
        return
    if chosen.type not in ACCELERATORS:
        raise UserError(f"run.device={device}: chatrlhf trains on cpu, {', '.join(ACCELERATORS)}, not {chosen.type}")
    if chosen.type == "mps":
        available, count = torch.backends.mps.is_available(), 1
    else:
        backend = getattr(torch, chosen.type)
        available = backend.is_available()
        count = backend.device_count() if available else 0
    if not available:
        build = ""
        if chosen.type == "cuda" and torch.version.cuda is None:
            build = " (this PyTorch build has no CUDA support: install a CUDA build of PyTorch)"
        raise UserError(
            f"run.device={device}: PyTorch {torch.__version__} finds no {chosen.type} device on this machine{build}; "
            "use --run.device cpu (or auto)"
        )
    if chosen.index is not None and chosen.index >= count:
        raise UserError(
            f"run.device={device}: there is no {chosen.type} device {chosen.index}; this machine has {count} "
            f"({', '.join(f'{chosen.type}:{i}' for i in range(count))})"
        )


# ------------------------------------------------------------------------------------------------ damaged files

LOAD_ERRORS = (OSError, ValueError, SafetensorError)
"""What `from_pretrained` raises for a directory it cannot use (missing files, bad config values, unreadable
weights): reported as the user's error with the library's message."""


def damaged_file(path: str) -> str | None:
    """The first file of the local model directory `path` that is not what its name says, described — JSON that
    does not parse, a tokenizer.json the tokenizers library cannot read, a safetensors file whose header or size is
    wrong, a .bin that is not a complete PyTorch zip archive — or None (also for a hub id). Called only after a load
    failed, so a healthy directory is never read twice."""
    directory = Path(path)
    if not directory.is_dir():
        return None
    for f in sorted(p for p in directory.iterdir() if p.is_file()):
        problem = _file_problem(f)
        if problem is not None:
            return f"{f.name} {problem}"
    return None


def _file_problem(f: Path) -> str | None:
    if f.suffix == ".json":
        try:
            text = f.read_text(encoding="utf-8")
            json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"is not valid JSON ({e})"
        if f.name == "tokenizer.json":
            from tokenizers import Tokenizer

            try:
                Tokenizer.from_str(text)
            except Exception as e:  # the tokenizers library raises plain Exception for a file it cannot read
                return f"is not a tokenizer the tokenizers library can read ({e})"
    elif f.suffix == ".safetensors":
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except SafetensorError as e:
            return f"is not a complete safetensors file ({e})"
    elif f.suffix == ".bin" and not zipfile.is_zipfile(f):
        return "is not a complete PyTorch checkpoint (not a zip archive)"
    return None


@contextmanager
def loading(path: str, what: str) -> Iterator[None]:
    """Around a `from_pretrained` of `path`: a failure caused by a damaged file names that file; one of
    LOAD_ERRORS gives "cannot load `what`" with the library's message; any other exception is not about the
    directory and propagates unchanged."""
    try:
        yield
    except Exception as e:
        damaged = damaged_file(path)
        if damaged is not None:
            raise UserError(
                f"model '{path}': {damaged}; the file is damaged or incomplete (an interrupted download or copy?): "
                "download or copy it again"
            ) from None
        if isinstance(e, LOAD_ERRORS):
            raise UserError(f"model '{path}': cannot load {what}: {e}") from None
        raise


# ------------------------------------------------------------------------------------------------ tokenizer, LM


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer. Without a pad token, EOS doubles as pad (as DeepSpeed-Chat and TRL do)."""
    with loading(path, "its tokenizer"):
        tok = AutoTokenizer.from_pretrained(path)
    if tok.eos_token_id is None:
        raise UserError(f"model '{path}': the tokenizer has no EOS token; responses could never end")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
        print(f"note: tokenizer of '{path}' has no pad token; using EOS ({tok.eos_token!r}) as pad")
    return tok


def context_length(config) -> int | None:
    """The most tokens a model takes in one sequence: its config's `max_position_embeddings` (transformers maps the
    names other architectures give it, e.g. GPT-2's `n_positions`), or None when the config gives none (a model
    without position limits). Past it, learned position embeddings (GPT-2, OPT) fail with an index error and rotary
    ones (Llama, Qwen2) silently extrapolate to positions they never saw."""
    return getattr(config, "max_position_embeddings", None)


def check_fits_context(
    prompts: Iterable[tuple[Sequence[int], str]],
    max_prompt_len: int,
    max_new_tokens: int,
    context: int | None,
    options: str = "train.",
) -> None:
    """Refuse single responses that could grow past a model's `context`: the longest prompt (ids, text) plus
    `max_new_tokens` over it. Learned position embeddings (GPT-2's, OPT's) would fail with an index error in the
    middle of a run, rotary ones would run at positions they never saw. The prompts are read only when
    `max_prompt_len + max_new_tokens`, their bound, is over the context. `options`: where the command's
    `max_prompt_len` and `generation.*` options sit, for the message ("train." for `chatrlhf rl`, "" for `eval`).
    Episodes are checked by their runner (envs/runner.py:check_lengths)."""
    if context is None or max_prompt_len + max_new_tokens <= context:
        return
    longest = max(prompts, key=lambda p: len(p[0]), default=None)
    if longest is None:
        return
    ids, text = longest
    total = len(ids) + max_new_tokens
    if total > context:
        room = context - len(ids)
        fix = f"lower {options}generation.max_new_tokens to at most {room}, " if room > 0 else ""
        shown = repr(text if len(text) <= 40 else text[:39] + "…")
        raise UserError(
            f"responses could grow past the model's context of {context} tokens (max_position_embeddings): the "
            f"longest prompt ({shown}) is {len(ids)} tokens, and max_new_tokens={max_new_tokens} "
            f"({options}generation.max_new_tokens) more make {total}; {fix}leave the longest prompts out "
            f"({options}max_prompt_len refuses longer ones), or use a model with a longer context"
        )


def _check_vocab(model: PreTrainedModel, tok: PreTrainedTokenizerBase, path: str) -> None:
    weight = model.get_input_embeddings().weight
    rows = getattr(weight, "ds_shape", weight.shape)[0]  # a ZeRO-3 partitioned weight keeps its full shape there
    if rows < len(tok):
        raise UserError(
            f"model '{path}': embedding has {rows} rows but the tokenizer has {len(tok)} tokens; "
            "the model and tokenizer do not match"
        )


def load_causal_lm(path: str, tok: PreTrainedTokenizerBase, dtype: str, device: torch.device) -> PreTrainedModel:
    """A causal LM ready for training (dropout off is the caller's choice; we keep the model's config)."""
    with loading(path, "as a causal LM"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    _check_vocab(model, tok, path)
    model.config.pad_token_id = tok.pad_token_id
    return model.to(device)


# ------------------------------------------------------------------------------------------------ value models

VALUE_HEAD_FILE = "value_head.safetensors"
"""The scalar head of a backbone-format value model, `weight` (1, hidden), beside the backbone's own files; its
presence marks the directory as that format."""
SEQUENCE_CLASSIFICATION, BACKBONE = "sequence-classification", "backbone+head"
"""The two value-model formats (module docstring)."""


class ValueModel(nn.Module):
    """Per-token scalar values from a backbone and a linear head: V(s_t) = w·h_t.

    `model` is the transformers model that is saved: a 1-label sequence-classification model, whose head is found
    inside it, or a base model with `head` beside it. `forward` returns (B, T) values for every position; the
    reward model's score of a sequence is the value at its last real token (`scores_at`).
    """

    def __init__(self, model: PreTrainedModel, head: nn.Linear | None = None):
        super().__init__()
        self.model = model
        self.backbone = model.base_model
        if head is None:
            heads = [m for m in model.children() if m is not self.backbone and isinstance(m, nn.Linear)]
            if len(heads) != 1 or heads[0].out_features != 1:
                raise UserError(
                    f"{type(model).__name__}: expected one scalar linear head beside the backbone, found "
                    f"{[type(m).__name__ for m in model.children()]}"
                )
            head = heads[0]
        elif head.out_features != 1:
            raise ValueError(f"a value head has one output, got {head.out_features}")
        self.head = head
        self.head_in_model = any(m is head for m in model.modules())
        """True for the sequence-classification format; False when the head lives beside a base model."""
        params = inspect.signature(self.backbone.forward).parameters
        self._takes_position_ids = "position_ids" in params
        self._takes_use_cache = "use_cache" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())

    @property
    def config(self):
        return self.model.config

    @property
    def format(self) -> str:
        return SEQUENCE_CLASSIFICATION if self.head_in_model else BACKBONE

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self._takes_position_ids:  # a backbone without this input places tokens itself (e.g. no positions)
            inputs["position_ids"] = position_ids
        if self._takes_use_cache:
            inputs["use_cache"] = False
        hidden = self.backbone(**inputs).last_hidden_state
        return self.head(hidden).squeeze(-1).float()

    def scores_at(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(B,) the value at position `index[b]` of each sequence — at the last real response token, the reward
        model's end score r(x, y)."""
        values = self(input_ids, attention_mask, position_ids(attention_mask))
        return values.gather(1, index.unsqueeze(1)).squeeze(1)


def value_model_format(config) -> str:
    """The format a value model of this architecture has (module docstring), from its config alone; UserError when
    transformers offers neither a sequence-classification class nor a base model for it, so no head can reach its
    hidden states."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        MODEL_MAPPING_NAMES,
    )

    kind = config.model_type
    if kind in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        return SEQUENCE_CLASSIFICATION
    if kind in MODEL_MAPPING_NAMES and _hidden_size(config) is not None:
        return BACKBONE
    raise UserError(
        f"model type '{kind}' cannot be a reward model or critic: transformers has neither a sequence-classification "
        "class nor a base model with a hidden size for it, so no value head can read its hidden states; use another "
        "base for the reward model (e.g. --reward_base), or rewards from Python functions"
    )


def check_value_model_support(spec: str) -> str:
    """`value_model_format` of the model `spec` names (a directory, hub id or tiny preset), reading only its config:
    cheap enough to run before any stage trains, so an architecture that cannot have a value head is refused before
    SFT spends its time."""
    tiny = parse_tiny_spec(spec)
    if tiny is not None:
        sizes = {k: v for k, v in tiny.items() if k in ("hidden", "layers", "heads")}
        if "positions" in tiny:
            sizes["max_positions"] = tiny["positions"]
        ids = {"pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}
        return value_model_format(tiny_config(tiny["arch"], TINY_VOCAB_SIZE, **sizes, **ids))
    with loading(spec, "its config"):
        config = AutoConfig.from_pretrained(spec)
    return value_model_format(config)


def _hidden_size(config) -> int | None:
    return getattr(config.get_text_config(), "hidden_size", None)


HEAD_ADVICE = {
    "reward model": "train a reward model from it with `chatrlhf reward --model {path} ...`, or reward with Python "
    "functions (--reward_functions module:function)",
    "critic": "initialise the critic from a trained reward model or critic (`chatrlhf reward` trains one), or set "
    "critic_fresh_head true to start its value head from random weights and learn values from scratch",
}
"""What to do instead, by role, when a model without a trained head is given as one."""


def load_value_model(
    path: str,
    tok: PreTrainedTokenizerBase,
    dtype: str,
    device: torch.device,
    *,
    require_head: bool = True,
    role: str = "reward model",
) -> ValueModel:
    """Load a reward model / critic (`role`, for messages) in its format.

    With `require_head` (the default: a reward model or critic that scores), a directory whose checkpoint holds no
    trained value head — a causal LM — is refused: transformers would initialise the head randomly and RL would
    train against noise. `require_head=False` (the reward stage, which trains the head) starts such a head from
    random weights and prints a note saying so.
    """
    with loading(path, "its config"):
        config = AutoConfig.from_pretrained(path)
    head_file = Path(path) / VALUE_HEAD_FILE
    if head_file.is_file() or value_model_format(config) == BACKBONE:
        model, fresh = _load_backbone_and_head(path, config, dtype, head_file), None
        if not head_file.is_file():
            fresh = f"it has no {VALUE_HEAD_FILE}"
    else:
        model, fresh = _load_sequence_classifier(path, dtype, role)
    if fresh is not None:
        if require_head:
            advice = HEAD_ADVICE.get(role, HEAD_ADVICE["reward model"]).format(path=path)
            raise UserError(
                f"{role} '{path}' holds no trained value head ({fresh}): it is a causal LM, not a reward model or "
                f"critic, and its head would be random; {advice}"
            )
        print(f"note: '{path}' has no trained value head; the {role}'s scalar head starts from random weights")
    _check_vocab(model.model, tok, path)
    model.config.pad_token_id = tok.pad_token_id
    return model.to(device)


def _load_sequence_classifier(path: str, dtype: str, role: str) -> tuple[ValueModel, str | None]:
    """The 1-label sequence-classification model, and why its head is not trained (None when it is)."""
    with loading(path, f"as a {role} (a 1-label sequence-classification model)"):
        # mismatched sizes are loaded (reinitialised) only to be refused below with the keys named
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=DTYPES[dtype], output_loading_info=True, ignore_mismatched_sizes=True
        )
    value_model = ValueModel(model)
    mismatched = sorted(k if isinstance(k, str) else k[0] for k in info["mismatched_keys"])
    if mismatched:
        raise UserError(
            f"{role} '{path}': its checkpoint does not fit a 1-label value model (mismatched: "
            f"{', '.join(mismatched)}); a {role} has one scalar output, e.g. a classifier with several labels is "
            "not one"
        )
    head = next(name for name, m in model.named_children() if m is value_model.head)
    missing = sorted(k for k in info["missing_keys"] if k.startswith(f"{head}."))
    return value_model, (f"{', '.join(missing)} not in its checkpoint" if missing else None)


def _load_backbone_and_head(path: str, config, dtype: str, head_file: Path) -> ValueModel:
    """The base model and the head of VALUE_HEAD_FILE, or a new head (normal init with the model's
    initializer_range, as transformers initialises a score head) when there is no such file."""
    with loading(path, "its base model (backbone)"):
        backbone = AutoModel.from_pretrained(path, dtype=DTYPES[dtype])
    hidden = _hidden_size(config)
    head = nn.Linear(hidden, 1, bias=False, dtype=DTYPES[dtype])
    if head_file.is_file():
        with loading(path, VALUE_HEAD_FILE):
            weights = load_file(str(head_file))
        if set(weights) != {"weight"} or tuple(weights["weight"].shape) != (1, hidden):
            shapes = {k: tuple(v.shape) for k, v in weights.items()}
            raise UserError(
                f"model '{path}': {VALUE_HEAD_FILE} holds {shapes}; expected one tensor 'weight' of shape (1, {hidden})"
            )
        with torch.no_grad():
            head.weight.copy_(weights["weight"])
    else:
        std = getattr(config.get_text_config(), "initializer_range", hidden**-0.5)
        nn.init.normal_(head.weight, std=std)
    return ValueModel(backbone, head)


def save_value_model(
    model: ValueModel, tok: PreTrainedTokenizerBase, out: Path, state_dict: dict | None = None
) -> None:
    """Write `model` at `out` atomically in its own format: a sequence-classification model directory, or the
    base model's directory plus VALUE_HEAD_FILE. `state_dict` (with the keys of `ValueModel.state_dict()`: weights
    gathered from a sharded engine) replaces the model's own tensors when given."""
    weights, head = None, model.head.state_dict()
    if state_dict is not None:
        weights = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
        head = {k.removeprefix("head."): v for k, v in state_dict.items() if k.startswith("head.")}
    with atomic_dir(out) as tmp:
        model.model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
        tok.save_pretrained(tmp)
        if not model.head_in_model:
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in head.items()}
            save_file(tensors, str(tmp / VALUE_HEAD_FILE), metadata={"format": "pt"})


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


def add_value_head(model_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """A copy of the causal LM at `model_dir` as an untrained value model (reward model / critic): the same weights
    and tokenizer plus a scalar head drawn with `seed`, saved in the value-model format of its architecture. Tests
    use it where a reward model with some head is needed and training one would only cost time."""
    tok = load_tokenizer(str(model_dir))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = load_value_model(str(model_dir), tok, "float32", torch.device("cpu"), require_head=False)
    save_value_model(model, tok, Path(out_dir))
    return Path(out_dir)
