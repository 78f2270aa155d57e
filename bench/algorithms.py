"""Every RL algorithm (and DPO/IPO) on the demo, against the same SFT model, on the same held-out prompts.

The first row runs the whole demo pipeline (`chatrlhf pipeline --recipe recipes/demo.yaml`: SFT, reward model,
PPO, evaluation). Every other row starts its run directory with a copy of that run's `data/`, `sft/` and (when its
recipe trains one) `reward/`, and runs `chatrlhf pipeline --recipe recipes/demo-ROW.yaml --resume auto`: the
pipeline finds those steps finished and skips them, so each row trains only its own RL (or DPO) step from the same
SFT model and, for the RL rows, against the same reward model; the script refuses a recipe whose model, data, SFT
or reward-model settings differ from the first row's. Every row is evaluated by the pipeline's comparison
(`eval/compare.py`) on the same `--eval-prompts` (256 prompts × 4 samples per model, the same seed), so the SFT
column is the same in every row and the paired differences are comparable.

Per row it prints the judge's mean score of SFT and of the tuned policy, the paired difference with its 95%
interval (the verdict: its lower end above 0), the final KL to the reference, the wall time of the row's own step,
and the RL doctor's findings; the table is printed as the README has it. A row whose summary exists is read,
not run again (delete its directory to rerun it). The figures, commands (`--workdir` written WORKDIR) and each
run's versions and machine (summary.json `env/*`) go to `--json`.

    python bench/algorithms.py --workdir runs/algorithms --json bench/results/algorithms.json
    python bench/algorithms.py --only ppo grpo dapo      # a subset (the first row is run when missing)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from _runner import run_env_line, write_json

ROOT = Path(__file__).resolve().parent.parent
ROWS = {
    "ppo": "recipes/demo.yaml",
    "grpo": "recipes/demo-grpo.yaml",
    "dr_grpo": "recipes/demo-dr-grpo.yaml",
    "rloo": "recipes/demo-rloo.yaml",
    "reinforce_pp": "recipes/demo-reinforce-pp.yaml",
    "remax": "recipes/demo-remax.yaml",
    "dapo": "recipes/demo-dapo.yaml",
    "gspo": "recipes/demo-gspo.yaml",
    "cispo": "recipes/demo-cispo.yaml",
    "dpo": "recipes/demo-dpo.yaml",
    "ipo": "recipes/demo-ipo.yaml",
    "dapo_judge": "recipes/demo-dapo-judge.yaml",
}
"""Row → recipe. The first is the base run whose SFT model (and reward model) every other row reuses. The last is
DAPO rewarded by the judge itself: it shows dynamic sampling at work, but is not an independent check."""
BASE = next(iter(ROWS))
SHARED = ("model", "data", "sft", "run")
"""Recipe sections that must equal the base's: what the reused steps were trained with."""


def command(recipe: str, run_dir: Path, eval_prompts: str) -> list[str]:
    """The row's pipeline; `recipe` is relative to the repository (the command runs there)."""
    return [sys.executable, "-m", "chatrlhf", "pipeline", "--recipe", recipe, "--run_dir", str(run_dir),
            "--resume", "auto", "--run.progress", "False", "--eval.prompts", eval_prompts]  # fmt: skip


def load(recipe: Path) -> dict:
    return yaml.safe_load(recipe.read_text(encoding="utf-8"))


def check_shared(name: str, recipe: dict, base: dict) -> None:
    """The row may reuse the base's steps only if it would have trained them the same way."""
    differ = [k for k in SHARED if recipe.get(k) != base.get(k)]
    if recipe.get("train_reward_model", True) and recipe.get("method", "rlhf") == "rlhf":
        differ += ["reward"] if recipe.get("reward") != base.get("reward") else []
    if differ:
        raise SystemExit(f"{name}: {ROWS[name]} differs from {ROWS[BASE]} in {differ}; it cannot reuse its steps")


def seed_from_base(name: str, recipe: dict, run_dir: Path, base_dir: Path) -> None:
    """Copy the base run's data and finished steps that this row's pipeline would otherwise train again."""
    steps = ["data", "sft"]
    if recipe.get("method", "rlhf") == "rlhf" and recipe.get("train_reward_model", True):
        steps.append("reward")
    run_dir.mkdir(parents=True, exist_ok=True)
    for step in steps:
        if not (run_dir / step).exists():
            shutil.copytree(base_dir / step, run_dir / step)


def run_row(name: str, workdir: Path, eval_prompts: str) -> dict:
    recipe_path = ROOT / ROWS[name]
    recipe, base = load(recipe_path), load(ROOT / ROWS[BASE])
    run_dir = workdir / name
    cmd = command(ROWS[name], run_dir, eval_prompts)
    wall = None
    if not (run_dir / "summary.json").is_file():
        if name != BASE:
            check_shared(name, recipe, base)
            seed_from_base(name, recipe, run_dir, workdir / BASE)
        print("$", " ".join(cmd[1:]), flush=True)
        start = time.time()
        subprocess.run(cmd, check=True, cwd=ROOT)
        wall = time.time() - start
    s = json.loads((run_dir / "summary.json").read_text())
    step = "dpo" if s["method"] == "dpo" else "rl"
    stage = json.loads((run_dir / step / "summary.json").read_text())
    judge = s["comparison"]["judge"]
    diff = judge["rlhf_minus_sft"]
    return {
        "row": name,
        "recipe": ROWS[name],
        "command": " ".join(["chatrlhf", *command(ROWS[name], Path("WORKDIR") / name, eval_prompts)[3:]]),
        "judge_sft": judge["sft"]["mean"],
        "judge_tuned": judge["rlhf"]["mean"],
        "paired_diff": diff["mean"],
        "paired_ci95": diff["ci95"],
        "beats_sft": diff["ci95"] is not None and diff["ci95"][0] > 0,
        "reward_model_diff": s["comparison"].get("reward_model", {}).get("rlhf_minus_sft", {}).get("mean"),
        "final_kl": stage.get("final/kl/mean"),
        "step_s": s["time_s"][step],
        "doctor": stage.get("doctor/findings"),
        "sampling": sampling(run_dir / step / "metrics.jsonl"),
        "wall_s": wall,
        "env": {k: v for k, v in stage.items() if k.startswith("env/")},
    }


def sampling(metrics: Path) -> dict | None:
    """Dynamic sampling over the logged iterations (every run.log_every-th): mean rounds per iteration and the share
    of drawn groups that tied."""
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    lines = [m for m in lines if "sampling/rounds" in m]
    if not lines:
        return None
    drawn = sum(m["sampling/groups_drawn"] for m in lines)
    return {
        "logged_iterations": len(lines),
        "rounds_mean": sum(m["sampling/rounds"] for m in lines) / len(lines),
        "equal_frac": sum(m["sampling/equal_frac"] * m["sampling/groups_drawn"] for m in lines) / drawn,
    }


def markdown(rows: list[dict]) -> str:
    out = ["| algorithm | judge SFT → tuned | paired gain [95% CI] | beats SFT | KL | step time | RL doctor |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lo, hi = r["paired_ci95"]
        kl = f"{r['final_kl']:.2f}" if r["final_kl"] is not None else "—"
        doctor = "—" if r["doctor"] is None else (", ".join(r["doctor"]) or "no findings")
        out.append(
            f"| {r['row']} | {r['judge_sft']:.3f} → {r['judge_tuned']:.3f} | {r['paired_diff']:+.3f} "
            f"[{lo:+.3f}, {hi:+.3f}] | {'yes' if r['beats_sft'] else 'NO'} | {kl} | {r['step_s']:.0f} s | {doctor} |"
        )
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "algorithms")
    parser.add_argument("--only", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--eval-prompts", default="demo:prompts:256:4321", help="held-out prompts of every row")
    parser.add_argument("--json", type=Path, default=None, help="default: WORKDIR/algorithms.json")
    parser.add_argument("--print-commands", action="store_true", help="print the commands and exit")
    args = parser.parse_args()
    if args.print_commands:
        for name in ROWS:
            print(" ".join(["chatrlhf", *command(ROWS[name], args.workdir / name, args.eval_prompts)[3:]]))
        return 0
    if BASE not in args.only and not (args.workdir / BASE / "summary.json").is_file():
        args.only = [BASE, *args.only]
    rows = [run_row(name, args.workdir, args.eval_prompts) for name in args.only]

    print()
    print(markdown(rows))
    wins = all(r["beats_sft"] for r in rows)
    print(f"every row's paired 95% CI above zero: {'yes' if wins else 'NO'}")
    print(run_env_line(rows[0]["env"]))
    payload = {"eval_prompts": args.eval_prompts, "rows": rows, "every_row_wins": wins}
    write_json(args.json or args.workdir / "algorithms.json", payload)
    return 0 if wins else 1


if __name__ == "__main__":
    sys.exit(main())
