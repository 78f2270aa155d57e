"""Starting the engine a stage config names: the process group (DeepSpeed), the device of this rank, and one
`TrainEngine` per trained model; under ZeRO-3 every model loaded partitioned and the frozen ones sharded."""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
from torch import nn

from chatrlhf import distributed as dist
from chatrlhf.config import EngineConfig, OptimConfig, RunConfig
from chatrlhf.engine.base import TrainEngine
from chatrlhf.engine.deepspeed import DeepSpeedEngine, deepspeed_config, partitioned_loading, shard_frozen
from chatrlhf.engine.single import SingleEngine
from chatrlhf.errors import UserError
from chatrlhf.models.load import pick_device


def build_engine(
    model: nn.Module, optim: OptimConfig, total_steps: int, name: str, engine: EngineConfig, run: RunConfig
) -> TrainEngine:
    """The engine `engine.kind` names, for `model` trained for `total_steps` optimizer steps."""
    if engine.kind == "deepspeed":
        return DeepSpeedEngine(model, optim, total_steps, name=name, engine=engine, dtype=run.dtype)
    return SingleEngine(model, optim, total_steps, name=name, max_bad_steps=run.max_bad_steps)


def partitions(engine: EngineConfig) -> bool:
    """Whether every model is partitioned across the ranks, trained and frozen alike (the RL reference and reward
    model, the DPO reference): under DeepSpeed ZeRO-3. Otherwise every rank holds the frozen models whole (and
    ZeRO-1/2 the trained models' weights)."""
    return engine.kind == "deepspeed" and engine.zero_stage == 3


def frozen_model(model: nn.Module, engine: EngineConfig, run: RunConfig) -> nn.Module:
    """A frozen model as it scores: under ZeRO-3 partitioned across the ranks by a DeepSpeed inference engine
    (`deepspeed.shard_frozen`; every rank must then make the same forward calls), otherwise `model` itself, whole."""
    return shard_frozen(model, engine, run.dtype) if partitions(engine) else model


def frozen_loading(engine: EngineConfig, run: RunConfig):
    """The context to load the frozen models in: under ZeRO-3 they are built partitioned as they load
    (`deepspeed.partitioned_loading`), so that no rank holds one whole even while loading it; otherwise nothing."""
    return partitioned_loading(engine, run.dtype, frozen=True) if partitions(engine) else nullcontext()


def trained_loading(engine: EngineConfig, run: RunConfig):
    """The same for the models a stage trains (the SFT model, the reward model, the DPO policy, the RL actor and
    critic), which `build_engine` then hands to DeepSpeed already partitioned, as DeepSpeed-Chat loads them: a
    model larger than one device's memory can be loaded and trained."""
    return partitioned_loading(engine, run.dtype, frozen=False) if partitions(engine) else nullcontext()


def start(engine: EngineConfig, run: RunConfig) -> torch.device:
    """The device this process trains on. Under DeepSpeed the process group is joined first and each rank takes
    the GPU of its local rank; a launcher without `engine.kind deepspeed` is refused."""
    device = pick_device(run.device, run.dtype)
    if engine.kind != "deepspeed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            raise UserError(
                f"launched as {world} processes (WORLD_SIZE={world}, set by torchrun/deepspeed) but engine.kind is "
                "single: every process would run the whole stage on its own and write the same run directory; pass "
                "--engine.kind deepspeed, or run without a launcher"
            )
        return device
    try:
        import deepspeed  # noqa: F401  (an optional dependency)
    except ImportError:
        raise UserError("engine.kind=deepspeed needs DeepSpeed: pip install 'chatrlhf[deepspeed]'") from None
    deepspeed_config(engine, OptimConfig(), run.dtype)  # a bad --engine.deepspeed_config fails here, early
    dist.init(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank())
        torch.cuda.set_device(device)
    return device
