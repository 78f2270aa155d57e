"""Damaged checkpoints that cannot be resumed: every checkpoint damaged under `--resume auto`, or a damaged one
named with `--resume PATH` (no fallback: the user asked for that one). Each stops with exit 2, one message naming
the checkpoint and the file, and leaves the checkpoints as they were. Falling back past a damaged checkpoint is
tested in tests/engine/test_checkpoint.py."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from chatrlhf.cli import main

from .conftest import QUIET


@pytest.fixture()
def unfinished(tiny_dirs, out):
    """`unfinished(*flags)`: the arguments of a 2-step SFT run that checkpoints after each step, after running it
    once and deleting its model and summary, as a kill after its last checkpoint leaves it."""

    def args(*flags: str) -> list[str]:
        return ["sft", "--model", str(tiny_dirs["llama"]), "--output_dir", str(out), "--data.paths", "demo:pairs:64:0",
                "--train.max_steps", "2", "--checkpoint.every", "1", *QUIET, *flags]  # fmt: skip

    assert main(args()) == 0
    shutil.rmtree(out / "model")
    (out / "summary.json").unlink()
    return args


def step(out: Path, n: int) -> Path:
    return out / "checkpoints" / f"step-{n:08d}"


def truncate(path: Path) -> int:
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:100])
    return size


def test_every_checkpoint_damaged(unfinished, out, fail):
    size = truncate(step(out, 2) / "sft.pt")
    (step(out, 1) / "rng-rank0.pt").unlink()
    err = fail(unfinished("--resume", "auto"))
    assert err == (
        f"chatrlhf sft: error: no intact checkpoint in {out / 'checkpoints'}; the damaged ones are: step-00000002 "
        f"(sft.pt is 100 bytes, not the {size} bytes written), step-00000001 (rng-rank0.pt is missing); pass "
        "--run.overwrite to start over\n"
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]


def test_explicit_damaged_checkpoint(unfinished, out, fail):
    """An older checkpoint is intact, but the one asked for is not: no fallback."""
    size = truncate(step(out, 2) / "sft.pt")
    err = fail(unfinished("--resume", str(step(out, 2))))
    assert err == (
        f"chatrlhf sft: error: resume: checkpoint {step(out, 2)} is damaged: sft.pt is 100 bytes, not the {size} "
        "bytes written; pass another checkpoint, or --resume auto to continue from the newest intact one\n"
    )
    assert (step(out, 2) / "sft.pt").stat().st_size == 100


def test_explicit_directory_that_is_not_a_checkpoint(unfinished, out, tmp_path, fail):
    (tmp_path / "elsewhere").mkdir()
    err = fail(unfinished("--resume", str(tmp_path / "elsewhere")))
    assert err == (
        f"chatrlhf sft: error: resume: '{tmp_path / 'elsewhere'}' is not a complete checkpoint directory (no "
        "manifest.json, no trainer.pt)\n"
    )


def test_checkpoint_without_manifest_that_does_not_load(unfinished, out, fail):
    """A checkpoint from before manifests (no manifest.json, no "manifest" entry in trainer.pt) lacking its engine
    file: nothing lists the file, so the check passes, and the load fails with a message naming it."""
    trainer = torch.load(step(out, 2) / "trainer.pt", weights_only=False)
    del trainer["manifest"]
    torch.save(trainer, step(out, 2) / "trainer.pt")
    (step(out, 2) / "manifest.json").unlink()
    (step(out, 2) / "sft.pt").unlink()
    err = fail(unfinished("--resume", str(step(out, 2))))
    assert re.fullmatch(
        rf"chatrlhf sft: error: checkpoint {re.escape(str(step(out, 2)))}: sft\.pt does not load \(FileNotFoundError: "
        r".*No such file or directory.*sft\.pt'\)\n",
        err,
    ), err
