"""LoRA via PEFT: which parameters train, the update (α/r)·B·A by hand, merge/unmerge, and save round-trips."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from chatrlhf.config import LoRAConfig
from chatrlhf.models.load import ValueModel
from chatrlhf.models.lora import AdapterFree, apply_lora, is_lora, merged, save_trained
from chatrlhf.models.tiny import byte_tokenizer

ARCHS = ("llama", "gpt2")
LAYERS = 2  # the `tiny_dirs` fixture builds 2-layer models
RANK, ALPHA = 4, 8.0
# PEFT's default targets: LLaMA's attention q/v projections, GPT-2's fused qkv Conv1D.
DEFAULT_TARGETS = {
    "llama": [f"model.layers.{i}.self_attn.{m}" for i in range(LAYERS) for m in ("q_proj", "v_proj")],
    "gpt2": [f"transformer.h.{i}.attn.c_attn" for i in range(LAYERS)],
}
# Every linear layer but the output (tied LM head) / classification head.
ALL_LINEAR_TARGETS = {
    "llama": [
        f"model.layers.{i}.{m}"
        for i in range(LAYERS)
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ],
    "gpt2": [
        f"transformer.h.{i}.{m}"
        for i in range(LAYERS)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ],
}


def lora_cfg(**kw) -> LoRAConfig:
    return LoRAConfig(rank=kw.pop("rank", RANK), alpha=kw.pop("alpha", ALPHA), **kw)


def causal_lm(path) -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def value_model(path) -> ValueModel:
    torch.manual_seed(0)  # the head is freshly initialised by transformers
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    return ValueModel(model).eval()


def batch(seed: int = 0, b: int = 2, t: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": torch.arange(t).expand(b, t)}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, ValueModel):
            return model(**inputs)
        return model(**inputs, use_cache=False).logits


def adapter_names(targets: list[str]) -> set[str]:
    return {f"{t}.lora_{ab}.default.weight" for t in targets for ab in "AB"}


def randomize_adapters(model, seed: int = 1) -> None:
    """B = 0 at init makes the update vanish; give every adapter random values so it shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def frozen_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("arch", ARCHS)
def test_trainable_parameters_are_exactly_the_adapters(tiny_dirs, arch):
    model = apply_lora(causal_lm(tiny_dirs[arch]), lora_cfg())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == adapter_names(DEFAULT_TARGETS[arch])
    a = model.get_submodule(DEFAULT_TARGETS[arch][0]).lora_A["default"].weight
    assert a.shape[0] == RANK
    assert is_lora(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_value_model_trains_adapters_and_the_head(tiny_dirs, arch):
    vm = value_model(tiny_dirs[arch])
    backbone, head = vm.backbone, vm.head
    assert apply_lora(vm, lora_cfg(target_modules=["all-linear"])) is vm
    assert vm.backbone is backbone and vm.head is head
    trainable = {n for n, p in vm.model.named_parameters() if p.requires_grad}
    assert trainable == adapter_names(ALL_LINEAR_TARGETS[arch]) | {"score.weight"}
    assert isinstance(vm.model.score, torch.nn.Linear), "the head is trained in full, not adapted"


def test_target_modules_and_dropout_are_passed_on(tiny_dirs):
    model = apply_lora(causal_lm(tiny_dirs["llama"]), lora_cfg(target_modules=["k_proj", "o_proj"], dropout=0.25))
    targets = [f"model.layers.{i}.self_attn.{m}" for i in range(LAYERS) for m in ("k_proj", "o_proj")]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == adapter_names(targets)
    assert model.get_submodule(targets[0]).lora_dropout["default"].p == 0.25
    all_linear = apply_lora(causal_lm(tiny_dirs["llama"]), lora_cfg(target_modules=["all-linear"]))
    trainable = {n for n, p in all_linear.named_parameters() if p.requires_grad}
    assert trainable == adapter_names(ALL_LINEAR_TARGETS["llama"])


def test_bad_target_modules_fail(tiny_dirs):
    with pytest.raises(ValueError, match="all-linear"):
        apply_lora(causal_lm(tiny_dirs["llama"]), lora_cfg(target_modules=["all-linear", "q_proj"]))
    with pytest.raises(ValueError):
        apply_lora(causal_lm(tiny_dirs["llama"]), lora_cfg(target_modules=["no_such_layer"]))
    model = apply_lora(causal_lm(tiny_dirs["llama"]), lora_cfg())
    with pytest.raises(ValueError, match="twice"):
        apply_lora(model, lora_cfg())


@pytest.mark.parametrize("arch", ARCHS)
def test_rank_zero_is_a_no_op(tiny_dirs, arch, tmp_path):
    model = causal_lm(tiny_dirs[arch])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert apply_lora(model, LoRAConfig(rank=0)) is model
    assert not is_lora(model)
    assert all(p.requires_grad for p in model.parameters())
    assert {n for n, _ in model.named_parameters()} == set(before)
    with merged(model):
        pass
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    save_trained(model, byte_tokenizer(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert not any("lora" in k for k in load_file(tmp_path / "model" / "model.safetensors"))


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_starts_as_the_base_model(tiny_dirs, arch):
    inputs = batch()
    base = logits(causal_lm(tiny_dirs[arch]), inputs)
    model = apply_lora(causal_lm(tiny_dirs[arch]), lora_cfg())
    torch.testing.assert_close(logits(model, inputs), base, rtol=0, atol=1e-6)
    vm_base = logits(value_model(tiny_dirs[arch]), inputs)
    vm = apply_lora(value_model(tiny_dirs[arch]), lora_cfg())
    torch.testing.assert_close(logits(vm, inputs), vm_base, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_model_without_its_adapters_is_the_base_model(tiny_dirs, arch):
    """`AdapterFree` of a model whose adapters have moved computes exactly the base model's logits (the reference it
    stands for), while the model itself still computes the adapted ones; afterwards the adapters are enabled and
    trainable again, and nothing else is."""
    inputs = batch()
    base = logits(causal_lm(tiny_dirs[arch]), inputs)
    model = apply_lora(causal_lm(tiny_dirs[arch]), lora_cfg())
    randomize_adapters(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapted = logits(model, inputs)
    assert not torch.allclose(adapted, base, atol=1e-3)
    reference = AdapterFree(model)
    torch.testing.assert_close(reference(**inputs).logits, base, rtol=0, atol=0)
    assert reference.config is model.config
    torch.testing.assert_close(logits(model, inputs), adapted, rtol=0, atol=0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    with pytest.raises(ValueError, match="no LoRA adapters"):
        AdapterFree(causal_lm(tiny_dirs[arch]))


@pytest.mark.parametrize("arch", ARCHS)
def test_adapted_layer_computes_w_plus_scaled_ba(tiny_dirs, arch):
    """h = W·x + (α/r)·B·A·x (Hu et al. 2021, eq. 3), computed by hand for one layer; GPT-2's Conv1D stores W as
    (d_in, d_out), so its effective weight is W + (α/r)·(B·A)ᵀ."""
    model = apply_lora(causal_lm(tiny_dirs[arch]), lora_cfg())
    randomize_adapters(model)
    layer = model.get_submodule(DEFAULT_TARGETS[arch][0])
    w = layer.base_layer.weight.detach().clone()
    bias = layer.base_layer.bias
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    delta = (ALPHA / RANK) * (b @ a)  # (d_out, d_in)
    x = torch.randn(3, a.shape[1])
    if arch == "gpt2":
        expected_w = w + delta.T
        expected = x @ expected_w + bias
    else:
        expected_w = w + delta
        expected = x @ expected_w.T
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
        with merged(model):
            torch.testing.assert_close(layer.base_layer.weight, expected_w, rtol=0, atol=1e-6)
    assert torch.equal(layer.base_layer.weight, w)


@pytest.mark.parametrize("arch", ARCHS)
def test_optimizer_step_moves_only_the_adapters(tiny_dirs, arch):
    model = apply_lora(causal_lm(tiny_dirs[arch]), lora_cfg())
    model.train()
    inputs = batch()
    before_logits = logits(model, inputs)
    frozen = frozen_state(model)
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # the first step moves only B (A gets no gradient while B = 0)
        out = model(**inputs, use_cache=False, logits_to_keep=4)
        assert out.logits.shape[1] == 4
        out.logits.logsumexp(-1).mean().backward()
        optim.step()
        optim.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert all(not torch.equal(p, adapters[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert not torch.allclose(logits(model.eval(), inputs), before_logits, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_value_model_step_moves_adapters_and_head_only(tiny_dirs, arch):
    vm = apply_lora(value_model(tiny_dirs[arch]), lora_cfg())
    inputs = batch()
    frozen = frozen_state(vm)
    head = vm.head.weight.detach().clone()
    optim = torch.optim.SGD([p for p in vm.parameters() if p.requires_grad], lr=0.1)
    vm.train()
    vm(**inputs).pow(2).mean().backward()
    optim.step()
    assert all(torch.equal(p, frozen[n]) for n, p in vm.named_parameters() if not p.requires_grad)
    assert not torch.equal(vm.head.weight, head)


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_matches_unmerged_and_restores_weights(tiny_dirs, arch):
    model = apply_lora(causal_lm(tiny_dirs[arch]), lora_cfg(target_modules=["all-linear"]))
    randomize_adapters(model)
    inputs = batch()
    unmerged_logits = logits(model, inputs)
    frozen = frozen_state(model)
    prompt = inputs["input_ids"][:, :3]
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=256, eos_token_id=258)
    with torch.no_grad():
        unmerged_tokens = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **gen)
    with merged(model) as m:
        assert m is model
        assert all(layer.merged for layer in model.modules() if hasattr(layer, "lora_A"))
        torch.testing.assert_close(logits(model, inputs), unmerged_logits, rtol=0, atol=1e-5)
        with torch.no_grad():
            merged_tokens = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **gen)
    assert torch.equal(merged_tokens, unmerged_tokens)
    assert not any(layer.merged for layer in model.modules() if hasattr(layer, "lora_A"))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert torch.equal(logits(model, inputs), unmerged_logits)


def test_merged_restores_weights_on_exception(tiny_dirs):
    model = apply_lora(causal_lm(tiny_dirs["llama"]), lora_cfg())
    randomize_adapters(model)
    frozen = frozen_state(model)
    with pytest.raises(KeyError), merged(model):
        raise KeyError("boom")
    assert not any(layer.merged for layer in model.modules() if hasattr(layer, "lora_A"))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_merged_restores_bfloat16_weights_exactly(tiny_dirs):
    """Subtracting B·A again would not give W back in bfloat16; the saved copy does."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], dtype=torch.bfloat16)
    apply_lora(model, lora_cfg())
    assert model.get_submodule(DEFAULT_TARGETS["llama"][0]).lora_A["default"].weight.dtype == torch.float32
    randomize_adapters(model)
    frozen = frozen_state(model)
    for _ in range(3):
        with merged(model):
            pass
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_trained_causal_lm_round_trips(tiny_dirs, arch, tmp_path):
    model = apply_lora(causal_lm(tiny_dirs[arch]), lora_cfg())
    randomize_adapters(model)
    inputs = batch()
    expected = logits(model, inputs)
    frozen = frozen_state(model)
    save_trained(model, byte_tokenizer(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model_adapter"]

    # The live model is untouched: adapters in place, unmerged, base weights exact.
    assert is_lora(model) and not any(layer.merged for layer in model.modules() if hasattr(layer, "lora_A"))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert torch.equal(logits(model, inputs), expected)

    weights = load_file(tmp_path / "model" / "model.safetensors")
    assert not any("lora" in k or "base_layer" in k for k in weights)
    plain = causal_lm(tmp_path / "model")
    torch.testing.assert_close(logits(plain, inputs), expected, rtol=0, atol=1e-5)

    adapter = tmp_path / "model_adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == RANK
    assert len(load_file(adapter / "adapter_model.safetensors")) == 2 * len(DEFAULT_TARGETS[arch])
    peft_model = PeftModel.from_pretrained(causal_lm(tiny_dirs[arch]), adapter).eval()
    torch.testing.assert_close(logits(peft_model, inputs), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_trained_value_model_round_trips(tiny_dirs, arch, tmp_path):
    vm = apply_lora(value_model(tiny_dirs[arch]), lora_cfg(target_modules=["all-linear"]))
    randomize_adapters(vm)
    with torch.no_grad():
        vm.head.weight.mul_(3.0)  # a trained head, different from any fresh init
    inputs = batch()
    expected = logits(vm, inputs)
    save_trained(vm, byte_tokenizer(), tmp_path, name="critic")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["critic", "critic_adapter"]
    assert torch.equal(logits(vm, inputs), expected)

    plain = ValueModel(AutoModelForSequenceClassification.from_pretrained(tmp_path / "critic", dtype=torch.float32))
    torch.testing.assert_close(logits(plain.eval(), inputs), expected, rtol=0, atol=1e-5)

    # PEFT's sequence classifier scores the last non-pad token; our inputs have no padding.
    base = AutoModelForSequenceClassification.from_pretrained(tiny_dirs[arch], num_labels=1, dtype=torch.float32)
    base.config.pad_token_id = 256
    peft_model = PeftModel.from_pretrained(base, tmp_path / "critic_adapter").eval()
    with torch.no_grad():
        scores = peft_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(scores.squeeze(-1), expected[:, -1], rtol=0, atol=1e-5)


def test_prints_trainable_and_total_counts(tiny_dirs, capsys):
    model = causal_lm(tiny_dirs["llama"])
    total = sum(p.numel() for p in model.parameters())
    apply_lora(model, lora_cfg())
    # q_proj and v_proj are 32 → 32 in the hidden-32 model: r·(d_in + d_out) numbers per adapter, 2 per layer.
    trainable = LAYERS * 2 * RANK * (32 + 32)
    assert f"trainable {trainable:,} / {total + trainable:,} parameters" in capsys.readouterr().out


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_reaches_the_adapters(tiny_dirs, reentrant):
    """With frozen embeddings, reentrant checkpointing drops the adapters' gradients unless the embedding output
    requires grad; transformers turns that on in `gradient_checkpointing_enable`. Same gradients either way."""
    inputs = batch()

    def adapter_grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = apply_lora(causal_lm(tiny_dirs["llama"]), lora_cfg())
        randomize_adapters(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model(**inputs, use_cache=False).logits.logsumexp(-1).mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = adapter_grads(False), adapter_grads(True)
    assert all(g is not None for g in checkpointed.values())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=1e-6)
