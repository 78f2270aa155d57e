"""The largest actor PPO can train within a memory budget per process, for several memory-saving set-ups.

    python bench/max_actor.py                      # budget 1.5 GiB per process, six set-ups, 3 runs each
    python bench/max_actor.py --budget-gib 3 --configs plain lora8
    python bench/max_actor.py --print-commands     # the command of each set-up, for one ladder size
    python bench/max_actor.py --configs zero3-nogather-r1 zero3-nogather zero3-nogather-r4 --hidden 768 1024 1280
                                                   # ZeRO-3 on 1, 2 and 4 ranks: the limit grows with the ranks
    python bench/max_actor.py --configs zero3-nogather-r1 zero3-nogather zero3-nogather-r4 --at-hidden 768
                                                   # no search: each set-up once at one size, peaks side by side

Method: a ladder of tiny Llama actors growing in width (4 layers, head size 64; `--hidden`). For each set-up, a
binary search over the ladder runs a short PPO job (`--iterations` iterations of `--rollout-batch` prompts,
`--max-new-tokens` response tokens) through the real CLI and measures the peak RSS (VmHWM) of every process
(bench/_runner.py). A size fits when every process of its run (every rank, for DeepSpeed) stays within the budget
over the whole run, final save included, and the run succeeds; a run is killed as soon as one of its processes
goes over. The search assumes that peak memory grows with model size, which the measured peaks let you check.

All four PPO models have the actor's size: the reference is the actor's starting weights, and the critic and the
reward model are the same backbone with a scalar head (the InstructGPT set-up; DeepSpeed-Chat often uses a smaller
reward model). On CPU, "memory" is host RSS, and it includes each process's own copy of torch and its libraries.

Under ZeRO-3 every one of the four is partitioned across the ranks: the actor and critic by their training
engines, the reference and reward model by ZeRO-3 inference engines. Per rank, the model states then shrink as
1/ranks, except for what is whole on one rank at a time: a model being loaded (before it is partitioned), the
actor's whole copy for generation (`zero3`, not `zero3-nogather`), and on rank 0 the gathered weights of the final
save. DeepSpeed set-ups always start under torchrun, one rank included, so every rank is measured alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _runner import MIB, RunResult, fmt_mib, fmt_table, machine_summary, reached_step, run_measured

DS = ["--engine.kind", "deepspeed"]
NO_GATHER = ["--engine.gather_for_generation", "False"]
CONFIGS = {
    "plain": {"ranks": 1, "flags": []},
    "lora8": {"ranks": 1, "flags": ["--lora.rank", "8"]},
    "gradckpt": {"ranks": 1, "flags": ["--engine.gradient_checkpointing", "True"]},
    "zero2": {"ranks": 2, "flags": [*DS, "--engine.zero_stage", "2"]},
    "zero2-offload": {"ranks": 2, "flags": [*DS, "--engine.zero_stage", "2", "--engine.offload_optimizer", "True"]},
    "zero3": {"ranks": 2, "flags": [*DS, "--engine.zero_stage", "3"]},
    "zero3-nogather": {"ranks": 2, "flags": [*DS, "--engine.zero_stage", "3", *NO_GATHER]},
    "zero3-r1": {"ranks": 1, "flags": [*DS, "--engine.zero_stage", "3"]},
    "zero3-r4": {"ranks": 4, "flags": [*DS, "--engine.zero_stage", "3"]},
    "zero3-nogather-r1": {"ranks": 1, "flags": [*DS, "--engine.zero_stage", "3", *NO_GATHER]},
    "zero3-nogather-r4": {"ranks": 4, "flags": [*DS, "--engine.zero_stage", "3", *NO_GATHER]},
}
"""Set-ups. LoRA (rank 8, PEFT's default targets: q_proj and v_proj) adapts the trained models, actor and critic.
`--engine.offload_frozen` is left out: on a CPU-only machine the frozen models are on the CPU already.
zero3-nogather (generation on the sharded actor, no whole copy) is not run unless asked for; nor are the rank
sweeps `-r1` and `-r4` (the same set-up on 1 and 4 ranks; 4 ranks oversubscribe a 2-core machine, which slows them
but does not change their memory)."""
DEFAULT_CONFIGS = ["plain", "lora8", "gradckpt", "zero2", "zero2-offload", "zero3"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget-gib", type=float, default=1.5, help="peak RSS allowed per process, GiB")
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    p.add_argument("--hidden", type=int, nargs="+", default=[512, 640, 768, 896, 1024, 1280, 1536],
                   help="the ladder of actor widths; 2^k - 1 sizes take exactly k runs per set-up")  # fmt: skip
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--rollout-batch", type=int, default=2, help="prompts per PPO iteration (global)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--timeout-s", type=float, default=400.0, help="a run taking longer is killed and counts as failed")
    p.add_argument("--workdir", type=Path, default=None, help="models and run directories (default: a temp directory)")
    p.add_argument("--json", type=Path, default=None, help="also write all results here (default: WORKDIR)")
    p.add_argument("--deepspeed-config", type=Path, default=None,
                   help="a DeepSpeed JSON passed to every DeepSpeed set-up (--engine.deepspeed_config)")  # fmt: skip
    p.add_argument("--at-hidden", type=int, default=None,
                   help="no search: run each set-up once at this width and compare the peaks per rank")  # fmt: skip
    p.add_argument("--print-commands", action="store_true", help="print one command per set-up and exit")
    keep = "keep the ladder models and each run's output directory (several GB at the default sizes)"
    p.add_argument("--keep-runs", action="store_true", help=keep)
    return p.parse_args(argv)


def spec(hidden: int, layers: int) -> dict:
    if hidden % 64:
        raise SystemExit(f"--hidden {hidden}: must be a multiple of the head size 64")
    return {"arch": "llama", "hidden": hidden, "layers": layers, "heads": hidden // 64}


def count_params(hidden: int, layers: int) -> int:
    """Parameters of the ladder's actor, counted on the meta device (no memory, no initialisation)."""
    import torch
    from transformers import AutoModelForCausalLM

    from chatrlhf.models.tiny import BOS_ID, EOS_ID, PAD_ID, tiny_config

    s = spec(hidden, layers)
    config = tiny_config("llama", EOS_ID + 1, s["hidden"], s["layers"], s["heads"], pad_token_id=PAD_ID,
                         bos_token_id=BOS_ID, eos_token_id=EOS_ID)  # fmt: skip
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # tied embeddings are one parameter, counted once


def model_dir(workdir: Path, hidden: int, layers: int) -> Path:
    """Build the ladder model once (random init, saved as a HF directory) and beside it `<name>-rm/`, its reward
    model and critic (its weights and a seeded random head); not part of any measurement."""
    from chatrlhf.models.load import add_value_head
    from chatrlhf.models.tiny import build_tiny_model

    path = workdir / "models" / f"llama-h{hidden}-l{layers}"
    if not (path / "config.json").is_file():
        build_tiny_model(path, **spec(hidden, layers))
    if not (path.parent / f"{path.name}-rm" / "config.json").is_file():
        add_value_head(path, path.parent / f"{path.name}-rm")
    return path


def command(config: str, model: Path, out: Path, args: argparse.Namespace) -> tuple[list[str], dict]:
    """(argv, environment) of one PPO run."""
    flags = [
        "rl", "--actor", str(model), "--reward_model", str(model.parent / f"{model.name}-rm"),
        "--data.paths", "demo:prompts:256:2",
        "--train.iterations", str(args.iterations), "--train.rollout_batch_size", str(args.rollout_batch),
        "--train.max_prompt_len", "64", "--train.generation.max_new_tokens", str(args.max_new_tokens),
        "--output_dir", str(out), "--run.log_every", "1", "--run.progress", "False", "--run.device", "cpu",
        "--checkpoint.every", "0", "--data.eval_fraction", "0", *CONFIGS[config]["flags"],
    ]  # fmt: skip
    if args.deepspeed_config is not None and DS[1] in flags:
        flags += ["--engine.deepspeed_config", str(args.deepspeed_config.resolve())]
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    ranks = CONFIGS[config]["ranks"]
    if ranks == 1 and DS[1] not in flags:
        return [sys.executable, "-m", "chatrlhf", *flags], env
    env["OMP_NUM_THREADS"] = "1"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    return [*launcher, "-m", "chatrlhf", *flags], env


def try_size(config: str, hidden: int, args: argparse.Namespace, workdir: Path, budget: int) -> dict:
    """One measured PPO run of the ladder size `hidden` under set-up `config`."""
    model = model_dir(workdir, hidden, args.layers)
    out = workdir / "runs" / f"{config}-h{hidden}"
    cmd, env = command(config, model, out, args)
    mark = reached_step(out / "metrics.jsonl", args.iterations)
    res: RunResult = run_measured(cmd, workdir / "runs" / f"{config}-h{hidden}.log", env, mark, budget, args.timeout_s)
    if not args.keep_runs:  # only the measurement is needed; a run's models and checkpoint take GBs
        shutil.rmtree(out, ignore_errors=True)
    workers = res.workers()
    peak = max((p.peak_bytes for p in res.procs), default=0)  # every process of the tree, launcher included
    train = [p.peak_at_mark_bytes for p in workers]
    if res.killed_over_budget:
        status = "over (killed)"
    elif res.timed_out:
        status = "timed out"
    elif res.returncode != 0:
        status = f"error rc {res.returncode}"
    else:
        status = "fits" if peak <= budget else "over"
    return {
        "config": config, "hidden": hidden, "layers": args.layers, "params": count_params(hidden, args.layers),
        "status": status, "fits": status == "fits", "peak_run_bytes": [p.peak_bytes for p in workers],
        "peak_train_bytes": train, "sum_run_bytes": sum(p.peak_bytes for p in workers),
        "wall_s": round(res.wall_s, 1), "other_cores": round(res.other_cores, 2),
        "load_after": res.load_after, "cmd": shlex.join(res.cmd),
    }  # fmt: skip


def probe(config: str, hidden: int, args: argparse.Namespace, workdir: Path, budget: int) -> dict:
    """`try_size`, printed as it finishes."""
    run = try_size(config, hidden, args, workdir, budget)
    peak = fmt_mib(max(run["peak_run_bytes"], default=0))
    print(f"  {config:18s} hidden {hidden:5d} ({run['params'] / 1e6:6.1f}M): {run['status']:14s} "
          f"peak {peak:>5s} MiB/process  wall {run['wall_s']:5.1f}s  other cores {run['other_cores']:.2f}",
          flush=True)  # fmt: skip
    return run


def search(config: str, args: argparse.Namespace, workdir: Path, budget: int) -> list[dict]:
    """Binary search over the ladder for the largest size that fits; returns every run made."""
    ladder = sorted(args.hidden)
    lo, hi = -1, len(ladder)  # invariant: ladder[lo] fits (or lo = -1), ladder[hi] does not (or hi = len)
    runs = []
    while hi - lo > 1:
        mid = (lo + hi) // 2
        run = probe(config, ladder[mid], args, workdir, budget)
        runs.append(run)
        if run["fits"]:
            lo = mid
        else:
            hi = mid
    return runs


def _size(run: dict | None) -> str:
    return "-" if run is None else f"h{run['hidden']} {run['params'] / 1e6:.1f}M"


def _peaks(run: dict | None) -> str:
    if run is None:
        return "-"
    peaks = "/".join(fmt_mib(x) for x in run["peak_run_bytes"])
    return f">{peaks}" if run["status"] == "over (killed)" else peaks


def summary_table(results: dict[str, list[dict]], budget: int) -> str:
    """Per set-up: the largest size that fit and its peaks, the smallest that did not, against `plain`."""
    rows = []
    base = max((r["params"] for r in results.get("plain", []) if r["fits"]), default=None)
    for config, runs in results.items():
        fit = max((r for r in runs if r["fits"]), key=lambda r: r["params"], default=None)
        fail = min((r for r in runs if not r["fits"]), key=lambda r: r["params"], default=None)
        ratio = "-" if fit is None or not base else f"{fit['params'] / base:.2f}"
        rows.append([config, str(CONFIGS[config]["ranks"]), _size(fit), ratio, _peaks(fit), _size(fail),
                     _peaks(fail), fail["status"] if fail else "-", str(len(runs))])  # fmt: skip
    header = ["set-up", "ranks", "largest fitting", "x plain", "its peak MiB/proc", "next size", "its peak MiB/proc",
              "why not", "runs"]  # fmt: skip
    return f"budget {budget / MIB:.0f} MiB per process\n" + fmt_table(header, rows)


def runs_table(results: dict[str, list[dict]]) -> str:
    rows = []
    for config, runs in results.items():
        for r in sorted(runs, key=lambda r: r["params"]):
            rows.append([config, str(r["hidden"]), f"{r['params'] / 1e6:.1f}", r["status"],
                         "/".join(fmt_mib(x) for x in r["peak_train_bytes"]),
                         "/".join(fmt_mib(x) for x in r["peak_run_bytes"]), f"{r['wall_s']:.0f}",
                         f"{r['other_cores']:.2f}"])  # fmt: skip
    header = ["set-up", "hidden", "params M", "status", "peak train MiB", "peak run MiB", "wall s", "other cores"]
    return fmt_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="chatrlhf-bench-max-actor-"))
    (workdir / "runs").mkdir(parents=True, exist_ok=True)
    budget = int(args.budget_gib * 2**30)
    if args.print_commands:
        h = sorted(args.hidden)[len(args.hidden) // 2]
        for config in args.configs:
            cmd, env = command(config, workdir / "models" / f"llama-h{h}-l{args.layers}", workdir / config, args)
            print(("OMP_NUM_THREADS=1 " if env.get("OMP_NUM_THREADS") else "") + shlex.join(cmd))
        return 0
    started, load_start = time.time(), os.getloadavg()
    machine = machine_summary()
    print(f"machine: {machine}\nload average at start: {load_start}\nworkdir: {workdir}", flush=True)
    if "zero2-offload" in args.configs:
        prebuild_cpu_adam()
    if args.at_hidden is not None:
        results = {config: [probe(config, args.at_hidden, args, workdir, budget)] for config in args.configs}
    else:
        results = {config: search(config, args, workdir, budget) for config in args.configs}
    if not args.keep_runs:
        shutil.rmtree(workdir / "models", ignore_errors=True)
    load_end = os.getloadavg()
    print()
    print(summary_table(results, budget))
    print()
    print(runs_table(results))
    print(f"\nload average: start {load_start}, end {load_end}; total {time.time() - started:.0f}s")
    path = args.json or workdir / "max_actor.json"
    data = {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, "budget_bytes": budget,
            "load_start": load_start, "load_end": load_end, "results": results}  # fmt: skip
    path.write_text(public(json.dumps(data, indent=1, default=str), workdir))
    print(f"results: {path}")
    return 0


def public(text: str, workdir: Path) -> str:
    """`text` without this machine's paths: the work directory as WORKDIR, the interpreter as python, the repository
    as ."""
    root = Path(__file__).resolve().parents[1]
    for path, name in ((workdir.resolve(), "WORKDIR"), (workdir, "WORKDIR"), (root, "."), (sys.executable, "python")):
        text = text.replace(json.dumps(str(path))[1:-1], name)
    return text


def prebuild_cpu_adam() -> None:
    """`--engine.offload_optimizer` steps with DeepSpeedCPUAdam, a C++ extension compiled on first use (minutes);
    compile it here, outside any measured run."""
    import subprocess

    code = "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()"
    print("building DeepSpeed's cpu_adam extension (cached after the first time)...", flush=True)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
