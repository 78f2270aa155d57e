"""Adapters: records of the popular public datasets mapped to chatrlhf's own schema (`records.py`).

Each adapter reads one source record (a `RawRecord` in that dataset's format) and returns a dict in chatrlhf's
schema for one kind of data: an SFT record (`sft`), a preference pair (`pair`) or an RL prompt (`prompt`). What it
builds is then validated like any other record. An adapter checks the fields it reads itself, so that an error
names the dataset's own field (`chosen`, `human_ref_A`, `question.full_text`, ...) and row. The source schemas are
in docs/data.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from chatrlhf.data.fields import describe, string
from chatrlhf.data.raw import RawRecord
from chatrlhf.errors import DataError


def _error(raw: RawRecord, field: str | None, problem: str) -> DataError:
    return DataError(raw.source, raw.where, field, problem)


def _others(raw: RawRecord, *used: str) -> dict:
    """The record's other columns, which an RL prompt keeps for reward functions."""
    return {k: v for k, v in raw.data.items() if k not in used}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------- Anthropic/hh-rlhf and Dahoas/rm-static

TURN = re.compile(r"\n\n(Human|Assistant):")
"""A turn marker of an Anthropic transcript: "\\n\\nHuman: ..." or "\\n\\nAssistant: ..."."""
TRANSCRIPT_ROLES = {"Human": "user", "Assistant": "assistant"}


def transcript(raw: RawRecord, field: str, open_end: bool = False) -> list[dict]:
    """The turns of an Anthropic transcript "\\n\\nHuman: …\\n\\nAssistant: …" in `field`, as
    {"role": "user"/"assistant", "content"} turns with surrounding whitespace stripped.

    The transcript must start with a Human turn (leading whitespace aside) and no turn may be empty. With
    `open_end` it must end with an "\\n\\nAssistant:" that has nothing after it (the slot for the answer, in
    rm-static's prompts), which is dropped; this also refuses the single-line " Human: ... Assistant:" form, whose
    turns cannot be told apart from their text.
    """
    text = string(raw, field, raw.data.get(field))
    parts = TURN.split("\n\n" + text.lstrip())
    if parts[0].strip() or len(parts) < 3 or parts[1] != "Human":
        raise _error(
            raw,
            field,
            "expected an Anthropic transcript of '\\n\\nHuman: ...' and '\\n\\nAssistant: ...' turns starting "
            f"with 'Human:', found {describe(text)}",
        )
    turns = [{"role": TRANSCRIPT_ROLES[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]
    if open_end:
        if turns[-1] != _assistant("") or len(turns) < 2:
            raise _error(raw, field, "expected a transcript ending with '\\n\\nAssistant:' (the slot for the answer)")
        turns.pop()
    for i, turn in enumerate(turns, start=1):
        if not turn["content"]:
            raise _error(raw, field, f"turn {i} ({'Human' if turn['role'] == 'user' else 'Assistant'}) is empty")
    return turns


def _hh_conversation(raw: RawRecord, field: str) -> tuple[list[dict], str]:
    """(the turns before the final Assistant turn, that final answer) of the transcript in `field`."""
    turns = transcript(raw, field)
    if turns[-1]["role"] != "assistant":
        raise _error(raw, field, "the transcript does not end with an Assistant turn (the answer)")
    if len(turns) < 2 or turns[-2]["role"] != "user":
        raise _error(raw, field, "the final Assistant turn does not follow a Human turn")
    return turns[:-1], turns[-1]["content"]


def hh_sft(raw: RawRecord) -> dict:
    context, answer = _hh_conversation(raw, "chosen")
    return {"messages": [*context, _assistant(answer)]}


def hh_pair(raw: RawRecord) -> dict:
    context, chosen = _hh_conversation(raw, "chosen")
    rejected_context, rejected = _hh_conversation(raw, "rejected")
    if rejected_context != context:
        raise _error(
            raw,
            "rejected",
            "the conversation before its final Assistant turn differs from 'chosen''s; a pair compares two "
            "answers to one conversation",
        )
    return {"prompt": context, "chosen": [_assistant(chosen)], "rejected": [_assistant(rejected)]}


def hh_prompt(raw: RawRecord) -> dict:
    context, _ = _hh_conversation(raw, "chosen")
    return {"messages": context, **_others(raw, "chosen", "rejected")}


def _rm_static_prompt(raw: RawRecord) -> list[dict]:
    turns = transcript(raw, "prompt", open_end=True)
    if turns[-1]["role"] != "user":
        raise _error(raw, "prompt", "the transcript must end with a Human turn (then '\\n\\nAssistant:')")
    return turns


def rm_static_sft(raw: RawRecord) -> dict:
    # DeepSpeed-Chat's DahoasRmstaticDataset trains SFT on prompt + chosen; `response` is a copy of `chosen`.
    return {"messages": [*_rm_static_prompt(raw), _assistant(string(raw, "chosen", raw.data["chosen"]).strip())]}


def rm_static_pair(raw: RawRecord) -> dict:
    answers = {name: string(raw, name, raw.data.get(name)).strip() for name in ("chosen", "rejected")}
    return {
        "prompt": _rm_static_prompt(raw),
        "chosen": [_assistant(answers["chosen"])],
        "rejected": [_assistant(answers["rejected"])],
    }


def rm_static_prompt(raw: RawRecord) -> dict:
    return {"messages": _rm_static_prompt(raw), **_others(raw, "prompt", "response", "chosen", "rejected")}


# ---------------------------------------------------------------- stanfordnlp/SHP


def _shp_sides(raw: RawRecord) -> tuple[str, str]:
    """(preferred, other) of the two human-written answers: `labels` 1 prefers human_ref_A, 0 human_ref_B."""
    score_a, score_b = raw.data.get("score_A"), raw.data.get("score_B")
    if _is_number(score_a) and _is_number(score_b) and score_a == score_b:
        raise _error(raw, "labels", f"a tie: score_A and score_B are both {score_a}, so neither answer is preferred")
    label = raw.data.get("labels")
    if label not in (0, 1, "0", "1") or isinstance(label, float):
        raise _error(
            raw, "labels", f"expected 1 (human_ref_A preferred) or 0 (human_ref_B preferred), found {describe(label)}"
        )
    a, b = (string(raw, name, raw.data.get(name)) for name in ("human_ref_A", "human_ref_B"))
    return (a, b) if int(label) == 1 else (b, a)


def shp_sft(raw: RawRecord) -> dict:
    preferred, _ = _shp_sides(raw)
    return {"prompt": string(raw, "history", raw.data.get("history")), "response": preferred}


def shp_pair(raw: RawRecord) -> dict:
    preferred, other = _shp_sides(raw)
    return {"prompt": string(raw, "history", raw.data.get("history")), "chosen": preferred, "rejected": other}


def shp_prompt(raw: RawRecord) -> dict:
    history = string(raw, "history", raw.data.get("history"))
    return {"prompt": history, **_others(raw, "history", "human_ref_A", "human_ref_B")}


# ---------------------------------------------------------------- openai/webgpt_comparisons


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _webgpt_question(raw: RawRecord) -> str:
    question = raw.data.get("question")
    if not isinstance(question, dict):
        raise _error(raw, "question", f"expected an object with 'full_text', found {describe(question)}")
    if "full_text" not in question:
        raise _error(raw, "question.full_text", "missing (expected a string)")
    return string(raw, "question.full_text", question["full_text"])


def _webgpt_sides(raw: RawRecord) -> tuple[str, str]:
    """(better, worse) answer: the one with the higher score. Equal scores (both 0) are a tie: no preference."""
    scores = []
    for name in ("score_0", "score_1"):
        value = raw.data.get(name)
        if not _is_number(value):
            raise _error(raw, name, f"expected a number, found {describe(value)}")
        scores.append(value)
    if scores[0] == scores[1]:
        raise _error(raw, "score_1", f"equals score_0 ({scores[0]}): a tie, so neither answer is preferred")
    answers = [string(raw, name, raw.data.get(name)) for name in ("answer_0", "answer_1")]
    return (answers[0], answers[1]) if scores[0] > scores[1] else (answers[1], answers[0])


def webgpt_sft(raw: RawRecord) -> dict:
    better, _ = _webgpt_sides(raw)
    return {"prompt": _webgpt_question(raw), "response": better}


def webgpt_pair(raw: RawRecord) -> dict:
    better, worse = _webgpt_sides(raw)
    return {"prompt": _webgpt_question(raw), "chosen": better, "rejected": worse}


def webgpt_prompt(raw: RawRecord) -> dict:
    return {"prompt": _webgpt_question(raw), **_others(raw, "question", "answer_0", "answer_1")}


# ---------------------------------------------------------------- UltraFeedback (H4 and Argilla binarized sets)

# `chosen` and `rejected` hold whole conversations (the user's prompt, then the answer): chatrlhf's implicit-prompt
# conversational pair. The string `prompt` column repeats the first user turn and is left out, so that it is not
# taken for the prompt of a conversational record (nor passed to a reward function as a second `prompt`).


def _conversation(raw: RawRecord, field: str) -> object:
    value = raw.data.get(field)
    if value is None:
        raise _error(raw, field, "missing (expected a list of {'role', 'content'} objects: the whole conversation)")
    return value


def ultrafeedback_sft(raw: RawRecord) -> dict:
    return {"chosen": _conversation(raw, "chosen")}


def ultrafeedback_pair(raw: RawRecord) -> dict:
    return {"chosen": _conversation(raw, "chosen"), "rejected": _conversation(raw, "rejected")}


def ultrafeedback_prompt(raw: RawRecord) -> dict:
    return {"chosen": _conversation(raw, "chosen"), **_others(raw, "prompt", "messages", "chosen")}


# ---------------------------------------------------------------- OpenAssistant/oasst1 (and oasst2)

OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


def oasst_trees(column: Callable[[str], list], where: Callable[[int], str], source: str) -> list[list[int]]:
    """Group the flat message rows of an OpenAssistant export into one record per message tree.

    `column(name)` is every row's value of a column and `where(i)` the position of row i. Returns the rows of each
    tree: the top of the tree first, then the others in source order; trees in the order of their first row. The
    top is the root a row's `parent_id` chain leads to; a chain that breaks (a parent_id that is no row's
    message_id) stops at the row with the broken link, and that tree is reported as invalid when it is converted.
    Two rows with the same message_id are an error here.
    """
    message_ids, parent_ids = column("message_id"), column("parent_id")
    by_id: dict[str, int] = {}
    for i, message_id in enumerate(message_ids):
        if isinstance(message_id, str):
            if message_id in by_id:
                also = where(by_id[message_id])
                raise DataError(source, where(i), "message_id", f"'{message_id}' is also the message_id of {also}")
            by_id[message_id] = i
    tops: dict[int, int] = {}

    def top_of(row: int) -> int:
        """Where the parent_id chain from `row` ends: at a root, a broken link or where a loop closes (memoised)."""
        path: list[int] = []
        on_path: set[int] = set()
        while row not in tops:
            parent = parent_ids[row]
            if not isinstance(parent, str) or parent not in by_id or row in on_path:
                tops[row] = row
                break
            on_path.add(row)
            path.append(row)
            row = by_id[parent]
        for step in path:
            tops[step] = tops[row]
        return tops[row]

    trees: dict[int, list[int]] = {}
    for row in range(len(message_ids)):
        trees.setdefault(top_of(row), []).append(row)
    return [[top, *(r for r in rows if r != top)] for top, rows in trees.items()]


def _oasst_best_reply(replies: list[RawRecord]) -> RawRecord | None:
    """The reply to follow: the best ranked (rank 0 is the best; unranked after ranked), the first in source order
    on equal ranks. Replies marked deleted or that failed review are not followed."""
    usable = [r for r in replies if r.data.get("deleted") is not True and r.data.get("review_result") is not False]
    for reply in usable:
        rank = reply.data.get("rank")
        if rank is not None and (not _is_number(rank) or rank != int(rank)):
            raise DataError(reply.source, reply.where, "rank", f"expected an integer or null, found {describe(rank)}")
    ranked = sorted(
        enumerate(usable), key=lambda ir: (ir[1].data.get("rank") is None, ir[1].data.get("rank") or 0, ir[0])
    )
    return ranked[0][1] if ranked else None


def oasst_thread(raw: RawRecord) -> list[dict]:
    """The conversation that follows the best reply at every turn from the root of the tree to a leaf.

    Only the messages on that thread are read and checked; the other replies are not used.
    """
    rows = raw.data["tree"]
    root = rows[0]
    parent = root.data.get("parent_id")
    if parent is not None:
        if not isinstance(parent, str):
            problem = f"expected a message_id (string) or null for a root message, found {describe(parent)}"
        elif any(row.data.get("message_id") == parent for row in rows):
            problem = f"'{parent}' leads back to this message: the parent_id links form a loop, with no root"
        else:
            problem = f"'{parent}' is not the message_id of any row of this source, so this message's tree has no root"
        raise DataError(root.source, root.where, "parent_id", problem)
    replies: dict[str, list[RawRecord]] = {}
    for row in rows[1:]:
        replies.setdefault(row.data.get("parent_id"), []).append(row)
    thread, node, expected = [], root, "prompter"
    while node is not None:
        string(node, "message_id", node.data.get("message_id"))
        role = node.data.get("role")
        if role != expected:
            where = (
                "a root message"
                if node is root
                else f"a reply to a {'prompter' if expected == 'assistant' else 'assistant'} message"
            )
            raise DataError(
                node.source, node.where, "role", f"expected '{expected}' for {where}, found {describe(role)}"
            )
        thread.append({"role": OASST_ROLES[role], "content": string(node, "text", node.data.get("text"))})
        node = _oasst_best_reply(replies.get(node.data["message_id"], []))
        expected = "assistant" if expected == "prompter" else "prompter"
    return thread


def oasst_sft(raw: RawRecord) -> dict:
    thread = oasst_thread(raw)
    while thread and thread[-1]["role"] != "assistant":
        thread.pop()
    if not thread:
        raise _error(raw, None, "the message tree has no assistant reply to learn from")
    return {"messages": thread}


def oasst_prompt(raw: RawRecord) -> dict:
    root = raw.data["tree"][0]
    return {"messages": oasst_thread(raw), **_others(root, "text", "role", "parent_id")}
