"""How the cost of an RL step grows: step time and peak memory as response length, batch, group and model double.

From one small base point (`--base-*`), one quantity at a time is multiplied by 2^k for k in `--doublings`, all
else fixed; each point is one `chatrlhf rl --train.algo grpo` run (its real CLI, a subprocess), measured from
outside by `_runner` (peak RSS, the CPU other work used meanwhile). The four axes:
- response length: `--train.generation.max_new_tokens`; every response runs to it (below);
- batch: `--train.rollout_batch_size`, prompts per iteration;
- group: `--train.group_size`, samples per prompt;
- model size: layers of the tiny Llama at a fixed width, so the parameters double with each step (up to the
  embedding's small share); the x value is the actor's parameter count.

The workload is `trl_compare`'s: a random-init tiny Llama with the byte tokenizer, made unable to sample its
special tokens (so no response ends before `max_new_tokens`, and the script checks `response/length_mean` of every
iteration); demo prompts of one token length only (no point pads a prompt more than another); the reward
`trl_compare:letter_share`, a Python function, so no reward model runs. Everything else is `chatrlhf rl`'s default
for GRPO: one mini-batch and one micro-batch (every sequence of the iteration in one forward/backward), one
optimizer step per iteration, the reference forward for the KL penalty.

Step time is the interval between two consecutive iterations' `time/elapsed_s` in metrics.jsonl, the median over
the iterations after `--warmup`; the phases (`time/generate_s`, `time/score_s`, `time/forward_s`, `time/train_s`,
docs/metrics.md) are medians over the same iterations, and `other` is the step's remainder (logging, the doctor,
reading the next prompts). The script also runs the CLI with two clocks installed (`clocks`): the process's CPU
seconds between consecutive optimizer steps (one per iteration) and inside each `generate()` call. With one torch
thread (`--threads 1`), waiting for a core that other work holds costs wall time but not CPU time, so on a shared
machine the CPU series keep the shape that the wall series lose to the load. Peak memory is the run's peak RSS
(`VmHWM`), final save included. The base point runs first and again last: the two show how much the machine's load
moved during the sweep. The other points run in a seeded shuffled order, so that a drift of the load does not line
up with any axis.

For each axis and each series (step, phases, peak RSS) the script fits the exponent k of cost ∝ x^k by least
squares on log-log (`loglog_slope`): k ≈ 1 is linear, k ≈ 2 quadratic, k ≈ 0 a cost that does not depend on x.
Peak RSS is mostly fixed (torch, the models, the optimizer), so it also gets a straight-line fit a + b·x
(`linear_fit`): a the fixed part, b the MiB each unit of x adds. Prints the tables, writes every figure to `--json`
and the log-log plot to `--plot`.

    python bench/cost_growth.py --json bench/results/cost_growth.json --plot bench/results/cost_growth.png
    python bench/cost_growth.py --from-json bench/results/cost_growth.json --plot out.png   # tables, plot; no runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

from _runner import MIB, fmt_mib, fmt_table, machine_summary, metrics_lines, run_measured, write_json

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
AXES = {
    "new_tokens": "response length (tokens)",
    "batch": "rollout_batch_size (prompts)",
    "group": "group_size (samples per prompt)",
    "layers": "model size (parameters; layers double)",
}
"""The swept quantities and their axis labels; a point is a dict of the four."""
PHASES = ("time/generate_s", "time/score_s", "time/forward_s", "time/train_s")
SERIES = ("step", "generate", "score", "forward", "train", "other", "cpu_step", "cpu_generate")
"""The timed series of each point: the whole step, its four phases and the remainder (wall seconds, from
metrics.jsonl), then the CPU seconds of the step and of its `generate()` call (`clocks`)."""
FITTED = tuple(s for s in SERIES if s != "other")


# ------------------------------------------------------------------------------------------------ the fits


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """k of y = c·x^k, fitted by least squares on (log x, log y): the covariance of the logs over the variance of
    log x. Needs two distinct x and every x, y > 0."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(a, b) of the least-squares line y = a + b·x."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


# ------------------------------------------------------------------------------------------------ the points


def sweep_points(base: dict, doublings: list[int]) -> list[tuple[str, dict]]:
    """(axis, point) for every axis and every k ≠ 0 of `doublings`: the base with that axis × 2^k. The base point
    itself is not in the list (it belongs to every axis)."""
    points = []
    for axis in AXES:
        for k in doublings:
            if k != 0:
                value = base[axis] * 2.0**k
                if value != int(value) or value < 1:
                    raise SystemExit(f"--base-{axis.replace('_', '-')} {base[axis]} × 2^{k} is not a whole number")
                points.append((axis, {**base, axis: int(value)}))
    return points


def point_name(p: dict) -> str:
    return f"t{p['new_tokens']}-b{p['batch']}-g{p['group']}-l{p['layers']}"


def parameter_count(model_dir: Path) -> int:
    """The parameters of a saved model (the actor; its input and output embeddings are separate tensors)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return sum(p.numel() for p in model.parameters())


def clocks(path: Path) -> None:
    """In the chatrlhf process: stamp the wall clock and the process's CPU clock (all its threads) after every
    optimizer step (torch's global step hook; GRPO makes one per iteration, last) and around every `generate()`
    call (a wrapper around transformers' `GenerationMixin.generate`); written to `path` at exit."""
    import atexit
    import time

    from torch.optim.optimizer import register_optimizer_step_post_hook
    from transformers.generation.utils import GenerationMixin

    seen: dict[str, list] = {"steps": [], "generate": []}

    def stamp() -> list[float]:
        return [time.perf_counter(), time.process_time()]

    register_optimizer_step_post_hook(lambda opt, args, kwargs: seen["steps"].append(stamp()))
    generate = GenerationMixin.generate

    def timed(self, *args, **kwargs):
        start = stamp()
        out = generate(self, *args, **kwargs)
        seen["generate"].append([start, stamp()])
        return out

    GenerationMixin.generate = timed
    atexit.register(lambda: path.write_text(json.dumps(seen)))


def chatrlhf_worker(clock_path: Path, args: list[str]) -> int:
    """`chatrlhf rl ARGS` (its CLI's `main`, as `python -m chatrlhf` runs it) with the clocks installed."""
    clocks(clock_path)
    from chatrlhf.cli import main

    return main(args)


def rl_args(model: Path, prompts: Path, out: Path, p: dict, iterations: int) -> list[str]:
    """The arguments of `chatrlhf` for point `p` (module docstring)."""
    return [
        "rl", "--actor", str(model),
        "--reward_functions", "trl_compare:letter_share", "--output_dir", str(out),
        "--data.paths", str(prompts), "--data.eval_fraction", "0", "--train.algo", "grpo",
        "--train.group_size", str(p["group"]), "--train.rollout_batch_size", str(p["batch"]),
        "--train.iterations", str(iterations), "--train.max_prompt_len", "64",
        "--train.generation.max_new_tokens", str(p["new_tokens"]), "--run.device", "cpu",
        "--checkpoint.every", "0", "--run.log_every", "1", "--run.progress", "False", "--run.overwrite", "True",
    ]  # fmt: skip


def intervals(ends: list[float]) -> list[float]:
    """Iteration k's time from the clock at the end of each iteration: end(k) − end(k−1), for k = 2, 3, ..."""
    return [b - e for e, b in zip(ends, ends[1:])]


def run_point(p: dict, model: Path, prompts: Path, workdir: Path, tag: str, a: argparse.Namespace) -> dict:
    """One measured run of point `p`: its step times, phases, peak RSS; refuses a response shorter than asked."""
    out = workdir / f"{point_name(p)}-{tag}"
    n = a.warmup + a.iterations
    args = rl_args(model, prompts, out, p, n)
    clock_path = workdir / f"{out.name}-clocks.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker-clocks", str(clock_path), "--", *args]
    threads = str(a.threads)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{BENCH}", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    res = run_measured(cmd, workdir / f"{out.name}.log", env=env, timeout_s=a.timeout)
    if res.returncode != 0:
        raise SystemExit(f"{out.name} failed ({res.returncode}); see {workdir / (out.name + '.log')}")
    lines = [m for m in metrics_lines(out / "metrics.jsonl") if "time/generate_s" in m]
    seen = json.loads(clock_path.read_text())
    assert len(lines) == len(seen["steps"]) == len(seen["generate"]) == n, (
        f"{out.name}: {len(lines)} iterations logged, {len(seen['steps'])} optimizer steps, "
        f"{len(seen['generate'])} generate() calls; the workload has one each per iteration, {n}"
    )
    lengths = [m["response/length_mean"] for m in lines]
    assert all(x == p["new_tokens"] for x in lengths), f"{out.name}: response lengths {lengths}"
    ends = [m["time/elapsed_s"] for m in lines]
    steps = intervals(ends)[a.warmup - 1 :]
    kept = lines[a.warmup :]
    phases = {k.removeprefix("time/").removesuffix("_s"): [m[k] for m in kept] for k in PHASES}
    other = [s - sum(v[i] for v in phases.values()) for i, s in enumerate(steps)]
    cpu_step = intervals([cpu for _, cpu in seen["steps"]])[a.warmup - 1 :]
    cpu_generate = [end[1] - start[1] for start, end in seen["generate"]][a.warmup :]
    per = {"step": steps, **phases, "other": other, "cpu_step": cpu_step, "cpu_generate": cpu_generate}
    worker = res.workers()[0]
    return {
        "point": p,
        "command": " ".join([f"OMP_NUM_THREADS={threads} PYTHONPATH=bench python -m chatrlhf", *args]).replace(
            str(workdir), "WORKDIR"
        ),
        "seconds": per,
        "median_s": {k: statistics.median(v) for k, v in per.items()},
        "sequences_per_iteration": p["batch"] * p["group"],
        "response_tokens_per_iteration": p["batch"] * p["group"] * p["new_tokens"],
        "peak_rss_bytes": worker.peak_bytes,
        "tree_maxrss_bytes": res.tree_maxrss_bytes,
        "wall_s": res.wall_s,
        "other_cores": res.other_cores,
        "steal_cores": res.steal_cores,
    }


# ------------------------------------------------------------------------------------------------ the report


def axis_summary(axis: str, runs: list[dict], params: dict[int, int]) -> dict:
    """The points of one axis in order, their x values and the fitted exponents (module docstring)."""
    x_of = (lambda p: params[p["layers"]]) if axis == "layers" else (lambda p: p[axis])
    xs = [x_of(r["point"]) for r in runs]
    slopes = {s: loglog_slope(xs, [r["median_s"][s] for r in runs]) for s in FITTED}
    rss_mib = [r["peak_rss_bytes"] / MIB for r in runs]
    fixed, per_unit = linear_fit(xs, rss_mib)
    return {
        "axis": axis,
        "label": AXES[axis],
        "x": xs,
        "values": [r["point"][axis] for r in runs],
        "median_s": {s: [r["median_s"][s] for r in runs] for s in SERIES},
        "peak_rss_mib": rss_mib,
        "other_cores": [r["other_cores"] for r in runs],
        "slope": {**slopes, "peak_rss": loglog_slope(xs, rss_mib)},
        "peak_rss_line_mib": {"fixed": fixed, "per_unit": per_unit},
    }


def plot(summaries: list[dict], path: Path, cores: int) -> None:
    """Time per phase (top) and peak RSS (bottom) against each axis, log-log, each series with its exponent; the
    title says how busy the machine's other cores were (the median over the points of `other cores`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, axes = plt.subplots(2, len(summaries), figsize=(4.2 * len(summaries), 7.2), squeeze=False)
    for col, s in enumerate(summaries):
        top, bottom = axes[0][col], axes[1][col]
        for series, style in (("step", "k-o"), ("cpu_step", "k--."), ("generate", "-s"), ("train", "-^"),
                              ("forward", "-v"), ("score", ":x")):  # fmt: skip
            top.plot(s["x"], s["median_s"][series], style, label=f"{series} (k={s['slope'][series]:.2f})")
        top.set_title(s["label"], fontsize=10)
        top.set_ylabel("median seconds per iteration" if col == 0 else "")
        top.legend(fontsize=8)
        bottom.plot(s["x"], s["peak_rss_mib"], "k-o", label=f"peak RSS (k={s['slope']['peak_rss']:.2f})")
        bottom.set_ylabel("peak RSS, MiB" if col == 0 else "")
        bottom.set_xlabel("parameters" if s["axis"] == "layers" else s["label"].split(" (")[0])
        bottom.legend(fontsize=8)
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_xticks(s["x"])
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e6:.1f}M" if v >= 1e5 else f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
        bottom.set_yticks([round(v) for v in s["peak_rss_mib"]])
        bottom.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}"))
        bottom.yaxis.set_minor_formatter(NullFormatter())
    busy = statistics.median(c for s in summaries for c in s["other_cores"])
    fig.suptitle(f"chatrlhf rl (GRPO), tiny Llama, {cores}-vCPU CPU, other cores busy {busy:.2f}: wall seconds per "
                 "iteration (solid), CPU seconds (dashed), peak RSS; cost ∝ x^k, k fitted on log-log",
                 fontsize=11)  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def print_tables(summaries: list[dict], base_runs: list[dict], a: dict) -> None:
    """The points and the fits of every axis; `a` is the run's arguments (the JSON's `args`)."""
    rows = []
    for s in summaries:
        for i, v in enumerate(s["values"]):
            rows.append([s["axis"], str(v), f"{s['x'][i]:,}", *(f"{s['median_s'][k][i]:.3f}" for k in SERIES),
                         f"{s['peak_rss_mib'][i]:.0f}", f"{s['other_cores'][i]:.2f}"])  # fmt: skip
    print()
    print(f"GRPO, hidden {a['hidden']}, {a['threads']} thread(s); median seconds per iteration over "
          f"{a['iterations']} iterations after {a['warmup']}")  # fmt: skip
    print(fmt_table(["axis", "value", "x", *SERIES, "peak RSS MiB", "other cores"], rows))
    print()
    print("fitted exponent k of cost ∝ x^k (log-log least squares); peak RSS also as a + b·x")
    rows = [[s["axis"], *(f"{s['slope'][k]:.2f}" for k in (*FITTED, "peak_rss")),
             f"{s['peak_rss_line_mib']['fixed']:.0f} + {s['peak_rss_line_mib']['per_unit']:.3g}·x"]
            for s in summaries]  # fmt: skip
    print(fmt_table(["axis", *FITTED, "peak RSS", "peak RSS MiB line"], rows))
    first, last = base_runs
    print()
    print(f"base point first / last: step {first['median_s']['step']:.3f} / {last['median_s']['step']:.3f} s, "
          f"peak RSS {fmt_mib(first['peak_rss_bytes'])} / {fmt_mib(last['peak_rss_bytes'])} MiB, other cores "
          f"{first['other_cores']:.2f} / {last['other_cores']:.2f}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-new-tokens", type=int, default=32)
    parser.add_argument("--base-batch", type=int, default=4, help="prompts per iteration at the base point")
    parser.add_argument("--base-group", type=int, default=4)
    parser.add_argument("--base-layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256, help="width of every model (fixed)")
    parser.add_argument("--doublings", type=int, nargs="+", default=[-1, 0, 1, 2], help="the points: base × 2^k")
    parser.add_argument("--iterations", type=int, default=5, help="measured iterations per run")
    parser.add_argument("--warmup", type=int, default=1, help="iterations left out at the start of each run")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--seed", type=int, default=0, help="of the order the points run in")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--from-json", type=Path, default=None, help="print and plot a saved JSON; run nothing")
    parser.add_argument("--worker-clocks", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker_clocks:
        return chatrlhf_worker(a.worker_clocks, a.rest)
    if a.from_json:
        payload = json.loads(a.from_json.read_text())
        print_tables(payload["summary"], payload["base_first_last"], payload["args"])
        if a.plot:
            plot(payload["summary"], a.plot, payload["machine"]["cores"])
        return 0
    assert a.warmup >= 1, "--warmup must be at least 1 (the first iteration's time has no iteration before it)"
    assert 0 in a.doublings, "--doublings must include 0, the base point"

    from trl_compare import build_model, prompt_texts

    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="chatrlhf-cost-"))
    workdir.mkdir(parents=True, exist_ok=True)
    base = {"new_tokens": a.base_new_tokens, "batch": a.base_batch, "group": a.base_group, "layers": a.base_layers}
    points = sweep_points(base, a.doublings)
    random.Random(a.seed).shuffle(points)

    models, params = {}, {}
    for layers in sorted({base["layers"], *(p["layers"] for _, p in points)}):
        models[layers] = build_model(workdir / f"l{layers}", a.hidden, layers)
        params[layers] = parameter_count(models[layers])
    most_prompts = max(p["batch"] for _, p in [("", base), *points]) * (a.warmup + a.iterations)
    prompts = workdir / "prompts.jsonl"
    texts = prompt_texts(models[base["layers"]], most_prompts)
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))

    order = [("base", base), *points, ("base", base)]
    runs: list[tuple[str, dict]] = []
    for i, (axis, p) in enumerate(order):
        print(f"[{i + 1}/{len(order)}] {axis}: {point_name(p)} ...", flush=True)
        row = run_point(p, models[p["layers"]], prompts, workdir, f"r{i}", a)
        runs.append((axis, row))
        print(f"  step {row['median_s']['step']:.3f} s, peak RSS {fmt_mib(row['peak_rss_bytes'])} MiB, "
              f"other cores {row['other_cores']:.2f}", flush=True)  # fmt: skip

    base_runs = [r for axis, r in runs if axis == "base"]
    summaries = []
    for axis in AXES:
        mine = [r for ax, r in runs if ax == axis] + base_runs[:1]
        summaries.append(axis_summary(axis, sorted(mine, key=lambda r: r["point"][axis]), params))
    args = {k: "WORKDIR" if k == "workdir" else str(v) for k, v in vars(a).items()
            if k not in ("worker_clocks", "rest", "from_json")}  # fmt: skip
    print_tables(summaries, base_runs, args)
    if a.plot:
        plot(summaries, a.plot, os.cpu_count() or 0)
    payload = {
        "machine": machine_summary(),
        "args": args,
        "base": base,
        "parameters_by_layers": params,
        "wall_s": sum(r["wall_s"] for _, r in runs),
        "summary": summaries,
        "base_first_last": base_runs,
        "runs": [{"axis": axis, "order": i, **r} for i, (axis, r) in enumerate(runs)],
    }
    write_json(a.json or workdir / "cost_growth.json", payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
