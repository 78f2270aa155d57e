"""Faults (docs/reliability.md): a numerical blow-up stops a run with exit 3, names the stage, the metric and the
step, and keeps its checkpoints; bad steps can be skipped and are counted; an output directory that cannot hold
the run is refused before training; a full disk mid-run keeps the last checkpoint; a rollout batch of empty
responses is not trained on.

The runs go through the real CLI entry point in-process (`chatrlhf.cli.main`) on a tiny llama, seconds each.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from chatrlhf.cli import main
from chatrlhf.config import OptimConfig
from chatrlhf.engine.checkpoint import load_checkpoint
from chatrlhf.engine.generation import Generated, finished
from chatrlhf.engine.hybrid import HybridEngine
from chatrlhf.engine.single import SingleEngine
from chatrlhf.models.load import load_causal_lm, load_tokenizer
from chatrlhf.rlhf import truncate_after_eos
from chatrlhf.train.rollout import Rollout, all_empty

CPU = torch.device("cpu")
TINY = "tiny:llama:hidden=32,layers=2,heads=4"
QUIET = ["--run.progress", "False", "--run.log_every", "1"]
BLOW_UP = ["--optim.lr", "1e30", "--optim.warmup_steps", "3"]
"""Linear warm-up from 0: step 1 applies nothing, step 2 moves every weight by ~3e29 (finite), and the next
forward overflows, so step 3's gradient norm is NaN."""


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny llama: the RL actor, and (random score head) its reward model and critic."""
    from chatrlhf.models.load import add_value_head
    from chatrlhf.models.tiny import build_tiny_model

    base = build_tiny_model(tmp_path_factory.mktemp("faults") / "llama", arch="llama", hidden=32, layers=2, heads=4)
    add_value_head(base, base.parent / "rm")  # its reward model and critic: its weights and a seeded random head
    return base


def sft(out: Path, *flags: str) -> list[str]:
    return ["sft", "--model", TINY, "--output_dir", str(out), "--data.paths", "demo:pairs:64:0", "--train.batch_size",
            "4", "--train.max_seq_len", "128", "--train.max_steps", "8", *QUIET, *flags]  # fmt: skip


def rl(out: Path, base: Path, *flags: str) -> list[str]:
    return ["rl", "--actor", str(base), "--output_dir", str(out), "--data.paths", "demo:prompts:64:0",
            "--train.rollout_batch_size", "4", "--train.max_prompt_len", "64", "--train.generation.max_new_tokens",
            "6", *QUIET, *flags]  # fmt: skip


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(args)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def steps_logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def train_flag(flags: list[str], prefix: str) -> list[str]:
    """`--optim.x` → `--<prefix>.optim.x` (SFT: train.optim, RL: train.actor_optim)."""
    return [f"--{prefix}{f[2:].removeprefix('optim')}" if f.startswith("--optim.") else f for f in flags]


# ------------------------------------------------------------------------------------------------ NaN / inf


def test_exploding_weights_stop_sft_with_exit_3_and_keep_the_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = cli(sft(out, "--checkpoint.every", "1", *train_flag(BLOW_UP, "train.optim")), capsys)
    assert code == 3
    assert err.strip() == (
        "chatrlhf sft: numerical failure: sft: metric optim/grad_norm is nan (non-finite gradient) at optimizer "
        "step 3; the step was not applied"
    )
    assert not (out / "model").exists() and not (out / "summary.json").exists()
    assert [m["step"] for m in steps_logged(out)] == [1, 2]
    assert checkpoints(out) == ["step-00000001", "step-00000002"]
    # the newest checkpoint restores a real engine: step counter, schedule, finite weights
    model = load_causal_lm(str(out / "base_model"), load_tokenizer(str(out / "base_model")), "float32", CPU)
    engine = SingleEngine(model, OptimConfig(lr=1e30, warmup_steps=3), 8, "sft")
    trainer = load_checkpoint(out / "checkpoints" / "step-00000002", [engine])
    assert trainer["step"] == 2 and engine.steps == 2 and engine.scheduler.last_epoch == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_blow_up_before_any_checkpoint_leaves_no_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = cli(sft(out, "--checkpoint.every", "0", "--train.optim.lr", "1e30"), capsys)
    assert code == 3
    assert "sft: metric optim/grad_norm is nan (non-finite gradient) at optimizer step 2" in err
    assert not out.exists()


def test_exploding_actor_stops_rl_with_exit_3(tmp_path, capsys, base):
    out = tmp_path / "run"
    flags = ["--reward_model", str(base.parent / "rm"), "--train.iterations", "6", "--checkpoint.every", "1"]
    code, _, err = cli(rl(out, base, *flags, *train_flag(BLOW_UP, "train.actor_optim")), capsys)
    assert code == 3
    assert err.strip() == (
        "chatrlhf rl: numerical failure: actor: metric optim/grad_norm is nan (non-finite gradient) at optimizer "
        "step 3; the step was not applied"
    )
    assert checkpoints(out) == ["step-00000001", "step-00000002"]
    for ckpt in (out / "checkpoints").iterdir():
        assert {p.name for p in ckpt.iterdir()} >= {"actor.pt", "critic.pt", "trainer.pt", "rng-rank0.pt"}
    assert not any((out / d).exists() for d in ("model", "critic", "summary.json"))


def test_reward_function_returning_nan_stops_rl_with_exit_3(tmp_path, capsys, base, monkeypatch):
    """The reward is NaN from the 9th response on: iteration 3 of 4 responses each (GRPO, groups of 2)."""
    module = "nan_reward_after_8"
    (tmp_path / f"{module}.py").write_text(
        "calls = 0\n\n\ndef reward(prompt, response, **fields):\n    global calls\n    calls += 1\n"
        "    return float('nan') if calls > 8 else 0.5\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    flags = ["--reward_functions", f"{module}:reward", "--train.algo", "grpo", "--train.group_size", "2",
             "--train.rollout_batch_size", "2", "--train.iterations", "4", "--checkpoint.every", "1"]  # fmt: skip
    code, _, err = cli(rl(out, base, *flags), capsys)
    assert code == 3
    assert re.fullmatch(
        r"chatrlhf rl: numerical failure: reward function 'nan_reward_after_8:reward' returned nan for prompt "
        r"'Write .*'\n",
        err,
    ), err
    assert [m["step"] for m in steps_logged(out)] == [1, 2]
    assert checkpoints(out) == ["step-00000001", "step-00000002"]
    assert not (out / "model").exists()


# ------------------------------------------------------------------------------------------------ bad steps


def engine_on_a_line(max_bad_steps: int) -> SingleEngine:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    return SingleEngine(model, OptimConfig(lr=0.1, schedule="linear"), 10, "line", max_bad_steps=max_bad_steps)


def backward(engine: SingleEngine, poison: float | None = None) -> None:
    """A real loss's gradient, with `poison` (NaN/inf) written into one entry by hand."""
    engine.backward(engine.model(torch.ones(4, 3)).pow(2).mean())
    if poison is not None:
        engine.model.weight.grad[0, 0] = poison


@pytest.mark.parametrize("poison", [math.nan, math.inf])
def test_bad_step_is_skipped_without_a_trace_then_the_next_bad_one_stops(poison):
    engine = engine_on_a_line(max_bad_steps=1)
    before = [p.detach().clone() for p in engine.model.parameters()]
    backward(engine, poison)
    stats = engine.step()
    assert stats.skipped and not math.isfinite(stats.grad_norm) and stats.lr == pytest.approx(0.1)
    # nothing applied: weights, Adam moments, schedule and step counter as before; the gradient is gone
    assert all(torch.equal(a, b) for a, b in zip(before, engine.model.parameters()))
    assert not engine.optimizer.state
    assert engine.scheduler.last_epoch == 0 and engine.steps == 0 and engine.bad_steps == 1
    assert all(p.grad is None for p in engine.model.parameters())

    backward(engine)  # a good step is applied as step 1 (lr 0.1: the schedule did not move)
    stats = engine.step()
    assert not stats.skipped and stats.lr == pytest.approx(0.1) and engine.steps == 1
    applied = [p.detach().clone() for p in engine.model.parameters()]
    assert not torch.equal(applied[0], before[0])

    backward(engine, poison)  # the second bad step is over the limit of 1
    with pytest.raises(FloatingPointError) as e:
        engine.step()
    assert str(e.value) == (
        f"line: metric optim/grad_norm is {poison} (non-finite gradient) at optimizer step 2; the step was not applied"
    )
    assert all(torch.equal(a, b) for a, b in zip(applied, engine.model.parameters()))


def test_bad_step_count_is_checkpointed(tmp_path):
    engine = engine_on_a_line(max_bad_steps=3)
    backward(engine, math.nan)
    engine.step()
    engine.save_state(tmp_path)
    restored = engine_on_a_line(max_bad_steps=3)
    restored.load_state(tmp_path)
    assert restored.bad_steps == 1 and restored.steps == 0


def test_sft_skips_up_to_max_bad_steps_and_counts_them(tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--run.max_bad_steps", "2", "--checkpoint.every", "1", *train_flag(BLOW_UP, "train.optim")]
    code, stdout, err = cli(sft(out, *flags), capsys)
    assert code == 3
    assert "at optimizer step 3; the step was not applied" in err  # steps 3 and 4 were skipped, not applied
    assert stdout.count("warning: sft: non-finite gradient norm (nan); step skipped") == 2
    lines = steps_logged(out)
    assert [(m["step"], m["faults/skipped_steps"], m["optim/grad_norm"] is None) for m in lines] == [
        (1, 0.0, False),
        (2, 0.0, False),
        (3, 1.0, True),
        (4, 2.0, True),
    ]
    state = torch.load(out / "checkpoints" / "step-00000004" / "sft.pt", weights_only=True)
    assert state["bad_steps"] == 2 and state["steps"] == 2  # steps 1 and 2 applied, 3 and 4 skipped


def test_rl_skips_up_to_max_bad_steps_and_counts_them(tmp_path, capsys, base):
    out = tmp_path / "run"
    flags = ["--reward_model", str(base.parent / "rm"), "--train.iterations", "6", "--run.max_bad_steps", "1"]
    flags += ["--checkpoint.every", "1"]  # a checkpoint keeps the failed run's directory and its metrics
    code, stdout, err = cli(rl(out, base, *flags, *train_flag(BLOW_UP, "train.actor_optim")), capsys)
    assert "warning: actor: non-finite gradient norm (nan); step skipped (1 of at most 1)" in stdout
    assert code == 3
    assert "actor: metric optim/grad_norm is nan (non-finite gradient) at optimizer step 3" in err
    assert [m["faults/skipped_steps"] for m in steps_logged(out)] == [0.0, 0.0, 1.0]


# ------------------------------------------------------------------------------------------------ disk


def test_output_directory_under_a_file_is_refused_before_training(tmp_path, capsys):
    """Tests may run as root, whom chmod does not stop; a path under a regular file cannot be created by anyone."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    code, _, err = cli(sft(blocker / "run"), capsys)
    assert code == 2
    assert re.fullmatch(r"chatrlhf sft: error: output directory '.*blocker/run' is not writable: .*\n", err), err
    assert blocker.read_text() == "a file" and sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_directory_is_refused_before_training(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = cli(sft(locked / "run"), capsys)
    finally:
        locked.chmod(0o700)
    assert code == 2 and "is not writable" in err
    assert list(locked.iterdir()) == []


def low_disk(monkeypatch, free_mib: int) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=free_mib * 2**20))


def test_low_free_disk_is_refused_before_training(tmp_path, capsys, monkeypatch):
    low_disk(monkeypatch, 10)
    out = tmp_path / "run"
    code, _, err = cli(sft(out), capsys)
    assert code == 2
    assert err == (
        f"chatrlhf sft: error: output directory '{out}': only 10 MiB free on its disk; need at least 64 MiB for "
        "checkpoints and the model\n"
    )
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_refused_output_directory_is_not_left_behind(tmp_path, capsys, monkeypatch):
    low_disk(monkeypatch, 10)
    out = tmp_path / "run"
    assert cli(sft(out), capsys)[0] == 2
    assert not out.exists()


def test_disk_full_during_a_checkpoint_keeps_the_last_one(tmp_path, capsys, monkeypatch):
    """The disk fills up while checkpoint 3 is written: the run stops with exit 2, its temp directory is removed,
    and checkpoints 1 and 2 are intact."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if ".step-00000003.tmp" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    code, _, err = cli(sft(out, "--checkpoint.every", "1", "--checkpoint.keep", "3"), capsys)
    assert code == 2
    latest = out / "checkpoints" / "step-00000002"
    assert re.fullmatch(
        rf"chatrlhf sft: error: checkpoint at step 3: disk full writing .*\.step-00000003\.tmp: .*No space left on "
        rf"device.*; the last complete checkpoint, {re.escape(str(latest))}, is kept\n",
        err,
    ), err
    assert checkpoints(out) == ["step-00000001", "step-00000002"]
    assert not (out / "model").exists()
    for ckpt in (out / "checkpoints").iterdir():
        for f in ckpt.glob("*.pt"):
            torch.load(f, weights_only=False)


# ------------------------------------------------------------------------------------------------ empty rollouts

EOS, PAD = 2, 0


def rollout(*responses: list[int]) -> Rollout:
    """A rollout of the given responses (already cut after their first EOS), right-padded by hand."""
    width = max(len(r) for r in responses)
    response = torch.tensor([r + [PAD] * (width - len(r)) for r in responses])
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in responses])
    prompt = torch.ones(len(responses), 2, dtype=torch.long)
    return Rollout([], prompt, torch.ones_like(prompt), response, mask)


@pytest.mark.parametrize(
    "responses, empty",
    [
        ([[EOS], [EOS]], True),
        ([[EOS], [EOS], [7, EOS]], False),  # one real response: the batch is trained on
        ([[EOS], [7]], False),  # [7] was cut at max_new_tokens = 1: truncated, not empty
        ([[7, 8, 9], [5, EOS]], False),
        ([[EOS]], True),
    ],
    ids=["all EOS-first", "one non-empty", "one truncated", "none empty", "single"],
)
def test_all_empty(responses, empty):
    assert all_empty(rollout(*responses), EOS) is empty


def emptied(out: Generated, rows: slice, tok) -> Generated:
    """`out` with the responses of `rows` replaced by EOS at once."""
    tokens = out.tokens.clone()
    tokens[rows] = tok.pad_token_id
    tokens[rows, 0] = tok.eos_token_id
    tokens, mask = truncate_after_eos(tokens, tok.eos_token_id, tok.pad_token_id)
    return Generated(tokens, mask, out.logprobs, finished(tokens, mask, tok.eos_token_id))


@pytest.mark.parametrize("which", ["all", "some"])
def test_rl_skips_a_batch_of_empty_responses_and_counts_it(which, tmp_path, capsys, monkeypatch, base):
    """Generation is replaced by one that answers EOS first (every response, or only the first of each batch).
    A batch of empty responses is counted in faults/skipped_rollouts and trains nothing; a batch with some is
    trained on as usual."""
    tok = AutoTokenizer.from_pretrained(base)
    sample = HybridEngine.generate

    def eos_first(self, prompts, **kwargs):
        return emptied(sample(self, prompts, **kwargs), slice(None) if which == "all" else slice(0, 1), tok)

    monkeypatch.setattr(HybridEngine, "generate", eos_first)
    out = tmp_path / "run"
    flags = ["--reward_model", str(base.parent / "rm"), "--train.iterations", "3", "--train.actor_optim.lr", "1e-3"]
    code, stdout, _ = cli(rl(out, base, *flags), capsys)
    assert code == 0
    lines = steps_logged(out)
    actor_before, actor_after = load_file(base / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    if which == "all":
        assert [m["faults/skipped_rollouts"] for m in lines] == [1.0, 2.0, 3.0]
        assert all("loss/policy" not in m and m["response/length_mean"] == 1.0 for m in lines)
        assert stdout.count("every response is empty (EOS first); no update from this batch") == 3
        assert all(torch.equal(actor_before[k], actor_after[k]) for k in actor_before)
    else:
        assert [m["faults/skipped_rollouts"] for m in lines] == [0.0, 0.0, 0.0]
        assert all("loss/policy" in m for m in lines)
        assert "every response is empty" not in stdout
        assert not all(torch.equal(actor_before[k], actor_after[k]) for k in actor_before)


def test_ptx_resume_after_an_empty_rollout_continues_with_the_uninterrupted_batches(
    tmp_path, capsys, monkeypatch, base
):
    """Iteration 2's responses are all empty: it trains nothing and draws no PTX batch. A run resumed from its
    iteration-3 checkpoint (as after a kill there) must go on with the PTX batch the uninterrupted run drew at
    iteration 4: the same metrics, loss/ptx included, and the same weights."""
    tok = AutoTokenizer.from_pretrained(base)
    sample = HybridEngine.generate
    calls = {"n": 0}

    def second_batch_empty(self, prompts, **kwargs):
        out = sample(self, prompts, **kwargs)
        calls["n"] += 1
        return emptied(out, slice(None), tok) if calls["n"] == 2 else out

    monkeypatch.setattr(HybridEngine, "generate", second_batch_empty)
    flags = ["--reward_model", str(base.parent / "rm"), "--train.iterations", "4",
             "--train.ptx_paths", "demo:pairs:64:1", "--train.max_prompt_len", "128",
             "--train.ptx_coef", "1.0", "--train.ptx_batch_size", "2", "--train.actor_optim.lr", "1e-3",
             "--checkpoint.every", "1", "--checkpoint.keep", "4", "--data.eval_fraction", "0"]  # fmt: skip
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert cli(rl(reference, base, *flags), capsys)[0] == 0
    calls["n"] = 0
    assert cli(rl(resumed, base, *flags), capsys)[0] == 0
    assert [m["faults/skipped_rollouts"] for m in steps_logged(reference)] == [0.0, 1.0, 1.0, 1.0]

    # back to where a run killed after iteration 3's checkpoint stood
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")
    for name in ("model", "critic"):
        shutil.rmtree(resumed / name)
    (resumed / "summary.json").unlink()
    calls["n"] = 10  # the resumed process's rollouts are sampled as usual
    code, stdout, _ = cli(rl(resumed, base, *flags, "--resume", "auto"), capsys)
    assert code == 0 and "step-00000003 (step 3)" in stdout

    def timeless(lines):
        return [{k: v for k, v in m.items() if not k.startswith(("time/", "perf/"))} for m in lines]

    assert timeless(steps_logged(resumed)) == timeless(steps_logged(reference))
    assert "loss/ptx" in steps_logged(reference)[3]
    want, got = load_file(reference / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    assert all(torch.equal(want[k], got[k]) for k in want)
