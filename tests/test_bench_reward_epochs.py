"""bench/reward_epochs.py on a tiny pipeline run: each row trains the run's reward stage again on the pairs the
pipeline gave that stage, for its seed and number of epochs."""

from __future__ import annotations

import json
import math

import pytest

from chatrlhf.config import PipelineConfig, PipelineDataConfig, RewardTrainConfig, RunConfig, save_config
from chatrlhf.models.tiny import build_tiny_model
from tests.conftest import load_bench


@pytest.fixture(scope="module")
def bench():
    with load_bench("reward_epochs") as module:
        yield module


def test_each_row_trains_the_runs_reward_stage_for_its_epochs(bench, tmp_path):
    demo = tmp_path / "demo"
    build_tiny_model(demo / "sft" / "model", hidden=32, layers=2, heads=4)  # stands in for the run's SFT model
    reward = RewardTrainConfig(epochs=1, batch_size=8, max_seq_len=128)
    data = PipelineDataConfig(paths=["demo:pairs:200:0"], split="2,4,4", eval_fraction=0.1)
    cfg = PipelineConfig(model="tiny:llama", run_dir=str(demo), reward=reward, run=RunConfig(seed=3), data=data)
    save_config(cfg, demo / "config.yaml")
    out = tmp_path / "rows.json"
    assert bench.main(["--demo", str(demo), "--seeds", "5", "6", "--epochs", "1", "2", "--workdir",
                       str(tmp_path / "w"), "--json", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [(r["epochs"], r["seed"]) for r in rows] == [(1, 5), (1, 6), (2, 5), (2, 6)]
    share = 200 * 4 // 10  # the reward stage's share of the pool: 4 parts in 10
    train_pairs = share - round(share * 0.1)  # less its held-out tenth
    for r in rows:
        assert r["steps"] == r["epochs"] * math.ceil(train_pairs / 8)
        summary = json.loads((tmp_path / "w" / f"e{r['epochs']}-s{r['seed']}" / "summary.json").read_text())
        assert summary["train_pairs"] == train_pairs and summary["eval/accuracy"] == r["accuracy"]
        assert 0.0 <= r["accuracy"] <= 1.0
    assert rows[0]["accuracy"] != rows[1]["accuracy"] or rows[0]["score_gap"] != rows[1]["score_gap"]  # seeds differ


def test_a_run_without_its_sft_model_is_refused(bench, tmp_path):
    with pytest.raises(SystemExit, match="not a pipeline run whose SFT step has finished"):
        bench.main(["--demo", str(tmp_path), "--workdir", str(tmp_path / "w")])
