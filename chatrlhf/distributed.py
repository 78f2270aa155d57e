"""Data-parallel bookkeeping: which rank this process is, its share of a batch, and sums across ranks.

Every rank builds the same global batch from the same seed and takes its contiguous share, so the run sees the
same data in the same order whatever the number of ranks (a 2-rank run with `batch_size 4` trains on the same
micro-batches as one process with `batch_size 8`). Losses are normalised by global counts (tokens, pairs), which
every rank knows without talking to the others. We never write collectives beyond a scalar sum and a gather of
rollout tensors (and of a rollout's played episodes); sharding and gradient reduction are DeepSpeed's.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init(device_type: str) -> None:
    """Join the process group the launcher (torchrun / deepspeed) describes in the environment; a process started
    without a launcher becomes a group of one (DeepSpeed otherwise looks for MPI)."""
    if is_distributed():
        return
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo")


def finish(code: int) -> None:
    """End a distributed process without the gloo teardown crash seen with torch 2.13 (an abort at exit after the
    work finished, in about 1 run in 10): barrier, destroy the group, flush, and leave at once."""
    if not is_distributed():
        return
    try:
        dist.barrier()
        dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def shard(items: Sequence[T]) -> tuple[list[T], float]:
    """This rank's contiguous share of a global batch, and the weight of its loss (1, or 0 for a stand-in).

    Shares differ in size by at most one. When a batch (an epoch's last) has fewer items than ranks, a rank left
    without any takes the batch's first item with weight 0: it runs the same forward and backward as the others
    (ZeRO-3 needs every rank in every collective) but adds nothing to the gradient.
    """
    r, w = rank(), world_size()
    n = len(items)
    start, stop = r * n // w, (r + 1) * n // w
    if start == stop:
        return [items[0]], 0.0
    return list(items[start:stop]), 1.0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def sum_across(value: float) -> float:
    """Sum a Python float over ranks (a logging statistic; every rank gets the total)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item())


def sum_tensor_across(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (every rank gets the total); rows filled by one rank each add up to the whole."""
    if not is_distributed():
        return t
    device = t.device if dist.get_backend() == "nccl" else torch.device("cpu")
    out = t.to(device).clone()
    dist.all_reduce(out)
    return out.to(t.device)


def gather_padded(t: torch.Tensor, pad_value: float | int, left: bool = False) -> torch.Tensor:
    """Concatenate (B_r, L_r) tensors from all ranks in rank order into (ΣB_r, max L_r), right-padding with
    `pad_value` (rollouts of different lengths), or left-padding with `left` (left-padded prompts, whose last
    token must stay next to the response)."""
    if not is_distributed():
        return t
    device = t.device if dist.get_backend() == "nccl" else torch.device("cpu")
    shape = torch.tensor(list(t.shape), device=device)
    shapes = [torch.zeros_like(shape) for _ in range(world_size())]
    dist.all_gather(shapes, shape)
    rows = max(int(s[0]) for s in shapes)
    width = max(int(s[1]) for s in shapes) if t.dim() > 1 else 0
    padded = torch.full((rows, *([width] if t.dim() > 1 else [])), pad_value, dtype=t.dtype, device=device)
    if t.dim() > 1 and left:
        padded[: t.shape[0], width - t.shape[1] :] = t.to(device)
    elif t.dim() > 1:
        padded[: t.shape[0], : t.shape[1]] = t.to(device)
    else:
        padded[: t.shape[0]] = t.to(device)
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    out = torch.cat([p[: int(s[0])] for p, s in zip(parts, shapes)])
    return out.to(t.device)


def gather_objects(items: list[T]) -> list[T]:
    """Concatenate picklable lists from all ranks in rank order (the played episodes of a rollout's shares)."""
    if not is_distributed():
        return items
    parts: list[list[T] | None] = [None] * world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def sum_dict_across(values: dict[str, float]) -> dict[str, float]:
    """Sum each value over ranks, in one collective (every rank must pass the same keys)."""
    if not is_distributed():
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))
