"""Small records in the exact schemas of the public datasets that chatrlhf has adapters for (docs/data.md), and
writers that save them as the Hub serves them (Parquet) or as JSON Lines.

Every builder returns `n` rows whose answers differ (so every row is a valid pair) and whose prompts are short
(a few dozen bytes with the tiny byte-level tokenizer).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow
import pyarrow.parquet


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def hh_rlhf(n: int) -> list[dict]:
    """Anthropic/hh-rlhf: whole transcripts; even rows are two-turn conversations."""
    rows = []
    for i in range(n):
        context = f"\n\nHuman: what is {i}+{i}?"
        if i % 2 == 0:
            context += f"\n\nAssistant: {2 * i}.\n\nHuman: and doubled?"
        rows.append(
            {"chosen": f"{context}\n\nAssistant: it is {4 * i}", "rejected": f"{context}\n\nAssistant: no idea"}
        )
    return rows


def rm_static(n: int) -> list[dict]:
    """Dahoas/rm-static (and Dahoas/full-hh-rlhf): the prompt is a transcript ending with "Assistant:"."""
    return [
        {
            "prompt": f"\n\nHuman: hi {i}\n\nAssistant: hello\n\nHuman: count to {i}?\n\nAssistant:",
            "response": f" {i}",
            "chosen": f" {i}",
            "rejected": " I can't",
        }
        for i in range(n)
    ]


def shp(n: int) -> list[dict]:
    """stanfordnlp/SHP: `labels` 1 prefers human_ref_A (the higher-scored comment), 0 human_ref_B."""
    rows = []
    for i in range(n):
        label = i % 2
        score_a, score_b = (12, 3) if label else (2, 9)
        rows.append(
            {
                "post_id": f"p{i}",
                "domain": "askculinary_train",
                "upvote_ratio": 0.98,
                "history": f"why is dough {i} sticky?",
                "c_root_id_A": f"a{i}",
                "c_root_id_B": f"b{i}",
                "created_at_utc_A": 1_600_000_000 + i,
                "created_at_utc_B": 1_600_000_100 + i,
                "score_A": score_a,
                "score_B": score_b,
                "human_ref_A": "too much water" if label else "it is the flour",
                "human_ref_B": "it is the flour" if label else "too much water",
                "labels": label,
                "seconds_difference": 100.0,
                "score_ratio": max(score_a, score_b) / min(score_a, score_b),
            }
        )
    return rows


def webgpt(n: int) -> list[dict]:
    """openai/webgpt_comparisons: the better answer has the higher score; score_0 + score_1 = 0."""
    rows = []
    for i in range(n):
        score = 1.0 if i % 2 else -0.5
        rows.append(
            {
                "question": {"dataset": "eli5", "id": f"q{i}", "full_text": f"why {i}?"},
                "quotes_0": {"title": ["a page"], "extract": ["a quote"]},
                "answer_0": f"because {i} [1]",
                "tokens_0": ["because", f" {i}"],
                "score_0": score,
                "quotes_1": {"title": [], "extract": []},
                "answer_1": "no one knows",
                "tokens_1": ["no", " one", " knows"],
                "score_1": -score,
            }
        )
    return rows


def ultrafeedback_h4(n: int) -> list[dict]:
    """HuggingFaceH4/ultrafeedback_binarized (train_prefs): whole conversations in chosen/rejected."""
    rows = []
    for i in range(n):
        prompt = f"name {i} colors"
        chosen = [user(prompt), assistant("red and blue")]
        rows.append(
            {
                "prompt": prompt,
                "prompt_id": f"{i:064x}",
                "chosen": chosen,
                "rejected": [user(prompt), assistant("I like cats")],
                "messages": chosen,
                "score_chosen": 8.0,
                "score_rejected": 4.5,
            }
        )
    return rows


def ultrafeedback_argilla(n: int) -> list[dict]:
    """argilla/ultrafeedback-binarized-preferences-cleaned."""
    return [
        {
            "source": "evol_instruct",
            "prompt": f"add {i} and 1",
            "chosen": [user(f"add {i} and 1"), assistant(str(i + 1))],
            "chosen-rating": 5.0,
            "chosen-model": "gpt-4",
            "rejected": [user(f"add {i} and 1"), assistant("42")],
            "rejected-rating": 2.0,
            "rejected-model": "llama-2-7b-chat",
        }
        for i in range(n)
    ]


def oasst_message(message_id, parent_id, role, text, tree, rank=None, **fields) -> dict:
    """One row of OpenAssistant/oasst1, with every column of the export."""
    row = {
        "message_id": message_id,
        "parent_id": parent_id,
        "user_id": f"user-{message_id}",
        "created_date": "2023-02-05T14:23:50.983374+00:00",
        "text": text,
        "role": role,
        "lang": "en",
        "review_count": 3,
        "review_result": True,
        "deleted": False,
        "rank": rank,
        "synthetic": False,
        "model_name": None,
        "detoxify": {"toxicity": 0.001, "insult": 0.0002},
        "message_tree_id": tree,
        "tree_state": "ready_for_export",
        "emojis": {"name": ["+1"], "count": [2]},
        "labels": {"name": ["spam", "quality"], "value": [0.0, 0.8], "count": [3, 3]},
    }
    row.update(fields)
    return row


def oasst1(trees: int) -> list[dict]:
    """`trees` message trees: a prompt with two ranked replies (the best second in the file), a follow-up to the best
    one and its reply; a third, worse, reply marked deleted."""
    rows = []
    for t in range(trees):
        root = f"t{t}"
        rows += [
            oasst_message(root, None, "prompter", f"tell me about {t}", root),
            oasst_message(f"{root}-a1", root, "assistant", "no", root, rank=1),
            oasst_message(f"{root}-a0", root, "assistant", f"{t} is a number", root, rank=0),
            oasst_message(f"{root}-a2", root, "assistant", "spam", root, rank=None, deleted=True),
            oasst_message(f"{root}-p", f"{root}-a0", "prompter", "is it even?", root),
            oasst_message(f"{root}-pa", f"{root}-p", "assistant", "yes" if t % 2 == 0 else "no", root, rank=0),
        ]
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_parquet(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


def hh_repo(root: Path) -> Path:
    """A local copy of the Anthropic/hh-rlhf repository's layout: a directory per subset, a file per split
    (the 4 + 3 train rows are the "train" split of the whole repository)."""
    write_jsonl(hh_rlhf(4), root / "harmless-base" / "train.jsonl")
    write_jsonl(hh_rlhf(2), root / "harmless-base" / "test.jsonl")
    write_jsonl(hh_rlhf(3), root / "helpful-base" / "train.jsonl")
    return root


def download_into_cache(repo: Path, repo_id: str, cache: Path) -> None:
    """Put `repo` in the datasets cache `cache` where a download of `repo_id` from the Hub puts it, as if it had
    been downloaded once: `load_dataset` prepares the local repository under its directory name (which must be
    `repo_id`'s dataset name), and a Hub dataset's copy lives under `OWNER___NAME`."""
    import datasets

    namespace, name = repo_id.split("/")
    assert repo.name == name
    datasets.load_dataset(str(repo), split="train")
    shutil.copytree(cache / name, cache / f"{namespace}___{name}")
    shutil.rmtree(cache / name)
