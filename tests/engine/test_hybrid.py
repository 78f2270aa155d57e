"""The hybrid engine: generation mode is scoped and restores the training state exactly; the hf generator uses
our sampling settings only."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatrlhf.config import GenerationConfig, OptimConfig
from chatrlhf.engine.generation import HFGenerator
from chatrlhf.engine.hybrid import HybridEngine
from chatrlhf.engine.single import SingleEngine


@pytest.fixture()
def actor(tiny_dirs):
    path = tiny_dirs["llama"]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.config.attention_dropout = 0.0
    engine = SingleEngine(model, OptimConfig(lr=1e-3), total_steps=10)
    return HybridEngine(engine, tok, GenerationConfig(max_new_tokens=6)), tok


def state(model):
    return {
        "training": {n: m.training for n, m in model.named_modules()},
        "grad": torch.is_grad_enabled(),
        "use_cache": model.config.use_cache,
        "generation_config": model.generation_config,
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
    }


def assert_same(a, b):
    assert a["training"] == b["training"]
    assert a["grad"] == b["grad"] and a["use_cache"] == b["use_cache"]
    assert a["generation_config"] is b["generation_config"]
    assert a["requires_grad"] == b["requires_grad"]
    assert all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"])


def test_generation_mode_switches_and_restores(actor):
    hybrid, tok = actor
    model = hybrid.model
    model.train()
    model.config.use_cache = False
    model.model.layers[0].eval()  # a mixed train/eval state must come back exactly as it was
    before = state(model)
    with hybrid.generation_mode():
        assert not model.training and not any(m.training for m in model.modules())
        assert not torch.is_grad_enabled() and model.config.use_cache
        out = hybrid.generate([[72, 105], [65, 66, 67]])
        assert out.tokens.shape[0] == 2 and 1 <= out.tokens.shape[1] <= 6 and not out.tokens.requires_grad
        assert out.mask.shape == out.tokens.shape and out.logprobs is None and len(out.finish_reasons) == 2
    assert_same(before, state(model))


def test_state_restored_when_generation_raises(actor):
    hybrid, _ = actor
    hybrid.model.train()
    before = state(hybrid.model)
    with pytest.raises(RuntimeError, match="boom"):
        with hybrid.generation_mode():
            raise RuntimeError("boom")
    assert_same(before, state(hybrid.model))


def test_generate_outside_generation_mode_is_refused(actor):
    hybrid, _ = actor
    with pytest.raises(RuntimeError, match="generation_mode"):
        hybrid.generate([[65]])


def test_training_step_after_generation_matches_one_without(actor, tiny_dirs):
    """Generating in between must not change what the next training step computes."""
    hybrid, tok = actor
    ids = torch.tensor([[65, 66, 67, 68]])

    def loss_of(model):
        return model(input_ids=ids, labels=ids).loss

    reference = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    hybrid.model.train()
    with hybrid.generation_mode():
        hybrid.generate(ids.tolist())
    assert torch.allclose(loss_of(hybrid.model), loss_of(reference.train()), atol=1e-6)
    assert loss_of(hybrid.model).requires_grad


def test_sampling_settings_are_ours_not_the_models(actor, monkeypatch):
    hybrid, tok = actor
    model = hybrid.model
    g = HFGenerator(model, tok, GenerationConfig(max_new_tokens=6)).sampling
    assert g.do_sample and g.top_k == 0 and g.top_p == 1.0 and g.temperature == 1.0 and g.max_new_tokens == 6
    # a checkpoint's own settings (at least 6 new tokens, a repetition penalty) must not reach the rollouts
    model.generation_config.min_new_tokens = 6
    model.generation_config.repetition_penalty = 5.0
    own = model.generation_config
    seen = []
    generate = type(model).generate

    def spy(self, *args, **kwargs):
        seen.append((self.generation_config.min_new_tokens, self.generation_config.repetition_penalty))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", spy)
    torch.manual_seed(0)
    with hybrid.generation_mode():
        hybrid.generate([[65, 66]])
    assert seen and seen[0][0] is None and seen[0][1] in (None, 1.0)  # None = no penalty
    assert model.generation_config is own  # the model's own config is back afterwards


def test_hf_logprobs_are_the_raw_distribution_at_any_temperature(actor, monkeypatch):
    """The generator's log-probs are log-softmax of the raw logits (temperature 1, no top-k/top-p), and its entropies
    those of the same raw distribution: at temperature 0.5 with top-k 5 they equal a plain forward's of each
    sampled response, not the sampler's. Two prompts of different lengths (one left-padded) in one batch, one of
    them ending at EOS before the other; only one step's logits are kept (no `output_logits`)."""
    hybrid, tok = actor
    model = hybrid.model
    gen = HFGenerator(model, tok, GenerationConfig(max_new_tokens=8, temperature=0.5, top_k=5))
    prompts = [[72, 105, 33], [65, 66, 67, 68, 69]]
    asked = []
    generate = type(model).generate

    def spy(self, *args, **kwargs):
        asked.append(kwargs.get("output_logits") or kwargs["generation_config"].output_logits)
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", spy)
    eos = tok.eos_token_id
    with torch.no_grad():  # make EOS likely after the first prompt, so that its row ends before the other's
        model.get_input_embeddings().weight[eos] += 0.5 * model.get_input_embeddings().weight[33]
    for seed in range(20):
        torch.manual_seed(seed)
        out = gen.generate(prompts, logprobs=True)
        lengths = out.mask.sum(1).tolist()
        if lengths[0] != lengths[1]:
            break
    assert lengths[0] != lengths[1], "no seed ended the two rows at different steps"
    assert asked and not any(asked)
    for row, prompt in enumerate(prompts):
        n = int(lengths[row])
        seq = torch.tensor([prompt + out.tokens[row, :n].tolist()])
        with torch.no_grad():
            logits = model.eval()(input_ids=seq).logits[0, len(prompt) - 1 : -1].double()
        logp = torch.log_softmax(logits, -1)
        expected = logp.gather(1, seq[0, len(prompt) :, None]).squeeze(1)
        assert torch.allclose(out.logprobs[row, :n].double(), expected, atol=1e-5)
        assert torch.allclose(out.entropy[row, :n].double(), -(logp.exp() * logp).sum(-1), atol=1e-5)
        assert not out.logprobs[row, n:].any() and not out.entropy[row, n:].any()  # 0 outside the mask
