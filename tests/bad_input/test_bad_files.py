"""Bad data files: what cannot be read or parsed as records. Each error names the file and, where there is one,
the line ("line N"), JSON array item ("item N") or data row ("row N")."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatrlhf.data import load_source

from .conftest import jsonl, write

GOOD = {"prompt": "p", "response": "r"}
GOOD_LINE = json.dumps(GOOD) + "\n"


def test_missing_file(tmp_path, sft, fail):
    err = fail(sft(tmp_path / "nope.jsonl"))
    assert re.search(r"nope\.jsonl: no such file or directory$", err.strip()), err


def test_malformed_json_line(tmp_path, sft, fail):
    data = write(tmp_path / "data.jsonl", GOOD_LINE + '{"prompt": "p", "response": }\n')
    err = fail(sft(data))
    # The value is missing where the "}" stands: column 29 of line 2.
    assert re.search(r"data\.jsonl:line 2: invalid JSON: Expecting value \(column 29\)", err), err


def test_malformed_json_array(tmp_path, sft, fail):
    data = write(tmp_path / "data.json", '[{"prompt": "p", "response": "r"},\n {"prompt": "p" "response": "r"}]')
    err = fail(sft(data))
    assert re.search(r"data\.json:line 2: invalid JSON: Expecting ',' delimiter \(column 17\)", err), err


def test_latin1_file(tmp_path, sft, fail):
    data = tmp_path / "data.jsonl"
    data.write_bytes(GOOD_LINE.encode() + '{"prompt": "café", "response": "r"}\n'.encode("latin-1"))
    err = fail(sft(data))
    assert re.search(r"data\.jsonl:line 2: invalid UTF-8 \(byte 0xe9\); save the file as UTF-8", err), err


@pytest.mark.parametrize("encoding, name", [("utf-16", "UTF-16"), ("utf-32", "UTF-32")])
def test_wide_encoding_with_byte_order_mark(encoding, name, tmp_path, sft, fail):
    data = tmp_path / "data.jsonl"
    data.write_bytes((GOOD_LINE * 2).encode(encoding))  # Python's utf-16/utf-32 codecs write a byte-order mark
    err = fail(sft(data))
    assert re.search(rf"data\.jsonl: is {name} text \(it starts with a {name} byte-order mark\); save it as UTF-8", err)


def test_utf16_without_byte_order_mark(tmp_path, sft, fail):
    data = tmp_path / "data.jsonl"
    data.write_bytes((GOOD_LINE * 2).encode("utf-16-le"))
    err = fail(sft(data))
    assert re.search(r"data\.jsonl:line 1: contains NUL bytes \(0x00\).*UTF-16.*save it as UTF-8", err), err


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + GOOD_LINE.encode())
    [record] = load_source(str(data))
    assert record.data == GOOD and record.where == "line 1"


@pytest.mark.parametrize("text", ["", "\n  \n\t\n"], ids=["empty", "blank lines"])
def test_no_records(text, tmp_path, sft, fail):
    data = write(tmp_path / "data.jsonl", text)
    err = fail(sft(data))
    assert err.strip().endswith(f"{data}: no records"), err


def test_json_top_level_object(tmp_path, sft, fail):
    data = write(tmp_path / "data.json", json.dumps({"data": [GOOD, GOOD]}, indent=2))
    err = fail(sft(data))
    assert re.search(r"data\.json: expected a JSON array of objects or one JSON object per line", err), err
    assert "found a single JSON object spanning several lines" in err


@pytest.mark.parametrize(
    "name, text, where, found",
    [
        ("data.jsonl", GOOD_LINE + '["p", "r"]\n', "line 2", "an array"),
        ("data.json", json.dumps([GOOD, "p r"]), "item 2", "a string"),
    ],
    ids=["jsonl line", "json array item"],
)
def test_record_that_is_not_an_object(name, text, where, found, tmp_path, sft, fail):
    err = fail(sft(write(tmp_path / name, text)))
    assert re.search(rf"{re.escape(name)}:{where}: expected a JSON object, found {found}", err), err


def test_csv_missing_column(tmp_path, sft, fail):
    data = write(tmp_path / "data.csv", "prompt,answer\nhi,there\n")
    err = fail(sft(data))
    assert re.search(r"data\.csv:row 1: field 'response': missing \(expected a string\)", err), err
    assert "the record's fields are: 'prompt', 'answer'" in err


def test_csv_row_with_extra_value(tmp_path, sft, fail):
    data = write(tmp_path / "data.csv", "prompt,response\na,b\nc,d,e\n")
    err = fail(sft(data))
    assert re.search(r"data\.csv:row 2: has 3 values but the header has 2 columns \(line 3\)", err), err


def test_csv_duplicate_column(tmp_path, sft, fail):
    data = write(tmp_path / "data.csv", "prompt,prompt\na,b\n")
    err = fail(sft(data))
    assert re.search(r"data\.csv:line 1: duplicate column 'prompt' in the header", err), err


def test_parquet_column_of_wrong_type(tmp_path, sft, fail):
    data = tmp_path / "data.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "response": [7, 8, 9]}), data)
    err = fail(sft(data))
    # All three rows are invalid: the first is named, the other two counted.
    assert re.search(r"data\.parquet:row 1: field 'response': expected a string, found integer 7", err), err
    assert "(and 2 more invalid records in this dataset)" in err


def test_unreadable_file(tmp_path, sft, fail, monkeypatch):
    data = jsonl(tmp_path / "data.jsonl", [GOOD])
    data.chmod(0)
    if os.access(data, os.R_OK):  # root reads anything: have the OS answer as it would for anyone else
        open_path = Path.open

        def refuse(self, *args, **kwargs):
            if self == data:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return open_path(self, *args, **kwargs)

        monkeypatch.setattr(Path, "open", refuse)
    err = fail(sft(data))
    assert re.search(r"data\.jsonl: cannot read: Permission denied", err), err


def test_directory_without_dataset_files(tmp_path, sft, fail):
    folder = tmp_path / "folder"
    folder.mkdir()
    jsonl(folder / "inside.jsonl", [GOOD])  # a directory of files is not a dataset; it must be named file by file
    err = fail(sft(folder))
    assert re.search(r"folder: is a directory but not a dataset written by save_to_disk", err), err


def test_unsupported_file_type(tmp_path, sft, fail):
    err = fail(sft(write(tmp_path / "data.txt", "p\tr\n")))
    assert re.search(r"data\.txt: unsupported file type '\.txt'; supported: \.jsonl, \.json, \.parquet, \.csv", err)


def test_missing_split_of_a_saved_dataset(tmp_path, sft, fail):
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([GOOD] * 4)}).save_to_disk(str(saved))
    err = fail(sft(f"{saved}:test"))
    assert re.search(r"saved:test: no split 'test'; the splits are: train", err), err


def test_split_suffix_on_a_file(tmp_path, sft, fail):
    data = jsonl(tmp_path / "data.jsonl", [GOOD])
    err = fail(sft(f"{data}:train"))
    assert re.search(r"data\.jsonl:train: a ':train' suffix only applies to a dataset directory", err), err
