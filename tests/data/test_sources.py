"""Reading sources: every format, positions, and the errors for bad files."""

from __future__ import annotations

import json

import pytest

from chatrlhf.data import RawRecord, load_source
from chatrlhf.errors import DataError, UserError


def write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def error_of(spec: str) -> str:
    with pytest.raises(DataError) as info:
        load_source(spec)
    return str(info.value)


# ---------------------------------------------------------------- JSONL


def test_jsonl_records_and_physical_line_numbers(tmp_path):
    spec = write(tmp_path / "d.jsonl", '{"prompt": "a", "response": "b"}\n\n  \n{"prompt": "c", "n": 1}\n')
    records = load_source(spec)
    assert records == [
        RawRecord({"prompt": "a", "response": "b"}, spec, "line 1"),
        RawRecord({"prompt": "c", "n": 1}, spec, "line 4"),
    ]


def test_jsonl_crlf_and_bom(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\r\n{"prompt": "b"}\r\n')
    records = load_source(str(path))
    assert [r.data for r in records] == [{"prompt": "a"}, {"prompt": "b"}]
    assert [r.where for r in records] == ["line 1", "line 2"]


def test_jsonl_invalid_json_names_line_and_json_message(tmp_path):
    spec = write(tmp_path / "bad.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c",}\n')
    message = error_of(spec)
    assert message.startswith(f"{spec}:line 3:")
    assert "invalid JSON" in message
    assert "Expecting property name enclosed in double quotes" in message


def test_jsonl_non_object_line(tmp_path):
    spec = write(tmp_path / "bad.jsonl", '{"prompt": "a"}\n["prompt", "b"]\n')
    message = error_of(spec)
    assert message == f"{spec}:line 2: expected a JSON object, found an array"


def test_jsonl_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "caf\xe9"}\n')
    message = error_of(str(path))
    assert message.startswith(f"{path}:line 3:")
    assert "invalid UTF-8" in message and "0xe9" in message


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_jsonl_has_no_records(tmp_path, text):
    spec = write(tmp_path / "empty.jsonl", text)
    assert error_of(spec) == f"{spec}: no records"


# ---------------------------------------------------------------- JSON


def test_json_array_items(tmp_path):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "d", "chosen": "e", "rejected": "f"}]
    spec = write(tmp_path / "d.json", json.dumps(rows, indent=2))
    records = load_source(spec)
    assert [r.data for r in records] == rows
    assert [r.where for r in records] == ["item 1", "item 2"]
    assert all(r.source == spec for r in records)


def test_json_file_holding_json_lines(tmp_path):
    spec = write(tmp_path / "d.json", '{"prompt": "a"}\n{"prompt": "b"}\n')
    records = load_source(spec)
    assert [(r.data, r.where) for r in records] == [({"prompt": "a"}, "line 1"), ({"prompt": "b"}, "line 2")]


def test_json_array_non_object_item(tmp_path):
    spec = write(tmp_path / "d.json", '[{"prompt": "a"}, {"prompt": "b"}, "c"]')
    assert error_of(spec) == f"{spec}:item 3: expected a JSON object, found a string"


def test_json_array_invalid_json_names_line(tmp_path):
    spec = write(tmp_path / "d.json", '[\n  {"prompt": "a"},\n  {"prompt": "b"\n]\n')
    message = error_of(spec)
    assert message.startswith(f"{spec}:line 4:")
    assert "invalid JSON" in message and "Expecting ',' delimiter" in message


def test_json_single_multiline_object_is_rejected(tmp_path):
    spec = write(tmp_path / "d.json", '{\n  "data": [{"prompt": "a"}]\n}\n')
    message = error_of(spec)
    assert message.startswith(f"{spec}:")
    assert "JSON array" in message and "single JSON object" in message


def test_empty_json_array(tmp_path):
    spec = write(tmp_path / "d.json", "[]")
    assert error_of(spec) == f"{spec}: no records"


# ---------------------------------------------------------------- Parquet and CSV


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"prompt": "p1", "messages": [{"role": "user", "content": "u"}], "score": 1.5},
        {"prompt": "p2", "messages": None, "score": 2.0},
    ]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    records = load_source(str(path))
    assert [r.data for r in records] == rows
    assert [r.where for r in records] == ["row 1", "row 2"]


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"not parquet at all")
    message = error_of(str(path))
    assert message.startswith(f"{path}: not a readable Parquet file")


def test_csv_rows_are_strings(tmp_path):
    spec = write(tmp_path / "d.csv", 'prompt,response,n\nhi,"hello, there",3\n\n"multi\nline",ok,4\n')
    records = load_source(spec)
    assert [r.data for r in records] == [
        {"prompt": "hi", "response": "hello, there", "n": "3"},
        {"prompt": "multi\nline", "response": "ok", "n": "4"},
    ]
    assert [r.where for r in records] == ["row 1", "row 2"]


def test_csv_ragged_row(tmp_path):
    spec = write(tmp_path / "d.csv", "prompt,response\na,b\nc,d,e\n")
    message = error_of(spec)
    assert message.startswith(f"{spec}:row 2:")
    assert "3 values" in message and "2 columns" in message


def test_csv_header_only_has_no_records(tmp_path):
    spec = write(tmp_path / "d.csv", "prompt,response\n")
    assert error_of(spec) == f"{spec}: no records"


def test_csv_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"prompt,response\nx,\xff\n")
    assert error_of(str(path)).startswith(f"{path}:line 2: invalid UTF-8")


# ---------------------------------------------------------------- datasets saved to disk


def test_saved_dataset(tmp_path):
    import datasets

    rows = [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    records = load_source(str(tmp_path / "ds"))
    assert [r.data for r in records] == rows
    assert [r.where for r in records] == ["row 1", "row 2"]
    assert records[0].source == str(tmp_path / "ds")


def test_saved_dataset_dict_splits(tmp_path):
    import datasets

    train = datasets.Dataset.from_list([{"prompt": "t1"}, {"prompt": "t2"}])
    test = datasets.Dataset.from_list([{"prompt": "x1"}])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    base = str(tmp_path / "dd")
    assert [r.data["prompt"] for r in load_source(base)] == ["t1", "t2"]
    test_records = load_source(f"{base}:test")
    assert [r.data["prompt"] for r in test_records] == ["x1"]
    assert test_records[0].source == f"{base}:test"
    message = error_of(f"{base}:validation")
    assert "no split 'validation'" in message and "train, test" in message


def test_dataset_dict_without_train_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"test": datasets.Dataset.from_list([{"prompt": "x"}])})
    dd.save_to_disk(str(tmp_path / "dd"))
    message = error_of(str(tmp_path / "dd"))
    assert "no split 'train'" in message and "test" in message


def test_split_suffix_on_single_dataset_or_file(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"prompt": "a"}]).save_to_disk(str(tmp_path / "ds"))
    assert "without splits" in error_of(f"{tmp_path / 'ds'}:test")
    spec = write(tmp_path / "d.jsonl", '{"prompt": "a"}\n')
    assert "only applies to a dataset directory" in error_of(f"{spec}:test")


def test_directory_that_is_not_a_dataset(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hi")
    message = error_of(str(tmp_path / "plain"))
    assert message.startswith(f"{tmp_path / 'plain'}: is a directory but not a dataset written by save_to_disk")


# ---------------------------------------------------------------- paths and formats


def test_missing_file(tmp_path):
    spec = str(tmp_path / "nope.jsonl")
    assert error_of(spec) == f"{spec}: no such file or directory"


def test_unsupported_extension_lists_supported(tmp_path):
    spec = write(tmp_path / "d.txt", "hello\n")
    message = error_of(spec)
    assert message.startswith(f"{spec}: unsupported file type '.txt'")
    for ext in (".jsonl", ".json", ".parquet", ".csv", "save_to_disk"):
        assert ext in message


def test_data_error_is_a_user_error(tmp_path):
    with pytest.raises(UserError):
        load_source(str(tmp_path / "missing.json"))


def test_large_jsonl_loads(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text("".join(f'{{"prompt": "p{i}", "response": "r{i}"}}\n' for i in range(100_000)))
    records = load_source(str(path))
    assert len(records) == 100_000
    assert records[-1].where == "line 100000" and records[-1].data == {"prompt": "p99999", "response": "r99999"}
