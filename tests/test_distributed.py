"""Data-parallel bookkeeping: each rank's share of a batch (`distributed.shard`, with the rank and world size patched
in), the gathers of rollout shares (on two gloo ranks), and the DeepSpeed JSON config built from ours
(`deepspeed_config`; DeepSpeed itself is not needed)."""

from __future__ import annotations

import json

import pytest
import torch

from chatrlhf import distributed as dist
from chatrlhf.config import EngineConfig, OptimConfig
from chatrlhf.engine.deepspeed import deepspeed_config
from chatrlhf.errors import ConfigError


def shares(monkeypatch, items, world: int) -> list[tuple[list, float]]:
    """`shard(items)` as each of `world` ranks sees it, in rank order."""
    monkeypatch.setattr(dist, "world_size", lambda: world)
    out = []
    for r in range(world):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        out.append(dist.shard(items))
    return out


def test_shard_outside_a_process_group_is_the_whole_batch():
    assert not dist.is_distributed() and dist.rank() == 0 and dist.world_size() == 1
    assert dist.shard(["a", "b", "c"]) == (["a", "b", "c"], 1.0)


def test_shard_examples(monkeypatch):
    # 10 items over 4 ranks: rank r takes [⌊10r/4⌋, ⌊10(r+1)/4⌋) = [0,2) [2,5) [5,7) [7,10)
    assert shares(monkeypatch, list(range(10)), 4) == [([0, 1], 1.0), ([2, 3, 4], 1.0), ([5, 6], 1.0), ([7, 8, 9], 1.0)]
    # one item over 2 ranks (an epoch's last batch): rank 0's range [0,0) is empty, so it repeats the item with weight 0
    assert shares(monkeypatch, ["only"], 2) == [(["only"], 0.0), (["only"], 1.0)]
    # 2 items over 3 ranks: [0,0) is empty for rank 0, which takes a stand-in
    assert shares(monkeypatch, ["p", "q"], 3) == [(["p"], 0.0), (["p"], 1.0), (["q"], 1.0)]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13])
def test_shard_covers_the_batch_once_in_order(monkeypatch, n, world):
    items = [f"item{i}" for i in range(n)]
    parts = shares(monkeypatch, items, world)
    trained = [share for share, weight in parts if weight == 1.0]
    stand_ins = [share for share, weight in parts if weight == 0.0]
    assert len(trained) + len(stand_ins) == world, "every weight is 1 or 0"
    # contiguous shares in rank order, together exactly the batch
    assert [x for share in trained for x in share] == items
    # sizes as even as possible: each trained share has ⌊n/W⌋ or ⌈n/W⌉ items
    assert {len(share) for share in trained} <= {n // world, -(-n // world)}
    # a rank left without items (only when n < W) trains on the first item with weight 0
    assert len(stand_ins) == max(0, world - n)
    assert all(share == [items[0]] for share in stand_ins)


def test_shard_of_a_tensor_gives_its_rows(monkeypatch):
    """PPO shards a tensor of mini-batch indices."""
    (first, w0), (second, w1) = shares(monkeypatch, torch.tensor([4, 0, 2, 7, 5]), 2)
    assert torch.stack(first).tolist() == [4, 0] and torch.stack(second).tolist() == [2, 7, 5]
    assert w0 == w1 == 1.0


def test_collectives_outside_a_process_group_are_the_identity():
    t = torch.arange(6).reshape(2, 3)
    assert dist.gather_padded(t, 0) is t and dist.gather_padded(t, 0, left=True) is t
    assert dist.gather_objects(["a"]) == ["a"]
    assert dist.sum_across(2.5) == 2.5
    assert dist.sum_dict_across({"a": 1.0, "b": -2.0}) == {"a": 1.0, "b": -2.0}


def _gather_on(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank of `test_gathers_across_two_gloo_ranks`: rank r holds r + 1 rows of width 2 + r."""
    import os

    import torch.distributed as torch_dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        t = torch.full((rank + 1, 2 + rank), rank + 1)
        results = {
            "right": dist.gather_padded(t, 0).tolist(),
            "left": dist.gather_padded(t, 0, left=True).tolist(),
            "objects": dist.gather_objects([{"rank": rank, "i": i} for i in range(rank + 1)]),
        }
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        torch_dist.destroy_process_group()


def test_gathers_across_two_gloo_ranks(tmp_path):
    """Rollout shares of different sizes gathered in rank order: right-padded (responses), left-padded (prompts,
    whose last token must stay next to the response), and lists of objects (an episode rollout's episodes)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather_on, args=(2, port, str(tmp_path)), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["right"] == [[1, 1, 0], [2, 2, 2], [2, 2, 2]]
        assert got["left"] == [[0, 1, 1], [2, 2, 2], [2, 2, 2]]
        assert got["objects"] == [{"rank": 0, "i": 0}, {"rank": 1, "i": 0}, {"rank": 1, "i": 1}]


# ------------------------------------------------------------------------------------------------ deepspeed_config


def ds(tmp_path=None, user: object = None, dtype: str = "float32", grad_clip: float = 1.0, **engine) -> dict:
    """The built config for `EngineConfig(kind="deepspeed", **engine)`; `user` is written as the user's JSON."""
    if user is not None:
        path = tmp_path / "user.json"
        path.write_text(user if isinstance(user, str) else json.dumps(user), encoding="utf-8")
        engine["deepspeed_config"] = str(path)
    return deepspeed_config(EngineConfig(kind="deepspeed", **engine), OptimConfig(grad_clip=grad_clip), dtype)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage(stage):
    assert ds(zero_stage=stage)["zero_optimization"] == {"stage": stage}


def test_fixed_keys_hand_the_loop_to_the_driver():
    config = ds(grad_clip=0.7)
    # DeepSpeed neither batches nor accumulates: the driver feeds micro-batches and steps at its own boundaries
    assert config["managed_gradient_accumulation"] is False
    assert config["gradient_accumulation_steps"] == 1 and config["train_micro_batch_size_per_gpu"] == 1
    assert config["gradient_clipping"] == 0.7


def test_offload_keys():
    pin = torch.cuda.is_available()
    zero = ds(zero_stage=2, offload_optimizer=True)["zero_optimization"]
    assert zero == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": pin}}
    zero = ds(zero_stage=3, offload_optimizer=True, offload_params=True)["zero_optimization"]
    assert zero == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu", "pin_memory": pin},
        "offload_param": {"device": "cpu", "pin_memory": pin},
    }


def test_frozen_models_offload_with_offload_frozen_only():
    """A frozen model's ZeRO-3 inference engine has no optimizer to offload; its parameters go to the CPU with
    `engine.offload_frozen`, whatever `engine.offload_params` says of the trained models."""
    pin = torch.cuda.is_available()
    trained = EngineConfig(kind="deepspeed", zero_stage=3, offload_optimizer=True, offload_params=True)
    assert deepspeed_config(trained, OptimConfig(), "float32", frozen=True)["zero_optimization"] == {"stage": 3}
    offloaded = EngineConfig(kind="deepspeed", zero_stage=3, offload_frozen=True)
    zero = deepspeed_config(offloaded, OptimConfig(), "float32", frozen=True)["zero_optimization"]
    assert zero == {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": pin}}
    assert deepspeed_config(offloaded, OptimConfig(), "float32")["zero_optimization"] == {"stage": 3}


@pytest.mark.parametrize(
    ("dtype", "bf16", "fp16"),
    [("float32", False, False), ("bfloat16", True, False), ("float16", False, True)],
)
def test_precision_flags(dtype, bf16, fp16):
    config = ds(dtype=dtype)
    assert config["bf16"] == {"enabled": bf16} and config["fp16"] == {"enabled": fp16}


def test_user_json_deep_merges_and_wins(tmp_path):
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0, "offload_optimizer": {"pin_memory": True}}
    user = {"zero_optimization": zero, "gradient_clipping": 0.25, "communication_data_type": "fp32"}
    config = ds(tmp_path, user, zero_stage=3, offload_optimizer=True)
    built = ds(zero_stage=3, offload_optimizer=True)
    # nested dicts merge key by key (the built offload device stays); the user's values win
    assert config["zero_optimization"] == {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
    }
    assert config["gradient_clipping"] == 0.25
    assert config["communication_data_type"] == "fp32", "keys we never build are passed through"
    untouched = set(built) - set(user)
    assert {k: config[k] for k in untouched} == {k: built[k] for k in untouched}


def test_user_json_cannot_change_the_zero_stage(tmp_path):
    """The run reads the stage from engine.zero_stage (saving, generation, the LoRA and EMA checks); a JSON stage 3
    under engine.zero_stage 2 would train sharded and save a model of empty tensors."""
    with pytest.raises(ConfigError, match="zero_optimization.stage") as err:
        ds(tmp_path, {"zero_optimization": {"stage": 3}}, zero_stage=2)
    assert "engine.zero_stage" in str(err.value) and str(tmp_path / "user.json") in str(err.value)


def test_user_json_replaces_a_section_with_a_non_dict(tmp_path):
    assert ds(tmp_path, {"fp16": False})["fp16"] is False


@pytest.mark.parametrize(
    ("text", "problem"),
    [("{not json", "Expecting property name"), ("[1, 2]", "expected a JSON object")],
)
def test_bad_user_json_is_a_config_error_naming_the_file(tmp_path, text, problem):
    with pytest.raises(ConfigError, match=problem) as err:
        ds(tmp_path, text)
    assert str(tmp_path / "user.json") in str(err.value)


def test_missing_user_json_is_a_config_error_naming_the_file(tmp_path):
    missing = tmp_path / "nowhere.json"
    with pytest.raises(ConfigError) as err:
        deepspeed_config(EngineConfig(kind="deepspeed", deepspeed_config=str(missing)), OptimConfig(), "float32")
    assert str(missing) in str(err.value)
