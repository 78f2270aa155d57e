"""Bad input in the public datasets' formats and `hf:` sources: a record that its format's adapter cannot convert
names the file, the line or row and the dataset's own field; a source whose columns fit no format, or several, lists
its columns and the known formats; a dataset that is not in the offline cache is named. Each file holds one good
record of its schema, then the bad one (line or row 2)."""

from __future__ import annotations

import re

import datasets
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatrlhf.cli import main

from .conftest import jsonl


@pytest.fixture()
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face datasets cache in offline mode (HF_HUB_OFFLINE=1)."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def hh(last_chosen="fine", last_rejected="bad", question="how?"):
    context = f"\n\nHuman: hi\n\nAssistant: hello\n\nHuman: {question}"
    return {"chosen": f"{context}\n\nAssistant: {last_chosen}", "rejected": f"{context}\n\nAssistant: {last_rejected}"}


def rm_static(prompt="\n\nHuman: hi\n\nAssistant:"):
    return {"prompt": prompt, "response": " yes", "chosen": " yes", "rejected": " no"}


def shp(score_a=9, score_b=2, labels=1):
    return {
        "post_id": "p", "domain": "askculinary_train", "upvote_ratio": 0.98, "history": "why?",
        "c_root_id_A": "a", "c_root_id_B": "b", "created_at_utc_A": 1, "created_at_utc_B": 2,
        "score_A": score_a, "score_B": score_b, "human_ref_A": "because", "human_ref_B": "no idea",
        "labels": labels, "seconds_difference": 1.0, "score_ratio": 4.5,
    }  # fmt: skip


def webgpt(score_0=1.0, question=None):
    return {
        "question": question or {"dataset": "eli5", "id": "q", "full_text": "why?"},
        "quotes_0": {"title": [], "extract": []}, "answer_0": "because", "tokens_0": ["because"], "score_0": score_0,
        "quotes_1": {"title": [], "extract": []}, "answer_1": "no idea", "tokens_1": ["no", " idea"],
        "score_1": -score_0,
    }  # fmt: skip


def ultrafeedback(rejected_question="q", chosen_answer="good"):
    return {
        "prompt": "q", "prompt_id": "0", "score_chosen": 8.0, "score_rejected": 2.0,
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": chosen_answer}],
        "rejected": [{"role": "user", "content": rejected_question}, {"role": "assistant", "content": "bad"}],
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": chosen_answer}],
    }  # fmt: skip


def oasst(message_id, parent_id, role, text):
    return {
        "message_id": message_id, "parent_id": parent_id, "user_id": "u", "created_date": "2023-02-05T14:23:50+00:00",
        "text": text, "role": role, "lang": "en", "review_count": 3, "review_result": True, "deleted": False,
        "rank": 0 if role == "assistant" else None, "synthetic": False, "model_name": None, "detoxify": None,
        "message_tree_id": "t", "tree_state": "ready_for_export", "emojis": None, "labels": None,
    }  # fmt: skip


OASST_TREE = [oasst("r", None, "prompter", "hi"), oasst("a", "r", "assistant", "hello")]

# (stage, file name, records (the second one bad), the expected message after the file name)
CASES = {
    "hh-rlhf: transcript not ending with an Assistant turn": (
        "sft",
        "hh.jsonl",
        [hh(), {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?", "rejected": hh()["rejected"]}],
        "line 2: field 'chosen': the transcript does not end with an Assistant turn (the answer)",
    ),
    "hh-rlhf: chosen and rejected conversations differ before the answer": (
        "reward",
        "hh.jsonl",
        [hh(), {"chosen": hh()["chosen"], "rejected": hh(question="why?")["rejected"]}],
        "line 2: field 'rejected': the conversation before its final Assistant turn differs from 'chosen''s; a pair "
        "compares two answers to one conversation",
    ),
    "hh-rlhf: empty final answer": (
        "reward",
        "hh.jsonl",
        [hh(), hh(last_rejected="")],
        "line 2: field 'rejected': turn 4 (Assistant) is empty",
    ),
    "rm-static: prompt not ending with a Human turn": (
        "rl",
        "rm.jsonl",
        [rm_static(), rm_static("\n\nHuman: hi\n\nAssistant: hello\n\nAssistant:")],
        "line 2: field 'prompt': the transcript must end with a Human turn (then '\\n\\nAssistant:')",
    ),
    "SHP: a tie": (
        "reward",
        "shp.parquet",
        [shp(), shp(score_a=4, score_b=4)],
        "row 2: field 'labels': a tie: score_A and score_B are both 4, so neither answer is preferred",
    ),
    "SHP: labels not 0 or 1": (
        "sft",
        "shp.parquet",
        [shp(), shp(labels=-1)],
        "row 2: field 'labels': expected 1 (human_ref_A preferred) or 0 (human_ref_B preferred), found integer -1",
    ),
    "WebGPT: a tie": (
        "reward",
        "webgpt.jsonl",
        [webgpt(), webgpt(score_0=0.0)],
        "line 2: field 'score_1': equals score_0 (0.0): a tie, so neither answer is preferred",
    ),
    "WebGPT: question without full_text": (
        "rl",
        "webgpt.jsonl",
        [webgpt(), webgpt(question={"dataset": "eli5", "id": "q"})],
        "line 2: field 'question.full_text': missing (expected a string)",
    ),
    "UltraFeedback: conversations with different prompts": (
        "reward",
        "uf.parquet",
        [ultrafeedback(), ultrafeedback(rejected_question="another")],
        "row 2: field 'rejected[0]': differs from 'chosen' before the final assistant turn; a pair compares two "
        "answers to one conversation",
    ),
    "UltraFeedback: empty answer": (
        "sft",
        "uf.parquet",
        [ultrafeedback(), ultrafeedback(chosen_answer=" ")],
        "row 2: field 'chosen[1].content': is only whitespace",
    ),
    "oasst: reply whose parent is not in the file": (
        "sft",
        "oasst.parquet",
        [*OASST_TREE, oasst("x", "gone", "assistant", "orphan")],
        "row 3: field 'parent_id': 'gone' is not the message_id of any row of this source, so this message's tree "
        "has no root",
    ),
    "oasst: message tree without a reply": (
        "sft",
        "oasst.parquet",
        [*OASST_TREE, oasst("s", None, "prompter", "anyone?")],
        "row 3: the message tree has no assistant reply to learn from",
    ),
    "oasst: used for preference pairs": (
        "reward",
        "oasst.parquet",
        OASST_TREE,
        "row 1: format 'oasst' (OpenAssistant/oasst1, OpenAssistant/oasst2) has no preference pairs, only SFT records "
        "and RL prompts",
    ),
    "conversational pair with a string answer": (
        "reward",
        "pairs.jsonl",
        [
            {
                "prompt": [{"role": "user", "content": "q"}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            {
                "prompt": [{"role": "user", "content": "q"}],
                "chosen": "a",
                "rejected": [{"role": "assistant", "content": "b"}],
            },
        ],
        "line 2: field 'chosen': expected a list of {'role', 'content'} objects, found string 'a'",
    ),  # fmt: skip
    "implicit-prompt pair without a shared prompt": (
        "reward",
        "pairs.jsonl",
        [{"chosen": "The sky is blue.", "rejected": "The sky is green."}, {"chosen": "yes", "rejected": "no"}],
        "line 2: field 'prompt': missing (expected a string), and 'chosen' and 'rejected' do not start with the same "
        "words, which would be the prompt of an implicit-prompt pair; the record's fields are: 'chosen', 'rejected'",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_unconvertible_record(case, tmp_path, sft, reward, rl, fail):
    stage, name, rows, expected = CASES[case]
    path = (parquet if name.endswith(".parquet") else jsonl)(tmp_path / name, rows)
    err = fail({"sft": sft, "reward": reward, "rl": rl}[stage](path))
    assert f"{name}:{expected}\n" in err, err


def test_columns_of_no_known_format(tmp_path, sft, fail):
    data = jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    err = fail(sft(data))
    assert re.search(
        r"qa\.jsonl: no known format has these columns: 'question', 'answer'; known formats \(columns\): trl \("
        r".*; hh-rlhf \(Anthropic/hh-rlhf: chosen, rejected\); .*; see docs/data\.md$",
        err.strip(),
    ), err


def test_columns_of_two_formats(tmp_path, reward, fail):
    data = jsonl(tmp_path / "both.jsonl", [{**shp(), **webgpt()}])
    err = fail(reward(data))
    assert "both.jsonl: the columns ('post_id', " in err
    assert err.strip().endswith("fit more than one format: shp, webgpt; choose one with --data.format"), err


def test_dataset_not_in_the_offline_cache(offline_cache, reward, fail):
    err = fail(reward("hf:Anthropic/hh-rlhf:train"))
    assert err.strip().endswith(
        f"hf:Anthropic/hh-rlhf:train: dataset 'Anthropic/hh-rlhf' is not in the Hugging Face datasets cache "
        f"({offline_cache}) and offline mode is on (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE): run once with network "
        "access to download it, or turn offline mode off"
    ), err


def test_dataset_without_the_split(offline_cache, tmp_path, reward, fail):
    repo = tmp_path / "repo"
    repo.mkdir()
    jsonl(repo / "test.jsonl", [hh()])
    err = fail(reward(f"hf:{repo}"))
    expected = f"hf:{repo}: dataset '{repo}' has no split 'train': Unknown split \"train\". Should be one of ['test']."
    assert expected in err, err


def test_malformed_hub_source(offline_cache, reward, fail):
    err = fail(reward("hf:Anthropic/hh-rlhf?dir=harmless-base"))
    assert "hf:Anthropic/hh-rlhf?dir=harmless-base: unknown option 'dir' (known: config, data_dir, data_files, " in err


def test_unknown_data_format(tmp_path, reward, fail):
    err = fail(reward(jsonl(tmp_path / "pairs.jsonl", [hh()]), "--data.format", "hh"))
    assert err.strip().endswith(
        "data.format must be one of auto, trl, hh-rlhf, rm-static, shp, webgpt, ultrafeedback, oasst, got 'hh'"
    ), err


def test_unconvertible_records_skipped_and_counted(tmp_path, reward, out, capsys):
    data = parquet(tmp_path / "shp.parquet", [shp(), shp(score_a=4, score_b=4), shp(labels=0), shp()])
    assert main(reward(data, "--data.skip_invalid", "True")) == 0
    assert re.search(
        r"warning: skipped 1 invalid preference-pair records; first: .*shp\.parquet:row 2: field 'labels': a tie",
        capsys.readouterr().out,
    )
