"""Step 3: `chatrlhf rl` — generation, rollouts, KL, rewards, advantages, losses, the update, the algorithms' rules,
the diagnostics and multi-turn episodes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from chatrlhf.config.common import DataConfig, OptimConfig, StageOptions, check_data, check_optim, check_types, require
from chatrlhf.errors import ConfigError


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
    enforce_eager: bool = True
    """vLLM runs its model eagerly (the default here). False lets vLLM capture CUDA graphs for decoding on a GPU, as
    vLLM does by default: faster decode steps for a slower start and some memory for the graphs; the weight syncs
    write into the same tensors the graphs read. Not yet measured on a GPU (bench/step3.py compares the two with
    vLLM on its own). On the CPU, False compiles the model instead: on the tiny models of bench/rollout_phases.py
    on a 2-vCPU VM that took 59 s to start against 12 s and gave no clear gain."""
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
    trim_padding: bool = True
    """Run each forward/backward of the update only over the columns its micro-batch uses (the default): the
    micro-batches of a rank's share of a mini-batch are cut from it sorted by response length (when there are
    several), and each drops the prompt columns that are padding in all its rows and the response columns past its
    longest response. The losses are the same sums; only the float rounding of the forwards differs (so a run is not
    bit-identical to one without it). False: every micro-batch at the rollout's full width, in the shuffled
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
        check_types(self)
        require(self.actor, "actor", "the SFT model directory")
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
            require(self.data.paths, "data.paths", "at least one prompt source")
        check_data(self.data)
        check_rl(self.train)

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
        check_episode_bounds(t.episode, "train.episode")


def check_episode_bounds(e: EpisodeConfig, prefix: str) -> None:
    if e.max_turns < 1 or e.max_tool_calls < 0 or e.tool_timeout_s <= 0 or e.max_tokens < 1:
        raise ConfigError(f"{prefix}: max_turns and max_tokens must be >= 1, max_tool_calls >= 0, tool_timeout_s > 0")


def check_sampling(temperature: float, top_p: float, top_k: int, max_new_tokens: int, prefix: str) -> None:
    if temperature < 0:
        raise ConfigError(f"{prefix}temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"{prefix}top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ConfigError(f"{prefix}top_k must be >= 0 (0 = off), got {top_k}")
    if max_new_tokens < 1:
        raise ConfigError(f"{prefix}max_new_tokens must be >= 1, got {max_new_tokens}")


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


def check_rl(t: RLTrainConfig, prefix: str = "train") -> None:
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
        check_optim(getattr(t, name), f"{prefix}.{name}")
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
