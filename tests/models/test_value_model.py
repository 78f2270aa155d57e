"""Value models (reward model, critic) in both formats: a sequence-classification model where transformers has one
for the architecture, otherwise the base model plus value_head.safetensors (granite has a causal LM but no
sequence-classification class). Loading, saving, LoRA, and reward model → PPO critic through the CLI."""

from __future__ import annotations

import re

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModel, TrOCRConfig

from chatrlhf.cli import main
from chatrlhf.config import LoRAConfig
from chatrlhf.errors import UserError
from chatrlhf.models.load import (
    BACKBONE,
    SEQUENCE_CLASSIFICATION,
    VALUE_HEAD_FILE,
    add_value_head,
    check_value_model_support,
    load_tokenizer,
    load_value_model,
    save_value_model,
)
from chatrlhf.models.lora import apply_lora, save_trained
from chatrlhf.models.tiny import byte_tokenizer

CPU = torch.device("cpu")
FORMATS = {"llama": SEQUENCE_CLASSIFICATION, "gpt2": SEQUENCE_CLASSIFICATION, "granite": BACKBONE}


def batch(b: int = 2, t: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones(b, t, dtype=torch.long), torch.arange(t).expand(b, t)


def values(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(*inputs)


@pytest.fixture(scope="module")
def reward_models(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("value-models")
    return {arch: add_value_head(tiny_dirs[arch], root / arch, seed=1) for arch in FORMATS}


@pytest.mark.parametrize("arch", sorted(FORMATS))
def test_format_from_the_config_alone(arch, tiny_dirs):
    assert check_value_model_support(str(tiny_dirs[arch])) == FORMATS[arch]
    assert check_value_model_support(f"tiny:{arch}") == FORMATS[arch]


def test_architecture_without_reachable_hidden_states_is_refused(tmp_path):
    """TrOCR's decoder is a causal LM with no base model class and no classifier in transformers."""
    TrOCRConfig(vocab_size=64, d_model=16, decoder_layers=1, decoder_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"model type 'trocr' cannot be a reward model or critic: transformers has "
                       r"neither a sequence-classification class nor a base model"):  # fmt: skip
        check_value_model_support(str(tmp_path))


@pytest.mark.parametrize("arch", sorted(FORMATS))
def test_values_are_the_head_on_the_backbone_hidden_states(arch, reward_models):
    """V(s_t) = w·h_t, with h_t from the backbone run on its own (an independent forward)."""
    path = reward_models[arch]
    model = load_value_model(str(path), load_tokenizer(str(path)), "float32", CPU)
    assert model.format == FORMATS[arch]
    ids, mask, pos = batch()
    with torch.no_grad():
        hidden = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = hidden @ model.head.weight[0]
    torch.testing.assert_close(values(model, (ids, mask, pos)), expected, rtol=0, atol=1e-6)


def test_backbone_format_directory(reward_models):
    """The base model as a plain transformers directory, and the head beside it."""
    path = reward_models["granite"]
    assert (path / VALUE_HEAD_FILE).is_file()
    assert AutoModel.from_pretrained(path).config.architectures == ["GraniteModel"]
    head = load_file(path / VALUE_HEAD_FILE)
    assert set(head) == {"weight"} and head["weight"].shape == (1, 32)


@pytest.mark.parametrize("arch", sorted(FORMATS))
def test_save_and_load_back(arch, reward_models, tmp_path):
    path = reward_models[arch]
    tok = load_tokenizer(str(path))
    model = load_value_model(str(path), tok, "float32", CPU)
    with torch.no_grad():
        model.head.weight.mul_(3.0)
    save_value_model(model, tok, tmp_path / "saved")
    again = load_value_model(str(tmp_path / "saved"), tok, "float32", CPU)
    inputs = batch()
    torch.testing.assert_close(values(again, inputs), values(model, inputs), rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", sorted(FORMATS))
def test_save_from_a_gathered_state_dict(arch, reward_models, tmp_path):
    """`state_dict` (keys of ValueModel.state_dict(), as a sharded engine gathers them) replaces the live tensors."""
    path = reward_models[arch]
    tok = load_tokenizer(str(path))
    model = load_value_model(str(path), tok, "float32", CPU)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for key in state:
        if key == "head.weight" or (key.startswith("model.") and model.head_in_model and key.endswith("score.weight")):
            state[key] = torch.full_like(state[key], 0.5)
    save_value_model(model, tok, tmp_path / "saved", state_dict=state)
    again = load_value_model(str(tmp_path / "saved"), tok, "float32", CPU)
    assert torch.equal(again.head.weight, torch.full_like(again.head.weight, 0.5))


def test_lora_on_the_backbone_format(reward_models, tmp_path):
    """Adapters on the base model, the head trained in full; saved merged (the format's directory) and as an adapter
    that PEFT loads onto the base model, with the head beside it."""
    path = reward_models["granite"]
    tok = byte_tokenizer()
    model = apply_lora(load_value_model(str(path), tok, "float32", CPU), LoRAConfig(rank=4, target_modules=["q_proj"]))
    assert model.head.weight.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight"} | {n for n in trainable if "lora_" in n} and len(trainable) > 1
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
        model.head.weight.mul_(3.0)
    inputs = batch()
    expected = values(model, inputs)
    save_trained(model, tok, tmp_path, name="critic")
    assert {VALUE_HEAD_FILE, "config.json"} <= {p.name for p in (tmp_path / "critic").iterdir()}
    merged = load_value_model(str(tmp_path / "critic"), tok, "float32", CPU)
    torch.testing.assert_close(values(merged, inputs), expected, rtol=0, atol=1e-5)

    adapter = tmp_path / "critic_adapter"
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(path), adapter).eval()
    head = load_file(adapter / VALUE_HEAD_FILE)["weight"][0]
    with torch.no_grad():
        hidden = peft_model(input_ids=inputs[0], attention_mask=inputs[1]).last_hidden_state
    torch.testing.assert_close(hidden @ head, expected, rtol=0, atol=1e-5)


def test_reward_model_and_ppo_critic_through_the_cli(tiny_dirs, pairs_file, tmp_path, capsys):
    """granite: `chatrlhf reward` trains a backbone+head reward model from the causal LM, and `chatrlhf rl` (PPO) uses
    it as reward model and critic, saving the critic in the same format."""
    quiet = ["--run.progress", "False"]
    reward = ["reward", "--model", str(tiny_dirs["granite"]), "--data.paths", str(pairs_file), "--output_dir"]
    reward += [str(tmp_path / "rm"), "--train.max_steps", "2", "--train.max_seq_len", "128", *quiet]
    assert main(reward) == 0
    assert re.search(
        r"note: '.*granite' has no trained value head; the reward model's scalar head starts", capsys.readouterr().out
    )
    rm = tmp_path / "rm" / "model"
    assert (rm / VALUE_HEAD_FILE).is_file()
    short = ["--train.iterations", "1", "--train.rollout_batch_size", "4", "--train.generation.max_new_tokens", "4"]
    rl = ["rl", "--actor", str(tiny_dirs["granite"]), "--reward_model", str(rm), "--data.paths", str(pairs_file)]
    rl += ["--output_dir", str(tmp_path / "rl"), *short, "--train.max_prompt_len", "64", "--data.eval_fraction", "0"]
    assert main([*rl, *quiet]) == 0
    critic = tmp_path / "rl" / "critic"
    assert (critic / VALUE_HEAD_FILE).is_file()
    before = load_file(rm / VALUE_HEAD_FILE)["weight"]
    assert not torch.equal(load_file(critic / VALUE_HEAD_FILE)["weight"], before), "PPO trained the critic's head"
    load_value_model(str(critic), load_tokenizer(str(critic)), "float32", CPU, role="critic")
