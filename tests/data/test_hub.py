"""Datasets by name (`hf:` sources): the spec syntax, real `datasets.load_dataset` calls on local dataset
repositories laid out as on the Hub, and the Hugging Face cache in offline mode. Nothing is downloaded: every test
runs with offline mode on and a cache of its own."""

from __future__ import annotations

import datasets
import pytest
from public_sets import download_into_cache, hh_repo, hh_rlhf, ultrafeedback_h4, write_jsonl, write_parquet

from chatrlhf.data import load_source, to_pair
from chatrlhf.data.hub import HubSpec, parse_hub_spec
from chatrlhf.errors import DataError

pytestmark = pytest.mark.usefixtures("hf_cache")


# ---------------------------------------------------------------- the spec


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("hf:Anthropic/hh-rlhf", HubSpec("Anthropic/hh-rlhf", "train")),
        (
            "hf:Anthropic/hh-rlhf:test?data_dir=harmless-base",
            HubSpec("Anthropic/hh-rlhf", "test", data_dir="harmless-base"),
        ),
        (
            "hf:stanfordnlp/SHP:validation[:10%]?data_dir=askculinary&revision=main",
            HubSpec("stanfordnlp/SHP", "validation[:10%]", data_dir="askculinary", revision="main"),
        ),
        ("hf:org/set?data_files=a.jsonl,b/c.jsonl", HubSpec("org/set", "train", data_files=("a.jsonl", "b/c.jsonl"))),
        ("hf:org/set:train_prefs?config=en", HubSpec("org/set", "train_prefs", config="en")),
        ("hf:./clones/hh-rlhf:test", HubSpec("./clones/hh-rlhf", "test")),
    ],
)
def test_hub_spec(spec, expected):
    assert parse_hub_spec(spec) == expected


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("hf:", "no dataset id after 'hf:'"),
        ("hf:org/set:", "empty split after ':'"),
        ("hf:org/set?split=test", "unknown option 'split' (known: config, data_dir, data_files, revision)"),
        ("hf:org/set?data_dir=", "option 'data_dir' has no value"),
        ("hf:org/set?data_dir=a&data_dir=b", "option 'data_dir' is given twice"),
        ("hf:org/set?data_files=,", "option 'data_files' names no file"),
    ],
)
def test_bad_hub_spec(spec, problem):
    with pytest.raises(DataError) as info:
        parse_hub_spec(spec)
    syntax = "hf:DATASET_ID[:SPLIT][?config=NAME&data_dir=DIR&data_files=FILE,...&revision=REV]"
    assert str(info.value) == f"{spec}: {problem}; expected {syntax}"


def test_hub_prefix_is_never_a_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl([{"prompt": "p", "response": "r"}], tmp_path / "hf:data.jsonl")
    assert load_source("./hf:data.jsonl")[0].data == {"prompt": "p", "response": "r"}
    with pytest.raises(DataError, match="^hf:data.jsonl: dataset 'data.jsonl' is not in the Hugging Face datasets"):
        load_source("hf:data.jsonl")


# ---------------------------------------------------------------- load_dataset on local repositories


def test_local_repository_with_data_dir_and_split(tmp_path, hf_cache):
    repo = hh_repo(tmp_path / "hh-rlhf")
    spec = f"hf:{repo}:test?data_dir=harmless-base"
    recs = load_source(spec)
    assert [(r.source, r.where, r.format) for r in recs] == [(spec, "row 1", "hh-rlhf"), (spec, "row 2", "hh-rlhf")]
    assert [r.data for r in recs] == hh_rlhf(2)
    assert len(load_source(f"hf:{repo}:train[:3]?data_dir=harmless-base")) == 3
    assert len(load_source(f"hf:{repo}?data_dir=helpful-base")) == 3


def test_local_repository_with_named_splits(tmp_path, hf_cache):
    repo = tmp_path / "ultrafeedback_binarized"
    for split, n in (("train_prefs", 3), ("test_prefs", 2)):
        write_parquet(ultrafeedback_h4(n), repo / "data" / f"{split}-00000-of-00001.parquet")
    recs = load_source(f"hf:{repo}:test_prefs")
    assert len(recs) == 2 and recs[0].format == "ultrafeedback"
    assert to_pair(recs[1]).chosen == "red and blue"
    with pytest.raises(DataError) as info:
        load_source(f"hf:{repo}")
    assert str(info.value) == (
        f"hf:{repo}: dataset '{repo}' has no split 'train': Unknown split \"train\". Should be one of "
        "['test_prefs', 'train_prefs']. (choose one with hf:ID:SPLIT)"
    )


def test_local_repository_data_files(tmp_path, hf_cache):
    repo = hh_repo(tmp_path / "hh-rlhf")
    recs = load_source(f"hf:{repo}?data_files=harmless-base/test.jsonl,helpful-base/train.jsonl")
    assert len(recs) == 5


def test_unknown_config(tmp_path, hf_cache):
    repo = hh_repo(tmp_path / "hh-rlhf")
    with pytest.raises(DataError) as info:
        load_source(f"hf:{repo}?config=nope")
    assert str(info.value) == (
        f"hf:{repo}?config=nope: cannot load dataset '{repo}' (config=nope) with datasets.load_dataset: "
        "ValueError: BuilderConfig 'nope' not found. Available: ['default']"
    )


# ---------------------------------------------------------------- the cache, offline


def test_offline_dataset_in_the_cache(tmp_path, hf_cache):
    download_into_cache(hh_repo(tmp_path / "hh-rlhf"), "Anthropic/hh-rlhf", hf_cache)
    recs = load_source("hf:Anthropic/hh-rlhf:train")
    assert len(recs) == 7 and {r.format for r in recs} == {"hh-rlhf"}
    assert recs[0].source == "hf:Anthropic/hh-rlhf:train"


def test_offline_dataset_not_in_the_cache(hf_cache):
    with pytest.raises(DataError) as info:
        load_source("hf:Anthropic/hh-rlhf:test")
    assert str(info.value) == (
        f"hf:Anthropic/hh-rlhf:test: dataset 'Anthropic/hh-rlhf' is not in the Hugging Face datasets cache "
        f"({hf_cache}) and offline mode is on (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE): run once with network "
        "access to download it, or turn offline mode off"
    )


def test_offline_other_data_dir_not_in_the_cache(tmp_path, hf_cache):
    download_into_cache(hh_repo(tmp_path / "hh-rlhf"), "Anthropic/hh-rlhf", hf_cache)
    with pytest.raises(DataError) as info:
        load_source("hf:Anthropic/hh-rlhf?data_dir=harmless-base")
    message = str(info.value)
    assert message.startswith(
        "hf:Anthropic/hh-rlhf?data_dir=harmless-base: dataset 'Anthropic/hh-rlhf' (data_dir=harmless-base) is not "
        "in the Hugging Face datasets cache"
    )
    assert message.endswith("; the cache holds its configurations ['default']")


def test_arguments_passed_to_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.Dataset.from_list([{"prompt": "p", "response": "r"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    load_source("hf:org/set:test[:5]?config=en&data_dir=d&data_files=x.json,y.json&revision=v1")
    assert calls == [
        ("org/set", "en", {"split": "test[:5]", "data_dir": "d", "data_files": ["x.json", "y.json"], "revision": "v1"})
    ]


def test_hub_unreachable_online(monkeypatch):
    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/set' on the Hub (ConnectError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    with pytest.raises(DataError) as info:
        load_source("hf:org/set")
    assert str(info.value) == (
        "hf:org/set: cannot reach the Hugging Face Hub to download dataset 'org/set' (Couldn't reach 'org/set' on "
        "the Hub (ConnectError)); with HF_HUB_OFFLINE=1 a copy in the cache is used"
    )
