"""Rendering records with the chat template, tokenizing, and padding into batches.

Prompts are rendered with the tokenizer's chat template when it has one (`add_generation_prompt=True`); otherwise
with the plain template `Human: {prompt}\\n\\nAssistant:` and the response follows after one space (DeepSpeed-Chat's
convention). A response is the template's text of the assistant turn, cut after the first EOS token; EOS is
appended when the template does not end the turn with it, so the model learns to stop.

The template is applied once, in the same way in every stage: the context (a prompt string as one user turn, or a
conversation) is rendered with `render_prompt`, and the answer's tokens are what the template adds for the final
assistant turn. An SFT conversation's last answer, a pair's chosen and rejected answers and an RL rollout all follow
the same rendered context, so the reward model and DPO score exactly the tokens that RL samples after that prompt.
Only `text` records (plain language modelling) bypass the template.

Position ids are always `cumsum(attention_mask) − 1`: the first real token is position 0 whether the batch is
left-padded (rollouts) or right-padded (training), so the same sequence gets the same positions everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase

from chatrlhf.data.prepare import Records, encode_records
from chatrlhf.errors import DataError, first_in_file

PLAIN_TEMPLATE = "Human: {prompt}\n\nAssistant:"

R = TypeVar("R")
E = TypeVar("E")


class TemplateMismatch(ValueError):
    """The chat template renders a prompt differently once the answer follows it, so the answer's tokens cannot be
    cut out of the rendered conversation."""


def _messages(prompt: str | None, messages: Sequence[dict] | None) -> list[dict]:
    return list(messages) if messages is not None else [{"role": "user", "content": prompt}]


def render_prompt(tok: PreTrainedTokenizerBase, prompt: str | None, messages: Sequence[dict] | None = None) -> str:
    """The text the model sees before it answers."""
    msgs = _messages(prompt, messages)
    if tok.chat_template:
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    turns = [f"{m['role'].capitalize()}: {m['content']}" for m in msgs]
    if len(msgs) == 1 and msgs[0]["role"] == "user":
        return PLAIN_TEMPLATE.format(prompt=msgs[0]["content"])
    return "\n\n".join(t.replace("User:", "Human:", 1) for t in turns) + "\n\nAssistant:"


def response_ids(tok: PreTrainedTokenizerBase, prompt_text: str, context: list[dict], response: str) -> list[int]:
    """Token ids of the assistant's turn after `prompt_text`, ending with exactly one EOS."""
    if tok.chat_template:
        full = tok.apply_chat_template(context + [{"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(prompt_text):
            raise TemplateMismatch("it renders the prompt differently with and without the answer")
        text = full[len(prompt_text) :]
    else:
        text = " " + response
    ids = tok(text, add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    return ids[: ids.index(eos) + 1] if eos in ids else ids + [eos]


def prompt_ids(tok: PreTrainedTokenizerBase, prompt_text: str) -> list[int]:
    return tok(prompt_text, add_special_tokens=True)["input_ids"]


@contextmanager
def _template_errors(rec) -> Iterator[None]:
    """Chat-template failures become a `DataError` naming the record. Templates differ in what they accept (many
    require strictly alternating user/assistant turns), so a record that passed validation may still be one that
    this model's template refuses."""
    try:
        yield
    except (TemplateError, TemplateMismatch) as e:
        field = "messages" if getattr(rec, "messages", None) is not None else "prompt"
        raise DataError(
            rec.source, rec.where, field, f"the model's chat template cannot render this record: {e}"
        ) from None


@dataclass
class Encoded:
    """One tokenized training sequence."""

    input_ids: list[int]
    loss_mask: list[int]
    """1 where the token is a training target (response tokens, or all tokens with loss_on_prompt)."""


def encode_sft(tok, rec, max_len: int, loss_on_prompt: bool) -> Encoded:
    """prompt + response (+ EOS), checked against max_len (an error, never a silent truncation). A `text` record is
    its text (+ EOS) as the tokenizer encodes it, without the chat template, every token a target."""
    if rec.text is not None:
        return _encode_text(tok, rec, max_len)
    if rec.messages is not None:
        context, answer = list(rec.messages[:-1]), rec.messages[-1]["content"]
    else:
        context, answer = _messages(rec.prompt, None), rec.response
    with _template_errors(rec):
        p_text = render_prompt(tok, None, context)
        p_ids = prompt_ids(tok, p_text)
        r_ids = response_ids(tok, p_text, context, answer)
    ids = p_ids + r_ids
    if len(ids) > max_len:
        what = "the conversation" if rec.messages is not None else "prompt + response"
        raise DataError(rec.source, rec.where, None, f"{what} is {len(ids)} tokens, over max_seq_len={max_len}")
    mask = [1] * len(ids) if loss_on_prompt else [0] * len(p_ids) + [1] * len(r_ids)
    return Encoded(ids, mask)


def _encode_text(tok, rec, max_len: int) -> Encoded:
    ids = prompt_ids(tok, rec.text)
    if ids[-1:] != [tok.eos_token_id]:
        ids.append(tok.eos_token_id)
    if len(ids) > max_len:
        raise DataError(rec.source, rec.where, "text", f"the text is {len(ids)} tokens, over max_seq_len={max_len}")
    return Encoded(ids, [1] * len(ids))


def _pair_parts(tok, rec, max_len: int) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen ids + EOS, rejected ids + EOS); prompt + each response is checked against max_len.

    The prompt (a string, or the conversation `rec.messages`) is rendered as `encode_sft` renders the context of its
    answer, so a pair's chosen sequence is token for token the SFT sequence of the same prompt and answer."""
    context = _messages(rec.prompt, rec.messages)
    with _template_errors(rec):
        p_text = render_prompt(tok, rec.prompt, rec.messages)
    p_ids = prompt_ids(tok, p_text)
    out = []
    for name in ("chosen", "rejected"):
        with _template_errors(rec):
            r_ids = response_ids(tok, p_text, context, getattr(rec, name))
        if len(p_ids) + len(r_ids) > max_len:
            raise DataError(
                rec.source,
                rec.where,
                name,
                f"prompt + {name} is {len(p_ids) + len(r_ids)} tokens, over max_seq_len={max_len}",
            )
        out.append(r_ids)
    return p_ids, out[0], out[1]


def encode_pair(tok, rec, max_len: int) -> tuple[list[int], list[int]]:
    """(prompt + chosen + EOS, prompt + rejected + EOS)."""
    p_ids, chosen, rejected = _pair_parts(tok, rec, max_len)
    return p_ids + chosen, p_ids + rejected


def encode_pair_responses(tok, rec, max_len: int) -> tuple[Encoded, Encoded]:
    """`encode_pair` with the responses marked: (chosen, rejected), each an `Encoded` whose loss_mask is 1 on the
    response tokens (EOS included) and 0 on the prompt — the tokens a sequence log-prob log π(y|x) sums over."""
    p_ids, chosen, rejected = _pair_parts(tok, rec, max_len)
    prompt_mask = [0] * len(p_ids)
    return Encoded(p_ids + chosen, prompt_mask + [1] * len(chosen)), Encoded(
        p_ids + rejected, prompt_mask + [1] * len(rejected)
    )


def encode_prompt(tok, rec, max_len: int) -> list[int]:
    """The rendered prompt's ids, checked against max_len (an error, never a silent truncation)."""
    with _template_errors(rec):
        ids = prompt_ids(tok, render_prompt(tok, rec.prompt, rec.messages))
    if len(ids) > max_len:
        raise DataError(rec.source, rec.where, "prompt", f"prompt is {len(ids)} tokens, over max_prompt_len={max_len}")
    return ids


def encode_all(records: Sequence[R], encode: Callable[..., E], *args, **settings) -> Sequence[E]:
    """`encode(*args, record, **settings)` of every record (e.g. `encode_all(recs, encode_sft, tok, max_len=512,
    loss_on_prompt=False)`, or `encode_all(recs, lambda r: ...)`); if any fail, raise the error of the first failing
    record (by file and position) with the number of the others, so that one run says how much of a dataset is
    over a length limit.

    A stage's `Records` (data/prepare.py) are encoded by a cached `datasets.map` (`encode` must then be a
    module-level function, `args` a tokenizer or plain values) into `Items` read from the cache on access; a list is
    encoded here into a list."""
    if isinstance(records, Records):
        return encode_records(records, encode, args, settings)
    encoded: list[E] = []
    errors: list[DataError] = []
    for rec in records:
        try:
            encoded.append(encode(*args, rec, **settings))
        except DataError as e:
            errors.append(e)
    if errors:
        first, more = first_in_file(errors), len(errors) - 1
        if not more:
            raise first
        raise DataError(
            first.source, first.where, first.field, f"{first.problem} (and {more} more of the {len(records)} records)"
        )
    return encoded


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counting real tokens only: the first real token is 0 (padding gets 0 too)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def pad(
    seqs: Sequence[Sequence[int]], value: int, left: bool = False, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to `width` (default: the longest sequence) → (ids (B, T) long, attention_mask (B, T) long)."""
    longest = max(len(s) for s in seqs)
    width = longest if width is None else width
    if width < longest:
        raise ValueError(f"pad width {width} is shorter than the longest sequence ({longest})")
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def collate_sft(batch: Sequence[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """→ input_ids, attention_mask, loss_mask; all (B, T), right-padded."""
    ids, attn = pad([e.input_ids for e in batch], pad_id)
    loss_mask, _ = pad([e.loss_mask for e in batch], 0)
    return ids, attn, loss_mask
