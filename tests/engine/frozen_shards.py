"""Run under torchrun by tests/engine/test_deepspeed.py: build a stage's frozen models as the stage does and write,
per rank, what each rank holds of each of them, read from DeepSpeed's own parameter attributes.

    python -m torch.distributed.run --nproc_per_node 2 tests/engine/frozen_shards.py OUT rl|dpo ARGS...

`OUT/rank-R.json` maps each frozen model (`reference`, `reward_model`) to `params`, per parameter (by its order in
the model): the elements of the rank's partition (`ds_tensor.numel()`, None when the parameter is not a ZeRO-3
parameter) and of the tensor the parameter holds outside a forward (`numel()`: 0 when it is released); and to
`offload_param`, the device of DeepSpeed's parameter offload for it (None without one, or without a DeepSpeed engine);
and `loaded_partitioned`, per model handed to the inference engine (in order), whether every one of its parameters
was already a partitioned ZeRO-3 parameter (`ds_id`, nothing held locally) when it arrived: loaded straight into
shards, never whole on the rank.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from chatrlhf import distributed as dist
from chatrlhf.cli import parse
from chatrlhf.engine import factory


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
    arrived: list[bool] = []
    shard = factory.shard_frozen

    def recording(model, engine, dtype):
        arrived.append(all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters()))
        return shard(model, engine, dtype)

    factory.shard_frozen = recording
    cfg = parse(stage, args)
    cfg.validate(need_data=False)
    cfg.validate_options()
    device = factory.start(cfg.engine, cfg.run)
    if stage == "rl":
        from chatrlhf.train.algorithms import ALGORITHMS
        from chatrlhf.train.rl_models import build_models

        m = build_models(cfg, ALGORITHMS[cfg.train.algo], out, device)
        models = {"reference": m.reference, "reward_model": m.scorer.modules()[0]}
    else:
        from chatrlhf.models.load import load_tokenizer
        from chatrlhf.train.dpo import load_models

        _, reference = load_models(cfg, cfg.model, load_tokenizer(cfg.model), out, device)
        models = {"reference": reference}
    record = {name: held(model) for name, model in models.items()}
    record["world_size"] = dist.world_size()
    record["loaded_partitioned"] = arrived
    (out / f"rank-{dist.rank()}.json").write_text(json.dumps(record), encoding="utf-8")
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
