"""The demo's reward stage alone, on several seeds and epoch counts: how often does it learn the preferences?

From a finished demo run (`chatrlhf pipeline --recipe recipes/demo.yaml`, whose `config.yaml`, `sft/model` and
`data/` it reads), each (seed, epochs, lr) trains that run's reward stage again, in-process, on the same share of
the pairs that the pipeline gave its reward stage (`train.pipeline.stage_data`, with the run's own seed), with the
seed S (the head's initial weights and the order of the pairs) and the run's other reward settings. Per run it
prints the held-out pairwise accuracy, the chosen-minus-rejected score gap and the wall time; the figures,
versions and CPU go to `--json`. A run whose summary exists is read, not run again.

    python bench/reward_epochs.py --demo runs/demo --seeds 1234 1 2 --epochs 1 2 --workdir runs/reward-epochs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from _runner import fmt_table, run_env_line, write_json

ROOT = Path(__file__).resolve().parent.parent


def run_one(demo: Path, out: Path, seed: int, epochs: int, lr: float | None) -> dict:
    from chatrlhf.config import DataConfig, PipelineConfig, RewardConfig
    from chatrlhf.config.recipes import load_recipe
    from chatrlhf.train.pipeline import options, stage_data
    from chatrlhf.train.reward import run_reward

    if not (out / "summary.json").is_file():
        cfg = load_recipe(PipelineConfig, demo / "config.yaml")
        optim = dataclasses.replace(cfg.reward.optim, lr=lr if lr is not None else cfg.reward.optim.lr)
        train = dataclasses.replace(cfg.reward, epochs=epochs, optim=optim)
        shared = options(cfg, "reward")  # the engine, LoRA, checkpoints and run settings the pipeline gives the stage
        shared["run"] = dataclasses.replace(shared["run"], seed=seed, progress=False)
        data = DataConfig(eval_fraction=cfg.data.eval_fraction)
        pairs = stage_data(cfg, demo)["reward"]  # the pipeline's split, by the demo run's seed
        run_reward(RewardConfig(model=str(demo / "sft" / "model"), output_dir=str(out), data=data, train=train,
                                **shared), raws=pairs)  # fmt: skip
    s = json.loads((out / "summary.json").read_text())
    return {"seed": seed, "epochs": epochs, "lr": lr, "steps": s["steps"],
            "accuracy": s["eval/accuracy"], "score_gap": s["eval/score_gap"], "time_s": s["time/total_s"],
            "env": {k: v for k, v in s.items() if k.startswith("env/")}}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, required=True, help="a finished demo run directory")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2])
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--lr", type=float, nargs="+", default=[None], help="default: the run's")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "reward-epochs")
    parser.add_argument("--json", type=Path, default=None, help="default: WORKDIR/reward_epochs.json")
    a = parser.parse_args(argv)
    if not ((a.demo / "config.yaml").is_file() and (a.demo / "sft" / "model").is_dir()):
        raise SystemExit(f"{a.demo}: not a pipeline run whose SFT step has finished (config.yaml, sft/model)")
    rows = []
    for epochs in a.epochs:
        for lr in a.lr:
            for seed in a.seeds:
                tag = f"e{epochs}-s{seed}" + (f"-lr{lr:g}" if lr is not None else "")
                rows.append(run_one(a.demo, a.workdir / tag, seed, epochs, lr))
    table = [[str(r["epochs"]), "run's" if r["lr"] is None else f"{r['lr']:g}", str(r["seed"]), str(r["steps"]),
              f"{r['accuracy']:.3f}", f"{r['score_gap']:.3f}", f"{r['time_s']:.0f}"] for r in rows]  # fmt: skip
    print(fmt_table(["epochs", "lr", "seed", "steps", "held-out accuracy", "score gap", "s"], table))
    print(run_env_line(rows[0]["env"]))
    write_json(a.json or a.workdir / "reward_epochs.json", {"demo": str(a.demo), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
