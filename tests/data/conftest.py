"""Fixtures of the data tests: a Hugging Face cache of the test's own, in offline mode."""

from __future__ import annotations

import datasets
import huggingface_hub.constants
import pytest


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face datasets cache, with offline mode on (as HF_HUB_OFFLINE=1 sets it): nothing is
    downloaded, and `load_dataset` of a Hub id finds only what the test put in the cache."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache
