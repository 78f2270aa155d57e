"""The demo pipeline on several seeds: does RLHF beat SFT on every one, and by how much?

Runs `chatrlhf pipeline --recipe recipes/demo.yaml` once per seed (`--run.seed S`, which seeds the data order,
the shuffles, the reward model's head and the rollouts; the demo data and the tiny model's initial weights are
the recipe's, the same for every seed) and prints, per seed, the judge's mean score of the SFT and the RLHF models
on the held-out prompts, the paired difference with its 95% confidence interval, the reward model's held-out
accuracy, the final KL and the wall time; then whether every seed's paired interval is above zero. The figures and
the versions and CPU each run recorded (summary.json `env/*`) are written to `--json`.

    python bench/seeds.py --seeds 1234 1 2 --workdir runs/seeds --json bench/results/seeds.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _runner import run_env_line, write_json

ROOT = Path(__file__).resolve().parent.parent


def command(seed: int, run_dir: Path, recipe: Path) -> list[str]:
    return [sys.executable, "-m", "chatrlhf", "pipeline", "--recipe", str(recipe), "--run.seed", str(seed),
            "--run_dir", str(run_dir), "--run.progress", "False"]  # fmt: skip


def run_seed(seed: int, workdir: Path, recipe: Path) -> dict:
    """Run (or, if its summary exists, read) the pipeline of one seed; its figures."""
    run_dir = workdir / f"seed-{seed}"
    summary_path = run_dir / "summary.json"
    wall = None
    if not summary_path.is_file():
        cmd = command(seed, run_dir, recipe)
        print("$", " ".join(cmd), flush=True)
        start = time.time()
        subprocess.run(cmd, check=True, cwd=ROOT)
        wall = time.time() - start
    s = json.loads(summary_path.read_text())
    judge = s["comparison"]["judge"]
    diff = judge["rlhf_minus_sft"]
    return {
        "seed": seed,
        "command": " ".join(command(seed, run_dir, recipe)[1:]),
        "judge_sft": judge["sft"]["mean"],
        "judge_rlhf": judge["rlhf"]["mean"],
        "paired_diff": diff["mean"],
        "paired_ci95": diff["ci95"],
        "rm_accuracy": s.get("reward_model", {}).get("eval/accuracy"),
        "final_kl": s.get("rl", {}).get("final/kl/mean"),
        "stage_times_s": s["time_s"],
        "wall_s": wall,
        "env": {k: v for k, v in s.items() if k.startswith("env/")},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2])
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "seeds")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "demo.yaml")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here (default: WORKDIR/seeds.json)")
    args = parser.parse_args()
    rows = [run_seed(seed, args.workdir, args.recipe) for seed in args.seeds]

    print()
    print(f"{'seed':>6} {'judge SFT':>10} {'judge RLHF':>11} {'RLHF − SFT [95% CI]':>28} {'RM acc':>7} {'KL':>6}")
    for r in rows:
        lo, hi = r["paired_ci95"]
        ci = f"{r['paired_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        acc = f"{r['rm_accuracy']:.3f}" if r["rm_accuracy"] is not None else "—"
        kl = f"{r['final_kl']:.2f}" if r["final_kl"] is not None else "—"
        print(f"{r['seed']:>6} {r['judge_sft']:>10.3f} {r['judge_rlhf']:>11.3f} {ci:>28} {acc:>7} {kl:>6}")
    wins = all(r["paired_ci95"][0] > 0 for r in rows)
    print(f"every seed's paired 95% CI above zero: {'yes' if wins else 'NO'}")
    print(run_env_line(rows[0]["env"]))
    write_json(args.json or args.workdir / "seeds.json", {"rows": rows, "every_seed_wins": wins})
    return 0 if wins else 1


if __name__ == "__main__":
    sys.exit(main())
