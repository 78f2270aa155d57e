"""Bad records when data is prepared in several processes and cached: the messages are the same as in one process,
and a file fixed after a failed run is read again, never answered from the cache."""

from __future__ import annotations

import re

from chatrlhf.cli import main

from .conftest import jsonl

GOOD = {"prompt": "p", "response": "r"}
BAD = {"prompt": "p", "answer": "r"}


def records(n: int, bad_lines: set[int]) -> list[dict]:
    return [BAD if i in bad_lines else {"prompt": f"p{i}", "response": "r"} for i in range(1, n + 1)]


def test_invalid_records_with_two_processes(tmp_path, sft, fail):
    # 2,400 records: the two processes validate 1,200 each; the bad ones are in both shares
    data = jsonl(tmp_path / "data.jsonl", records(2400, {1500, 900, 2300}))
    err = fail(sft(data, "--data.num_proc", "2"))
    assert re.search(
        r"data\.jsonl:line 900: field 'response': missing \(expected a string\); the record's fields are: 'prompt', "
        r"'answer' \(and 2 more invalid records in this dataset\)",
        err,
    ), err


def test_invalid_records_skipped_with_two_processes(tmp_path, sft, capsys):
    data = jsonl(tmp_path / "data.jsonl", records(2400, {1500, 900, 2300}))
    code = main(sft(data, "--data.num_proc", "2", "--data.skip_invalid", "True", "--train.max_seq_len", "64"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert re.search(r"warning: skipped 3 invalid SFT records; first: .*data\.jsonl:line 900: ", captured.out)


def test_a_file_fixed_after_a_failed_run_is_read_again(tmp_path, sft, fail):
    data = jsonl(tmp_path / "data.jsonl", [GOOD, BAD, GOOD])
    assert re.search(r"data\.jsonl:line 2: field 'response'", fail(sft(data)))
    jsonl(data, [GOOD, GOOD, BAD])  # the same path and size, other bytes
    assert re.search(r"data\.jsonl:line 3: field 'response'", fail(sft(data)))


def test_a_cache_folder_that_cannot_be_written(tmp_path, sft, fail):
    data = jsonl(tmp_path / "data.jsonl", [GOOD] * 4)
    in_the_way = tmp_path / "cache"
    in_the_way.write_text("a file, not a folder")
    err = fail(sft(data, "--data.cache_dir", str(in_the_way)))
    assert re.search(
        rf"data\.cache_dir={re.escape(str(in_the_way))}: cannot write prepared data there \(.*\); choose a writable "
        "folder",
        err,
    ), err
