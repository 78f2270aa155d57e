"""Step time and peak memory of each chatrlhf stage: one process vs DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU ranks.

    python bench/stages.py                       # everything (about 6 minutes on a quiet 2-core machine)
    python bench/stages.py --stages sft rl --print-commands   # only show the commands it would run

For each stage (sft, reward, dpo, rl with PPO) and each configuration, one run of the real CLI as a subprocess:

    single     python -m chatrlhf STAGE ...                               (torch's default threads: one per core)
    single-1t  OMP_NUM_THREADS=1 python -m chatrlhf STAGE ...             (one thread)
    zero2      OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m chatrlhf STAGE ... --engine.kind deepspeed
               --engine.zero_stage 2                                       (two ranks, one thread each)
    zero3      the same with --engine.zero_stage 3

plus, for RL, ZeRO-3 with `--engine.gather_for_generation False` (generation on the sharded actor: every layer is
gathered for every token) against the default True (the whole actor gathered once per rollout batch).

The global batch is the same in every configuration: `batch_size` of the supervised stages is per rank, so the
2-rank runs get half of it each; RL's `rollout_batch_size` and `mini_batch_size` are already global (one optimizer
step per iteration). Both set-ups use the 2 cores: one process with 2 threads, or 2 ranks with 1 thread each.

Step time: each run logs every step (`--run.log_every 1`); a step's time is the difference of consecutive
`time/elapsed_s` values in metrics.jsonl (an RL step is a whole iteration: generate, score, train). The first
`--warmup` steps are skipped; the table gives the mean and the median of the rest. Memory: peak RSS (VmHWM) per
rank, polled from /proc by bench/_runner.py: at the last training step ("train") and over the whole run including
the final save ("run"). On CPU, memory is host RSS, which includes each process's copy of torch and its libraries
(the `import floor` row).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _runner import RunResult, fmt_mib, fmt_table, machine_summary, metrics_lines, reached_step, run_measured

CONFIGS = {
    "single": {"ranks": 1, "flags": []},
    "single-1t": {"ranks": 1, "flags": [], "threads": 1},
    "zero2": {"ranks": 2, "flags": ["--engine.kind", "deepspeed", "--engine.zero_stage", "2"]},
    "zero3": {"ranks": 2, "flags": ["--engine.kind", "deepspeed", "--engine.zero_stage", "3"]},
    "zero3-nogather": {
        "ranks": 2,
        "flags": ["--engine.kind", "deepspeed", "--engine.zero_stage", "3", "--engine.gather_for_generation", "False"],
    },
}
"""Engine configurations. `single` is the baseline (torch's default threads: one per core); `single-1t` is the same
with one thread (OMP_NUM_THREADS=1), which is both the per-rank setting of the 2-rank runs and far less hurt when
other work shares the cores. zero3-nogather only matters for RL (it changes how rollouts are generated)."""
STAGES = ("sft", "reward", "dpo", "rl")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny:llama:hidden=256,layers=4,heads=4", help="tiny preset for every stage")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    choices = ["single", "single-1t", "zero2", "zero3"]
    p.add_argument("--configs", nargs="+", default=choices, choices=choices)
    p.add_argument("--gather-repeats", type=int, default=2,
                   help="RL ZeRO-3 with gather_for_generation True and False, alternately, this many times each "
                   "(0: only the zero3 run of --configs)")  # fmt: skip
    p.add_argument("--ranks", type=int, default=2, help="DeepSpeed ranks (torchrun --nproc_per_node)")
    p.add_argument("--warmup", type=int, default=2, help="supervised steps not timed")
    p.add_argument("--steps", type=int, default=8, help="supervised steps timed (after the warm-up)")
    p.add_argument("--rl-warmup", type=int, default=2, help="RL iterations not timed")
    p.add_argument("--rl-steps", type=int, default=3, help="RL iterations timed (after the warm-up)")
    p.add_argument("--sft-batch", type=int, default=16, help="SFT sequences per optimizer step (global)")
    p.add_argument("--pair-batch", type=int, default=8, help="reward/DPO pairs per optimizer step (global)")
    p.add_argument("--rollout-batch", type=int, default=8, help="RL prompts per iteration (global)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="RL response length limit")
    p.add_argument("--workdir", type=Path, default=None, help="run directories (default: a new temp directory)")
    p.add_argument("--json", type=Path, default=None, help="also write all results here (default: WORKDIR)")
    p.add_argument("--print-commands", action="store_true", help="print the commands and exit")
    p.add_argument("--keep-runs", action="store_true", help="keep each run's output directory (models, checkpoints)")
    return p.parse_args(argv)


def make_plan(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(stage, config, run name) in run order. RL's ZeRO-3 runs with and without gathering for generation
    alternate `--gather-repeats` times, so that both see the machine in a similar state."""
    plan = []
    for stage in args.stages:
        for config in args.configs:
            if not (stage == "rl" and config == "zero3" and args.gather_repeats > 0):
                plan.append((stage, config, f"{stage}-{config}"))
    if "rl" in args.stages and args.gather_repeats > 0:
        for i in range(1, args.gather_repeats + 1):
            for config in ("zero3", "zero3-nogather"):
                plan.append(("rl", config, f"rl-{config}-{i}"))
    return plan


def stage_flags(stage: str, model: str, args: argparse.Namespace, ranks: int) -> list[str]:
    """The stage's own flags; per-rank batch sizes for the supervised stages."""
    steps = args.warmup + args.steps
    if stage == "rl":
        return [
            "--actor", model, "--reward_model", str(Path(model).parent / "rm"), "--data.paths", "demo:prompts:256:2",
            "--train.iterations", str(args.rl_warmup + args.rl_steps),
            "--train.rollout_batch_size", str(args.rollout_batch),
            "--train.max_prompt_len", "64", "--train.generation.max_new_tokens", str(args.max_new_tokens),
        ]  # fmt: skip
    global_batch = args.sft_batch if stage == "sft" else args.pair_batch
    if global_batch % ranks:
        raise SystemExit(f"global batch {global_batch} of {stage} is not a multiple of {ranks} ranks")
    return [
        "--model", model, "--data.paths", "demo:pairs:512:1", "--train.batch_size", str(global_batch // ranks),
        "--train.max_steps", str(steps), "--train.max_seq_len", "128",
    ]  # fmt: skip


COMMON = ["--run.log_every", "1", "--run.progress", "False", "--run.device", "cpu", "--checkpoint.every", "0",
          "--data.eval_fraction", "0"]  # fmt: skip
"""Every run: log every step, no progress bar, CPU, one checkpoint (at the end; it cannot be turned off), and no
held-out evaluation (it would only add time after the timed steps)."""


def command(stage: str, config: str, model: str, out: Path, args: argparse.Namespace) -> tuple[list[str], dict]:
    """(argv, environment) of one run."""
    ranks = 1 if CONFIGS[config]["ranks"] == 1 else args.ranks
    flags = [stage, *stage_flags(stage, model, args, ranks), "--output_dir", str(out), *COMMON,
             *CONFIGS[config]["flags"]]  # fmt: skip
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if ranks == 1:
        if CONFIGS[config].get("threads"):
            env["OMP_NUM_THREADS"] = str(CONFIGS[config]["threads"])
        return [sys.executable, "-m", "chatrlhf", *flags], env
    env["OMP_NUM_THREADS"] = "1"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    return [*launcher, "-m", "chatrlhf", *flags], env


def step_times(lines: list[dict], warmup: int) -> list[float]:
    """Seconds per step after the warm-up: differences of consecutive `time/elapsed_s`."""
    elapsed = {line["step"]: line["time/elapsed_s"] for line in lines}
    return [elapsed[s] - elapsed[s - 1] for s in sorted(elapsed) if s > warmup and s - 1 in elapsed]


def summarise(stage: str, config: str, res: RunResult, out: Path, args: argparse.Namespace) -> dict:
    """One run's figures: step times, RL phase times, per-rank peaks, and the machine's state meanwhile."""
    warmup = args.rl_warmup if stage == "rl" else args.warmup
    lines = metrics_lines(out / "metrics.jsonl")
    times = step_times(lines, warmup)
    row = {
        "stage": stage, "config": config, "returncode": res.returncode, "wall_s": round(res.wall_s, 1),
        "steps_timed": len(times), "step_mean_s": statistics.mean(times) if times else None,
        "step_median_s": statistics.median(times) if times else None, "step_times_s": times,
        "peak_train_bytes": [p.peak_at_mark_bytes for p in res.workers()],
        "peak_run_bytes": [p.peak_bytes for p in res.workers()],
        "launcher_peak_bytes": [p.peak_bytes for p in res.procs if p.role == "launcher"],
        "other_procs": [(p.peak_bytes, p.cmdline) for p in res.procs if p.role == "other"],
        "tree_maxrss_bytes": res.tree_maxrss_bytes, "other_cores": round(res.other_cores, 2),
        "steal_cores": round(res.steal_cores, 2), "load_before": res.load_before, "load_after": res.load_after,
        "cmd": shlex.join(res.cmd),
    }  # fmt: skip
    if stage == "rl":
        timed = [line for line in lines if line["step"] > warmup]
        for key in ("time/generate_s", "time/score_s", "time/train_s", "response/length_mean"):
            row[key] = statistics.mean(line[key] for line in timed) if timed else None
    return row


def import_floor(workdir: Path) -> dict:
    """Peak RSS of a process that only imports what a DeepSpeed RL run imports: the floor under every figure."""
    code = "import torch, transformers, deepspeed, chatrlhf.train.rl"
    res = run_measured([sys.executable, "-c", code], workdir / "import-floor.log")
    return {"peak_bytes": res.workers()[0].peak_bytes, "wall_s": round(res.wall_s, 1)}


def build_model(spec: str, workdir: Path) -> Path:
    """Build the tiny preset once (outside any timing), and beside it `rm/`, its reward model (its weights and a
    seeded random head, also PPO's critic); every run loads these directories."""
    from chatrlhf.models.load import add_value_head
    from chatrlhf.models.tiny import build_tiny_model, parse_tiny_spec

    path = workdir / "model"
    if not (path / "config.json").is_file():
        build_tiny_model(path, **parse_tiny_spec(spec))
    if not (workdir / "rm" / "config.json").is_file():
        add_value_head(path, workdir / "rm")
    return path


def _ratio(x: float | None, base: float | None) -> str:
    return "-" if x is None or not base else f"{x / base:.2f}"


def _label(row: dict) -> str:
    """The run's name without its stage: the config, plus the repeat number of repeated runs."""
    return row.get("run", row["config"]).removeprefix(row["stage"] + "-")


def _status(returncode: int) -> str:
    return "ok" if returncode == 0 else f"rc {returncode}"


def _seconds(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def step_table(rows: list[dict]) -> str:
    """Step time and per-rank memory, each against the single-process run of the same stage."""
    base = {r["stage"]: r for r in rows if r["config"] == "single"}
    out = []
    for r in rows:
        b = base.get(r["stage"], {})
        peak = max((x or 0 for x in r["peak_run_bytes"]), default=0)
        base_peak = max((x or 0 for x in b.get("peak_run_bytes", [])), default=0)
        out.append([
            r["stage"], _label(r), _seconds(r["step_mean_s"]), _seconds(r["step_median_s"]),
            _ratio(r["step_mean_s"], b.get("step_mean_s")),
            "/".join(fmt_mib(x) for x in r["peak_train_bytes"]), "/".join(fmt_mib(x) for x in r["peak_run_bytes"]),
            _ratio(peak, base_peak), f"{r['other_cores']:.2f}", _status(r["returncode"]),
        ])  # fmt: skip
    header = ["stage", "config", "step mean s", "median s", "x single", "peak train MiB/rank", "peak run MiB/rank",
              "x single", "other cores", "status"]  # fmt: skip
    return fmt_table(header, out)


def rl_table(rows: list[dict]) -> str:
    """RL phases per iteration (means over the timed iterations), against the single-process run."""
    rl = [r for r in rows if r["stage"] == "rl"]
    base = next((r for r in rl if r["config"] == "single"), {})
    out = []
    for r in rl:
        out.append([
            _label(r), _seconds(r["step_mean_s"]), _seconds(r.get("time/generate_s")),
            _ratio(r.get("time/generate_s"), base.get("time/generate_s")), _seconds(r.get("time/score_s")),
            _seconds(r.get("time/train_s")), _ratio(r.get("time/train_s"), base.get("time/train_s")),
            "-" if r.get("response/length_mean") is None else f"{r['response/length_mean']:.1f}",
        ])  # fmt: skip
    header = ["rl config", "iteration s", "generate_s", "x single", "score_s", "train_s", "x single", "resp tokens"]
    return fmt_table(header, out) + gather_line(rl)


def gather_line(rl: list[dict]) -> str:
    """ZeRO-3 rollout time with and without gathering the whole actor, over all runs of each."""
    gen = {c: [r["time/generate_s"] for r in rl if r["config"] == c and r.get("time/generate_s")]
           for c in ("zero3", "zero3-nogather")}  # fmt: skip
    if not all(gen.values()):
        return ""
    on, off = statistics.mean(gen["zero3"]), statistics.mean(gen["zero3-nogather"])
    return (
        f"\nZeRO-3 time/generate_s per iteration, mean of {len(gen['zero3'])} and {len(gen['zero3-nogather'])} "
        f"runs: gather_for_generation True {on:.3f}s, False {off:.3f}s (False/True = {off / on:.2f})"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="chatrlhf-bench-stages-"))
    workdir.mkdir(parents=True, exist_ok=True)
    plan = make_plan(args)
    if args.print_commands:
        for stage, config, name in plan:
            cmd, env = command(stage, config, str(workdir / "model"), workdir / name, args)
            prefix = "OMP_NUM_THREADS=1 " if env.get("OMP_NUM_THREADS") == "1" else ""
            print(prefix + shlex.join(cmd))
        return 0
    started = time.time()
    machine = machine_summary()
    load_start = os.getloadavg()
    print(f"machine: {machine}\nload average at start: {load_start}\nworkdir: {workdir}", flush=True)
    model = str(build_model(args.model, workdir))
    floor = import_floor(workdir)
    rows = []
    for stage, config, name in plan:
        out = workdir / name
        cmd, env = command(stage, config, model, out, args)
        total = args.rl_warmup + args.rl_steps if stage == "rl" else args.warmup + args.steps
        res = run_measured(cmd, workdir / f"{name}.log", env, mark=reached_step(out / "metrics.jsonl", total))
        rows.append(summarise(stage, config, res, out, args))
        r = rows[-1]
        r["run"] = name
        if not args.keep_runs:  # its metrics are read; the saved models and checkpoints only fill the disk
            shutil.rmtree(out, ignore_errors=True)
        step = _seconds(r["step_mean_s"])
        print(f"  {stage:6s} {config:15s} rc={res.returncode} wall {res.wall_s:5.1f}s  step {step}s"
              f"  other cores {res.other_cores:.2f}  load {res.load_after[0]:.2f}", flush=True)  # fmt: skip
    load_end = os.getloadavg()
    print(f"\nmodel {args.model}; import floor (peak RSS of `import torch, transformers, deepspeed`): "
          f"{fmt_mib(floor['peak_bytes'])} MiB")  # fmt: skip
    print(step_table(rows))
    if "rl" in args.stages:
        print()
        print(rl_table(rows))
    print(f"\nload average: start {load_start}, end {load_end}; total {time.time() - started:.0f}s")
    result = {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, "import_floor": floor,
              "load_start": load_start, "load_end": load_end, "runs": rows}  # fmt: skip
    path = args.json or workdir / "stages.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"results: {path}")
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
