"""The commands that only run models: `chatrlhf chat`, `serve` and `eval`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from chatrlhf.config.common import check_format, check_types, require
from chatrlhf.config.rl import EpisodeConfig, GenerationConfig, check_episode_bounds, check_sampling
from chatrlhf.errors import ConfigError


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
    enforce_eager: bool = True
    """vLLM runs its model eagerly. False captures CUDA graphs for decoding on a GPU, as vLLM does by default
    (faster decode steps for a slower start; not yet measured here), and compiles the model on a CPU."""
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
        check_types(self)
        require(self.model, "model", "a model directory (chatrlhf chat MODEL_DIR)")
        _validate_backend(self)
        check_sampling(self.temperature, self.top_p, self.top_k, self.max_new_tokens, "")
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
        check_types(self)
        require(self.model, "model", "a model directory (chatrlhf serve MODEL_DIR)")
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
        check_types(self)
        _validate_backend(self)
        check_format(self.format)
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
            check_episode_bounds(self.episode, "episode")


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
