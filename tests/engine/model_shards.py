"""Run under torchrun by tests/engine/test_deepspeed.py: build a stage's models as the stage does and write, per
rank, what each rank holds of them, read from DeepSpeed's own parameter attributes.

    python -m torch.distributed.run --nproc_per_node 2 tests/engine/model_shards.py OUT sft|reward|dpo|rl ARGS...

`OUT/rank-R.json` has `engines`: per call of `deepspeed.initialize`, in order, whether it was given an optimizer
(a trained model's engine; a frozen model's inference engine has none) and whether every parameter of the model
was already a partitioned ZeRO-3 parameter (`ds_id`, nothing held locally) when it arrived: loaded straight into
shards, never whole on the rank. For rl and dpo it also maps each frozen model (`reference`, `reward_model`) to
`params`, per parameter (by its order in the model): the elements of the rank's partition (`ds_tensor.numel()`,
None when the parameter is not a ZeRO-3 parameter) and of the tensor the parameter holds outside a forward
(`numel()`: 0 when it is released); and to `offload_param`, the device of DeepSpeed's parameter offload for it
(None without one, or without a DeepSpeed engine).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed

from chatrlhf import distributed as dist
from chatrlhf.cli import parse
from chatrlhf.engine import factory
from chatrlhf.models.load import load_tokenizer, resolve_model


def held(model) -> dict:
    offload = model.zero_offload_param() if hasattr(model, "zero_offload_param") else None
    return {
        "params": [
            {"partition": p.ds_tensor.numel() if hasattr(p, "ds_tensor") else None, "local": p.numel()}
            for p in model.parameters()
        ],
        "offload_param": getattr(offload.device, "value", offload.device) if offload is not None else None,
    }


def main(out: Path, stage: str, args: list[str]) -> None:
    engines: list[dict] = []
    initialize = deepspeed.initialize

    def recording(*args, model, **kwargs):
        partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters())
        engines.append({"optimizer": kwargs.get("optimizer") is not None, "partitioned": partitioned})
        return initialize(*args, model=model, **kwargs)

    deepspeed.initialize = recording
    cfg = parse(stage, args)
    cfg.validate(need_data=False)
    cfg.validate_options()
    device = factory.start(cfg.engine, cfg.run)
    record: dict = {}
    if stage == "rl":
        from chatrlhf.train.algorithms import ALGORITHMS
        from chatrlhf.train.rl_models import build_models

        m = build_models(cfg, ALGORITHMS[cfg.train.algo], out, device)
        record = {"reference": held(m.reference), "reward_model": held(m.scorer.modules()[0])}
    else:
        from chatrlhf.train import dpo, reward, sft

        path = resolve_model(cfg.model, out)
        tok = load_tokenizer(path)
        if stage == "dpo":
            model, reference = dpo.load_models(cfg, path, tok, out, device)
            record = {"reference": held(reference)}
        else:
            model = {"sft": sft, "reward": reward}[stage].load_model(cfg, path, tok, device)
        factory.build_engine(model, cfg.train.optim, 1, stage, cfg.engine, cfg.run)
    record["world_size"] = dist.world_size()
    record["engines"] = engines
    (out / f"rank-{dist.rank()}.json").write_text(json.dumps(record), encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
    dist.finish(0)  # as the CLI ends: barrier, destroy the group, exit at once (torch 2.13's gloo teardown can abort)
