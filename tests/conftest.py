"""Shared fixtures: tiny random models of real architectures saved as HF directories, and demo data files."""

from __future__ import annotations

import os

import pytest

# Tests run on small CPUs; one thread per process keeps parallel subprocesses from oversubscribing cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """arch → directory of a tiny random model (hidden 32, 2 layers), loadable with `from_pretrained`."""
    from chatrlhf.models.tiny import TINY_ARCHS, build_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny_model(root / arch, arch=arch, hidden=32, layers=2, heads=4) for arch in TINY_ARCHS}


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory):
    """A JSONL file of 96 demo preference pairs."""
    from chatrlhf.demo.task import make_pairs, write_jsonl

    return write_jsonl(make_pairs(96, seed=5), tmp_path_factory.mktemp("data") / "pairs.jsonl")
