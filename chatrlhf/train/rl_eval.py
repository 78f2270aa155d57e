"""Held-out evaluation of the RL policy: one sampled response per held-out prompt, scored by the run's reward and,
when the run has one, a judge (`judge`, a `module:function` like a reward function, which RL never optimises).

It runs every `train.eval_every` iterations (logged as `eval/score_mean`, `eval/judge_mean`, `eval/judge_sem`, and
the responses appended to `samples.jsonl`, so the report can show the same prompts at several points of training
and the doctor can see the judge fall while the reward rises) and once more at the end (summary.json). Sampling
uses its own seed, always the same, inside a forked RNG: the training stream, and so resume equivalence, are
untouched, and every evaluation answers the same prompts under the same randomness. With an environment (`env`)
each held-out prompt plays one episode, scored as in training, and its row carries the conversation (`messages`);
the judge sees it as reward functions do: the policy's last turn as the response, the conversation as `messages`.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from chatrlhf import distributed as dist
from chatrlhf.models.rewards import call_score, load_function
from chatrlhf.train.rl_models import Models
from chatrlhf.train.rollout import (
    Prompt,
    function_inputs,
    generate_rollout,
    play_rollout,
    response_texts,
    score_rollout,
)


@dataclass
class HeldOut:
    """What every held-out evaluation of a run uses."""

    prompts: list[Prompt]
    """The held-out prompts (at most `train.eval_prompts`), the same at every evaluation."""
    judge: Callable | None
    """The judge function, or None."""
    judge_name: str
    """Its `module:function` spec (for messages)."""
    batch_size: int
    """Prompts per generation batch."""
    seed: int
    """The sampling seed of every evaluation."""


def held_out(prompts: list[Prompt], judge: str | None, limit: int, batch_size: int, seed: int) -> HeldOut | None:
    """The run's held-out evaluation set-up (None without held-out prompts)."""
    if not prompts:
        return None
    fn = load_function(judge) if judge else None
    return HeldOut(prompts=prompts[:limit], judge=fn, judge_name=judge or "", batch_size=batch_size, seed=seed)


@torch.no_grad()
def evaluate_held_out(m: Models, held: HeldOut, iteration: int) -> tuple[dict[str, float], list[dict]]:
    """(metrics, one sample row per prompt) of the policy now. Every rank generates every prompt (under ZeRO-3
    all ranks take part in each forward); the rows are the same on every rank."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    rows: list[dict] = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(held.seed)
        for i in range(0, len(held.prompts), held.batch_size):
            batch = held.prompts[i : i + held.batch_size]
            if m.runner is not None:  # one episode per prompt
                rollout = play_rollout(m.runner, m.actor, batch, 1, m.tok, m.device)
            else:
                rollout = generate_rollout(m.actor, batch, 1, m.tok, m.device)
            with m.resident(m.scorer.modules()):
                scores = score_rollout(m.scorer, rollout, m.tok).total.tolist()
            texts = response_texts(rollout, m.tok)
            judged, extras = function_inputs(rollout, m.tok)  # as reward functions see each response
            for j, (p, text, score) in enumerate(zip(rollout.prompts, texts, scores)):
                row = {"iteration": iteration, "prompt": p.text, "response": text, "reward": score}
                if rollout.episodes is not None:
                    row["messages"] = rollout.episodes[j].messages
                if held.judge is not None:
                    what = f"judge '{held.judge_name}'"
                    row["judge"] = call_score(held.judge, what, p.text, judged[j], extras[j])
                rows.append(row)
    metrics = {"eval/score_mean": statistics.fmean(r["reward"] for r in rows)}
    if held.judge is not None:
        judged = [r["judge"] for r in rows]
        metrics["eval/judge_mean"] = statistics.fmean(judged)
        metrics["eval/judge_sem"] = statistics.stdev(judged) / math.sqrt(len(judged)) if len(judged) > 1 else 0.0
    return metrics, rows


def append_samples(path: Path, rows: list[dict], resumed_at: int | None = None) -> None:
    """Append sample rows to `path` (main rank). A resumed run first drops the rows of iterations after the
    checkpoint it continues from, which the uninterrupted run would not have written yet."""
    if not dist.is_main():
        return
    if resumed_at is not None and path.exists():
        kept = [
            line
            for line in path.read_text(encoding="utf-8").splitlines()
            if json.loads(line)["iteration"] <= resumed_at
        ]
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
