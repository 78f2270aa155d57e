"""The critic-free algorithms, reward functions, KL options and truncated importance sampling, through the
RL driver on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from chatrlhf.config import (
    DataConfig,
    GenerationConfig,
    KLConfig,
    OptimConfig,
    RLConfig,
    RLTrainConfig,
    RolloutConfig,
    RunConfig,
    UpdateConfig,
)
from chatrlhf.demo.task import parse_prompt
from chatrlhf.errors import UserError
from chatrlhf.models.load import ValueModel
from chatrlhf.models.rewards import ForeignRewardModel, ScoringBatch, load_reward_model
from chatrlhf.models.tiny import byte_tokenizer
from chatrlhf.train.algorithms import ALGORITHMS
from chatrlhf.train.rl import run_rl
from chatrlhf.train.rl_models import build_models
from chatrlhf.train.update import reuses_update_forward

JUDGE = "chatrlhf.demo.task:judge"
TEXT = "tests.train.test_rl_algorithms:text_reward"
TWO_WORDS_ONLY = "tests.train.test_rl_algorithms:text_reward_for_two_words"


def text_reward(prompt: str, response: str, **fields) -> float:
    """A reward that tells a random policy's samples apart (the judge gives them all 0): a hash of the text."""
    return (sum(map(ord, response)) % 97 + len(response)) / 100


def text_reward_for_two_words(prompt: str, response: str, **fields) -> float:
    """`text_reward` for prompts that ask for 2 words; 0 for the others, so their groups tie."""
    return text_reward(prompt, response) if parse_prompt(prompt)[0] == 2 else 0.0


def rl_config(tiny_dirs, pairs_file, out, algo="grpo", group_size=2, **kw) -> RLConfig:
    return RLConfig(
        actor=str(tiny_dirs["llama"]),
        reward_functions=[JUDGE, TEXT],
        output_dir=str(out),
        data=DataConfig(paths=[str(pairs_file)], eval_fraction=0.0),
        run=RunConfig(progress=False, log_every=1),
        train=RLTrainConfig(
            algo=algo, group_size=group_size, iterations=2, rollout_batch_size=4,
            generation=GenerationConfig(max_new_tokens=8), actor_optim=OptimConfig(lr=1e-3), **kw,
        ),
    )  # fmt: skip


def metrics(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


ALGO_GROUPS = [("grpo", 2), ("dr_grpo", 2), ("rloo", 2), ("reinforce_pp", 1), ("remax", 1), ("dapo", 2),
               ("gspo", 2), ("cispo", 2)]  # fmt: skip


@pytest.mark.parametrize("algo, group_size", ALGO_GROUPS)
def test_critic_free_algorithms_run_without_a_critic(algo, group_size, tiny_dirs, pairs_file, tmp_path):
    cfg = rl_config(tiny_dirs, pairs_file, tmp_path / algo, algo=algo, group_size=group_size)
    models = build_models(cfg, ALGORITHMS[algo], tmp_path / "build", torch.device("cpu"))
    assert models.critic_engine is None
    modules = [models.actor_engine.model, models.reference]
    assert not any(isinstance(m, ValueModel) for root in modules for m in root.modules())
    assert not any(n.startswith("score") for root in modules for n, _ in root.named_parameters())

    summary = run_rl(cfg)
    assert summary["algo"] == algo and not (tmp_path / algo / "critic").exists()
    last = metrics(tmp_path / algo)[-1]
    assert "loss/value" not in last and "values/mean" not in last
    assert 0.0 <= last["reward/judge_mean"] <= 1.0
    if algo == "remax":
        assert "reward/greedy_mean" in last
    assert ("sampling/rounds" in last) == (algo == "dapo")


def test_dynamic_sampling_draws_rounds_until_the_batch_is_full(tiny_dirs, pairs_file, tmp_path):
    """DAPO with the reward 0 for every prompt but the 2-word ones (a third of them): those groups tie, so each
    iteration draws rounds until it has 4 groups whose rewards differ (tests/train/test_rl_sampling.py checks which
    groups are kept)."""
    cfg = rl_config(tiny_dirs, pairs_file, tmp_path / "r", algo="dapo")
    cfg.reward_functions = [TWO_WORDS_ONLY]
    cfg.train.iterations, cfg.train.sampling.max_rounds = 3, 20
    run_rl(cfg)
    lines = metrics(tmp_path / "r")
    assert all(m["sampling/groups_drawn"] == 4 * m["sampling/rounds"] for m in lines)
    assert all(0 <= m["sampling/equal_frac"] < 1 for m in lines)
    assert any(m["sampling/rounds"] > 1 and m["sampling/equal_frac"] > 0 for m in lines)


def test_dynamic_sampling_stops_when_no_group_differs(tiny_dirs, pairs_file, tmp_path):
    cfg = rl_config(tiny_dirs, pairs_file, tmp_path / "r", algo="dapo")
    cfg.reward_functions = [JUDGE]  # a random policy scores 0 on every prompt
    cfg.train.sampling.max_rounds = 3
    with pytest.raises(UserError, match=r"after train\.sampling\.max_rounds=3 rounds only 0 of the 4 prompt groups"):
        run_rl(cfg)


def test_kl_as_loss_with_k3_and_adaptive_coefficient(tiny_dirs, pairs_file, tmp_path):
    kl = KLConfig(placement="loss", estimator="k3", coef=0.05, target=0.001, horizon=10)
    run_rl(rl_config(tiny_dirs, pairs_file, tmp_path / "r", kl=kl))
    lines = metrics(tmp_path / "r")
    assert all("loss/kl" in m for m in lines)
    assert lines[0]["kl/coef"] == 0.05
    # iteration 1 has KL 0 (actor == reference): β shrinks by 20% × n / horizon 10, with n the 8 sampled responses
    # (4 prompts × group_size 2): Ziegler et al. count samples
    assert lines[1]["kl/coef"] == pytest.approx(0.05 * (1 - 0.2 * 8 / 10))


def test_truncated_importance_sampling_weights(tiny_dirs, pairs_file, tmp_path):
    run_rl(rl_config(tiny_dirs, pairs_file, tmp_path / "r", rollout=RolloutConfig(tis_cap=2.0)))
    first = metrics(tmp_path / "r")[0]
    # the rollout engine (cached incremental decoding) and the trainer's full forward agree up to rounding
    assert first["tis/weight_mean"] == pytest.approx(1.0, abs=1e-3)
    assert first["tis/capped_frac"] == 0.0


def test_weighted_reward_model_and_function(tiny_dirs, pairs_file, tmp_path):
    rm_dir = tmp_path / "rm"
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_dirs["gpt2"], num_labels=1)
    rm.config.pad_token_id = 256
    rm.save_pretrained(rm_dir)
    byte_tokenizer().save_pretrained(rm_dir)
    cfg = rl_config(tiny_dirs, pairs_file, tmp_path / "r")
    cfg.reward_model, cfg.reward_functions, cfg.reward_weights = str(rm_dir), [JUDGE], [0.5, 2.0]
    run_rl(cfg)
    for m in metrics(tmp_path / "r"):
        expected = 0.5 * m["reward/reward_model_mean"] + 2.0 * m["reward/judge_mean"]
        assert m["reward/score_mean"] == pytest.approx(expected, abs=1e-5)


def test_foreign_reward_model_retokenizes(tiny_dirs, tmp_path):
    """A reward model with another vocabulary scores the decoded text with its own tokenizer."""
    tok = byte_tokenizer(chat_template=False)
    tok.add_tokens(["<extra>"])
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_dirs["opt"], num_labels=1)
    rm.resize_token_embeddings(len(tok))
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    source = load_reward_model(str(tmp_path / "rm"), byte_tokenizer(), "float32", torch.device("cpu"))
    assert isinstance(source, ForeignRewardModel)
    batch = ScoringBatch(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), torch.tensor([2, 2]),
                         prompts=["Name 2 words", "hi"], responses=["bat bed", "a much longer reply"])  # fmt: skip
    got = source.score(batch)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    for i in range(2):
        enc = tok(batch.prompts[i], batch.responses[i], return_tensors="pt")
        with torch.no_grad():
            assert float(got[i]) == pytest.approx(float(model(**enc).logits[0, 0]), abs=1e-5)


def test_ppo_with_reward_functions_needs_a_critic(tiny_dirs, pairs_file, tmp_path):
    from chatrlhf.errors import ConfigError

    with pytest.raises(ConfigError, match="needs a critic"):
        rl_config(tiny_dirs, pairs_file, tmp_path, algo="ppo", group_size=1).validate()


def runs_counting_separate_forwards(monkeypatch, configs: dict[str, RLConfig]) -> dict[str, tuple[list[dict], int]]:
    """Each config's run: its metrics and how often it made the rollout's separate no-grad forward of the actor."""
    import chatrlhf.train.rl as rl_module

    calls = []
    separate = rl_module.rollout_logprobs_and_entropy
    monkeypatch.setattr(rl_module, "rollout_logprobs_and_entropy", lambda *a, **k: calls.append(1) or separate(*a, **k))
    runs = {}
    for mode, cfg in configs.items():
        calls.clear()
        run_rl(cfg)
        runs[mode] = (metrics(Path(cfg.output_dir)), len(calls))
    return runs


def assert_same_weights(a: Path, b: Path) -> None:
    models = [AutoModelForCausalLM.from_pretrained(d / "model") for d in (a, b)]
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), name


def test_an_on_policy_update_takes_the_old_logprobs_from_its_own_forward(tiny_dirs, pairs_file, tmp_path, monkeypatch):
    """One epoch, one mini-batch, the KL in the loss: the rollout's separate forward of the actor is skipped
    (update.old_logprobs auto), and the run is the one that makes it (forward): the same metrics — entropy and
    KL included, now from the update's forward — and the same weights. The auto run also trims its micro-batches'
    padding (`update.trim_padding`), so each micro-batch's π_old is written back at its own width."""
    kl = KLConfig(placement="loss", estimator="k3", coef=0.05)
    configs = {}
    for mode in ("auto", "forward"):
        update = UpdateConfig(old_logprobs=mode, trim_padding=mode == "auto")
        cfg = rl_config(tiny_dirs, pairs_file, tmp_path / mode, kl=kl, update=update)
        cfg.train.update.micro_batch_size = 4  # two micro-batches: each one's forward is π_old's
        configs[mode] = cfg
    runs = runs_counting_separate_forwards(monkeypatch, configs)
    (auto, auto_calls), (forward, forward_calls) = runs["auto"], runs["forward"]
    assert auto_calls == 0 and forward_calls == 2
    for a, f in zip(auto, forward):
        assert set(a) == set(f)
        for key in ("policy/entropy", "kl/mean", "kl/token_mean", "loss/policy", "loss/kl", "reward/score_mean"):
            assert a[key] == pytest.approx(f[key], rel=1e-4, abs=1e-6), key
        assert a["policy/approx_kl"] == 0.0 and a["policy/clipfrac"] == 0.0  # the ratio is exactly 1
        assert abs(f["policy/approx_kl"]) < 1e-6  # the separate forward agrees with the update's to rounding
    assert_same_weights(tmp_path / "auto", tmp_path / "forward")


def test_sampler_logprobs_stand_for_the_separate_forward(tiny_dirs, pairs_file, tmp_path, monkeypatch):
    """update.old_logprobs sampler: π_old's log-probs and entropies are those the generator recorded as it drew the
    tokens, so the actor's separate no-grad forward is never made, even where it is needed before the update (KL in
    the reward, two epochs of two mini-batches); the run is the one that makes it (forward) up to the rounding of
    decoding with a KV cache: the same metrics and weights."""
    kl = KLConfig(placement="reward", estimator="k1", coef=0.05)
    configs = {
        mode: rl_config(tiny_dirs, pairs_file, tmp_path / mode, algo="reinforce_pp", kl=kl,
                        update=UpdateConfig(epochs=2, mini_batch_size=4, old_logprobs=mode))
        for mode in ("sampler", "forward")
    }  # fmt: skip
    runs = runs_counting_separate_forwards(monkeypatch, configs)
    (sampler, sampler_calls), (forward, forward_calls) = runs["sampler"], runs["forward"]
    assert sampler_calls == 0 and forward_calls == 2
    for a, f in zip(sampler, forward):
        assert set(a) == set(f)
        keys = ("policy/entropy", "kl/mean", "kl/token_mean", "loss/policy", "advantages/mean", "reward/total_mean")
        for key in keys:
            assert a[key] == pytest.approx(f[key], rel=1e-4, abs=1e-6), key
        assert a["policy/approx_kl"] == pytest.approx(f["policy/approx_kl"], rel=1e-3, abs=1e-6)
    assert_same_weights(tmp_path / "sampler", tmp_path / "forward")


@pytest.mark.parametrize(
    "rollout, message",
    [
        (RolloutConfig(backend="vllm"), "needs train.rollout.backend hf"),
        (RolloutConfig(tis_cap=2.0), "rollout.tis_cap would compare"),
        (RolloutConfig(max_logprob_diff=0.1), "rollout.max_logprob_diff would compare"),
    ],
)
def test_sampler_logprobs_refuse_what_needs_the_trainer_forward(tiny_dirs, pairs_file, tmp_path, rollout, message):
    from chatrlhf.errors import ConfigError

    cfg = rl_config(tiny_dirs, pairs_file, tmp_path, update=UpdateConfig(old_logprobs="sampler"), rollout=rollout)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


@pytest.mark.parametrize(
    "change, backend, reuses",
    [
        ({}, "hf", True),
        ({"kl": KLConfig(placement="reward", coef=0.0)}, "hf", True),  # no KL in the reward: nothing reads π_old
        ({"kl": KLConfig(placement="reward", coef=0.05)}, "hf", False),  # the shaped reward needs π_old first
        ({"kl": KLConfig(placement="reward", coef=0.0, target=0.1)}, "hf", False),  # β may grow
        ({"update": UpdateConfig(epochs=2)}, "hf", False),
        ({"update": UpdateConfig(mini_batch_size=4)}, "hf", False),  # two optimizer steps over 8 sequences
        ({"update": UpdateConfig(mini_batch_size=8)}, "hf", True),
        ({"update": UpdateConfig(old_logprobs="forward")}, "hf", False),
        ({"rollout": RolloutConfig(tis_cap=2.0)}, "hf", False),
        ({}, "vllm", False),  # the engine mismatch is measured before the update
    ],
)
def test_when_the_update_is_exactly_on_policy(change, backend, reuses):
    base = {"kl": KLConfig(placement="loss", estimator="k3", coef=0.05)}
    train = RLTrainConfig(algo="grpo", group_size=2, rollout_batch_size=4, **{**base, **change})
    assert reuses_update_forward(train, backend) is reuses
