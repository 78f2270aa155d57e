"""Hand-written run directories (metrics.jsonl, summary.json, config.yaml and the report's optional files) in the
layouts the drivers write (README "Outputs", docs/metrics.md, docs/report.md); no training."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import yaml

from chatrlhf.eval.doctor import Doctor, DoctorConfig

ENV = {
    "env/python": "3.11.9",
    "env/platform": "Linux-6.1-x86_64",
    "env/cpu": "Test CPU @ 2.0GHz",
    "env/cpu_count": 2,
    "env/chatrlhf": "0.1.0",
    "env/torch": "2.13.0",
    "env/transformers": "5.1.0",
    "env/cuda": "none",
    "env/gpu": "none",
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def write_config(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def sft_run(d: Path, steps: int = 30, finished: bool = True) -> Path:
    rows = [
        {
            "stage": "sft",
            "step": s,
            "time/elapsed_s": 0.5 * s,
            "loss/train": 3.0 * math.exp(-s / 10) + 0.8,
            "optim/grad_norm": 2.0 / math.sqrt(s),
            "optim/lr": 1e-3,
            "faults/skipped_steps": 0.0,
        }
        for s in range(1, steps + 1)
    ]
    for s in (10, 20, 30):
        if s <= steps:
            rows[s - 1]["eval/perplexity"] = 2.5 + 10 / s
    if finished:
        rows.append({"stage": "sft", "step": steps, "time/elapsed_s": 0.5 * steps + 0.2, "eval/perplexity": 2.7})
        write_json(
            d / "summary.json",
            {
                "stage": "sft",
                "steps": steps,
                "loss/train": rows[-2]["loss/train"],
                "eval/perplexity": 2.7,
                "time/total_s": 16.0,
                **ENV,
            },
        )
    write_jsonl(d / "metrics.jsonl", rows)
    write_config(d / "config.yaml", {"model": "tiny:llama", "output_dir": str(d), "train": {"epochs": 1}})
    return d


def reward_run(d: Path, steps: int = 20, scores: bool = True) -> Path:
    rng = random.Random(3)
    rows = [
        {
            "stage": "reward",
            "step": s,
            "time/elapsed_s": 0.3 * s,
            "loss/train": 0.69 * math.exp(-s / 15),
            "train/accuracy": 0.5 + 0.4 * (1 - math.exp(-s / 8)),
            "optim/grad_norm": 1.0,
            "optim/lr": 5e-4,
        }
        for s in range(1, steps + 1)
    ]
    final = {
        "eval/accuracy": 0.9,
        "eval/chosen_score": 1.2,
        "eval/rejected_score": -1.3,
        "eval/score_gap": 2.5,
        "eval/loss": 0.3,
    }
    rows.append({"stage": "reward", "step": steps, "time/elapsed_s": 0.3 * steps + 0.1, **final})
    write_jsonl(d / "metrics.jsonl", rows)
    write_json(d / "summary.json", {"stage": "reward", "steps": steps, **final, "time/total_s": 7.0})
    write_config(d / "config.yaml", {"model": "sft/model", "train": {"epochs": 1}})
    if scores:
        write_jsonl(
            d / "eval_scores.jsonl",
            [{"chosen": rng.gauss(1.2, 1.0), "rejected": rng.gauss(-1.3, 1.0)} for _ in range(200)],
        )
    return d


RESPONSES_OK = ["sand ship star", "game gift", "hat home hope hill", "moon map", "nail nest nose"]
RESPONSES_REPEAT = ["hope hope", "sand sand star", "moon moon"]


def rl_batch(rng: random.Random, p_repeat: float, n: int) -> tuple[list[str], list[str]]:
    responses = [rng.choice(RESPONSES_REPEAT if rng.random() < p_repeat else RESPONSES_OK) for _ in range(n)]
    prompts = [f"Name {len(r.split())} words that begin with {r[0]}." for r in responses]
    return responses, prompts


def rl_run(
    d: Path,
    iterations: int = 40,
    last: int | None = None,
    log_every: int = 1,
    doctor_json: bool = True,
    samples: bool = True,
    hacking: bool = True,
) -> Path:
    """A PPO stage. `last` < iterations: a run still going (no summary.json). `hacking`: the repeated-word drift
    of the demo (10% → 30%), which the doctor catches."""
    rng = random.Random(7)
    cfg = DoctorConfig(min_window_responses=256)
    doctor = Doctor(cfg)
    last = iterations if last is None else last
    rows, sample_rows = [], []
    for it in range(1, last + 1):
        p = 0.1 + (0.2 * (it - 1) / (iterations - 1) if hacking else 0.0)
        responses, prompts = rl_batch(rng, p, 64)
        m = {
            "reward/score_mean": 0.05 * it + rng.gauss(0, 0.05),
            "reward/score_std": 1.0,
            "reward/clipped_mean": 0.05 * it,
            "reward/total_mean": 0.045 * it + rng.gauss(0, 0.05),
            "reward/reward_model_mean": 0.05 * it,
            "kl/mean": 0.03 * it,
            "kl/token_mean": 0.003 * it,
            "advantages/mean": 0.0,
            "response/length_mean": 12 + rng.gauss(0, 0.5),
            "response/truncated_frac": 0.0,
            "loss/policy": rng.gauss(0, 0.01),
            "loss/value": 0.1 + rng.random() * 0.02,
            "policy/clipfrac": 0.05,
            "policy/approx_kl": 0.003,
            "value/clipfrac": 0.02,
            "optim/actor_grad_norm": 0.8,
            "optim/critic_grad_norm": 1.5,
            "optim/actor_lr": 1e-4,
            "optim/critic_lr": 5e-4,
            "kl/coef": 0.05,
            "time/generate_s": 1.0,
            "time/score_s": 0.2,
            "time/train_s": 0.5,
            "perf/tokens_per_s": 900.0,
        }
        if it % 10 == 0:
            m["eval/judge_mean"] = 0.7 + 0.002 * it
            m["eval/judge_sem"] = 0.01
            held_out = [
                ("Name 2 words that begin with h.", "hat hill"),
                ("List 3 words starting with the letter s.", "sand ship star"),
            ]
            for j, (prompt, r) in enumerate(held_out):
                r = "hope hope" if hacking and it >= 30 and j == 0 else r
                judge = 0.5 if r == "hope hope" else 1.0
                row = {"iteration": it, "prompt": prompt, "response": r, "reward": 0.05 * it, "judge": judge}
                sample_rows.append(row)
        checkup = doctor.observe(it, m, responses, prompts)
        m.update(checkup.metrics)
        if it % log_every == 0 or it == iterations:
            rows.append({"stage": "rl", "step": it, "time/elapsed_s": 1.7 * it, **m})
    write_jsonl(d / "metrics.jsonl", rows)
    write_config(
        d / "config.yaml",
        {"actor": "sft/model", "train": {"algo": "ppo", "iterations": iterations, "rollout_batch_size": 64}},
    )
    if doctor_json:
        doctor.write(d / "doctor.json")
    if samples:
        write_jsonl(d / "samples.jsonl", sample_rows)
    if last == iterations:
        tail = rows[-max(1, len(rows) // 10) :]
        final = {f"final/{k}": sum(r[k] for r in tail) / len(tail) for k in rows[-2] if k not in ("stage", "step")}
        write_json(
            d / "summary.json",
            {"stage": "rl", "algo": "ppo", "iterations": iterations, "prompts": 640, **final, "time/total_s": 70.0},
        )
    return d


def dpo_pipeline_run(root: Path) -> Path:
    """SFT then DPO; the judge alone scores the comparison, and there is no samples.jsonl."""
    sft_run(root / "sft")
    rows = [
        {"stage": "dpo", "step": s, "time/elapsed_s": 0.4 * s, "loss/train": 0.693 * math.exp(-s / 20),
         "rewards/chosen": -0.01 * s, "rewards/rejected": -0.03 * s, "rewards/margin": 0.02 * s,
         "rewards/accuracy": 0.0 if s == 1 else 0.8, "logps/chosen": -20.0, "logps/rejected": -21.0 - 0.1 * s,
         "optim/grad_norm": 1.0, "optim/lr": 1e-4}
        for s in range(1, 21)
    ]  # fmt: skip
    write_jsonl(root / "dpo" / "metrics.jsonl", rows)

    def ci(mean, half):
        return {"mean": mean, "ci95": [mean - half, mean + half], "n": 64}

    judge = {"sft": ci(0.68, 0.02), "rlhf": ci(0.86, 0.01), "rlhf_minus_sft": ci(0.18, 0.02), "rlhf_better": True}
    examples = [{"prompt": "Name 2 words that begin with m.", "sft": "map dog", "rlhf": "moon map"}]
    comparison = {"judge": judge, "prompts": 64, "samples_per_prompt": 4, "examples": examples}
    summary = {"method": "dpo", "dpo": {"steps": 20}, "comparison": comparison, "time_s": {"sft": 16.0, "dpo": 8.0}}
    write_json(root / "summary.json", summary)
    return root


def pipeline_run(root: Path) -> Path:
    sft_run(root / "sft")
    reward_run(root / "reward")
    rl_run(root / "rl")

    def ci(mean, half, n=64):
        return {"mean": mean, "ci95": [mean - half, mean + half], "n": n}

    comparison = {
        "reward_model": {
            "sft": ci(0.0, 0.14),
            "rlhf": ci(1.4, 0.1),
            "rlhf_minus_sft": ci(1.4, 0.13),
            "rlhf_better": True,
        },
        "judge": {
            "sft": ci(0.66, 0.02),
            "rlhf": ci(0.85, 0.013),
            "rlhf_minus_sft": ci(0.18, 0.02),
            "rlhf_better": True,
        },
        "prompts": 64,
        "samples_per_prompt": 2,
        "examples": [{"prompt": "Name 2 words that begin with h.", "sft": "hat dog", "rlhf": "hope hope"}],
    }
    write_json(
        root / "summary.json",
        {
            "method": "rlhf",
            "sft": {"eval/perplexity": 2.7, "steps": 30},
            "reward_model": {
                "eval/accuracy": 0.9,
                "eval/chosen_score": 1.2,
                "eval/rejected_score": -1.3,
                "eval/score_gap": 2.5,
                # 58 of 64 right: p = Σ_{i≥58} C(64, i) / 2⁶⁴
                "gate": {
                    "accuracy": 58 / 64,
                    "correct": 58,
                    "pairs": 64,
                    "min_accuracy": 0.5,
                    "p_value": sum(math.comb(64, i) for i in range(58, 65)) / 2**64,
                    "passed": True,
                },
            },
            "rl": {"final/kl/mean": 1.2},
            "comparison": comparison,
            "time_s": {"sft": 16.0, "reward": 7.0, "rl": 70.0, "eval": 5.0},
            **ENV,
        },
    )
    write_config(root / "config.yaml", {"model": "tiny:llama", "run_dir": str(root), "rl": {"iterations": 40}})
    write_jsonl(
        root / "samples.jsonl",
        [
            {
                "prompt": f"Name 2 words that begin with {c}.",
                "sample": k,
                "sft": f"{c}at dog",
                "rlhf": f"{c}ope {c}ope",
                "scores": {"sft": {"reward_model": 0.1, "judge": 0.5}, "rlhf": {"reward_model": 1.5, "judge": 0.5}},
            }
            for c in "hms"
            for k in range(2)
        ],
    )
    return root
