"""GRPO side by side: TRL's `GRPOTrainer` against `chatrlhf rl --train.algo grpo`, the same workload, one invocation.

Both frameworks run as subprocesses of this script, alternately, each measured from outside by `_runner` (wall
time, peak RSS, the CPU other work used meanwhile). chatrlhf runs its real CLI (`chatrlhf.cli.main`, as
`python -m chatrlhf` does); TRL runs a small worker (`--worker trl`) that builds a `GRPOTrainer` and calls
`train()`. Both processes get the same two instruments, installed before anything runs and costing nothing
measurable: a counter of optimizer steps (torch's global optimizer step hook) and a record of every
`generate()` call's batch and generated length (a wrapper around transformers' `GenerationMixin.generate`). The
script refuses figures from runs whose counts differ from what the workload says.

The workload, per size (`--hidden`, 4 layers):
- the model: `build_tiny_model` (random-init Llama, byte tokenizer), then made unable to sample its three special
  tokens, so every response runs to `--new-tokens` in both frameworks (the work is equal, not just similar). One
  residual dimension is held constant (its embedding column set to 1, and no layer writes to it), the output
  embedding untied, and the special tokens' output rows given −50 on that dimension: their logits sit hundreds
  below the others. The rest of the network is the random init;
- the prompts: demo prompts (`chatrlhf.demo.task.make_prompts`) of one token length only (the most common), so
  neither framework pads a prompt; each framework's own tokenization of them is checked to give the same ids;
- `--prompts` prompts × `--group` samples per step, every sample in one mini-batch and one micro-batch, one
  optimizer step per RL step, no old-log-prob reuse (TRL: `steps_per_generation=1`, `num_iterations=1`);
- the reward: `letter_share` below (the share of lowercase ASCII letters in the response), a Python function in
  both, so that groups have different rewards and the update has non-zero advantages;
- the loss: clipped ratio (ε = 0.2), group-normalised advantages, β·k3-KL to the frozen reference in the loss,
  token-mean over the batch (TRL's `loss_type="dapo"` = chatrlhf's `token_mean`);
- AdamW, lr `--lr`, betas (0.9, 0.999), no weight decay, gradient clip 1.0, constant schedule; sampling at
  temperature 1, no top-k/top-p; float32; `--threads` threads (OMP_NUM_THREADS, default 1: on a
  2-core machine shared with other work, a 2-thread process slows down sharply when another job takes a core).

A third process, `floor` (`--worker floor`, `floor_worker`), runs the same steps in plain torch + transformers
with nothing a framework adds: the floor that both are measured against. `--frameworks` picks which of the three
run; each round of runs rotates their order.

Step time is the interval between two consecutive step ends (chatrlhf: `time/elapsed_s` of two metrics lines;
TRL: two `on_step_end` callbacks), the median over the steps after `--warmup`, then the median over `--runs` runs.
chatrlhf's per-phase times (`time/generate_s`, `time/forward_s`, `time/train_s`) are reported beside it.

    python bench/trl_compare.py --hidden 64 256 --json bench/results/trl_compare.json

Needs TRL in the same environment: bench/requirements-trl.txt (never a chatrlhf dependency).
"""

from __future__ import annotations

import argparse
import atexit
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _runner import fmt_mib, fmt_table, machine_summary, metrics_lines, run_measured, write_json

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
LAYERS = 4


def letter_share(prompt: str, response: str, **fields) -> float:
    """The reward of both frameworks: the share of lowercase ASCII letters in `response` (0 when empty)."""
    return sum("a" <= c <= "z" for c in response) / len(response) if response else 0.0


def trl_letter_share(prompts, completions, **kwargs) -> list[float]:
    """`letter_share` in TRL's reward-function form (conversational completions)."""
    return [letter_share("", c[-1]["content"] if isinstance(c, list) else c) for c in completions]


# ------------------------------------------------------------------------------------------------ the workload


def build_model(workdir: Path, hidden: int, layers: int = LAYERS) -> Path:
    """The tiny Llama of one size, unable to sample its special tokens (module docstring): `workdir/llama-h{hidden}`,
    reused when it exists (so one `workdir` per layer count)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatrlhf.models.tiny import BOS_ID, EOS_ID, PAD_ID, build_tiny_model

    out = workdir / f"llama-h{hidden}"
    if (out / "config.json").is_file():
        return out
    raw = build_tiny_model(workdir / f"llama-h{hidden}-raw", arch="llama", hidden=hidden, layers=layers,
                           heads=max(2, hidden // 64))  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(raw, dtype=torch.float32)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 1.0  # residual dimension 0 is 1 at every position ...
        for layer in model.model.layers:  # ... because no layer writes to it
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        head = emb.detach().clone()
        head[[PAD_ID, BOS_ID, EOS_ID], 0] = -50.0
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(head)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(raw).save_pretrained(out)
    check = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not torch.equal(check.lm_head.weight, check.model.embed_tokens.weight), "the output embedding is tied"
    return out


def prompt_texts(model_dir: Path, n: int) -> list[str]:
    """`n` demo prompts that all render to the same number of tokens, checked to tokenize alike in both frameworks:
    chatrlhf renders with `render_prompt` and tokenizes with `prompt_ids`; TRL applies the chat template to the
    conversation [{"role": "user", ...}] with `add_generation_prompt=True, tokenize=True`."""
    from transformers import AutoTokenizer

    from chatrlhf.data.collate import prompt_ids, render_prompt
    from chatrlhf.demo.task import make_prompts

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [r["prompt"] for r in make_prompts(20 * n, seed=11)]
    ids = {t: prompt_ids(tok, render_prompt(tok, t)) for t in texts}
    length = collections.Counter(len(v) for v in ids.values()).most_common(1)[0][0]
    chosen = [t for t in texts if len(ids[t]) == length][:n]
    for t in chosen:
        trl_ids = tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"]  # fmt: skip
        assert list(trl_ids) == ids[t], f"the frameworks tokenize {t!r} differently"
    return chosen


def chatrlhf_args(model: Path, prompts: Path, out: Path, a: argparse.Namespace) -> list[str]:
    return [
        "rl", "--actor", str(model), "--reward_functions", "trl_compare:letter_share",
        "--output_dir", str(out), "--data.paths", str(prompts), "--data.eval_fraction", "0",
        "--train.algo", "grpo", "--train.group_size", str(a.group), "--train.iterations", str(a.warmup + a.steps),
        "--train.rollout_batch_size", str(a.prompts), "--train.max_prompt_len", "64",
        "--train.generation.max_new_tokens", str(a.new_tokens),
        "--train.kl.coef", str(a.beta), "--train.kl.placement", "loss", "--train.kl.estimator", "k3",
        "--train.loss.aggregation", "token_mean", "--train.loss.clip_low", "0.2",
        "--train.actor_optim.lr", str(a.lr), "--train.actor_optim.betas", "0.9", "0.999",
        "--train.actor_optim.weight_decay", "0", "--train.actor_optim.grad_clip", "1.0",
        "--train.actor_optim.schedule", "constant",
        "--checkpoint.every", "0", "--run.log_every", "1", "--run.progress", "False", "--run.overwrite", "True",
    ]  # fmt: skip


def trl_spec(model: Path, prompts: Path, out: Path, a: argparse.Namespace) -> dict:
    return {"model": str(model), "prompts": str(prompts), "output_dir": str(out), "group": a.group,
            "prompts_per_step": a.prompts, "new_tokens": a.new_tokens, "beta": a.beta, "lr": a.lr,
            "max_steps": a.warmup + a.steps}  # fmt: skip


# ------------------------------------------------------------------------------------------------ the workers


def instrument(path: Path) -> None:
    """Count optimizer steps and record every generate() call (batch, generated length); written at exit."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from transformers.generation.utils import GenerationMixin

    seen = {"optimizer_steps": 0, "generate_calls": []}
    register_optimizer_step_post_hook(
        lambda opt, args, kwargs: seen.__setitem__("optimizer_steps", seen["optimizer_steps"] + 1)
    )
    generate = GenerationMixin.generate

    def counted(self, *args, **kwargs):
        out = generate(self, *args, **kwargs)
        prompt = kwargs.get("input_ids", args[0] if args else None)
        seqs = out if isinstance(out, torch.Tensor) else out.sequences
        seen["generate_calls"].append([int(seqs.shape[0]), int(seqs.shape[1] - prompt.shape[1])])
        return out

    GenerationMixin.generate = counted
    atexit.register(lambda: path.write_text(json.dumps(seen)))


def chatrlhf_worker(counts: Path, args: list[str]) -> int:
    instrument(counts)
    from chatrlhf.cli import main

    return main(args)


def trl_worker(counts: Path, spec_path: Path) -> int:
    instrument(counts)
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    spec = json.loads(spec_path.read_text())
    texts = [json.loads(x)["prompt"] for x in Path(spec["prompts"]).read_text().splitlines()]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": t}]} for t in texts])
    n = spec["prompts_per_step"] * spec["group"]
    config = GRPOConfig(
        output_dir=spec["output_dir"], per_device_train_batch_size=n, gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=1, num_generations=spec["group"],
        max_completion_length=spec["new_tokens"], max_steps=spec["max_steps"], learning_rate=spec["lr"],
        lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.999, weight_decay=0.0,
        max_grad_norm=1.0, beta=spec["beta"], epsilon=0.2, loss_type="dapo", scale_rewards="group",
        temperature=1.0, top_p=1.0, top_k=0, disable_dropout=True, use_cpu=True, bf16=False, fp16=False,
        logging_steps=1, save_strategy="no", report_to="none", seed=1234, dataloader_num_workers=0,
        model_init_kwargs={"dtype": "float32"},
    )  # fmt: skip
    step_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

    started = time.perf_counter()
    trainer = GRPOTrainer(model=spec["model"], reward_funcs=trl_letter_share, args=config, train_dataset=data,
                          callbacks=[StepClock()])  # fmt: skip
    trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    result = {
        "step_end_s": [t - started for t in step_ends],
        "global_step": trainer.state.global_step,
        "mean_length": [h["completions/mean_length"] for h in logs],
        "clipped_ratio": [h.get("completions/clipped_ratio") for h in logs],
    }
    Path(spec["output_dir"], "trl_result.json").write_text(json.dumps(result))
    return 0


def floor_worker(counts: Path, spec_path: Path) -> int:
    """The floor of one GRPO step on the same workload, in plain torch + transformers: `generate()` of the same
    prompts, one no-grad forward of the reference, one forward/backward of the policy with the same loss terms
    (the clipped ratio is 1 on-policy, so −A·log π; + β·k3), gradient clipping and one AdamW step. No scoring, no
    advantages beyond a fixed per-sequence sign, no logging: what any framework has to compute."""
    instrument(counts)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    spec = json.loads(spec_path.read_text())
    tok = AutoTokenizer.from_pretrained(spec["model"])
    policy = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval().requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=spec["lr"], betas=(0.9, 0.999), weight_decay=0.0)
    gen = GenerationConfig(max_new_tokens=spec["new_tokens"], do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    texts = [json.loads(x)["prompt"] for x in Path(spec["prompts"]).read_text().splitlines()]
    p, g = spec["prompts_per_step"], spec["group"]
    adv = torch.tensor([1.0, -1.0] * (p * g // 2)).unsqueeze(1)
    phases, started = [], time.perf_counter()
    for step in range(spec["max_steps"]):
        ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                                    tokenize=True, return_dict=True)["input_ids"]
                            for t in texts[step * p : (step + 1) * p]]).repeat_interleave(g, 0)  # fmt: skip
        t0 = time.perf_counter()
        with torch.no_grad():
            seq = policy.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)
        t1 = time.perf_counter()
        start, targets = ids.shape[1] - 1, seq[:, ids.shape[1] :].unsqueeze(2)
        with torch.no_grad():
            ref_logp = torch.log_softmax(ref(seq).logits[:, start:-1].float(), -1).gather(2, targets).squeeze(2)
        t2 = time.perf_counter()
        logp = torch.log_softmax(policy(seq).logits[:, start:-1].float(), -1).gather(2, targets).squeeze(2)
        d = ref_logp - logp
        loss = (-adv * logp).mean() + spec["beta"] * (torch.exp(d) - d - 1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        phases.append({"end_s": t3 - started, "generate_s": t1 - t0, "ref_forward_s": t2 - t1, "train_s": t3 - t2})
    Path(spec["output_dir"], "floor_result.json").write_text(json.dumps(phases))
    return 0


# ------------------------------------------------------------------------------------------------ measuring


def run_one(framework: str, model: Path, prompts: Path, workdir: Path, tag: str, a: argparse.Namespace) -> dict:
    out = workdir / f"{model.name}-{framework}-{tag}"
    counts = workdir / f"{out.name}-counts.json"
    me = [sys.executable, str(Path(__file__).resolve())]
    if framework == "chatrlhf":
        args = chatrlhf_args(model, prompts, out, a)
        cmd = [*me, "--worker", "chatrlhf", "--counts", str(counts), "--", *args]
        shown = "chatrlhf " + " ".join(args)
    else:
        out.mkdir(parents=True, exist_ok=True)
        spec = out / "spec.json"
        spec.write_text(json.dumps(trl_spec(model, prompts, out, a)))
        cmd = [*me, "--worker", framework, "--counts", str(counts), "--spec", str(spec)]
        shown = {"trl": "GRPOTrainer ", "floor": "floor "}[framework] + json.dumps(trl_spec(model, prompts, out, a))
    threads = str(a.threads)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{BENCH}", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    res = run_measured(cmd, workdir / f"{out.name}.log", env=env, timeout_s=a.timeout)
    if res.returncode != 0:
        raise SystemExit(f"{framework} failed ({res.returncode}); see {workdir / (out.name + '.log')}")
    seen = json.loads(counts.read_text())
    if framework == "chatrlhf":
        lines = [m for m in metrics_lines(out / "metrics.jsonl") if "time/generate_s" in m]
        ends = [m["time/elapsed_s"] for m in lines]
        lengths = [m["response/length_mean"] for m in lines]
        phases = {k: statistics.median(m[k] for m in lines[a.warmup :])
                  for k in ("time/generate_s", "time/score_s", "time/forward_s", "time/train_s")}  # fmt: skip
        steps = len(lines)
    elif framework == "trl":
        r = json.loads((out / "trl_result.json").read_text())
        ends, lengths, phases, steps = r["step_end_s"], r["mean_length"], {}, r["global_step"]
    else:
        r = json.loads((out / "floor_result.json").read_text())
        ends, steps = [x["end_s"] for x in r], len(r)
        lengths = [a.new_tokens] * steps  # checked by the generate() record: no EOS can be sampled
        phases = {k: statistics.median(x[k] for x in r[a.warmup :]) for k in ("generate_s", "ref_forward_s", "train_s")}
    intervals = [b - e for e, b in zip(ends, ends[1:])][a.warmup - 1 :]  # step k's time: end(k) − end(k−1)
    worker = res.workers()[0]
    return {
        "framework": framework,
        "model": model.name,
        "command": shown.replace(str(workdir), "$W"),
        "step_s": intervals,
        "median_step_s": statistics.median(intervals),
        "steps_logged": steps,
        "optimizer_steps": seen["optimizer_steps"],
        "generate_calls": seen["generate_calls"],
        "response_length_mean": lengths,
        "phases_median_s": phases,
        "peak_rss_bytes": worker.peak_bytes,
        "wall_s": res.wall_s,
        "other_cores": res.other_cores,
    }


def check_equal_work(row: dict, a: argparse.Namespace) -> None:
    """Refuse a run that did other work than the workload says: one optimizer step and one generate() of
    prompts × group sequences × new_tokens per RL step, every response at full length."""
    steps, n = a.warmup + a.steps, a.prompts * a.group
    where = f"{row['framework']} {row['model']}"
    assert row["optimizer_steps"] == steps, f"{where}: {row['optimizer_steps']} optimizer steps, not {steps}"
    assert row["generate_calls"] == [[n, a.new_tokens]] * steps, f"{where}: generate calls {row['generate_calls']}"
    assert all(x == a.new_tokens for x in row["response_length_mean"]), f"{where}: {row['response_length_mean']}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--prompts", type=int, default=8, help="prompts per RL step")
    parser.add_argument("--group", type=int, default=4, help="samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--steps", type=int, default=6, help="measured RL steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="RL steps left out at the start of each run")
    parser.add_argument("--runs", type=int, default=3, help="runs per framework and size, alternating")
    parser.add_argument(
        "--frameworks",
        nargs="+",
        choices=["chatrlhf", "trl", "floor"],
        default=["chatrlhf", "trl", "floor"],
        help="what runs; each run round rotates the order",
    )
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of both frameworks' processes")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", choices=["chatrlhf", "trl", "floor"], help=argparse.SUPPRESS)
    parser.add_argument("--counts", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker == "chatrlhf":
        return chatrlhf_worker(a.counts, a.rest)
    if a.worker == "trl":
        return trl_worker(a.counts, a.spec)
    if a.worker == "floor":
        return floor_worker(a.counts, a.spec)
    assert a.warmup >= 1, "--warmup must be at least 1 (the first step's time has no step before it)"

    from importlib.metadata import version

    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="chatrlhf-trl-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for hidden in a.hidden:
        model = build_model(workdir, hidden)
        texts = prompt_texts(model, a.prompts * (a.warmup + a.steps))
        prompts = workdir / f"prompts-h{hidden}.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
        for r in range(a.runs):
            order = a.frameworks[r % len(a.frameworks) :] + a.frameworks[: r % len(a.frameworks)]  # rotated
            for framework in order:
                print(f"{model.name}: {framework} run {r + 1}/{a.runs} ...", flush=True)
                row = run_one(framework, model, prompts, workdir, f"r{r}", a)
                check_equal_work(row, a)
                rows.append({**row, "run": r})
                print(f"  median step {row['median_step_s']:.3f} s, peak RSS {fmt_mib(row['peak_rss_bytes'])} MiB, "
                      f"other cores {row['other_cores']:.2f}", flush=True)  # fmt: skip

    tokens_per_step = a.prompts * a.group * a.new_tokens
    summary, table = [], []
    for hidden in a.hidden:
        name = f"llama-h{hidden}"
        per = {f: [r for r in rows if r["model"] == name and r["framework"] == f] for f in a.frameworks}
        s = {f: statistics.median(r["median_step_s"] for r in rs) for f, rs in per.items()}
        rss = {f: max(r["peak_rss_bytes"] for r in rs) for f, rs in per.items()}
        other = statistics.mean(r["other_cores"] for rs in per.values() for r in rs)
        phases = {f: {k: statistics.median(r["phases_median_s"][k] for r in rs) for k in rs[0]["phases_median_s"]}
                  for f, rs in per.items()}  # fmt: skip
        item = {"model": name, "hidden": hidden, "median_step_s": s, "peak_rss_bytes": rss,
                "tokens_per_s": {f: tokens_per_step / v for f, v in s.items()}, "other_cores_mean": other,
                "phases_median_s": phases}  # fmt: skip
        if "chatrlhf" in s and "trl" in s:
            item["chatrlhf_over_trl_steps_per_s"] = s["trl"] / s["chatrlhf"]
        if "chatrlhf" in s and "floor" in s:
            item["chatrlhf_step_over_floor"] = s["chatrlhf"] / s["floor"]
        summary.append(item)
        for f in a.frameworks:
            ratio = {"trl": item.get("chatrlhf_over_trl_steps_per_s"), "floor": item.get("chatrlhf_step_over_floor")}
            table.append([name, f, f"{s[f]:.3f}", " ".join(f"{r['median_step_s']:.3f}" for r in per[f]),
                          f"{tokens_per_step / s[f]:.0f}", fmt_mib(rss[f]),
                          "" if ratio.get(f) is None else f"{ratio[f]:.2f}", f"{other:.2f}"])  # fmt: skip
    print()
    print(f"GRPO, {a.prompts} prompts × {a.group} samples × {a.new_tokens} new tokens per step, β={a.beta}, "
          f"{a.steps} measured steps after {a.warmup}, {a.runs} runs each, {a.threads} thread(s)")  # fmt: skip
    print("ratio: on the trl row, chatrlhf steps/s ÷ TRL steps/s; on the floor row, chatrlhf s/step ÷ floor s/step")
    print(fmt_table(["model", "framework", "s/step", "runs (s/step)", "gen tok/s", "peak RSS MiB", "ratio",
                     "other cores"], table))  # fmt: skip
    print()
    for item in summary:
        for f, p in item["phases_median_s"].items():
            if p:
                print(f"{item['model']}: {f} phases (median s): " + ", ".join(f"{k} {v:.3f}" for k, v in p.items()))
    versions = {n: version(n) for n in ("torch", "transformers", "trl", "accelerate", "datasets")}
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    args = {k: "WORKDIR" if k == "workdir" else str(v) for k, v in vars(a).items()
            if k not in ("worker", "counts", "spec", "rest")}  # fmt: skip
    payload = {"machine": machine_summary(), "versions": versions, "args": args, "summary": summary, "runs": rows}
    write_json(a.json or workdir / "trl_compare.json", payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
