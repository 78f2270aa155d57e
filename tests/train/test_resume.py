"""Resume equivalence through the real CLI: a run killed with SIGKILL at a random moment and continued with
`--resume auto` writes the same metrics, bit for bit, and the same weights as a run that was never interrupted
(docs/reliability.md, "Resume").

Each case starts the uninterrupted reference run and the run to be killed side by side (one thread each), kills
the second once it has logged a seeded random number of steps and holds a checkpoint, after a seeded random delay,
then resumes it. The kill is tied to the run's progress, not to wall time, so a slow or busy machine changes when
it lands, never whether it does.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

EVERY, KEEP = 2, 2
TINY = "tiny:llama:hidden=32,layers=2,heads=4"
COMMON = ["--run.progress", "False", "--run.log_every", "1", "--checkpoint.every", str(EVERY)]
COMMON += ["--checkpoint.keep", str(KEEP)]
NOISE = {"time", "perf", "time_s"}
"""Key parts (`time/elapsed_s`, `final/perf/tokens_per_s`, the pipeline's `time_s`) of values that measure wall
time: the only values a resumed run may change."""
ENGINES = {"sft": {"sft.pt"}, "reward": {"reward.pt"}, "dpo": {"dpo.pt"}, "rl": {"actor.pt", "critic.pt"}}
"""Engine state files in a checkpoint of each stage (PPO trains the actor and the critic)."""
DEADLINE_S = 240
"""A run that takes longer than this is hung: it is killed and the test fails."""

SUPERVISED = ["--data.paths", "demo:pairs:64:0", "--train.batch_size", "4", "--train.max_seq_len", "128"]
SUPERVISED += ["--train.eval_every", "4", "--train.optim.lr", "1e-3"]
STEPS = {"sft": 16, "reward": 12, "dpo": 12, "rl": 12}
"""Optimizer steps (RL: iterations) of each stage as configured below."""


def stage_args(stage: str, out: Path, base: Path) -> list[str]:
    """A small run of `stage` in `out`: SFT crosses an epoch boundary with gradient accumulation; RL is PPO with
    a critic, sampling, mini-batches, an adaptive KL coefficient, an EMA actor, a held-out evaluation with a judge
    every 3 iterations and the doctor, so every piece of driver state that a checkpoint carries is exercised."""
    if stage == "sft":
        return ["sft", "--model", TINY, "--output_dir", str(out), *SUPERVISED, "--train.grad_accum", "2",
                "--train.epochs", "2"]  # fmt: skip  # 61 train records / 4 per micro-batch / 2 → 8 steps per epoch
    if stage in ("reward", "dpo"):
        return [stage, "--model", TINY, "--output_dir", str(out), *SUPERVISED, "--train.max_steps", str(STEPS[stage])]
    if stage == "rl":
        return ["rl", "--actor", str(base), "--reward_model", str(base.parent / "rm"), "--output_dir", str(out),
                "--data.paths", "demo:prompts:64:0", "--train.iterations", str(STEPS["rl"]),
                "--train.rollout_batch_size", "4", "--train.update.mini_batch_size", "2",
                "--train.max_prompt_len", "64", "--train.generation.max_new_tokens", "8",
                "--train.actor_optim.lr", "1e-3",
                "--train.critic_optim.lr", "1e-3", "--train.kl.target", "0.5", "--train.ema", "True",
                "--train.ema_decay", "0.9", "--train.eval_every", "3", "--train.eval_prompts", "4",
                "--judge", "chatrlhf.demo.task:judge"]  # fmt: skip
    assert stage == "pipeline"
    return ["pipeline", "--model", TINY, "--run_dir", str(out), "--data.paths", "demo:pairs:200:0",
            "--sft.max_steps", "8", "--sft.batch_size", "4", "--sft.max_seq_len", "128",
            "--reward.max_steps", "8", "--reward.batch_size", "4", "--reward.max_seq_len", "128",
            "--rl.iterations", "8", "--rl.rollout_batch_size", "4", "--rl.max_prompt_len", "64",
            "--rl.generation.max_new_tokens", "8", "--rl.actor_optim.lr", "1e-3", "--rl.critic_optim.lr", "1e-3",
            "--eval.num_prompts", "4", "--eval.samples_per_prompt", "2", "--reward_gate.action", "warn"]  # fmt: skip


PIPELINE_STEPS = {"sft": 8, "reward": 8, "rl": 8}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The tiny llama RL starts from; it is also the reward model (random score head, seeded) and the critic."""
    from chatrlhf.models.load import add_value_head
    from chatrlhf.models.tiny import build_tiny_model

    base = build_tiny_model(tmp_path_factory.mktemp("resume") / "llama", arch="llama", hidden=32, layers=2, heads=4)
    add_value_head(base, base.parent / "rm")  # its reward model and critic: its weights and a seeded random head
    return base


# ------------------------------------------------------------------------------------------------ helpers


def start(args: list[str], log: Path, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "chatrlhf", *args, *COMMON, *extra],
            stdout=fh, stderr=subprocess.STDOUT, cwd=log.parent, env=env,
        )  # fmt: skip


def finish(proc: subprocess.Popen, log: Path) -> str:
    """Wait for a run; it must succeed. Returns its output."""
    try:
        code = proc.wait(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"run hung for {DEADLINE_S}s:\n{log.read_text()}")
    text = log.read_text()
    assert code == 0, f"exit {code}\n{text}"
    return text


def logged_steps(run: Path) -> list[int]:
    """Steps of the complete lines of metrics.jsonl (a kill may cut the last one short)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    text = path.read_text()
    return [json.loads(line)["step"] for line in text[: text.rfind("\n") + 1].splitlines()]


def checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step-")) for p in (run / "checkpoints").glob("step-*"))


def tmp_dirs(run: Path) -> list[str]:
    """Hidden temp directories in checkpoints/: a save in progress or interrupted, or a deletion."""
    return sorted(p.name for p in (run / "checkpoints").glob(".*"))


def kill_when(args: list[str], extra: tuple[str, ...], log: Path, ready: Callable[[], bool], delay: float) -> bool:
    """Start a run; `delay` seconds after `ready()` first holds, SIGKILL it. False if it finished first."""
    proc = start(args, log, extra)
    deadline = time.time() + DEADLINE_S
    while proc.poll() is None and time.time() < deadline:
        if ready():
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.0005)
    else:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            pytest.fail(f"run hung for {DEADLINE_S}s:\n{log.read_text()}")
    code = proc.wait()
    assert code in (0, -signal.SIGKILL), f"exit {code} before the kill\n{log.read_text()}"
    return code != 0


def kill_at_random(args: list[str], extra: tuple[str, ...], watch: Path, total: int, rng: random.Random) -> None:
    """Run and SIGKILL at a random moment after `watch` (the run directory of the stage the kill is timed by) holds
    a checkpoint: once it has logged a random number of steps in [EVERY, total), after a random delay of up to 50
    ms. A run that finishes first is started again in a fresh directory and killed at its first checkpoint."""
    run = Path(args[args.index("--run_dir" if "--run_dir" in args else "--output_dir") + 1])
    target, delay = rng.randint(EVERY, total - 1), rng.uniform(0.0, 0.05)

    def ready() -> bool:
        return len(logged_steps(watch)) >= target and bool(checkpoint_steps(watch))

    for attempt in range(3):
        if kill_when(args, extra, run.parent / f"killed-{attempt}.log", ready, delay):
            return
        shutil.rmtree(run)
        target, delay = EVERY, 0.0
    pytest.fail("the run finished before every kill")


def assert_checkpoints_load(run: Path, stage: str) -> None:
    """Every visible `step-N` of the run is complete: it holds each engine's state, the RNGs and the driver state
    for step N, and every file in it loads."""
    for ckpt in (run / "checkpoints").glob("step-*"):
        names = {p.name for p in ckpt.iterdir()}
        assert names >= ENGINES[stage] | {"trainer.pt", "rng-rank0.pt"}, f"{ckpt}: incomplete: {sorted(names)}"
        for f in ckpt.glob("*.pt"):
            state = torch.load(f, map_location="cpu", weights_only=False)
            if f.name == "trainer.pt":
                assert state["step"] == int(ckpt.name.removeprefix("step-"))


def without_noise(value):
    """`value` with the wall-time keys removed, recursively."""
    if isinstance(value, dict):
        return {k: without_noise(v) for k, v in value.items() if not NOISE & set(k.split("/"))}
    return value


def assert_same_results(reference: Path, resumed: Path) -> None:
    """Metrics (every line, every value: floats compare exactly), summaries and every saved weight tensor match."""
    metrics = sorted(p.relative_to(reference) for p in reference.rglob("metrics.jsonl"))
    assert metrics and metrics == sorted(p.relative_to(resumed) for p in resumed.rglob("metrics.jsonl"))
    for rel in metrics:
        ref_lines = [without_noise(json.loads(x)) for x in (reference / rel).read_text().splitlines()]
        got_lines = [without_noise(json.loads(x)) for x in (resumed / rel).read_text().splitlines()]
        assert len(got_lines) == len(ref_lines), rel
        for i, (want, got) in enumerate(zip(ref_lines, got_lines)):
            assert got == want, f"{rel} line {i + 1} differs"
    for rel in sorted(p.relative_to(reference) for p in reference.rglob("summary.json")):
        want = without_noise(json.loads((reference / rel).read_text()))
        assert without_noise(json.loads((resumed / rel).read_text())) == want, rel
    # the RL held-out samples and the doctor's findings, and the reward model's held-out scores
    for name in ("samples.jsonl", "doctor.json", "eval_scores.jsonl"):
        for rel in sorted(p.relative_to(reference) for p in reference.rglob(name)):
            assert (resumed / rel).read_text() == (reference / rel).read_text(), rel
    weights = sorted(p.relative_to(reference) for p in reference.rglob("*.safetensors"))
    assert weights == sorted(p.relative_to(resumed) for p in resumed.rglob("*.safetensors"))
    for rel in weights:
        want, got = load_file(reference / rel), load_file(resumed / rel)
        assert want.keys() == got.keys(), rel
        for name in want:
            assert torch.equal(want[name], got[name]), f"{rel}: {name} differs"


RESUMING = re.compile(r"^resuming from (\S+) \(step (\d+)\)$", re.M)


# ------------------------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "rl", "pipeline"])
def test_killed_run_resumes_to_the_uninterrupted_result(stage, tmp_path, base):
    rng = random.Random(f"resume-{stage}")
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    ref_proc = start(stage_args(stage, reference, base), tmp_path / "reference.log")

    # the stage whose steps the kill is timed by: in the pipeline, the reward model or RL, after SFT has finished
    watched_stage = rng.choice(["reward", "rl"]) if stage == "pipeline" else stage
    watch = killed / watched_stage if stage == "pipeline" else killed
    total = PIPELINE_STEPS[watched_stage] if stage == "pipeline" else STEPS[stage]
    kill_at_random(stage_args(stage, killed, base), (), watch, total, rng)

    # after the kill: no half-written checkpoint is visible, and the newest is at most EVERY steps behind
    assert not (watch / "model").exists()
    assert_checkpoints_load(watch, watched_stage)
    killed_at = logged_steps(watch)[-1]
    newest = checkpoint_steps(watch)[-1]
    assert killed_at - EVERY <= newest <= killed_at
    in_progress = tmp_dirs(watch)  # a save (or the deletion of an old checkpoint) the kill interrupted

    out = finish(start(stage_args(stage, killed, base), tmp_path / "resumed.log", ("--resume", "auto")),
                 tmp_path / "resumed.log")  # fmt: skip
    assert RESUMING.findall(out) == [(str(watch / "checkpoints" / f"step-{newest:08d}"), str(newest))], out
    if stage == "pipeline":
        finished = ["sft"] if watched_stage == "reward" else ["sft", "reward"]
        for name in finished:
            assert f"{killed / name}: finished earlier; nothing to resume" in out
    finish(ref_proc, tmp_path / "reference.log")

    assert_same_results(reference, killed)
    stage_dirs = [reference / s for s in PIPELINE_STEPS] if stage == "pipeline" else [reference]
    for d in stage_dirs:
        steps = PIPELINE_STEPS[d.name] if stage == "pipeline" else STEPS[stage]
        assert checkpoint_steps(d) == [steps - EVERY, steps]  # --checkpoint.keep 2
        assert checkpoint_steps(killed / d.relative_to(reference)) == [steps - EVERY, steps]
    where = f"{watched_stage} step {killed_at}" if stage == "pipeline" else f"step {killed_at}"
    print(f"{stage}: killed after {where}, interrupting {in_progress or 'no save'}; resumed from {newest}: identical")


def test_kill_during_a_checkpoint_write_never_exposes_a_partial_checkpoint(tmp_path):
    """Checkpoint after every step and SIGKILL the moment a checkpoint's temp directory appears (mid-write; if no
    write is caught in progress, at a random moment). Before resuming, also plant the leftovers of an interrupted
    save: a temp directory with a truncated file, newer than any checkpoint. Every visible checkpoint loads, at most
    keep + 1 are ever visible, the leftovers are removed and never read, and the result equals an uninterrupted
    run's (which checkpoints after every step too)."""
    every_step = ("--checkpoint.every", "1")
    ref_proc = start(stage_args("sft", tmp_path / "reference", Path()), tmp_path / "reference.log", every_step)
    run = tmp_path / "killed"
    args = stage_args("sft", run, Path())

    saving = lambda: bool(checkpoint_steps(run)) and bool(tmp_dirs(run))  # noqa: E731
    if not kill_when(args, every_step, tmp_path / "killed.log", saving, 0.0):
        shutil.rmtree(run)
        kill_at_random(args, every_step, run, STEPS["sft"], random.Random("mid-write"))
    in_progress = tmp_dirs(run)
    assert_checkpoints_load(run, "sft")
    assert 1 <= len(checkpoint_steps(run)) <= KEEP + 1
    newest = checkpoint_steps(run)[-1]

    partial = run / "checkpoints" / ".step-99999999.tmp"
    partial.mkdir(exist_ok=True)
    (partial / "trainer.pt").write_bytes(b"PK\x03\x04 truncated")
    out = finish(start(args, tmp_path / "resumed.log", every_step + ("--resume", "auto")), tmp_path / "resumed.log")
    assert RESUMING.findall(out) == [(str(run / "checkpoints" / f"step-{newest:08d}"), str(newest))], out
    assert tmp_dirs(run) == []
    finish(ref_proc, tmp_path / "reference.log")
    assert_same_results(tmp_path / "reference", run)
    assert checkpoint_steps(run) == [STEPS["sft"] - 1, STEPS["sft"]]
    print(f"sft, checkpoint every step: the kill interrupted {in_progress or 'no save'}; resumed from {newest}")


def test_run_killed_between_its_model_and_its_summary_resumes(tmp_path, capsys):
    """The last window of a run: model/ is written, summary.json is not yet (simulated by deleting it). Resuming
    continues from the final checkpoint and rewrites model/ and summary.json as the uninterrupted run did."""
    from chatrlhf.cli import main

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert main(stage_args("sft", reference, Path()) + COMMON) == 0
    shutil.copytree(reference, killed)
    (killed / "summary.json").unlink()
    capsys.readouterr()
    code = main(stage_args("sft", killed, Path()) + COMMON + ["--resume", "auto"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert RESUMING.findall(captured.out) == [(str(killed / "checkpoints" / "step-00000016"), "16")]
    assert_same_results(reference, killed)


def test_run_killed_before_its_first_checkpoint_starts_afresh(tmp_path, capsys):
    """Killed before any checkpoint (simulated: a finished run's checkpoints, model and summary deleted, its
    metrics.jsonl kept). `--resume auto` finds nothing to resume, starts afresh, and its metrics.jsonl holds the
    new run's lines only."""
    from chatrlhf.cli import main

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert main(stage_args("sft", reference, Path()) + COMMON) == 0
    shutil.copytree(reference, killed)
    for name in ("checkpoints", "model"):
        shutil.rmtree(killed / name)
    (killed / "summary.json").unlink()
    capsys.readouterr()
    assert main(stage_args("sft", killed, Path()) + COMMON + ["--resume", "auto"]) == 0
    assert "resuming from" not in capsys.readouterr().out
    assert_same_results(reference, killed)
