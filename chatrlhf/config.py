"""Typed configs, one per stage; every field documented where it is declared.

Values come from three layers, later ones winning: the defaults below (DeepSpeed-Chat's where it has one, see
docs/algorithms.md), a YAML recipe (`--recipe recipes/demo.yaml`), and command-line flags (`--optim.lr 1e-5`).
Each run directory stores the fully resolved config as `config.yaml`; passing that file back as `--recipe`
repeats the run exactly.

`validate()` on each config raises `ConfigError` naming the fields in conflict; nothing here rewrites a user's value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml

from chatrlhf.data.blend import parse_split
from chatrlhf.data.formats import FORMAT_CHOICES
from chatrlhf.errors import ConfigError
from chatrlhf.trackers import TRACKERS


@dataclass
class RunConfig:
    """Settings shared by every stage: where, on what device, how reproducibly, how loudly."""

    seed: int = 1234
    """Seed for python, numpy and torch RNGs and for the data order (DeepSpeed-Chat's default)."""
    device: str = "auto"
    """Torch device: `auto` (cuda if available, else cpu), `cpu`, `cuda`, `cuda:1`, `mps`, `xpu`, ... A device this
    machine does not have is refused when the stage starts, before anything is written."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the models are loaded in. float32 or bfloat16 on CPU (float16 is refused there: sampling in float16 fails
    on the CPU); bfloat16 is the usual choice on recent GPUs."""
    threads: int = 0
    """torch intra-op threads on CPU; 0 keeps torch's default (one per core)."""
    log_every: int = 10
    """Write a metrics line (metrics.jsonl) every this many optimizer steps / RL iterations."""
    progress: bool = True
    """Show a progress bar with the key metrics."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that also receive every logged metric and the RL stage's held-out samples: any of
    `tensorboard` (events in `<stage dir>/tensorboard/`), `wandb`, `mlflow`, `trackio`; each is an optional extra
    (`pip install 'chatrlhf[wandb]'`) configured by its own environment variables (docs/metrics.md#trackers)."""
    project: str = "chatrlhf"
    """The trackers' project (W&B and Trackio project, MLflow experiment)."""
    name: str = ""
    """The run's name in the trackers; empty: the run directory's name (a pipeline's stages: `NAME/sft`, ...)."""
    overwrite: bool = False
    """Allow writing into an output directory that already holds a finished run (its model is replaced)."""
    max_bad_steps: int = 0
    """Skip up to this many optimizer steps whose loss or gradient is NaN/inf (counted in `faults/skipped_steps`);
    the next one stops the run. 0 = the first stops it."""


@dataclass
class EngineConfig:
    """How the trained models are held and stepped: one process, or DeepSpeed ZeRO across processes."""

    kind: Literal["single", "deepspeed"] = "single"
    """`single`: plain PyTorch in one process (the default). `deepspeed`: DeepSpeed ZeRO; launch with
    `torchrun --nproc_per_node N -m chatrlhf ...` or
    `deepspeed --num_gpus N --module --no_local_rank chatrlhf ...` (docs/scale.md)."""
    zero_stage: int = 2
    """ZeRO stage 0–3: 1 shards optimizer states, 2 also gradients, 3 also parameters."""
    offload_optimizer: bool = False
    """Keep optimizer states on the CPU and step there (DeepSpeedCPUAdam); ZeRO stage >= 1."""
    offload_params: bool = False
    """Keep parameters on the CPU between uses; ZeRO stage 3 only."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON config merged over the one built from these settings (its values win), for anything not
    exposed here (bucket sizes, stage-3 prefetch, ...)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them (less memory, ~30% more compute)."""
    offload_frozen: bool = False
    """RL: keep the reference and reward models on the CPU and move each to the device only while it scores. Under
    ZeRO-3 (which shards the frozen models, the DPO reference too) their partitions stay on the CPU and DeepSpeed
    fetches each layer to the device while it runs (docs/scale.md)."""
    gather_for_generation: bool = True
    """ZeRO-3 rollouts: gather the actor's full weights once per rollout batch and generate on a whole copy.
    False generates on the sharded model (`synced_gpus`), which gathers every layer for every token."""


@dataclass
class LoRAConfig:
    """Low-rank adapters (PEFT) on the trained models instead of training every weight."""

    rank: int = 0
    """Adapter rank r; 0 = no LoRA (train all weights)."""
    alpha: float = 16.0
    """Scaling α; the update is (α / r)·B·A."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=list)
    """Module names to adapt (e.g. q_proj v_proj, or all-linear); empty = PEFT's default for the architecture."""


@dataclass
class CheckpointConfig:
    """Resumable checkpoints in `<run dir>/checkpoints/step-N/` (docs/reliability.md)."""

    every: int = 50
    """Save a checkpoint every this many optimizer steps (RL: iterations) and at the end; 0 = only at the end."""
    keep: int = 2
    """Keep the newest this many checkpoints (older ones are deleted after a newer one is complete)."""


@dataclass
class OptimConfig:
    """AdamW with a warm-up + decay schedule and gradient clipping."""

    lr: float = 1e-5
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam (β1, β2); DeepSpeed-Chat uses (0.9, 0.95)."""
    eps: float = 1e-8
    """Adam ε."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warm-up (cosine is DeepSpeed-Chat's default)."""
    warmup_steps: int = 0
    """Linear warm-up steps (optimizer steps)."""


@dataclass
class DataConfig:
    """Where a stage's records come from (README, "Data formats")."""

    paths: list[str] = field(default_factory=list)
    """Sources: .jsonl/.json/.parquet/.csv files, `datasets` directories saved to disk (`dir` or `dir:split`),
    datasets by name through `datasets.load_dataset` (`hf:ID[:SPLIT][?config=..&data_dir=..&data_files=..]`, e.g.
    `hf:Anthropic/hh-rlhf:train`), or generated demo data (`demo:pairs:N:SEED`, `demo:prompts:N:SEED`). See
    docs/data.md."""
    format: str = "auto"
    """Dataset format of every source: `auto` detects each source's from its columns; or one of trl (chatrlhf's own
    schema, TRL's formats), hh-rlhf, rm-static, shp, webgpt, ultrafeedback, oasst (docs/data.md)."""
    weights: list[float] | None = None
    """Blend weights, one per path (up- or down-samples each source; counts are printed). None = concatenate."""
    eval_paths: list[str] = field(default_factory=list)
    """Held-out sources for evaluation. Empty = hold out `eval_fraction` of the training records."""
    eval_fraction: float = 0.05
    """Fraction of the records held out for evaluation when `eval_paths` is empty."""
    skip_invalid: bool = False
    """Skip invalid records (an adapter's unconvertible ones included) instead of stopping at the first one; the
    number skipped is printed and logged."""
    num_proc: int = 1
    """Processes that validate and tokenize the records (`datasets.map`'s `num_proc`); 1 = this process."""
    cache_dir: str | None = None
    """Where prepared data is cached (Arrow files: each source as read, its validated records, their tokens); a
    second run with the same files, format, tokenizer and lengths reads them back. None = `chatrlhf/` in the
    `datasets` cache (`HF_DATASETS_CACHE`, default ~/.cache/huggingface/datasets). See docs/data.md."""


@dataclass
class SFTTrainConfig:
    """How step 1 (supervised fine-tuning) trains."""

    epochs: int = 1
    """Passes over the training records."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run all epochs)."""
    batch_size: int = 8
    """Sequences per micro-batch (DeepSpeed-Chat's per-device default)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_seq_len: int = 512
    """Longest prompt+response in tokens; a longer record is an error naming it."""
    loss_on_prompt: bool = False
    """Also train on prompt tokens (DeepSpeed-Chat does; the default trains on response tokens only)."""
    eval_every: int = 0
    """Evaluate held-out perplexity every this many steps (0 = only at the end)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4))
    """Optimizer. DeepSpeed-Chat's OPT-1.3B script uses lr 9.65e-6; small models want more."""


@dataclass
class RewardTrainConfig:
    """How step 2 (reward model) trains."""

    epochs: int = 1
    """Passes over the training pairs (DeepSpeed-Chat: 1)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run all epochs)."""
    batch_size: int = 4
    """Pairs per micro-batch (each pair is two sequences; DeepSpeed-Chat: 4)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_seq_len: int = 512
    """Longest prompt+response in tokens; a longer record is an error naming it."""
    eval_every: int = 0
    """Evaluate held-out accuracy every this many steps (0 = only at the end)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, weight_decay=0.1))
    """Optimizer (DeepSpeed-Chat's OPT-350M reward model: lr 5e-5, weight decay 0.1)."""


@dataclass
class GenerationConfig:
    """Sampling for rollouts (and for the sampled evaluation)."""

    max_new_tokens: int = 256
    """Longest response in tokens (DeepSpeed-Chat's `max_answer_seq_len`)."""
    temperature: float = 1.0
    """Sampling temperature; PPO's math assumes samples from the policy itself, i.e. 1.0."""
    top_p: float = 1.0
    """Nucleus sampling; below 1.0 the rollouts no longer come from π, which biases the policy gradient."""
    top_k: int = 0
    """Top-k sampling; 0 disables it."""
    do_sample: bool = True
    """Sample (the RL default). False decodes greedily: every run and every rank count gives the same responses,
    for reproducibility checks; it gives GRPO/RLOO groups no variety to learn from."""


@dataclass
class RolloutConfig:
    """Which engine generates the RL rollouts, and how its weights are kept fresh (docs/rollout.md)."""

    backend: Literal["hf", "vllm"] = "hf"
    """`hf`: Hugging Face `generate` on the actor itself. `vllm`: a vLLM engine colocated with training, given the
    actor's current weights before every rollout (`pip install 'chatrlhf[vllm]'`)."""
    gpu_memory_utilization: float = 0.3
    """vLLM on a GPU: the share of the GPU's memory its weights and KV cache may take (the trainer needs the
    rest)."""
    cpu_kv_cache_gib: float = 1.0
    """vLLM on the CPU: GiB of memory for its KV cache (`VLLM_CPU_KVCACHE_SPACE`)."""
    sleep: bool = True
    """vLLM on a GPU: release the KV cache and the weights while the trainer runs, and take them back before a
    rollout (vLLM's sleep mode, level 1). Not available on the CPU, where it is ignored."""
    sync_tolerance: float = 1e-3
    """After each weight sync, the largest |log π_trainer − log π_vllm| allowed on a fixed probe sequence; more
    stops the run (the weights did not arrive). Float32 on the CPU agrees to ~1e-6; bf16 on a GPU needs more."""
    max_logprob_diff: float | None = None
    """Stop when an iteration's `rollout/logprob_diff` (mean |log π_trainer − log π_rollout| over the sampled
    tokens) exceeds this; None only logs it."""
    tis_cap: float | None = None
    """Truncated importance sampling: weight each token's advantage by min(π_old / π_rollout, cap), where
    π_rollout is the probability the rollout engine sampled with (it differs from the trainer's recomputation
    through kernels, caches and precision). None disables it."""


@dataclass
class KLConfig:
    """The KL penalty against the reference policy (docs/algorithms.md §8)."""

    coef: float = 0.1
    """β, the weight of the per-token KL estimate: r_t −= β·KL_t (placement reward) or + β·KL in the loss."""
    estimator: Literal["k1", "k2", "k3"] = "k1"
    """KL estimator (Schulman, "Approximating KL Divergence"): k1 = log π − log π_ref (DeepSpeed-Chat), k2 =
    ½(log-ratio)², k3 = exp(−log-ratio) − 1 + log-ratio (GRPO's, non-negative). placement loss needs k2 or k3."""
    placement: Literal["reward", "loss"] = "reward"
    """Where the KL penalty acts: shaped into the reward (r_t −= β·KL_t of π_old; PPO, DeepSpeed-Chat) or added to
    the policy loss as β·KL of the current policy, with its gradient (GRPO)."""
    target: float | None = None
    """If set, β adapts to keep the per-response KL near this target (Ziegler et al. 2019); `coef` is its start."""
    horizon: int = 10000
    """Horizon of the adaptive KL controller, in sampled responses (Ziegler et al.: β moves by at most 20% per
    `horizon` responses)."""


@dataclass
class RewardShapingConfig:
    """What is done to the reward before the advantages: the clip and DAPO's overlong punishment."""

    clip: float = 5.0
    """The summed score is clipped to ±clip before it is added at the last response token (DeepSpeed-Chat's
    `clip_reward_value`)."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment: the last this many tokens before `generation.max_new_tokens` cost a penalty
    rising linearly to `overlong_penalty` at the limit (docs/algorithms.md §11). 0 = off."""
    overlong_penalty: float = 1.0
    """The overlong punishment at the length limit (DAPO: 1, in units of its 0/1 reward)."""


@dataclass
class AdvantageConfig:
    """How the advantages are estimated beyond what the algorithm fixes (docs/algorithms.md §3, §7)."""

    gamma: float = 1.0
    """Discount γ of GAE (PPO) and of REINFORCE++'s returns."""
    lam: float = 0.95
    """λ of GAE (PPO)."""
    whiten: bool = False
    """PPO: whiten the advantages over the rollout batch (masked). DeepSpeed-Chat does not; OpenRLHF and TRL do."""
    group_baseline: bool = False
    """REINFORCE++-baseline: subtract each prompt's mean score before KL shaping (needs group_size >= 2)."""


@dataclass
class LossConfig:
    """The policy and value losses every algorithm shares (docs/algorithms.md §3.5–3.7, §11–13)."""

    clip_low: float = 0.2
    """ε_low: the ratio (PPO, DAPO: per token; GSPO: per sequence) is kept above 1 − ε_low; CISPO clips its weights
    there. DeepSpeed-Chat's `cliprange` 0.2."""
    clip_high: float | None = None
    """ε_high: the ratio is kept below 1 + ε_high (DAPO's clip-higher: 0.28). None = clip_low (PPO's symmetric
    clip)."""
    value_clip: float = 0.2
    """ε of the clipped value loss (new values kept within ±ε of the rollout's values)."""
    aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = "token_mean"
    """How per-token losses become one number (docs/algorithms.md §3.7): token_mean is DeepSpeed-Chat's and DAPO's
    token-level loss; GRPO's and GSPO's papers use seq_mean_token_mean."""
    entropy_coef: float = 0.0
    """Entropy bonus: the loss subtracts coef × the aggregated entropy of the current policy's next-token
    distributions (needs the full-vocabulary softmax with gradients: more memory). 0 = off."""
    mask_truncated: bool = False
    """DAPO's overlong filtering: responses cut at `generation.max_new_tokens` (no EOS) are left out of the loss
    (they still count in their group's baseline)."""

    @property
    def high(self) -> float:
        """ε_high as used: `clip_high`, or `clip_low` when it is None."""
        return self.clip_low if self.clip_high is None else self.clip_high


@dataclass
class UpdateConfig:
    """How the update walks over an iteration's rollouts: epochs, mini-batches (optimizer steps), micro-batches."""

    epochs: int = 1
    """Passes over each rollout batch (PPO's epochs)."""
    mini_batch_size: int = 0
    """Sequences per optimizer step within an iteration's rollouts (0 = all of them in one step)."""
    micro_batch_size: int = 0
    """Sequences per forward/backward (gradient accumulation up to mini_batch_size); 0 = mini_batch_size."""
    trim_padding: bool = False
    """Run each forward/backward of the update only over the columns its micro-batch uses: the micro-batches of a
    rank's share of a mini-batch are cut from it sorted by response length (when there are several), and each
    drops the prompt columns that are padding in all its rows and the response columns past its longest response.
    The losses are the same sums; only the float rounding of the forwards differs (so a run is not bit-identical
    to one without it). False (the default): every micro-batch at the rollout's full width, in the shuffled
    order."""
    old_logprobs: Literal["auto", "forward", "sampler"] = "auto"
    """Where log π_old comes from. auto: when the update is exactly on-policy — one epoch, one mini-batch (the whole
    rollout), the KL in the loss (or β = 0 with no target), no TIS, the hf backend — it is the update's own forward,
    detached (its ratio is 1, its gradient the policy gradient), and the separate no-grad forward of the actor is
    skipped; the entropy and KL metrics come from the same forward. forward: always that separate forward.
    sampler (hf backend only): the log-probs and entropies the generator recorded as it drew each token, with the
    weights the update starts from, so the separate forward is skipped in every case (any epochs, mini-batches
    and KL placement), as TRL's PPO does; they equal the forward's up to the rounding of decoding with a KV cache
    (no `rollout/logprob_diff` is then measured)."""


@dataclass
class SamplingConfig:
    """Dynamic sampling (algo dapo): groups whose rewards are all equal are dropped and more prompts are sampled."""

    max_rounds: int = 8
    """Generation rounds of `rollout_batch_size` prompts at most per iteration; if the batch is still not full of
    groups with unequal rewards after them, the run stops (the reward no longer tells the samples apart)."""


@dataclass(frozen=True)
class AlgorithmRules:
    """What an RL algorithm asks of a run, checked when the config is validated. The math that goes with each is in
    train/algorithms.py (ALGORITHMS), under the same names."""

    critic: bool = False
    """It trains a critic (value model), initialised from `critic` or the reward model."""
    greedy_baseline: bool = False
    """Each prompt also gets a greedy response, scored as the baseline (ReMax)."""
    sampling: Literal["once", "dynamic"] = "once"
    """`once`: one generation round per iteration; `dynamic`: DAPO's dynamic sampling (`train.sampling`)."""
    min_group: int = 1
    """Smallest `group_size`: a group baseline needs two samples."""
    max_group: int | None = None
    """Largest `group_size` (ReMax: one sample and one greedy response per prompt)."""
    whiten: bool = False
    """`train.advantage.whiten` applies (the others normalise by their own rule)."""
    group_baseline: bool = False
    """`train.advantage.group_baseline` applies."""
    token_rewards: bool = False
    """Its advantages read per-token rewards (returns over the tokens), so `train.episode.credit: turn` applies; the
    others reduce a sequence's rewards to their sum."""


ALGORITHM_RULES: dict[str, AlgorithmRules] = {
    "ppo": AlgorithmRules(critic=True, whiten=True, token_rewards=True),
    "grpo": AlgorithmRules(min_group=2),
    "dr_grpo": AlgorithmRules(min_group=2),
    "rloo": AlgorithmRules(min_group=2),
    "reinforce_pp": AlgorithmRules(group_baseline=True, token_rewards=True),
    "remax": AlgorithmRules(greedy_baseline=True, max_group=1),
    "dapo": AlgorithmRules(sampling="dynamic", min_group=2),
    "gspo": AlgorithmRules(min_group=2),
    "cispo": AlgorithmRules(min_group=2),
}
"""The rules of each `train.algo` (its advantages and policy loss: docs/algorithms.md §7, §11–13)."""

Algo = Literal["ppo", "grpo", "dr_grpo", "rloo", "reinforce_pp", "remax", "dapo", "gspo", "cispo"]


Diagnostic = Literal[
    "reward_vs_judge",
    "reward_vs_total",
    "length_drift",
    "repetition",
    "entropy_collapse",
    "kl_blowup",
    "clipfrac_high",
    "approx_kl_high",
    "value_loss_rising",
    "logprob_mismatch",
    "reward_dominance",
    "reward_at_clip",
]
DIAGNOSTICS: tuple[str, ...] = get_args(Diagnostic)
"""The RL doctor's diagnostics (chatrlhf/eval/doctor.py, docs/report.md)."""


@dataclass
class DoctorConfig:
    """The RL doctor's thresholds (docs/report.md explains each diagnostic and why these defaults)."""

    enabled: bool = True
    """Run the diagnostics each iteration (and log `doctor/*` and the response-text metrics)."""
    window: int = 5
    """Iterations in each compared window: the early (baseline) window is the first `window` iterations, the
    recent window the last `window`. Windowed rules need 2 × window iterations before they can fire."""
    z: float = 3.0
    """One-sided significance threshold of every statistical test (z or t statistic); 3.0 ≈ p 0.0013 per test."""
    trend_window: int = 20
    """Iterations over which `reward_vs_total` fits the two trends (least-squares slopes)."""
    min_window_responses: int = 512
    """`repetition`: each window is widened past `window` iterations until it holds at least this many responses
    (8 iterations of the demo's 64): the test needs them to tell 10% from 20%."""
    repeat_ngrams: list[int] = field(default_factory=lambda: [1, 4])
    """`repetition`: n of the word n-grams tested; a response repeats if one of its n-grams occurs twice. n = 1 suits
    short answers (the demo's word lists); long answers repeat common words, so their signal is in n = 4."""
    repeat_min_rise: float = 0.05
    """`repetition`: the repeating fraction must rise by at least this much (absolute) between the windows."""
    repeat_min_count: int = 10
    """`repetition`: at least this many repeating responses in the recent window."""
    length_max_ratio: float = 1.5
    """`length_drift`: fires when recent mean length ≥ this × the early mean (and the change is significant)."""
    length_min_ratio: float = 0.5
    """`length_drift`: fires when recent mean length ≤ this × the early mean (and the change is significant)."""
    entropy_min_ratio: float = 0.3
    """`entropy_collapse`: fires when recent mean `policy/entropy` ≤ this × the early mean (and significant)."""
    kl_max: float = 10.0
    """`kl_blowup`: bound on the recent window's mean `kl/mean` (nats per response). Long responses accumulate
    more KL: raise it for them."""
    clipfrac_max: float = 0.2
    """`clipfrac_high`: bound on the recent window's mean `policy/clipfrac` (docs/metrics.md: healthy is 0–0.2)."""
    approx_kl_max: float = 0.05
    """`approx_kl_high`: bound on the recent window's mean `policy/approx_kl` per token (5 × the 0.01 target KL of
    OpenAI Spinning Up's PPO)."""
    value_loss_max_ratio: float = 10.0
    """`value_loss_rising`: fires when the recent window's mean `loss/value` ≥ this × the lowest mean of an earlier
    window."""
    mismatch_min: float = 1e-3
    """`logprob_mismatch`: the recent window's mean `rollout/logprob_diff` (nats/token) must be at least this: below
    it the trainer/rollout mismatch is rounding (a float32 vLLM engine agrees with the trainer to about 1e-7 per
    token on the demo, docs/rollout.md)."""
    mismatch_max_ratio: float = 10.0
    """`logprob_mismatch`: fires when the recent window's mean `rollout/logprob_diff` ≥ this × the early window's
    (and the rise is significant): the rollout engine drifts away from the trainer."""
    dominance_max: float = 0.9
    """`reward_dominance`: fires when one reward component's share of the weighted sum's spread
    (`reward/<name>_share`) averages at least this over the recent window: the other components hardly move the
    advantages."""
    clip_frac_max: float = 0.1
    """`reward_at_clip`: fires when the fraction of responses whose score lies outside ±`reward.clip`
    (`reward/clip_frac`) averages at least this over the recent window: the clip flattens the reward there."""
    judge_min_drop: float = 0.02
    """`reward_vs_judge`: the judge must fall by at least this much below its best evaluation (and by z standard
    errors when `eval/judge_sem` is logged)."""
    examples: int = 3
    """Example responses attached to a finding."""
    off: list[str] = field(default_factory=list)
    """Diagnostics not to run (names from DIAGNOSTICS, checked by `validate`)."""
    stop_on: list[str] = field(default_factory=list)
    """Diagnostics that stop the run when they fire (for unattended runs); the others only warn."""

    def validate(self, prefix: str = "doctor") -> None:
        if self.window < 2:
            raise ConfigError(f"{prefix}.window must be >= 2 (a window's spread needs two iterations)")
        if self.trend_window < 3:
            raise ConfigError(f"{prefix}.trend_window must be >= 3 (a slope's error needs three points)")
        if self.z <= 0:
            raise ConfigError(f"{prefix}.z must be > 0")
        if not self.repeat_ngrams or any(n < 1 for n in self.repeat_ngrams):
            raise ConfigError(f"{prefix}.repeat_ngrams must be a non-empty list of n >= 1")
        if not 0.0 < self.length_min_ratio < 1.0 < self.length_max_ratio:
            raise ConfigError(f"{prefix}: need 0 < length_min_ratio < 1 < length_max_ratio")
        if not 0.0 < self.entropy_min_ratio < 1.0:
            raise ConfigError(f"{prefix}.entropy_min_ratio must be in (0, 1)")
        if self.value_loss_max_ratio <= 1.0:
            raise ConfigError(f"{prefix}.value_loss_max_ratio must be > 1")
        for name in ("kl_max", "clipfrac_max", "approx_kl_max", "mismatch_min"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{prefix}.{name} must be > 0")
        if self.mismatch_max_ratio <= 1.0:
            raise ConfigError(f"{prefix}.mismatch_max_ratio must be > 1")
        for name in ("dominance_max", "clip_frac_max"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"{prefix}.{name} must be in (0, 1]")
        if self.repeat_min_rise < 0 or self.judge_min_drop < 0 or self.repeat_min_count < 0:
            raise ConfigError(f"{prefix}: repeat_min_rise, repeat_min_count and judge_min_drop must be >= 0")
        if self.min_window_responses < 1 or self.examples < 0:
            raise ConfigError(f"{prefix}: min_window_responses must be >= 1 and examples >= 0")
        for name in ("off", "stop_on"):
            unknown = [d for d in getattr(self, name) if d not in DIAGNOSTICS]
            if unknown:
                raise ConfigError(f"{prefix}.{name}: unknown diagnostics {unknown} (known: {', '.join(DIAGNOSTICS)})")
        both = sorted(set(self.off) & set(self.stop_on))
        if both:
            raise ConfigError(f"{prefix}: {both} are in both off and stop_on; a diagnostic that is off never fires")


@dataclass
class EpisodeConfig:
    """Bounds of a multi-turn episode (with `env`; docs/episodes.md). A policy turn is at most
    `generation.max_new_tokens` tokens."""

    max_turns: int = 4
    """Most policy turns in an episode, tool-calling turns included."""
    max_tool_calls: int = 4
    """Most tool calls in an episode; later calls are answered with an error message."""
    tool_timeout_s: float = 5.0
    """A tool call running longer is answered with a timeout error."""
    max_tokens: int = 512
    """Most tokens of an episode before a policy turn (the turn may add `generation.max_new_tokens`)."""
    credit: Literal["end", "turn"] = "end"
    """Where the environment's turn rewards go in RL. end: summed into the episode's return at its last policy token,
    with the other sources' scores. turn: each at the last token of the policy turn it rewards (the other sources
    stay at the end), so a turn's tokens are not credited with earlier turns' rewards; for algorithms whose returns
    run over the tokens (ppo, reinforce_pp). docs/episodes.md."""


@dataclass
class RLTrainConfig:
    """How step 3 (RLHF) runs."""

    algo: Algo = "ppo"
    """ppo (actor + critic, GAE); critic-free: grpo (group-normalised rewards), dr_grpo (group-centred, no std),
    rloo (leave-one-out baseline), reinforce_pp (REINFORCE++: KL-shaped returns, batch-normalised), remax (greedy
    response as the baseline), dapo (GRPO's advantages with dynamic sampling; with the clip-higher, token-level loss
    and overlong settings of recipes/demo-dapo.yaml), gspo (sequence-level ratio and clip), cispo (clipped
    stop-gradient importance weights on REINFORCE). docs/algorithms.md §3, §7, §11–13."""
    group_size: int = 1
    """Responses sampled per prompt. The group-baseline algorithms (grpo, dr_grpo, rloo, dapo, gspo, cispo) need
    >= 2; REINFORCE++ uses it with `advantage.group_baseline`; remax takes 1."""
    iterations: int = 100
    """RL iterations: each samples `rollout_batch_size` prompts, generates, scores and updates."""
    rollout_batch_size: int = 16
    """Prompts per iteration (each sampled `group_size` times)."""
    max_prompt_len: int = 256
    """Longest prompt in tokens; a longer prompt is an error naming it (DeepSpeed-Chat drops them silently)."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Rollout sampling."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """The rollout engine: `hf` or `vllm`."""
    doctor: DoctorConfig = field(default_factory=DoctorConfig)
    """The RL doctor: diagnostics of reward hacking and unhealthy updates during the run (docs/report.md)."""
    kl: KLConfig = field(default_factory=KLConfig)
    """The KL penalty against the reference."""
    reward: RewardShapingConfig = field(default_factory=RewardShapingConfig)
    """Reward clip and overlong shaping."""
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    """GAE's γ and λ, whitening, REINFORCE++'s group baseline."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Clip ranges, loss aggregation, entropy bonus, overlong filtering."""
    update: UpdateConfig = field(default_factory=UpdateConfig)
    """Epochs, mini-batches and micro-batches of the update."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Dynamic sampling's bound (dapo)."""
    actor_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=9.65e-6))
    """Actor optimizer (DeepSpeed-Chat's OPT-1.3B step-3 lr)."""
    critic_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-6))
    """Critic optimizer (DeepSpeed-Chat's step-3 critic lr)."""
    ema: bool = False
    """Keep an exponential moving average of the actor and save it as `model_ema/`."""
    ema_decay: float = 0.992
    """EMA decay (DeepSpeed-Chat: 0.992)."""
    ptx_coef: float = 0.0
    """Weight of the PTX (language-modelling) loss added to each actor step, to keep the SFT skills; DeepSpeed-Chat
    uses 27.8 when unsupervised data is given. Needs `ptx_paths`."""
    ptx_paths: list[str] = field(default_factory=list)
    """SFT-format records for the PTX loss (prompt+response or messages; the loss is on response tokens)."""
    ptx_batch_size: int = 8
    """Sequences per PTX micro-batch."""
    eval_every: int = 0
    """Evaluate the policy on the held-out prompts every this many iterations (`eval/score_mean`, and with a
    `judge` `eval/judge_mean`; responses in `samples.jsonl`); 0 = only at the end."""
    eval_prompts: int = 64
    """Held-out prompts each evaluation answers (the first of the held-out share)."""
    episode: EpisodeConfig = field(default_factory=EpisodeConfig)
    """Bounds of the multi-turn episodes played with `env` (unused without it)."""


@dataclass
class StageOptions:
    """Options every stage shares: engine, LoRA, checkpoints, resume, and the run settings."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    """Single process or DeepSpeed ZeRO; memory savers."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters on the trained model(s)."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Resumable checkpoints."""
    resume: str = "no"
    """`no`; `auto` = continue from the newest complete checkpoint in the run directory (start fresh if there is
    none); or a checkpoint directory."""
    run: RunConfig = field(default_factory=RunConfig)
    """Device, seed, logging."""

    def validate_options(self) -> None:
        _validate_options(self)


@dataclass
class SFTConfig(StageOptions):
    """`chatrlhf sft`: fine-tune a causal LM on prompt/response records."""

    model: str = ""
    """Base model: a Hugging Face id, a local HF model directory, or a tiny random preset (`tiny:llama`)."""
    output_dir: str = "runs/sft"
    """Run directory: `model/` (HF model), `metrics.jsonl`, `config.yaml`, `summary.json`."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training records: {prompt, response}, {messages} or {prompt, chosen, rejected} (uses chosen)."""
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    """Training loop."""

    def validate(self, need_data: bool = True) -> None:
        _validate_supervised(self, need_data)


@dataclass
class RewardConfig(StageOptions):
    """`chatrlhf reward`: train a reward model (causal-LM backbone + scalar head) on preference pairs."""

    model: str = ""
    """Backbone: usually the SFT output (InstructGPT), or any causal LM (DeepSpeed-Chat uses a smaller one)."""
    output_dir: str = "runs/reward"
    """Run directory: `model/` (HF sequence-classification model, 1 label), metrics, config, summary."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training pairs: {prompt, chosen, rejected}."""
    train: RewardTrainConfig = field(default_factory=RewardTrainConfig)
    """Training loop."""

    def validate(self, need_data: bool = True) -> None:
        _validate_supervised(self, need_data)


@dataclass
class RLConfig(StageOptions):
    """`chatrlhf rl`: RLHF — PPO (actor, critic, frozen reference, reward) or a critic-free algorithm."""

    actor: str = ""
    """The policy to train: the SFT output directory (or any causal LM)."""
    reward_model: str = ""
    """Reward model: a `chatrlhf reward` output, or any 1-label sequence-classification model (one with another
    tokenizer scores re-tokenized text; not on episodes, where it scores the episode's tokens as played). Empty =
    rewards from `reward_functions` only."""
    reward_functions: list[str] = field(default_factory=list)
    """Python rewards `module:function(prompt, response, **fields) -> float` (fields = the record's extra fields)."""
    reward_weights: list[float] | None = None
    """Weights of [reward model, environment (with `env`), *reward_functions] in the summed reward; None = 1
    each."""
    critic: str | None = None
    """PPO's critic initialisation; None = the reward model (as DeepSpeed-Chat does). Critic-free algorithms have
    none."""
    critic_fresh_head: bool = False
    """Initialise the critic's value head randomly when the critic model has none (e.g. `critic` is a causal LM); it
    then learns values from scratch. False refuses a critic without a trained head."""
    reference: str | None = None
    """Frozen reference policy for the KL penalty; None = the actor's starting weights."""
    env: str = ""
    """An environment `module:Class` (docs/episodes.md): each rollout is then a batch of multi-turn episodes, the
    policy's turns alternating with the environment's messages and tool results, and the loss covers the policy's
    tokens only. Its turn rewards, summed, are a reward source (`reward/env_mean`, first in `reward_weights` after
    the reward model); `reward_functions` then see the whole conversation. Empty = single-turn responses."""
    judge: str | None = None
    """A held-out judge `module:function(prompt, response, **fields) -> float` that RL does not optimise: it scores
    the held-out evaluations (`train.eval_every`), where the RL doctor watches it. None = no judge."""
    output_dir: str = "runs/rl"
    """Run directory: `model/` (the trained actor), `critic/`, metrics, config, summary."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompts: any record with `prompt` (or `messages`); other fields are kept."""
    train: RLTrainConfig = field(default_factory=RLTrainConfig)
    """RL loop and PPO hyper-parameters."""

    def validate(self, need_data: bool = True) -> None:
        _validate_types(self)
        _require(self.actor, "actor", "the SFT model directory")
        if not self.reward_model and not self.reward_functions and not self.env:
            raise ConfigError("no reward: set reward_model and/or reward_functions (or env)")
        n_sources = int(bool(self.reward_model)) + int(bool(self.env)) + len(self.reward_functions)
        if self.reward_weights is not None and len(self.reward_weights) != n_sources:
            raise ConfigError(
                f"reward_weights has {len(self.reward_weights)} values for {n_sources} reward sources "
                "(reward_model, if set, the environment, if env is set, then each of reward_functions)"
            )
        if self.env:
            self._validate_episodes()
        algo, has_critic = self.train.algo, ALGORITHM_RULES[self.train.algo].critic
        if has_critic and not (self.critic or self.reward_model):
            raise ConfigError(f"train.algo={algo} needs a critic: set critic (or reward_model, which initialises it)")
        if not has_critic and self.critic:
            raise ConfigError(f"critic is set but train.algo={algo} has no critic; unset critic")
        if not has_critic and self.critic_fresh_head:
            raise ConfigError(
                f"critic_fresh_head is set but train.algo={self.train.algo} has no critic; unset critic_fresh_head"
            )
        if need_data:
            _require(self.data.paths, "data.paths", "at least one prompt source")
        _validate_data(self.data)
        _validate_rl(self.train)

    def _validate_episodes(self) -> None:
        """What `env` (RL on multi-turn episodes) cannot do, each refused by name (every algorithm trains on
        episodes)."""
        t = self.train
        refused = [
            (t.episode.credit == "turn" and not ALGORITHM_RULES[t.algo].token_rewards, "train.episode.credit=turn",
             f"train.algo={t.algo} reduces an episode's rewards to their sum, so where they are placed does not "
             "matter; per-turn credit needs returns over the tokens (ppo, reinforce_pp)"),
        ]  # fmt: skip
        named = [(name, why) for bad, name, why in refused if bad]
        if named:
            raise ConfigError(
                f"env (RL on multi-turn episodes) does not support {', '.join(n for n, _ in named)}: "
                f"{'; '.join(w for _, w in named)} (docs/episodes.md)"
            )
        engine = self.engine
        if engine.kind == "deepspeed" and engine.zero_stage == 3 and not engine.gather_for_generation:
            raise ConfigError(
                "env (RL on multi-turn episodes) with engine.zero_stage=3 and engine.gather_for_generation=False: "
                "generating on the sharded model needs every rank to take the same generation steps, and the ranks' "
                "episodes take different numbers of turns; use engine.gather_for_generation=True (the default)"
            )
        _validate_episode_bounds(t.episode, "train.episode")


@dataclass
class DPOTrainConfig:
    """How DPO trains: an offline alternative to steps 2+3, with no reward model and no sampling."""

    epochs: int = 1
    """Passes over the training pairs."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run all epochs)."""
    batch_size: int = 4
    """Pairs per micro-batch (each pair is two sequences, scored by the policy and by the reference)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_seq_len: int = 512
    """Longest prompt+response in tokens; a longer record is an error naming it."""
    beta: float = 0.1
    """β: how strongly the policy is held to the reference (the implicit KL constraint); larger stays closer.
    The DPO paper's and TRL's default 0.1. With loss_type ipo it is IPO's τ."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """`sigmoid`: DPO, −log σ(β·h); `ipo`: IPO, (h − 1/(2β))². h is the log-ratio margin (docs/algorithms.md)."""
    label_smoothing: float = 0.0
    """ε of conservative DPO: the assumed rate of flipped preference labels, in [0, 0.5); sigmoid only."""
    eval_every: int = 0
    """Evaluate the held-out pairs every this many steps (0 = only at the end)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6))
    """Optimizer. The DPO paper trains with lr 1e-6 (RMSprop, batch 64, 150 warm-up steps) and TRL's default is
    1e-6; 5e-7 is common for 7B models. Small models trained from scratch want far more (recipes/demo-dpo.yaml)."""

    def validate(self, prefix: str = "train") -> None:
        _validate_loop(self, prefix)
        _validate_optim(self.optim, f"{prefix}.optim")
        if self.loss_type not in ("sigmoid", "ipo"):
            raise ConfigError(f"{prefix}.loss_type must be sigmoid or ipo, got {self.loss_type!r}")
        if self.beta <= 0:
            raise ConfigError(f"{prefix}.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"{prefix}.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing > 0 and self.loss_type != "sigmoid":
            raise ConfigError(
                f"{prefix}.label_smoothing is {self.label_smoothing} but {prefix}.loss_type is {self.loss_type}: "
                "label smoothing (conservative DPO) applies to the sigmoid loss only"
            )


@dataclass
class DPOConfig(StageOptions):
    """`chatrlhf dpo`: direct preference optimisation of a causal LM on preference pairs (no reward model)."""

    model: str = ""
    """The policy to train: usually the SFT output directory (or any causal LM)."""
    reference: str | None = None
    """Frozen reference policy π_ref; None = the model's starting weights (the DPO paper's π_SFT). It must use the
    model's tokenizer."""
    output_dir: str = "runs/dpo"
    """Run directory: `model/` (the trained policy, a HF causal LM), metrics.jsonl, config.yaml, summary.json."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training pairs: {prompt, chosen, rejected}."""
    train: DPOTrainConfig = field(default_factory=DPOTrainConfig)
    """Training loop and the DPO loss."""

    def validate(self, need_data: bool = True) -> None:
        _validate_types(self)
        _require(self.model, "model", "the SFT model directory, or any causal LM")
        if need_data:
            _require(self.data.paths, "data.paths", "at least one pair source")
        _validate_data(self.data)
        self.train.validate("train")


@dataclass
class PipelineDataConfig:
    """Data for the three-step pipeline: one pool split across the stages, or a dataset per stage."""

    paths: list[str] = field(default_factory=list)
    """Pair sources (any source and format that `data.paths` of a stage takes, e.g. {prompt, chosen, rejected}
    files or `hf:Anthropic/hh-rlhf`) blended and then split across SFT / reward / RL by `split`."""
    format: str = "auto"
    """Dataset format of every source (the pool's and each stage's): `auto` detects each source's from its columns,
    or a format name (docs/data.md)."""
    weights: list[float] | None = None
    """Blend weights, one per path; None = concatenate."""
    split: str = "2,4,4"
    """Shares of the pool for SFT, reward model and RL (DeepSpeed-Chat's `data_split`)."""
    sft_paths: list[str] = field(default_factory=list)
    """If set, SFT trains on these sources instead of its share of the pool."""
    reward_paths: list[str] = field(default_factory=list)
    """If set, the reward model trains on these instead of its share of the pool."""
    rl_paths: list[str] = field(default_factory=list)
    """If set, RL draws prompts from these instead of its share of the pool."""
    eval_fraction: float = 0.05
    """Fraction of each stage's records held out for its evaluation."""
    skip_invalid: bool = False
    """Skip invalid records (counted and printed) instead of stopping."""
    num_proc: int = 1
    """Processes that validate and tokenize the records (`datasets.map`'s `num_proc`); 1 = this process."""
    cache_dir: str | None = None
    """Where prepared data is cached; None = `chatrlhf/` in the `datasets` cache (`HF_DATASETS_CACHE`)."""


@dataclass
class EvalConfig:
    """The final comparison of the SFT and the RLHF (or DPO) policies on held-out prompts."""

    prompts: list[str] = field(default_factory=list)
    """Held-out prompt sources; empty = the RL stage's held-out prompts (the DPO stage's held-out pairs' prompts
    with method dpo)."""
    num_prompts: int = 256
    """Prompts to evaluate (the first N of the source)."""
    samples_per_prompt: int = 4
    """Sampled responses per prompt and model; per-prompt means are compared pairwise."""
    judge: str | None = None
    """Optional programmatic judge `module:function(prompt, response, **fields) -> float` (never seen by RL)."""
    batch_size: int = 64
    """Sequences (prompt × sample) per generation batch."""


@dataclass
class PipelineConfig(StageOptions):
    """`chatrlhf pipeline`: SFT → reward model → RLHF (or SFT → DPO) → evaluation, in one run directory."""

    model: str = ""
    """Actor base model: a Hugging Face id, a local HF model directory, or a tiny random preset."""
    reward_base: str | None = None
    """Reward-model backbone; None = the SFT output (InstructGPT). DeepSpeed-Chat uses a separate smaller LM."""
    train_reward_model: bool = True
    """Step 2. False skips it: RL is then rewarded by `reward_functions` alone (e.g. a verifiable reward)."""
    reward_functions: list[str] = field(default_factory=list)
    """Python rewards `module:function(prompt, response, **fields) -> float` for RL, alone or with the reward model."""
    reward_weights: list[float] | None = None
    """Weights of [reward model (if trained), environment (with env), *reward_functions] in RL's summed reward;
    None = 1 each."""
    env: str = ""
    """An environment `module:Class`: RL plays multi-turn episodes (docs/episodes.md), rewarded by their return (and
    `reward_functions`, and the reward model, if trained, which scores each episode as played), and the final
    comparison plays episodes too."""
    run_dir: str = "runs/pipeline"
    """Everything goes here: `sft/`, `reward/`, `rl/` (or `dpo/`), `summary.json`, `config.yaml`."""
    method: Literal["rlhf", "dpo"] = "rlhf"
    """rlhf: SFT → reward model → RL; dpo: SFT → DPO on the pairs of the reward and RL shares (steps 2+3
    replaced; `data.reward_paths`, when set, instead of both shares)."""
    data: PipelineDataConfig = field(default_factory=PipelineDataConfig)
    """Data pool and per-stage split."""
    sft: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    """Step 1 training."""
    reward: RewardTrainConfig = field(default_factory=RewardTrainConfig)
    """Step 2 training."""
    rl: RLTrainConfig = field(default_factory=RLTrainConfig)
    """Step 3 training. With method dpo only `max_prompt_len` and `generation` are used: by the final comparison."""
    dpo: DPOTrainConfig = field(default_factory=DPOTrainConfig)
    """DPO training, in place of steps 2+3 (method dpo)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Final evaluation."""

    def validate(self) -> None:
        _validate_types(self)
        _validate_options(self)
        _require(self.model, "model", "a model id, directory or tiny:ARCH preset")
        d = self.data
        parse_split(d.split)
        _validate_format(d.format)
        if self.method not in ("rlhf", "dpo"):
            raise ConfigError(f"method must be rlhf or dpo, got {self.method!r}")
        if self.method == "dpo":
            self._validate_dpo()
        elif not d.paths and not (d.sft_paths and (d.reward_paths or not self.train_reward_model) and d.rl_paths):
            raise ConfigError(
                "data.paths is empty and not every stage has its own data (data.sft_paths, data.reward_paths, "
                "data.rl_paths): give a pool to split, or per-stage sources"
            )
        if d.weights is not None and len(d.weights) != len(d.paths):
            raise ConfigError(
                f"data.weights has {len(d.weights)} values but data.paths has {len(d.paths)} source(s); "
                "give one weight per path"
            )
        _check_fraction(d.eval_fraction, "data.eval_fraction")
        _check_num_proc(d.num_proc)
        _validate_loop(self.sft, "sft")
        _validate_optim(self.sft.optim, "sft.optim")
        _validate_loop(self.reward, "reward")
        _validate_optim(self.reward.optim, "reward.optim")
        _validate_rl(self.rl, "rl")
        if self.method == "rlhf":
            self._validate_rl_rewards()
        if self.eval.num_prompts < 1 or self.eval.samples_per_prompt < 1:
            raise ConfigError("eval.num_prompts and eval.samples_per_prompt must be >= 1")

    def _validate_dpo(self) -> None:
        d = self.data
        if not d.paths and not (d.sft_paths and d.reward_paths):
            raise ConfigError(
                "data.paths is empty and not both DPO-pipeline stages have their own data (data.sft_paths, "
                "data.reward_paths): give a pool to split, or both per-stage sources"
            )
        if d.rl_paths:
            raise ConfigError(
                "data.rl_paths is set but method is dpo: DPO trains on pairs (data.reward_paths, or the pool's "
                "reward and RL shares), not on RL prompts; unset data.rl_paths or use method rlhf"
            )
        if self.reward_base:
            raise ConfigError("reward_base is set but method is dpo, which trains no reward model; unset one of them")
        self.dpo.validate("dpo")

    def _validate_rl_rewards(self) -> None:
        if not self.train_reward_model and not self.reward_functions and not self.env:
            raise ConfigError("train_reward_model is false and reward_functions is empty: RL would have no reward")
        n_sources = int(self.train_reward_model) + bool(self.env) + len(self.reward_functions)
        if self.reward_weights is not None and len(self.reward_weights) != n_sources:
            raise ConfigError(f"reward_weights has {len(self.reward_weights)} values for {n_sources} reward sources")
        if ALGORITHM_RULES[self.rl.algo].critic and not self.train_reward_model:
            raise ConfigError(
                f"rl.algo={self.rl.algo} initialises its critic from the reward model: keep train_reward_model"
            )


# ----------------------------------------------------------------------------------------------------------------
# commands that only run models: chat, serve, eval


@dataclass
class RunOptions:
    """Device, dtype, threads and seed of a command that only runs models (`chat`, `serve`, `eval`)."""

    seed: int = 1234
    """Seed of python's, numpy's and torch's RNGs at start; a request or sample without its own seed draws one from
    torch's."""
    device: str = "auto"
    """Torch device: `auto` (cuda if available, else cpu), `cpu`, `cuda`, `cuda:1`, `mps`, ..."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the models are loaded in (float16 is refused on the CPU, where sampling in it fails)."""
    threads: int = 0
    """torch intra-op threads on CPU; 0 keeps torch's default (one per core). Backend hf only: vLLM's CPU build
    sets its own (VLLM_CPU_OMP_THREADS_BIND, or OMP_NUM_THREADS)."""


@dataclass
class BackendOptions:
    """Which engine generates, for the commands that only run models."""

    backend: Literal["hf", "vllm"] = "hf"
    """`hf`: transformers' `generate` on the model loaded in this process; `vllm`: a vLLM engine on the model
    directory (`pip install 'chatrlhf[vllm]'`; docs/serve.md)."""
    cpu_kv_cache_gib: float = 1.0
    """vLLM on the CPU: GiB of memory for its KV cache."""
    gpu_memory_utilization: float = 0.9
    """vLLM on a GPU: the share of the GPU's memory its weights and KV cache may take."""
    run: RunOptions = field(default_factory=RunOptions)
    """Device, dtype, threads, seed."""


@dataclass
class ChatConfig(BackendOptions):
    """`chatrlhf chat MODEL_DIR`: talk to a model in the terminal, its replies streamed as they are generated."""

    model: str = ""
    """The model directory (the positional MODEL_DIR): a chatrlhf output such as runs/demo/rl/model, or any
    Hugging Face causal-LM directory. Its chat template renders the conversation (the training template,
    `Human: ...\n\nAssistant:`, when it has none)."""
    system: str = ""
    """System prompt at the start (`/system TEXT` changes it); empty = none."""
    max_new_tokens: int = 256
    """Longest reply in tokens (`/set max_new_tokens N`)."""
    temperature: float = 1.0
    """Sampling temperature; 0 = greedy (`/set temperature T`)."""
    top_p: float = 1.0
    """Nucleus sampling; 1 = off (`/set top_p P`)."""
    top_k: int = 0
    """Top-k sampling; 0 = off (`/set top_k K`)."""
    max_model_len: int = 0
    """Most tokens of conversation + reply; 0 = the model's context length. A longer conversation is refused
    with a message (`/clear` starts again)."""

    def validate(self) -> None:
        _validate_types(self)
        _require(self.model, "model", "a model directory (chatrlhf chat MODEL_DIR)")
        _validate_backend(self)
        _validate_sampling(self.temperature, self.top_p, self.top_k, self.max_new_tokens, "")
        if self.max_model_len < 0:
            raise ConfigError(f"max_model_len must be >= 0 (0 = the model's own), got {self.max_model_len}")


@dataclass
class ServeConfig(BackendOptions):
    """`chatrlhf serve MODEL_DIR`: an OpenAI-compatible HTTP server for a model directory (docs/serve.md)."""

    model: str = ""
    """The model directory (the positional MODEL_DIR)."""
    served_model_name: str = ""
    """The model's name in the API (`model` of each request, `/v1/models`); empty = MODEL_DIR as given."""
    host: str = "127.0.0.1"
    """Address to listen on. The default answers this machine only; 0.0.0.0 answers every network (set api_key)."""
    port: int = 8000
    """TCP port; 0 = any free port (the one taken is printed)."""
    api_key: str = ""
    """Require `Authorization: Bearer KEY` on /v1/*; empty = the environment variable CHATRLHF_API_KEY if set,
    else no key."""
    max_model_len: int = 0
    """Most tokens of prompt + completion per request; 0 = the model's context length. A request over it gets a
    400 error."""
    max_batch_size: int = 32
    """Most requests (counting each of a request's `n` choices) generated together in one batch."""
    batch_wait_ms: float = 5.0
    """After the first request of a batch arrives, wait this long for others to join it."""
    max_n: int = 16
    """Largest `n` (choices per request) accepted."""

    def validate(self) -> None:
        _validate_types(self)
        _require(self.model, "model", "a model directory (chatrlhf serve MODEL_DIR)")
        _validate_backend(self)
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535 (0 = any free port), got {self.port}")
        if not self.host:
            raise ConfigError("host is empty: give an address to listen on, e.g. 127.0.0.1")
        if self.max_model_len < 0:
            raise ConfigError(f"max_model_len must be >= 0 (0 = the model's own), got {self.max_model_len}")
        if self.max_batch_size < 1 or self.max_n < 1:
            raise ConfigError(f"max_batch_size and max_n must be >= 1, got {self.max_batch_size} and {self.max_n}")
        if self.batch_wait_ms < 0:
            raise ConfigError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms}")


@dataclass
class EvaluateConfig(BackendOptions):
    """`chatrlhf eval`: perplexity, reward-model accuracy, and models side by side (docs/eval.md). Each part runs
    when its inputs are given."""

    models: list[str] = field(default_factory=list)
    """Causal-LM directories to evaluate: each gets a perplexity on `perplexity_data`, and all answer `prompts`
    side by side."""
    names: list[str] = field(default_factory=list)
    """A short name per model, in the tables and files; empty = each directory's name (with its parent's when two
    are alike, e.g. sft/model and rl/model → sft, rl)."""
    prompts: list[str] = field(default_factory=list)
    """Prompt sources for the side-by-side comparison (any RL prompt source, e.g. prompts.jsonl or
    `demo:prompts:64:0`; docs/data.md)."""
    num_prompts: int = 256
    """Prompts compared (the first N of the sources)."""
    samples_per_prompt: int = 4
    """Sampled responses per prompt and model; per-prompt means are compared pairwise."""
    reward_model: str = ""
    """A reward model directory: scores every side-by-side response, and its pairwise accuracy and score
    distributions are measured on `pairs`."""
    judges: list[str] = field(default_factory=list)
    """Judge functions `module:function(prompt, response, **fields) -> float`; each scores every response."""
    verifiers: list[str] = field(default_factory=list)
    """Verifiable reward functions `module:function(prompt, response, **fields) -> float`: a response passes when
    its score is >= `pass_threshold`; pass@k is reported for each k in `pass_at` (and the mean score, as a judge's).
    A function may be both a judge and a verifier."""
    pass_threshold: float = 1.0
    """The score at which a verifier passes a response."""
    pass_at: list[int] = field(default_factory=lambda: [1])
    """The k of pass@k (each <= samples_per_prompt): the unbiased estimator of Chen et al. 2021 from the samples."""
    env: str = ""
    """An environment `module:Class` (docs/episodes.md): each sample is then an episode played from the prompt
    record, scored by its return (`env`) and by the judges and verifiers (on the policy's last turn, with the
    conversation as `messages`)."""
    episode: EpisodeConfig = field(default_factory=EpisodeConfig)
    """Bounds of each episode (with `env`)."""
    perplexity_data: list[str] = field(default_factory=list)
    """SFT-format sources (docs/data.md) for each model's perplexity on their response tokens."""
    pairs: list[str] = field(default_factory=list)
    """Preference-pair sources for the reward model's pairwise accuracy and chosen/rejected score distributions."""
    format: str = "auto"
    """Dataset format of every source: `auto` detects each source's from its columns, or a format name."""
    max_prompt_len: int = 256
    """Longest prompt in tokens; a longer one is an error naming it."""
    max_seq_len: int = 512
    """Longest SFT record or pair (prompt + response) in tokens; a longer one is an error naming it."""
    batch_size: int = 16
    """Sequences per generation or scoring batch."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """How the models sample their side-by-side responses (the rollout settings by default)."""
    output_dir: str = "runs/eval"
    """Where eval.json, eval.html and samples.jsonl are written."""
    overwrite: bool = False
    """Replace the files of an earlier evaluation in output_dir."""

    def validate(self) -> None:
        _validate_types(self)
        _validate_backend(self)
        _validate_format(self.format)
        g = self.generation
        if g.temperature <= 0 or not 0.0 < g.top_p <= 1.0 or g.top_k < 0 or g.max_new_tokens < 1:
            raise ConfigError("generation: temperature must be > 0, top_p in (0, 1], top_k >= 0, max_new_tokens >= 1")
        side_by_side = bool(self.models and self.prompts)
        if not (side_by_side or (self.models and self.perplexity_data) or (self.reward_model and self.pairs)):
            raise ConfigError(
                "nothing to evaluate: give models and prompts (side by side), models and perplexity_data "
                "(perplexity), or reward_model and pairs (reward-model accuracy)"
            )
        if self.names and len(self.names) != len(self.models):
            raise ConfigError(f"names has {len(self.names)} values for {len(self.models)} models; give one per model")
        if len(set(self.names)) != len(self.names):
            raise ConfigError(f"names must differ from each other, got {self.names}")
        for name in ("judges", "verifiers"):
            given = getattr(self, name)
            twice = sorted({f for f in given if given.count(f) > 1})
            if twice:
                raise ConfigError(f"{name} names {', '.join(twice)} more than once")
        if (self.judges or self.verifiers) and not side_by_side:
            raise ConfigError("judges and verifiers score side-by-side responses: give models and prompts too")
        if self.pairs and not self.reward_model:
            raise ConfigError("pairs is set but reward_model is empty: pairs measure a reward model's accuracy")
        for name in ("num_prompts", "samples_per_prompt", "max_prompt_len", "max_seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        bad = [k for k in self.pass_at if not 1 <= k <= self.samples_per_prompt]
        if bad:
            raise ConfigError(
                f"pass_at {bad}: each k must be in 1..samples_per_prompt ({self.samples_per_prompt}); pass@k needs at "
                "least k samples per prompt"
            )
        if self.env:
            if not side_by_side:
                raise ConfigError("env plays side-by-side episodes: give models and prompts too")
            _validate_episode_bounds(self.episode, "episode")


# ----------------------------------------------------------------------------------------------------------------
# validation helpers


def _validate_episode_bounds(e: EpisodeConfig, prefix: str) -> None:
    if e.max_turns < 1 or e.max_tool_calls < 0 or e.tool_timeout_s <= 0 or e.max_tokens < 1:
        raise ConfigError(f"{prefix}: max_turns and max_tokens must be >= 1, max_tool_calls >= 0, tool_timeout_s > 0")


def _validate_options(o: StageOptions) -> None:
    e = o.engine
    if not 0 <= e.zero_stage <= 3:
        raise ConfigError(f"engine.zero_stage must be 0, 1, 2 or 3, got {e.zero_stage}")
    if e.kind == "single" and (e.offload_optimizer or e.offload_params or e.deepspeed_config):
        named = [f"engine.{k}" for k in ("offload_optimizer", "offload_params", "deepspeed_config") if getattr(e, k)]
        verb = "needs" if len(named) == 1 else "need"
        raise ConfigError(f"{' and '.join(named)} {verb} engine.kind=deepspeed, but engine.kind is single")
    if e.offload_params and e.zero_stage != 3:
        raise ConfigError(f"engine.offload_params needs engine.zero_stage=3, got {e.zero_stage}")
    if e.offload_optimizer and e.zero_stage == 0:
        raise ConfigError("engine.offload_optimizer needs engine.zero_stage >= 1 (stage 0 has no optimizer sharding)")
    if o.lora.rank < 0:
        raise ConfigError(f"lora.rank must be >= 0 (0 = no LoRA), got {o.lora.rank}")
    if o.lora.alpha <= 0:
        raise ConfigError(f"lora.alpha must be > 0, got {o.lora.alpha}")
    if not 0.0 <= o.lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {o.lora.dropout}")
    if o.checkpoint.every < 0 or o.checkpoint.keep < 1:
        raise ConfigError("checkpoint.every must be >= 0 and checkpoint.keep >= 1")
    unknown = [t for t in o.run.report_to if t not in TRACKERS]
    if unknown or len(set(o.run.report_to)) != len(o.run.report_to):
        raise ConfigError(f"run.report_to: {o.run.report_to} — give each of {', '.join(TRACKERS)} at most once")
    if o.run.max_bad_steps < 0:
        raise ConfigError(f"run.max_bad_steps must be >= 0, got {o.run.max_bad_steps}")
    if e.kind == "deepspeed" and o.run.max_bad_steps > 0:
        raise ConfigError(
            "run.max_bad_steps > 0 needs engine.kind=single: DeepSpeed cannot discard gradients already reduced "
            "into ZeRO partitions, so a bad step stops a DeepSpeed run"
        )
    train = getattr(o, "train", None) or getattr(o, "rl", None)
    if e.kind == "deepspeed" and e.zero_stage == 3 and getattr(train, "ema", False):
        raise ConfigError("ema with engine.zero_stage=3 is not supported (the EMA copy would need the whole actor)")
    rollout = getattr(train, "rollout", None)
    if rollout is not None and rollout.backend == "vllm" and e.zero_stage == 3 and not e.gather_for_generation:
        raise ConfigError(
            "train.rollout.backend=vllm with engine.gather_for_generation=False: vLLM needs the whole weights, which "
            "ZeRO-3 gathers once per rollout only with engine.gather_for_generation=True"
        )
    if e.kind == "deepspeed" and e.zero_stage == 3 and o.lora.rank > 0:
        raise ConfigError("lora.rank > 0 with engine.zero_stage=3 is not supported; use ZeRO stage 0-2 with LoRA")


def _validate_backend(o: BackendOptions) -> None:
    if o.backend not in ("hf", "vllm"):
        raise ConfigError(f"backend must be hf or vllm, got {o.backend!r}")
    if o.cpu_kv_cache_gib <= 0:
        raise ConfigError(f"cpu_kv_cache_gib must be > 0, got {o.cpu_kv_cache_gib}")
    if not 0.0 < o.gpu_memory_utilization <= 1.0:
        raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {o.gpu_memory_utilization}")
    if o.run.threads < 0:
        raise ConfigError(f"run.threads must be >= 0 (0 = torch's default), got {o.run.threads}")
    if o.backend == "vllm" and o.run.threads:
        # vLLM's CPU build sizes its attention for the threads it sets itself at start; another count set around
        # it makes its kernels fail (thread_num mismatch)
        raise ConfigError(
            f"run.threads={o.run.threads} applies to backend hf; vLLM's CPU build sets its own threads "
            "(VLLM_CPU_OMP_THREADS_BIND, or OMP_NUM_THREADS): leave run.threads at 0 with backend vllm"
        )


def _validate_sampling(temperature: float, top_p: float, top_k: int, max_new_tokens: int, prefix: str) -> None:
    if temperature < 0:
        raise ConfigError(f"{prefix}temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"{prefix}top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ConfigError(f"{prefix}top_k must be >= 0 (0 = off), got {top_k}")
    if max_new_tokens < 1:
        raise ConfigError(f"{prefix}max_new_tokens must be >= 1, got {max_new_tokens}")


def _validate_types(cfg: Any, prefix: str = "") -> None:
    """Every field of the (nested) config `cfg` holds a value of its declared type. Flags are typed by the CLI
    parser, but a recipe's values are whatever YAML made of them (`lr: 1e-5` is a string in YAML 1.1), and a
    wrong type would otherwise surface as a TypeError deep inside a run."""
    import typing

    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, hint, name = getattr(cfg, f.name), hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, hint):
                raise ConfigError(f"{name}: expected a mapping of {name}.* fields, found {_yaml_value(value)}")
            _validate_types(value, f"{name}.")
        elif not _has_type(value, hint):
            advice = ""
            if isinstance(value, str) and "e" in value.lower() and _has_type(1.0, hint) and _parses_as_float(value):
                advice = " (YAML reads an exponent without a decimal point as a string: write 1.0e-5, not 1e-5)"
            raise ConfigError(f"{name}: expected {_type_words(hint)}, found {_yaml_value(value)}{advice}")


_TYPE_WORDS = {
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    bool: ("true or false", "booleans"),
    str: ("a string", "strings"),
}
"""How messages name a scalar annotation: (singular, plural)."""


def _has_type(value: Any, hint: Any) -> bool:
    """Whether `value` fits the annotation `hint` (ints fit floats; bools fit neither)."""
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        items = args if origin is tuple else (args[0],) * len(value)
        return len(items) == len(value) and all(_has_type(v, a) for v, a in zip(value, items))
    if hint in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if hint is float else hint)


def _type_words(hint: Any) -> str:
    """The annotation `hint` in words, for "expected ..." in messages."""
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        words = [_type_words(a) for a in args if a is not type(None)]
        return " or ".join(words) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"a list of {_TYPE_WORDS[args[0]][1]}"
    if origin is tuple:
        return f"a list of {len(args)} {_TYPE_WORDS[args[0]][1]}"
    return _TYPE_WORDS.get(hint, (getattr(hint, "__name__", str(hint)),))[0]


def _yaml_value(value: Any) -> str:
    """A value with its YAML type name, e.g. "string 'fast'", for "found ..." in messages."""
    names = {str: "string", int: "integer", float: "number", bool: "boolean", list: "list", dict: "mapping"}
    if value is None:
        return "null"
    preview = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    return f"{names.get(type(value), type(value).__name__)} {preview}"


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _require(value: Any, name: str, what: str) -> None:
    if not value:
        raise ConfigError(f"{name} is required: give {what} (--{name} or in the recipe)")


def _validate_supervised(cfg: SFTConfig | RewardConfig, need_data: bool) -> None:
    _validate_types(cfg)
    _require(cfg.model, "model", "a model id, directory or tiny:ARCH preset")
    if need_data:
        _require(cfg.data.paths, "data.paths", "at least one data source")
    _validate_data(cfg.data)
    _validate_loop(cfg.train, "train")
    _validate_optim(cfg.train.optim, "train.optim")


def _check_fraction(value: float, name: str) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} must be in [0, 1), got {value}")


def _validate_format(value: str) -> None:
    if value not in FORMAT_CHOICES:
        raise ConfigError(f"data.format must be one of {', '.join(FORMAT_CHOICES)}, got {value!r}")


def _validate_data(d: DataConfig) -> None:
    _validate_format(d.format)
    if d.weights is not None and len(d.weights) != len(d.paths):
        raise ConfigError(
            f"data.weights has {len(d.weights)} values but data.paths has {len(d.paths)} source(s); "
            "give one weight per path"
        )
    _check_fraction(d.eval_fraction, "data.eval_fraction")
    _check_num_proc(d.num_proc)


def _check_num_proc(value: int) -> None:
    if value < 1:
        raise ConfigError(f"data.num_proc must be >= 1, got {value}")


def _validate_loop(t: SFTTrainConfig | RewardTrainConfig, prefix: str) -> None:
    for name in ("epochs", "batch_size", "grad_accum", "max_seq_len"):
        if getattr(t, name) < 1:
            raise ConfigError(f"{prefix}.{name} must be >= 1, got {getattr(t, name)}")
    if t.max_steps < 0 or t.eval_every < 0:
        raise ConfigError(f"{prefix}.max_steps and {prefix}.eval_every must be >= 0")


def _validate_optim(o: OptimConfig, prefix: str) -> None:
    if o.lr <= 0:
        raise ConfigError(f"{prefix}.lr must be > 0, got {o.lr}")
    if o.warmup_steps < 0 or o.grad_clip < 0 or o.weight_decay < 0:
        raise ConfigError(f"{prefix}.warmup_steps, {prefix}.grad_clip and {prefix}.weight_decay must be >= 0")
    if not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"{prefix}.betas must be in [0, 1), got {o.betas}")


def _validate_rollout(r: RolloutConfig, prefix: str) -> None:
    if r.backend not in ("hf", "vllm"):
        raise ConfigError(f"{prefix}.backend must be hf or vllm, got {r.backend!r}")
    if not 0.0 < r.gpu_memory_utilization < 1.0:
        raise ConfigError(f"{prefix}.gpu_memory_utilization must be in (0, 1), got {r.gpu_memory_utilization}")
    if r.cpu_kv_cache_gib <= 0:
        raise ConfigError(f"{prefix}.cpu_kv_cache_gib must be > 0, got {r.cpu_kv_cache_gib}")
    if r.sync_tolerance <= 0 or (r.max_logprob_diff is not None and r.max_logprob_diff <= 0):
        raise ConfigError(f"{prefix}.sync_tolerance and {prefix}.max_logprob_diff must be > 0")
    if r.tis_cap is not None and r.tis_cap < 1.0:
        raise ConfigError(f"{prefix}.tis_cap must be >= 1 (it caps an importance weight), got {r.tis_cap}")


def _validate_rl(t: RLTrainConfig, prefix: str = "train") -> None:
    g = t.generation
    if t.iterations < 1 or t.rollout_batch_size < 1:
        raise ConfigError(f"{prefix}.iterations and {prefix}.rollout_batch_size must be >= 1")
    if t.max_prompt_len < 1 or g.max_new_tokens < 1:
        raise ConfigError(f"{prefix}.max_prompt_len and {prefix}.generation.max_new_tokens must be >= 1")
    if g.temperature <= 0 or not 0.0 < g.top_p <= 1.0 or g.top_k < 0:
        raise ConfigError(f"{prefix}.generation: temperature must be > 0, top_p in (0, 1], top_k >= 0")
    _validate_rollout(t.rollout, f"{prefix}.rollout")
    if t.update.old_logprobs == "sampler":
        option = f"{prefix}.update.old_logprobs sampler"
        if t.rollout.backend != "hf":
            raise ConfigError(
                f"{option} needs {prefix}.rollout.backend hf, got {t.rollout.backend}: vLLM's log-probs come from "
                "other kernels than the trainer's; keep the trainer's forward (auto) and correct for the difference "
                f"with {prefix}.rollout.tis_cap"
            )
        for name, value in (("tis_cap", t.rollout.tis_cap), ("max_logprob_diff", t.rollout.max_logprob_diff)):
            if value is not None:
                raise ConfigError(
                    f"{option} takes π_old from the sampler, so there is no trainer forward to compare it with: "
                    f"{prefix}.rollout.{name} would compare the sampler's log-probs with themselves; unset one"
                )
    t.doctor.validate(f"{prefix}.doctor")
    if t.eval_every < 0 or t.eval_prompts < 1:
        raise ConfigError(f"{prefix}.eval_every must be >= 0 and {prefix}.eval_prompts >= 1")
    if t.ptx_coef > 0 and not t.ptx_paths:
        raise ConfigError(f"{prefix}.ptx_coef is {t.ptx_coef} but {prefix}.ptx_paths is empty: the PTX loss needs data")
    if t.ptx_paths and t.ptx_coef <= 0:
        raise ConfigError(f"{prefix}.ptx_paths is set but {prefix}.ptx_coef is {t.ptx_coef}: set a coefficient > 0")
    if not 0.0 < t.ema_decay < 1.0:
        raise ConfigError(f"{prefix}.ema_decay must be in (0, 1), got {t.ema_decay}")
    for name in ("actor_optim", "critic_optim"):
        _validate_optim(getattr(t, name), f"{prefix}.{name}")
    _validate_update(t, prefix)
    _validate_kl(t.kl, f"{prefix}.kl")
    _validate_shaping(t, prefix)
    _validate_algorithm(t, prefix)


def _validate_update(t: RLTrainConfig, prefix: str) -> None:
    u, loss = t.update, t.loss
    samples = t.rollout_batch_size * t.group_size
    mini = u.mini_batch_size or samples
    micro = u.micro_batch_size or mini
    if samples % mini:
        raise ConfigError(
            f"{prefix}.update.mini_batch_size ({mini}) must divide the {samples} sequences of an iteration "
            f"({prefix}.rollout_batch_size × {prefix}.group_size)"
        )
    if mini % micro:
        raise ConfigError(
            f"{prefix}.update.micro_batch_size ({micro}) must divide {prefix}.update.mini_batch_size ({mini})"
        )
    if u.epochs < 1:
        raise ConfigError(f"{prefix}.update.epochs must be >= 1")
    if not 0.0 < loss.clip_low <= 1.0 or loss.high <= 0 or loss.value_clip <= 0:
        raise ConfigError(
            f"{prefix}.loss: clip_low must be in (0, 1] (the ratio's lower bound 1 − clip_low is >= 0), clip_high "
            "and value_clip > 0"
        )
    if loss.entropy_coef < 0:
        raise ConfigError(f"{prefix}.loss.entropy_coef must be >= 0 (it is a bonus), got {loss.entropy_coef}")


def _validate_kl(kl: KLConfig, prefix: str) -> None:
    if kl.coef < 0:
        raise ConfigError(f"{prefix}.coef must be >= 0")
    if kl.target is not None and (kl.target <= 0 or kl.horizon <= 0):
        raise ConfigError(f"{prefix}.target and {prefix}.horizon must be > 0")
    if kl.placement == "loss" and kl.estimator == "k1" and kl.coef > 0:
        # ∇_θ β·(log π_θ − log π_ref) = β·∇ log π_θ: the reference drops out, and over samples of π it is 0 in
        # expectation (Σ_a π·∇log π = ∇Σ_a π = 0), so the penalty would not hold the policy to the reference
        raise ConfigError(
            f"{prefix}.placement=loss with {prefix}.estimator=k1: the gradient of k1 = log π − log π_ref does not "
            "depend on the reference and is zero in expectation, so the penalty would do nothing. Use "
            f"{prefix}.estimator k3 (or k2) with placement loss, or placement reward with k1 (docs/algorithms.md §8)"
        )


def _validate_shaping(t: RLTrainConfig, prefix: str) -> None:
    r, adv = t.reward, t.advantage
    if r.clip <= 0:
        raise ConfigError(f"{prefix}.reward.clip must be > 0")
    if not 0 <= r.overlong_buffer <= t.generation.max_new_tokens:
        raise ConfigError(
            f"{prefix}.reward.overlong_buffer ({r.overlong_buffer}) must be in [0, "
            f"{prefix}.generation.max_new_tokens = {t.generation.max_new_tokens}]"
        )
    if r.overlong_penalty < 0:
        raise ConfigError(f"{prefix}.reward.overlong_penalty must be >= 0 (it is subtracted)")
    if not (0.0 <= adv.gamma <= 1.0 and 0.0 <= adv.lam <= 1.0):
        raise ConfigError(f"{prefix}.advantage.gamma and {prefix}.advantage.lam must be in [0, 1]")
    if t.sampling.max_rounds < 1:
        raise ConfigError(f"{prefix}.sampling.max_rounds must be >= 1")


def _validate_algorithm(t: RLTrainConfig, prefix: str) -> None:
    """The rules of `t.algo` (ALGORITHM_RULES)."""
    rules = ALGORITHM_RULES[t.algo]
    if t.group_size < 1:
        raise ConfigError(f"{prefix}.group_size must be >= 1")
    if t.group_size < rules.min_group:
        raise ConfigError(
            f"{prefix}.algo={t.algo} compares samples of a prompt: set {prefix}.group_size >= {rules.min_group}"
        )
    if rules.max_group is not None and t.group_size > rules.max_group:
        raise ConfigError(
            f"{prefix}.algo={t.algo} uses one sample and one greedy response per prompt: "
            f"{prefix}.group_size={rules.max_group}"
        )
    if t.advantage.group_baseline and (not rules.group_baseline or t.group_size < 2):
        allowed = [name for name, r in ALGORITHM_RULES.items() if r.group_baseline]
        raise ConfigError(
            f"{prefix}.advantage.group_baseline needs {prefix}.algo in {allowed} and {prefix}.group_size >= 2"
        )
    if t.advantage.whiten and not rules.whiten:
        raise ConfigError(
            f"{prefix}.advantage.whiten applies to {', '.join(n for n, r in ALGORITHM_RULES.items() if r.whiten)} "
            f"only ({t.algo} has its own normalisation)"
        )


# ----------------------------------------------------------------------------------------------------------------
# YAML in and out

C = TypeVar("C")

RENAMED: dict[type, dict[str, str]] = {
    RLTrainConfig: {
        "ppo.kl_coef": "kl.coef",
        "ppo.kl_estimator": "kl.estimator",
        "ppo.kl_in": "kl.placement",
        "ppo.kl_target": "kl.target",
        "ppo.kl_horizon": "kl.horizon",
        "ppo.reward_clip": "reward.clip",
        "ppo.clip_eps": "loss.clip_low",
        "ppo.value_clip": "loss.value_clip",
        "ppo.loss_aggregation": "loss.aggregation",
        "ppo.gamma": "advantage.gamma",
        "ppo.lam": "advantage.lam",
        "ppo.whiten_advantages": "advantage.whiten",
        "ppo.ppo_epochs": "update.epochs",
        "ppo.mini_batch_size": "update.mini_batch_size",
        "ppo.micro_batch_size": "update.micro_batch_size",
        "ppo.tis_cap": "rollout.tis_cap",
        "group_baseline": "advantage.group_baseline",
        "grpo_scale_by_std": "algo",
    },
    RunConfig: {"tensorboard": "report_to"},
}
"""Fields of earlier versions → their name now, within the config class that holds them. The settings every RL
algorithm shares were under `ppo.*`; `grpo_scale_by_std: false` is now `algo: dr_grpo`. An old name in a recipe or
on the command line is an error that gives the new one (`renamed_error`)."""

_RENAME_NOTES = {
    "ppo.clip_eps": " (and loss.clip_high, which follows clip_low unless set)",
    "grpo_scale_by_std": " (grpo_scale_by_std false is algo dr_grpo; true is algo grpo)",
    "tensorboard": " (tensorboard true is report_to [tensorboard]; W&B, MLflow and Trackio are there too)",
}


def renamed_error(cls: type, key: str, prefix: str, given: list[str] | None = None) -> ConfigError | None:
    """The error for an old field name `key` (dotted, inside `cls`, whose own path is `prefix`, e.g. `train.` or
    `--train.`), or None when `key` was never a field. A section that is gone (`ppo`) says where each of its
    fields in `given` went (all of them when `given` is None)."""
    table = RENAMED.get(cls, {})
    if key in table:
        listed = " (docs/algorithms.md §4 lists every setting)" if cls is RLTrainConfig else ""
        note = _RENAME_NOTES.get(key, "")
        return ConfigError(f"'{prefix}{key}' was renamed: use '{prefix}{table[key]}'{note}{listed}")
    moved = [(old, new) for old, new in table.items() if old.startswith(key + ".")]
    if given is not None:
        moved = [(old, new) for old, new in moved if old.split(".")[-1] in given]
    if key + "." in {old[: len(key) + 1] for old in table}:
        pairs = "; ".join(f"{prefix}{old} → {prefix}{new}" for old, new in moved)
        return ConfigError(
            f"'{prefix}{key}' is gone: its settings apply to every RL algorithm and moved by what they are "
            f"about{': ' + pairs if pairs else ''} (docs/algorithms.md §4)"
        )
    return None


def check_renamed_flags(cls: type, args: list[str]) -> None:
    """Refuse command-line flags (`--train.ppo.kl_coef`) that name a field of an earlier version, with the new name."""
    for arg in args:
        if not arg.startswith("--"):
            continue
        parts = arg[2:].split("=", 1)[0].replace("-", "_").split(".")
        holder = cls
        for i, part in enumerate(parts):
            fields = {f.name for f in dataclasses.fields(holder)}  # type: ignore[arg-type]
            if part not in fields:
                error = renamed_error(holder, ".".join(parts[i:]), "--" + "".join(p + "." for p in parts[:i]))
                if error is not None:
                    raise error
                break
            inner = getattr(holder(), part)
            if not dataclasses.is_dataclass(inner):
                break
            holder = type(inner)


def from_dict(cls: type[C], data: dict, where: str = "") -> C:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys with the dotted key path (and old names with
    the new one)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    defaults = cls()
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            given = list(value) if isinstance(value, dict) else None
            error = renamed_error(cls, key, f"{where}." if where else "", given)
            if error is not None:
                raise error
            raise ConfigError(f"unknown config key '{path}' (known: {', '.join(sorted(fields))})")
        current = getattr(defaults, key)
        if dataclasses.is_dataclass(current):
            kwargs[key] = from_dict(type(current), value, path)
        elif isinstance(current, tuple) and isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def load_recipe(cls: type[C], path: str | Path) -> C:
    """Read a YAML recipe into config class `cls`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe {p}: file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {p}: invalid YAML: {e}") from None
    try:
        cfg = from_dict(cls, data)
        _validate_types(cfg)
        return cfg
    except TypeError as e:
        raise ConfigError(f"recipe {p}: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"recipe {p}: {e}") from None


def to_dict(cfg: Any) -> dict:
    """The config as plain YAML-safe data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Any, path: Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    tmp.replace(path)
