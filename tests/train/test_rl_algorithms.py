"""The critic-free algorithms, reward functions, KL options and truncated importance sampling, through the
RL driver on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from chatrlhf.config import DataConfig, GenerationConfig, OptimConfig, PPOConfig, RLConfig, RLTrainConfig, RunConfig
from chatrlhf.models.load import ValueModel
from chatrlhf.models.rewards import ForeignRewardModel, ScoringBatch, load_reward_model
from chatrlhf.models.tiny import byte_tokenizer
from chatrlhf.train.algorithms import ALGORITHMS
from chatrlhf.train.rl import run_rl
from chatrlhf.train.rl_models import build_models

JUDGE = "chatrlhf.demo.task:judge"


def rl_config(tiny_dirs, pairs_file, out, algo="grpo", group_size=2, ppo=None, **kw) -> RLConfig:
    return RLConfig(
        actor=str(tiny_dirs["llama"]),
        reward_functions=[JUDGE],
        output_dir=str(out),
        data=DataConfig(paths=[str(pairs_file)], eval_fraction=0.0),
        run=RunConfig(progress=False, log_every=1),
        train=RLTrainConfig(
            algo=algo, group_size=group_size, iterations=2, rollout_batch_size=4,
            generation=GenerationConfig(max_new_tokens=8), ppo=ppo or PPOConfig(),
            actor_optim=OptimConfig(lr=1e-3), **kw,
        ),
    )  # fmt: skip


def metrics(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo, group_size", [("grpo", 2), ("rloo", 2), ("reinforce_pp", 1), ("remax", 1)])
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


def test_kl_as_loss_with_k3_and_adaptive_coefficient(tiny_dirs, pairs_file, tmp_path):
    ppo = PPOConfig(kl_in="loss", kl_estimator="k3", kl_coef=0.05, kl_target=0.001, kl_horizon=10)
    run_rl(rl_config(tiny_dirs, pairs_file, tmp_path / "r", ppo=ppo))
    lines = metrics(tmp_path / "r")
    assert all("loss/kl" in m for m in lines)
    assert lines[0]["kl/coef"] == 0.05
    # iteration 1 has KL 0 (actor == reference): β shrinks by 20% × 4 prompts / horizon 10
    assert lines[1]["kl/coef"] == pytest.approx(0.05 * (1 - 0.2 * 4 / 10))


def test_truncated_importance_sampling_weights(tiny_dirs, pairs_file, tmp_path):
    run_rl(rl_config(tiny_dirs, pairs_file, tmp_path / "r", ppo=PPOConfig(tis_cap=2.0)))
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
    cfg.reward_model, cfg.reward_weights = str(rm_dir), [0.5, 2.0]
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
