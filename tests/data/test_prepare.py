"""Preparing a stage's data through Arrow (data/prepare.py, data/cache.py): the records, their order and the errors
of the documented algorithm, computed here the slow obvious way from the files; a second run served from the cache;
a new entry when anything an entry depends on changes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from public_sets import oasst1, write_jsonl, write_parquet

import chatrlhf.data.sources as sources
from chatrlhf.data import RawRecord, to_pair, to_prompt, to_sft
from chatrlhf.data.cache import Prep
from chatrlhf.data.collate import encode_all, encode_pair, encode_sft
from chatrlhf.data.prepare import Rows, validate_rows
from chatrlhf.data.sources import read_source
from chatrlhf.errors import DataError
from chatrlhf.models.tiny import CHAT_TEMPLATE, byte_tokenizer
from chatrlhf.train.data import load_raw, train_eval_split


def pairs(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(start, start + n)]


def file_records(path: Path) -> list[RawRecord]:
    """The records of a JSON Lines file, parsed here line by line (every line holds a record)."""
    lines = path.read_text().splitlines()
    return [RawRecord(json.loads(line), str(path), f"line {i}") for i, line in enumerate(lines, start=1)]


@pytest.fixture()
def prep(tmp_path) -> Prep:
    return Prep(cache_dir=str(tmp_path / "cache"))


# ---------------------------------------------------------------- the same records, in the same order


def test_blend_without_weights_is_one_seeded_shuffle_of_the_sources(tmp_path, prep):
    a = write_jsonl(pairs(30), tmp_path / "a.jsonl")
    b = write_jsonl(pairs(20, start=100), tmp_path / "b.jsonl")
    rows = load_raw([str(a), str(b)], None, seed=3, workdir=tmp_path, prep=prep)
    records, skipped = validate_rows(rows, to_pair)
    pool = file_records(a) + file_records(b)
    expected = [to_pair(pool[i]) for i in np.random.default_rng(3).permutation(len(pool))]
    assert list(records) == expected and skipped.count == 0


def test_weighted_blend_draws_whole_permutations_then_shuffles(tmp_path, prep):
    small = write_jsonl(pairs(4), tmp_path / "small.jsonl")
    large = write_jsonl(pairs(12, start=50), tmp_path / "large.jsonl")
    rows = load_raw([str(small), str(large)], [1.0, 1.0], seed=5, workdir=tmp_path, prep=prep)
    # N = 16 split 8/8: the small file twice over (two permutations), 8 of the large one (the head of one)
    rng = np.random.default_rng(5)
    s, g = file_records(small), file_records(large)
    pool = [s[i] for i in rng.permutation(4)] + [s[i] for i in rng.permutation(4)]
    pool += [g[i] for i in rng.permutation(12)[:8]]
    expected = [to_pair(pool[i]) for i in rng.permutation(16)]
    assert list(validate_rows(rows, to_pair)[0]) == expected


def test_held_out_share_and_items_follow_the_records(tmp_path, prep):
    data = write_jsonl(pairs(40), tmp_path / "d.jsonl")
    records, _ = validate_rows(load_raw([str(data)], None, 1, tmp_path, prep=prep), to_pair)
    train, held = train_eval_split(records, [], 0.1, seed=2)
    everything = list(records)
    out = set(np.random.default_rng(2).permutation(40)[:4].tolist())
    assert list(train) == [r for i, r in enumerate(everything) if i not in out]
    assert list(held) == [everything[i] for i in sorted(out)]
    tok = byte_tokenizer()
    items = encode_all(train, encode_pair, tok, max_len=128)
    assert list(items) == [encode_pair(tok, r, 128) for r in train]


def test_two_processes_give_the_same_records_and_items(tmp_path):
    data = write_jsonl(pairs(2500), tmp_path / "d.jsonl")
    tok = byte_tokenizer()
    out = []
    for num_proc in (1, 2):
        prep = Prep(num_proc=num_proc, cache_dir=str(tmp_path / f"cache-{num_proc}"))
        records, _ = validate_rows(load_raw([str(data)], None, 4, tmp_path, prep=prep), to_sft)
        out.append((list(records), list(encode_all(records, encode_sft, tok, max_len=64, loss_on_prompt=False))))
    assert out[0] == out[1]
    assert list((tmp_path / "cache-2" / "maps").glob("*_00001_of_00002.arrow"))  # the second process wrote its share


def test_oasst_trees_from_json_lines_are_the_parquet_trees(tmp_path, prep):
    rows = oasst1(3)
    from_jsonl = list(read_source(str(write_jsonl(rows, tmp_path / "o.jsonl")), prep=prep))
    from_parquet = list(read_source(str(write_parquet(rows, tmp_path / "o.parquet")), prep=prep))
    assert [r.where.replace("line", "row") for r in from_jsonl] == [r.where for r in from_parquet]
    assert [to_sft(r).messages for r in from_jsonl] == [to_sft(r).messages for r in from_parquet]
    assert [to_prompt(r).extra for r in from_jsonl] == [to_prompt(r).extra for r in from_parquet]


# ---------------------------------------------------------------- errors


def test_the_first_invalid_record_by_file_is_named_and_the_others_counted(tmp_path, prep):
    same = {"prompt": "p", "chosen": "x", "rejected": "x"}
    a = write_jsonl([*pairs(3), {"prompt": "p"}, *pairs(2), same], tmp_path / "a.jsonl")
    b = write_jsonl([{"chosen": "c"}, *pairs(5)], tmp_path / "b.jsonl")
    rows = load_raw([str(b), str(a)], None, seed=0, workdir=tmp_path, prep=prep)
    with pytest.raises(DataError) as info:
        validate_rows(rows, to_pair)
    assert str(info.value) == (
        f"{a}:line 4: field 'chosen': missing (expected a string); the record's fields are: 'prompt' "
        "(and 2 more invalid records in this dataset)"
    )
    records, skipped = validate_rows(rows, to_pair, skip_invalid=True)
    assert (len(records), skipped.count, skipped.first.where) == (10, 3, "line 4")


def test_an_up_sampled_invalid_record_is_counted_each_time_it_is_drawn(tmp_path, prep):
    small = write_jsonl([{"prompt": "p"}, *pairs(1)], tmp_path / "small.jsonl")
    large = write_jsonl(pairs(6, start=10), tmp_path / "large.jsonl")
    rows = load_raw([str(small), str(large)], [1.0, 1.0], seed=0, workdir=tmp_path, prep=prep)
    records, skipped = validate_rows(rows, to_pair, skip_invalid=True)
    # N = 8 split 4/4: the small file twice over, so its invalid record is drawn twice
    assert (len(records), skipped.count, str(skipped.first).startswith(f"{small}:line 1:")) == (6, 2, True)


def test_encoding_errors_name_the_first_record_of_the_file(tmp_path, prep):
    long = [{"prompt": c * 90, "chosen": "a", "rejected": "b"} for c in "pq"]
    data = write_jsonl([*pairs(3), long[0], *pairs(3), long[1]], tmp_path / "d.jsonl")
    records, _ = validate_rows(load_raw([str(data)], None, 9, tmp_path, prep=prep), to_pair)
    with pytest.raises(DataError) as info:
        encode_all(records, encode_pair, byte_tokenizer(), max_len=64)
    assert str(info.value).startswith(f"{data}:line 4: field 'chosen': prompt + chosen is ")
    assert str(info.value).endswith("over max_seq_len=64 (and 1 more of the 8 records)")


# ---------------------------------------------------------------- the cache


calls = {"convert": 0, "encode": 0}


def counting_to_sft(raw):
    calls["convert"] += 1
    return to_sft(raw)


def counting_encode(tok, rec, max_len):
    calls["encode"] += 1
    return encode_sft(tok, rec, max_len, False)


def prepare(paths, prep, tok, max_len=64):
    rows = load_raw([str(p) for p in paths], None, 0, Path(prep.cache_dir), prep=prep)
    records, _ = validate_rows(rows, counting_to_sft)
    return records, encode_all(records, counting_encode, tok, max_len=max_len)


def test_a_second_run_is_served_from_the_cache(tmp_path, prep, monkeypatch):
    data = write_jsonl([{"prompt": f"p{i}", "response": f"r{i}"} for i in range(50)], tmp_path / "d.jsonl")
    tok = byte_tokenizer()
    calls.update(convert=0, encode=0)
    first = prepare([data], prep, tok)
    assert calls == {"convert": 50, "encode": 50}
    files = sorted(Path(prep.cache_dir).rglob("*.arrow"))

    def unread(*args):
        raise AssertionError("the file was read again")

    monkeypatch.setattr(sources, "_jsonl_rows", unread)
    second = prepare([data], prep, tok)
    assert calls == {"convert": 50, "encode": 50}
    assert sorted(Path(prep.cache_dir).rglob("*.arrow")) == files
    assert list(second[0]) == list(first[0]) and list(second[1]) == list(first[1])


def test_what_an_entry_depends_on_makes_a_new_one(tmp_path, prep):
    data = write_jsonl([{"prompt": f"p{i}", "response": f"r{i}"} for i in range(10)], tmp_path / "d.jsonl")
    tok = byte_tokenizer()
    calls.update(convert=0, encode=0)
    prepare([data], prep, tok)
    # the file's bytes: validated and encoded again, and the new content is what comes back
    write_jsonl([{"prompt": f"P{i}", "response": f"r{i}"} for i in range(10)], data)
    records, _ = prepare([data], prep, tok)
    assert calls == {"convert": 20, "encode": 20} and sorted(r.prompt for r in records)[0] == "P0"
    # the tokenizer's chat template, then the maximum length: encoded again, not validated again
    other = byte_tokenizer()
    other.chat_template = CHAT_TEMPLATE.replace("User: ", "U: ")
    _, items = prepare([data], prep, other)
    assert calls == {"convert": 20, "encode": 30}
    assert items[0].input_ids[:2] == list(b"U:")
    with pytest.raises(DataError, match=r"over max_seq_len=8 \(and 9 more of the 10 records\)"):
        prepare([data], prep, tok, max_len=8)
    assert calls == {"convert": 20, "encode": 40}
    # the same bytes under another name: records name the source as written, so they are validated again
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(data.read_bytes())
    records, _ = prepare([copy], prep, tok)
    assert calls["convert"] == 30 and {r.source for r in records} == {str(copy)}


def test_the_cache_is_in_the_datasets_cache_by_default(tmp_path, hf_cache):
    data = write_jsonl(pairs(3), tmp_path / "d.jsonl")
    records, _ = validate_rows(load_raw([str(data)], None, 0, tmp_path), to_pair)
    assert Prep().root() == hf_cache / "chatrlhf"
    assert len(list((hf_cache / "chatrlhf" / "sources").iterdir())) == 1 and len(records) == 3


# ---------------------------------------------------------------- sequences by index


def test_items_index_like_a_list(tmp_path, prep):
    data = write_jsonl(pairs(7), tmp_path / "d.jsonl")
    rows = Rows.every([read_source(str(data), prep=prep)], prep)
    records, _ = validate_rows(rows, to_pair)
    tok = byte_tokenizer()
    items = encode_all(records, encode_pair, tok, max_len=64)
    expected = [encode_pair(tok, r, 64) for r in file_records(data) for r in [to_pair(r)]]
    assert len(items) == 7 and list(items) == expected
    assert items[np.int64(2)] == expected[2] and items[-1] == expected[-1] and items[5:] == expected[5:]
    with pytest.raises(IndexError):
        items[7]
    assert [r.where for r in records.take([6, 0, 6])] == ["line 7", "line 1", "line 7"]
    assert len(records.head(3)) == 3 and len(rows + rows) == 14 and len(rows + []) == 7


# ---------------------------------------------------------------- reading files streaming


@pytest.mark.parametrize(
    "text",
    [
        '[{"a": 1} {"a": 2}]',
        '[{"a": 1},]',
        '[{"a": 1}] x',
        '[{"a": 1}, 3, {"a": }]',
        '\u00a0[{"a": 1}]',
        '[\n  {"a": 1},\n  {"a": [1, {"b": "c"}]\n]',
    ],
    ids=[
        "missing comma",
        "trailing comma",
        "extra data",
        "syntax error after a non-object",
        "non-JSON space",
        "unclosed",
    ],
)
def test_json_array_syntax_errors_are_those_of_json_loads(tmp_path, prep, text):
    path = tmp_path / "d.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    e = expected.value
    with pytest.raises(DataError) as info:
        read_source(str(path), prep=prep)
    assert str(info.value) == f"{path}:line {e.lineno}: invalid JSON: {e.msg} (column {e.colno})"


def test_json_array_items_are_those_of_json_loads(tmp_path, prep):
    text = '[\n {"a": 1} ,\n\t{"b": [1, {"c": "]"}], "d": "x,y"}\r\n,{}]  \n'
    path = tmp_path / "d.json"
    path.write_text(text, encoding="utf-8")
    records = list(read_source(str(path), format="trl", prep=prep))
    assert [r.data for r in records] == json.loads(text)
    assert [r.where for r in records] == ["item 1", "item 2", "item 3"]


def test_text_checks_see_across_chunks(tmp_path, prep, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK", 5)
    good = '{"prompt": "caf\u00e9 \u2603", "response": "r"}\n'.encode()
    ok = tmp_path / "ok.jsonl"
    ok.write_bytes(good * 3)
    assert [r.data["prompt"] for r in read_source(str(ok), prep=prep)] == ["caf\u00e9 \u2603"] * 3
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(good * 2 + b'{"prompt": "\xe9"}\n' + good + b'{"prompt": "\x00"}\n')
    with pytest.raises(DataError, match=rf"^{bad}:line 5: contains NUL bytes"):  # named before the bad UTF-8
        read_source(str(bad), prep=prep)
    bad.write_bytes(good * 2 + b'{"prompt": "\xe9"}\n' + good)
    with pytest.raises(DataError, match=rf"^{bad}:line 3: invalid UTF-8 \(byte 0xe9\)"):
        read_source(str(bad), prep=prep)
