"""One AdamW step of chatrlhf's engines, fused (`optim.fused`, the default) against torch's default implementation.

For each model size, a tiny random Llama (4 layers, byte vocabulary, as the other benches build) gets random
gradients, and the two optimizers that `engine/base.py:adamw` builds for it — `fused=True` and `fused=False` — step
over the same parameters in alternating rounds (so a change in the machine's load hits both alike). Per round, the
median over `--steps` steps; per implementation, the median of the rounds; then default ÷ fused. The models' weights
move at every step; only the time is of interest here (tests/engine/test_optimizer.py checks the update).

    python bench/optimizer.py --hidden 128 256 512 1024 --threads 1 --json bench/results/optimizer.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _runner import fmt_table, machine_summary, write_json

from chatrlhf.config import OptimConfig
from chatrlhf.engine.base import adamw, param_groups
from chatrlhf.models.tiny import BOS_ID, EOS_ID, PAD_ID, tiny_config


def model(hidden: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config("llama", EOS_ID + 1, hidden, 4, 4, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
                         eos_token_id=EOS_ID)  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


def step_times(opt: torch.optim.Optimizer, steps: int) -> float:
    """Median seconds of one `step()` over `steps` steps."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(hidden: int, rounds: int, steps: int) -> dict:
    net = model(hidden)
    params = [p for p in net.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    optimizers = {
        fused: adamw(param_groups(net, 0.01), OptimConfig(lr=1e-5, weight_decay=0.01, fused=fused))
        for fused in (True, False)
    }
    for opt in optimizers.values():  # the first steps allocate the moments
        step_times(opt, 2)
    runs = {fused: [] for fused in optimizers}
    for _ in range(rounds):
        for fused, opt in optimizers.items():
            runs[fused].append(step_times(opt, steps))
    fused_s, default_s = statistics.median(runs[True]), statistics.median(runs[False])
    return {
        "hidden": hidden,
        "parameters": sum(p.numel() for p in params),
        "fused_ms": fused_s * 1e3,
        "default_ms": default_s * 1e3,
        "fused_runs_ms": [t * 1e3 for t in runs[True]],
        "default_runs_ms": [t * 1e3 for t in runs[False]],
        "default_over_fused": default_s / fused_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the other benches use 1)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(h, args.rounds, args.steps) for h in args.hidden]
    print(f"torch {torch.__version__}, {args.threads} thread(s); median of {args.rounds} rounds × {args.steps} steps")
    print(fmt_table(
        ["hidden", "parameters", "fused ms/step", "default ms/step", "default ÷ fused"],
        [[str(r["hidden"]), f"{r['parameters'] / 1e6:.1f}M", f"{r['fused_ms']:.2f}", f"{r['default_ms']:.2f}",
          f"{r['default_over_fused']:.2f}"] for r in rows],
    ))  # fmt: skip
    if args.json:
        write_json(args.json, {"machine": machine_summary(), "threads": args.threads, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
