"""GRPO and PPO side by side: TRL's trainers against `chatrlhf rl`, the same workload, one invocation.

`--algo grpo` (the default) compares TRL's `GRPOTrainer` with `chatrlhf rl --train.algo grpo`; `--algo ppo`
compares TRL's `trl.experimental.ppo.PPOTrainer` with `chatrlhf rl --train.algo ppo` (below).

Both frameworks run as subprocesses of this script, alternately, each measured from outside by `_runner` (wall
time, peak RSS, the CPU other work used meanwhile). chatrlhf runs its real CLI (`chatrlhf.cli.main`, as
`python -m chatrlhf` does); TRL runs a small worker (`--worker trl`) that builds the trainer and calls `train()`.
Both processes get the same two instruments, installed before anything runs and costing nothing measurable: a
counter of optimizer steps, per optimizer with the number of parameters it updates (torch's global optimizer step
hook), and a record of every `generate()` call's batch and generated length (a wrapper around transformers'
`GenerationMixin.generate`). The script refuses figures from runs whose counts differ from what the workload says
(`expected_work`, `check_equal_work`).

The GRPO workload, per size (`--hidden`, 4 layers):
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

A third process, `floor` (`--worker floor`, `floor_worker`), runs the same GRPO steps in plain torch +
transformers with nothing a framework adds: the floor that both are measured against. `--frameworks` picks which
of the three run; each round of runs rotates their order.

The PPO workload (`--algo ppo`), per size: the same actor and prompts; a reward model that is the actor's network
as a 1-label `AutoModelForSequenceClassification` with a seeded score head (`build_reward_model`), from which both
frameworks load their reward model and their critic's initial weights (chatrlhf's critic defaults to the reward
model; TRL's `value_model` is loaded from the same directory), so both critics start equal; `--prompts` prompts ×
one response per step, one PPO epoch, one mini-batch and one micro-batch (TRL: `num_ppo_epochs=1`,
`num_mini_batches=1`, `per_device_train_batch_size` = the prompts, `gradient_accumulation_steps=1`,
`local_rollout_forward_batch_size` = the prompts, so one `generate()` per step); β·k1-KL to the frozen reference
shaped into the per-token reward, the reward model's score at the last token, GAE (γ 1, λ 0.95), whitened
advantages, clipped ratio (ε 0.2) and clipped value loss (ε 0.2), token means; AdamW for actor and critic alike
(lr `--lr`, betas (0.9, 0.999), no weight decay, no gradient clipping: TRL's PPO loop clips none), constant
schedule; sampling at temperature 1; no checkpoints, no sample generations (TRL: `num_sample_generations=0`,
`stop_token=None` so nothing is truncated, `missing_eos_penalty=None`). TRL runs twice: `trl`, as shipped, and
`trl-nogc`, with the module `trl.experimental.ppo.ppo_trainer`'s reference to `gc` replaced by an object whose
`collect()` does nothing (and counts its calls): the loop's two `gc.collect()` per update are skipped. chatrlhf
runs twice too: `chatrlhf`, with its defaults, and `chatrlhf-sampler`, the same command with
`--train.update.old_logprobs sampler` (log π_old from the generator, as TRL takes it). `floor` under `--algo ppo`
(`ppo_floor_worker`) is the same PPO steps in plain torch + transformers, with the least work the step needs
(log π_old from `generate()`'s logits, as TRL takes it).

What differs in the PPO work, by design of each: chatrlhf (with its defaults) runs one no-grad forward of the actor
per step for log π_old (the KL shaped into the reward needs it before the update), where TRL takes the log-probs
from `generate()`'s scores (`output_scores=True`) and `chatrlhf-sampler` from its generator's recorder; TRL runs
the policy and the critic in one forward of its `PolicyAndValueWrapper`, with one backward and one optimizer step,
where chatrlhf runs the actor's and the critic's forward/backward and optimizer step apart (two optimizer steps
per RL step); chatrlhf computes the gradient norm (clipping at infinity), TRL none; TRL's forwards ask for every
layer's hidden states.

Step time is the interval between two consecutive step ends (chatrlhf: `time/elapsed_s` of two metrics lines;
TRL: two `on_step_end` callbacks), the median over the steps after `--warmup`, then the median over `--runs` runs.
chatrlhf's per-phase times (`time/generate_s`, `time/score_s`, `time/forward_s`, `time/train_s`) are reported
beside it.

    python bench/trl_compare.py --hidden 64 256 --json bench/results/trl_compare.json
    python bench/trl_compare.py --algo ppo --hidden 64 256 --json bench/results/trl_compare-ppo.json

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
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from _runner import fmt_mib, fmt_table, machine_summary, metrics_lines, run_measured, write_json

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
LAYERS = 4
FRAMEWORKS = {"grpo": ["chatrlhf", "trl", "floor"],
              "ppo": ["chatrlhf", "chatrlhf-sampler", "trl", "trl-nogc", "floor"]}  # fmt: skip
"""What can run under each `--algo` (the default `--frameworks`): `trl-nogc` and
`chatrlhf-sampler` are PPO's (GRPO's update here is on-policy, so chatrlhf's default already skips the forward)."""
CHATRLHF = ("chatrlhf", "chatrlhf-sampler")
SAMPLER_ARGS = ["--train.update.old_logprobs", "sampler"]
"""What `chatrlhf-sampler` adds to `chatrlhf`'s command."""
TRL_GC_COLLECTS_PER_UPDATE = 2
"""`gc.collect()` calls in each update of TRL 1.12.0's `PPOTrainer.train` (after the rollout, after the step)."""


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


def build_reward_model(workdir: Path, actor: Path) -> Path:
    """PPO's reward model for `actor`: its network as a 1-label `AutoModelForSequenceClassification` (the actor's
    backbone, the output embedding dropped) with a seeded score head (std 0.5/√hidden, so the scores stay far inside
    chatrlhf's ±5 reward clip), `pad_token_id` set, saved with the actor's tokenizer to `workdir/{actor}-rm`, reused
    when it exists. Both frameworks load their reward model and their critic's initial weights from it."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = workdir / f"{actor.name}-rm"
    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(actor)
    model = AutoModelForSequenceClassification.from_pretrained(actor, num_labels=1, dtype=torch.float32)
    weight = model.score.weight
    with torch.no_grad():
        g = torch.Generator().manual_seed(1234)
        weight.copy_(torch.randn(weight.shape, generator=g) * (0.5 / weight.shape[1] ** 0.5))
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    check = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(check.score.weight, weight), "the score head did not round-trip"
    return out


def param_count(path: Path, reward_model: bool = False) -> int:
    """Parameters of the actor (a causal LM) or of a reward model / critic at `path`, as loaded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if reward_model else AutoModelForCausalLM
    return sum(p.numel() for p in cls.from_pretrained(path, dtype=torch.float32).parameters())


def chat_ids(tok, text: str) -> list[int]:
    """The prompt ids TRL (and the floors) feed the model: the conversation [{"role": "user", "content": text}]
    through the chat template with the generation prompt."""
    out = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
                                  return_dict=True)  # fmt: skip
    return list(out["input_ids"])


def token_logprobs(logits, targets):
    """log-softmax of `logits` (B, T, V) at `targets` (B, T, 1), in float32: (B, T)."""
    import torch

    return torch.log_softmax(logits.float(), -1).gather(2, targets).squeeze(2)


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
        assert chat_ids(tok, t) == ids[t], f"the frameworks tokenize {t!r} differently"
    return chosen


def chatrlhf_args(model: Path, prompts: Path, out: Path, a: argparse.Namespace, reward_model: Path | None = None):
    if a.algo == "ppo":
        return chatrlhf_ppo_args(model, reward_model, prompts, out, a)
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


def chatrlhf_ppo_args(model: Path, reward_model: Path, prompts: Path, out: Path, a: argparse.Namespace) -> list[str]:
    """`chatrlhf rl --train.algo ppo` on the PPO workload (module docstring); the critic starts from the reward
    model (chatrlhf's default, `--critic` unset)."""
    optim = []
    for role in ("actor", "critic"):
        optim += [f"--train.{role}_optim.lr", str(a.lr), f"--train.{role}_optim.betas", "0.9", "0.999",
                  f"--train.{role}_optim.weight_decay", "0", f"--train.{role}_optim.grad_clip", "0",
                  f"--train.{role}_optim.schedule", "constant"]  # fmt: skip
    return [
        "rl", "--actor", str(model), "--reward_model", str(reward_model),
        "--output_dir", str(out), "--data.paths", str(prompts), "--data.eval_fraction", "0",
        "--train.algo", "ppo", "--train.group_size", "1", "--train.iterations", str(a.warmup + a.steps),
        "--train.rollout_batch_size", str(a.prompts), "--train.max_prompt_len", "64",
        "--train.generation.max_new_tokens", str(a.new_tokens),
        "--train.kl.coef", str(a.beta), "--train.kl.placement", "reward", "--train.kl.estimator", "k1",
        "--train.advantage.gamma", "1.0", "--train.advantage.lam", "0.95", "--train.advantage.whiten", "True",
        "--train.loss.aggregation", "token_mean", "--train.loss.clip_low", "0.2", "--train.loss.value_clip", "0.2",
        "--train.update.epochs", "1", "--train.update.mini_batch_size", "0", "--train.update.micro_batch_size", "0",
        *optim,
        "--checkpoint.every", "0", "--run.log_every", "1", "--run.progress", "False", "--run.overwrite", "True",
    ]  # fmt: skip


def trl_spec(model: Path, prompts: Path, out: Path, a: argparse.Namespace, framework: str = "trl",
             reward_model: Path | None = None) -> dict:  # fmt: skip
    spec = {"model": str(model), "prompts": str(prompts), "output_dir": str(out), "group": a.group,
            "prompts_per_step": a.prompts, "new_tokens": a.new_tokens, "beta": a.beta, "lr": a.lr,
            "max_steps": a.warmup + a.steps}  # fmt: skip
    if a.algo == "ppo":
        spec.update(algo="ppo", reward_model=str(reward_model), gc=framework != "trl-nogc")
    return spec


# ------------------------------------------------------------------------------------------------ the workers


def instrument(path: Path) -> None:
    """Count optimizer steps, in all and per optimizer (with the parameters it updates), record every generate()
    call (batch, generated length), and time Python's garbage collections per generation (`gc.callbacks`: the
    automatic ones and any `gc.collect()`); written at exit."""
    import gc

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from transformers.generation.utils import GenerationMixin

    seen = {"optimizer_steps": 0, "optimizers": {}, "generate_calls": [], "gc": {g: [0, 0.0] for g in range(3)}}
    gc_started = [0.0]

    def collected(phase, info):
        if phase == "start":
            gc_started[0] = time.perf_counter()
        else:
            seen["gc"][info["generation"]][0] += 1
            seen["gc"][info["generation"]][1] += time.perf_counter() - gc_started[0]

    gc.callbacks.append(collected)

    def stepped(opt, args, kwargs):
        seen["optimizer_steps"] += 1
        key = str(id(opt))
        if key not in seen["optimizers"]:  # its parameters counted once, at its first step
            seen["optimizers"][key] = {
                "steps": 0,
                "params": sum(p.numel() for g in opt.param_groups for p in g["params"]),
            }
        seen["optimizers"][key]["steps"] += 1

    register_optimizer_step_post_hook(stepped)
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


def step_clock(ends: list[float]):
    """A transformers `TrainerCallback` that appends the time of every step end to `ends`."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    return StepClock()


def trl_worker(counts: Path, spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    if spec.get("algo") == "ppo":
        return trl_ppo_worker(counts, spec)
    instrument(counts)
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

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

    started = time.perf_counter()
    trainer = GRPOTrainer(model=spec["model"], reward_funcs=trl_letter_share, args=config, train_dataset=data,
                          callbacks=[step_clock(step_ends)])  # fmt: skip
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


class SkippedCollect:
    """Stands in for the `gc` module inside TRL's PPO trainer: `collect()` does nothing and counts its calls."""

    def __init__(self):
        self.calls = 0

    def collect(self, *args, **kwargs) -> int:
        self.calls += 1
        return 0


def trl_ppo_worker(counts: Path, spec: dict) -> int:
    """TRL's `PPOTrainer` on the PPO workload (module docstring); with `spec["gc"]` false, its `gc.collect()` calls
    are skipped (`SkippedCollect`)."""
    instrument(counts)
    import importlib

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    skipped = None
    if not spec["gc"]:
        module = importlib.import_module("trl.experimental.ppo.ppo_trainer")
        module.gc = skipped = SkippedCollect()
    tok = AutoTokenizer.from_pretrained(spec["model"])
    texts = [json.loads(x)["prompt"] for x in Path(spec["prompts"]).read_text().splitlines()]
    data = Dataset.from_list([{"input_ids": chat_ids(tok, t)} for t in texts])
    n = spec["prompts_per_step"]
    config = PPOConfig(
        output_dir=spec["output_dir"], per_device_train_batch_size=n, gradient_accumulation_steps=1,
        num_mini_batches=1, num_ppo_epochs=1, local_rollout_forward_batch_size=n,
        total_episodes=n * spec["max_steps"], response_length=spec["new_tokens"], temperature=1.0,
        stop_token=None, stop_token_id=None, missing_eos_penalty=None, num_sample_generations=0,
        kl_coef=spec["beta"], kl_estimator="k1", cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0,
        lam=0.95, whiten_rewards=False, learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
        adam_beta1=0.9, adam_beta2=0.999, weight_decay=0.0, gradient_checkpointing=False, use_cpu=True, bf16=False,
        fp16=False, logging_steps=1, save_strategy="no", report_to="none", seed=1234, dataloader_num_workers=0,
        sft_model_path=spec["model"], reward_model_path=spec["reward_model"],
    )  # fmt: skip
    step_ends: list[float] = []

    started = time.perf_counter()
    causal = {"dtype": torch.float32}
    scorer = {"dtype": torch.float32, "num_labels": 1}
    trainer = PPOTrainer(
        args=config, processing_class=tok, train_dataset=data,
        model=AutoModelForCausalLM.from_pretrained(spec["model"], **causal),
        ref_model=AutoModelForCausalLM.from_pretrained(spec["model"], **causal),
        reward_model=AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], **scorer),
        value_model=AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], **scorer),
        callbacks=[step_clock(step_ends)],
    )  # fmt: skip
    trainer.train()
    logs = [h for h in trainer.state.log_history if "val/num_eos_tokens" in h]
    result = {
        "step_end_s": [t - started for t in step_ends],
        "global_step": trainer.state.global_step,
        "eos_tokens": [h["val/num_eos_tokens"] for h in logs],
        "gc_collects_skipped": None if skipped is None else skipped.calls,
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
        ids = torch.tensor([chat_ids(tok, t) for t in texts[step * p : (step + 1) * p]]).repeat_interleave(g, 0)
        t0 = time.perf_counter()
        with torch.no_grad():
            seq = policy.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)
        t1 = time.perf_counter()
        start, targets = ids.shape[1] - 1, seq[:, ids.shape[1] :].unsqueeze(2)
        with torch.no_grad():
            ref_logp = token_logprobs(ref(seq).logits[:, start:-1], targets)
        t2 = time.perf_counter()
        logp = token_logprobs(policy(seq).logits[:, start:-1], targets)
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


def ppo_floor_worker(counts: Path, spec_path: Path) -> int:
    """The floor of one PPO step on the PPO workload, in plain torch + transformers, with the least work the step
    needs: `generate()` of the prompts, keeping its logits (log π_old, as TRL takes it); one no-grad forward each of
    the reference (log π_ref), the critic (per-token values: backbone + score head) and the reward model (its score
    head on the last position only); the per-token reward −β·k1 with the clipped score at the last token, GAE (γ 1,
    λ 0.95) and whitened advantages; the actor's forward/backward with the clipped ratio, the critic's with the
    clipped value loss, one fused AdamW step each, no gradient clipping. No logging, no checks, no framework."""
    instrument(counts)
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig

    spec = json.loads(spec_path.read_text())
    tok = AutoTokenizer.from_pretrained(spec["model"])
    policy = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval().requires_grad_(False)
    critic = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], dtype=torch.float32).eval()
    rm = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], dtype=torch.float32).eval()
    rm.requires_grad_(False)
    opts = [torch.optim.AdamW(m.parameters(), lr=spec["lr"], betas=(0.9, 0.999), weight_decay=0.0, fused=True)
            for m in (policy, critic)]  # fmt: skip
    gen = GenerationConfig(max_new_tokens=spec["new_tokens"], do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                           return_dict_in_generate=True, output_logits=True)  # fmt: skip
    texts = [json.loads(x)["prompt"] for x in Path(spec["prompts"]).read_text().splitlines()]
    p, beta, gamma, lam, eps = spec["prompts_per_step"], spec["beta"], 1.0, 0.95, 0.2

    def values(model, seq, start):
        return model.score(model.model(seq).last_hidden_state[:, start:-1]).squeeze(2)

    phases, started = [], time.perf_counter()
    for step in range(spec["max_steps"]):
        ids = torch.tensor([chat_ids(tok, t) for t in texts[step * p : (step + 1) * p]])
        t0 = time.perf_counter()
        with torch.no_grad():
            out = policy.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)
        seq, start = out.sequences, ids.shape[1] - 1
        targets = seq[:, ids.shape[1] :].unsqueeze(2)
        old_logp = token_logprobs(torch.stack(out.logits, 1), targets)
        t1 = time.perf_counter()
        with torch.no_grad():
            ref_logp = token_logprobs(ref(seq).logits[:, start:-1], targets)
            old_values = values(critic, seq, start)
            score = rm.score(rm.model(seq).last_hidden_state[:, -1]).squeeze(1).clamp(-5.0, 5.0)
        t2 = time.perf_counter()
        rewards = -beta * (old_logp - ref_logp)
        rewards[:, -1] += score
        adv, last = torch.zeros_like(rewards), torch.zeros_like(score)
        for t in reversed(range(rewards.shape[1])):
            following = old_values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(score)
            last = rewards[:, t] + gamma * following - old_values[:, t] + gamma * lam * last
            adv[:, t] = last
        returns = adv + old_values
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        ratio = torch.exp(token_logprobs(policy(seq).logits[:, start:-1], targets) - old_logp)
        torch.max(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps)).mean().backward()
        v = values(critic, seq, start)
        clipped = old_values + (v - old_values).clamp(-eps, eps)
        (0.5 * torch.max((v - returns) ** 2, (clipped - returns) ** 2).mean()).backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        phases.append({"end_s": t3 - started, "generate_s": t1 - t0, "forwards_s": t2 - t1, "train_s": t3 - t2})
    Path(spec["output_dir"], "floor_result.json").write_text(json.dumps(phases))
    return 0


# ------------------------------------------------------------------------------------------------ measuring


def installed_version(name: str) -> str:
    """The installed version of a distribution, or "not installed" (a run of chatrlhf and the floor alone needs no
    TRL)."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def run_one(framework: str, model: Path, prompts: Path, workdir: Path, tag: str, a: argparse.Namespace,
            reward_model: Path | None = None) -> dict:  # fmt: skip
    out = workdir / (f"{model.name}-{framework}-{tag}" if a.algo == "grpo" else f"{model.name}-ppo-{framework}-{tag}")
    counts = workdir / f"{out.name}-counts.json"
    me = [sys.executable, str(Path(__file__).resolve())]
    if framework in CHATRLHF:
        args = chatrlhf_args(model, prompts, out, a, reward_model)
        args += SAMPLER_ARGS if framework == "chatrlhf-sampler" else []
        cmd = [*me, "--worker", "chatrlhf", "--counts", str(counts), "--", *args]
        shown = "chatrlhf " + " ".join(args)
    else:
        out.mkdir(parents=True, exist_ok=True)
        spec = out / "spec.json"
        spec.write_text(json.dumps(trl_spec(model, prompts, out, a, framework, reward_model)))
        worker = "floor" if framework == "floor" else "trl"
        cmd = [*me, "--worker", worker, "--counts", str(counts), "--spec", str(spec)]
        label = {"grpo": {"trl": "GRPOTrainer ", "floor": "floor "},
                 "ppo": {"trl": "PPOTrainer ", "trl-nogc": "PPOTrainer, gc.collect() skipped, ",
                         "floor": "PPO floor "}}  # fmt: skip
        shown = label[a.algo][framework] + json.dumps(trl_spec(model, prompts, out, a, framework, reward_model))
    threads = str(a.threads)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{BENCH}", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    res = run_measured(cmd, workdir / f"{out.name}.log", env=env, timeout_s=a.timeout)
    if res.returncode != 0:
        raise SystemExit(f"{framework} failed ({res.returncode}); see {workdir / (out.name + '.log')}")
    seen = json.loads(counts.read_text())
    extra = {}
    if framework in CHATRLHF:
        lines = [m for m in metrics_lines(out / "metrics.jsonl") if "time/generate_s" in m]
        ends = [m["time/elapsed_s"] for m in lines]
        lengths = [m["response/length_mean"] for m in lines]
        phases = {k: statistics.median(m[k] for m in lines[a.warmup :])
                  for k in ("time/generate_s", "time/score_s", "time/forward_s", "time/train_s")}  # fmt: skip
        steps = len(lines)
    elif framework.startswith("trl"):
        r = json.loads((out / "trl_result.json").read_text())
        ends, phases, steps = r["step_end_s"], {}, r["global_step"]
        if a.algo == "grpo":
            lengths = r["mean_length"]
        else:  # TRL truncates nothing (stop_token None): its responses are what generate() returned
            lengths = [length for _, length in seen["generate_calls"]]
            extra = {"eos_tokens": r["eos_tokens"], "gc_collects_skipped": r["gc_collects_skipped"]}
    else:
        r = json.loads((out / "floor_result.json").read_text())
        ends, steps = [x["end_s"] for x in r], len(r)
        lengths = [a.new_tokens] * steps  # checked by the generate() record: no EOS can be sampled
        phases = {k: statistics.median(x[k] for x in r[a.warmup :]) for k in r[0] if k != "end_s"}
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
        "optimizers": sorted([o["steps"], o["params"]] for o in seen["optimizers"].values()),
        "generate_calls": seen["generate_calls"],
        "gc_collections": {f"gen{g}": {"count": n, "s": t} for g, (n, t) in seen["gc"].items()},
        "response_length_mean": lengths,
        **extra,
        "phases_median_s": phases,
        "peak_rss_bytes": worker.peak_bytes,
        "wall_s": res.wall_s,
        "other_cores": res.other_cores,
    }


class UnequalWork(Exception):
    """A run did other work than the workload says: its figures are refused."""


def expected_work(framework: str, a: argparse.Namespace, actor_params: int, critic_params: int | None = None) -> dict:
    """What one run of `framework` must have done, as the instruments count it.

    GRPO, every framework: one optimizer over the actor's `actor_params` parameters, one step per RL step; one
    generate() of prompts × group sequences × new_tokens per RL step.

    PPO: one generate() of prompts × new_tokens per RL step (one response per prompt; TRL with
    `local_rollout_forward_batch_size` = the prompts generates the batch in one call). Optimizer steps: chatrlhf has
    two optimizers, the actor's (`actor_params`) and the critic's (`critic_params`, the reward model's network),
    each stepping once per RL step (one epoch, one mini-batch), so torch's global step hook counts 2 per RL step;
    TRL has one optimizer over its `PolicyAndValueWrapper` (policy and value model, `actor_params + critic_params`),
    which `PPOTrainer.train` steps once per micro-batch: with one epoch, one mini-batch and one micro-batch, once per
    RL step. TRL's own log must count no EOS token in any step (`val/num_eos_tokens`); `trl-nogc` must have skipped
    `TRL_GC_COLLECTS_PER_UPDATE` `gc.collect()` calls per RL step, `trl` none (it is left as shipped).

    Every framework: every response at full length (`new_tokens`) at every step."""
    steps = a.warmup + a.steps
    if a.algo == "grpo":
        return {
            "optimizer_steps": steps,
            "optimizers": [[steps, actor_params]],
            "generate_calls": [[a.prompts * a.group, a.new_tokens]] * steps,
        }
    if framework in CHATRLHF or framework == "floor":  # the PPO floor steps the actor and the critic apart too
        optimizers = sorted([[steps, actor_params], [steps, critic_params]])
    else:
        optimizers = [[steps, actor_params + critic_params]]
    expected = {
        "optimizer_steps": sum(n for n, _ in optimizers),
        "optimizers": optimizers,
        "generate_calls": [[a.prompts, a.new_tokens]] * steps,
    }
    if framework.startswith("trl"):
        expected["eos_tokens"] = [0] * steps
        expected["gc_collects_skipped"] = TRL_GC_COLLECTS_PER_UPDATE * steps if framework == "trl-nogc" else None
    return expected


def check_equal_work(row: dict, a: argparse.Namespace, actor_params: int, critic_params: int | None = None) -> None:
    """Refuse (UnequalWork) a run that did other work than `expected_work` says, or whose responses were not all
    `new_tokens` long."""
    where = f"{row['framework']} {row['model']}"
    for key, want in expected_work(row["framework"], a, actor_params, critic_params).items():
        if row.get(key) != want:
            raise UnequalWork(f"{where}: {key} {row.get(key)}, expected {want}")
    if not all(x == a.new_tokens for x in row["response_length_mean"]):
        raise UnequalWork(f"{where}: response lengths {row['response_length_mean']}, expected {a.new_tokens}")


def settle_options(a: argparse.Namespace) -> None:
    """Fill in `--group` and `--frameworks` for `--algo`, or refuse (SystemExit) what that algorithm cannot run."""
    allowed = FRAMEWORKS[a.algo]
    a.frameworks = a.frameworks or list(allowed)
    if a.algo == "grpo" and "trl-nogc" in a.frameworks:
        raise SystemExit("trl-nogc is TRL's PPOTrainer with its gc.collect() calls skipped: it needs --algo ppo")
    if a.algo == "grpo" and "chatrlhf-sampler" in a.frameworks:
        raise SystemExit(
            "chatrlhf-sampler is PPO's: GRPO's on-policy update here already takes π_old from its own forward"
        )
    assert all(f in allowed for f in a.frameworks), a.frameworks
    if a.group is None:
        a.group = 4 if a.algo == "grpo" else 1
    if a.algo == "ppo" and a.group != 1:
        raise SystemExit(f"--algo ppo samples one response per prompt: --group must be 1, not {a.group}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algo", choices=["grpo", "ppo"], default="grpo", help="what is compared (default grpo)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--prompts", type=int, default=8, help="prompts per RL step")
    parser.add_argument("--group", type=int, default=None, help="samples per prompt (default 4; PPO: 1, the only)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--steps", type=int, default=6, help="measured RL steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="RL steps left out at the start of each run")
    parser.add_argument("--runs", type=int, default=3, help="runs per framework and size, alternating")
    parser.add_argument(
        "--frameworks",
        nargs="+",
        choices=["chatrlhf", "chatrlhf-sampler", "trl", "trl-nogc", "floor"],
        default=None,
        help="what runs (default: grpo chatrlhf trl floor, ppo chatrlhf chatrlhf-sampler trl trl-nogc floor); each run "
        "round rotates the order; trl-nogc (PPO only) is TRL with its gc.collect() calls skipped, chatrlhf-sampler "
        "(PPO only) chatrlhf with --train.update.old_logprobs sampler",
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
        ppo = json.loads(a.spec.read_text()).get("algo") == "ppo"
        return (ppo_floor_worker if ppo else floor_worker)(a.counts, a.spec)
    assert a.warmup >= 1, "--warmup must be at least 1 (the first step's time has no step before it)"
    settle_options(a)

    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="chatrlhf-trl-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for hidden in a.hidden:
        model = build_model(workdir, hidden)
        reward_model = build_reward_model(workdir, model) if a.algo == "ppo" else None
        actor_params = param_count(model)
        critic_params = param_count(reward_model, reward_model=True) if reward_model else None
        texts = prompt_texts(model, a.prompts * (a.warmup + a.steps))
        prompts = workdir / f"prompts-h{hidden}.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
        for r in range(a.runs):
            order = a.frameworks[r % len(a.frameworks) :] + a.frameworks[: r % len(a.frameworks)]  # rotated
            for framework in order:
                print(f"{model.name}: {framework} run {r + 1}/{a.runs} ...", flush=True)
                row = run_one(framework, model, prompts, workdir, f"r{r}", a, reward_model)
                check_equal_work(row, a, actor_params, critic_params)
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
                "phases_median_s": phases,
                "gc_median_per_run": {f: {"s": statistics.median(sum(c["s"] for c in r["gc_collections"].values())
                                                                 for r in rs),
                                          "full_collections": statistics.median(r["gc_collections"]["gen2"]["count"]
                                                                                for r in rs)}
                                      for f, rs in per.items()}}  # fmt: skip
        ratio = {}
        for c in CHATRLHF:
            for f in ("trl", "trl-nogc"):
                if c in s and f in s:
                    item[f"{c.replace('-', '_')}_over_{f.replace('-', '_')}_steps_per_s"] = s[f] / s[c]
        for f in ("trl", "trl-nogc"):
            if "chatrlhf" in s and f in s:
                ratio[f] = s[f] / s["chatrlhf"]
        if "chatrlhf" in s and "floor" in s:
            ratio["floor"] = item["chatrlhf_step_over_floor"] = s["chatrlhf"] / s["floor"]
        if "trl" in s and "trl-nogc" in s:
            item["trl_nogc_over_trl_steps_per_s"] = s["trl"] / s["trl-nogc"]
        summary.append(item)
        for f in a.frameworks:
            table.append([name, f, f"{s[f]:.3f}", " ".join(f"{r['median_step_s']:.3f}" for r in per[f]),
                          f"{tokens_per_step / s[f]:.0f}", fmt_mib(rss[f]),
                          "" if ratio.get(f) is None else f"{ratio[f]:.2f}", f"{other:.2f}"])  # fmt: skip
    print()
    if a.algo == "grpo":
        print(f"GRPO, {a.prompts} prompts × {a.group} samples × {a.new_tokens} new tokens per step, β={a.beta}, "
              f"{a.steps} measured steps after {a.warmup}, {a.runs} runs each, {a.threads} thread(s)")  # fmt: skip
        print("ratio: on the trl row, chatrlhf steps/s ÷ TRL steps/s; on the floor row, chatrlhf s/step ÷ floor s/step")
    else:
        print(f"PPO, {a.prompts} prompts × 1 response × {a.new_tokens} new tokens per step, β={a.beta} (k1, in "
              f"the reward), {a.steps} measured steps after {a.warmup}, {a.runs} runs each, "
              f"{a.threads} thread(s)")  # fmt: skip
        print("ratio: on the trl and trl-nogc rows, chatrlhf steps/s ÷ that TRL's steps/s (trl-nogc: TRL with its "
              "gc.collect() calls skipped)")  # fmt: skip
    print(fmt_table(["model", "framework", "s/step", "runs (s/step)", "gen tok/s", "peak RSS MiB", "ratio",
                     "other cores"], table))  # fmt: skip
    print()
    for item in summary:
        for f, p in item["phases_median_s"].items():
            if p:
                print(f"{item['model']}: {f} phases (median s): " + ", ".join(f"{k} {v:.3f}" for k, v in p.items()))
        print(f"{item['model']}: garbage collection per run, all of it from start to exit (median s, full "
              "collections): " + ", ".join(f"{f} {g['s']:.2f} s ({g['full_collections']:g})"
                                           for f, g in item["gc_median_per_run"].items()))  # fmt: skip
        if "chatrlhf-sampler" in item["median_step_s"] and {"trl", "trl-nogc"} & set(item["median_step_s"]):
            print(f"{item['model']}: chatrlhf-sampler steps/s ÷ TRL's: " + ", ".join(
                f"{f} {item['chatrlhf_sampler_over_' + f.replace('-', '_') + '_steps_per_s']:.2f}"
                for f in ("trl", "trl-nogc") if f in item["median_step_s"]))  # fmt: skip
        if "trl_nogc_over_trl_steps_per_s" in item:
            print(f"{item['model']}: TRL with gc.collect() skipped ÷ as shipped, steps/s: "
                  f"{item['trl_nogc_over_trl_steps_per_s']:.2f}")  # fmt: skip
    versions = {n: installed_version(n) for n in ("torch", "transformers", "trl", "accelerate", "datasets")}
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    args = {k: "WORKDIR" if k == "workdir" else str(v) for k, v in vars(a).items()
            if k not in ("worker", "counts", "spec", "rest")}  # fmt: skip
    payload = {"machine": machine_summary(), "versions": versions, "args": args, "summary": summary, "runs": rows}
    write_json(a.json or workdir / "trl_compare.json", payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
