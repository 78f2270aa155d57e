"""Damaged checkpoints (docs/reliability.md, "Damaged checkpoints"): every checkpoint carries a manifest of its
files' sizes and checksums, `--resume auto` passes over a damaged checkpoint to the newest intact one, and the run
then gives exactly what resuming from that one gives.

The reference is one uninterrupted SFT run through the CLI (in-process) that checkpoints after every step. A run
killed after step 3 is simulated by a copy of it without step 4's checkpoint, `model/` and `summary.json` — what a
kill after step 3's checkpoint leaves, which tests/train/test_resume.py shows resumes bit for bit. Damaging step 3
in the copy must make the resume fall back to step 2 (steps 1 and 2 left as they were, step 3 written again), and
the resumed run's metrics and weights must equal the uninterrupted run's: resuming from any checkpoint reproduces
the same run, so the expectation is the reference's own output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors.torch import load_file
from torch import nn

from chatrlhf.cli import main
from chatrlhf.config import OptimConfig
from chatrlhf.engine.checkpoint import MANIFEST, check_checkpoint, load_checkpoint, save_checkpoint
from chatrlhf.engine.single import SingleEngine
from chatrlhf.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
TINY = "tiny:llama:hidden=32,layers=2,heads=4"


def sft_args(out: Path, *flags: str, steps: int = STEPS, batch: int = 4) -> list[str]:
    """`steps` SFT steps of the tiny llama, a checkpoint after each, all kept."""
    return ["sft", "--model", TINY, "--output_dir", str(out), "--data.paths", "demo:pairs:64:0",
            "--train.batch_size", str(batch), "--train.max_seq_len", "128", "--train.max_steps", str(steps),
            "--run.progress", "False", "--run.log_every", "1", "--checkpoint.every", "1",
            "--checkpoint.keep", str(steps), *flags]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("integrity") / "reference"
    assert main(sft_args(out)) == 0
    return out


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def killed_after_step_3(reference: Path, where: Path) -> Path:
    """A copy of the reference as a kill after step 3's checkpoint leaves it: steps 1-3 saved, no model."""
    run = where / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "model")
    shutil.rmtree(ckpt(run, 4))
    (run / "summary.json").unlink()
    return run


def resume(run: Path, capsys) -> str:
    capsys.readouterr()
    code = main(sft_args(run, "--resume", "auto"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Traceback" not in captured.err
    return captured.out


def assert_same_results(reference: Path, run: Path) -> None:
    """Every metrics.jsonl line (wall-time values aside) and every saved weight tensor are equal."""

    def lines(path: Path) -> list[dict]:
        return [
            {k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "perf/"))}
            for line in (path / "metrics.jsonl").read_text().splitlines()
        ]

    assert lines(run) == lines(reference)
    want, got = load_file(reference / "model" / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_bit(path: Path) -> None:
    """Flip one bit in the middle of the file (in a torch file: inside a tensor's bytes)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def strip_manifests(run: Path) -> None:
    """Make every checkpoint of `run` look as chatrlhf wrote them before manifests: no manifest.json, and no
    "manifest" entry in trainer.pt."""
    for checkpoint in (run / "checkpoints").glob("step-*"):
        (checkpoint / MANIFEST).unlink()
        trainer = torch.load(checkpoint / "trainer.pt", weights_only=False)
        del trainer["manifest"]
        torch.save(trainer, checkpoint / "trainer.pt")


# ------------------------------------------------------------------------------------------------ the manifest


def test_manifest_lists_every_file_with_its_size_and_checksum(reference):
    for step in range(1, STEPS + 1):
        checkpoint = ckpt(reference, step)
        manifest = json.loads((checkpoint / MANIFEST).read_text())
        assert (manifest["step"], manifest["ranks"], manifest["hash"]) == (step, 1, "xxh3_128")
        on_disk = sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.name != MANIFEST)
        assert on_disk == ["rng-rank0.pt", "sft.pt", "trainer.pt"]
        assert [f["path"] for f in manifest["files"]] == on_disk
        for f in manifest["files"]:
            data = (checkpoint / f["path"]).read_bytes()  # whole file at once; the writer hashes in chunks
            assert f["size"] == len(data)
            assert f["xxh3_128"] == xxhash.xxh3_128(data).hexdigest()


# ------------------------------------------------------------------------------------------------ resume auto


DAMAGE = {
    "engine file truncated": (
        lambda c: truncate(c / "sft.pt"),
        lambda c, size: rf"sft\.pt is {size['sft.pt'] // 2} bytes, not the {size['sft.pt']} bytes written",
    ),
    "a bit flipped in the engine file": (
        lambda c: flip_a_bit(c / "sft.pt"),
        lambda c, size: r"sft\.pt does not match its xxh3_128 checksum: its contents changed after it was written",
    ),
    "RNG file deleted": (lambda c: (c / "rng-rank0.pt").unlink(), lambda c, size: r"rng-rank0\.pt is missing"),
    "manifest deleted": (
        lambda c: (c / MANIFEST).unlink(),
        lambda c, size: r"manifest\.json is missing \(this checkpoint was written with one\)",
    ),
    "manifest not JSON": (
        lambda c: (c / MANIFEST).write_text('{"format": 1, "fi'),
        lambda c, size: r"manifest\.json is unreadable \(JSONDecodeError: [^;]*\)",
    ),
    "manifest of another checkpoint": (
        lambda c: shutil.copy(c.with_name("step-00000002") / MANIFEST, c / MANIFEST),
        lambda c, size: r"manifest\.json is of step 2, not of step 3",
    ),
    "trainer state truncated": (
        lambda c: truncate(c / "trainer.pt"),
        lambda c, size: rf"trainer\.pt is {size['trainer.pt'] // 2} bytes, not the {size['trainer.pt']} bytes written",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_auto_falls_back_past_a_damaged_checkpoint(damage, reference, tmp_path, capsys):
    run = killed_after_step_3(reference, tmp_path)
    damaged, older = ckpt(run, 3), ckpt(run, 2)
    size = {p.name: p.stat().st_size for p in damaged.iterdir()}
    untouched = {p: p.stat().st_ino for p in [*ckpt(run, 1).iterdir(), *older.iterdir()]}
    apply, problem = DAMAGE[damage]
    apply(damaged)

    out = resume(run, capsys)
    warning = rf"warning: checkpoint {re.escape(str(damaged))} is damaged: {problem(damaged, size)}; resuming from "
    assert re.search(rf"^{warning}{re.escape(str(older))} instead$", out, re.M), out
    assert f"resuming from {older} (step 2)\n" in out
    assert_same_results(reference, run)
    assert {p: p.stat().st_ino for p in untouched} == untouched, "steps 1 and 2 are left as they were"
    assert [check_checkpoint(ckpt(run, s)).problem for s in range(1, STEPS + 1)] == [None] * STEPS, "3 written again"


def test_bit_flip_in_a_tensor_loads_without_error(reference, tmp_path):
    """Why checksums: torch.load reads a torch file with a flipped bit in a tensor without complaint."""
    flipped = tmp_path / "sft.pt"
    shutil.copy(ckpt(reference, 3) / "sft.pt", flipped)
    flip_a_bit(flipped)

    def tensors(state) -> list[torch.Tensor]:  # weights and optimizer moments, in a fixed order
        if isinstance(state, torch.Tensor):
            return [state]
        if isinstance(state, dict):
            return [t for key in sorted(state, key=str) for t in tensors(state[key])]
        return [t for item in state for t in tensors(item)] if isinstance(state, (list, tuple)) else []

    want = tensors(torch.load(ckpt(reference, 3) / "sft.pt", weights_only=True))
    got = tensors(torch.load(flipped, weights_only=True))
    assert len(want) == len(got)
    assert sum(not torch.equal(a, b) for a, b in zip(want, got)) == 1


def test_damaged_checkpoints_are_skipped_newest_first(reference, tmp_path, capsys):
    """Steps 3 and 2 damaged: one warning for each, both naming step 1, which is used."""
    run = killed_after_step_3(reference, tmp_path)
    (ckpt(run, 3) / "rng-rank0.pt").unlink()
    (ckpt(run, 2) / MANIFEST).unlink()
    out = resume(run, capsys)
    first = f"warning: checkpoint {ckpt(run, 3)} is damaged: rng-rank0.pt is missing; resuming from {ckpt(run, 1)}"
    second = f"warning: checkpoint {ckpt(run, 2)} is damaged: {MANIFEST} is missing (this checkpoint was written with "
    second += f"one); resuming from {ckpt(run, 1)} instead\n"
    assert f"{first} instead\n{second}" in out
    assert f"resuming from {ckpt(run, 1)} (step 1)\n" in out
    assert_same_results(reference, run)


def test_checkpoint_written_before_manifests_is_used_with_a_note(reference, tmp_path, capsys):
    """No manifest and no "manifest" entry in trainer.pt: an older chatrlhf's checkpoint. Its .pt files pass the
    CRC-32s stored in them, so the newest is used, with a note."""
    run = killed_after_step_3(reference, tmp_path)
    strip_manifests(run)
    out = resume(run, capsys)
    assert f"note: checkpoint {ckpt(run, 3)} has no {MANIFEST} (written before chatrlhf recorded checksums)" in out
    assert f"resuming from {ckpt(run, 3)} (step 3)\n" in out
    assert "warning" not in out
    assert_same_results(reference, run)


def test_checkpoint_written_before_manifests_failing_its_crc_is_skipped(reference, tmp_path, capsys):
    run = killed_after_step_3(reference, tmp_path)
    strip_manifests(run)
    flip_a_bit(ckpt(run, 3) / "sft.pt")
    out = resume(run, capsys)
    pattern = rf"^warning: checkpoint {re.escape(str(ckpt(run, 3)))} is damaged: sft\.pt fails the CRC-32 check of its "
    assert re.search(pattern + rf"part sft/data/\d+; resuming from {re.escape(str(ckpt(run, 2)))} instead$", out, re.M)
    assert f"resuming from {ckpt(run, 2)} (step 2)\n" in out
    assert_same_results(reference, run)


# ------------------------------------------------------------------------------------------------ save and load


def toy_engine() -> SingleEngine:
    torch.manual_seed(0)
    return SingleEngine(nn.Linear(4, 2), OptimConfig(lr=1e-3), 10, "toy")


def test_pruning_keeps_the_new_checkpoint_while_a_later_damaged_one_waits(tmp_path):
    """Resumed from step 2 past damaged steps 3 and 4, with keep 1: saving step 3 prunes among steps up to 3 only
    (the new step 3 stays, damaged step 4 waits), and saving step 4 replaces the damaged one."""
    engine = toy_engine()
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, [engine], {"tag": "first attempt"}, keep=4)
    for step in (3, 4):
        truncate(ckpt(tmp_path, step) / "toy.pt")

    save_checkpoint(tmp_path, 3, [engine], {"tag": "resumed"}, keep=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000003", "step-00000004"]
    assert check_checkpoint(ckpt(tmp_path, 3)).problem is None
    assert check_checkpoint(ckpt(tmp_path, 4)).problem.startswith("toy.pt is ")
    save_checkpoint(tmp_path, 4, [engine], {"tag": "resumed"}, keep=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000004"]
    assert check_checkpoint(ckpt(tmp_path, 4)).problem is None
    assert torch.load(ckpt(tmp_path, 4) / "trainer.pt", weights_only=False)["tag"] == "resumed"


@pytest.mark.parametrize("name", ["toy.pt", "trainer.pt", "rng-rank0.pt"])
def test_a_file_that_does_not_load_is_a_user_error_naming_it(name, tmp_path):
    """load_checkpoint itself (no manifest check in front of it): a damaged file is a UserError naming it."""
    save_checkpoint(tmp_path, 1, [toy_engine()], {}, keep=1)
    (ckpt(tmp_path, 1) / name).write_bytes(b"PK\x03\x04 not a torch file")
    with pytest.raises(UserError, match=rf"^checkpoint {re.escape(str(ckpt(tmp_path, 1)))}: {re.escape(name)} does "
                                        r"not load \(RuntimeError: PytorchStreamReader failed"):  # fmt: skip
        load_checkpoint(ckpt(tmp_path, 1), [toy_engine()])


# ------------------------------------------------------------------------------------------------ DeepSpeed


def test_two_ranks_fall_back_past_one_damaged_rank_shard(tmp_path):
    """ZeRO-2 on 2 gloo ranks: each rank writes its own optimizer shard. One bit flipped in rank 1's shard of step 2
    (of 3; the run copied and cut back to step 2 as above): both ranks find it, fall back to step 1 together, and
    the resumed run's metrics equal the uninterrupted 2-rank run's exactly."""
    pytest.importorskip("deepspeed")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")

    def torchrun(out: Path, *flags: str) -> str:
        args = sft_args(out, "--engine.kind", "deepspeed", "--engine.zero_stage", "2", *flags, steps=3, batch=2)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "chatrlhf", *args]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env,
                                start_new_session=True)  # fmt: skip
        try:
            text, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no exit after 300 s (hung):\n{proc.communicate()[0][-8000:]}")
        assert proc.returncode == 0, text[-8000:]
        return text

    reference = tmp_path / "reference"
    torchrun(reference)
    shard = Path("sft") / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert str(shard) in {f["path"] for f in json.loads((ckpt(reference, 3) / MANIFEST).read_text())["files"]}
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "model")
    shutil.rmtree(ckpt(run, 3))
    (run / "summary.json").unlink()
    flip_a_bit(ckpt(run, 2) / shard)

    out = torchrun(run, "--resume", "auto")
    assert (
        f"warning: checkpoint {ckpt(run, 2)} is damaged: {shard} does not match its xxh3_128 checksum: its contents "
        f"changed after it was written; resuming from {ckpt(run, 1)} instead\n"
    ) in out
    assert f"resuming from {ckpt(run, 1)} (step 1)\n" in out
    assert_same_results(reference, run)
