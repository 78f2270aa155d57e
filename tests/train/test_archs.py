"""All three stages on tiny random GPT-2, OPT, Llama and Qwen2 models loaded through `from_pretrained`."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from chatrlhf.config import (
    DataConfig,
    GenerationConfig,
    RewardConfig,
    RewardTrainConfig,
    RLConfig,
    RLTrainConfig,
    RunConfig,
    SFTConfig,
    SFTTrainConfig,
    UpdateConfig,
)
from chatrlhf.models.tiny import TINY_ARCHS
from chatrlhf.train.reward import run_reward
from chatrlhf.train.rl import run_rl
from chatrlhf.train.sft import run_sft


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_three_stages(arch, tiny_dirs, pairs_file, tmp_path):
    run = RunConfig(progress=False, log_every=1)
    data = DataConfig(paths=[str(pairs_file)], eval_fraction=0.1)
    sft = run_sft(
        SFTConfig(
            model=str(tiny_dirs[arch]),
            output_dir=str(tmp_path / "sft"),
            data=data,
            train=SFTTrainConfig(max_steps=3, batch_size=8, max_seq_len=96),
            run=run,
        )
    )
    assert sft["steps"] == 3 and sft["eval/perplexity"] > 1
    rm = run_reward(
        RewardConfig(
            model=str(tmp_path / "sft" / "model"),
            output_dir=str(tmp_path / "rm"),
            data=data,
            train=RewardTrainConfig(max_steps=2, batch_size=8, max_seq_len=96),
            run=run,
        )
    )
    assert 0 <= rm["eval/accuracy"] <= 1
    rl = run_rl(
        RLConfig(
            actor=str(tmp_path / "sft" / "model"),
            reward_model=str(tmp_path / "rm" / "model"),
            output_dir=str(tmp_path / "rl"),
            data=data,
            run=run,
            train=RLTrainConfig(
                iterations=2,
                rollout_batch_size=8,
                generation=GenerationConfig(max_new_tokens=6),
                update=UpdateConfig(mini_batch_size=4, micro_batch_size=2),
            ),
        )
    )
    assert rl["final/response/length_mean"] >= 1
    before = load_file(tmp_path / "sft" / "model" / "model.safetensors")
    after = load_file(tmp_path / "rl" / "model" / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "PPO changed the actor"
