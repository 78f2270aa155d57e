"""What the RL stage trains and scores with: the actor (with its hybrid engine), the critic, the frozen reference
and the reward sources, built once per run; and the PTX batches."""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from chatrlhf import distributed as dist
from chatrlhf.config import RLConfig, RLTrainConfig
from chatrlhf.data import to_sft
from chatrlhf.data.collate import collate_sft, encode_all, encode_sft
from chatrlhf.engine.base import TrainEngine
from chatrlhf.engine.factory import build_engine, frozen_loading, frozen_model, partitions, trained_loading
from chatrlhf.engine.hybrid import HybridEngine
from chatrlhf.engine.vllm import VLLMGenerator, check_vllm_support
from chatrlhf.envs.episode import load_environment
from chatrlhf.envs.runner import EpisodeLimits, EpisodeRunner
from chatrlhf.errors import UserError
from chatrlhf.models.load import context_length, load_causal_lm, load_tokenizer, load_value_model, resolve_model
from chatrlhf.models.lora import AdapterFree
from chatrlhf.models.rewards import Scorer, build_scorer
from chatrlhf.models.training import prepare_for_training
from chatrlhf.train.algorithms import Algorithm
from chatrlhf.train.data import convert, load_raw, prep_of


@dataclass
class Models:
    """Everything an iteration runs: the actor (trained, and generating through the hybrid engine), the critic
    (PPO), the frozen reference and the reward sources. Under ZeRO-3 the reference and the reward model are
    DeepSpeed inference engines holding 1/N of their parameters on each rank (`factory.frozen_model`): every rank
    must call them equally often, which equal rollout shares and evaluating every held-out prompt on every rank
    ensure."""

    tok: object
    actor: HybridEngine
    actor_engine: TrainEngine
    critic_engine: TrainEngine | None
    reference: torch.nn.Module | AdapterFree
    """The frozen reference: a model of its own, or with LoRA and no `reference` set the actor without its
    adapters (`lora.AdapterFree`)."""
    scorer: Scorer
    device: torch.device
    move_frozen: bool = False
    """`engine.offload_frozen` on whole frozen models: `resident` moves them to the device for each use. (Under
    ZeRO-3, DeepSpeed keeps their partitions on the CPU and fetches each layer itself.)"""
    runner: EpisodeRunner | None = None
    """Plays the rollout's multi-turn episodes (with `env`); None = single responses."""
    context: int | None = None
    """The shortest context length (models/load.py:context_length) of the models that read the rollouts: the actor,
    the reference, a reward model, the critic; None when none of them gives one."""

    @property
    def engines(self) -> list[TrainEngine]:
        """The trained models' engines: what a checkpoint saves."""
        return [e for e in (self.actor_engine, self.critic_engine) if e is not None]

    @contextmanager
    def resident(self, modules: list[torch.nn.Module]):
        """With `move_frozen`, the frozen `modules` are on the device only for the block (CPU otherwise)."""
        modules = [m for m in modules if isinstance(m, torch.nn.Module)]  # an AdapterFree reference is the actor
        if not self.move_frozen:
            yield
            return
        for module in modules:
            module.to(self.device)
        try:
            yield
        finally:
            for module in modules:
                module.to("cpu")


def trainable(model: torch.nn.Module, cfg: RLConfig) -> torch.nn.Module:
    """Actor and critic train with dropout off (so the first update's ratio is 1, as with DeepSpeed-Chat): in eval
    mode, or — with gradient checkpointing, which transformers applies only in train mode — in train mode with every
    dropout layer at p = 0."""
    model = prepare_for_training(model.eval(), cfg.engine, cfg.lora)
    if cfg.engine.gradient_checkpointing:
        model.train()
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    return model


def build_models(cfg: RLConfig, algo: Algorithm, out: Path, device) -> Models:
    """The trained actor (and critic for PPO), the frozen reference and the reward sources (on the CPU between
    uses with `engine.offload_frozen`). Under ZeRO-3 every one of them is loaded partitioned, so that no rank
    ever holds one whole."""
    train = cfg.train
    actor_path = resolve_model(cfg.actor, out)
    tok = load_tokenizer(actor_path)
    dtype = cfg.run.dtype
    sharded = partitions(cfg.engine)
    move_frozen = cfg.engine.offload_frozen and not sharded
    frozen_device = torch.device("cpu") if move_frozen else device

    def frozen(model: torch.nn.Module) -> torch.nn.Module:
        return frozen_model(model.eval().requires_grad_(False), cfg.engine, cfg.run)

    with trained_loading(cfg.engine, cfg.run):  # under ZeRO-3 every model loads partitioned: never whole on a rank
        actor = trainable(load_causal_lm(actor_path, tok, dtype, device), cfg)
    reference_path = resolve_model(cfg.reference or cfg.actor, out)
    rm = resolve_model(cfg.reward_model, out) if cfg.reward_model else None
    with frozen_loading(cfg.engine, cfg.run):
        if cfg.lora.rank > 0 and cfg.reference is None:  # π_ref is the actor's starting weights: its LoRA base
            reference = AdapterFree(actor)
            print("rl: reference = the actor without its LoRA adapters (its starting weights; no second copy)")
        else:
            reference = frozen(load_causal_lm(reference_path, tok, dtype, frozen_device))
        scorer = build_scorer(
            reward_model=rm,
            reward_functions=cfg.reward_functions,
            weights=cfg.reward_weights,
            policy_tok=tok,
            dtype=dtype,
            device=frozen_device,
            environment=bool(cfg.env),
            place=frozen,
        )
    steps = train.iterations * train.update.epochs * updates_per_epoch(train)
    actor_engine = build_engine(actor, train.actor_optim, steps, "actor", cfg.engine, cfg.run)
    critic_engine = None
    if algo.uses_critic:
        critic_path = resolve_model(cfg.critic or cfg.reward_model, out)
        if load_tokenizer(critic_path).get_vocab() != tok.get_vocab():
            raise UserError(f"critic '{critic_path}' must share the actor's tokenizer: it values the actor's tokens")
        with trained_loading(cfg.engine, cfg.run):
            critic_model = load_value_model(
                critic_path, tok, dtype, device, require_head=not cfg.critic_fresh_head, role="critic"
            )
        critic = trainable(critic_model, cfg)
        critic_engine = build_engine(critic, train.critic_optim, steps, "critic", cfg.engine, cfg.run)
    readers = [actor, reference, *scorer.modules()] + ([critic_engine.module] if critic_engine else [])
    runner = episode_runner(cfg, tok, readers) if cfg.env else None
    contexts = [c for c in (context_length(r.config) for r in readers) if c is not None]
    return Models(
        tok=tok,
        actor=HybridEngine(actor_engine, tok, train.generation, rollout_engine(cfg, actor_path, tok, device)),
        actor_engine=actor_engine,
        critic_engine=critic_engine,
        reference=reference,
        scorer=scorer,
        device=device,
        move_frozen=move_frozen,
        runner=runner,
        context=min(contexts, default=None),
    )


def episode_runner(cfg: RLConfig, tok, models: list[torch.nn.Module]) -> EpisodeRunner:
    """The environment `cfg.env` loaded and its episode runner, which checks up front the chat template and that an
    episode fits the context of every model that reads it (`models`: the actor, the reference, the critic, a
    reward model)."""
    e = cfg.train.episode
    contexts = [c for c in (context_length(m.config) for m in models) if c is not None]
    limits = EpisodeLimits(
        e.max_turns, e.max_tool_calls, e.tool_timeout_s, e.max_tokens, cfg.train.generation.max_new_tokens,
        min(contexts, default=None),
    )  # fmt: skip
    return EpisodeRunner(load_environment(cfg.env), tok, limits)


def rollout_engine(cfg: RLConfig, actor_path: str, tok, device) -> VLLMGenerator | None:
    """The colocated vLLM engine of `train.rollout.backend=vllm` (None for hf), started from the actor's starting
    weights; every rollout syncs the current ones. With several ranks each rank runs its own engine (data parallel),
    fed from its own copy of the weights (under ZeRO-3, the whole copy gathered for generation)."""
    train = cfg.train
    if train.rollout.backend != "vllm":
        return None
    check_vllm_support(actor_path)
    return VLLMGenerator(
        actor_path,
        tok,
        train.generation,
        train.rollout,
        dtype=cfg.run.dtype,
        max_model_len=longest_sequence(cfg),
        device=device,
        data_parallel=dist.world_size(),
    )


def longest_sequence(cfg: RLConfig) -> int:
    """The most tokens a rollout sequence holds: a prompt and a response, or (with `env`) an episode — at most
    `train.episode.max_tokens` before its last policy turn (envs/runner.py)."""
    train = cfg.train
    return (train.episode.max_tokens if cfg.env else train.max_prompt_len) + train.generation.max_new_tokens


def updates_per_epoch(train: RLTrainConfig) -> int:
    samples = train.rollout_batch_size * train.group_size
    return samples // (train.update.mini_batch_size or samples)


def check_ranks(train: RLTrainConfig, world: int) -> None:
    """Every rank must run the same number of forwards (ZeRO-3 gathers in each): equal shares of every batch."""
    if world == 1:
        return
    samples = train.rollout_batch_size * train.group_size
    mini = train.update.mini_batch_size or samples
    micro = train.update.micro_batch_size or mini // world
    if train.rollout_batch_size % world or mini % world or (mini // world) % micro:
        raise UserError(
            f"with {world} ranks, train.rollout_batch_size ({train.rollout_batch_size}) and "
            f"train.update.mini_batch_size ({mini}) must be multiples of {world}, and train.update.micro_batch_size "
            f"({micro}, per rank) must divide the {mini // world} sequences of each rank's mini-batch share"
        )


class PTXBatches:
    """Endless batches of SFT-format records for the PTX loss, in a seeded order (a new permutation per pass; each
    rank takes its share of every global batch). It counts the batches it has handed out, so that a resumed run
    continues with the batch the uninterrupted run would have drawn next (an iteration that trains nothing, such
    as one whose responses were all empty, draws none)."""

    def __init__(self, encoded: list, batch_size: int, seed: int, pad_id: int, device):
        self.encoded, self.batch_size, self.seed, self.pad_id, self.device = encoded, batch_size, seed, pad_id, device
        self.drawn = 0
        self._batches = self._stream()

    def _stream(self):
        step = self.batch_size * dist.world_size()
        for epoch in itertools.count():
            order = np.random.default_rng(self.seed + 7919 + epoch).permutation(len(self.encoded))
            for i in range(0, len(order), step):
                yield dist.shard([self.encoded[j] for j in order[i : i + step]])[0]

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.drawn += 1
        return tuple(x.to(self.device) for x in collate_sft(next(self._batches), self.pad_id))

    def skip_to(self, drawn: int) -> None:
        """Fast-forward to where a run that had drawn `drawn` batches stood."""
        while self.drawn < drawn:
            self.drawn += 1
            next(self._batches)


def ptx_batches(cfg: RLConfig, tok, out: Path, device) -> PTXBatches | None:
    """The PTX batches of `train.ptx_paths`, or None."""
    train = cfg.train
    if not train.ptx_paths:
        return None
    raws = load_raw(train.ptx_paths, None, cfg.run.seed, out, prep=prep_of(cfg.data))
    recs = convert(raws, to_sft, cfg.data.skip_invalid, "PTX")
    max_len = train.max_prompt_len + train.generation.max_new_tokens
    enc = encode_all(recs, encode_sft, tok, max_len=max_len, loss_on_prompt=False)
    return PTXBatches(enc, batch_size=train.ptx_batch_size, seed=cfg.run.seed, pad_id=tok.pad_token_id, device=device)
