"""Shared fixtures: tiny random models of real architectures saved as HF directories, and demo data files; and
`load_bench`, which imports a benchmark script of bench/ as a module."""

from __future__ import annotations

import importlib.util
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"

# Tests run on small CPUs; one thread per process keeps parallel subprocesses from oversubscribing cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TESTS = Path(__file__).resolve().parent
LONGEST_FIRST = [
    "engine/test_deepspeed.py",
    "train/test_rl_episodes.py",
    "train/test_resume.py",
    "engine/test_vllm.py",
    "test_cli.py",
    "serve/test_vllm_serving.py",
    "engine/test_checkpoint.py",
    "test_trackers.py",
    "engine/test_multinode.py",
]
"""The test files that take minutes (`--durations`), longest first. They run first, so that the two workers of the
README's test command (`-n 2 --dist loadfile`: a file per worker at a time) finish together on the short files,
instead of one finishing a long file alone at the end."""


def pytest_collection_modifyitems(config, items):
    rank = {TESTS / name: i for i, name in enumerate(LONGEST_FIRST)}
    missing = [str(path) for path in rank if not path.is_file()]
    assert not missing, f"tests/conftest.py LONGEST_FIRST names files that are gone: {missing}"
    items.sort(key=lambda item: rank.get(item.path, len(rank)))  # stable: each file's own order is kept


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


@pytest.fixture(scope="session")
def sft_llama(tmp_path_factory):
    """A tiny llama (hidden 64, 2 layers, 2 heads of 32: vLLM's CPU attention needs head size >= 32; a context of
    2048 positions, for episodes longer than 512 tokens) after a 300-step SFT on the demo task (seconds), through the
    CLI: its greedy answers vary from prompt to prompt and end with EOS, which a random model's do not. Returns the
    model directory."""
    from chatrlhf.cli import main
    from chatrlhf.demo.task import make_pairs, write_jsonl

    root = tmp_path_factory.mktemp("sft-llama")
    pairs = write_jsonl(make_pairs(512, seed=5), root / "pairs.jsonl")
    args = ["sft", "--model", "tiny:llama:hidden=64,layers=2,heads=2,positions=2048", "--output_dir", str(root / "sft"),
            "--data.paths", str(pairs), "--train.max_steps", "300", "--train.epochs", "100",
            "--train.batch_size", "16", "--train.optim.lr", "3e-3", "--train.max_seq_len", "96",
            "--run.progress", "False"]  # fmt: skip
    assert main(args) == 0
    return root / "sft" / "model"


@contextmanager
def load_bench(name: str):
    """bench/`name`.py as a module, with bench/ on sys.path meanwhile (the scripts import their sibling `_runner`)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))
