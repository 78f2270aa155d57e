"""The DeepSpeed engine: ZeRO stages 0–3, CPU offload, bf16/fp16, behind the `TrainEngine` interface
(engine/base.py).

The driver still owns the loop: it calls `backward(loss)` per micro-batch and `step()` per optimizer step. DeepSpeed
runs with `managed_gradient_accumulation: false`, so each `step()` is the accumulation boundary whatever the number
of micro-batches before it (an epoch's last step may have fewer), and the losses we pass are already normalised by
the step's global token or pair count (`scale_wrt_gas=False`). DeepSpeed averages gradients over the W data-parallel
ranks; each rank's loss is its share of the global loss, so `backward` multiplies by W to make the average a sum.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from transformers import get_scheduler

from chatrlhf import distributed as dist
from chatrlhf.config import EngineConfig, OptimConfig
from chatrlhf.engine.base import StepStats, adamw, non_finite_gradient, param_groups
from chatrlhf.errors import ConfigError


def deepspeed_config(e: EngineConfig, optim: OptimConfig, dtype: str, frozen: bool = False) -> dict:
    """The DeepSpeed JSON config built from ours, with the user's `engine.deepspeed_config` merged over it.
    `frozen`: the config of a frozen model's ZeRO-3 inference engine (`shard_frozen`): no optimizer to offload,
    and its parameters offloaded with `engine.offload_frozen` instead of `engine.offload_params`."""
    zero: dict = {"stage": e.zero_stage}
    if e.offload_optimizer and not frozen:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if e.offload_frozen if frozen else e.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": 1,  # we feed micro-batches ourselves; DeepSpeed only needs a number
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if e.deepspeed_config:
        path = Path(e.deepspeed_config)
        try:
            user = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"engine.deepspeed_config {path}: {err}") from None
        if not isinstance(user, dict):
            raise ConfigError(f"engine.deepspeed_config {path}: expected a JSON object")
        config = _merge(config, user)
        zero = config.get("zero_optimization")
        stage = zero.get("stage") if isinstance(zero, dict) else None
        if stage != e.zero_stage:
            raise ConfigError(
                f"engine.deepspeed_config {path}: zero_optimization.stage is {stage}, but engine.zero_stage is "
                f"{e.zero_stage}; set the stage with engine.zero_stage only (saving, generation and the LoRA and EMA "
                "checks read it there)"
            )
    return config


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@contextmanager
def partitioned_loading(engine: EngineConfig, dtype: str, frozen: bool) -> Iterator[None]:
    """Models loaded with `from_pretrained` inside are built partitioned (transformers' ZeRO-3 path:
    `deepspeed.zero.Init`, then each weight gathered, loaded and partitioned again), so no rank ever holds one
    whole; `DeepSpeedEngine` (trained models) or `shard_frozen` (`frozen`) then wraps the partitioned model, with
    the same parameter offload `zero.Init` placed it with. transformers sees ZeRO-3 while the `HfDeepSpeedConfig`
    made here lives (it keeps a weak reference to it), so only the models loaded inside are affected."""
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    marker = HfDeepSpeedConfig(deepspeed_config(engine, OptimConfig(), dtype, frozen=frozen))
    try:
        yield
    finally:
        del marker
        unset_hf_deepspeed_config()


def shard_frozen(model: nn.Module, engine: EngineConfig, dtype: str) -> nn.Module:
    """A frozen `model` partitioned across the ranks, as DeepSpeed-Chat holds its reference and reward models under
    ZeRO-3: `deepspeed.initialize` with the stage-3 config and no optimizer builds a parameter-only ZeRO-3 engine
    (`DeepSpeedZeRoOffload`). Each rank keeps 1/N of every parameter (parameters under the stage-3 persistence
    threshold stay whole) and gathers a layer's parameters only while its forward runs; with
    `engine.offload_frozen` the partitions live on the CPU and are fetched to the device layer by layer.

    The returned DeepSpeed engine is called like the model, and the model's own methods (a reward model's
    `scores_at`) pass through to it. It must stay alive as long as the model scores: freeing it removes the hooks
    that gather the parameters. Every forward is a collective: all ranks must make the same calls in the same
    order."""
    import deepspeed

    config = deepspeed_config(engine, OptimConfig(), dtype, frozen=True)
    sharded, *_ = deepspeed.initialize(model=model.eval().requires_grad_(False), config=config)
    sharded.eval()  # DeepSpeed's eval() returns None
    return sharded


class DeepSpeedEngine:
    """A model trained by DeepSpeed. `model` is the DeepSpeed engine (call it for training forwards: ZeRO-3 hooks
    and backward bookkeeping live there); `module` is the underlying Hugging Face model.

    For generation under ZeRO-3, `generation_weights()` gathers the weights into a `WholeCopy` once per rollout
    batch (`engine.gather_for_generation`, the default), or yields the sharded module itself, which must then
    generate with `synced_gpus` (`sharded_generation`)."""

    def __init__(
        self, model: nn.Module, optim: OptimConfig, total_steps: int, name: str, engine: EngineConfig, dtype: str
    ):
        import deepspeed

        self.name = name
        self.cfg = optim
        self.config = deepspeed_config(engine, optim, dtype)
        groups = param_groups(model, optim.weight_decay)
        betas = tuple(optim.betas)
        if engine.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=optim.lr, betas=betas, eps=optim.eps, adamw_mode=True)
        else:
            optimizer = adamw(groups, optim)

        def schedule(opt):
            return get_scheduler(
                optim.schedule, opt, num_warmup_steps=optim.warmup_steps, num_training_steps=max(total_steps, 1)
            )

        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=self.config
        )
        self.module = self.model.module
        self.zero_stage = engine.zero_stage
        self.gather_for_generation = engine.gather_for_generation
        self._whole: WholeCopy | None = None  # built on the first rollout (only the actor generates)
        self.fp16 = dtype == "float16"
        self.steps = 0
        self.bad_steps = 0  # fp16 steps DeepSpeed's loss scaler skipped on overflow (any other bad step stops the run)

    def backward(self, loss: torch.Tensor) -> None:
        # the average over ranks becomes the sum of the ranks' shares of the global loss
        self.model.backward(loss * dist.world_size(), scale_wrt_gas=False)

    def step(self) -> StepStats:
        """Reduce, clip, step optimizer and schedule (DeepSpeed does all four); stop on a non-finite gradient."""
        lr = self.scheduler.get_last_lr()[0]
        skipped = self.model.skipped_steps
        self.model.step()
        norm = self.model.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else math.nan
        if self.fp16 and self.model.skipped_steps != skipped:
            # dynamic loss scaling: an overflow step is skipped and the scale lowered, as fp16 training expects
            self.bad_steps += 1
            return StepStats(grad_norm=math.nan, lr=lr, skipped=True)
        if self.model.skipped_steps != skipped or not math.isfinite(grad_norm):
            raise non_finite_gradient(self.name, grad_norm, self.steps + 1)
        self.steps += 1
        return StepStats(grad_norm=grad_norm, lr=lr)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on the CPU on rank 0 (None elsewhere); under ZeRO-3 every rank must call it,
        and parameters are gathered one at a time so no rank ever holds two copies of the model."""
        if self.zero_stage < 3:
            return {k: v.detach().cpu() for k, v in self.module.state_dict().items()} if dist.is_main() else None
        import deepspeed

        out = {}
        for name, p in self.module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if dist.is_main():
                    out[name] = p.detach().cpu().clone()
        if not dist.is_main():
            return None
        saved = self.module.state_dict().keys()  # parameters and persistent buffers: what save_pretrained writes
        for name, b in self.module.named_buffers():
            if name in saved:
                out[name] = b.detach().cpu()
        return out

    @contextmanager
    def generation_weights(self) -> Iterator[nn.Module]:
        if self.zero_stage < 3 or not self.gather_for_generation:
            yield self.module
            return
        if self._whole is None:
            self._whole = WholeCopy(self.module, next(self.module.parameters()).device)
        with self._whole as copy:
            yield copy

    @property
    def sharded_generation(self) -> bool:
        return self.zero_stage == 3 and not self.gather_for_generation

    def save_state(self, directory: Path) -> None:
        """Optimizer, schedule and (sharded) weights into `directory/<name>/` (every rank writes its shard)."""
        self.model.save_checkpoint(str(directory), tag=self.name, client_state={"steps": self.steps}, save_latest=False)

    def load_state(self, directory: Path) -> None:
        _, client = self.model.load_checkpoint(str(directory), tag=self.name)
        self.steps = client["steps"]


class WholeCopy:
    """A whole, unsharded copy of a ZeRO-3 model for generation: every parameter is gathered once per rollout
    batch into a plain module (no ZeRO hooks, no collectives per layer per token, no `synced_gpus`), and the copy's
    memory is freed again when the rollout is done. The copy is built once, on the meta device (no memory, no
    initialisation); buffers (e.g. rotary tables) are not sharded by ZeRO and are copied from the model."""

    def __init__(self, module: nn.Module, device: torch.device):
        from transformers import AutoModelForCausalLM

        self.module = module
        self.device = device
        with torch.device("meta"):
            self.copy = AutoModelForCausalLM.from_config(module.config, dtype=module.dtype)
        self.copy.eval().requires_grad_(False)

    def __enter__(self) -> nn.Module:
        import deepspeed

        copy = self.copy.to_empty(device=self.device)
        copy.tie_weights()  # to_empty gives tied parameters separate storage; tie them again
        mine = dict(copy.named_parameters())
        theirs = dict(self.module.named_parameters())
        if mine.keys() != theirs.keys():
            raise RuntimeError(f"whole copy of {type(self.module).__name__} has other parameters than the model")
        with torch.no_grad():
            buffers = dict(self.module.named_buffers())
            for name, b in copy.named_buffers():
                b.copy_(buffers[name])
            for name, p in theirs.items():
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    mine[name].copy_(p)
        copy.generation_config = self.module.generation_config
        return copy

    def __exit__(self, *exc) -> None:
        self.copy.to("meta")
