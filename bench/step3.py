"""DeepSpeed-Chat's step-3 benchmark setting: one PPO iteration's throughput, phases and memory per rollout backend.

The setting of DeepSpeed-Chat's step-3 benchmark (its `BenckmarkSetting.md`): a random-init OPT-1.3B-shaped actor,
OPT-350M-shaped reward model and critic (the critic starts from the reward model), prompts of 256 tokens and 256
generated tokens forced to full length, the generation batch equal to the training batch (one mini-batch), one PPO
epoch; DeepSpeed-Chat's step-3 defaults otherwise (chatrlhf's PPO defaults are those: docs/algorithms.md §4).

What the models are: OPT configs of those shapes (`ACTORS`, `REWARD_MODELS`), random-init and saved with
chatrlhf's byte tokenizer (nothing is downloaded). The actor keeps OPT's vocabulary of 50272 (so its output layer
costs what OPT-1.3B's does) but cannot sample EOS nor any id the byte tokenizer lacks: the final layer norm's
dimension 0 is the constant 1 (weight 0, bias 1) and those ids' output rows hold −50 there, so every response is
exactly `--new-tokens` long and decodes to bytes. Each prompt is demo text padded to exactly `--prompt-tokens`
tokens as chatrlhf renders it (checked).

Each run is `chatrlhf rl` (PPO) for `--warmup` + `--iterations` iterations, measured from outside
(`_runner.run_measured`: peak RSS); from its metrics.jsonl, over the iterations after the warm-up: the iteration
(the interval between two metrics lines), its phases (`time/sync_s`, `time/generate_s`, `time/score_s`,
`time/forward_s`, `time/train_s`; docs/metrics.md) and `memory/device_peak_gib` (CUDA), medians; samples/s =
batch ÷ iteration, tokens/s = batch × (prompt + generated tokens) ÷ iteration, generated tokens/s = batch ×
generated tokens ÷ `time/generate_s`. Every kept iteration must have generated full-length responses
(`response/length_mean`), or the script stops. A run that fails (e.g. out of device memory) is reported as such and
the next actor size is skipped for that backend: `--actors` in increasing size finds the largest that fits.
`standalone` and `standalone-graphs` run vLLM on its own (bench/rollout_phases.py's worker) on the same prompts,
the first with the settings chatrlhf's backend starts vLLM with (eager, its default share of the GPU), the second
with CUDA graphs as vLLM runs by default; `vllm-graphs` is chatrlhf's with `--train.rollout.enforce_eager False`:
chatrlhf's vLLM rollout (`time/generate_s`, sync and check included) as a fraction of the standalone throughput
with the same graph setting is printed.

    python bench/step3.py --backends hf vllm --json bench/results/step3.json          # on a GPU
    python bench/step3.py --actors opt-1.3b opt-2.7b opt-6.7b --backends vllm         # the largest that fits
    python bench/step3.py --preset tiny --device cpu --dtype float32                  # the same path, tiny, on a CPU

`--` passes the rest to every `chatrlhf rl` command (e.g. `-- --engine.kind deepspeed --engine.zero_stage 2`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from _runner import fmt_mib, fmt_table, full_length_iterations, machine_summary, run_measured, write_json

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("hf", "vllm", "vllm-graphs", "standalone", "standalone-graphs")
"""chatrlhf's two rollout backends (vLLM eager, its default, and with `--train.rollout.enforce_eager False`), and
vLLM on its own as chatrlhf starts it and as vLLM runs by default (CUDA graphs)."""
PHASES = ("time/sync_s", "time/generate_s", "time/score_s", "time/forward_s", "time/train_s")
OPT_VOCAB = 50272
ACTORS = {  # OPT's published shapes: hidden, layers, heads, FFN
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192),
    "opt-2.7b": dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240),
    "opt-6.7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384),
    "opt-13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, ffn_dim=20480),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, ffn_dim=256, vocab_size=512),
}
REWARD_MODELS = {  # OPT-350M: post-layer-norm, 512-wide embeddings projected to 1024
    "opt-350m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                     word_embed_proj_dim=512, do_layer_norm_before=False),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, ffn_dim=256, vocab_size=512),
}  # fmt: skip
PRESETS = {  # actors, reward model, prompt tokens, generated tokens, batch (DeepSpeed-Chat: 4 per GPU [16])
    "dschat": (["opt-1.3b"], "opt-350m", 256, 256, 16),
    "tiny": (["tiny"], "tiny", 96, 16, 4),
}


def opt_config(shape: dict, positions: int):
    from transformers import OPTConfig

    from chatrlhf.models.tiny import BOS_ID, EOS_ID, PAD_ID

    return OPTConfig(**{"vocab_size": OPT_VOCAB, "max_position_embeddings": positions, "word_embed_proj_dim":
                        shape["hidden_size"], "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
                        "pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, **shape})  # fmt: skip


def save(model, out: Path, dtype: str) -> Path:
    import torch

    from chatrlhf.models.tiny import byte_tokenizer

    model.to(getattr(torch, dtype)).save_pretrained(out)
    byte_tokenizer(max_length=model.config.max_position_embeddings).save_pretrained(out)
    return out


def build_actor(workdir: Path, name: str, positions: int, dtype: str) -> Path:
    """The actor `name` (module docstring), reused when `workdir/name` exists."""
    import torch
    from transformers import AutoModelForCausalLM

    from chatrlhf.models.tiny import EOS_ID, TINY_VOCAB_SIZE

    out = workdir / name
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(opt_config(ACTORS[name], positions))
    with torch.no_grad():
        norm = model.model.decoder.final_layer_norm  # its dimension 0 becomes the constant 1 ...
        norm.weight[0], norm.bias[0] = 0.0, 1.0
        head = model.model.decoder.embed_tokens.weight.detach().clone()
        head[[EOS_ID, *range(TINY_VOCAB_SIZE, head.shape[0])], 0] = -50.0  # ... which these ids' rows weigh by -50
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(head)
    return save(model, out, dtype)


def build_reward_model(workdir: Path, name: str, positions: int, dtype: str) -> Path:
    """The reward model `name`: a 1-label OPT sequence classifier with a seeded score head whose scores stay far
    inside the ±5 reward clip; reused when `workdir/name-rm` exists."""
    import torch
    from transformers import AutoModelForSequenceClassification

    out = workdir / f"{name}-rm"
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(1)
    config = opt_config(REWARD_MODELS[name], positions)
    config.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 0.5 / model.score.weight.shape[1] ** 0.5)
    return save(model, out, dtype)


def write_prompts(path: Path, model_dir: Path, n: int, tokens: int) -> Path:
    """`n` demo prompts, each padded with words to exactly `tokens` tokens as chatrlhf renders and tokenizes it."""
    from transformers import AutoTokenizer

    from chatrlhf.data.collate import prompt_ids, render_prompt
    from chatrlhf.demo.task import make_prompts

    tok = AutoTokenizer.from_pretrained(model_dir)
    length = lambda text: len(prompt_ids(tok, render_prompt(tok, text)))  # noqa: E731
    rows = []
    for record in make_prompts(n, seed=11):
        text = record["prompt"] + " Some words:"
        while length(text + " word") <= tokens:
            text += " word"
        text += "." * (tokens - length(text))  # one byte, one token
        if length(text) != tokens:
            raise SystemExit(f"could not pad a prompt to {tokens} tokens: {text!r} has {length(text)}")
        rows.append(json.dumps({"prompt": text}))
    path.write_text("\n".join(rows) + "\n")
    return path


def command(actor: Path, rm: Path, prompts: Path, out: Path, backend: str, a: argparse.Namespace) -> list[str]:
    return [
        sys.executable, "-m", "chatrlhf", "rl", "--actor", str(actor), "--reward_model", str(rm),
        "--output_dir", str(out), "--data.paths", str(prompts), "--data.eval_fraction", "0",
        "--train.algo", "ppo", "--train.iterations", str(a.warmup + a.iterations),
        "--train.rollout_batch_size", str(a.batch), "--train.update.epochs", "1",
        "--train.max_prompt_len", str(a.prompt_tokens), "--train.generation.max_new_tokens", str(a.new_tokens),
        "--train.rollout.backend", backend.removesuffix("-graphs"),
        *(["--train.rollout.enforce_eager", "False"] if backend == "vllm-graphs" else []),
        "--train.eval_every", "0", "--run.device", a.device,
        "--run.dtype", a.dtype, "--checkpoint.every", "0", "--run.log_every", "1", "--run.progress", "False",
        "--run.overwrite", "True", *a.extra,
    ]  # fmt: skip


def run(actor: Path, rm: Path, prompts: Path, workdir: Path, backend: str, a: argparse.Namespace) -> dict:
    out = workdir / f"{actor.name}-{backend}"
    cmd = command(actor, rm, prompts, out, backend, a)
    log = workdir / f"{out.name}.log"
    res = run_measured(cmd, log, env=dict(os.environ), timeout_s=a.timeout)
    row = {
        "actor": actor.name, "backend": backend, "exit": res.returncode,
        "command": " ".join(["chatrlhf", *cmd[3:]]).replace(str(workdir), "$W"),
        "peak_rss_bytes": max((p.peak_bytes for p in res.workers()), default=None),
    }  # fmt: skip
    if res.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.is_file() else []
        return {**row, "failed": tail[0] if tail else f"exit {res.returncode}"}
    kept, iteration = full_length_iterations(out / "metrics.jsonl", a.warmup, a.iterations, a.new_tokens)
    med = {k.removeprefix("time/").removesuffix("_s"): statistics.median(m[k] for m in kept) for k in PHASES}
    med["iteration"] = iteration
    peaks = [m["memory/device_peak_gib"] for m in kept if "memory/device_peak_gib" in m]
    return {
        **row, "median_s": med,
        "samples_per_s": a.batch / med["iteration"],
        "tokens_per_s": a.batch * (a.prompt_tokens + a.new_tokens) / med["iteration"],
        "generated_tokens_per_s": a.batch * a.new_tokens / med["generate"],
        "device_peak_gib": max(peaks) if peaks else None,
    }  # fmt: skip


def run_standalone(actor: Path, prompts: Path, workdir: Path, backend: str, a: argparse.Namespace) -> dict:
    """vLLM on its own generating the same prompts (bench/rollout_phases.py's worker): `standalone` with the settings
    chatrlhf's backend starts it with (eager, its default share of the GPU), `standalone-graphs` as vLLM runs by
    default (CUDA graphs captured)."""
    from chatrlhf.config.rl import RolloutConfig

    name = f"{actor.name}-{backend}"
    texts = [json.loads(line)["prompt"] for line in prompts.read_text().splitlines()]
    spec = {
        "model": str(actor), "prompts": texts, "batch": a.batch, "new_tokens": a.new_tokens,
        "iterations": a.warmup + a.iterations, "max_model_len": a.prompt_tokens + a.new_tokens, "dtype": a.dtype,
        "enforce_eager": backend == "standalone", "out": str(workdir / f"{name}.json"),
        **({"gpu_memory_utilization": RolloutConfig().gpu_memory_utilization} if a.device == "cuda"
           else {"kv_cache_gib": RolloutConfig().cpu_kv_cache_gib}),
    }  # fmt: skip
    if len(texts) < spec["iterations"] * a.batch:
        raise SystemExit(f"{name}: {len(texts)} prompts for {spec['iterations']} iterations of {a.batch}")
    spec_path = workdir / f"{name}-spec.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "rollout_phases.py"), "--standalone-worker",
           str(spec_path)]  # fmt: skip
    res = run_measured(cmd, workdir / f"{name}.log", env=dict(os.environ), timeout_s=a.timeout)
    row = {"actor": actor.name, "backend": backend, "exit": res.returncode,
           "peak_rss_bytes": max((p.peak_bytes for p in res.workers()), default=None)}  # fmt: skip
    if res.returncode != 0:
        return {**row, "failed": f"exit {res.returncode}; see {name}.log"}
    got = json.loads(Path(spec["out"]).read_text())
    if any(t != a.batch * a.new_tokens for t in got["tokens"]):
        raise SystemExit(f"{name}: unequal work: tokens per iteration {got['tokens']}")
    generate = statistics.median(got["generate_s"][a.warmup :])
    return {**row, "median_s": {"generate": generate}, "generated_tokens_per_s": a.batch * a.new_tokens / generate,
            "device_peak_gib": None}  # fmt: skip


def print_rows(rows: list[dict]) -> None:
    names = ("iteration", "sync", "generate", "score", "forward", "train")
    table = []
    for r in rows:
        if "failed" in r:
            table.append([r["actor"], r["backend"], "failed: " + r["failed"][:60], *[""] * (len(names) + 4)])
            continue
        gib = "-" if r["device_peak_gib"] is None else f"{r['device_peak_gib']:.1f}"
        whole = [f"{r['samples_per_s']:.2f}", f"{r['tokens_per_s']:.0f}"] if "samples_per_s" in r else ["—", "—"]
        table.append([r["actor"], r["backend"], *whole, f"{r['generated_tokens_per_s']:.0f}",
                      *[f"{r['median_s'][n]:.3f}" if n in r["median_s"] else "—" for n in names], gib,
                      fmt_mib(r["peak_rss_bytes"])])  # fmt: skip
    print(fmt_table(["actor", "backend", "samples/s", "tokens/s", "gen tok/s", *(f"{n} s" for n in names),
                     "device peak GiB", "peak RSS MiB"], table))  # fmt: skip
    for r in rows:
        mine = {x["backend"]: x for x in rows if x["actor"] == r["actor"] and "failed" not in x}
        ours = {"standalone": "vllm", "standalone-graphs": "vllm-graphs"}.get(r["backend"])
        if ours in mine and r["backend"] in mine:
            share = r["median_s"]["generate"] / mine[ours]["median_s"]["generate"]
            print(f"{r['actor']}: chatrlhf's {ours} rollout at {share:.0%} of {r['backend']} vLLM's throughput")


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="dschat")
    parser.add_argument("--actors", nargs="+", choices=list(ACTORS), default=None, help="default: the preset's")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--batch", type=int, default=None, help="prompts per iteration (default: the preset's)")
    parser.add_argument("--iterations", type=int, default=3, help="measured iterations per run")
    parser.add_argument("--warmup", type=int, default=2, help="iterations left out")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", help="DeepSpeed-Chat's benchmark ran fp16")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one run may take")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    a = parser.parse_args(argv)
    actors, rm_name, a.prompt_tokens, a.new_tokens, batch = PRESETS[a.preset]
    a.actors, a.batch, a.extra = a.actors or actors, a.batch or batch, extra
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="chatrlhf-step3-"))
    workdir.mkdir(parents=True, exist_ok=True)
    positions = max(2048, a.prompt_tokens + a.new_tokens)
    rm = build_reward_model(workdir, rm_name, positions, a.dtype)
    prompts = write_prompts(workdir / "prompts.jsonl", rm, 8 * a.batch, a.prompt_tokens)
    rows, failed = [], set()
    for name in a.actors:
        actor = build_actor(workdir, name, positions, a.dtype)
        for backend in a.backends:
            if backend in failed:  # a smaller actor did not fit with this backend
                continue
            if backend.startswith("standalone"):
                row = run_standalone(actor, prompts, workdir, backend, a)
            else:
                row = run(actor, rm, prompts, workdir, backend, a)
            print(json.dumps({k: v for k, v in row.items() if k != "command"}), flush=True)
            rows.append(row)
            if "failed" in row:
                failed.add(backend)
    print(f"{a.batch} prompts × ({a.prompt_tokens} + {a.new_tokens}) tokens per iteration; medians of "
          f"{a.iterations} iterations after {a.warmup}; reward model {rm_name}; {a.device}, {a.dtype}")  # fmt: skip
    print_rows(rows)
    if a.json:
        write_json(a.json, {"machine": machine_summary(), "preset": a.preset, "batch": a.batch,
                            "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens, "rows": rows})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
