"""LoRA, gradient checkpointing and offloaded frozen models through the stage drivers (single process, CPU).

Gradient checkpointing recomputes the same activations, so on a dropout-free model the per-step losses equal the
run without it; LoRA trains adapters only and writes merged weights plus the adapter; offloading the frozen
models (a no-op move on a CPU-only machine, but the same code path) changes nothing in the numbers.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from chatrlhf.cli import main

QUIET = ["--run.progress", "False", "--run.log_every", "1", "--data.eval_fraction", "0"]


def rows(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def numbers(out, keys) -> list[tuple]:
    return [tuple(r[k] for k in keys) for r in rows(out) if keys[0] in r]


def sft(tiny_dirs, pairs_file, out, *extra) -> int:
    args = ["sft", "--model", str(tiny_dirs["llama"]), "--output_dir", str(out), "--data.paths", str(pairs_file),
            "--train.max_steps", "3", "--train.batch_size", "8", *QUIET, *extra]  # fmt: skip
    return main(args)


def test_gradient_checkpointing_gives_the_same_losses(tiny_dirs, pairs_file, tmp_path):
    assert sft(tiny_dirs, pairs_file, tmp_path / "plain") == 0
    assert sft(tiny_dirs, pairs_file, tmp_path / "gc", "--engine.gradient_checkpointing", "True") == 0
    keys = ("loss/train", "optim/grad_norm")
    plain, gc = numbers(tmp_path / "plain", keys), numbers(tmp_path / "gc", keys)
    assert len(plain) == 3
    for a, b in zip(plain, gc):
        assert all(abs(x - y) <= 1e-6 * abs(x) for x, y in zip(a, b)), (a, b)


def test_lora_sft_trains_adapters_and_saves_merged_weights(tiny_dirs, pairs_file, tmp_path):
    out = tmp_path / "lora"
    assert sft(tiny_dirs, pairs_file, out, "--lora.rank", "4", "--train.optim.lr", "1e-2") == 0
    assert (out / "model_adapter" / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    adapted = json.loads((out / "model_adapter" / "adapter_config.json").read_text())["target_modules"]
    changed = {n for n, p in merged.state_dict().items() if not torch.equal(p, base.state_dict()[n])}
    # only the adapted projections moved; embeddings, norms and the MLP are the base model's
    assert changed and all(any(t in n for t in adapted) for n in changed)
    adapter = load_file(out / "model_adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)


def test_lora_ppo_with_offloaded_frozen_models(tiny_dirs, pairs_file, tmp_path):
    rm = tmp_path / "rm"
    assert main(["reward", "--model", str(tiny_dirs["llama"]), "--output_dir", str(rm), "--data.paths",
                 str(pairs_file), "--train.max_steps", "2", *QUIET]) == 0  # fmt: skip
    common = ["rl", "--actor", str(tiny_dirs["llama"]), "--reward_model", str(rm / "model"),
              "--data.paths", str(pairs_file), "--train.iterations", "2", "--train.rollout_batch_size", "4",
              "--train.generation.max_new_tokens", "8", *QUIET]  # fmt: skip
    assert main([*common, "--output_dir", str(tmp_path / "plain")]) == 0
    assert main([*common, "--output_dir", str(tmp_path / "offload"), "--engine.offload_frozen", "True"]) == 0
    keys = ("reward/score_mean", "loss/policy", "loss/value", "kl/mean")
    assert numbers(tmp_path / "plain", keys) == numbers(tmp_path / "offload", keys)

    out = tmp_path / "lora"
    assert main([*common, "--output_dir", str(out), "--lora.rank", "4", "--engine.gradient_checkpointing", "True"]) == 0
    for name in ("model", "critic"):
        assert (out / f"{name}_adapter" / "adapter_config.json").is_file()
    AutoModelForCausalLM.from_pretrained(out / "model")
    critic = AutoModelForSequenceClassification.from_pretrained(out / "critic")
    assert critic.config.num_labels == 1
    assert all(r["loss/policy"] is not None for r in rows(out))


def test_lora_rl_and_dpo_score_the_reference_with_the_adapters_disabled(tiny_dirs, pairs_file, tmp_path, monkeypatch):
    """With LoRA and no `reference`, RL's π_ref and DPO's reference are the trained model without its adapters
    (its starting weights): no second model is loaded, and every logged number is exactly that of the run given
    the same starting weights as a separate reference model (`--reference` = the model itself)."""
    import chatrlhf.train.dpo as dpo_module
    import chatrlhf.train.rl_models as rl_models

    loads = []
    for module in (rl_models, dpo_module):

        def counted(path, *args, _load=module.load_causal_lm, **kwargs):
            loads.append(path)
            return _load(path, *args, **kwargs)

        monkeypatch.setattr(module, "load_causal_lm", counted)
    model = str(tiny_dirs["llama"])
    rl = ["rl", "--actor", model, "--reward_functions", "tests.train.test_rl_algorithms:text_reward",
          "--data.paths", str(pairs_file), "--train.algo", "grpo", "--train.group_size", "2",
          "--train.iterations", "2", "--train.rollout_batch_size", "4", "--train.generation.max_new_tokens", "8",
          "--train.actor_optim.lr", "1e-2", "--lora.rank", "4", "--engine.offload_frozen", "True", *QUIET]  # fmt: skip
    dpo = ["dpo", "--model", model, "--data.paths", str(pairs_file), "--train.max_steps", "2",
           "--train.optim.lr", "1e-2", "--lora.rank", "4", *QUIET]  # fmt: skip
    logged = {"rl": ("kl/mean", "loss/policy", "reward/total_mean", "optim/actor_grad_norm"),
              "dpo": ("rewards/margin", "loss/train", "rewards/chosen", "optim/grad_norm")}  # fmt: skip
    for stage, args in (("rl", rl), ("dpo", dpo)):
        keys = logged[stage]
        loads.clear()
        assert main([*args, "--output_dir", str(tmp_path / stage)]) == 0
        assert loads == [model], f"{stage}: loaded {loads}"  # the trained model only
        assert main([*args, "--output_dir", str(tmp_path / f"{stage}-copy"), "--reference", model]) == 0
        shared, copy = numbers(tmp_path / stage, keys), numbers(tmp_path / f"{stage}-copy", keys)
        assert len(shared) == 2 and shared == copy, (stage, shared, copy)
        assert any(v != 0 for row in shared for v in row[:1])  # the reference is used: KL / rewards move off 0
