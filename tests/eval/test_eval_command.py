"""`chatrlhf eval` through the real command line (subprocess): perplexity, reward-model accuracy and distributions,
and two models side by side with a reward model, a judge and a verifier. Every reported number is recomputed here
independently — perplexity by a plain per-record loop over the model's logits, the rest from the files the command
wrote (samples.jsonl, eval.json) by slow obvious loops, and the judge's scores by calling the judge."""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatrlhf.data import load_source, to_sft
from chatrlhf.data.collate import encode_sft
from chatrlhf.demo.task import judge, make_pairs, make_prompts, write_jsonl
from chatrlhf.models.load import load_causal_lm, load_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def chatrlhf(*args: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-m", "chatrlhf", *args], capture_output=True, text=True, cwd=ROOT, env=env)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, sft_llama):
    """A reward model (40 steps from the SFT model), then one `chatrlhf eval` run with every part."""
    root = tmp_path_factory.mktemp("eval")
    pairs = write_jsonl(make_pairs(64, seed=9), root / "pairs.jsonl")
    prompts = write_jsonl(make_prompts(12, seed=3), root / "prompts.jsonl")
    ok(chatrlhf("reward", "--model", str(sft_llama), "--output_dir", str(root / "rm"), "--data.paths", str(pairs),
                "--train.max_steps", "40", "--train.batch_size", "8", "--train.max_seq_len", "96",
                "--train.optim.lr", "1e-3", "--run.progress", "False"))  # fmt: skip
    from chatrlhf.models.tiny import build_tiny_model

    random = build_tiny_model(root / "random", arch="llama", hidden=64, layers=2, heads=2)
    out = root / "out"
    args = ["eval", "--models", str(random), str(sft_llama), "--names", "random", "sft",
            "--prompts", str(prompts), "--num_prompts", "10", "--samples_per_prompt", "4",
            "--reward_model", str(root / "rm" / "model"), "--judges", "chatrlhf.demo.task:judge",
            "--verifiers", "chatrlhf.demo.task:judge", "--pass_threshold", "0.5", "--pass_at", "1", "2", "4",
            "--perplexity_data", str(pairs), "--pairs", str(pairs), "--generation.max_new_tokens", "24",
            "--batch_size", "16", "--output_dir", str(out)]  # fmt: skip
    proc = ok(chatrlhf(*args))
    report = json.loads((out / "eval.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return {"root": root, "out": out, "args": args, "proc": proc, "report": report, "samples": samples,
            "pairs": pairs, "models": {"random": random, "sft": sft_llama}}  # fmt: skip


def test_perplexity_is_the_exp_of_the_mean_response_nll(evaluated):
    records = [to_sft(r) for r in load_source(str(evaluated["pairs"]))]
    for name, path in evaluated["models"].items():
        tok = load_tokenizer(str(path))
        model = load_causal_lm(str(path), tok, "float32", torch.device("cpu")).eval()
        nll, count = 0.0, 0
        for rec in records:
            e = encode_sft(tok, rec, 512, False)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([e.input_ids])).logits[0].double(), -1)
            for t in range(1, len(e.input_ids)):
                if e.loss_mask[t]:
                    nll -= float(logp[t - 1, e.input_ids[t]])
                    count += 1
        got = evaluated["report"]["perplexity"][name]
        assert got["tokens"] == count and got["records"] == len(records)
        assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    ppl = evaluated["report"]["perplexity"]
    assert ppl["sft"]["perplexity"] < ppl["random"]["perplexity"] / 10  # trained vs random


def test_reward_model_accuracy_and_distributions(evaluated):
    rm = evaluated["report"]["reward_model"]
    chosen = [s["chosen"] for s in rm["scores"]]
    rejected = [s["rejected"] for s in rm["scores"]]
    assert rm["pairs"] == len(chosen) == 64
    assert rm["accuracy"]["mean"] == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / 64)
    assert rm["score_gap"]["mean"] == pytest.approx(statistics.fmean(c - r for c, r in zip(chosen, rejected)))
    loss = statistics.fmean(math.log1p(math.exp(-(c - r))) for c, r in zip(chosen, rejected))
    assert rm["loss"] == pytest.approx(loss, rel=1e-5)
    for side, xs in (("chosen", chosen), ("rejected", rejected)):
        d = rm[side]
        assert d["mean"] == pytest.approx(statistics.fmean(xs)) and d["std"] == pytest.approx(statistics.stdev(xs))
        assert d["quantiles"]["0.50"] == pytest.approx(statistics.median(xs))
        assert sum(d["histogram"]["counts"]) == 64 and (d["min"], d["max"]) == (min(xs), max(xs))


def per_prompt(samples: list[dict], model: str, score: str, k: int = 4) -> list[list[float]]:
    """[prompt][sample] scores: samples.jsonl holds each prompt's k samples in a row."""
    values = [s["scores"][model][score] for s in samples]
    return [values[i : i + k] for i in range(0, len(values), k)]


def test_side_by_side_scores_differences_win_rates_and_pass_at_k(evaluated):
    sbs, samples = evaluated["report"]["side_by_side"], evaluated["samples"]
    assert (sbs["prompts"], sbs["samples_per_prompt"]) == (10, 4) and len(samples) == 40
    assert [s["sample"] for s in samples[:4]] == [0, 1, 2, 3]
    extras = {p["prompt"]: p for p in make_prompts(12, seed=3)}
    for s in samples:  # the judge's score is the judge's value for that prompt and response
        fields = {k: v for k, v in extras[s["prompt"]].items() if k != "prompt"}
        for m in ("random", "sft"):
            # float32, as RL scores rollouts
            assert s["scores"][m]["judge"] == pytest.approx(judge(s["prompt"], s[m], **fields), abs=1e-6)
    assert set(sbs["scores"]) == {"reward_model", "judge"}
    for score, r in sbs["scores"].items():
        means = {m: [statistics.fmean(x) for x in per_prompt(samples, m, score)] for m in ("random", "sft")}
        for m in means:
            assert r["models"][m]["mean"] == pytest.approx(statistics.fmean(means[m]))
        (pair,) = r["pairs"]
        assert (pair["a"], pair["b"]) == ("random", "sft")
        diffs = [b - a for a, b in zip(means["random"], means["sft"])]
        assert pair["b_minus_a"]["mean"] == pytest.approx(statistics.fmean(diffs))
        wins = []
        for a, b in zip(per_prompt(samples, "random", score), per_prompt(samples, "sft", score)):
            pairs = list(itertools.product(b, a))
            wins.append(sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in pairs) / len(pairs))
        assert pair["b_win_rate"]["mean"] == pytest.approx(statistics.fmean(wins))
    # the reward model (trained from the SFT model) prefers SFT's answers to random bytes; the judge, which credits
    # only real words, may give both 0 after this short SFT
    assert (
        sbs["scores"]["reward_model"]["models"]["sft"]["mean"]
        > sbs["scores"]["reward_model"]["models"]["random"]["mean"]
    )
    for m in ("random", "sft"):
        got = sbs["pass_at_k"]["judge"][m]
        assert set(got) == {"pass@1", "pass@2", "pass@4"}
        scores = per_prompt(samples, m, "judge")
        share = statistics.fmean(sum(v >= 0.5 for v in x) / 4 for x in scores)
        anyone = statistics.fmean(float(any(v >= 0.5 for v in x)) for x in scores)
        assert got["pass@1"]["mean"] == pytest.approx(share) and got["pass@4"]["mean"] == pytest.approx(anyone)


def test_terminal_table_and_a_self_contained_page(evaluated):
    out = evaluated["proc"].stdout
    assert "side by side: 10 prompts × 4 samples" in out and "win rate of sft over random" in out
    assert "perplexity on the SFT records" in out and "reward model" in out and "pass@4" in out
    page = (evaluated["out"] / "eval.html").read_text()
    assert page.count("data:image/png;base64,") == 2  # the reward-model histogram and the score intervals
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "Side by side" in page and "Perplexity" in page and "pass@k" in page


def test_an_earlier_evaluation_is_not_overwritten_unless_asked(evaluated):
    proc = chatrlhf(*evaluated["args"])
    assert proc.returncode == 2 and "already holds an evaluation" in proc.stderr
    assert "Traceback" not in proc.stderr
