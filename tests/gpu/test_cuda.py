"""GPU checks: every stage on CUDA in bf16, LoRA rollouts on merged weights, and DeepSpeed ZeRO-3 RL with NCCL and
whole-copy generation. Skipped without a CUDA device (CI has none); run them on a GPU machine with
`python -m pytest -q tests/gpu`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from chatrlhf.cli import main  # noqa: E402

TINY = "tiny:llama:hidden=64,layers=2,heads=4"


def lines(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl", encoding="utf-8")]


def finite(rows, key):
    values = [r[key] for r in rows if key in r]
    assert values, f"no {key} logged"
    assert all(v is not None and math.isfinite(v) for v in values), values
    return values


@pytest.fixture(scope="module")
def sft_and_rm(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    common = ["--run.device", "cuda", "--run.dtype", "bfloat16", "--run.progress", "False", "--run.log_every", "1"]
    assert main(["sft", "--model", TINY, "--output_dir", str(root / "sft"), "--data.paths", "demo:pairs:128:1",
                 "--train.max_steps", "6", "--train.optim.lr", "1e-3", *common]) == 0  # fmt: skip
    assert main(["reward", "--model", str(root / "sft" / "model"), "--output_dir", str(root / "rm"),
                 "--data.paths", "demo:pairs:128:2", "--train.max_steps", "6", *common]) == 0  # fmt: skip
    return root, common


def test_sft_and_reward_bf16_on_cuda(sft_and_rm):
    root, _ = sft_and_rm
    from transformers import AutoModelForCausalLM

    finite(lines(root / "sft"), "loss/train")
    finite(lines(root / "rm"), "loss/train")
    model = AutoModelForCausalLM.from_pretrained(root / "sft" / "model")
    assert model.dtype == torch.bfloat16


VARIANTS = {
    "full": [],
    "lora+gc": ["--lora.rank", "8", "--engine.gradient_checkpointing", "True"],
    "offload": ["--engine.offload_frozen", "True"],
}


@pytest.mark.parametrize("extra", list(VARIANTS.values()), ids=list(VARIANTS))
def test_ppo_bf16_on_cuda(sft_and_rm, tmp_path, extra):
    root, common = sft_and_rm
    out = tmp_path / "rl"
    args = ["rl", "--actor", str(root / "sft" / "model"), "--reward_model", str(root / "rm" / "model"),
            "--output_dir", str(out), "--data.paths", "demo:prompts:64:3", "--train.iterations", "3",
            "--train.rollout_batch_size", "8", "--train.generation.max_new_tokens", "16", *common, *extra]  # fmt: skip
    assert main(args) == 0
    rows = lines(out)
    finite(rows, "loss/policy")
    finite(rows, "loss/value")
    peaks = finite(rows, "memory/device_peak_gib")
    assert all(0 < p < torch.cuda.get_device_properties(0).total_memory / 2**30 for p in peaks), peaks
    assert (out / "model" / "config.json").is_file()
    if extra and extra[0] == "--lora.rank":
        assert (out / "model_adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("eager", ["True", "False"], ids=["eager", "cuda-graphs"])
def test_ppo_with_vllm_rollouts_on_cuda(sft_and_rm, tmp_path, eager):
    """The colocated vLLM engine on a GPU (sleep mode, bf16), eager and with CUDA graphs: every sync passes its check
    and the rollouts' log-probs stay near the trainer's."""
    pytest.importorskip("vllm")
    root, common = sft_and_rm
    out = tmp_path / "rl"
    args = ["rl", "--actor", str(root / "sft" / "model"), "--reward_model", str(root / "rm" / "model"),
            "--output_dir", str(out), "--data.paths", "demo:prompts:64:3", "--train.iterations", "3",
            "--train.rollout_batch_size", "8", "--train.generation.max_new_tokens", "16",
            "--train.rollout.backend", "vllm", "--train.rollout.enforce_eager", eager,
            "--train.rollout.sync_tolerance", "5e-2", *common]  # fmt: skip
    assert main(args) == 0
    rows = lines(out)
    finite(rows, "loss/policy")
    assert all(d < 5e-2 for d in finite(rows, "rollout/logprob_diff")), [r["rollout/logprob_diff"] for r in rows]


def test_deepspeed_zero3_rl_nccl(sft_and_rm, tmp_path):
    pytest.importorskip("deepspeed")
    root, common = sft_and_rm
    out = {}
    for gather in ("True", "False"):
        run = tmp_path / f"z3-{gather}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "chatrlhf", "rl",
               "--actor", str(root / "sft" / "model"), "--reward_model", str(root / "rm" / "model"),
               "--output_dir", str(run), "--data.paths", "demo:prompts:64:3", "--train.iterations", "2",
               "--train.rollout_batch_size", "8", "--train.generation.max_new_tokens", "16",
               "--train.generation.do_sample", "False", "--engine.kind", "deepspeed", "--engine.zero_stage", "3",
               "--engine.gather_for_generation", gather, *common]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ})
        assert proc.returncode == 0, proc.stderr[-4000:]
        out[gather] = lines(run)
    # greedy rollouts: the whole copy and the sharded model generate the same responses
    for a, b in zip(out["True"], out["False"]):
        assert a["response/length_mean"] == b["response/length_mean"]
        assert a["reward/score_mean"] == pytest.approx(b["reward/score_mean"], abs=2e-2)
