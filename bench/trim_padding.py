"""The RL update with and without `--train.update.trim_padding`, side by side, on responses of varied length.

An SFT'd tiny Llama answers the demo task's prompts with responses that end at EOS after a few words, so a rollout
is padded to its longest response and most of its columns are padding for most rows. Each size (`--hidden`,
4 layers) is first fine-tuned (`chatrlhf sft` on demo pairs, `--sft-steps` steps; built once), then `chatrlhf rl`
(GRPO, rewards from the demo judge and a text hash so that groups differ) runs alternately with
`--train.update.trim_padding True` and `False`, `--runs` times each, on the same prompts and seed, with micro-batches
of `--micro` sequences (gradient accumulation up to mini-batches of `--mini`). Reported per run, from the driver's
metrics (docs/metrics.md), the median over the iterations after `--warmup`: `time/train_s` (the update: advantages,
forwards and backwards, optimizer steps) and the whole iteration (`time/elapsed_s` between two iterations); and,
to show the workload, the mean response length (against `--new-tokens`). Then the medians over the runs and the
ratio untrimmed ÷ trimmed.

Trimming changes only the float rounding of the update's forwards, so both runs draw the same first rollout: the
script checks that the first iteration's rewards and response lengths agree (later iterations may drift apart).

    python bench/trim_padding.py --hidden 128 256 --json bench/results/trim_padding.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _runner import fmt_table, machine_summary, metrics_lines, write_json

ROOT = Path(__file__).resolve().parent.parent


def sft_model(workdir: Path, hidden: int, a: argparse.Namespace) -> Path:
    """A tiny Llama fine-tuned on demo pairs, so that its responses end at EOS after a few words (built once)."""
    out = workdir / f"sft-h{hidden}"
    if not (out / "model" / "config.json").is_file():
        spec = f"tiny:llama:hidden={hidden},layers=4,heads={hidden // 64}"
        cmd = [sys.executable, "-m", "chatrlhf", "sft", "--model", spec, "--output_dir", str(out),
               "--data.paths", "demo:pairs:4000:0", "--data.eval_fraction", "0.01",
               "--train.max_steps", str(a.sft_steps), "--train.epochs", "100", "--train.batch_size", "32",
               "--train.max_seq_len", "128", "--train.optim.lr", "2e-3", "--run.progress", "False",
               "--run.overwrite", "True"]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return out / "model"


def rl_command(model: Path, out: Path, trim: bool, a: argparse.Namespace) -> list[str]:
    return [
        sys.executable, "-m", "chatrlhf", "rl", "--actor", str(model),
        "--reward_functions", "chatrlhf.demo.task:judge", "trim_padding:text_hash", "--reward_weights", "1", "0.1",
        "--output_dir", str(out), "--data.paths", "demo:prompts:1024:7", "--data.eval_fraction", "0",
        "--train.algo", "grpo", "--train.group_size", str(a.group), "--train.rollout_batch_size", str(a.prompts),
        "--train.iterations", str(a.warmup + a.iterations), "--train.max_prompt_len", "64",
        "--train.generation.max_new_tokens", str(a.new_tokens),
        "--train.update.mini_batch_size", str(a.mini), "--train.update.micro_batch_size", str(a.micro),
        "--train.update.trim_padding", str(trim), "--train.actor_optim.lr", "1e-4",
        "--checkpoint.every", "0", "--run.log_every", "1", "--run.progress", "False", "--run.overwrite", "True",
    ]  # fmt: skip


def text_hash(prompt: str, response: str, **fields) -> float:
    """A reward that tells almost any two responses apart, so that no group ties and every update has advantages."""
    return sum(map(ord, response)) % 97 / 97


def run(model: Path, workdir: Path, trim: bool, tag: str, a: argparse.Namespace) -> dict:
    out = workdir / f"{model.parent.name}-{'trim' if trim else 'full'}-{tag}"
    cmd = rl_command(model, out, trim, a)
    env = {"PYTHONPATH": f"{ROOT}:{Path(__file__).resolve().parent}", "OMP_NUM_THREADS": str(a.threads)}
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, env={**os.environ, **env})
    lines = [m for m in metrics_lines(out / "metrics.jsonl") if "time/train_s" in m]
    kept = lines[a.warmup :]
    ends = [m["time/elapsed_s"] for m in lines]
    steps = [b - e for e, b in zip(ends, ends[1:])][a.warmup - 1 :]
    return {
        "trim_padding": trim,
        "model": model.parent.name,
        "command": " ".join(["chatrlhf", *cmd[3:]]).replace(str(workdir), "$W"),
        "train_s": statistics.median(m["time/train_s"] for m in kept),
        "step_s": statistics.median(steps),
        "response_length_mean": statistics.mean(m["response/length_mean"] for m in kept),
        "first": {"reward": lines[0]["reward/score_mean"], "length": lines[0]["response/length_mean"]},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per iteration")
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64, help="max_new_tokens")
    parser.add_argument("--mini", type=int, default=32)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=6, help="measured iterations per run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    a = parser.parse_args()
    assert a.warmup >= 1, "--warmup must be at least 1 (the first iteration's time has no iteration before it)"
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="chatrlhf-trim-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows, summary, table = [], [], []
    for hidden in a.hidden:
        model = sft_model(workdir, hidden, a)
        for r in range(a.runs):
            for trim in (True, False) if r % 2 == 0 else (False, True):  # alternating order
                row = run(model, workdir, trim, f"r{r}", a)
                rows.append({**row, "run": r})
                print(f"h{hidden} trim_padding={trim} run {r + 1}: update {row['train_s']:.3f} s, "
                      f"iteration {row['step_s']:.3f} s", flush=True)  # fmt: skip
        mine = [x for x in rows if x["model"] == model.parent.name]
        firsts = {json.dumps(x["first"]) for x in mine}
        if len(firsts) != 1:
            raise SystemExit(f"h{hidden}: the runs' first rollouts differ ({sorted(firsts)}): not the same workload")
        med = {t: {k: statistics.median(x[k] for x in mine if x["trim_padding"] == t)
                   for k in ("train_s", "step_s", "response_length_mean")} for t in (True, False)}  # fmt: skip
        item = {"model": model.parent.name, "hidden": hidden, "trimmed": med[True], "full": med[False],
                "update_full_over_trimmed": med[False]["train_s"] / med[True]["train_s"],
                "iteration_full_over_trimmed": med[False]["step_s"] / med[True]["step_s"]}  # fmt: skip
        summary.append(item)
        for t in (False, True):
            table.append([f"h{hidden}", str(t), f"{med[t]['train_s']:.3f}", f"{med[t]['step_s']:.3f}",
                          f"{med[t]['response_length_mean']:.1f}"])  # fmt: skip
        table.append([f"h{hidden}", "full ÷ trimmed", f"{item['update_full_over_trimmed']:.2f}",
                      f"{item['iteration_full_over_trimmed']:.2f}", ""])  # fmt: skip
    print()
    print(
        f"GRPO, {a.prompts} prompts × {a.group}, max_new_tokens {a.new_tokens}, mini-batches of {a.mini}, "
        f"micro-batches of {a.micro}, {a.iterations} measured iterations after {a.warmup}, {a.runs} runs each"
    )
    print(fmt_table(["model", "trim_padding", "update s", "iteration s", "response length"], table))
    args = {k: "WORKDIR" if k == "workdir" else str(v) for k, v in vars(a).items()}
    write_json(a.json or workdir / "trim_padding.json",
               {"machine": machine_summary(), "args": args, "summary": summary, "runs": rows})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
