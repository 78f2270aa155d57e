"""The DPO stage: sequence log-probs, a tiny-model run, the CLI, config errors and the DPO pipeline."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatrlhf.config import (
    DataConfig,
    DPOConfig,
    DPOTrainConfig,
    OptimConfig,
    PipelineConfig,
    PipelineDataConfig,
    RunConfig,
)
from chatrlhf.data.collate import collate_sft, encode_pair_responses
from chatrlhf.data.records import to_pair
from chatrlhf.data.sources import RawRecord
from chatrlhf.errors import ConfigError
from chatrlhf.models.tiny import TINY_ARCHS
from chatrlhf.rlhf import dpo_loss
from chatrlhf.train.dpo import pair_loss, run_dpo
from chatrlhf.train.forward import sequence_logprobs

ROOT = Path(__file__).resolve().parents[2]


def manual_sequence_logprob(model, ids: list[int], n_prompt: int) -> float:
    """Σ log π of the tokens after the prompt, from one unpadded sequence, by a plain loop over positions."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return sum(float(logits[t - 1, ids[t]] - torch.logsumexp(logits[t - 1], 0)) for t in range(n_prompt, len(ids)))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_sequence_logprobs_match_a_loop_and_ignore_padding(arch, tiny_dirs):
    path = tiny_dirs[arch]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    rec = to_pair(
        RawRecord(
            data={"prompt": "Name 2 words", "chosen": "sun sea", "rejected": "a longer no"}, source="m", where="1"
        )
    )
    chosen, rejected = encode_pair_responses(tok, rec, max_len=128)
    n_prompt = chosen.loss_mask.index(1)
    expected = [manual_sequence_logprob(model, e.input_ids, n_prompt) for e in (chosen, rejected)]
    with torch.no_grad():
        batched = sequence_logprobs(model, *collate_sft([chosen, rejected], tok.pad_token_id))
        alone = sequence_logprobs(model, *collate_sft([chosen], tok.pad_token_id))
    torch.testing.assert_close(batched.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(alone[0], batched[0], atol=1e-5, rtol=0)


def test_accumulated_micro_batches_give_the_big_batch_gradient(tiny_dirs, pairs_file):
    """Micro-batch means weighted by |b|/N and summed (as the driver does) = the mean over all N pairs."""
    path = tiny_dirs["llama"]
    tok = AutoTokenizer.from_pretrained(path)
    policy = AutoModelForCausalLM.from_pretrained(path).eval()
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():  # move the policy off the reference so the loss has a non-trivial gradient
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    raws = [json.loads(line) for line in pairs_file.read_text().splitlines()[:6]]
    pairs = [
        encode_pair_responses(tok, to_pair(RawRecord(data=r, source="m", where=str(i))), 96) for i, r in enumerate(raws)
    ]
    loss_fn = functools.partial(dpo_loss, beta=0.1)

    def grads(groups):
        policy.zero_grad()
        for b in groups:
            (pair_loss(policy, reference, b, loss_fn, tok.pad_token_id, "cpu")[0] * len(b) / len(pairs)).backward()
        return torch.cat([p.grad.flatten() for p in policy.parameters()])

    torch.testing.assert_close(grads([pairs[:4], pairs[4:]]), grads([pairs]), atol=1e-6, rtol=0)


def dpo_config(model: Path, data: Path, out: Path, **train) -> DPOConfig:
    return DPOConfig(
        model=str(model),
        output_dir=str(out),
        data=DataConfig(paths=[str(data)], eval_fraction=0.1),
        train=DPOTrainConfig(batch_size=8, max_seq_len=96, **train),
        run=RunConfig(progress=False, log_every=1),
    )


def lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_stage_outputs_and_first_step(tmp_path, tiny_dirs, pairs_file):
    """At step 1 the policy is the reference: implicit rewards 0 and loss log 2. Outputs load in transformers."""
    out = tmp_path / "dpo"
    summary = run_dpo(dpo_config(tiny_dirs["llama"], pairs_file, out, max_steps=3, optim=OptimConfig(lr=1e-3)))
    first = lines(out)[0]
    assert first["step"] == 1 and first["loss/train"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
        assert first[key] == 0.0
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0
    assert first["optim/grad_norm"] > 0 and first["optim/lr"] == pytest.approx(1e-3)
    assert [m["step"] for m in lines(out) if "loss/train" in m] == [1, 2, 3]
    assert summary["steps"] == 3 and summary["eval_pairs"] == 10 and summary["train_pairs"] == 86
    assert 0.0 <= summary["eval/rewards/accuracy"] <= 1.0
    assert summary["eval/rewards/margin"] == pytest.approx(
        summary["eval/rewards/chosen"] - summary["eval/rewards/rejected"], abs=1e-6
    )
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (out / "config.yaml").is_file()
    tok = AutoTokenizer.from_pretrained(out / "model")
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.generate(**tok(["User: hi"], return_tensors="pt"), max_new_tokens=2, do_sample=False).shape[1] >= 9


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_a_high_lr_separates_the_training_pairs(tmp_path, tiny_dirs, pairs_file, loss_type):
    """A few full-batch steps on 16 pairs: the implicit reward ranks chosen above rejected on them."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(pairs_file.read_text().splitlines(keepends=True)[:16]))
    cfg = dpo_config(tiny_dirs["gpt2"], data, tmp_path / "dpo", epochs=8, loss_type=loss_type)
    cfg.data.eval_fraction = 0.0
    cfg.train.batch_size = 16
    cfg.train.optim = OptimConfig(lr=3e-3, schedule="constant")
    run_dpo(cfg)
    trained = [m for m in lines(tmp_path / "dpo") if "loss/train" in m]
    assert trained[0]["rewards/accuracy"] == 0.0  # every pair ties at the start
    assert trained[-1]["rewards/accuracy"] >= 0.9 and trained[-1]["rewards/margin"] > 0
    assert trained[-1]["loss/train"] < trained[0]["loss/train"]


def test_config_conflicts_are_named():
    with pytest.raises(ConfigError, match="sigmoid loss only"):
        DPOTrainConfig(loss_type="ipo", label_smoothing=0.1).validate()
    with pytest.raises(ConfigError, match="train.beta must be > 0"):
        DPOConfig(model="m", data=DataConfig(paths=["p"]), train=DPOTrainConfig(beta=0)).validate()
    with pytest.raises(ConfigError, match="dpo.loss_type"):
        PipelineConfig(
            model="m", method="dpo", data=PipelineDataConfig(paths=["p"]), dpo=DPOTrainConfig(loss_type="x")
        ).validate()
    pipeline = PipelineConfig(model="m", method="dpo", reward_base="r")
    pipeline.data.paths = ["p"]
    with pytest.raises(ConfigError, match="reward_base is set but method is dpo"):
        pipeline.validate()
    pipeline.reward_base, pipeline.data.rl_paths = None, ["prompts.jsonl"]
    with pytest.raises(ConfigError, match="data.rl_paths is set but method is dpo"):
        pipeline.validate()
    pipeline.data.paths, pipeline.data.rl_paths = [], []
    pipeline.data.sft_paths, pipeline.data.reward_paths = ["s"], ["r"]
    pipeline.validate()  # SFT and DPO sources of their own: no pool needed


# ---------------------------------------------------------------- through the real command line


def chatrlhf(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "chatrlhf.cli", *args], capture_output=True, text=True, cwd=ROOT, env=env
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def test_cli_dpo_smoke(tmp_path, tiny_dirs, pairs_file):
    out = tmp_path / "dpo"
    args = ["--data.paths", str(pairs_file), "--train.max_steps", "2", "--train.max_seq_len", "96"]
    ok(chatrlhf("dpo", "--model", str(tiny_dirs["gpt2"]), "--output_dir", str(out), *args, "--run.progress", "False"))
    assert (out / "model" / "model.safetensors").is_file() and (out / "config.yaml").is_file()
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert lines(out)[-1]["eval/loss"] > 0
    help_text = ok(chatrlhf("dpo", "--help")).stdout
    assert "--train.beta" in help_text and "--train.loss_type" in help_text and "implicit KL" in help_text
    bad = chatrlhf("dpo", "--model", "m", "--data.paths", "p", "--train.label_smoothing", "0.6")
    assert bad.returncode == 2 and "label_smoothing must be in [0, 0.5)" in bad.stderr


def test_pipeline_dpo_on_a_reduced_demo_budget(tmp_path):
    """The DPO demo recipe end to end on a budget of seconds: SFT → DPO → judge-only comparison."""
    run = tmp_path / "demo-dpo"
    budget = ["--data.paths", "demo:pairs:600:0", "--model", "tiny:llama:hidden=32,layers=2,heads=4"]
    budget += ["--sft.epochs", "1", "--dpo.epochs", "1", "--rl.generation.max_new_tokens", "12"]
    budget += ["--eval.num_prompts", "8", "--eval.samples_per_prompt", "2", "--run.progress", "False"]
    proc = ok(chatrlhf("pipeline", "--recipe", "recipes/demo-dpo.yaml", "--run_dir", str(run), *budget))
    assert "DPO − SFT (paired)" in proc.stdout and "DPO implicit reward held-out accuracy" in proc.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "dpo"
    c = summary["comparison"]
    assert "reward_model" not in c and c["prompts"] == 8 and c["samples_per_prompt"] == 2
    judge = c["judge"]
    assert judge["sft"]["n"] == judge["rlhf"]["n"] == 8
    assert judge["rlhf_minus_sft"]["mean"] == pytest.approx(judge["rlhf"]["mean"] - judge["sft"]["mean"], abs=1e-9)
    assert 0.0 <= summary["dpo"]["eval/rewards/accuracy"] <= 1.0 and summary["dpo"]["steps"] > 0
    assert "reward_model" not in summary and "rl" not in summary
    assert set(summary["time_s"]) == {"sft", "dpo", "eval"}
    assert (run / "dpo" / "model" / "config.json").is_file()
    assert not (run / "reward").exists() and not (run / "rl").exists()
