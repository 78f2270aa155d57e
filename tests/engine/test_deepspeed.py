"""DeepSpeed ZeRO through the real CLI: a 2-rank run trains exactly like one process.

Every stage (sft, reward, dpo, and rl with PPO and a critic) runs once in a single process with `batch_size 8` and
with `torchrun --nproc_per_node 2 -m chatrlhf ... --engine.kind deepspeed` at ZeRO stage 2 and 3 with
`batch_size 4` per rank, on the same data. Each rank takes its contiguous half of the same global micro-batch and
losses are normalised by global counts, so every per-step metric in metrics.jsonl must agree; only the order of
floating-point sums differs (measured: 1.8e-6 relative at most, on RL gradient norms). Tolerances:

- ZeRO-2, ZeRO-3, ZeRO-3 generating on the sharded model, and ZeRO-2 with the optimizer offloaded to
  DeepSpeedCPUAdam (measured as close as torch's AdamW, 2.5e-7): rtol 1e-5, atol 1e-6 (EQUAL).
- DPO's implicit rewards (`rewards/*`), small differences of large log-probs: atol 1e-5 (DPO_REWARDS).
- Logits of a ZeRO-3 run's saved model vs the single run's: atol 1e-5 (LOGITS_ATOL; measured 1.8e-7).

The data is chosen to reach the hard cases: 17 training records in global batches of 8 leave an epoch's last batch
with one record, so one rank trains on a weight-0 stand-in; RL generation is greedy (deterministic), and the two
prompts end generation at different steps on the two ranks (see `rl_models`). ZeRO-3 runs pass a DeepSpeed config
with stage-3 persistence and prefetch limits at 0, so even the tiny model's parameters are really partitioned.
Runs are shared between tests; the single-process references all start together when the module's first test
does. Under ZeRO-3 every model is loaded partitioned, and the frozen ones (RL reference and reward model, DPO
reference) are sharded too; the last tests read what each rank holds of them from DeepSpeed
(tests/engine/model_shards.py).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[2]
EQUAL = {"rel_tol": 1e-5, "abs_tol": 1e-6}
DPO_REWARDS = {"rel_tol": 1e-5, "abs_tol": 1e-5}
"""DPO's implicit rewards β·(log π − log π_ref) are differences of sequence log-probs of about −100, whose float32
rounding (ulp 7.6e-6) differs between runs: with β = 0.1 and 8 pairs summed they agree to ~2e-6 absolute."""
LOGITS_ATOL = 1e-5
RUN_TIMEOUT_S = 300
"""A run that takes longer has hung (each takes 10-40 s on 2 CPU cores; most of it is imports)."""
BATCH = 8
"""Global micro-batch: 8 in one process, 4 per rank on 2 ranks."""
MAX_NEW_TOKENS = 12
PARTITIONED = {
    "stage3_max_live_parameters": 0,
    "stage3_max_reuse_distance": 0,
    "stage3_param_persistence_threshold": 0,
}
"""Stage-3 settings that partition and release every parameter, however small (the defaults keep a tiny model's
parameters whole on every rank, which would leave the gathering code untested)."""
USER_ZERO3_CONFIG = {"steps_per_print": 1000, "zero_optimization": PARTITIONED}
"""`--engine.deepspeed_config` of the ZeRO-3 runs: merged into the built config, its values winning
(`steps_per_print` is built as 2**31 - 1; at 1000 it changes nothing in a 4-step run)."""


# ------------------------------------------------------------------------------------------------ inputs


def write_json(path: Path, data) -> str:
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_dirs) -> dict[str, str]:
    """Data, models and DeepSpeed configs shared by the runs."""
    from chatrlhf.demo.task import make_pairs, write_jsonl

    root = tmp_path_factory.mktemp("ds-inputs")
    # 18 pairs: 1 held out (eval_fraction 0.05), 17 trained on in global batches of 8, 8 and 1
    pairs = write_jsonl(make_pairs(18, seed=3), root / "pairs.jsonl")
    actor, rm = rl_models(tiny_dirs["llama"], root)
    return {
        "llama": str(tiny_dirs["llama"]),
        "pairs": str(pairs),
        "actor": str(actor),
        "rm": str(rm),
        "prompts": str(rl_prompts(root / "prompts.jsonl")),
        "zero3": write_json(root / "zero3.json", USER_ZERO3_CONFIG),
    }


RL_PROMPTS = ("Say it: x", "A longer prompt, y")
"""The RL data: two prompts, so every rollout batch (2 prompts) gives one to each rank. With `rl_models`, the first
prompt's greedy response is EOS at once and the second's runs to max_new_tokens: the ranks finish generating at
different steps, which is what `synced_gpus` must survive under ZeRO-3."""


def rl_prompts(path: Path) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in RL_PROMPTS), encoding="utf-8")
    return path


def rl_models(llama: Path, root: Path) -> tuple[Path, Path]:
    """An actor whose greedy responses end at a known step, and a reward model / critic with a scalar head.

    The tiny llama ties its input and output embeddings, so its greedy continuation repeats the prompt's last token.
    Making EOS's embedding row 1.2 × that of "x" makes EOS the argmax wherever "x" would have been: a prompt ending
    in "x" is answered by EOS alone, one ending in "y" by 12 "y". The chat template is the bare message, so the
    prompt's last character is the last token. The reward head is seeded with unit-scale weights (scores ~1)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama)
    tok.chat_template = "{{ messages[-1]['content'] }}"
    actor = AutoModelForCausalLM.from_pretrained(llama)
    with torch.no_grad():
        embeddings = actor.get_input_embeddings().weight
        embeddings[tok.eos_token_id] = 1.2 * embeddings[ord("x")]
    actor.save_pretrained(root / "actor")
    tok.save_pretrained(root / "actor")
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(llama, num_labels=1)
    with torch.no_grad():
        rm.score.weight.normal_(0.0, rm.config.hidden_size**-0.5)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    return root / "actor", root / "rm"


def stage_args(stage: str, i: dict[str, str]) -> list[str]:
    """Each stage's arguments, the same for every run of it (batch size and engine are added per run)."""
    common = ["--run.progress", "False", "--run.log_every", "1"]
    supervised = ["--data.paths", i["pairs"], "--train.max_seq_len", "128", *common]
    if stage == "sft":
        return ["--model", i["llama"], *supervised, "--train.grad_accum", "2", "--train.epochs", "2"]
    if stage in ("reward", "dpo"):
        return ["--model", i["llama"], *supervised, "--train.optim.lr", "1e-4"]
    return [
        "--actor", i["actor"], "--reward_model", i["rm"], "--data.paths", i["prompts"], "--data.eval_fraction", "0",
        "--train.iterations", "2", "--train.rollout_batch_size", "2", "--train.group_size", "4",
        "--train.update.mini_batch_size", "4", "--train.generation.do_sample", "False",
        "--train.generation.max_new_tokens", str(MAX_NEW_TOKENS), "--train.actor_optim.lr", "1e-4",
        "--train.critic_optim.lr", "1e-4", *common,
    ]  # fmt: skip


def zero(stage: int, i: dict[str, str], *extra: str) -> list[str]:
    args = ["--engine.kind", "deepspeed", "--engine.zero_stage", str(stage)]
    if stage == 3:
        args += ["--engine.deepspeed_config", i["zero3"]]
    return [*args, *extra]


def run_table(i: dict[str, str]) -> dict[str, tuple[str, int, list[str]]]:
    """name → (stage, ranks, arguments)."""
    table = {}
    for stage in ("sft", "reward", "dpo", "rl"):
        batch = [] if stage == "rl" else ["--train.batch_size", str(BATCH)]
        half = [] if stage == "rl" else ["--train.batch_size", str(BATCH // 2)]
        table[f"{stage}-single"] = (stage, 1, [*stage_args(stage, i), *batch])
        for z in (2, 3):
            table[f"{stage}-zero{z}"] = (stage, 2, [*stage_args(stage, i), *half, *zero(z, i)])
    sft = [*stage_args("sft", i), "--train.batch_size", str(BATCH // 2)]
    sharded = zero(3, i, "--engine.gather_for_generation", "False")
    table["rl-zero3-sharded-generation"] = ("rl", 2, [*stage_args("rl", i), *sharded])
    sampler = [*stage_args("rl", i), "--train.update.old_logprobs", "sampler"]
    table["rl-sampler-single"] = ("rl", 1, sampler)
    table["rl-sampler-zero3-sharded-generation"] = ("rl", 2, [*sampler, *sharded])
    table["sft-zero2-offload"] = ("sft", 2, [*sft, *zero(2, i, "--engine.offload_optimizer", "True")])
    table["rl-zero3-offload-frozen"] = ("rl", 2, [*stage_args("rl", i), *zero(3, i, "--engine.offload_frozen", "True")])
    # exactly on-policy (one mini-batch, the KL in the loss): π_old from the update's own forward, on each rank's rows
    rl = stage_args("rl", i)
    del rl[rl.index("--train.update.mini_batch_size") : rl.index("--train.update.mini_batch_size") + 2]
    grpo = [*rl, "--train.algo", "grpo", "--train.kl.placement", "loss", "--train.kl.estimator", "k3"]
    table["rl-grpo-single"] = ("rl", 1, grpo)
    table["rl-grpo-zero3"] = ("rl", 2, [*grpo, *zero(3, i)])
    # LoRA: the reference is the actor with its adapters disabled (PEFT turns their requires_grad off and on again
    # around that forward), which must not disturb ZeRO-2's gradient hooks on them
    lora = [*stage_args("rl", i), "--lora.rank", "4"]
    table["rl-lora-single"] = ("rl", 1, lora)
    table["rl-lora-zero2"] = ("rl", 2, [*lora, *zero(2, i)])
    return table


# ------------------------------------------------------------------------------------------------ runs


class Runs:
    """CLI runs, each started once (`start` returns at once, so independent runs overlap) and shared by tests."""

    def __init__(self, root: Path, table: dict[str, tuple[str, int, list[str]]]):
        self.root = root
        self.table = table
        self.procs: dict[str, subprocess.Popen] = {}
        self.done: dict[str, Path] = {}

    def start(self, *names: str) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
        # one thread per process; CPU only (also on a GPU machine: two ranks cannot share one GPU under NCCL)
        env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
        for name in names:
            if name in self.procs:
                continue
            stage, ranks, args = self.table[name]
            launcher = [sys.executable, "-m", "chatrlhf"]
            if ranks > 1:  # torchrun, run as a module of this interpreter; --standalone picks a free port
                launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                            str(ranks), "-m", "chatrlhf"]  # fmt: skip
            cmd = [*launcher, stage, *args, "--output_dir", str(self.root / name)]
            with open(self.root / f"{name}.log", "w") as log:
                self.procs[name] = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True
                )

    def get(self, name: str) -> Path:
        """The finished run's directory; fails with its output if it exited non-zero or hung."""
        if name in self.done:
            return self.done[name]
        self.start(name)
        proc = self.procs[name]
        try:
            code = proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its ranks: the session this run started
            proc.wait()
            pytest.fail(f"{name}: no exit after {RUN_TIMEOUT_S} s (hung)\n{self.log(name)}")
        assert code == 0, f"{name}: exit {code}\n{self.log(name)}"
        self.done[name] = self.root / name
        return self.done[name]

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-8000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, inputs):
    runs = Runs(tmp_path_factory.mktemp("ds-runs"), run_table(inputs))
    runs.start(*[name for name in runs.table if "single" in name])
    yield runs
    for proc in runs.procs.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def step_metrics(run: Path) -> dict[int, dict[str, float]]:
    """step → every logged value of that step (its lines merged), timings left out."""
    steps: dict[int, dict[str, float]] = {}
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        values = {k: v for k, v in record.items() if k not in ("stage", "step") and not k.startswith(TIMINGS)}
        steps.setdefault(record["step"], {}).update(values)
    return steps


TIMINGS = ("time/", "perf/")


def assert_metrics_match(
    run: Path, reference: Path, tol: dict[str, float], looser: dict[str, dict[str, float]] | None = None
) -> dict[int, dict[str, float]]:
    """Same steps, same keys, every value within `tol` (math.isclose), or within `looser[part]` for keys that
    contain `part`; returns the run's metrics."""
    got, want = step_metrics(run), step_metrics(reference)
    assert sorted(got) == sorted(want), f"steps {sorted(got)} vs {sorted(want)}"
    bad = []
    for step, values in want.items():
        assert sorted(got[step]) == sorted(values), f"step {step}: keys {sorted(got[step])} vs {sorted(values)}"
        for key, v in values.items():
            key_tol = next((t for part, t in (looser or {}).items() if part in key), tol)
            if not math.isclose(got[step][key], v, **key_tol):
                rel = abs(got[step][key] - v) / max(abs(v), 1e-30)
                bad.append(f"step {step} {key}: {got[step][key]!r} vs {v!r} (rel {rel:.1e}; allowed {key_tol})")
    assert not bad, f"{run.name} vs {reference.name}:\n" + "\n".join(bad)
    return got


# ------------------------------------------------------------------------------------------------ tests

STEPS = {"sft": 4, "reward": 3, "dpo": 3, "rl": 2}
"""Optimizer steps (RL: iterations) of each stage's runs. sft: 2 epochs × (micro-batches of 8+8, then 1 record);
reward and dpo: batches of 8, 8 and 1 record — the last one leaves a rank with a weight-0 stand-in."""
LOOSER = {"dpo": {"rewards/": DPO_REWARDS}}


@pytest.mark.parametrize("zero_stage", [2, 3])
@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "rl"])
def test_two_ranks_match_one_process(runs, stage, zero_stage):
    runs.start(f"{stage}-zero{zero_stage}")
    reference = runs.get(f"{stage}-single")
    got = assert_metrics_match(runs.get(f"{stage}-zero{zero_stage}"), reference, EQUAL, LOOSER.get(stage))
    assert sorted(got) == list(range(1, STEPS[stage] + 1))


def test_on_policy_updates_on_two_ranks_match_one_process(runs):
    """GRPO in one mini-batch with the KL in the loss: each rank takes π_old's log-probs and entropy from its own
    rows' forward in the update (the ratio is exactly 1), and the KL and entropy metrics, summed over the ranks,
    equal the single process's."""
    runs.start("rl-grpo-zero3")
    got = assert_metrics_match(runs.get("rl-grpo-zero3"), runs.get("rl-grpo-single"), EQUAL)
    assert sorted(got) == [1, 2]
    for values in got.values():
        assert values["policy/approx_kl"] == 0.0 and values["kl/mean"] >= 0.0 and values["policy/entropy"] > 0.0


def test_rl_responses_end_at_different_steps_on_the_two_ranks(inputs):
    """The precondition of the sharded-generation test, checked on the actor itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatrlhf.data.collate import prompt_ids, render_prompt

    tok = AutoTokenizer.from_pretrained(inputs["actor"])
    model = AutoModelForCausalLM.from_pretrained(inputs["actor"]).eval()
    lengths = []
    for prompt in RL_PROMPTS:
        ids = torch.tensor([prompt_ids(tok, render_prompt(tok, prompt))])  # as the RL driver encodes it
        out = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
        response = out[0, ids.shape[1] :].tolist()
        lengths.append(response.index(tok.eos_token_id) + 1 if tok.eos_token_id in response else len(response))
    assert lengths == [1, MAX_NEW_TOKENS]


def test_zero3_generation_on_the_sharded_model(runs):
    """`--engine.gather_for_generation False`: generation runs on the partitioned actor with synced_gpus, one rank
    finishing at the first token and the other at the 12th; it ends (no hang) and trains like one process."""
    runs.start("rl-zero3-sharded-generation")
    got = assert_metrics_match(runs.get("rl-zero3-sharded-generation"), runs.get("rl-single"), EQUAL)
    for values in got.values():
        # 4 responses of 1 token (EOS) from one rank's prompt, 4 of 12 (cut) from the other's
        assert values["response/length_mean"] == (4 * 1 + 4 * MAX_NEW_TOKENS) / 8
        assert values["response/truncated_frac"] == 0.5


def test_sampler_logprobs_with_zero3_generation_on_the_sharded_model(runs):
    """`--train.update.old_logprobs sampler` while generating on the partitioned actor with synced_gpus: the rank
    that finishes first keeps running forwards without drawing tokens, which must not shift its recorded
    log-probs; it trains like one process with the same setting, and that run like the one with the separate
    forward (the rounding of decoding with a KV cache aside)."""
    runs.start("rl-sampler-zero3-sharded-generation")
    assert_metrics_match(runs.get("rl-sampler-zero3-sharded-generation"), runs.get("rl-sampler-single"), EQUAL)
    sampler, forward = step_metrics(runs.get("rl-sampler-single")), step_metrics(runs.get("rl-single"))
    for step, values in forward.items():
        for key in ("kl/mean", "policy/entropy", "loss/policy", "loss/value", "reward/total_mean"):
            assert math.isclose(sampler[step][key], values[key], rel_tol=1e-4, abs_tol=1e-6), (step, key)


def test_zero2_offloaded_optimizer(runs):
    """`--engine.offload_optimizer True` steps on the CPU with DeepSpeedCPUAdam (a C++ op compiled on first use);
    its arithmetic differs from torch's AdamW in rounding only."""
    runs.start("sft-zero2-offload")
    run = runs.get("sft-zero2-offload")
    assert_metrics_match(run, runs.get("sft-single"), EQUAL)
    (states,) = (run / "checkpoints").glob("step-*/sft/mp_rank_00_model_states.pt")  # stages 0-2: one, from rank 0
    zero = torch.load(states, map_location="cpu", weights_only=False)["ds_config"]["zero_optimization"]
    assert zero["stage"] == 2 and zero["offload_optimizer"]["device"] == "cpu"


def test_lora_with_the_adapter_free_reference_on_two_ranks_matches_one_process(runs):
    """PPO with LoRA adapters on actor and critic and no separate reference model (the actor without its adapters
    scores π_ref) trains under ZeRO-2 on 2 ranks like one process."""
    runs.start("rl-lora-single", "rl-lora-zero2")
    got = assert_metrics_match(runs.get("rl-lora-zero2"), runs.get("rl-lora-single"), EQUAL)
    assert any(values["optim/actor_grad_norm"] > 0 for values in got.values())
    assert "without its LoRA adapters" in runs.log("rl-lora-zero2")


def test_user_deepspeed_config_is_applied(runs):
    """The ZeRO-3 runs' JSON reaches DeepSpeed merged into the built config: DeepSpeed saves the config it ran with
    in each checkpoint, and its partitioning of the 32-element norm weights (whole under the default persistence
    threshold of 1e5 elements) shows that `stage3_param_persistence_threshold 0` took effect."""
    (states,) = (runs.get("sft-zero3") / "checkpoints").glob("step-*/sft/zero_pp_rank_0_mp_rank_00_model_states.pt")
    saved = torch.load(states, map_location="cpu", weights_only=False)
    assert saved["ds_config"]["zero_optimization"] == {"stage": 3, **PARTITIONED}, "merged, not replaced"
    assert saved["ds_config"]["steps_per_print"] == USER_ZERO3_CONFIG["steps_per_print"], "the user's value wins"
    assert saved["ds_config"]["gradient_clipping"] == 1.0, "built values the user did not set are kept"
    assert "model.norm.weight" in saved["module"]
    whole = {name: tuple(p.shape) for name, p in saved["module"].items() if p.numel() > 0}
    assert not whole, f"parameters left whole on rank 0: {whole}"


@torch.no_grad()
def test_zero3_saved_models_load_in_plain_transformers(runs, inputs):
    """The weights a ZeRO-3 run gathers and saves are the single run's, as seen by transformers alone."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    runs.start("sft-zero3", "rl-zero3")
    for run, directory, cls, initial in (
        ("sft", "model", AutoModelForCausalLM, inputs["llama"]),
        ("rl", "model", AutoModelForCausalLM, inputs["actor"]),
        ("rl", "critic", AutoModelForSequenceClassification, inputs["rm"]),
    ):
        sharded = runs.get(f"{run}-zero3") / directory
        whole = runs.get(f"{run}-single") / directory
        tok = AutoTokenizer.from_pretrained(sharded)
        batch = tok(["User: name a colour\nAssistant:", "hi"], return_tensors="pt", padding=True)
        a = cls.from_pretrained(sharded).eval()(**batch).logits
        b = cls.from_pretrained(whole).eval()(**batch).logits
        assert (a - b).abs().max() <= LOGITS_ATOL, f"{run}/{directory}: max |Δlogit| {(a - b).abs().max():.2e}"
        start = cls.from_pretrained(initial).eval()(**batch).logits
        assert (a - start).abs().max() > 100 * LOGITS_ATOL, "training moved the weights well beyond the tolerance"


@pytest.mark.parametrize(("run", "directory"), [("sft", "model"), ("rl", "model"), ("rl", "critic")])
def test_zero3_saved_model_holds_the_single_runs_tensors(runs, run, directory):
    """A ZeRO-3 run writes the tensors `save_pretrained` writes for an unsharded model: its parameters and
    persistent buffers, not buffers the model rebuilds itself (llama's rotary `inv_freq`, which transformers then
    reports as unexpected keys)."""
    from safetensors import safe_open

    runs.start(f"{run}-zero3")
    names = []
    for kind in ("zero3", "single"):
        with safe_open(runs.get(f"{run}-{kind}") / directory / "model.safetensors", "pt") as f:
            names.append(sorted(f.keys()))
    assert names[0] == names[1], f"only in the ZeRO-3 model: {sorted(set(names[0]) - set(names[1]))}"


# ------------------------------------------------------------------------------------------------ episodes


def test_episodes_on_two_ranks_match_one_process(inputs, sft_llama, tmp_path_factory):
    """PPO on multi-turn episodes (the two-turn environment of tests/train/test_rl_episodes.py, greedy, with a
    reward model that also initialises the critic) on 2 ranks under ZeRO-3: each rank plays its share of the
    episodes, whose first messages and turns differ in length from rank to rank; the shares are gathered (the
    prompts left-padded, the episodes themselves for the `episode/*` metrics) and every metric equals the single
    process's."""
    from chatrlhf.models.load import add_value_head

    root = tmp_path_factory.mktemp("ds-episodes")
    rm = add_value_head(sft_llama, root / "rm")
    args = ["--actor", str(sft_llama), "--reward_model", str(rm), "--env", "tests.train.test_rl_episodes:AreYouSure",
            "--data.paths", "calculator:prompts:48:1", "--data.eval_fraction", "0.1", "--train.eval_prompts", "2",
            "--train.iterations", "2", "--train.rollout_batch_size", "4", "--train.update.mini_batch_size", "2",
            "--train.generation.do_sample", "False", "--train.generation.max_new_tokens", "40",
            "--train.episode.max_tokens", "1024", "--train.episode.max_turns", "3", "--train.actor_optim.lr", "1e-4",
            "--train.critic_optim.lr", "1e-4", "--run.progress", "False", "--run.log_every", "1"]  # fmt: skip
    runs = Runs(root, {"episodes-single": ("rl", 1, args), "episodes-zero3": ("rl", 2, [*args, *zero(3, inputs)])})
    try:
        runs.start("episodes-single", "episodes-zero3")
        # rollout/logprob_diff*: the rounding between the sampler's and the trainer's forwards, which depends on the
        # padding of each rank's share (measured: below 5e-6 both ways)
        rounding = {"rollout/logprob_diff": {"rel_tol": 0.0, "abs_tol": 1e-5}}
        got = assert_metrics_match(runs.get("episodes-zero3"), runs.get("episodes-single"), EQUAL, rounding)
    finally:
        for proc in runs.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert sorted(got) == [1, 2]
    for values in got.values():
        assert values["episode/turns_mean"] > 1.0 and values["episode/env_tokens_mean"] > 0
        assert math.isfinite(values["loss/value"]) and values["rollout/logprob_diff"] < 1e-4
    summary = json.loads((runs.get("episodes-zero3") / "summary.json").read_text())
    assert summary["eval/prompts"] == 2 and math.isfinite(summary["eval/score_mean"])


# ------------------------------------------------------------------------------------------------ partitioned models


def model_shards(root: Path, stage: str, args: list[str]) -> list[dict]:
    """What each of 2 ranks holds of the stage's models (tests/engine/model_shards.py), one dict per rank."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    script = ROOT / "tests" / "engine" / "model_shards.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(root), stage, *args, "--output_dir", str(root)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-8000:]
    return [json.loads((root / f"rank-{r}.json").read_text(encoding="utf-8")) for r in range(2)]


def halves(model_dir: str, cls_name: str) -> list[int]:
    """Per parameter of the model as transformers alone loads it: the elements of one rank's ZeRO-3 partition on
    2 ranks, ⌈numel / 2⌉ (DeepSpeed pads the last partition)."""
    import transformers

    model = getattr(transformers, cls_name).from_pretrained(model_dir)
    return [math.ceil(p.numel() / 2) for p in model.parameters()]


ENGINES = {
    "sft": [True],
    "reward": [True],
    "dpo": [False, True],
    "rl": [False, False, True, True],
}
"""Per stage, the DeepSpeed engines it builds in order, True for a trained model's (with an optimizer), False for a
frozen model's inference engine: dpo the reference, then the policy; rl (PPO) the reference and the reward model,
then the actor and the critic."""


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "rl"])
def test_zero3_loads_every_model_partitioned(inputs, tmp_path, stage):
    """Under ZeRO-3 every model a stage builds, trained or frozen, reaches DeepSpeed already partitioned (as ZeRO-3
    parameters, none held whole): loaded straight into shards, never whole on a rank. The frozen models (RL
    reference and reward model, DPO reference) stay partitioned: each of the 2 ranks holds half of every parameter
    (as DeepSpeed's own `ds_tensor` reports) and nothing whole; the expected halves come from the model directories
    loaded by transformers alone. The RL run also offloads them (`--engine.offload_frozen`), which must reach
    DeepSpeed as its parameter offload."""
    expected = {}
    if stage == "rl":
        args = [*stage_args("rl", inputs), *zero(3, inputs, "--engine.offload_frozen", "True")]
        expected = {"reference": halves(inputs["actor"], "AutoModelForCausalLM"),
                    "reward_model": halves(inputs["rm"], "AutoModelForSequenceClassification")}  # fmt: skip
    else:
        args = [*stage_args(stage, inputs), *zero(3, inputs)]
        if stage == "dpo":
            expected = {"reference": halves(inputs["llama"], "AutoModelForCausalLM")}
    ranks = model_shards(tmp_path, stage, args)
    for rank, held in enumerate(ranks):
        assert held["world_size"] == 2
        engines = held["engines"]
        assert [e["optimizer"] for e in engines] == ENGINES[stage], f"rank {rank}: engines {engines}"
        assert all(e["partitioned"] for e in engines), f"rank {rank}: a model reached DeepSpeed whole: {engines}"
        for name, want in expected.items():
            params = held[name]["params"]
            assert [p["partition"] for p in params] == want, f"rank {rank} {name}: not half of every parameter"
            assert sum(p["local"] for p in params) == 0, f"rank {rank} {name}: parameters held whole"
            assert held[name]["offload_param"] == ("cpu" if stage == "rl" else None)


def test_zero3_offloaded_frozen_models(runs):
    """`--engine.offload_frozen` under ZeRO-3 keeps the frozen models' partitions on the CPU (DeepSpeed's parameter
    offload) and trains like one process."""
    runs.start("rl-zero3-offload-frozen")
    assert_metrics_match(runs.get("rl-zero3-offload-frozen"), runs.get("rl-single"), EQUAL)
